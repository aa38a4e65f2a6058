"""Pre-encoding the next slice: which plane (prefetch.py) and how a prefetch steps aside
(embeddings.py), without a display. The threaded behaviour in a real viewer is in
test_widget.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_sam._napari import embeddings as embeddings_module
from napari_sam._napari.embeddings import PrefetchCancelled
from napari_sam._napari.layers import view_plane
from napari_sam._napari.prefetch import SlicePrefetch, neighbour_plane, single_step
from napari_sam._napari.session import SamSession


@pytest.fixture
def viewer():
    return ViewerModel()


@pytest.fixture
def hyperstack(viewer):
    """A (t, z, y, x) image with scale and translate, shown at t=1, z=2."""
    data = np.zeros((3, 5, 16, 20), np.float32)
    image = viewer.add_image(data, scale=(1.0, 2.5, 1.0, 1.0), translate=(0.0, 10.0, 0.0, 0.0))
    viewer.dims.set_point(0, 1.0)
    viewer.dims.set_point(1, 10.0 + 2 * 2.5)
    return image


def test_neighbour_plane_moves_one_axis_and_its_world_point(viewer, hyperstack):
    plane = view_plane(hyperstack, viewer.dims)
    assert plane.indices == (1, 2, None, None)
    after = neighbour_plane(hyperstack, plane, 1, 1)
    assert after.indices == (1, 3, None, None)
    assert after.world_point[:2] == pytest.approx((1.0, 10.0 + 3 * 2.5))
    assert (after.row_axis, after.col_axis, after.shape) == (2, 3, plane.shape)
    viewer.dims.set_point(1, after.world_point[1])
    assert view_plane(hyperstack, viewer.dims) == after  # the plane napari shows there
    assert neighbour_plane(hyperstack, plane, 0, -1).indices == (0, 2, None, None)
    assert neighbour_plane(hyperstack, plane, 0, 2) is None  # past the last time point
    assert neighbour_plane(hyperstack, plane, 1, -3) is None  # before the first slice
    with pytest.raises(
        ValueError, match=r"axis must be a data axis not on screen, one of \[0, 1\]"
    ):
        neighbour_plane(hyperstack, plane, 2, 1)


def test_single_step_names_the_axis_and_direction(viewer, hyperstack):
    plane = view_plane(hyperstack, viewer.dims)
    back_in_z = neighbour_plane(hyperstack, plane, 1, -1)
    assert single_step(plane, back_in_z) == (1, -1)
    assert single_step(plane, neighbour_plane(hyperstack, plane, 0, 1)) == (0, 1)
    both = neighbour_plane(hyperstack, back_in_z, 0, 1)
    assert single_step(plane, both) is None  # two axes moved: no direction
    assert single_step(plane, plane) is None


def test_slice_prefetch_follows_the_last_move(viewer, hyperstack):
    slices = SlicePrefetch()
    plane = view_plane(hyperstack, viewer.dims)
    slices.shown(plane)
    assert slices.target(hyperstack, plane) is None  # off by default
    slices.enabled = True
    assert slices.target(hyperstack, plane).indices == (1, 3, None, None)  # +1 in z at first
    earlier = neighbour_plane(hyperstack, plane, 0, -1)
    slices.shown(earlier)  # the person stepped back in time
    assert slices.target(hyperstack, earlier) is None  # t=0: nothing before it
    slices.shown(plane)  # forward in time again
    assert slices.target(hyperstack, plane).indices == (2, 2, None, None)
    flat = viewer.add_image(np.zeros((16, 20), np.float32))
    assert slices.target(flat, view_plane(flat, viewer.dims)) is None  # 2D: no slider


def test_prefetch_gate_waits_out_interactive_work_and_raises_when_cancelled(viewer, tiny_model):
    store = SamSession(viewer, threaded=False).embeddings
    cancel = threading.Event()
    gate = store._gate(cancel)
    passed = threading.Event()

    def layer_boundary():
        gate()
        passed.set()

    with store.interactive():  # a click is being computed
        worker = threading.Thread(target=layer_boundary)
        worker.start()
        assert not passed.wait(0.3)  # the prefetch holds still meanwhile
    assert passed.wait(10)  # and goes on once the preview is done
    worker.join()
    cancel.set()
    with pytest.raises(PrefetchCancelled):
        gate()


def test_previews_are_computed_as_interactive_work(viewer, tiny_model, monkeypatch):
    image = viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    sam.set_image(image)
    store, entered = sam.embeddings, []
    real = store.interactive

    def interactive():
        entered.append(store._idle.is_set())
        return real()

    monkeypatch.setattr(store, "interactive", interactive)
    sam.segment(points_xy=[[10, 12]])
    assert entered == [True] and store._idle.is_set()  # paused prefetches during, not after


def test_no_prefetch_without_worker_threads(viewer, tiny_model, monkeypatch):
    encoded = []
    real = embeddings_module.encode_image

    def spy(model, data, **kwargs):
        encoded.append(kwargs)
        return real(model, data, **kwargs)

    monkeypatch.setattr(embeddings_module, "encode_image", spy)
    image = viewer.add_image(np.random.default_rng(0).random((5, 32, 32)).astype(np.float32))
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    sam.set_image(image)  # napari shows the middle slice, 2
    sam.prefetch = True
    viewer.dims.set_current_step(0, 3)
    assert sam.slices.target(image, sam.current_plane()).indices[0] == 4  # would be next
    assert len(encoded) == 2  # the slices shown, nothing ahead of them
    assert all("between_layers" not in kwargs for kwargs in encoded)


# ------------------------------------------------------------ in a real viewer, with workers
TIMEOUT_MS = 60_000


def _viewer_with_stack(make_napari_viewer, n=4):
    from napari_sam._napari.widget import SamWidget

    viewer = make_napari_viewer()
    data = np.random.default_rng(2).random((n, 48, 64)).astype(np.float32)
    data[:, 8:30, 15:40] += 2.0
    viewer.add_image(data)
    viewer.dims.set_point(0, 0)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Segment Anything")
    assert isinstance(widget, SamWidget)
    return viewer, widget


def _cached(sam, z):
    plane = sam.current_plane()
    there = neighbour_plane(sam.image_layer, plane, 0, z - plane.indices[0])
    return sam.embeddings.get(sam.image_layer, there) is not None


def _idle(sam, qtbot):
    qtbot.waitUntil(
        lambda: not sam.busy and _cached(sam, sam.current_plane().indices[0]), timeout=TIMEOUT_MS
    )


class _Encodes:
    """Replaces the session's encoder: records each call; prefetches may be held or failed."""

    def __init__(self, hold=False, fail=False):
        self.calls, self.real = [], embeddings_module.encode_image
        self.release, self.started = threading.Event(), threading.Event()
        self.hold, self.fail = hold, fail

    def __call__(self, model, data, between_layers=None, **kwargs):
        self.calls.append(("prefetch" if between_layers else "request", data.copy()))
        if between_layers is not None:
            self.started.set()
            if self.fail:
                raise ValueError("this slice cannot be encoded")
            while self.hold and not self.release.wait(0.01):
                between_layers()  # the encoder's layer boundaries
        options = {} if between_layers is None else {"between_layers": between_layers}
        return self.real(model, data, **kwargs, **options)


@pytest.fixture
def encodes(monkeypatch):
    def install(**kwargs):
        spy = _Encodes(**kwargs)
        monkeypatch.setattr(embeddings_module, "encode_image", spy)
        return spy

    return install


def _prefetching(make_napari_viewer, spy):
    """A stack in a viewer whose session pre-encodes, the spy encoding, errors recorded."""
    viewer, widget = _viewer_with_stack(make_napari_viewer)
    errors = []
    widget.session.events.error.connect(lambda event: errors.append(event.value))
    widget.session.prefetch = True
    return viewer, widget, spy, errors


@pytest.mark.gui
def test_next_slice_is_ready_when_the_person_gets_there(
    make_napari_viewer, tiny_model, qtbot, encodes
):
    viewer, widget = _viewer_with_stack(make_napari_viewer)
    sam, spy = widget.session, encodes()
    widget.prefetch_check.setChecked(True)
    assert sam.prefetch
    sam.set_model(tiny_model)
    _idle(sam, qtbot)
    assert _cached(sam, 1) and not _cached(sam, 2)  # one slice ahead, no more
    assert [kind for kind, _ in spy.calls] == ["request", "prefetch"]
    np.testing.assert_array_equal(spy.calls[1][1], sam.image_layer.data[1])
    viewer.dims.set_point(0, 1)
    world = sam.image_layer.data_to_world([1, 18, 25])
    sam.points_layer.add(sam.points_layer.world_to_data(world))
    assert sam.result is not None and sam.result.plane.indices[0] == 1  # no wait at all
    _idle(sam, qtbot)
    assert _cached(sam, 2) and len(spy.calls) == 3  # and the one after it is on its way
    viewer.dims.set_point(0, 0)  # back: slice 0 is cached, nothing before it
    _idle(sam, qtbot)
    assert len(spy.calls) == 3
    widget.prefetch_check.setChecked(False)
    assert not sam.prefetch


@pytest.mark.gui
def test_a_prefetch_gives_way_to_another_slice_and_is_adopted_by_its_own(
    make_napari_viewer, tiny_model, qtbot, encodes
):
    viewer, widget, spy, errors = _prefetching(make_napari_viewer, encodes(hold=True))
    sam = widget.session
    try:
        sam.set_model(tiny_model)  # slice 0, then slice 1 ahead of time, held
        qtbot.waitUntil(spy.started.is_set, timeout=TIMEOUT_MS)
        viewer.dims.set_point(0, 3)  # jump elsewhere: the prefetch of slice 1 stops
        _idle(sam, qtbot)
        assert not _cached(sam, 1) and _cached(sam, 3)
        assert errors == []  # a cancelled prefetch is nobody's error
        spy.started.clear()
        viewer.dims.set_point(0, 2)  # moving down: slice 1 is ahead again
        qtbot.waitUntil(spy.started.is_set, timeout=TIMEOUT_MS)
        viewer.dims.set_point(0, 1)  # ... and the person goes there: adopted, not restarted
        assert "Computing the embedding" in widget.status.text()
        spy.release.set()
        _idle(sam, qtbot)
    finally:
        spy.release.set()
    kinds = [kind for kind, _ in spy.calls]
    assert kinds == ["request", "prefetch", "request", "request", "prefetch"]
    assert _cached(sam, 1) and "Embedding ready" in widget.status.text()


@pytest.mark.gui
def test_a_failed_prefetch_is_silent_and_the_slice_is_encoded_when_shown(
    make_napari_viewer, tiny_model, qtbot, encodes
):
    viewer, widget, spy, errors = _prefetching(make_napari_viewer, encodes(fail=True))
    sam = widget.session
    sam.set_model(tiny_model)
    _idle(sam, qtbot)
    assert not _cached(sam, 1) and errors == []
    sam.request_embedding()  # asked again: the failed prefetch is not retried
    _idle(sam, qtbot)
    assert [kind for kind, _ in spy.calls] == ["request", "prefetch"]
    viewer.dims.set_point(0, 1)
    _idle(sam, qtbot)
    assert _cached(sam, 1) and errors == []
