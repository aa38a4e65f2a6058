"""Parameters of automatic mask generation (one frozen dataclass, presets) and run control."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _amg_ops as ops

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class AutomaticSettings:
    """Validated parameters of :func:`generate_masks` (see there for their meaning)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        _check_int("points_per_side", self.points_per_side, 1)
        _check_int("points_per_batch", self.points_per_batch, 1)
        _check_int("crop_n_layers", self.crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", self.crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", self.min_mask_region_area, 0)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            _check_fraction(name, getattr(self, name))
        _check_fraction("crop_nms_thresh", self.crop_nms_thresh)
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ValueError(
                f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio!r}"
            )
        if not self.stability_score_offset >= 0.0:
            raise ValueError(
                f"stability_score_offset must be >= 0, got {self.stability_score_offset!r}"
            )
        sides = self.grid_sizes
        if sides[-1] < 1:
            raise ValueError(
                "points_per_side / crop_n_points_downscale_factor**crop_n_layers must be >= 1, "
                f"got {self.points_per_side} / {self.crop_n_points_downscale_factor}"
                f"**{self.crop_n_layers}"
            )

    @property
    def grid_sizes(self) -> list[int]:
        """Points per side of each crop layer."""
        return ops.layer_points_per_side(
            self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
        )


#: Starting points for common cases (see docs/automatic.md). SAM's defaults
#: suit natural photographs; microscopy objects are smaller, denser and less
#: "object-like" to the model, so its scores run lower.
PRESETS: dict[str, AutomaticSettings] = {
    "SAM defaults": AutomaticSettings(),
    "Microscopy: nuclei": AutomaticSettings(
        points_per_side=48,
        pred_iou_thresh=0.80,
        stability_score_thresh=0.85,
        box_nms_thresh=0.5,
        min_mask_region_area=20,
    ),
    "Microscopy: cells": AutomaticSettings(
        points_per_side=32,
        pred_iou_thresh=0.80,
        stability_score_thresh=0.88,
        box_nms_thresh=0.6,
        min_mask_region_area=50,
    ),
    "Microscopy: small objects (crops)": AutomaticSettings(
        points_per_side=32,
        pred_iou_thresh=0.80,
        stability_score_thresh=0.85,
        box_nms_thresh=0.5,
        crop_n_layers=1,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=10,
    ),
}


class Cancelled(Exception):
    """Raised by :func:`generate_masks` when ``cancel()`` returned True."""


class Steps:
    """Counts work units, reports progress, honours cancel."""

    def __init__(
        self, total: int, progress: ProgressCallback | None, cancel: CancelCallback | None
    ):
        self.done, self.total = 0, total
        self._progress, self._cancel = progress, cancel
        self.report(0)

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise Cancelled("automatic mask generation was cancelled")

    def report(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress(self.done, self.total)
