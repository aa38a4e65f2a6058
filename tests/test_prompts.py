"""Tests for napari_sam.prompts: validation and batching of prompts (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.prompts import points_inside_image, validate_prompts


def _validate(**kwargs):
    base = {"points_xy": None, "point_labels": None, "boxes_xyxy": None, "mask_input": None}
    return validate_prompts(**{**base, **kwargs}, shape_hw=(10, 20), mask_input_hw=(8, 8))


def test_points_inside_image_includes_the_border_half_pixel():
    points = [[-0.5, -0.5], [19.5, 9.5], [-0.51, 0], [0, 9.51], [19.6, 0], [5, 5]]
    np.testing.assert_array_equal(
        points_inside_image(points, (10, 20)), [True, True, False, False, False, True]
    )
    assert points_inside_image(np.zeros((2, 3, 2)), (1, 1)).shape == (2, 3)


def test_shared_points_and_one_mask_are_broadcast_to_every_box():
    batch = _validate(
        points_xy=[[1, 2], [3, 4]],
        point_labels=[1, 0],
        boxes_xyxy=[[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 3, 3]],
        mask_input=np.ones((8, 8)),
    )
    assert batch.batch_size == 3
    assert batch.points_xy.shape == (3, 2, 2) and batch.points_xy.dtype == np.float32
    np.testing.assert_array_equal(batch.point_labels, [[1, 0]] * 3)
    assert batch.point_labels.dtype == np.int32
    assert batch.boxes_xyxy.shape == (3, 4) and batch.mask_input.shape == (3, 1, 8, 8)
    assert batch.points_xy.flags.writeable and batch.points_xy.flags.c_contiguous


def test_single_object_without_boxes_and_mask_only_prompt():
    batch = _validate(points_xy=[[1, 2]], point_labels=[True])
    assert batch.batch_size == 1 and batch.boxes_xyxy is None and batch.mask_input is None
    np.testing.assert_array_equal(batch.point_labels, [[1]])
    batch = _validate(mask_input=np.zeros((2, 1, 8, 8)))
    assert batch.batch_size == 2 and batch.points_xy is None


def test_fractional_labels_are_refused_with_their_value():
    with pytest.raises(ValueError, match=r"-1 \(padding\); received 0.5"):
        _validate(points_xy=[[1, 2]], point_labels=[0.5])
