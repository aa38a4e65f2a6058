"""The synthetic microscopy generator: reproducible, varied, correct labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_sam.synthetic import (
    MAX_OBJECTS,
    SyntheticSample,
    make_dataset,
    make_sample,
    sample_seed,
)


def test_same_seed_same_sample_and_different_seeds_differ():
    a, b, c = make_sample(7), make_sample(7), make_sample(8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.kind, a.bright_objects) == (b.kind, b.bright_objects)
    assert not np.array_equal(a.labels, c.labels)


def test_sample_is_frozen():
    sample = make_sample(0, shape_hw=(64, 64))
    assert isinstance(sample, SyntheticSample)
    with pytest.raises(AttributeError):
        sample.kind = "cells"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_dtype_shape_and_consecutive_labels(dtype):
    sample = make_sample(3, shape_hw=(96, 128), dtype=dtype)
    assert sample.image.dtype == dtype
    assert sample.image.shape == sample.labels.shape == (96, 128)
    assert sample.labels.dtype == np.int32
    ids = np.unique(sample.labels)
    assert ids[0] == 0
    np.testing.assert_array_equal(ids[1:], np.arange(1, sample.n_objects + 1))
    assert 1 <= sample.n_objects <= MAX_OBJECTS
    assert np.bincount(sample.labels.ravel())[1:].min() >= 4


def test_sixteen_bit_uses_more_than_eight_bits():
    sample = make_sample(5, dtype=np.uint16)
    assert int(sample.image.max()) > 255


@pytest.mark.parametrize("bright", [True, False])
def test_objects_brighter_or_darker_than_background(bright):
    for seed in range(4):
        s = make_sample(seed, bright_objects=bright, size_px=10.0)
        inside = s.image[s.labels > 0].astype(float).mean()
        outside = s.image[s.labels == 0].astype(float).mean()
        assert (inside > outside) == bright, (seed, inside, outside)


@pytest.mark.parametrize("size_px", [3.0, 12.0, 60.0])
def test_size_px_sets_the_object_radius(size_px):
    radii = []
    for seed in range(3):
        s = make_sample(seed, size_px=size_px)
        areas = np.bincount(s.labels.ravel())[1:]
        radii.extend(np.sqrt(areas / np.pi))
    median = float(np.median(radii))
    assert 0.6 * size_px < median < 1.5 * size_px, median


def test_sizes_span_a_few_pixels_to_a_large_fraction():
    samples = make_dataset(40, seed=0)
    areas = np.concatenate([np.bincount(s.labels.ravel())[1:] for s in samples])
    frac = areas / (256 * 256)
    assert areas.min() < 40
    assert frac.max() > 0.1


def test_dataset_varies_kind_contrast_and_dtype():
    samples = make_dataset(30, seed=0)
    assert {s.kind for s in samples} == {"nuclei", "cells"}
    assert {s.bright_objects for s in samples} == {True, False}
    assert {s.image.dtype for s in samples} == {np.dtype(np.uint8), np.dtype(np.uint16)}


def test_some_objects_touch():
    touching = 0
    for s in make_dataset(10, seed=0):
        grown = ndi.grey_dilation(s.labels, size=3)
        touching += int(np.any((grown != s.labels) & (s.labels > 0) & (grown > 0)))
    assert touching >= 3


def test_dataset_items_are_reproducible_and_datasets_disjoint():
    train = make_dataset(3, seed=0, shape_hw=(64, 64))
    held_out = make_dataset(3, seed=1, shape_hw=(64, 64))
    again = make_sample(sample_seed(0, 2), shape_hw=(64, 64))
    np.testing.assert_array_equal(train[2].image, again.image)
    assert {s.seed for s in train}.isdisjoint({s.seed for s in held_out})
    assert not np.array_equal(train[0].image, held_out[0].image)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape_hw": (8, 64)}, ValueError, "shape_hw"),
        ({"shape_hw": (64, 64, 3)}, ValueError, "shape_hw"),
        ({"kind": "bacteria"}, ValueError, "kind"),
        ({"dtype": np.float32}, TypeError, "dtype"),
        ({"size_px": 500.0}, ValueError, "size_px"),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_sample(0, **kwargs)


def test_dataset_size_is_validated():
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1)
