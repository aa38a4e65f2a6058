"""Sample images for a first try: two that ship with scikit-image, and synthetic nuclei.

Each function returns napari layer-data tuples; none needs the network.
"""

from __future__ import annotations

import numpy as np

from napari_sam.synthetic import DEMO_NUCLEI_SEED, demo_nuclei, make_sample

#: Seed of the synthetic nuclei images (fixed: the same pixels everywhere).
NUCLEI_SEED = DEMO_NUCLEI_SEED
STACK_DEPTH = 8


def cell() -> list[tuple]:
    """scikit-image's ``cell``: a phase-contrast cell, 660 x 550, uint8."""
    from skimage import data

    return [(data.cell(), {"name": "cell"}, "image")]


def coins() -> list[tuple]:
    """scikit-image's ``coins``: 24 coins on a dark background, 303 x 384, uint8."""
    from skimage import data

    return [(data.coins(), {"name": "coins"}, "image")]


def nuclei() -> list[tuple]:
    """One synthetic fluorescence image of nuclei, 384 x 384, uint8 (the demo model's kind)."""
    sample = demo_nuclei()
    return [(sample.image, {"name": "nuclei", "colormap": "gray"}, "image")]


def _common_range(image: np.ndarray, low: float = 1000.0, high: float = 50000.0) -> np.ndarray:
    """Map an image's 0.1 and 99.8 percentiles linearly to ``low`` and ``high`` (uint16)."""
    lo, hi = np.percentile(image, (0.1, 99.8))
    scaled = (image.astype(np.float64) - lo) * ((high - low) / max(hi - lo, 1.0)) + low
    return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)


def nuclei_stack() -> list[tuple]:
    """A synthetic stack of nuclei images, (8, 256, 256), uint16, z-spacing 2.

    Each slice is an independent synthetic image (its objects differ from
    slice to slice); it exercises per-slice embeddings and commits. The
    slices are brought to one intensity range, as one acquisition would be
    (the generator's brightness varies about 15-fold between images), so
    one set of contrast limits shows every slice, and the model, which sees
    the image through those limits, gets a usable picture of each.
    """
    slices = [
        _common_range(
            make_sample(
                NUCLEI_SEED + z,
                shape_hw=(256, 256),
                kind="nuclei",
                bright_objects=True,
                dtype=np.uint16,
                size_px=12.0,
            ).image
        )
        for z in range(STACK_DEPTH)
    ]
    stack = np.stack(slices)
    limits = (float(stack.min()), float(np.percentile(stack, 99.8)))
    meta = {
        "name": "nuclei stack",
        "colormap": "gray",
        "scale": (2.0, 1.0, 1.0),
        "contrast_limits": limits,
    }
    return [(stack, meta, "image")]
