"""Reading SAM state dicts safely and matching them to registered architectures.

The public names are re-exported by :mod:`napari_sam.weights`; import them
from there. Nothing here touches the network. Recognising architectures is
the job of :mod:`napari_sam._architecture`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

_WRAPPER_KEYS = ("model", "state_dict", "model_state")
_STRIP_PREFIX = "sam."
_SHOW_KEYS = 10


class CheckpointError(Exception):
    """Base class: a checkpoint cannot be fetched, read or loaded."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the given path (and not a known name)."""


class CheckpointFormatError(CheckpointError):
    """The file is not a safely loadable SAM state dict.

    Attributes
    ----------
    reason : str
        Which case: ``"truncated"``, ``"html"``, ``"lfs_pointer"``,
        ``"unsafe_pickle"``, ``"not_state_dict"`` or ``"unreadable"``.
    path : Path or None
        The offending file.
    """

    def __init__(self, message: str, *, reason: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


class ArchitectureMismatchError(CheckpointError):
    """The state dict does not fit the model (missing/unexpected keys, shapes).

    Attributes
    ----------
    missing, unexpected : tuple of str
        Keys the model needs but the state lacks, and the reverse.
    mismatched : tuple of (str, tuple, tuple)
        ``(key, checkpoint_shape, model_shape)`` for keys of different shape.
    suggestion : str or None
        Registered architecture the state looks like, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...],
        unexpected: tuple[str, ...],
        mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...],
        suggestion: str | None,
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.suggestion = suggestion


class UnknownArchitectureError(CheckpointError):
    """The state dict matches no registered model configuration."""


def _sniff(path: Path) -> tuple[str, str] | None:
    """``(reason, explanation)`` for files that are recognisably not checkpoints."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if size == 0:
        return "truncated", "the file is empty (0 bytes)"
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "html", (
            "it is an HTML page, not a checkpoint: the download returned an error or "
            "login page instead of the file"
        )
    if text.startswith(b"version https://git-lfs"):
        return "lfs_pointer", (
            "it is a Git LFS pointer, not the weights: fetch the real file with "
            "`git lfs pull` or download it directly"
        )
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "truncated", (
            f"it is truncated ({size:,} bytes; the zip central directory at the end of "
            "a torch file is missing): the download or copy was cut short"
        )
    return None


def _torch_load(path: Path, *, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` with failures sorted into reasons."""
    import torch

    mmap = mmap and zipfile.is_zipfile(path)  # legacy (non-zip) files cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "ran out of input" in msg.lower():
            raise _format_error(
                path, "truncated", "it is truncated (the pickle ends early)"
            ) from exc
        found = re.search(r"(Unsupported global|unsupported GLOBAL)[^\n]*", msg)
        detail = found.group(0) if found else msg.strip().splitlines()[0]
        raise _format_error(
            path,
            "unsafe_pickle",
            "it contains pickled Python objects whose loading needs code execution "
            f"(torch says: {detail}); it was refused because weights are read with "
            "weights_only=True. If you trust the file, re-save only its tensors in a "
            "trusted session, e.g. torch.save(torch.load(path, weights_only=False)"
            "['model_state'], 'plain.pt'); for micro-sam training checkpoints use "
            "micro_sam.util.export_custom_sam_model",
        ) from exc
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        msg = str(exc)
        if isinstance(exc, EOFError) or "EOF" in msg or "central directory" in msg:
            raise _format_error(
                path, "truncated", f"it is truncated or corrupted ({msg.splitlines()[0]})"
            ) from exc
        first = msg.splitlines()[0] if msg else type(exc).__name__
        raise _format_error(path, "unreadable", f"torch.load cannot read it ({first})") from exc


def _format_error(path: Path, reason: str, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"refusing checkpoint {str(path)!r}: {why}.", reason=reason, path=path
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint file safely into a plain state dict.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")``
    (memory-mapped for zip-format files), so no code in it is ever run.

    Accepted forms:

    * a plain state dict ``{"image_encoder.…": Tensor, …}`` (the official
      SAM and MobileSAM releases, micro-sam's exported models);
    * a dict wrapping one under ``"model"``, ``"state_dict"`` or
      ``"model_state"`` (the first of these that holds a mapping); other
      entries are ignored, notably micro-sam's ``"decoder_state"`` (its
      instance-segmentation decoder, which this package does not use) and
      optimizer states;
    * keys prefixed ``"sam."`` (micro-sam's training wrapper) are stripped.

    Parameters
    ----------
    path : str or path
        The checkpoint file.

    Returns
    -------
    dict of str to Tensor
        Parameter name -> tensor, on the CPU.

    Raises
    ------
    CheckpointNotFoundError
        The file does not exist.
    CheckpointFormatError
        With ``reason`` saying which: ``"truncated"`` (zip central directory
        missing, unexpected end of file), ``"html"`` (an HTML error page),
        ``"lfs_pointer"``, ``"unsafe_pickle"`` (needs code execution),
        ``"not_state_dict"`` or ``"unreadable"``.
    """
    return _read_state_dict(path, mmap=True)


def _read_state_dict(path: str | os.PathLike[str], *, mmap: bool) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict`; ``mmap=False`` keeps no handle on the file open."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {str(path)!r}")
    sniffed = _sniff(path)
    if sniffed is not None:
        raise _format_error(path, *sniffed)
    return _unwrap(_torch_load(path, mmap=mmap), path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The plain state dict inside one of the accepted layouts."""
    import torch

    accepted = 'accepted forms: a state dict, or one under "model", "state_dict" or "model_state"'
    if not isinstance(obj, Mapping):
        raise _format_error(
            path, "not_state_dict", f"it holds a {type(obj).__name__}, not a state dict; {accepted}"
        )
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad or not obj:
        what = f"entries that are not tensors: {bad[:_SHOW_KEYS]}" if bad else "no entries"
        raise _format_error(path, "not_state_dict", f"it is not a state dict ({what}); {accepted}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = key.removeprefix(_STRIP_PREFIX)
        if name in state:
            raise _format_error(
                path, "not_state_dict", f"key {name!r} occurs with and without a 'sam.' prefix"
            )
        state[name] = value
    return state


def _listing(label: str, keys: list[str]) -> str:
    more = f", … ({len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return f"{len(keys)} {label} keys: {', '.join(keys[:_SHOW_KEYS])}{more}"


def load_state_dict_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch.

    Parameters
    ----------
    model : nn.Module
        Usually a :class:`~napari_sam.models.sam.Sam`; modified in place.
    state : mapping of str to Tensor
        The weights (official checkpoint key names).
    source : str
        Where the weights came from (a path), for messages.

    Raises
    ------
    ArchitectureMismatchError
        Keys missing or unexpected, or shapes differing. The message lists
        the first ten of each with their counts, and names the registered
        architecture the state looks like, if any.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return
    config = getattr(model, "config", None)
    own = getattr(config, "name", type(model).__name__)
    parts = []
    if missing:
        parts.append(_listing("missing", missing))
    if unexpected:
        parts.append(_listing("unexpected", unexpected))
    if mismatched:
        shown = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in mismatched[:_SHOW_KEYS])
        parts.append(f"{len(mismatched)} shape mismatches: {shown}")
    from ._architecture import infer_config

    try:
        suggestion: str | None = infer_config(state, source=source).name
    except UnknownArchitectureError as exc:
        suggestion, hint = None, f" It matches no registered architecture ({exc})."
    else:
        hint = (
            f" It looks like a {suggestion!r} checkpoint: use load_model(path), which "
            f"picks the architecture from the file, or build_model({suggestion!r}, "
            "checkpoint=path)."
            if suggestion != own
            else ""
        )
    raise ArchitectureMismatchError(
        f"checkpoint {source} does not fit model {own!r}: {'; '.join(parts)}.{hint}",
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        suggestion=suggestion,
    )
