"""The dock widget in a real viewer (Xvfb), loaded through the manifest, with worker threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_sam import weights
from napari_sam._napari import embeddings as embeddings_module
from napari_sam._napari._keys import KEYS
from napari_sam._napari.widget import SamWidget

pytestmark = pytest.mark.gui
WIDGET = "Segment Anything"
TIMEOUT_MS = 60_000


def _stack(n=3):
    rng = np.random.default_rng(2)
    data = rng.random((n, 48, 64)).astype(np.float32)
    data[:, 8:30, 15:40] += 2.0
    return data


def _open(make_napari_viewer, data, **kwargs):
    viewer = make_napari_viewer()
    image = viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", WIDGET)
    assert isinstance(widget, SamWidget)
    return viewer, image, widget


def _ready(widget, qtbot):
    """Wait until the embedding of the plane on screen is cached and no worker runs."""
    sam = widget.session
    qtbot.waitUntil(
        lambda: (
            not sam.busy and sam.embeddings.get(sam.image_layer, sam.current_plane()) is not None
        ),
        timeout=TIMEOUT_MS,
    )


def _add_point(sam, z, row, col):
    world = sam.image_layer.data_to_world([z, row, col])
    sam.points_layer.add(sam.points_layer.world_to_data(world))


def _press(viewer, key):
    """Press a key through the canvas' keymap handler (what a key press in napari does)."""
    viewer.window._qt_viewer.canvas._key_map_handler.press_key(key)


@pytest.fixture
def opened(make_napari_viewer, tiny_model, qtbot):
    viewer, image, widget = _open(make_napari_viewer, _stack(), scale=(3.0, 1.0, 1.0))
    widget.session.set_model(tiny_model)
    _ready(widget, qtbot)
    return viewer, image, widget


def test_widget_from_manifest_creates_layers_and_console_variable(opened):
    viewer, image, widget = opened
    sam = widget.session
    assert sam.image_layer is image
    assert widget.image_combo.currentData() is image
    assert sam.points_layer in viewer.layers and sam.boxes_layer in viewer.layers
    assert sam.boxes_layer.mode == "add_rectangle"
    assert viewer.layers.selection.active is sam.points_layer
    backlog = viewer.window._qt_viewer.console_backlog  # pushed when the console opens
    pushed = [v["sam"] for v in backlog if isinstance(v, dict) and "sam" in v]
    assert pushed and all((p() if callable(p) else p) is sam for p in pushed)  # weakrefs


def test_points_keys_multimask_and_commit(opened, qtbot):
    viewer, _, widget = opened
    sam = widget.session
    _add_point(sam, 1, 18, 25)
    assert sam.result is not None and sam.result.n_candidates == 3
    assert all(b.isEnabled() for b in widget.candidate_buttons)
    assert widget.candidate_buttons[sam.result.selected[0]].isChecked()
    before = sam.preview_layer.data[1].copy()
    _press(viewer, KEYS["next_mask"])  # M on the points layer: next candidate
    after = sam.preview_layer.data[1].copy()
    assert (before != after).any()
    widget.candidate_buttons[sam.result.prediction.best_index[0]].click()
    _press(viewer, KEYS["toggle_sign"])  # T: next points negative
    assert "negative" in widget.sign_button.text()
    _add_point(sam, 1, 45, 60)
    assert list(sam.points_layer.features["sign"]) == ["positive", "negative"]
    np.testing.assert_array_equal(sam.result.prompts.point_labels, [1, 0])
    assert sam.result.n_candidates == 1 and not widget.next_mask_button.isEnabled()
    _press(viewer, KEYS["commit"])  # C
    labels = sam.labels_layer
    assert labels is not None and labels.data[1].max() == 1 and not labels.data[[0, 2]].any()
    assert widget.labels_combo.currentData() is labels
    assert len(sam.points_layer.data) == 0
    _add_point(sam, 1, 18, 25)
    _press(viewer, KEYS["clear"])  # Shift-C: nothing committed
    assert sam.result is None and labels.data.max() == 1


def test_keys_do_not_steal_napari_keys(opened):
    viewer, _, widget = opened
    sam = widget.session
    viewer.layers.selection.active = sam.boxes_layer
    _press(viewer, KEYS["toggle_sign"])  # T on our Shapes layer: sign, not path mode
    assert sam.next_sign == "negative" and sam.boxes_layer.mode == "add_rectangle"
    _press(viewer, "V")  # napari's visibility toggle still works
    assert not sam.boxes_layer.visible
    viewer.layers.selection.active = sam.points_layer
    _press(viewer, "P")  # napari's add-points key is untouched
    assert sam.points_layer.mode == "add"


def test_wrong_labels_shape_chosen_in_the_widget(opened):
    viewer, _, widget = opened
    sam = widget.session
    wrong = viewer.add_labels(np.zeros((10, 10), np.uint8))
    index = widget.labels_combo.findText(wrong.name)
    widget.labels_combo.setCurrentIndex(index)
    widget.labels_combo.activated.emit(index)
    assert sam.labels_layer is None and "shape" in widget.status.text()


def test_boxes_button_commit_keep_existing_and_undo(opened):
    _, _, widget = opened
    sam = widget.session
    sam.segment(boxes_xyxy=[[10, 5, 45, 33]])
    preview_one = sam.preview_layer.data[1].copy()
    corners = sam.boxes_layer.data[0].copy()
    corners[2:, 1] += 10  # drag the bottom edge: a Shapes data event
    sam.boxes_layer.data = [corners]
    assert (sam.preview_layer.data[1] != preview_one).any()
    widget.commit_button.click()
    first = sam.labels_layer.data.copy()
    assert first[1].max() == 1
    sam.segment(boxes_xyxy=[[0, 0, 63, 47], [30, 20, 60, 45]])  # two objects
    assert sam.result.n_objects == 2
    widget.commit_button.click()
    data = sam.labels_layer.data
    np.testing.assert_array_equal(data[first > 0], first[first > 0])  # keep existing
    assert set(np.unique(data[1])) - {0, 1} <= {2, 3} and data[1].max() >= 2
    sam.labels_layer.undo()
    np.testing.assert_array_equal(sam.labels_layer.data, first)


def test_negative_click_with_modifier(opened):
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    _viewer, image, widget = opened
    points = widget.session.points_layer
    position = tuple(image.data_to_world([1, 20, 30]))
    cases = (([], 1, "positive"), (["Shift"], 1, "negative"), ([], 2, "negative"))
    for modifiers, button, expected in cases:  # plain, Shift-click, right-click
        for kind, call in (("mouse_press", mouse_press_callbacks),
                           ("mouse_release", mouse_release_callbacks)):  # fmt: skip
            event = read_only_mouse_event(
                type=kind, modifiers=modifiers, button=button, position=position,
                dims_displayed=[1, 2],
            )  # fmt: skip
            call(points, event)
        assert points.features["sign"].iloc[-1] == expected
    assert widget.session.result.prompts.point_labels.tolist() == [1, 0, 0]


def test_stale_embedding_is_not_applied_to_the_new_slice(make_napari_viewer, tiny_model, qtbot):
    viewer, image, widget = _open(make_napari_viewer, _stack())
    sam = widget.session
    gate, started, encoded = threading.Event(), threading.Event(), []
    real = embeddings_module.encode_image

    def slow_encode(model, data, **kwargs):
        encoded.append(data.copy())
        started.set()
        assert gate.wait(30)
        return real(model, data, **kwargs)

    viewer.dims.set_point(0, 0)
    embeddings_module.encode_image = slow_encode
    try:
        sam.set_model(tiny_model)  # starts encoding slice 0
        qtbot.waitUntil(started.is_set, timeout=TIMEOUT_MS)
        slice0 = sam.embeddings.job_key
        _add_point(sam, 2, 18, 25)  # prompt on slice 2 while slice 0 is encoded
        viewer.dims.set_point(0, 2)
        assert sam.result is None  # nothing shown without slice 2's embedding
        gate.set()
        _ready(widget, qtbot)
    finally:
        embeddings_module.encode_image = real
    assert len(encoded) == 2
    np.testing.assert_array_equal(encoded[0], image.data[0])
    np.testing.assert_array_equal(encoded[1], image.data[2])
    assert slice0.plane != sam.result.key.plane  # the preview comes from slice 2's embedding
    assert sam.result.key == sam.embeddings.key(image, sam.current_plane())
    assert not sam.preview_layer.data[0].any() and sam.preview_layer.data[2].any()


def test_model_change_mid_embedding_discards_the_result(make_napari_viewer, tiny_model, qtbot):
    _viewer, image, widget = _open(make_napari_viewer, _stack(1)[0])
    sam = widget.session
    gate, started = threading.Event(), threading.Event()
    real = embeddings_module.encode_image

    def slow_encode(model, data, **kwargs):
        started.set()
        assert gate.wait(30)
        return real(model, data, **kwargs)

    embeddings_module.encode_image = slow_encode
    try:
        sam.set_model(tiny_model, name="first")
        qtbot.waitUntil(started.is_set, timeout=TIMEOUT_MS)
        old_key = sam.embeddings.job_key
        sam.set_model(tiny_model, name="second")
        gate.set()
        _ready(widget, qtbot)
    finally:
        embeddings_module.encode_image = real
    assert old_key not in sam.embeddings.cache
    assert sam.embeddings.key(image, sam.current_plane()).model_token == sam.models.token


def test_scale_translate_round_trip_commit(make_napari_viewer, tiny_model, qtbot):
    viewer, image, widget = _open(
        make_napari_viewer, _stack(2), scale=(2.0, 0.5, 1.5), translate=(1.0, 10.0, -4.0)
    )
    sam = widget.session
    sam.set_model(tiny_model)
    _ready(widget, qtbot)
    sam.points_layer.translate = (0.0, 2.0, 3.0)  # prompt layer no longer aligned: world counts
    viewer.dims.set_point(0, 1.0 + 2.0)  # slice 1
    _ready(widget, qtbot)
    result = sam.segment(points_xy=[[30, 20]])
    np.testing.assert_allclose(result.prompts.points_xy, [[30, 20]], atol=1e-9)
    world = sam.points_layer.data_to_world(sam.points_layer.data[0])
    np.testing.assert_allclose(image.world_to_data(world), [1, 20, 30], atol=1e-9)
    mask = result.masks[0]
    sam.commit()
    np.testing.assert_array_equal(sam.labels_layer.data[1] > 0, mask)
    np.testing.assert_allclose(sam.labels_layer.scale, image.scale)
    np.testing.assert_allclose(sam.labels_layer.translate, image.translate)


def test_no_weights_no_network_explains_in_the_widget(make_napari_viewer, qtbot, monkeypatch):
    def offline(name, **kwargs):
        raise weights.CheckpointUnavailableError(
            f"could not download {name}: offline. To work offline, download URL elsewhere "
            "and copy it to CACHE/sam_vit_b_01ec64.pth"
        )

    monkeypatch.setattr(weights, "load_model", offline)
    _viewer, _image, widget = _open(make_napari_viewer, _stack(1)[0])
    sam = widget.session
    assert "not downloaded" in widget.status.text()  # no download just for opening the widget
    sam.points_layer.add([10, 10])
    qtbot.waitUntil(lambda: not sam.busy and sam.models.error is not None, timeout=TIMEOUT_MS)
    assert "copy it to" in widget.status.text() and "Could not load model" in widget.status.text()
    assert sam.result is None and sam.model is None
    sam.points_layer.add([20, 20])  # no retry loop, no crash
    assert sam.models.job is None


def test_load_button_downloads_with_progress(make_napari_viewer, tiny_model, qtbot, monkeypatch):
    def fake_download(name, *, device, progress):
        assert threading.current_thread() is not threading.main_thread()
        for done in (0, 2**20, 3 * 2**20):
            progress(done, 3 * 2**20)
        return tiny_model

    monkeypatch.setattr(weights, "load_model", fake_download)
    _viewer, _image, widget = _open(make_napari_viewer, _stack(1)[0])
    sam = widget.session
    statuses = []
    sam.events.status.connect(lambda event: statuses.append(event.value))
    assert sam.model is None
    widget.load_button.click()
    _ready(widget, qtbot)
    assert sam.model is tiny_model
    assert "Downloading vit_b: 3 of 3 MB" in statuses
    assert "Embedding ready" in widget.status.text()


def test_image_added_later_and_removed(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", WIDGET)
    sam = widget.session
    assert sam.image_layer is None and "Choose an image" in widget.status.text()
    first = viewer.add_image(_stack(1)[0], name="first")
    assert sam.image_layer is first and sam.points_layer.ndim == 2
    second = viewer.add_image(_stack(2), name="second")
    viewer.layers.remove(first)
    assert sam.image_layer is second and sam.points_layer.ndim == 3
    assert widget.image_combo.currentData() is second


def test_model_list_in_the_widget(opened, tmp_path, monkeypatch, qtbot):
    from pathlib import Path

    from qtpy.QtWidgets import QFileDialog

    _viewer, _, widget = opened
    combo = widget.model_combo
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert texts[0] == "vit_b (download)" and "vit_t (download)" in texts
    assert combo.currentText() == "tiny_vit_b (in memory)"
    assert texts[-1] == "Checkpoint file…"
    checkpoint = tmp_path / "finetuned.pt"
    checkpoint.write_bytes(b"")
    monkeypatch.setattr(
        QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(checkpoint), ""))
    )
    combo.activated.emit(combo.count() - 1)
    assert widget.session.models.source == Path(checkpoint)
    assert widget.session.model is None
    assert combo.currentText() == "finetuned.pt (file)"
    # a local file loads at once; this one is empty: refused with a message, no crash
    qtbot.waitUntil(lambda: widget.session.models.error is not None, timeout=TIMEOUT_MS)
    assert "empty" in widget.status.text() and "Checkpoint file" in widget.status.text()


def test_precision_combo_recomputes_and_shows_the_precision(opened, qtbot):
    from napari_sam.precision import PRECISIONS, precision_name, resolve_precision

    _viewer, image, widget = opened
    sam, combo = widget.session, widget.precision_combo
    assert [combo.itemText(i) for i in range(combo.count())] == list(PRECISIONS)
    assert combo.currentText() == "auto" and "identical to the reference" in combo.toolTip()
    auto_name = precision_name(resolve_precision("auto", "cpu"))
    auto = sam.embeddings.get(image, sam.current_plane())
    assert auto.precision == auto_name
    combo.setCurrentText("exact")
    combo.activated.emit(combo.currentIndex())
    assert sam.models.precision == "exact"
    _ready(widget, qtbot)
    exact = sam.embeddings.get(image, sam.current_plane())
    assert exact is not auto and exact.precision == "fp32"
    assert "Embedding ready (fp32)" in widget.status.text()
    sam.set_precision("bf16")  # from the console: the combo follows
    assert combo.currentText() == "bf16"
    _ready(widget, qtbot)
    assert sam.embeddings.get(image, sam.current_plane()).precision == "bf16"
    assert "Embedding ready (bf16)" in widget.status.text()


def test_an_empty_preview_says_why_in_the_status(opened):
    import dataclasses

    _, _, widget = opened
    sam = widget.session
    _add_point(sam, 1, 20, 30)
    assert "predicted IoU" in widget.status.text()
    result = sam.result
    empty = dataclasses.replace(result.prediction, masks=np.zeros_like(result.prediction.masks))
    sam._set_result(dataclasses.replace(result, prediction=empty))
    assert sam.result.is_empty
    assert "mask is empty" in widget.status.text() and "contrast limits" in widget.status.text()
    assert sam.commit() is None and sam.labels_layer is None
