"""Commit rules and label painting (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.labels import dtype_for, mask_pixels, masks_to_labels, next_free_id


def test_next_free_id():
    assert next_free_id(np.zeros((3, 3), np.uint8)) == 1
    assert next_free_id(np.array([[0, 7], [3, 0]])) == 8
    assert next_free_id(np.zeros((0, 4), np.int32)) == 1


@pytest.mark.parametrize(
    ("dtype", "max_id", "expected"),
    [
        (np.uint8, 255, np.uint8),
        (np.uint8, 256, np.uint16),
        (np.uint16, 70000, np.uint32),
        (np.int8, 128, np.int16),
        (np.int32, 5, np.int32),
        (np.bool_, 2, np.uint8),
    ],
)
def test_dtype_for_widens_instead_of_overflowing(dtype, max_id, expected):
    assert dtype_for(np.dtype(dtype), max_id) == np.dtype(expected)


def test_dtype_for_rejects_float():
    with pytest.raises(TypeError, match="integer dtype, got float32"):
        dtype_for(np.dtype(np.float32), 3)


def test_keep_mode_fills_background_only():
    labels = np.array([[0, 2], [2, 0]], np.uint8)
    mask = np.ones((2, 2), bool)
    rows, cols = mask_pixels(labels, mask, mode="keep")
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1)]
    rows, cols = mask_pixels(labels, mask, mode="overwrite")
    assert len(rows) == 4


def test_mask_pixels_validates():
    labels = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="mode must be one of"):
        mask_pixels(labels, np.ones((2, 2), bool), mode="replace")
    with pytest.raises(
        ValueError, match=r"mask shape \(3, 3\) does not match labels shape \(2, 2\)"
    ):
        mask_pixels(labels, np.ones((3, 3), bool))


def test_masks_to_labels_smaller_objects_on_top():
    big = np.zeros((6, 6), bool)
    big[1:5, 1:5] = True
    small = np.zeros((6, 6), bool)
    small[2:4, 2:4] = True
    out = masks_to_labels([small, big])
    assert out[2, 2] == 1  # the small mask (id 1) stays visible inside the big one
    assert out[1, 1] == 2
    assert out[0, 0] == 0


def test_masks_to_labels_min_area_and_empty():
    a = np.zeros((4, 4), bool)
    a[0, 0] = True
    b = np.zeros((4, 4), bool)
    b[2:, 2:] = True
    out = masks_to_labels(np.stack([a, b]), min_area=2)
    assert set(np.unique(out).tolist()) == {0, 2}
    assert masks_to_labels([], shape_hw=(3, 5)).shape == (3, 5)
    with pytest.raises(ValueError, match="shape_hw is required"):
        masks_to_labels([])


def test_masks_to_labels_widens_dtype_for_many_masks():
    masks = np.zeros((300, 20, 20), bool)
    for i in range(300):
        masks[i].flat[i] = True
    out = masks_to_labels(masks, dtype=np.uint8)
    assert out.dtype == np.uint16
    assert out.max() == 300
