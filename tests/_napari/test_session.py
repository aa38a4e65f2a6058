"""The per-viewer session driven without a display (``ViewerModel``, synchronous)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_sam._napari import segmentation
from napari_sam._napari.session import SamSession


@pytest.fixture
def stack():
    rng = np.random.default_rng(1)
    data = rng.random((3, 48, 64)).astype(np.float32)
    data[:, 10:30, 20:45] += 2.0  # a bright block to segment
    return data


@pytest.fixture
def viewer():
    return ViewerModel()  # the session holds its viewer weakly: the test keeps it alive


@pytest.fixture
def session(viewer, tiny_model, stack):
    image = viewer.add_image(stack, scale=(2.0, 1.5, 0.5), translate=(4.0, -3.0, 7.0))
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    sam.set_image(image)
    return sam


def _add_point(sam, z, row, col, sign="positive"):
    points = sam.points_layer
    points.feature_defaults["sign"] = sign
    world = sam.image_layer.data_to_world([z, row, col])
    points.add(points.world_to_data(world))


def _slice_world(sam, z):
    return sam.image_layer.data_to_world([z, 0, 0])[0]


def test_layers_created_and_held(session):
    names = [layer.name for layer in session.viewer.layers]
    assert names[-2:] == ["SAM boxes", "SAM points"]
    assert session.viewer.layers.selection.active is session.points_layer
    assert session.points_layer.mode == "add"
    session.points_layer.name = "renamed"  # held by reference, not by name
    _add_point(session, 1, 20, 30)
    assert session.result is not None


def test_points_and_boxes_change_the_preview(session):
    _add_point(session, 1, 20, 30)
    first = session.preview_layer.data[1].copy()
    assert session.result.n_candidates == 3 and first.any()
    _add_point(session, 1, 40, 5, "negative")
    second = session.preview_layer.data[1].copy()
    assert session.result.n_candidates == 1
    np.testing.assert_array_equal(session.result.prompts.point_labels, [1, 0])
    assert (first != second).any()
    session.segment(boxes_xyxy=[[5, 5, 30, 25], [35, 20, 60, 45]])
    assert session.result.n_objects == 2
    assert set(np.unique(session.preview_layer.data[1])) <= {0, 1, 2}
    assert len(session.points_layer.data) == 0 and session.boxes_layer.nshapes == 2


def test_logits_fed_back_when_points_are_added(session, monkeypatch):
    seen = []
    real = segmentation.predict_masks

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mask_input"))
        return real(*args, **kwargs)

    monkeypatch.setattr(segmentation, "predict_masks", spy)
    _add_point(session, 1, 20, 30)
    _add_point(session, 1, 22, 33)
    assert seen[0] is None
    assert seen[1] is not None and seen[1].shape == session.result.low_res_logits.shape[1:]
    session.points_layer.selected_data = {1}
    session.points_layer.remove_selected()
    assert seen[-1] is None  # a removal recomputes from scratch


def test_multimask_cycling_changes_the_preview(session):
    _add_point(session, 1, 20, 30)
    shown = [session.preview_layer.data[1].copy()]
    for _ in range(2):
        session.cycle_mask(1)
        shown.append(session.preview_layer.data[1].copy())
    assert session.result.selected[0] == (int(session.result.prediction.best_index[0]) + 2) % 3
    for i in range(3):
        expected = session.result.prediction.masks[0, (session.result.selected[0] - 2 + i) % 3]
        np.testing.assert_array_equal(shown[i] > 0, expected)
    assert any((shown[0] != s).any() for s in shown[1:])


def test_commit_ids_keep_mode_undo_and_slice(session):
    viewer = session.viewer
    viewer.dims.set_point(0, _slice_world(session, 2))
    _add_point(session, 2, 20, 30)
    out = session.commit()
    labels = session.labels_layer
    assert out.label_ids == (1,)
    assert labels.data.shape == (3, 48, 64) and labels.scale[0] == 2.0
    assert labels.data[2].any() and not labels.data[:2].any()  # on the slice on screen
    assert len(session.points_layer.data) == 0 and not session.preview_layer.data.any()
    first = labels.data.copy()
    session.segment(boxes_xyxy=[[0, 0, 63, 47]])
    out = session.commit()
    assert out.label_ids == (2,)
    kept = first > 0
    np.testing.assert_array_equal(labels.data[kept], first[kept])  # keep-existing
    labels.undo()
    np.testing.assert_array_equal(labels.data, first)
    mask = session.segment(boxes_xyxy=[[0, 0, 63, 47]]).masks[0]
    assert (mask & kept[2]).any()  # the new object overlaps the first one
    assert session.commit(mode="overwrite").label_ids == (2,)
    assert (labels.data[2][mask] == 2).all()  # overwritten
    np.testing.assert_array_equal(labels.data[2][~mask], first[2][~mask])


def test_nothing_to_commit_and_clear(session):
    assert session.commit() is None
    _add_point(session, 1, 20, 30)
    session.clear_prompts()
    assert session.result is None and len(session.points_layer.data) == 0
    assert session.labels_layer is None


def test_an_empty_mask_is_not_committed(session, monkeypatch):
    import dataclasses

    from napari_sam._napari import session as session_module

    messages = []
    monkeypatch.setattr(session_module, "show_info", messages.append)
    _add_point(session, 1, 20, 30)
    result = session.result
    empty = dataclasses.replace(result.prediction, masks=np.zeros_like(result.prediction.masks))
    session.result = dataclasses.replace(result, prediction=empty)
    assert session.commit() is None
    assert "the mask is empty" in messages[-1]
    assert session.labels_layer is None  # no layer made, no id spent
    assert len(session.points_layer.data) == 1  # the prompt stays for another try


def test_other_slices_and_outside_points_ignored(session, capsys):
    _add_point(session, 0, 20, 30)  # slice 0; slice 1 is on screen
    assert session.result is None
    _add_point(session, 1, 60, 30)  # below the image
    assert session.result is None
    _add_point(session, 1, 20, 30)
    assert len(session.result.prompts.points_xy) == 1
    assert session.result.prompts.n_outside == 1


def test_contrast_change_invalidates_and_model_change_clears(session, tiny_model):
    image = session.image_layer
    key_before = session.embeddings.key(image, session.current_plane())
    assert key_before in session.embeddings.cache
    image.contrast_limits = (0.5, 1.5)
    assert key_before not in session.embeddings.cache
    key_after = session.embeddings.key(image, session.current_plane())
    assert key_after in session.embeddings.cache  # recomputed with the new limits
    session.set_model(tiny_model, name="again")
    assert key_after not in session.embeddings.cache
    assert (
        session.embeddings.key(image, session.current_plane()).model_token > key_after.model_token
    )


def test_precision_choice_recomputes_the_embedding(session):
    from napari_sam.precision import precision_name, resolve_precision

    statuses = []
    session.events.status.connect(lambda event: statuses.append(event.value))
    image, plane = session.image_layer, session.current_plane()
    auto_name = precision_name(resolve_precision("auto", "cpu"))  # bf16 only on fast CPUs
    assert session.models.precision == "auto"
    auto = session.embeddings.get(image, plane)
    assert auto.precision == auto_name
    auto_key = session.embeddings.key(image, plane)
    session.set_precision("exact")
    assert session.models.precision == "exact"
    assert auto_key not in session.embeddings.cache
    exact = session.embeddings.get(image, plane)  # recomputed at once (synchronous session)
    assert exact is not auto and exact.precision == "fp32"
    assert statuses[-1].startswith("Embedding ready (fp32)")
    _add_point(session, 1, 20, 30)
    assert session.result.key == session.embeddings.key(image, plane)
    session.set_precision("auto")  # back: the fp32 embedding is not reused
    again = session.embeddings.get(image, plane)
    assert again is not exact and again.precision == auto_name
    assert statuses[-1].startswith(f"Embedding ready ({auto_name})")
    assert len(session.embeddings.cache) == 1
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'exact'.*'fast'"):
        session.set_precision("fast")
    assert session.models.precision == "auto"


def test_precision_given_to_a_new_session(viewer, tiny_model):
    sam = SamSession(viewer, precision="exact", threaded=False)
    sam.set_model(tiny_model)
    sam.set_image(viewer.add_image(np.zeros((20, 30), np.float32)))
    assert sam.embedding_for().precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        SamSession(ViewerModel(), precision="double")


def test_for_viewer_shares_one_session(viewer):
    other = ViewerModel()
    assert SamSession.for_viewer(viewer) is SamSession.for_viewer(viewer)
    assert SamSession.for_viewer(other) is not SamSession.for_viewer(viewer)


def test_rgb_as_colour_and_grey_through_contrast_limits(viewer, tiny_model, monkeypatch):
    from napari_sam._napari import embeddings

    calls = []
    real = embeddings.encode_image

    def spy(model, data, **kwargs):
        calls.append((data.shape, kwargs))
        return real(model, data, **kwargs)

    monkeypatch.setattr(embeddings, "encode_image", spy)
    sam = SamSession(viewer, threaded=False)
    sam.set_model(tiny_model)
    rgb = viewer.add_image(np.zeros((2, 20, 30, 3), np.uint8), rgb=True)
    sam.set_image(rgb)
    assert calls[-1][0] == (20, 30, 3) and calls[-1][1]["rgb"] is True
    grey = viewer.add_image(
        np.arange(600, dtype=np.uint16).reshape(20, 30), contrast_limits=(10, 90)
    )
    sam.set_image(grey)
    assert calls[-1][0] == (20, 30)
    assert calls[-1][1] == {"rgb": False, "contrast_limits": (10.0, 90.0), "precision": "auto"}
    assert sam.points_layer.ndim == 2  # prompt layers follow the image's ndim


def test_unsupported_image_is_reported_not_raised(viewer, tiny_model):
    errors = []
    sam = SamSession(viewer, threaded=False)
    sam.events.error.connect(lambda event: errors.append(event.value))
    sam.set_model(tiny_model)
    pyramid = [np.zeros((32, 32), np.uint8), np.zeros((16, 16), np.uint8)]
    sam.set_image(viewer.add_image(pyramid, multiscale=True))
    assert errors and "multiscale" in errors[-1]
    sam.points_layer.add([5, 5])  # no retry, no crash
    assert len(errors) == 1 and sam.result is None


def test_labels_layer_of_the_wrong_shape_is_refused(session):
    from napari.layers import Labels

    with pytest.raises(ValueError, match="shape"):
        session.set_labels_layer(Labels(np.zeros((48, 64), np.uint8)))
    assert session.labels_layer is None
    mine = Labels(np.zeros((3, 48, 64), np.uint16))
    session.viewer.add_layer(mine)
    session.set_labels_layer(mine)
    _add_point(session, 1, 20, 30)
    assert session.commit().layer is mine and mine.data[1].any()


def test_script_loop_over_a_stack(session):
    """The loop of docs/scripting.md: one object per slice, each on its own slice."""
    viewer = session.viewer
    for z in range(3):
        viewer.dims.set_current_step(0, z)
        session.segment(points_xy=[[30, 20]])
        assert session.commit().label_ids == (z + 1,)
    data = session.labels_layer.data
    for z in range(3):
        assert set(np.unique(data[z])) == {0, z + 1}


def test_demo_model_clicks_commit_real_nuclei(viewer, demo_model):
    """Curation with the trained demo model: one click per nucleus, committed with new ids."""
    from scipy import ndimage as ndi

    from napari_sam.synthetic import demo_nuclei

    sample = demo_nuclei()
    image = viewer.add_image(sample.image, name="nuclei")
    sam = SamSession(viewer, threaded=False)
    sam.set_model(demo_model)
    sam.set_image(image)
    truth = sample.labels
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    chosen = ids[np.argsort(areas)[::-1][:5]]  # the five largest nuclei
    for number, obj in enumerate(chosen, start=1):
        dist = ndi.distance_transform_edt(truth == obj)
        row, col = np.unravel_index(np.argmax(dist), dist.shape)
        points = sam.points_layer
        points.add(points.world_to_data(image.data_to_world([row, col])))
        assert sam.commit().label_ids == (number,)
    labels = sam.labels_layer.data
    for number, obj in enumerate(chosen, start=1):
        got, want = labels == number, truth == obj
        iou = (got & want).sum() / (got | want).sum()
        assert iou >= 0.75, (number, iou)
    assert set(np.unique(labels)) == set(range(len(chosen) + 1))  # nothing else painted
