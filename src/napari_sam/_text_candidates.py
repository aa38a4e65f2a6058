"""Candidate masks for text prompts: validation, prompt filters, the automatic-mask cache.

Candidates are :class:`~napari_sam.automatic.MaskRecord` objects or bool
masks; :func:`as_candidates` wraps both as :class:`Candidate`. An
:class:`AutomaticMaskCache` (owned by a caller, never global) lets text
prompts on the same image reuse one automatic run. Re-exported by
:mod:`napari_sam.text`.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._rle import RunLengthMask
from .automatic import AutomaticSettings, MaskRecord, generate_with_settings

if TYPE_CHECKING:
    from .models.sam import Sam
    from .predict import ImageEmbedding

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]
INSIDE_BOX_FRACTION = 0.9


@dataclass(frozen=True, eq=False)
class Candidate:
    """A candidate mask from a MaskRecord (``rle``) or an array (``mask``)."""

    source: Any
    rle: RunLengthMask | None
    mask: np.ndarray | None
    bbox_xywh: tuple[int, int, int, int]
    area: int

    def segmentation(self) -> np.ndarray:
        return self.mask if self.mask is not None else self.rle.decode()

    def as_rle(self) -> RunLengthMask:
        return self.rle if self.rle is not None else RunLengthMask.from_mask(self.mask)


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0]), int(rows[-1] - rows[0]))


def as_candidates(candidates: Any, shape_hw: tuple[int, int]) -> list[Candidate]:
    """Validate MaskRecords or bool masks of the image's shape."""
    if isinstance(candidates, np.ndarray) and candidates.ndim == 3:
        candidates = list(candidates)
    out = []
    for i, c in enumerate(candidates):
        if isinstance(c, MaskRecord):
            if c.shape_hw != shape_hw:
                raise ValueError(f"candidates[{i}] has shape {c.shape_hw}, image is {shape_hw}")
            out.append(Candidate(c, c.rle, None, tuple(c.bbox_xywh), int(c.area)))
            continue
        mask = np.asarray(c)
        if mask.shape != shape_hw:
            raise ValueError(
                f"candidates[{i}]: expected a MaskRecord or a bool mask of shape {shape_hw}, "
                f"got shape {mask.shape}"
            )
        mask = mask.astype(bool, copy=False)
        area = int(mask.sum())
        if area == 0:
            raise ValueError(f"candidates[{i}] is an empty mask")
        out.append(Candidate(c, None, mask, _box_of(mask), area))
    return out


class AutomaticMaskCache:
    """Automatic masks remembered per (image pixels, model, settings).

    Text prompts on the same image reuse one automatic run instead of
    recomputing it; pass the same cache to every call (a widget or script
    owns it; there is no global cache). The key is a digest of the RGB uint8
    image SAM sees, the model object (held weakly: a new model never gets old
    masks) and the frozen :class:`~napari_sam.automatic.AutomaticSettings`.
    Change a model's weights in place? Call :meth:`clear`.

    Parameters
    ----------
    max_entries : int
        Least recently used entries beyond this are dropped.
    """

    def __init__(self, max_entries: int = 4) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[weakref.ref, list[MaskRecord]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(image_rgb: np.ndarray, settings: AutomaticSettings) -> tuple:
        digest = hashlib.blake2b(np.ascontiguousarray(image_rgb).data, digest_size=16).hexdigest()
        return (digest, image_rgb.shape, settings)

    def get(
        self, model: Sam, image_rgb: np.ndarray, settings: AutomaticSettings
    ) -> list[MaskRecord] | None:
        """The cached records, or None."""
        key = self._key(image_rgb, settings)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not model:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(
        self,
        model: Sam,
        image_rgb: np.ndarray,
        settings: AutomaticSettings,
        records: Sequence[MaskRecord],
    ) -> None:
        """Remember ``records`` (e.g. from the automatic widget) for these inputs."""
        key = self._key(image_rgb, settings)
        self._entries[key] = (weakref.ref(model), list(records))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def generate(
        self,
        model: Sam,
        image_rgb: np.ndarray,
        settings: AutomaticSettings,
        *,
        embedding: ImageEmbedding | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
    ) -> list[MaskRecord]:
        """Cached records, or a new automatic run (from ``embedding`` when given)."""
        found = self.get(model, image_rgb, settings)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        source = image_rgb if embedding is None or settings.crop_n_layers > 0 else embedding
        records = generate_with_settings(
            model, source, settings, rgb=True, progress=progress, cancel=cancel
        )
        self.put(model, image_rgb, settings, records)
        return records

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()


def prompt_array(name: str, value: Any, width: int) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != width or not np.isfinite(array).all():
        raise ValueError(
            f"{name} must be finite with shape (N, {width}) or ({width},); got shape "
            f"{np.shape(value)}"
        )
    return array


def allowed_candidates(
    candidates: list[Candidate], points_xy: np.ndarray | None, boxes_xyxy: np.ndarray | None
) -> np.ndarray:
    """Indices of candidates containing a point or lying (90 %) inside a box."""
    if points_xy is None and boxes_xyxy is None:
        return np.arange(len(candidates))
    keep = []
    for i, cand in enumerate(candidates):
        mask = cand.segmentation()
        height, width = mask.shape
        ok = False
        if points_xy is not None:
            cols = np.clip(np.rint(points_xy[:, 0]).astype(int), 0, width - 1)
            rows = np.clip(np.rint(points_xy[:, 1]).astype(int), 0, height - 1)
            ok = bool(mask[rows, cols].any())
        if not ok and boxes_xyxy is not None:
            for x0, y0, x1, y1 in boxes_xyxy:
                c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
                inside = int(mask[r0 : math.floor(y1) + 1, c0 : math.floor(x1) + 1].sum())
                if inside >= INSIDE_BOX_FRACTION * cand.area:
                    ok = True
                    break
        if ok:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
