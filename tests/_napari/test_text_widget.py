"""The "Text prompt" widget: its Qt-free job (no display) and the dock widget (Xvfb, workers)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_sam._napari import _text_job
from napari_sam._napari.layers import view_plane
from napari_sam._napari.session import SamSession
from napari_sam.automatic import AutomaticSettings
from napari_sam.text import AutomaticMaskCache

from ..test_text import ColourClip

WIDGET = "Text prompt"
TIMEOUT_MS = 60_000
FEW_POINTS = AutomaticSettings(
    points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
)


def _image():
    """Grey 48 x 64 RGB image with a red and a blue block."""
    data = np.full((48, 64, 3), 128, np.uint8)
    data[5:25, 5:30] = (255, 0, 0)
    data[28:45, 35:60] = (0, 0, 255)
    return data


def _request(image, plane, texts=("red",), **kwargs):
    options = dict(threshold=0.0, top_k=None, points_xy=None, boxes_xyxy=None, generation=0)
    return _text_job.TextRequest(
        image=image,
        plane=plane,
        contrast_limits=tuple(image.contrast_limits),
        texts=texts,
        **(options | kwargs),
    )


# --------------------------------------------------------------------------- #
# the job, no display
# --------------------------------------------------------------------------- #
def test_split_texts():
    assert _text_job.split_texts(" nucleus ;  mitotic   cell;;nucleus ") == (
        "nucleus",
        "mitotic cell",
    )
    assert _text_job.split_texts(" ; ") == ()


def test_job_runs_shows_and_accepts(tiny_model):
    viewer = ViewerModel()
    image = viewer.add_image(np.stack([_image()] * 2), rgb=True)
    viewer.dims.set_current_step(0, 1)
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    slot = _text_job.ClipSlot()
    slot.set_clip(ColourClip())
    plane = view_plane(image, viewer.dims)
    cache = AutomaticMaskCache()
    request = _request(image, plane, ("red", "blue"), top_k=1)
    result = _text_job.run_request(
        request, sam, slot, cache, FEW_POINTS, progress=None, cancel=None
    )
    texts = [o.text for o in result.objects]
    assert 1 <= len(texts) <= 2 and len(set(texts)) == len(texts)  # top_k=1 per text
    assert len(sam.embeddings.cache) == 1  # the session's embedding, shared
    out = _text_job.output_layer_for(viewer, None, image)
    assert out.data.shape == (2, 48, 64)
    _text_job.show_result(out, request, result, None)
    assert not out.data[0].any()
    assert out.data[1].max() == len(result.objects)
    assert list(out.features["index"]) == [o.label for o in result.objects]
    assert list(out.features["text"]) == [o.text for o in result.objects]
    np.testing.assert_allclose(out.features["score"], [o.score for o in result.objects])
    # accept: background only, new ids, one undo step
    target = viewer.add_labels(np.zeros((2, 48, 64), np.uint16))
    target.data[1, :10, :10] = 7
    before = target.data.copy()
    accepted = _text_job.accept_result(target, request, result)
    assert all(i >= 8 for i in accepted.label_ids)
    assert np.all(target.data[1, :10, :10] == 7) and not target.data[0].any()
    if accepted.label_ids:
        assert (target.data != before).any()
    target.undo()
    np.testing.assert_array_equal(target.data, before)


def test_session_prompts_restrict(tiny_model):
    viewer = ViewerModel()
    image = viewer.add_image(_image(), rgb=True)
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    sam.set_image(image)
    plane = sam.current_plane()
    assert _text_job.session_prompts(sam, image, plane) == (None, None)
    sam.segment(boxes_xyxy=[[2, 2, 40, 30]], points_xy=[[50, 40]])
    points, boxes = _text_job.session_prompts(sam, image, plane)
    np.testing.assert_allclose(points, [[50, 40]])
    np.testing.assert_allclose(boxes, [[2, 2, 40, 30]])
    other = viewer.add_image(_image(), rgb=True)
    assert _text_job.session_prompts(sam, other, plane) == (None, None)


# --------------------------------------------------------------------------- #
# the dock widget (Xvfb)
# --------------------------------------------------------------------------- #
@pytest.fixture
def opened(make_napari_viewer, tiny_model):
    from napari_sam._napari.text_widget import TextPromptWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(_image(), rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", WIDGET)
    assert isinstance(widget, TextPromptWidget)
    widget.session.set_model(tiny_model)
    widget.set_clip(ColourClip())
    widget.automatic_settings = FEW_POINTS
    return viewer, image, widget


def _run(widget, qtbot, text):
    widget.text_edit.setText(text)
    widget.text_edit.returnPressed.emit()  # what Enter does
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


@pytest.mark.gui
def test_enter_runs_in_a_worker_and_fills_layer_table(opened, qtbot):
    viewer, image, widget = opened
    assert widget.image_combo.currentData() is image
    widget.threshold_spin.setValue(0.0)
    widget.top_k_spin.setValue(2)
    _run(widget, qtbot, "red; blue")
    request, result = widget.result
    assert request.texts == ("red", "blue") and request.top_k == 2
    assert 1 <= len(result.objects) <= 4
    layer = widget.output_layer
    assert layer in viewer.layers and layer.data.shape == (48, 64)
    assert set(layer.features["text"]) <= {"red", "blue"}
    assert widget.table.rowCount() == len(result.objects) == len(layer.features)
    for row, obj in enumerate(result.objects):
        assert widget.table.item(row, 1).text() == obj.text
        assert float(widget.table.item(row, 2).text()) == pytest.approx(obj.score, abs=1e-3)
    assert "object(s) of" in widget.status.text()
    assert widget.session is SamSession.for_viewer(viewer)
    assert len(widget.session.embeddings.cache) == 1
    # a second query reuses the automatic masks
    _run(widget, qtbot, "blue")
    assert (widget.mask_cache.hits, widget.mask_cache.misses) == (1, 1)
    assert widget.output_layer is layer  # replaced in place, never a new layer
    # another precision: neither its embedding nor its automatic masks are reused
    widget.session.set_precision("exact")
    assert len(widget.mask_cache) == 0
    _run(widget, qtbot, "blue")
    assert (widget.mask_cache.hits, widget.mask_cache.misses) == (1, 2)
    plane = widget.result[0].plane
    assert widget.session.embeddings.get(image, plane).precision == "fp32"


@pytest.mark.gui
def test_accept_fills_background_only(opened, qtbot):
    viewer, _, widget = opened
    user = viewer.add_labels(np.zeros((48, 64), np.uint8), name="mine")
    user.data[0:48, 0:8] = 3
    widget.threshold_spin.setValue(0.0)
    _run(widget, qtbot, "red")
    assert widget.output_layer is not user
    index = widget.labels_combo.findText("mine")
    widget.labels_combo.setCurrentIndex(index)
    before = user.data.copy()
    widget.accept_button.click()
    assert np.all(user.data[:, :8] == 3)
    new = np.setdiff1d(np.unique(user.data), [0, 3])
    assert new.size and new.min() >= 4
    assert "existing objects were not touched" in widget.status.text()
    user.undo()
    np.testing.assert_array_equal(user.data, before)


@pytest.mark.gui
def test_cancel_stops_and_changes_nothing(opened, qtbot):
    _, _, widget = opened
    release, entered = threading.Event(), threading.Event()

    class SlowClip(ColourClip):
        def encode_images(self, pixels):
            entered.set()
            release.wait(10)
            return super().encode_images(pixels)

    widget.set_clip(SlowClip())
    widget.text_edit.setText("red")
    assert widget.run()
    qtbot.waitUntil(entered.is_set, timeout=TIMEOUT_MS)
    assert widget.running and widget.cancel_button.isEnabled()
    widget.cancel_button.click()
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.output_layer is None and widget.result is None
    assert widget.status.text().startswith("Cancelled")
    assert widget.run_button.isEnabled()


@pytest.mark.gui
def test_result_for_changed_contrast_is_dropped(opened, qtbot):
    _, image, widget = opened
    release = threading.Event()

    class SlowClip(ColourClip):
        def encode_images(self, pixels):
            release.wait(10)
            return super().encode_images(pixels)

    widget.set_clip(SlowClip())
    widget.text_edit.setText("red")
    widget.run()
    image.contrast_limits = (10.0, 200.0)
    release.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.output_layer is None
    assert "result dropped" in widget.status.text()


@pytest.mark.gui
def test_missing_text_or_clip_errors_are_shown(opened, qtbot):
    _, _, widget = opened
    widget.text_edit.setText("  ;  ")
    assert not widget.run()
    assert "type a text" in widget.status.text()

    class Broken(ColourClip):
        def encode_texts(self, texts):
            raise RuntimeError("no CLIP today")

    widget.set_clip(Broken())
    _run(widget, qtbot, "red")
    assert "Text prompt failed: no CLIP today" in widget.status.text()
    assert widget.output_layer is None


@pytest.mark.gui
def test_clip_choice_loads_in_the_worker_or_says_what_to_fetch(
    opened, qtbot, tmp_path, monkeypatch
):
    import json

    from napari_sam import _clip

    from ..test_text import TINY_CFG

    _, _, widget = opened
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    widget.clip_slot.set_choice(_text_job.folder_choice(tmp_path))  # the "folder…" entry
    widget.threshold_spin.setValue(0.0)
    _run(widget, qtbot, "nucleus")
    assert widget.result is not None and widget.clip_slot.clip.image_size == 32
    # the default entry (ViT-B-32 / openai) with an empty cache and no network
    monkeypatch.setattr(_clip, "_probe_host", lambda cfg: "napari-sam-lab.invalid")
    for var in (*_clip._PROXY_VARS, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    widget.clip_combo.setCurrentIndex(0)
    widget.clip_combo.activated.emit(0)
    assert widget.clip_slot.clip is None
    _run(widget, qtbot, "nucleus")
    text = widget.status.text()
    assert "could not be downloaded" in text and "ViT-B-32-openai.safetensors" in text
