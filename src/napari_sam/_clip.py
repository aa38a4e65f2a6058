"""Loading CLIP through ``open_clip``, with SAM's cache and offline rules.

:func:`load_clip` turns ``(name, pretrained)`` into a frozen :class:`ClipModel`.
Weights are looked up in the cache first (``cache_dir() / "clip"``, the
Hugging Face layout that a download writes there, or a flat file put there
by hand); only when they are missing does it touch the network, after a
three-second reachability check, so that an offline machine gets a clear
:class:`ClipWeightsUnavailableError` at once instead of the hub's minute of
retries. ``open_clip`` is imported here, lazily, with an install hint.

The public names are re-exported by :mod:`napari_sam.text`.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .weights import CheckpointFormatError, CheckpointUnavailableError, cache_dir

INSTALL_HINT = "pip install napari-sam-lab[clip]"
LOCAL_DIR_PREFIX = "local-dir:"
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_FLAT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class ClipWeightsUnavailableError(CheckpointUnavailableError):
    """CLIP weights are neither in the cache nor downloadable (offline, or refused)."""


def _block_triton_if_it_would_crash() -> None:
    """Make ``import triton`` fail cleanly when it would crash this process.

    open_clip imports torchvision, which imports torch._dynamo, which imports
    triton if installed. When a system libLLVM is already loaded (Mesa's
    llvmpipe OpenGL, e.g. napari under Xvfb, in a VM or over remote desktop),
    triton's own LLVM clashes with it and the import segfaults. Triton can
    then never be imported in this process anyway, so torch is told it is
    absent (``sys.modules["triton"] = None``); eager CPU/GPU inference does
    not need it.
    """
    if "triton" in sys.modules:
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return
    if any("/libLLVM" in line for line in maps.splitlines()):
        sys.modules["triton"] = None


def import_open_clip() -> Any:
    """``open_clip``, or an ImportError saying what to install."""
    if "open_clip" not in sys.modules:
        _block_triton_if_it_would_crash()
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(
            f"text prompts need CLIP from the open_clip_torch package: {INSTALL_HINT} "
            "(or pip install open_clip_torch)"
        ) from exc
    return open_clip


@dataclass(frozen=True, eq=False)
class ClipModel:
    """A frozen CLIP model, its preprocessing and its tokenizer.

    Attributes
    ----------
    model : torch.nn.Module
        The open_clip model, eval mode, no gradients.
    preprocess : callable
        open_clip's inference transform (PIL image -> Tensor (3, S, S)); text
        prompts prepare crops themselves (:mod:`napari_sam._text_crops`).
    tokenizer : callable
        ``tokenizer(list of str) -> Tensor (T, context_length)`` of int.
    name : str
        Architecture (``"ViT-B-32"``) or ``"local-dir:..."``.
    pretrained : str or None
        Tag, weights file or None for random weights.
    image_size : int
        Side ``S`` of CLIP's square input.
    mean, std : tuple of float
        Per-channel normalisation of 0..1 RGB.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    pretrained: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(logit_scale)`` (100 for trained models)."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings.

        Parameters
        ----------
        pixels : Tensor of shape (B, 3, S, S), float32
            Normalised with :attr:`mean` and :attr:`std`.

        Returns
        -------
        Tensor of shape (B, D), float32, on the CPU
        """
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device), normalize=True)
        return features.float().cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings, ``Tensor (T, D)`` float32 on the CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens, normalize=True)
        return features.float().cpu()


def clip_cache_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where CLIP weights are cached: ``directory`` or ``cache_dir() / "clip"``."""
    if directory is not None:
        return Path(directory).expanduser()
    return cache_dir() / "clip"


def _flat_names(name: str, tag: str) -> list[str]:
    return [f"{name}-{tag}{suffix}" for suffix in _FLAT_SUFFIXES]


def _hf_repo_files(cfg: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # "org/repo/" -> default file names
    return repo, ((filename,) if filename else _HF_FILES)


def find_cached_weights(name: str, tag: str, cfg: dict[str, Any], directory: Path) -> Path | None:
    """A cached weights file for ``name``/``tag``, looking only at the disk."""
    for flat in _flat_names(name, tag):
        if (directory / flat).is_file():
            return directory / flat
    hub = _hf_repo_files(cfg)
    if hub is not None:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, files = hub
            for filename in files:
                found = try_to_load_from_cache(repo, filename, cache_dir=directory)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = cfg.get("url") or ""
    if url and (directory / os.path.basename(url)).is_file():
        return directory / os.path.basename(url)
    return None


def _download_urls(cfg: dict[str, Any]) -> list[str]:
    """Where the weights come from: the hub file (open_clip prefers it), else the URL.

    OpenAI's own ``.pt`` URL is a TorchScript archive, refused by a safe
    load, so it is named only when there is no hub copy.
    """
    hub = _hf_repo_files(cfg)
    if hub is not None:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return [f"{endpoint}/{hub[0]}/resolve/main/{hub[1][0]}"]
    return [cfg["url"]] if cfg.get("url") else []


def _how_to_get(name: str, tag: str, cfg: dict[str, Any], directory: Path) -> str:
    urls = _download_urls(cfg)
    fetch = " or ".join(urls) if urls else f"the {name} / {tag} weights"
    target = directory / _flat_names(name, tag)[0]
    gelu = ", quick_gelu=True" if cfg.get("quick_gelu") else ""
    return (
        f"To work offline, download {fetch} elsewhere and copy it to {target} (a .bin or "
        f".pth with the same stem also works); the CLIP cache is {directory} (set "
        f"NAPARI_SAM_CACHE to move the whole cache). Or pass the file itself: "
        f'load_clip("{name}", pretrained="/path/to/weights.safetensors"{gelu}).'
    )


def _probe_host(cfg: dict[str, Any]) -> str | None:
    """Host the download would contact first (None when it cannot be told)."""
    urls = _download_urls(cfg)
    return urllib.parse.urlparse(urls[0]).hostname if urls else None


def _offline_reason(cfg: dict[str, Any]) -> str | None:
    """Why a download cannot work right now (None: it may)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None  # a proxy decides; let the download try
    host = _probe_host(cfg)
    if host is None:
        return "no download address is known for these weights"
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot reach {host}: {exc}"


def resolve_weights(
    open_clip: Any, name: str, tag: str, directory: Path, *, download: bool
) -> tuple[Path, dict[str, Any]]:
    """The local weights file of a known tag (downloaded if needed), and its config."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = find_cached_weights(name, tag, cfg, directory)
    if cached is not None:
        return cached, cfg
    if not download:
        raise ClipWeightsUnavailableError(
            f"CLIP weights {name!r} / {tag!r} are not in the cache and downloads are "
            f"disabled (download=False). {_how_to_get(name, tag, cfg, directory)}"
        )
    reason = _offline_reason(cfg)
    if reason is None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            found = open_clip.pretrained.download_pretrained(cfg, cache_dir=str(directory))
        except Exception as exc:  # the hub and urllib raise many kinds
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            if found and Path(found).is_file():
                return Path(found), cfg
            reason = "the download returned no file"
    raise ClipWeightsUnavailableError(
        f"CLIP weights {name!r} / {tag!r} are not in the cache and could not be downloaded "
        f"({reason}). {_how_to_get(name, tag, cfg, directory)}"
    )


def _check_name(open_clip: Any, name: str) -> None:
    if not isinstance(name, str) or name not in open_clip.list_models():
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-B"))
        raise ValueError(
            f"name: expected an open_clip architecture (e.g. {known}; see "
            f"open_clip.list_models()), got {name!r}"
        )


def _resolve(
    open_clip: Any, name: str, pretrained: str | None, directory: Path, download: bool
) -> tuple[str, str | None, dict[str, Any]]:
    """``(model_name for open_clip, weights file or None, pretrained config)``."""
    if pretrained is not None and pretrained.startswith(LOCAL_DIR_PREFIX):
        folder = Path(pretrained[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"pretrained: {pretrained!r} needs a folder with open_clip_config.json "
                f"(and weights); no such file: {folder / 'open_clip_config.json'}"
            )
        return LOCAL_DIR_PREFIX + str(folder), None, {}
    _check_name(open_clip, name)
    if pretrained is None:
        return name, None, {}
    if open_clip.get_pretrained_cfg(name, pretrained):
        path, cfg = resolve_weights(open_clip, name, pretrained, directory, download=download)
        return name, str(path), cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        return name, str(path), {}
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    raise ValueError(
        f"pretrained: expected a tag of {name} ({tags}), a weights file, "
        f"'local-dir:<folder>' or None; got {pretrained!r} (no such file)"
    )


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = {
        "mean": "image_mean",
        "std": "image_std",
        "interpolation": "image_interpolation",
        "resize_mode": "image_resize_mode",
    }
    return {arg: cfg[key] for key, arg in keys.items() if key in cfg}


def load_clip(
    name: str = "ViT-B-32",
    pretrained: str | os.PathLike[str] | None = "openai",
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    quick_gelu: bool | None = None,
) -> ClipModel:
    """Load a CLIP model for text prompts.

    Parameters
    ----------
    name : str
        open_clip architecture, e.g. ``"ViT-B-32"`` (fast), ``"ViT-B-16"``,
        ``"ViT-L-14"`` (better, slower). Ignored with ``"local-dir:..."``.
    pretrained : str, path or None
        A pretrained tag of ``name`` (``"openai"``, ``"laion2b_s34b_b79k"``,
        ...; see ``open_clip.list_pretrained_tags_by_model(name)``), fetched
        into the cache; a local weights file; ``"local-dir:<folder>"`` with
        ``open_clip_config.json`` and weights; or None for random weights
        (tests, benchmarks).
    device : str or torch.device
        Where the model lives.
    cache_dir : path, optional
        Default ``napari_sam.weights.cache_dir() / "clip"``.
    download : bool
        If False, never touch the network.
    quick_gelu : bool, optional
        Use QuickGELU activations. Default: what the tag was trained with
        (True for the OpenAI weights); for a weights file, False unless
        ``name`` ends with ``-quickgelu``. Pass True for OpenAI weights
        given as a file: the wrong activation silently degrades the model.

    Returns
    -------
    ClipModel

    Raises
    ------
    ImportError
        open_clip_torch is not installed (the message says what to install).
    ValueError
        Unknown architecture, or a ``pretrained`` that is no tag and no file.
    ClipWeightsUnavailableError
        The weights are not cached and cannot be downloaded (raised within
        seconds when offline); the message names the file to fetch and where
        to put it.
    CheckpointFormatError
        The weights file does not load into the architecture.
    """
    open_clip = import_open_clip()
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    directory = clip_cache_dir(cache_dir)
    model_name, weights, cfg = _resolve(open_clip, name, pretrained, directory, download)
    if quick_gelu is None:
        quick_gelu = bool(cfg.get("quick_gelu", False))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            device=device,
            force_quick_gelu=quick_gelu,
            cache_dir=str(directory),
            weights_only=True,
            **_preprocess_overrides(cfg),
        )
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as exc:
        if weights is None:
            raise
        hint = (
            " It looks like a TorchScript archive (OpenAI's .pt release), which is not "
            "loaded for safety: use the .safetensors file of the same weights."
            if "TorchScript" in str(exc)
            else ""
        )
        raise CheckpointFormatError(
            f"cannot load CLIP weights {weights} into {model_name}: {exc}.{hint}",
            reason="unreadable",
            path=Path(weights),
        ) from exc
    model.eval().requires_grad_(False)
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        name=model_name,
        pretrained=pretrained,
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
    )
