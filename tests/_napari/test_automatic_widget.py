"""Automatic segmentation in napari: the Qt-free engine (no display) and the dock widget (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_sam._napari.automatic_run import AutomaticSegmentation, stack_planes
from napari_sam._napari.layers import view_plane
from napari_sam._napari.session import SamSession
from napari_sam.automatic import AutomaticSettings, Cancelled

MANY = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _image(shape=(48, 64), seed=2):
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32)
    data[..., 8:30, 15:40] += 2.0
    return data


@pytest.fixture
def viewer():
    return ViewerModel()


def _engine(viewer, tiny_model, data, **kwargs):
    image = viewer.add_image(data, **kwargs)
    session = SamSession(viewer, threaded=False)
    session.set_model(tiny_model)
    return AutomaticSegmentation(session), image


def _run(engine, image, *, whole_stack=False, **settings):
    plane = view_plane(image, engine.session.viewer.dims)
    planes = stack_planes(image, plane) if whole_stack else [plane]
    result = engine.compute(image, planes, AutomaticSettings(**{**MANY, **settings}))
    return result, engine.apply(result)


def test_run_on_2d_image_writes_own_layer_with_features(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image())
    result, output = _run(engine, image)
    assert output in viewer.layers and output is engine.output
    assert output.data.shape == (48, 64)
    records = result.planes[0].records
    assert len(records) == len(engine.objects) > 0
    features = output.features
    assert list(features["index"]) == sorted(engine.objects)
    for label, iou, area in zip(
        features["index"], features["predicted_iou"], features["area"], strict=True
    ):
        record = engine.objects[label][1]
        assert iou == pytest.approx(record.predicted_iou) and area == record.area
    assert set(np.unique(output.data)) <= {0, *engine.objects}
    # the session's embedding cache was used (shared with the interactive widget)
    assert len(engine.session.embeddings.cache) == 1


def test_rerun_replaces_the_plane_and_keeps_the_layer(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image())
    _, first = _run(engine, image)
    n_layers = len(viewer.layers)
    _, second = _run(engine, image, box_nms_thresh=1.0)
    assert second is first and len(viewer.layers) == n_layers
    assert len(engine.objects) == len(second.features)
    assert set(np.unique(second.data)) <= {0, *engine.objects}


def test_whole_stack_runs_every_slice(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image((3, 48, 64)), scale=(2.0, 1.0, 1.0))
    result, output = _run(engine, image, whole_stack=True)
    assert [p.plane.indices for p in result.planes] == [
        (0, None, None),
        (1, None, None),
        (2, None, None),
    ]
    assert output.data.shape == (3, 48, 64)
    for z in range(3):
        assert output.data[z].any()
    assert len(set(output.features["plane"])) == 3
    assert tuple(output.scale) == tuple(image.scale)


def test_stale_result_is_not_applied(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image())
    plane = view_plane(image, viewer.dims)
    result = engine.compute(image, [plane], AutomaticSettings(**MANY))
    image.contrast_limits = (0.0, 1.0)
    with pytest.raises(ValueError, match="changed during the run"):
        engine.apply(result)
    assert engine.output is None


def test_runs_in_the_session_precision(viewer, tiny_model, monkeypatch):
    from napari_sam._napari import automatic_run

    calls = []
    real = automatic_run.generate_masks

    def spy(model, source, **kwargs):
        calls.append((source, kwargs["precision"]))
        return real(model, source, **kwargs)

    monkeypatch.setattr(automatic_run, "generate_masks", spy)
    engine, image = _engine(viewer, tiny_model, _image())
    engine.session.set_precision("exact")
    _run(engine, image)  # through the session's cache: an fp32 embedding
    assert calls[-1][1] == "exact" and calls[-1][0].precision == "fp32"
    _run(engine, image, crop_n_layers=1)  # crops are encoded by generate_masks itself
    assert calls[-1][1] == "exact" and isinstance(calls[-1][0], np.ndarray)


def test_exact_decoder_keeps_the_session_encoding(viewer, tiny_model, monkeypatch):
    from napari_sam._napari import automatic_run

    calls = []
    real = automatic_run.generate_masks

    def spy(model, source, **kwargs):
        calls.append((source.precision, kwargs["precision"], kwargs["decoder_precision"]))
        return real(model, source, **kwargs)

    monkeypatch.setattr(automatic_run, "generate_masks", spy)
    engine, image = _engine(viewer, tiny_model, _image())
    engine.session.set_precision("bf16")
    planes = [view_plane(image, viewer.dims)]
    fast = engine.compute(image, planes, AutomaticSettings(**MANY))
    exact = engine.compute(image, planes, AutomaticSettings(**MANY), exact_decoder=True)
    assert calls == [("bf16", "bf16", None), ("bf16", "bf16", "exact")]  # one bf16 embedding
    assert fast.planes[0].records and exact.planes[0].records


def test_cancel_raises_and_changes_nothing(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image((4, 48, 64)))
    plane = view_plane(image, viewer.dims)
    calls = []
    with pytest.raises(Cancelled):
        engine.compute(
            image,
            stack_planes(image, plane),
            AutomaticSettings(**MANY),
            cancel=lambda: calls.append(1) or len(calls) > 2,
        )
    assert engine.output is None and not engine.objects


def test_drop_removes_objects_under_thresholds(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image())
    _, output = _run(engine, image, box_nms_thresh=1.0)
    ious = sorted(r.predicted_iou for _, r in engine.objects.values())
    cut = ious[len(ious) // 2]
    n_before = len(engine.objects)
    dropped = engine.drop(min_iou=cut)
    assert dropped == sum(iou < cut for iou in ious)
    assert len(engine.objects) == n_before - dropped
    assert all(r.predicted_iou >= cut for _, r in engine.objects.values())
    assert set(np.unique(output.data)) <= {0, *engine.objects}
    assert len(output.features) == len(engine.objects)
    big = max(r.area for _, r in engine.objects.values())
    engine.drop(min_area=big + 1)
    assert not engine.objects and not output.data.any()


def test_accept_fills_only_background_with_new_ids(viewer, tiny_model):
    engine, image = _engine(viewer, tiny_model, _image())
    _, output = _run(engine, image)
    user = np.zeros((48, 64), dtype=np.uint8)
    user[:20, :20] = 7
    labels = viewer.add_labels(user.copy(), name="mine")
    n = engine.accept(labels)
    after = np.asarray(labels.data)
    assert n > 0
    assert np.array_equal(after[:20, :20], user[:20, :20])  # existing object untouched
    new = after[user == 0]
    assert set(np.unique(new)) - {0} == set(range(8, 8 + n))
    assert np.array_equal(after > 0, (user > 0) | (np.asarray(output.data) > 0))
    labels.undo()  # one undo step restores the layer
    assert np.array_equal(np.asarray(labels.data), user)
    with pytest.raises(ValueError, match="choose a labels layer of your own"):
        engine.accept(output)
    wrong = viewer.add_labels(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="has shape"):
        engine.accept(wrong)


# ------------------------------------------------------------------ widget (Xvfb)
WIDGET = "Automatic segmentation"
TIMEOUT_MS = 60_000


def _open_widget(make_napari_viewer, tiny_model, data):
    from napari_sam._napari.automatic_widget import AutomaticWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(data)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", WIDGET)
    assert isinstance(widget, AutomaticWidget)
    widget.session.set_model(tiny_model)
    widget.apply_preset("SAM defaults")
    for name, value in MANY.items():
        widget.spins[name].setValue(value)
    return viewer, image, widget


def _spy_on_generate(monkeypatch, record) -> None:
    """Call ``record(kwargs)`` (in the calling thread) on every ``generate_masks`` of a run."""
    from napari_sam._napari import automatic_run

    real = automatic_run.generate_masks

    def spy(model, source, **kwargs):
        record(kwargs)
        return real(model, source, **kwargs)

    monkeypatch.setattr(automatic_run, "generate_masks", spy)


def _wait(widget, qtbot):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)


@pytest.mark.gui
def test_widget_runs_2d_and_shares_the_session(make_napari_viewer, tiny_model, qtbot):
    from napari_sam._napari.widget import SamWidget

    viewer, image, widget = _open_widget(make_napari_viewer, tiny_model, _image())
    _, interactive = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Segment Anything")
    assert isinstance(interactive, SamWidget) and interactive.session is widget.session
    assert widget.image_combo.currentData() is image
    widget.run()
    _wait(widget, qtbot)
    output = widget.engine.output
    assert output in viewer.layers
    assert len(output.features) == len(widget.engine.objects) > 0
    assert widget.progress.value() == 100
    assert "object(s)" in widget.status.text()
    assert widget.target_combo.findData(output) == -1  # never offered as a target
    assert widget.model_combo.currentData() == widget.session.models.source


@pytest.mark.gui
def test_widget_exact_decoder_box_reaches_the_run(
    make_napari_viewer, tiny_model, qtbot, monkeypatch
):
    seen = []
    _spy_on_generate(monkeypatch, lambda kwargs: seen.append(kwargs["decoder_precision"]))
    _, _, widget = _open_widget(make_napari_viewer, tiny_model, _image())
    assert not widget.exact_decoder.isChecked()  # off by default: the session's precision
    assert "fp32" in widget.exact_decoder.toolTip()
    widget.session.set_precision("exact")
    assert not widget.exact_decoder.isEnabled()  # nothing to change: the decoder is exact
    widget.session.set_precision("bf16")
    assert widget.exact_decoder.isEnabled()
    widget.run()
    _wait(widget, qtbot)
    widget.exact_decoder.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    assert seen == [None, "exact"]
    assert "object(s)" in widget.status.text()


@pytest.mark.gui
def test_widget_run_computes_in_a_thread_that_ends_with_it(
    make_napari_viewer, tiny_model, qtbot, monkeypatch
):
    """Not in Qt's pool thread, which lives 30 s on and slows main-thread torch (clicks)."""
    import threading

    threads = []
    _spy_on_generate(monkeypatch, lambda kwargs: threads.append(threading.current_thread()))
    _, _, widget = _open_widget(make_napari_viewer, tiny_model, _image())
    widget.run()
    _wait(widget, qtbot)
    assert "object(s)" in widget.status.text()
    (thread,) = threads
    assert thread.name == "napari-sam job"
    assert thread is not threading.main_thread()
    assert not thread.is_alive()


@pytest.mark.gui
def test_widget_whole_stack_and_accept(make_napari_viewer, tiny_model, qtbot):
    data = _image((3, 48, 64))
    viewer, _, widget = _open_widget(make_napari_viewer, tiny_model, data)
    user = np.zeros((3, 48, 64), dtype=np.uint16)
    user[1, 30:, 40:] = 3
    labels = viewer.add_labels(user.copy(), name="mine")
    widget.stack_radio.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    output = widget.engine.output
    assert all(output.data[z].any() for z in range(3))
    widget.target_combo.setCurrentIndex(widget.target_combo.findData(labels))
    n = widget.accept()
    after = np.asarray(labels.data)
    assert n > 0
    assert np.array_equal(after[user > 0], user[user > 0])
    assert after[user == 0].max() >= 4


@pytest.mark.gui
def test_widget_cancel_stops_the_run(make_napari_viewer, tiny_model, qtbot):
    _, _, widget = _open_widget(make_napari_viewer, tiny_model, _image((12, 48, 64)))
    widget.stack_radio.setChecked(True)
    widget._relay.changed.connect(lambda done, total: widget.cancel())  # cancel on first step
    widget.run()
    _wait(widget, qtbot)
    assert widget.engine.output is None
    assert "Cancelled" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


@pytest.mark.gui
def test_widget_presets_fill_the_parameters(make_napari_viewer, tiny_model):
    from napari_sam.automatic import PRESETS

    _, _, widget = _open_widget(make_napari_viewer, tiny_model, _image())
    widget.apply_preset("Microscopy: nuclei")
    assert widget.settings() == PRESETS["Microscopy: nuclei"]
    assert all(spin.toolTip() for spin in widget.spins.values())
