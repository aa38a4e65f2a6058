"""The model list, cache status, device and precision choice of the widgets (no display)."""

from __future__ import annotations

import pytest

from napari_sam import weights
from napari_sam._napari import models


def test_model_list_default_first_published_and_shipped(tmp_path, monkeypatch):
    assert models.model_names()[0] == "vit_b"
    assert set(weights.KNOWN_CHECKPOINTS) <= set(models.model_names())
    shipped = tmp_path / "mine.pt"
    monkeypatch.setitem(models.LOCAL_MODELS, "mine", shipped)
    assert "mine" not in models.model_names()  # listed only once the file exists
    shipped.write_bytes(b"x")
    assert models.model_names()[-1] == "mine"
    assert models.loadable("mine") == shipped and models.loadable("vit_b") == "vit_b"
    entry = {e.name: e for e in models.model_entries()}["mine"]
    assert entry.cached and entry.label == "mine (cached)"


def test_cached_status_follows_the_cache_directory():
    info = weights.KNOWN_CHECKPOINTS["vit_b"]
    assert not models.is_cached("vit_b")
    assert {e.name: e for e in models.model_entries()}["vit_b"].label == "vit_b (download)"
    weights.cache_dir().mkdir(parents=True, exist_ok=True)
    (weights.cache_dir() / info.filename).write_bytes(b"")
    assert models.is_cached("vit_b")


def test_resolve_device():
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="device must be one of"):
        models.resolve_device("tpu")


def test_registered_and_finetuned_models_are_offered(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "LOCAL_MODELS", dict(models.LOCAL_MODELS))
    mine = tmp_path / "mine.pt"
    with pytest.raises(ValueError, match="no checkpoint file"):
        models.register_local_model("mine", mine)
    mine.write_bytes(b"x")
    with pytest.raises(ValueError, match="taken by a built-in model"):
        models.register_local_model("vit_b", mine)
    with pytest.raises(ValueError, match="model name must be"):
        models.register_local_model("a b", mine)
    assert models.register_local_model("mine", mine) == "mine"
    assert models.model_names()[-1] == "mine" and models.loadable("mine") == mine
    # every checkpoint in the fine-tuned folder is listed, after a restart too
    saved = models.finetuned_dir() / "nuclei-v2.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"x")
    (saved.parent / "vit_b.pt").write_bytes(b"x")  # never shadows a published model
    assert models.local_models()["nuclei-v2"] == saved
    assert models.loadable("nuclei-v2") == saved and models.loadable("vit_b") == "vit_b"
    entry = {e.name: e for e in models.model_entries()}["nuclei-v2"]
    assert entry.cached and "local" in entry.note


def test_precision_choice_is_validated_and_bumps_the_token():
    changes = []
    slot = models.ModelSlot(
        "vit_b", "cpu", on_change=lambda: changes.append(1), on_status=print, on_error=print
    )
    assert slot.precision == models.DEFAULT_PRECISION == "auto"
    token = slot.token
    slot.set_precision("exact")
    assert slot.precision == "exact" and slot.token == token + 1 and changes == [1]
    slot.set_precision("exact")  # the current one: nothing to recompute
    assert slot.token == token + 1 and changes == [1]
    choices = r"\('auto', 'exact', 'fp32', 'bf16', 'fp16'\)"
    with pytest.raises(ValueError, match=rf"precision must be one of {choices}; received 'fp8'"):
        slot.set_precision("fp8")
    assert slot.precision == "exact" and slot.token == token + 1
    with pytest.raises(ValueError, match="precision must be one of"):
        models.ModelSlot(
            "vit_b", "cpu", precision="half", on_change=print, on_status=print, on_error=print
        )


@pytest.mark.gui
def test_background_load_sets_the_model_and_warms_the_first_preview(qtbot, tiny_model, monkeypatch):
    import threading

    import napari.utils.colormaps

    seen = {}

    def load(source, device, progress):
        seen["load"] = (source, device, threading.current_thread())
        return tiny_model

    monkeypatch.setattr(models.weights, "load_model", load)
    real = napari.utils.colormaps.label_colormap
    monkeypatch.setattr(
        napari.utils.colormaps,
        "label_colormap",
        lambda *a, **k: seen.setdefault("warm", threading.current_thread()) and real(*a, **k),
    )
    statuses, errors, ready = [], [], []
    slot = models.ModelSlot(
        "vit_b",
        "cpu",
        on_change=lambda: None,
        on_status=statuses.append,
        on_error=errors.append,
    )
    slot.start_load(on_ready=lambda: ready.append(True))
    qtbot.waitUntil(lambda: bool(ready), timeout=30_000)
    assert slot.model is tiny_model and slot.job is None and not errors
    assert statuses[-1] == "Model vit_b ready"
    assert seen["load"][0] == "vit_b" and seen["load"][1] == "cpu"
    worker_thread = seen["load"][2]
    assert worker_thread is not threading.main_thread()
    assert seen["warm"] is worker_thread  # in the worker, after the load
