"""Run-length encoded masks in COCO's layouts (no pycocotools needed).

COCO's *uncompressed* RLE of an ``(H, W)`` mask is ``{"size": [H, W],
"counts": [n0, n1, ...]}``: lengths of alternating runs of 0s and 1s over the
mask flattened in column-major (Fortran) order, always starting with a run
of 0s (which may be empty). The *compressed* form stores the same counts as
an ASCII string: each count (from the fourth on, as the difference with the
count two places before) is written in 5-bit groups, least significant
first, each group as ``chr(48 + group)`` with bit 5 set while more groups
follow, the top group's bit 4 carrying the sign. ``pycocotools.mask`` reads
and writes exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_GROUP_BITS = 5
_MAX_GROUPS = 8  # int64 deltas of uint32 counts need at most 7 groups


@dataclass(frozen=True, eq=False)
class RunLengthMask:
    """A binary mask with COCO RLE semantics, stored compactly.

    Smooth masks are stored as their run lengths; masks with so many runs
    that the counts would be larger than a bitmap (noise-like masks, e.g.
    from untrained weights) are stored as packed bits instead. Either way
    :attr:`counts` gives the COCO uncompressed RLE.

    Attributes
    ----------
    shape_hw : tuple of int
        ``(height, width)`` of the mask.
    area : int
        Number of foreground pixels.
    """

    shape_hw: tuple[int, int]
    area: int
    _counts: np.ndarray | None = field(default=None, repr=False)
    _bits: np.ndarray | None = field(default=None, repr=False)
    _bits_start: int = field(default=0, repr=False)

    @classmethod
    def from_counts(cls, shape_hw: tuple[int, int], counts: np.ndarray) -> RunLengthMask:
        """Wrap COCO uncompressed counts (column-major runs, zeros first)."""
        counts = np.asarray(counts, dtype=np.uint32)
        height, width = shape_hw
        total = int(counts.sum(dtype=np.int64))
        if total != height * width:
            raise ValueError(f"RLE counts sum to {total}, expected {height} * {width}")
        return cls((int(height), int(width)), int(counts[1::2].sum(dtype=np.int64)), counts)

    @property
    def counts(self) -> np.ndarray:
        """COCO uncompressed RLE counts, ``ndarray (K,)`` of uint32."""
        if self._counts is not None:
            return self._counts
        flat = self._flat()
        starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        return _runs_from_changes(starts, bool(flat[0]), flat.size, 0, 0)

    def _flat(self) -> np.ndarray:
        """The mask flattened in column-major order, ``ndarray (H * W,)`` of bool."""
        height, width = self.shape_hw
        if self._counts is not None:
            values = (np.arange(len(self._counts)) % 2).astype(bool)
            return np.repeat(values, self._counts.astype(np.int64))
        flat = np.zeros(height * width, dtype=bool)
        bits = np.unpackbits(self._bits).view(bool)
        length = min(bits.size, flat.size - self._bits_start)
        flat[self._bits_start : self._bits_start + length] = bits[:length]
        return flat

    def decode(self) -> np.ndarray:
        """The mask as a C-contiguous ``ndarray (H, W)`` of bool."""
        height, width = self.shape_hw
        return np.ascontiguousarray(self._flat().reshape(width, height).T)

    def to_coco(self) -> dict[str, Any]:
        """Uncompressed COCO RLE: ``{"size": [H, W], "counts": list of int}``."""
        return {"size": list(self.shape_hw), "counts": self.counts.tolist()}

    def to_coco_string(self) -> dict[str, Any]:
        """Compressed COCO RLE: ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
        return {"size": list(self.shape_hw), "counts": counts_to_string(self.counts)}

    @classmethod
    def from_coco(cls, rle: dict[str, Any]) -> RunLengthMask:
        """Read either COCO form (``counts`` a list of int, a str or bytes)."""
        counts = rle["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if isinstance(counts, str):
            array = string_to_counts(counts)
        else:
            array = np.asarray(counts, dtype=np.uint32)
        return cls.from_counts(tuple(int(v) for v in rle["size"]), array)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> RunLengthMask:
        """Encode one ``(H, W)`` bool mask."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
        (rle,) = encode_masks(torch.from_numpy(mask)[None])
        return rle


def count_per_mask(flags: torch.Tensor) -> torch.Tensor:
    """Number of True values in each ``flags[i]``, ``Tensor (B,)`` of int32.

    Parameters
    ----------
    flags : Tensor of shape (B, ..., L), bool
        Sums run along ``L`` in int16 first (several times faster than one
        bool-to-int64 reduction), exact while ``L < 32768``.
    """
    if flags.shape[-1] < 2**15:
        rows = flags.sum(-1, dtype=torch.int16)
    else:
        rows = flags.sum(-1, dtype=torch.int32)
    return rows.flatten(1).sum(-1, dtype=torch.int32)


def _runs_from_changes(
    starts: np.ndarray, first_value: bool, length: int, before: int, after: int
) -> np.ndarray:
    """COCO counts of a flat run given the run starts, padded with zeros both sides."""
    bounds = np.concatenate([[0], starts, [length]])
    runs = np.diff(bounds)
    last_value = first_value ^ (len(starts) % 2 == 1)
    if first_value:
        runs = np.concatenate([[before], runs])
    else:
        runs[0] += before
    if last_value:
        runs = np.concatenate([runs, [after]]) if after else runs
    else:
        runs[-1] += after
    return runs.astype(np.uint32)


def encode_masks(
    masks: torch.Tensor,
    *,
    offset_xy: tuple[int, int] = (0, 0),
    shape_hw: tuple[int, int] | None = None,
) -> list[RunLengthMask]:
    """Encode masks, optionally placed inside a larger all-zero image.

    Parameters
    ----------
    masks : Tensor of shape (B, h, w), bool
        Masks (of a crop).
    offset_xy : tuple of int
        Column and row of the masks' top-left pixel in the full image.
    shape_hw : tuple of int, optional
        ``(H, W)`` of the full image; default ``(h, w)``.

    Returns
    -------
    list of RunLengthMask
        One per mask, of shape ``shape_hw``.
    """
    n_masks, crop_h, crop_w = masks.shape
    full_h, full_w = shape_hw if shape_hw is not None else (crop_h, crop_w)
    x0, y0 = offset_xy
    if x0 < 0 or y0 < 0 or x0 + crop_w > full_w or y0 + crop_h > full_h:
        raise ValueError(
            f"masks of shape {(crop_h, crop_w)} at offset_xy={offset_xy} do not fit in "
            f"shape_hw={(full_h, full_w)}"
        )
    if n_masks == 0:
        return []
    masks = masks.to(torch.bool)
    if crop_h == full_h:
        columns = masks.transpose(1, 2).contiguous()  # B x w x H
    else:
        columns = torch.zeros((n_masks, crop_w, full_h), dtype=torch.bool, device=masks.device)
        columns[:, :, y0 : y0 + crop_h] = masks.transpose(1, 2)
    flat = columns.reshape(n_masks, -1)
    changed = torch.zeros_like(columns)  # changed[i, p]: pixel p differs from pixel p - 1
    torch.ne(flat[:, 1:], flat[:, :-1], out=changed.view(n_masks, -1)[:, 1:])
    per_mask = count_per_mask(changed).cpu().numpy()
    areas = count_per_mask(columns).cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    changed = changed.view(n_masks, -1)
    length = flat.shape[1]
    # Noise-like masks: a bitmap is smaller than their run lengths.
    noisy = 4 * (per_mask + 3) > -(-length // 8)
    smooth = torch.from_numpy(np.flatnonzero(~noisy)).to(flat.device)
    changes = changed[smooth].nonzero().cpu().numpy()
    starts = np.split(changes[:, 1], np.cumsum(per_mask[~noisy])[:-1])
    bits = np.packbits(flat[torch.from_numpy(np.flatnonzero(noisy))].cpu().numpy(), axis=1)
    before, after = x0 * full_h, (full_w - x0 - crop_w) * full_h
    shape = (full_h, full_w)
    smooth_iter, bits_iter = iter(starts), iter(bits)
    out = []
    for i in range(n_masks):
        if noisy[i]:
            out.append(RunLengthMask(shape, int(areas[i]), None, next(bits_iter), before))
        else:
            counts = _runs_from_changes(next(smooth_iter), bool(first[i]), length, before, after)
            out.append(RunLengthMask(shape, int(areas[i]), counts))
    return out


def counts_to_string(counts: np.ndarray) -> str:
    """COCO's compressed string for uncompressed RLE counts.

    Parameters
    ----------
    counts : ndarray of shape (K,), unsigned int

    Returns
    -------
    str
        ASCII characters 48..111.
    """
    values = np.asarray(counts, dtype=np.int64).copy()
    if values.size > 3:
        values[3:] -= np.asarray(counts, dtype=np.int64)[1:-2]
    groups = np.empty((values.size, _MAX_GROUPS), dtype=np.int64)
    active = np.empty((values.size, _MAX_GROUPS), dtype=bool)
    more = np.ones(values.size, dtype=bool)
    for k in range(_MAX_GROUPS):
        group = values & 0x1F
        values = values >> _GROUP_BITS
        active[:, k] = more
        more = more & np.where(group & 0x10, values != -1, values != 0)
        groups[:, k] = group | np.where(more, 0x20, 0)
    return (groups[active] + 48).astype(np.uint8).tobytes().decode("ascii")


def string_to_counts(text: str) -> np.ndarray:
    """Uncompressed RLE counts from COCO's compressed string.

    Parameters
    ----------
    text : str
        As written by :func:`counts_to_string` or pycocotools.

    Returns
    -------
    ndarray of shape (K,), uint32
    """
    chars = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("not a COCO RLE string: characters must lie in '0'..'o'")
    is_last = (chars & 0x20) == 0
    if not is_last[-1]:
        raise ValueError("not a COCO RLE string: the last count is truncated")
    group_id = np.concatenate([[0], np.cumsum(is_last)[:-1]])
    first_of_group = np.concatenate([[0], np.flatnonzero(is_last)[:-1] + 1])
    position = np.arange(chars.size) - first_of_group[group_id]
    values = np.zeros(int(is_last.sum()), dtype=np.int64)
    np.add.at(values, group_id, (chars & 0x1F) << (_GROUP_BITS * position))
    ends = np.flatnonzero(is_last)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (_GROUP_BITS * (position[ends[negative]] + 1))
    counts = values.copy()
    counts[2::2] = np.cumsum(values[2::2])
    counts[1::2] = np.cumsum(values[1::2])
    return counts.astype(np.uint32)
