"""Seeded synthetic fluorescence-microscopy images with instance labels.

The generator draws nuclei-like objects (ellipses and mildly irregular
blobs) and cell-like objects (strongly irregular blobs), touching and
partly overlapping, with texture, blur, shot and read noise, uneven
illumination, bright-on-dark or dark-on-bright contrast, in 8 or 16 bits,
with object sizes from a few pixels to a large fraction of the image. It
serves the shipped ``demo`` model (:mod:`napari_sam.training`) and tests
that need images whose right answer is known.

Every image is a pure function of its seed: the same seed gives the same
image and labels on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

KINDS = ("nuclei", "cells")
MAX_OBJECTS = 80
_DATASET_STRIDE = 1 << 20


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic image and its ground truth.

    Attributes
    ----------
    image : ndarray of shape (H, W), uint8 or uint16
        The rendered image.
    labels : ndarray of shape (H, W), int32
        Instance labels: 0 is background, objects are ``1..n_objects``
        (consecutive). Where objects overlap, the one drawn last owns the pixel.
    kind : str
        ``"nuclei"`` or ``"cells"``.
    bright_objects : bool
        True for bright objects on a dark background (fluorescence).
    seed : int
        The seed that reproduces this sample with :func:`make_sample`.
    """

    image: np.ndarray
    labels: np.ndarray
    kind: str
    bright_objects: bool
    seed: int

    @property
    def n_objects(self) -> int:
        """Number of labelled objects."""
        return int(self.labels.max())


@dataclass(frozen=True)
class _Shape:
    """Geometry of one object: star-shaped around its centre."""

    center_yx: tuple[float, float]
    radius: float
    aspect: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)


def _coverage(shape: _Shape, shape_hw: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage (0..1) of ``shape`` on its bounding box, and the box.

    Returns
    -------
    box : tuple of slices
        Rows and columns of the bounding box inside the image.
    alpha : ndarray of shape (h, w), float32
        Soft coverage; ``alpha >= 0.5`` is the object's mask. Values outside
        the object are 0, the boundary ramps over about one pixel.
    """
    cy, cx = shape.center_yx
    amp = sum(abs(a) for _, a, _ in shape.harmonics)
    reach = shape.radius * np.sqrt(shape.aspect) * (1.0 + amp) + 2.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape_hw[0])
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape_hw[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(shape.angle), np.sin(shape.angle)
    u = (dx * cos + dy * sin) / np.sqrt(shape.aspect)
    v = (-dx * sin + dy * cos) * np.sqrt(shape.aspect)
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    edge = np.full_like(rho, shape.radius)
    for order, amplitude, phase in shape.harmonics:
        edge += shape.radius * amplitude * np.cos(order * phi + phase)
    # Distance to the edge in (roughly) pixels, ramped over one pixel.
    scale = np.sqrt(shape.aspect) if shape.aspect > 1 else 1.0
    alpha = np.clip(0.5 + (edge - rho) / scale, 0.0, 1.0).astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), alpha


def _random_shape(
    rng: np.random.Generator, kind: str, radius: float, center_yx: tuple[float, float]
) -> _Shape:
    """Draw the outline of one nucleus- or cell-like object."""
    if kind == "nuclei":
        aspect = float(rng.uniform(1.0, 1.8))
        n_harm, max_amp = (0, 0.0) if rng.random() < 0.5 else (3, 0.06)
    else:
        aspect = float(rng.uniform(1.0, 2.4))
        n_harm, max_amp = 4, 0.13
    harmonics = tuple(
        (order, float(rng.uniform(0.0, max_amp)), float(rng.uniform(0, 2 * np.pi)))
        for order in range(2, 2 + n_harm)
    )
    return _Shape(center_yx, radius, aspect, float(rng.uniform(0, np.pi)), harmonics)


def _radii(
    rng: np.random.Generator, shape_hw: tuple[int, int], size_px: float | None
) -> np.ndarray:
    """Object radii for one image: one size regime, or (sometimes) mixed sizes."""
    side = min(shape_hw)
    lo, hi = 2.5, 0.3 * side
    cover = rng.uniform(0.08, 0.35)
    if size_px is None and rng.random() < 0.2:  # mixed sizes in one image
        n = int(rng.integers(4, 30))
        return np.exp(rng.uniform(np.log(lo), np.log(hi / 2), size=n))
    mean = size_px if size_px is not None else float(np.exp(rng.uniform(np.log(3.0), np.log(hi))))
    n = int(np.clip(round(cover * shape_hw[0] * shape_hw[1] / (np.pi * mean**2)), 1, MAX_OBJECTS))
    return np.clip(mean * np.exp(rng.normal(0.0, 0.2, size=n)), lo, hi)


def _place_objects(
    rng: np.random.Generator,
    kind: str,
    radii: np.ndarray,
    shape_hw: tuple[int, int],
    crowding: float,
) -> tuple[np.ndarray, list[tuple[tuple[slice, slice], np.ndarray]]]:
    """Place objects; a new one may touch or overlap others but never hide them.

    Returns the label image (int32, consecutive ids) and, per object, its box
    and soft coverage restricted to the pixels it owns.
    """
    labels = np.zeros(shape_hw, np.int32)
    placed: list[_Shape] = []
    areas: list[int] = []
    for radius in np.sort(radii)[::-1]:
        for _ in range(12):
            if placed and rng.random() < crowding:  # touch a neighbour
                other = placed[int(rng.integers(len(placed)))]
                dist = (other.radius + radius) * rng.uniform(0.8, 1.05)
                theta = rng.uniform(0, 2 * np.pi)
                cy = other.center_yx[0] + dist * np.sin(theta)
                cx = other.center_yx[1] + dist * np.cos(theta)
            else:
                cy, cx = rng.uniform(0, shape_hw[0]), rng.uniform(0, shape_hw[1])
            if not (0 <= cy < shape_hw[0] and 0 <= cx < shape_hw[1]):
                continue
            shape = _random_shape(rng, kind, float(radius), (float(cy), float(cx)))
            box, alpha = _coverage(shape, shape_hw)
            mask = alpha >= 0.5
            if mask.sum() < 4:
                continue
            under = labels[box][mask]
            hits = np.bincount(under, minlength=len(areas) + 1)[1:]
            if np.any(hits > 0.3 * np.asarray(areas, dtype=float)):
                continue  # would hide too much of an earlier object
            labels[box][mask] = len(placed) + 1
            placed.append(shape)
            areas.append(int(mask.sum()))
            break
    labels, objects = _renumber(labels, placed, shape_hw)
    return labels, objects


def _renumber(
    labels: np.ndarray, placed: list[_Shape], shape_hw: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[tuple[slice, slice], np.ndarray]]]:
    """Drop objects left with too few pixels; give the rest ids ``1..n``."""
    counts = np.bincount(labels.ravel(), minlength=len(placed) + 1)
    out = np.zeros_like(labels)
    objects = []
    for i, shape in enumerate(placed, start=1):
        if counts[i] < 4:
            continue
        box, alpha = _coverage(shape, shape_hw)
        own = labels[box] == i
        # Soft edge where the object borders background, hard where it is covered.
        alpha = np.where(own | (labels[box] == 0), alpha, 0.0).astype(np.float32)
        out[box][own] = len(objects) + 1
        objects.append((box, alpha))
    return out, objects


def _smooth_noise(rng: np.random.Generator, shape_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape_hw).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _render(
    rng: np.random.Generator,
    objects: list[tuple[tuple[slice, slice], np.ndarray]],
    shape_hw: tuple[int, int],
    kind: str,
) -> np.ndarray:
    """Object signal in ``[0, ~1]`` (float32): textured, shaded, composited."""
    signal = np.zeros(shape_hw, np.float32)
    texture = _smooth_noise(rng, shape_hw, float(rng.uniform(0.7, 3.0)))
    tex_amp = rng.uniform(0.0, 0.35)
    dome = rng.uniform(-0.3, 0.4)  # > 0: brighter centre, < 0: brighter rim
    for box, alpha in objects:
        level = rng.uniform(0.45, 1.0) if kind == "nuclei" else rng.uniform(0.3, 0.8)
        inside = ndi.distance_transform_edt(alpha > 0.0)
        depth = inside / (inside.max() + 1e-6)
        value = level * (1.0 + tex_amp * texture[box]) * (1.0 - dome + dome * depth)
        signal[box] = signal[box] * (1.0 - alpha) + alpha * value
    return np.clip(signal, 0.0, None)


def _illumination(rng: np.random.Generator, shape_hw: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative illumination field around 1."""
    yy, xx = np.mgrid[0 : shape_hw[0], 0 : shape_hw[1]].astype(np.float32)
    yy, xx = yy / shape_hw[0] - 0.5, xx / shape_hw[1] - 0.5
    gy, gx = rng.uniform(-0.4, 0.4, size=2)
    cy, cx = rng.uniform(-0.5, 0.5, size=2)
    vignette = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.1, 0.6))
    field = 1.0 + gy * yy + gx * xx + rng.uniform(0.0, 0.4) * (vignette - vignette.mean())
    return np.clip(field, 0.3, None).astype(np.float32)


def _to_dtype(rng: np.random.Generator, img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Quantise a ``[0, ~1]`` image into part of the dtype's range."""
    if dtype == np.uint8:
        offset, top = rng.uniform(0, 40), rng.uniform(120, 255)
    else:  # 16-bit cameras: a 12-bit-like range, or most of 16 bits
        offset = rng.uniform(50, 1000)
        top = rng.uniform(3000, 4095) if rng.random() < 0.6 else rng.uniform(20000, 65535)
    info = np.iinfo(dtype)
    out = offset + img * (top - offset)
    return np.clip(np.rint(out), info.min, info.max).astype(dtype)


def _validate(shape_hw: Sequence[int], kind: str | None, dtype: object, size_px: float | None):
    if len(shape_hw) != 2 or min(int(s) for s in shape_hw) < 16:
        raise ValueError(f"shape_hw must be (height, width) with sides >= 16, got {shape_hw!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if dtype is not None and np.dtype(dtype) not in (np.uint8, np.uint16):
        raise TypeError(f"dtype must be uint8, uint16 or None, got {dtype!r}")
    if size_px is not None and not 2.0 <= size_px <= 0.3 * min(shape_hw):
        raise ValueError(f"size_px must be in [2, 0.3 * min(shape_hw)], got {size_px!r}")


def make_sample(
    seed: int,
    *,
    shape_hw: tuple[int, int] = (256, 256),
    kind: str | None = None,
    bright_objects: bool | None = None,
    dtype: type | np.dtype | None = None,
    size_px: float | None = None,
) -> SyntheticSample:
    """Render one synthetic microscopy image with its instance labels.

    Parameters
    ----------
    seed : int
        Seed of everything random; the same seed gives the same sample.
    shape_hw : tuple of int
        Image ``(height, width)``; each side at least 16.
    kind : {"nuclei", "cells"}, optional
        Object type; drawn at random (half each) when None.
    bright_objects : bool, optional
        Bright objects on dark (fluorescence) or dark on bright; random
        (80 % bright) when None.
    dtype : uint8 or uint16, optional
        Output dtype; random (70 % uint8) when None.
    size_px : float, optional
        Mean object radius in pixels, in ``[2, 0.3 * min(shape_hw)]``; random
        (log-uniform from 3 px to 30 % of the image, sometimes mixed) when None.

    Returns
    -------
    SyntheticSample
        Image, labels and the drawn settings.
    """
    _validate(shape_hw, kind, dtype, size_px)
    shape_hw = (int(shape_hw[0]), int(shape_hw[1]))
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[int(rng.integers(2))]
    bright = bool(rng.random() < 0.8) if bright_objects is None else bool(bright_objects)
    out_dtype = (
        np.dtype(dtype)
        if dtype is not None
        else np.dtype(np.uint8 if rng.random() < 0.7 else np.uint16)
    )
    radii = _radii(rng, shape_hw, size_px)
    labels, objects = _place_objects(rng, kind, radii, shape_hw, float(rng.uniform(0.0, 0.7)))
    signal = _render(rng, objects, shape_hw, kind)
    signal = ndi.gaussian_filter(signal, float(rng.uniform(0.0, 1.5)))
    background = rng.uniform(0.02, 0.15)
    contrast = rng.uniform(0.4, 0.85)
    img = background + contrast * signal if bright else (1.0 - background) - contrast * signal
    img = np.clip(img * _illumination(rng, shape_hw), 0.0, None)
    photons = rng.uniform(15.0, 400.0)  # photons per unit intensity: shot noise
    img = rng.poisson(img * photons).astype(np.float32) / photons
    img = img + rng.normal(0.0, rng.uniform(0.003, 0.03), size=shape_hw).astype(np.float32)
    img = np.clip(img, 0.0, None) / max(float(np.percentile(img, 99.9)), 1e-6)
    return SyntheticSample(_to_dtype(rng, img, out_dtype), labels, kind, bright, int(seed))


def sample_seed(dataset_seed: int, index: int) -> int:
    """Seed of sample ``index`` of the dataset ``dataset_seed`` (disjoint per dataset)."""
    return int(dataset_seed) * _DATASET_STRIDE + int(index)


def make_dataset(
    n: int, *, seed: int = 0, shape_hw: tuple[int, int] = (256, 256), **options
) -> list[SyntheticSample]:
    """Render ``n`` samples; datasets with different seeds share no image.

    Parameters
    ----------
    n : int
        Number of samples (``0 <= n < 2**20``).
    seed : int
        Dataset seed; sample ``i`` is ``make_sample(sample_seed(seed, i))``.
    shape_hw : tuple of int
        Image ``(height, width)``.
    **options
        Passed to :func:`make_sample` (``kind``, ``bright_objects``, ``dtype``,
        ``size_px``).

    Returns
    -------
    list of SyntheticSample
    """
    if not 0 <= int(n) < _DATASET_STRIDE:
        raise ValueError(f"n must be in [0, {_DATASET_STRIDE}), got {n!r}")
    return [make_sample(sample_seed(seed, i), shape_hw=shape_hw, **options) for i in range(int(n))]


#: Seed of the demo image shown by the napari sample and ``python -m napari_sam``.
DEMO_NUCLEI_SEED = 20240


def demo_nuclei() -> SyntheticSample:
    """The demo image: synthetic fluorescent nuclei, 384 x 384, uint8, with ground truth.

    It is the napari sample "Synthetic nuclei" and the image of the headless
    main job (``python -m napari_sam --headless OUT``).

    Returns
    -------
    SyntheticSample
        ``image`` of shape (384, 384), uint8, and its instance ``labels``.
    """
    return make_sample(
        DEMO_NUCLEI_SEED,
        shape_hw=(384, 384),
        kind="nuclei",
        bright_objects=True,
        dtype=np.uint8,
        size_px=14.0,
    )
