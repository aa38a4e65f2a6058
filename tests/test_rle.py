"""COCO run-length encoding: reference layout, compressed strings, compact storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam._rle import RunLengthMask, counts_to_string, encode_masks, string_to_counts


def _random_masks(rng, n, h, w):
    masks = rng.random((n, h, w)) < rng.random()
    masks[0] = True
    if n > 1:
        masks[1] = False
    if n > 2:
        masks[2] = rng.random((h, w)) < 0.5  # noise-like: stored as bits
    return masks


def test_counts_match_reference_layout():
    amg = pytest.importorskip("segment_anything.utils.amg")
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        masks = _random_masks(rng, 4, h, w)
        ref = amg.mask_to_rle_pytorch(torch.from_numpy(masks))
        ours = encode_masks(torch.from_numpy(masks))
        for r, o, m in zip(ref, ours, masks, strict=True):
            assert o.counts.tolist() == r["counts"]
            assert o.to_coco() == {"size": [h, w], "counts": r["counts"]}
            assert np.array_equal(o.decode(), m)
            assert o.area == int(m.sum()) == amg.area_from_rle(r)


def test_offset_encoding_equals_padding_first():
    amg = pytest.importorskip("segment_anything.utils.amg")
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        full_h, full_w = h + int(rng.integers(0, 8)), w + int(rng.integers(0, 8))
        x0, y0 = int(rng.integers(0, full_w - w + 1)), int(rng.integers(0, full_h - h + 1))
        masks = _random_masks(rng, 3, h, w)
        padded = np.zeros((3, full_h, full_w), bool)
        padded[:, y0 : y0 + h, x0 : x0 + w] = masks
        ref = amg.mask_to_rle_pytorch(torch.from_numpy(padded))
        ours = encode_masks(torch.from_numpy(masks), offset_xy=(x0, y0), shape_hw=(full_h, full_w))
        for r, o, m in zip(ref, ours, padded, strict=True):
            assert o.counts.tolist() == r["counts"]
            assert np.array_equal(o.decode(), m)
            assert o.area == int(m.sum())


def test_known_counts():
    mask = np.array([[0, 1, 1], [0, 1, 0]], bool)  # column-major: 0 0 1 1 1 0
    rle = RunLengthMask.from_mask(mask)
    assert rle.counts.tolist() == [2, 3, 1]
    assert rle.area == 3
    full = RunLengthMask.from_mask(np.ones((2, 2), bool))
    assert full.counts.tolist() == [0, 4]  # always starts with a (here empty) run of 0s
    assert RunLengthMask.from_mask(np.zeros((2, 3), bool)).counts.tolist() == [6]


def test_noise_like_masks_are_stored_as_bits():
    rng = np.random.default_rng(2)
    noisy = rng.random((64, 64)) < 0.5
    smooth = np.zeros((64, 64), bool)
    smooth[10:40, 5:30] = True
    rles = encode_masks(torch.from_numpy(np.stack([noisy, smooth])))
    assert rles[0]._bits is not None and rles[0]._counts is None
    assert rles[1]._counts is not None and rles[1]._bits is None
    assert rles[0]._bits.nbytes == 64 * 64 // 8
    for rle, mask in zip(rles, (noisy, smooth), strict=True):
        assert np.array_equal(rle.decode(), mask)
        assert np.array_equal(RunLengthMask.from_counts((64, 64), rle.counts).decode(), mask)


def test_decode_is_c_contiguous_bool():
    out = RunLengthMask.from_mask(np.eye(5, 7, dtype=bool)).decode()
    assert out.dtype == bool and out.shape == (5, 7) and out.flags.c_contiguous
    assert np.array_equal(out, np.eye(5, 7, dtype=bool))


def test_compressed_string_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    shapes = [(1, 1), (3, 5), (40, 30), (2000, 3000)]
    for h, w in shapes:
        for mask in _random_masks(rng, 3, h, w):
            if h == 2000:
                mask = np.zeros((h, w), bool)
                mask[1500:, 2500:] = True  # counts in the millions
                mask[0, 0] = True
            rle = RunLengthMask.from_mask(mask)
            theirs = mask_utils.encode(np.asfortranarray(mask))
            assert rle.to_coco_string() == {"size": [h, w], "counts": theirs["counts"].decode()}
            assert np.array_equal(string_to_counts(theirs["counts"].decode()), rle.counts)
            back = RunLengthMask.from_coco(theirs)  # bytes counts, as pycocotools gives
            assert np.array_equal(back.decode(), mask)


def test_string_round_trip_with_negative_deltas():
    counts = np.array([5, 1000, 3, 1, 70000, 2, 0, 65], dtype=np.uint32)
    text = counts_to_string(counts)
    assert np.array_equal(string_to_counts(text), counts)
    assert counts_to_string(np.zeros(0, np.uint32)) == ""
    assert string_to_counts("").size == 0


def test_string_errors():
    with pytest.raises(ValueError, match="characters must lie in"):
        string_to_counts("ab~")
    with pytest.raises(ValueError, match="truncated"):
        string_to_counts("0P")  # 'P' has the continuation bit set


def test_from_counts_checks_the_total():
    with pytest.raises(ValueError, match=r"RLE counts sum to 5, expected 2 \* 3"):
        RunLengthMask.from_counts((2, 3), np.array([2, 3]))
    rle = RunLengthMask.from_coco({"size": [2, 3], "counts": [1, 2, 3]})
    assert rle.area == 2


def test_encode_checks_the_placement():
    masks = torch.zeros((1, 4, 4), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"offset_xy=\(2, 0\) do not fit in shape_hw=\(4, 5\)"):
        encode_masks(masks, offset_xy=(2, 0), shape_hw=(4, 5))
    assert encode_masks(torch.zeros((0, 4, 4), dtype=torch.bool)) == []
    with pytest.raises(ValueError, match=r"mask must have shape \(H, W\)"):
        RunLengthMask.from_mask(np.zeros((1, 2, 2), bool))
