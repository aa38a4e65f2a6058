"""Layer <-> prompt conversion, commits and the cache, with napari layers but no display."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from napari.components import ViewerModel
from napari.layers import Image, Labels, Points, Shapes

from napari_sam._napari.cache import EmbeddingCache, EmbeddingKey
from napari_sam._napari.commit import commit_masks
from napari_sam._napari.layers import (
    NEGATIVE,
    layers_to_prompts,
    plane_image,
    view_plane,
    write_prompts,
)
from napari_sam._napari.own_layers import make_points_layer, make_shapes_layer
from napari_sam.predict import ImageEmbedding


def _viewer_with(image: Image) -> ViewerModel:
    viewer = ViewerModel()
    viewer.add_layer(image)
    return viewer


def test_view_plane_follows_slider_scale_and_dims_order():
    image = Image(np.zeros((5, 40, 60)), scale=(2.0, 0.5, 0.5), translate=(1.0, 10.0, 20.0))
    viewer = _viewer_with(image)
    viewer.dims.set_point(0, 1.0 + 2.0 * 3)  # world z of slice 3
    plane = view_plane(image, viewer.dims)
    assert (plane.row_axis, plane.col_axis, plane.indices) == (1, 2, (3, None, None))
    assert plane.shape_hw == (40, 60)
    viewer.dims.order = (1, 0, 2)  # rows are z now, slider on y
    plane = view_plane(image, viewer.dims)
    assert (plane.row_axis, plane.col_axis) == (0, 2)
    assert plane_image(image, plane).shape == (5, 60)
    viewer.dims.order = (0, 2, 1)  # transposed: rows are x
    plane = view_plane(image, viewer.dims)
    assert plane_image(image, plane).shape == (60, 40)


def test_view_plane_rejects_3d_view_and_handles_rgb():
    rgb = Image(np.zeros((4, 30, 20, 3), np.uint8), rgb=True)
    viewer = _viewer_with(rgb)
    plane = view_plane(rgb, viewer.dims)
    assert plane.shape == (4, 30, 20)
    assert plane_image(rgb, plane).shape == (30, 20, 3)
    viewer.dims.ndisplay = 3
    with pytest.raises(ValueError, match="2D view"):
        view_plane(rgb, viewer.dims)


def test_points_to_prompts_through_world_coordinates():
    """Points layer and image with different transforms: x = column, y = row of the image."""
    image = Image(np.zeros((4, 50, 70)), scale=(3.0, 2.0, 0.5), translate=(0.0, 7.0, -3.0))
    viewer = _viewer_with(image)
    viewer.dims.set_point(0, 3.0 * 2)  # slice 2
    points = Points(
        np.zeros((0, 3)),
        ndim=3,
        scale=(1.0, 1.0, 1.0),
        translate=(0.0, 1.0, 2.0),
        features={"sign": np.array([], dtype=object)},
        feature_defaults={"sign": "positive"},
    )
    viewer.add_layer(points)
    plane = view_plane(image, viewer.dims)

    def add(z, row, col, sign="positive"):
        points.feature_defaults["sign"] = sign
        points.add(points.world_to_data(image.data_to_world([z, row, col])))

    add(2, 10, 30)
    add(2, 20.4, 5.6, NEGATIVE)
    add(1, 12, 12)  # other slice: ignored silently
    add(2, 49.6, 3)  # below the last row: outside
    add(2, 3, -0.6)  # left of the first column: outside
    prompts = layers_to_prompts(points, None, image, plane)
    np.testing.assert_allclose(prompts.points_xy, [[30, 10], [5.6, 20.4]], atol=1e-9)
    np.testing.assert_array_equal(prompts.point_labels, [1, 0])
    assert (prompts.n_off_plane, prompts.n_outside) == (1, 2)
    assert prompts.boxes_xyxy.shape == (0, 4)


def test_shapes_to_boxes_clips_and_skips():
    image = Image(np.zeros((3, 40, 60)), scale=(1.0, 2.0, 2.0))
    viewer = _viewer_with(image)
    viewer.dims.set_point(0, 1.0)
    shapes = Shapes(ndim=3)  # unit scale: world = data
    viewer.add_layer(shapes)
    plane = view_plane(image, viewer.dims)

    def rect(z, r0, c0, r1, c1):  # image pixels -> world
        corners = [[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]]
        shapes.add_rectangles(np.array([image.data_to_world(c) for c in corners]))

    rect(1, 5, 10, 15, 30)
    rect(1, -10, 50, 8, 80)  # sticks out: clipped to the image
    rect(0, 5, 5, 9, 9)  # other slice
    rect(1, 60, 60, 70, 70)  # entirely outside
    rect(1, 20, 20, 20, 20)  # a click without a drag: ignored, no warning
    prompts = layers_to_prompts(None, shapes, image, plane)
    np.testing.assert_allclose(prompts.boxes_xyxy, [[10, 5, 30, 15], [50, 0, 59, 8]])
    assert (prompts.n_off_plane, prompts.n_outside) == (1, 1)


def test_write_prompts_round_trip_with_scale_and_translate():
    image = Image(np.zeros((2, 64, 48)), scale=(4.0, 0.25, 0.75), translate=(2.0, -5.0, 9.0))
    viewer = _viewer_with(image)
    viewer.dims.set_point(0, 2.0 + 4.0)  # slice 1
    plane = view_plane(image, viewer.dims)
    points = make_points_layer(image)
    shapes = make_shapes_layer(image)
    points.translate = (0.0, 3.0, -1.0)  # the user moved the prompt layers: still consistent
    shapes.scale = (1.0, 1.0, 1.0)
    viewer.add_layer(points)
    viewer.add_layer(shapes)
    xy = np.array([[3.0, 4.0], [40.5, 60.25]])
    boxes = np.array([[1.0, 2.0, 30.0, 50.0]])
    write_prompts(points, shapes, image, plane, points_xy=xy, point_labels=[1, 0], boxes_xyxy=boxes)
    prompts = layers_to_prompts(points, shapes, image, plane)
    np.testing.assert_allclose(prompts.points_xy, xy, atol=1e-9)
    np.testing.assert_array_equal(prompts.point_labels, [1, 0])
    np.testing.assert_allclose(prompts.boxes_xyxy, boxes, atol=1e-9)
    assert list(points.features["sign"]) == ["positive", NEGATIVE]
    with pytest.raises(ValueError, match="point_labels"):
        write_prompts(points, shapes, image, plane, points_xy=xy, point_labels=[1])


def test_prompt_points_are_green_and_red():
    image = Image(np.zeros((20, 20)))
    points = make_points_layer(image)
    points.add([1, 1])
    points.feature_defaults["sign"] = NEGATIVE
    points.add([2, 2])
    np.testing.assert_allclose(points.face_color[:, :3], [[0, 1, 0], [1, 0, 0]])
    assert make_shapes_layer(image).mode == "add_rectangle"


def _plane_of(labels: Labels, z: int):
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros(labels.data.shape))
    viewer.add_layer(labels)
    viewer.dims.set_point(0, float(z))
    return view_plane(image, viewer.dims)


def test_commit_keep_overwrite_ids_and_single_undo():
    labels = Labels(np.zeros((3, 10, 12), dtype=np.uint8))
    labels.data[1, 0:4, 0:4] = 7
    plane = _plane_of(labels, 1)
    mask = np.zeros((10, 12), bool)
    mask[2:6, 2:6] = True
    before = labels.data.copy()
    out = commit_masks(labels, plane, [mask], mode="keep")
    assert out.label_ids == (8,)
    assert out.n_pixels == (16 - 4,)
    assert (labels.data[1, 0:4, 0:4] == 7).all()  # the earlier object is intact
    assert (labels.data[1, 4:6, 2:6] == 8).all()
    assert (labels.data[[0, 2]] == 0).all()  # other slices untouched
    assert labels.selected_label == 9
    out = commit_masks(labels, plane, [mask, mask[::-1]], mode="overwrite")
    assert out.label_ids == (9, 10)
    assert (labels.data[1, 2:4, 2:4] == 9).all()
    labels.undo()
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)  # each commit is one undo step


def test_commit_widens_dtype_and_uses_selected_label():
    labels = Labels(np.zeros((1, 8, 8), dtype=np.uint8))
    labels.data[0, 0, 0] = 255
    plane = _plane_of(labels, 0)
    mask = np.zeros((8, 8), bool)
    mask[3:5, 3:5] = True
    out = commit_masks(labels, plane, [mask])
    assert out.label_ids == (256,)
    assert labels.data.dtype == np.uint16 and labels.data[0, 3, 3] == 256
    labels.selected_label = 5
    mask2 = np.zeros((8, 8), bool)
    mask2[6:, 6:] = True
    out = commit_masks(labels, plane, [mask2, mask2.T], id_policy="selected")
    assert out.label_ids == (5, 5)
    assert labels.data[0, 7, 7] == 5
    with pytest.raises(ValueError, match="shape"):
        commit_masks(Labels(np.zeros((1, 4, 4), np.uint8)), plane, [mask])


def _embedding(nbytes_side: int) -> ImageEmbedding:
    features = torch.zeros(1, 1, nbytes_side, 1)  # 4 * side bytes
    return ImageEmbedding(features, (8, 8), (8, 8), 8, "tiny", "float32")


def test_embedding_cache_is_lru_and_bounded_in_bytes():
    cache = EmbeddingCache(max_bytes=3 * 400)
    keys = [EmbeddingKey(1, (1, 2, (z, None, None)), (0.0, 1.0), 1) for z in range(4)]
    for key in keys[:3]:
        cache.put(key, _embedding(100))
    assert cache.get(keys[0]) is not None  # now most recent
    cache.put(keys[3], _embedding(100))
    assert keys[1] not in cache and keys[0] in cache and len(cache) == 3
    assert cache.nbytes == 1200
    cache.put(EmbeddingKey(2, (), None, 1), _embedding(100))
    assert cache.discard_layer(1) == 2
    assert len(cache) == 1
