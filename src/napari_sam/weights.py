"""Known checkpoints, the download cache and safe loading of SAM weights.

Three steps turn a name into a model:

1. :func:`fetch_checkpoint` resolves a known name (``"vit_b"``) to a verified
   file in the cache, downloading it if needed, or accepts a local path.
2. :func:`read_state_dict` reads the file with ``weights_only=True`` and
   unwraps the accepted checkpoint layouts into a plain state dict.
3. :func:`load_state_dict_into` loads it strictly, explaining any mismatch;
   :func:`infer_config` picks the registered architecture of an unknown file.

:func:`load_model` does all three. Nothing here imports napari. The parsing
checks live in :mod:`napari_sam._state_dict`, the architecture rules in
:mod:`napari_sam._architecture`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ._architecture import infer_config
from ._state_dict import (
    ArchitectureMismatchError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnknownArchitectureError,
    _read_state_dict,
    load_state_dict_into,
    read_state_dict,
)
from .data import DEMO_CHECKPOINT

if TYPE_CHECKING:
    import torch

    from .models.sam import Sam

__all__ = [
    "KNOWN_CHECKPOINTS",
    "ArchitectureMismatchError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointUnavailableError",
    "CheckpointVerificationError",
    "UnknownArchitectureError",
    "cache_dir",
    "fetch_checkpoint",
    "infer_config",
    "load_model",
    "load_state_dict_into",
    "read_state_dict",
]

CACHE_ENV_VAR = "NAPARI_SAM_CACHE"
ProgressCallback = Callable[[int, int | None], object]
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
_STAMP_SUFFIX = ".verified"


class CheckpointUnavailableError(CheckpointError):
    """A known checkpoint is not in the cache and could not be downloaded."""


class CheckpointVerificationError(CheckpointError):
    """A downloaded or cached file does not have the expected size or sha256."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A published checkpoint: where it comes from and how to recognise it.

    Attributes
    ----------
    name : str
        Name accepted by :func:`fetch_checkpoint` and :func:`load_model`.
    config : str
        Key of the architecture in :data:`napari_sam.registry.MODEL_CONFIGS`.
    url : str
        Download address.
    filename : str
        File name inside the cache directory.
    sha256 : str or None
        Hex digest of the file; None where no digest is known for certain
        (then the file is checked by size, where known, and by loading it).
    size : int or None
        Size in bytes, None where not known for certain.
    note : str
        One line on what the checkpoint is for.
    """

    name: str
    config: str
    url: str
    filename: str
    sha256: str | None
    size: int | None
    note: str = ""


#: Checkpoints that ship inside the package (no download): name -> file.
PACKAGED_CHECKPOINTS: dict[str, Path] = {"demo": DEMO_CHECKPOINT}

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

KNOWN_CHECKPOINTS: dict[str, CheckpointInfo] = {
    "vit_b": CheckpointInfo(
        "vit_b",
        "vit_b",
        _SAM_URL + "sam_vit_b_01ec64.pth",
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
        "SAM ViT-B (91M parameters): the fastest official SAM.",
    ),
    "vit_l": CheckpointInfo(
        "vit_l",
        "vit_l",
        _SAM_URL + "sam_vit_l_0b3195.pth",
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
        "SAM ViT-L (308M parameters).",
    ),
    "vit_h": CheckpointInfo(
        "vit_h",
        "vit_h",
        _SAM_URL + "sam_vit_h_4b8939.pth",
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
        "SAM ViT-H (636M parameters): the most accurate, the slowest.",
    ),
    "vit_t": CheckpointInfo(
        "vit_t",
        "vit_t",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "mobile_sam.pt",
        None,  # no digest known for certain: checked by loading instead
        None,
        "MobileSAM (TinyViT encoder, about 10M parameters): fast on a CPU.",
    ),
}


def cache_dir() -> Path:
    """Directory where downloaded checkpoints are kept.

    The environment variable ``NAPARI_SAM_CACHE`` wins when set (``~`` is
    expanded); otherwise ``platformdirs.user_cache_dir("napari-sam-lab")``
    followed by ``checkpoints``. The directory is not created here.

    Returns
    -------
    Path
        The checkpoint cache directory.
    """
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sam-lab")) / "checkpoints"


_default_cache_dir = cache_dir  # fetch_checkpoint's parameter shadows the public name


def _resolve(name_or_path: str | os.PathLike[str] | CheckpointInfo) -> CheckpointInfo | Path:
    """A known checkpoint for a name, else the path; errors for anything else."""
    if isinstance(name_or_path, CheckpointInfo):
        return name_or_path
    if isinstance(name_or_path, str) and name_or_path in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[name_or_path]
    if isinstance(name_or_path, str) and name_or_path in PACKAGED_CHECKPOINTS:
        packaged = PACKAGED_CHECKPOINTS[name_or_path]
        if packaged.is_file():
            return packaged
        raise CheckpointNotFoundError(
            f"the {name_or_path!r} model is not in this installation (no file at "
            f"{str(packaged)!r}): this build of napari-sam-lab ships without it. Train it "
            "with scripts/train_demo.py (see docs/demo-model.md), or use a published "
            f"checkpoint ({', '.join(sorted(KNOWN_CHECKPOINTS))}) or a local file"
        )
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            "name_or_path: expected a checkpoint name, a path or a CheckpointInfo, "
            f"got {type(name_or_path).__name__}"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(KNOWN_CHECKPOINTS))
    raise CheckpointNotFoundError(
        f"no checkpoint file at {str(path)!r}, and {str(name_or_path)!r} is not a known "
        f"checkpoint name (known: {known})"
    )


def _how_to_get(info: CheckpointInfo, directory: Path) -> str:
    """Instructions for putting the checkpoint in place by hand."""
    facts = []
    if info.size is not None:
        facts.append(f"{info.size:,} bytes")
    if info.sha256 is not None:
        facts.append(f"sha256 {info.sha256}")
    detail = f" ({', '.join(facts)})" if facts else ""
    return (
        f"To work offline, download {info.url} elsewhere and copy it to "
        f"{directory / info.filename}{detail}; the cache directory is {directory} "
        f"(set {CACHE_ENV_VAR} to move it). Or pass the path of a local checkpoint "
        f'file instead of the name, e.g. load_model("/path/to/{info.filename}").'
    )


def fetch_checkpoint(
    name_or_path: str | os.PathLike[str] | CheckpointInfo,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    download: bool = True,
) -> Path:
    """Return a verified local file for a checkpoint name, or a local path as is.

    Parameters
    ----------
    name_or_path : str, path or CheckpointInfo
        A key of :data:`KNOWN_CHECKPOINTS` (``"vit_b"``, ``"vit_l"``,
        ``"vit_h"``, ``"vit_t"``), a :class:`CheckpointInfo`, or the path of a
        local file. A string that is a known name is a name, any other string
        a path. Local files are returned unchecked: :func:`read_state_dict`
        validates their content.
    cache_dir : path, optional
        Cache directory; default :func:`cache_dir`.
    progress : callable, optional
        Called as ``progress(done_bytes, total_bytes)`` while downloading,
        first with 0 and last with the full size; ``total_bytes`` is None
        when neither the server nor the catalogue gives a size.
    download : bool
        If False, never touch the network: a checkpoint missing from the
        cache raises :class:`CheckpointUnavailableError`.

    Returns
    -------
    Path
        The checkpoint file.

    Raises
    ------
    CheckpointNotFoundError
        ``name_or_path`` is neither a known name nor an existing file.
    CheckpointUnavailableError
        Offline, HTTP error, interrupted download or ``download=False``; the
        message names the URL, the expected file and where to put it.
    CheckpointVerificationError
        The file has the wrong size or sha256, or does not load; nothing is
        left in the cache.
    """
    resolved = _resolve(name_or_path)
    if isinstance(resolved, Path):
        return resolved
    info = resolved
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = directory / info.filename
    if target.is_file():
        problem = _check_cached(target, info)
        if problem is None:
            return target
        if not download:
            raise CheckpointVerificationError(
                f"cached checkpoint {target} fails verification ({problem}); delete it "
                f"or download again. {_how_to_get(info, directory)}"
            )
        warnings.warn(
            f"{target} fails verification ({problem}); downloading it again", stacklevel=2
        )
    elif not download:
        raise CheckpointUnavailableError(
            f"checkpoint {info.name!r} is not in the cache and downloads are disabled "
            f"(download=False). {_how_to_get(info, directory)}"
        )
    _download(info, directory, progress)
    return target


def _download(info: CheckpointInfo, directory: Path, progress: ProgressCallback | None) -> None:
    """Stream ``info.url`` to a temporary file in ``directory``, verify, rename."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise CheckpointUnavailableError(
            f"cannot write to the cache directory {directory}: {exc}. "
            f"{_how_to_get(info, directory)}"
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(info, directory, out, progress)
        problem = _verify_file(tmp, info, digest)
        if problem is not None:
            raise CheckpointVerificationError(
                f"download of {info.url} failed verification ({problem}); nothing was "
                f"written to the cache. {_how_to_get(info, directory)}"
            )
        target = directory / info.filename
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _write_stamp(target, digest)


def _stream(
    info: CheckpointInfo, directory: Path, out: BinaryIO, progress: ProgressCallback | None
) -> str:
    """Copy the response body to ``out`` in chunks; return its sha256."""
    request = urllib.request.Request(info.url, headers={"User-Agent": "napari-sam-lab"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if None not in (announced, info.size) and announced != info.size:
                raise CheckpointVerificationError(
                    f"the server announces {announced:,} bytes for {info.url}, expected "
                    f"{info.size:,}; nothing was written to the cache. "
                    f"{_how_to_get(info, directory)}"
                )
            total = announced if announced is not None else info.size
            done = 0
            if progress is not None:
                progress(0, total)
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
    else:
        if announced is None or done == announced:
            return digest.hexdigest()
        reason = f"the connection closed after {done:,} of {announced:,} bytes"
    raise CheckpointUnavailableError(
        f"could not download checkpoint {info.name!r} from {info.url}: {reason}. "
        f"{_how_to_get(info, directory)}"
    )


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_file(path: Path, info: CheckpointInfo, digest: str | None) -> str | None:
    """What is wrong with ``path`` for ``info`` (None if nothing).

    Size and sha256 where known; without a known sha256 the file must also
    load as a state dict of the expected architecture.
    """
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        return f"size {size:,} bytes, expected {info.size:,}"
    if info.sha256 is not None:
        digest = digest or _file_sha256(path)
        if digest != info.sha256.lower():
            return f"sha256 {digest}, expected {info.sha256}"
        return None
    try:  # not memory-mapped: the file is renamed or deleted right after
        config = infer_config(_read_state_dict(path, mmap=False), source=str(path))
    except CheckpointError as exc:
        return f"it does not load: {exc}"
    if config.name != info.config:
        return f"it holds a {config.name!r} model, expected {info.config!r}"
    return None


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + _STAMP_SUFFIX)


def _write_stamp(target: Path, digest: str | None) -> None:
    """Remember that ``target`` (this size and mtime) was fully verified."""
    st = target.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache only costs re-hashing
        _stamp_path(target).write_text(json.dumps(stamp))


def _check_cached(target: Path, info: CheckpointInfo) -> str | None:
    """Verify a cached file, trusting a matching stamp instead of re-hashing."""
    st = target.stat()
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        fresh = (stamp["size"], stamp["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        if fresh and (info.sha256 is None or stamp["sha256"] == info.sha256.lower()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    problem = _verify_file(target, info, None)
    if problem is None:
        _write_stamp(target, info.sha256.lower() if info.sha256 else None)
    return problem


def load_model(
    name_or_path: str | os.PathLike[str] | CheckpointInfo,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    download: bool = True,
) -> Sam:
    """Build a SAM model with published or local weights, in eval mode.

    Parameters
    ----------
    name_or_path : str, path or CheckpointInfo
        A known checkpoint name (``"vit_b"``, ``"vit_l"``, ``"vit_h"``,
        ``"vit_t"``), fetched with :func:`fetch_checkpoint`; ``"demo"``, the
        small model that ships inside the package; or a local
        checkpoint file, whose architecture is inferred from its keys and
        shapes (:func:`infer_config`).
    device : str or torch.device
        Where the model lives. Default ``"cpu"``.
    cache_dir, progress, download
        As in :func:`fetch_checkpoint`.

    Returns
    -------
    Sam
        The model with the checkpoint loaded strictly.

    Raises
    ------
    ValueError
        ``name_or_path`` names a registered configuration without a published
        checkpoint (such as ``"tiny_vit_b"``): use ``build_model`` for random
        weights.
    CheckpointError
        Any failure to fetch, read or fit the checkpoint (see the subclasses).
    """
    from .registry import MODEL_CONFIGS, build_model, get_config

    published = {**KNOWN_CHECKPOINTS, **PACKAGED_CHECKPOINTS}
    if isinstance(name_or_path, str) and name_or_path not in published:
        if name_or_path in MODEL_CONFIGS and not Path(name_or_path).expanduser().is_file():
            raise ValueError(
                f"name_or_path: model {name_or_path!r} has no published checkpoint "
                f"(checkpoints: {', '.join(sorted(published))}); use "
                f"build_model({name_or_path!r}) for random weights, or pass the path "
                "of a checkpoint file"
            )
    resolved = _resolve(name_or_path)
    path = (
        fetch_checkpoint(resolved, cache_dir=cache_dir, progress=progress, download=download)
        if isinstance(resolved, CheckpointInfo)
        else resolved
    )
    state = read_state_dict(path)
    if isinstance(resolved, CheckpointInfo):
        config = get_config(resolved.config)
    else:
        config = infer_config(state, source=str(path))
    model = build_model(config)
    load_state_dict_into(model, state, source=str(path))
    return model.to(device).eval()
