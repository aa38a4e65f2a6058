"""Shared fixtures: tiny models built in milliseconds, seeded."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

try:  # torch's compiler stack (and triton's LLVM, where installed) before any GL context:
    # the reference's torchvision imports it on first use, and importing triton
    # after Mesa's llvmpipe has loaded its own libLLVM segfaults (a napari test,
    # then a parity test importing segment_anything). The plugin's own imports of
    # torchvision go through napari_sam._clip._block_triton_if_it_would_crash.
    import torch._dynamo
except ImportError:  # pragma: no cover - a torch build without dynamo
    pass


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's checkpoint cache from a test."""
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path_factory.mktemp("sam-cache")))


@pytest.fixture
def tiny_model():
    """A randomly initialised ``tiny_vit_b`` SAM (input 128 px), eval mode."""
    from napari_sam.registry import build_model

    from ._reference import randomize_

    torch.manual_seed(0)
    return randomize_(build_model("tiny_vit_b"), seed=0)


@pytest.fixture(scope="session")
def demo_model():
    """The shipped ``demo`` model (trained on synthetic microscopy), eval mode.

    Tests that check real segmentation behaviour use it; they skip only in a
    build without the packaged checkpoint (``src/napari_sam/data/demo_sam.pt``).
    """
    from napari_sam.data import DEMO_CHECKPOINT
    from napari_sam.registry import build_model

    if not DEMO_CHECKPOINT.is_file():
        pytest.skip("no demo checkpoint in this build: train it with scripts/train_demo.py")
    return build_model("demo", checkpoint=DEMO_CHECKPOINT).eval()
