"""Tests for napari_sam.image: napari image -> RGB uint8 -> model input, coordinates."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from napari_sam.image import (
    boxes_to_input_frame,
    boxes_to_original_frame,
    input_shape_hw,
    normalize_and_pad,
    points_to_input_frame,
    points_to_original_frame,
    prepare_image,
    resize_longest_side,
    to_model_input,
)
from napari_sam.registry import get_config

SIZES_HW = [(100, 37), (37, 100), (128, 128), (300, 201), (1, 5), (513, 1024)]


def _ramp(dtype, low, high, shape=(4, 5)) -> np.ndarray:
    return np.linspace(low, high, num=int(np.prod(shape))).astype(dtype).reshape(shape)


# --------------------------------------------------------------------------- #
# prepare_image: dtypes and channels
# --------------------------------------------------------------------------- #
def test_uint8_rgb_is_returned_unchanged_as_a_copy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = prepare_image(image)
    np.testing.assert_array_equal(out, image)
    assert out.dtype == np.uint8
    assert not np.shares_memory(out, image)


def test_uint8_grayscale_is_repeated_over_three_channels():
    image = _ramp(np.uint8, 3, 200)
    out = prepare_image(image)
    assert out.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], image)
    out[0, 0, 0] = 77  # a writable array with independent channels
    assert out[0, 0, 1] == image[0, 0] == 3


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.uint16, 1000, 60000),
        (np.int16, -3000, 200),
        (np.int32, -(2**30), 2**30),
        (np.int64, 5, 10**12),
        (np.uint32, 0, 2**32 - 1),
        (np.float16, -1.0, 1.0),
        (np.float32, 0.001, 0.002),
        (np.float64, -1e9, 1e9),
        (np.int8, -128, 127),
    ],
)
def test_other_dtypes_are_stretched_from_min_to_max(dtype, low, high):
    image = _ramp(dtype, low, high)
    out = prepare_image(image)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert out.min() == 0 and out.max() == 255
    values = image.astype(np.float64)
    expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255)
    np.testing.assert_array_equal(out[..., 0], expected.astype(np.uint8))
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # monotone ramp stays monotone


def test_bool_becomes_0_and_255():
    image = np.array([[True, False], [False, True]])
    out = prepare_image(image)
    np.testing.assert_array_equal(out[..., 2], [[255, 0], [0, 255]])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_constant_image_becomes_zeros(dtype):
    out = prepare_image(np.full((3, 4), 7, dtype=dtype))
    np.testing.assert_array_equal(out, np.zeros((3, 4, 3), np.uint8))


def test_nan_pixels_become_zero_and_do_not_spoil_the_range():
    image = np.array([[np.nan, 0.0], [1.0, 2.0]], dtype=np.float32)
    out = prepare_image(image)
    np.testing.assert_array_equal(out[..., 0], [[0, 0], [128, 255]])


def test_infinite_pixels_clip_and_all_nan_gives_zeros():
    image = np.array([[np.inf, -np.inf], [1.0, 3.0]])
    np.testing.assert_array_equal(prepare_image(image)[..., 0], [[255, 0], [0, 255]])
    np.testing.assert_array_equal(prepare_image(np.full((2, 2), np.nan)), 0)


def test_rgba_drops_alpha():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_image(image), image[..., :3])


def test_float_rgb_is_stretched_jointly_over_channels():
    image = np.zeros((2, 2, 3), np.float32)
    image[..., 0] = 1.0  # red channel at max, others at min
    out = prepare_image(image)
    np.testing.assert_array_equal(out[..., 0], 255)
    np.testing.assert_array_equal(out[..., 1:], 0)


def test_rgb_false_treats_a_small_last_axis_as_an_error_not_colour():
    with pytest.raises(ValueError, match=r"grayscale image must have shape \(H, W\).*\(5, 6, 3\)"):
        prepare_image(np.zeros((5, 6, 3), np.uint8), rgb=False)


def test_rgb_true_forces_colour_and_checks_the_shape():
    out = prepare_image(np.zeros((3, 5, 3), np.uint16), rgb=True)
    assert out.shape == (3, 5, 3)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(H, W, 4\); received shape \(5, 6\)"):
        prepare_image(np.zeros((5, 6)), rgb=True)


# --------------------------------------------------------------------------- #
# prepare_image: contrast limits
# --------------------------------------------------------------------------- #
def test_contrast_limits_map_low_to_0_high_to_255_with_clipping():
    image = np.array([[0, 100, 150, 200, 300, 1000]], dtype=np.uint16)
    out = prepare_image(image, contrast_limits=(100, 300))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 64, 128, 255, 255])


def test_contrast_limits_apply_to_uint8_too():
    image = np.array([[0, 50, 100, 255]], dtype=np.uint8)
    out = prepare_image(image, contrast_limits=(50.0, 100.0))
    np.testing.assert_array_equal(out[0, :, 1], [0, 0, 255, 255])


def test_contrast_limits_on_float_rgb_and_negative_values():
    image = np.array([[[-1.0, 0.0, 1.0]]], dtype=np.float64)
    out = prepare_image(image, contrast_limits=[-1, 1])
    np.testing.assert_array_equal(out[0, 0], [0, 128, 255])


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ((5, 5), r"low < high; received \(5.0, 5.0\)"),
        ((9, 1), r"low < high; received \(9.0, 1.0\)"),
        ((0, np.nan), "finite"),
        ((1, 2, 3), "two numbers"),
        ("ab", "two numbers"),
    ],
)
def test_invalid_contrast_limits_are_refused(limits, match):
    with pytest.raises(ValueError, match=r"contrast_limits.*" + match):
        prepare_image(np.zeros((3, 3)), contrast_limits=limits)


# --------------------------------------------------------------------------- #
# prepare_image: errors
# --------------------------------------------------------------------------- #
def test_3d_stack_error_names_the_shape_and_says_to_pass_a_slice():
    with pytest.raises(ValueError, match=r"received shape \(5, 64, 64\).*pass a 2D slice"):
        prepare_image(np.zeros((5, 64, 64), np.uint16))


def test_rgb_time_series_error_names_the_shape():
    with pytest.raises(ValueError, match=r"received shape \(2, 8, 8, 3\) \(pass one 2D slice\)"):
        prepare_image(np.zeros((2, 8, 8, 3), np.uint8), rgb=True)


def test_1d_array_is_refused():
    with pytest.raises(ValueError, match=r"received shape \(10,\)"):
        prepare_image(np.zeros(10))


def test_complex_dtype_is_refused():
    with pytest.raises(TypeError, match=r"complex dtype complex64.*np\.abs"):
        prepare_image(np.zeros((4, 4), np.complex64))


def test_non_numeric_dtype_is_refused():
    with pytest.raises(TypeError, match="bool, integer or float; received <U1"):
        prepare_image(np.array([["a", "b"]]))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 3), (0,)])
def test_empty_image_is_refused(shape):
    with pytest.raises(ValueError, match=r"image is empty: shape " + re.escape(str(shape))):
        prepare_image(np.zeros(shape, np.uint8))


# --------------------------------------------------------------------------- #
# resize, normalise, pad: same arithmetic as the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape_hw", [*SIZES_HW, (1023, 1024), (2000, 3), (7, 7)])
@pytest.mark.parametrize("img_size", [128, 1024])
def test_input_shape_matches_reference(shape_hw, img_size):
    from segment_anything.utils.transforms import ResizeLongestSide

    expected = ResizeLongestSide.get_preprocess_shape(*shape_hw, img_size)
    got = input_shape_hw(shape_hw, img_size)
    assert got == expected
    assert max(got) == img_size


@pytest.mark.parametrize("shape_hw", SIZES_HW)
def test_resize_matches_reference_exactly(shape_hw):
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*shape_hw, 3), dtype=np.uint8)
    expected = ResizeLongestSide(128).apply_image(image)
    got = resize_longest_side(image, 128)
    assert got.shape == (*input_shape_hw(shape_hw, 128), 3)
    np.testing.assert_array_equal(got, expected)
    assert got.flags.writeable


def test_resize_refuses_non_rgb_uint8():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*shape \(4, 4\).*prepare_image"):
        resize_longest_side(np.zeros((4, 4), np.uint8), 128)


@pytest.mark.parametrize("shape_hw", [(100, 37), (37, 100), (128, 128), (300, 201)])
def test_model_input_matches_reference_preprocess(shape_hw):
    """The tensor our encoder sees equals the reference's ``model.preprocess`` output."""
    from segment_anything import SamPredictor

    from ._reference import build_reference

    config = get_config("tiny_vit_b")
    ref = build_reference(config)
    seen: list[torch.Tensor] = []
    ref.image_encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (*shape_hw, 3), dtype=np.uint8)
    SamPredictor(ref).set_image(image)

    got = to_model_input(
        prepare_image(image),
        img_size=config.img_size,
        pixel_mean=ref.pixel_mean,
        pixel_std=ref.pixel_std,
    )
    assert got.shape == (1, 3, 128, 128) and got.dtype == torch.float32
    torch.testing.assert_close(got, seen[0], rtol=1e-6, atol=1e-6)
    h, w = input_shape_hw(shape_hw, 128)
    assert torch.all(got[..., h:, :] == 0) and torch.all(got[..., :, w:] == 0)


def test_normalize_and_pad_values():
    image = np.full((2, 3, 3), 10, np.uint8)
    mean = torch.tensor([10.0, 0.0, 5.0]).view(3, 1, 1)
    std = torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1)
    out = normalize_and_pad(image, img_size=4, pixel_mean=mean, pixel_std=std)
    assert out.shape == (1, 3, 4, 4)
    expected = torch.tensor([0.0, 5.0, 1.0]).view(3, 1, 1).expand(3, 2, 3)
    torch.testing.assert_close(out[0, :, :2, :3], expected)
    assert torch.all(out[0, :, 2:, :] == 0) and torch.all(out[0, :, :, 3:] == 0)
    with pytest.raises(ValueError, match=r"larger than img_size=2"):
        normalize_and_pad(image, img_size=2, pixel_mean=mean, pixel_std=std)


# --------------------------------------------------------------------------- #
# coordinates
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape_hw", [(100, 37), (37, 100), (300, 201)])
def test_coordinates_match_reference_and_round_trip(shape_hw):
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(128)
    input_hw = input_shape_hw(shape_hw, 128)
    rng = np.random.default_rng(4)
    points = rng.uniform(0, 100, (2, 5, 2))
    boxes = rng.uniform(0, 100, (6, 4))

    pts_in = points_to_input_frame(points, shape_hw, input_hw)
    np.testing.assert_array_equal(pts_in, transform.apply_coords(points, shape_hw))
    boxes_in = boxes_to_input_frame(boxes, shape_hw, input_hw)
    np.testing.assert_array_equal(boxes_in, transform.apply_boxes(boxes, shape_hw))
    assert pts_in.dtype == np.float64 and boxes_in.shape == (6, 4)

    np.testing.assert_allclose(points_to_original_frame(pts_in, shape_hw, input_hw), points)
    np.testing.assert_allclose(boxes_to_original_frame(boxes_in, shape_hw, input_hw), boxes)


def test_coordinates_on_tensors_match_reference_torch_transform():
    from segment_anything.utils.transforms import ResizeLongestSide

    shape_hw, input_hw = (300, 201), input_shape_hw((300, 201), 128)
    boxes = torch.tensor([[1.0, 2.0, 150.0, 290.0], [0.0, 0.0, 200.0, 299.0]])
    got = boxes_to_input_frame(boxes, shape_hw, input_hw)
    torch.testing.assert_close(got, ResizeLongestSide(128).apply_boxes_torch(boxes, shape_hw))
    torch.testing.assert_close(boxes_to_original_frame(got, shape_hw, input_hw), boxes)
    points = torch.tensor([[3, 4]])  # integer input -> float output, input untouched
    out = points_to_input_frame(points, shape_hw, input_hw)
    assert out.dtype == torch.float32 and points.dtype == torch.int64
    torch.testing.assert_close(out, torch.tensor([[3 * 86 / 201, 4 * 128 / 300]]))


def test_coordinate_functions_refuse_a_wrong_last_axis():
    with pytest.raises(ValueError, match=r"2 values \(x, y\) last; received shape \(4, 3\)"):
        points_to_input_frame(np.zeros((4, 3)), (10, 10), (128, 128))
    with pytest.raises(ValueError, match=r"4 values \(x0, y0, x1, y1\) last; received shape"):
        boxes_to_input_frame(np.zeros(2), (10, 10), (128, 128))
