"""Numeric precision of the pipeline: names, run-time hardware detection, cast weights.

Precisions a caller can ask for:

``"exact"``
    float32 with the reference arithmetic: the results of the parity tests.
``"fp32"``
    float32 (the same computation as ``"exact"``; spelled for symmetry).
``"bf16"``, ``"fp16"``
    Weights and activations in bfloat16 / float16 (softmax and layer-norm
    statistics are accumulated in float32 by the kernels).
``"auto"``
    bfloat16 where the hardware makes it fast, else float32: on CPUs with
    AVX512-BF16 or AMX (``/proc/cpuinfo`` flags on Linux/x86, a timed probe
    elsewhere), bfloat16 on CUDA devices that support it and float16 on older
    ones. On a CPU without fast bfloat16 (most AVX2 laptops) ``"auto"`` is
    float32, so never slower than ``"exact"``.

The environment variable ``NAPARI_SAM_CPU_BF16`` (``0`` or ``1``) overrides
the CPU detection. Half-precision weights are cast once per module, device
and dtype and cached (:func:`cast_module`); the float32 model is left as it
is and keeps serving ``"exact"``.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.common import module_tensors

__all__ = [
    "PRECISIONS",
    "cached_for",
    "cast_module",
    "check_precision",
    "clear_cast_cache",
    "compiled_module",
    "cpu_has_fast_bf16",
    "cpu_has_fast_fp16",
    "inference_module",
    "packs_linears",
    "precision_name",
    "resolve_precision",
]

PRECISIONS: tuple[str, ...] = ("auto", "exact", "fp32", "bf16", "fp16")

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {"exact": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPES["fp16"] = torch.float16
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
_ENV_OVERRIDE = "NAPARI_SAM_CPU_BF16"


# --------------------------------------------------------------------------- detection


def _cpu_flags() -> frozenset[str] | None:
    """The x86 ``flags`` of ``/proc/cpuinfo``, or None where there is no such file/line."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def _probe_speedup(dtype: torch.dtype, size: int = 384, repeats: int = 3) -> float:
    """How many times faster a ``size``-cubed matmul runs in ``dtype`` than in float32."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: kernel selection, first-touch pages
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return best(a, b) / best(a.to(dtype), b.to(dtype))


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether bfloat16 matrix work is fast on this CPU (detected once per process).

    Returns
    -------
    bool
        ``NAPARI_SAM_CPU_BF16`` when set to ``0``/``1``; else, where
        ``/proc/cpuinfo`` lists x86 flags, whether they include
        ``avx512_bf16`` or ``amx_bf16``; else whether a small bfloat16 matmul
        runs at least 1.5 times faster than in float32.
    """
    override = os.environ.get(_ENV_OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1"
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _BF16_FLAGS)
    return _probe_speedup(torch.bfloat16) >= 1.5


@functools.cache
def cpu_has_fast_fp16() -> bool:
    """Whether float16 matrix work is fast on this CPU (AVX512-FP16 or AMX-FP16)."""
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _FP16_FLAGS)
    return _probe_speedup(torch.float16) >= 1.5


def check_precision(precision: str, *, name: str = "precision") -> str:
    """Return ``precision`` if it names a precision, else raise ValueError naming ``name``.

    Parameters
    ----------
    precision : {"auto", "exact", "fp32", "bf16", "fp16"}
        One of :data:`PRECISIONS`.
    name : str, optional
        The parameter it came in as, for the message. Default ``"precision"``.

    Returns
    -------
    str
        ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}; received {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a precision name means on ``device``.

    Parameters
    ----------
    precision : {"auto", "exact", "fp32", "bf16", "fp16"}
        See the module docstring.
    device : torch.device or str
        Where the model runs.

    Returns
    -------
    torch.dtype
        ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Raises
    ------
    ValueError
        If ``precision`` is not one of :data:`PRECISIONS`.
    """
    check_precision(precision)
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = _DTYPES[precision]
    if dtype == torch.float16 and device.type == "cpu" and not cpu_has_fast_fp16():
        warnings.warn(
            "precision='fp16' has no fast path on this CPU and runs far slower than fp32; "
            "use precision='auto' or 'bf16'",
            RuntimeWarning,
            stacklevel=3,
        )
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a floating dtype (ValueError otherwise)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16; received {dtype}") from None


# --------------------------------------------------------------------------- cast weights

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[tuple, Any]]]
_CACHE = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _fingerprint(module: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced, updated in place or moved."""
    tensors = module_tensors(module)
    state = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    return (module.training, state)


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with floating parameters and buffers in ``dtype``.

    The float32 tensors are never duplicated: the deep copy is handed the
    cast tensors through its memo.
    """
    memo: dict[int, object] = {}
    for tensor in module.parameters():
        memo[id(tensor)] = nn.Parameter(tensor.detach().to(dtype), requires_grad=False)
    for tensor in module.buffers():
        memo[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return copy.deepcopy(module, memo)


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its weights in ``dtype``, cast once and cached.

    Parameters
    ----------
    module : nn.Module
        A float32 module (e.g. ``model.image_encoder``).
    dtype : torch.dtype
        Target dtype.

    Returns
    -------
    nn.Module
        ``module`` itself when every floating tensor already has ``dtype``;
        else a cached copy (no gradients), recast when the module's weights
        are replaced, updated in place or moved, or its train/eval mode changes.
        The copy lives as long as ``module``.
    """
    floats = [t for t in module_tensors(module) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return module
    return cached_for(module, ("cast", dtype), lambda: _cast_copy(module, dtype))


def cached_for(module: nn.Module, key: Hashable, build: Callable[[], Any]) -> Any:
    """A value derived from ``module``'s weights, rebuilt only when they change.

    Parameters
    ----------
    module : nn.Module
        Whose weights the value depends on.
    key : hashable
        Names the value among those cached for ``module``.
    build : callable
        ``build()`` computes the value.

    Returns
    -------
    object
        The cached value while the weights, their devices and dtypes and the
        train/eval mode stay the same; else ``build()``'s new value.
    """
    fingerprint = _fingerprint(module)
    with _LOCK:
        hit = _CACHE.setdefault(module, {}).get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    # Built outside the lock: a build may take long (a compile) or nest (a
    # compiled cast module), and other threads keep using their cached values.
    value = build()
    with _LOCK:
        _CACHE.setdefault(module, {})[key] = (fingerprint, value)
    return value


def packs_linears(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether :func:`inference_module` packs linear layers for ``dtype`` on ``device``.

    Only bf16 on a CPU with AMX tiles (where packing was measured to pay) and a
    torch build whose oneDNN packing gives ``F.linear``'s results
    (:mod:`napari_sam.models.packed`).
    """
    from .models.packed import packing_available
    from .models.rel_pos import cpu_has_amx

    return (
        dtype == torch.bfloat16
        and torch.device(device).type == "cpu"
        and cpu_has_amx()
        and packing_available()
    )


def inference_module(module: nn.Module, dtype: torch.dtype, *, rows_hint: int) -> nn.Module:
    """:func:`cast_module`, with linear layers packed for oneDNN where that pays.

    Where :func:`packs_linears` says so (bf16 on a CPU with AMX), a cached
    copy of ``module`` in ``dtype`` whose ``nn.Linear`` layers hold their
    weights pre-packed and whose feed-forward GELUs run inside the first
    linear's kernel (:func:`napari_sam.models.packed.pack_linears`); it
    replaces the plain cast copy (one copy in memory, not two). Elsewhere
    exactly :func:`cast_module`.

    Parameters
    ----------
    module : nn.Module
        A float32 module in eval mode (e.g. ``model.image_encoder``).
    dtype : torch.dtype
        Target dtype.
    rows_hint : int
        Typical rows (tokens) per linear call; picks the packed layout.

    Returns
    -------
    nn.Module
        For inference only; cached and rebuilt as :func:`cast_module`'s copy.
    """
    device = next((t.device for t in module_tensors(module)), torch.device("cpu"))
    if module.training or not packs_linears(dtype, device):
        return cast_module(module, dtype)
    from .models.packed import pack_linears

    return cached_for(
        module,
        ("packed", dtype),
        lambda: pack_linears(_cast_copy(module, dtype), rows_hint=rows_hint),
    )


def compiled_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """:func:`cast_module` wrapped in ``torch.compile`` (shapes fixed), cached the same way.

    Opt-in only: the first call compiles (tens of seconds on a laptop CPU;
    torch's inductor caches kernels on disk, so later processes are faster)
    and needs a C++ compiler at run time. It pays for long sessions (a stack
    of slices) and for the many decoder calls of automatic segmentation.

    Raises
    ------
    RuntimeError
        If no C++ compiler is found (``CXX``, ``c++``, ``g++`` or ``clang++``).
    """
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise RuntimeError(
            "compile=True needs a C++ compiler at run time (torch.compile's CPU backend); "
            "install one (g++ or clang++) or set CXX, or use compile=False"
        )
    from ._clip import _block_triton_if_it_would_crash

    # torch.compile imports triton where installed; in napari on Mesa's llvmpipe
    # that import segfaults, and inductor's CPU backend does not need triton.
    _block_triton_if_it_would_crash()
    return cached_for(
        module,
        ("compiled", dtype),
        lambda: torch.compile(cast_module(module, dtype), dynamic=False),
    )


def clear_cast_cache(module: nn.Module | None = None) -> None:
    """Drop the cached copies and values of ``module`` (of every module if None)."""
    with _LOCK:
        if module is None:
            _CACHE.clear()
        else:
            _CACHE.pop(module, None)
