"""Pure helpers of automatic mask generation against the reference helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam import _amg_ops as ops

amg = pytest.importorskip("segment_anything.utils.amg")


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_point_grid_matches_reference(n):
    grid = ops.point_grid(n)
    assert grid.shape == (n * n, 2)
    assert grid.dtype == np.float64
    np.testing.assert_array_equal(grid, amg.build_point_grid(n))
    # x varies fastest: the first n points share one row
    assert np.all(grid[:n, 1] == grid[0, 1])


def test_point_grid_rejects_zero():
    with pytest.raises(ValueError, match="n_per_side must be >= 1, got 0"):
        ops.point_grid(0)


def test_layer_points_per_side_matches_reference():
    sides = ops.layer_points_per_side(32, 3, 2)
    assert sides == [32, 16, 8, 4]
    grids = amg.build_all_layer_point_grids(32, 3, 2)
    assert [round(len(g) ** 0.5) for g in grids] == sides


@pytest.mark.parametrize("shape_hw", [(100, 150), (1024, 768), (37, 1500), (7, 7)])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("ratio", [512 / 1500, 0.0, 0.5])
def test_crop_boxes_match_reference(shape_hw, n_layers, ratio):
    boxes, layers = amg.generate_crop_boxes(shape_hw, n_layers, ratio)
    ours = ops.crop_boxes(shape_hw, n_layers, ratio)
    assert [list(c.box_xyxy) for c in ours] == boxes
    assert [c.layer for c in ours] == layers


def test_crop_box_properties():
    crop = ops.CropBox((10, 20, 50, 80), 1)
    assert crop.box_xywh == (10, 20, 40, 60)
    assert crop.shape_hw == (60, 40)
    assert crop.area == 2400


def _random_boxes(rng, n):
    xy = rng.integers(0, 50, (n, 2))
    wh = rng.integers(0, 40, (n, 2))
    return torch.from_numpy(np.concatenate([xy, xy + wh], 1)).float()


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_box_nms_matches_torchvision(threshold):
    from torchvision.ops import nms

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 300))
        boxes = _random_boxes(rng, n)
        if trial % 3 == 0:
            boxes[:5] = 0  # empty boxes: NaN IoU must suppress nothing
        if trial % 2:
            scores = torch.from_numpy(rng.integers(0, 4, n).astype(np.float32))  # ties
        else:
            scores = torch.from_numpy(rng.random(n).astype(np.float32))
        expected = nms(boxes, scores, threshold)
        assert torch.equal(ops.box_nms(boxes, scores, threshold), expected)


def test_box_nms_compares_float32_iou_with_double_threshold():
    # IoU = 3/10 exactly in float32 is 0.300000012 > 0.3 (double): suppressed, as torchvision.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    scores = torch.tensor([1.0, 0.5])
    assert ops.box_nms(boxes, scores, 0.3).tolist() == [0]
    assert ops.box_nms(boxes, scores, 0.31).tolist() == [0, 1]


def test_box_nms_empty():
    keep = ops.box_nms(torch.zeros((0, 4)), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.numel() == 0


def test_stability_scores_match_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((6, 33, 47), generator=gen) * 3
    logits[2] = -5.0  # empty at the low threshold: 0 / 0
    for offset in (1.0, 0.5, 0.1):
        ours = ops.stability_scores(logits, 0.0, offset)
        ref = amg.calculate_stability_score(logits, 0.0, offset)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(ops.stability_scores(logits, 0.0, 1.0)[2])


def test_stability_score_value():
    logits = torch.tensor([[[-2.0, -0.5, 0.5, 2.0]]])
    # > 1: one pixel; > -1: three pixels
    assert ops.stability_scores(logits, 0.0, 1.0).item() == pytest.approx(1 / 3)


def test_mask_boxes_match_reference():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand((10, 33, 47), generator=gen) > 0.97
    masks[3] = False
    masks[4] = False
    masks[4, 5, 7] = True
    ours = ops.mask_boxes_xyxy(masks)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, amg.batched_mask_to_box(masks))
    assert ours[3].tolist() == [0, 0, 0, 0]
    assert ours[4].tolist() == [7, 5, 7, 5]
    assert ops.mask_boxes_xyxy(torch.zeros((0, 4, 5), dtype=torch.bool)).shape == (0, 4)


@pytest.mark.parametrize("crop", [(0, 0, 47, 33), (10, 20, 57, 53), (40, 0, 87, 33)])
def test_near_crop_edge_matches_reference(crop):
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand((30, 33, 47), generator=gen) > 0.999
    boxes = ops.mask_boxes_xyxy(masks)
    ours = ops.near_crop_edge(boxes, crop, (80, 90))
    ref = amg.is_box_near_crop_edge(boxes, list(crop), [0, 0, 90, 80])
    assert torch.equal(ours, ref)


def test_near_crop_edge_ignores_image_border():
    boxes = torch.tensor([[0, 0, 5, 5], [25, 25, 29, 29]])
    # crop (0, 0, 30, 30) in a 100 x 100 image: left/top are image borders.
    assert ops.near_crop_edge(boxes, (0, 0, 30, 30), (100, 100)).tolist() == [False, True]


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_remove_small_holes_fills_small_background_regions():
    mask = _mask(
        [
            "#######",
            "#.##..#",
            "#######",
            "##.####",
        ]
    )
    out, changed = ops.remove_small_regions(mask, 3, mode="holes")
    assert changed
    # the 1-pixel and 2-pixel holes and the border notch (1 pixel) are filled
    assert out.all()
    out, changed = ops.remove_small_regions(mask, 2, mode="holes")
    assert changed
    assert out.sum() == mask.sum() + 2  # only the two 1-pixel regions
    assert not out[1, 4] and not out[1, 5]


def test_remove_small_holes_uses_eight_connectivity_for_background():
    # Two background pixels touching diagonally form ONE region of 2 (as OpenCV's 8).
    mask = _mask(["####", "#.##", "##.#", "####"])
    out, changed = ops.remove_small_regions(mask, 2, mode="holes")
    assert not changed and out is not None
    assert np.array_equal(out, mask)
    out, changed = ops.remove_small_regions(mask, 3, mode="holes")
    assert changed and out.all()


def test_remove_small_islands_drops_small_components():
    mask = _mask(
        [
            "##....#",
            "##.....",
            ".......",
            "....###",
            "....###",
        ]
    )
    out, changed = ops.remove_small_regions(mask, 3, mode="islands")
    assert changed
    expected = mask.copy()
    expected[0, 6] = False
    assert np.array_equal(out, expected)


def test_remove_small_islands_keeps_largest_when_all_small():
    mask = _mask(["#..##", ".....", "#.#.."])
    out, changed = ops.remove_small_regions(mask, 10, mode="islands")
    assert changed
    assert np.array_equal(out, _mask(["...##", ".....", "....."]))


def test_remove_small_regions_unchanged_and_empty():
    mask = _mask(["###", "###"])
    out, changed = ops.remove_small_regions(mask, 2, mode="islands")
    assert not changed and np.array_equal(out, mask)
    empty = np.zeros((3, 3), bool)
    out, changed = ops.remove_small_regions(empty, 5, mode="islands")
    assert not changed and not out.any()
    # all-background image smaller than the threshold: the whole image is a small hole
    out, changed = ops.remove_small_regions(empty, 10, mode="holes")
    assert changed and out.all()


def test_remove_small_regions_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 'holes' or 'islands', got 'gaps'"):
        ops.remove_small_regions(np.zeros((2, 2), bool), 1, mode="gaps")
