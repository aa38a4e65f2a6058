"""glibc allocator settings that stop the page-fault storm of large tensors.

glibc serves every block above its mmap threshold (at most 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, and trims the heap
top above the trim threshold; each new large tensor then faults its pages
in again, and in a ViT encoder (hundreds of such tensors per image) about
half the wall time can go to the kernel serving those faults.

:func:`tuned_allocator` is a context manager for the duration of a model
call: inside it big blocks come from the heap (``M_MMAP_MAX = 0``) and
freed memory is kept (``M_TRIM_THRESHOLD`` 1 GiB, ``M_TOP_PAD`` 64 MiB),
so one call reuses its own pages. The tuned state outlasts the outermost
block by ``_LINGER_S`` (2 s): a model call that starts within that time
(the next slice of a stack, pre-encoding, the decodes after an encode)
finds the pages of the last one still mapped. Then the usual settings come
back and (unless every block since asked ``release=False``)
``malloc_trim(0)`` hands the freed memory to the operating system, so a
long-running napari process does not keep the working set of its last
call. ViT-B encodes in bf16 on a 2-core Xeon: about 70,000 page faults and
6 % of the time per encode when each starts from a trimmed heap, none when
one follows another within the linger. :func:`release_now` ends a
lingering state at once (the benchmarks call it before timing the
reference, which would otherwise run in our state and on our pages).
The settings are process-wide (``mallopt``); nested and concurrent blocks
are counted, and only the outermost one changes them.

Linux with glibc only; elsewhere, or with ``NAPARI_SAM_MALLOC_TUNING=0``,
the context manager does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["allocator_tuning_available", "release_now", "tuned_allocator"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_ENV = "NAPARI_SAM_MALLOC_TUNING"


@dataclass(frozen=True)
class _Settings:
    """Values for ``mallopt`` (bytes, or a count for ``mmap_max``)."""

    mmap_max: int
    trim_threshold: int
    top_pad: int
    mmap_threshold: int | None


# While a model runs: no mmap for big blocks, keep what is freed.
_TUNED = _Settings(mmap_max=0, trim_threshold=1 << 30, top_pad=64 << 20, mmap_threshold=None)
# Afterwards: glibc's defaults, with the mmap and trim thresholds where glibc's
# dynamic adjustment settles for programs that free large blocks (32 and 64 MiB
# on 64-bit); any mallopt call switches that adjustment off for good.
_NORMAL = _Settings(
    mmap_max=65536, trim_threshold=64 << 20, top_pad=128 << 10, mmap_threshold=32 << 20
)

# How long the tuned state and the freed pages outlast the last block (seconds).
_LINGER_S = 2.0

_lock = threading.Lock()
_depth = 0
_release_pending = False
_tuned_now = False  # _TUNED applied: inside blocks, and while lingering after them
_timer: threading.Timer | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc's ``mallopt``/``malloc_trim``, or None on other platforms."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def allocator_tuning_available() -> bool:
    """Whether :func:`tuned_allocator` changes anything here (glibc, not disabled)."""
    return os.environ.get(_ENV, "1").strip() != "0" and _libc() is not None


def _apply(libc: ctypes.CDLL, settings: _Settings) -> None:
    libc.mallopt(_M_MMAP_MAX, settings.mmap_max)
    libc.mallopt(_M_TRIM_THRESHOLD, settings.trim_threshold)
    libc.mallopt(_M_TOP_PAD, settings.top_pad)
    if settings.mmap_threshold is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, settings.mmap_threshold)


@contextmanager
def tuned_allocator(*, release: bool = True) -> Iterator[bool]:
    """Keep freed memory for reuse inside the block; give it back afterwards.

    Parameters
    ----------
    release : bool, optional
        Call ``malloc_trim(0)`` when the tuned state ends (``_LINGER_S``
        after the outermost block, unless another block starts in between;
        default), so the pages of this call go back to the system; False
        for short calls (one decoder pass) whose small working set is
        better kept warm. With overlapping or lingering blocks, the trim
        happens when the state ends if any of them asked for it.

    Yields
    ------
    bool
        Whether the settings are in effect (False where tuning is not
        available or ``NAPARI_SAM_MALLOC_TUNING=0``).

    Examples
    --------
    >>> with tuned_allocator():  # doctest: +SKIP
    ...     features = encoder(x)
    """
    global _depth, _release_pending, _tuned_now, _timer
    if not allocator_tuning_available():
        yield False
        return
    libc = _libc()
    with _lock:
        _depth += 1
        if _timer is not None:  # a lingering state: keep it, and its pages
            _timer.cancel()
            _timer = None
        if not _tuned_now:
            _apply(libc, _TUNED)
            _tuned_now = True
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            _release_pending = _release_pending or release
            if _depth == 0:
                if _LINGER_S <= 0:
                    _end(libc)
                else:
                    timer = threading.Timer(_LINGER_S, lambda: _linger_over(libc, timer))
                    timer.daemon = True
                    _timer = timer
                    timer.start()


def _end(libc: ctypes.CDLL) -> None:
    """Back to the usual settings and, if asked since, trim (``_lock`` held, no block open)."""
    global _release_pending, _tuned_now, _timer
    _timer = None
    _apply(libc, _NORMAL)
    _tuned_now = False
    if _release_pending:
        libc.malloc_trim(0)
    _release_pending = False


def _linger_over(libc: ctypes.CDLL, timer: threading.Timer) -> None:
    """The linger's timer: end the tuned state unless a block started since."""
    with _lock:
        if _depth == 0 and _timer is timer and _tuned_now:
            _end(libc)


def release_now() -> None:
    """End a lingering tuned state now: the usual settings, and the pending trim.

    Does nothing inside a :func:`tuned_allocator` block or when nothing
    lingers. For measurements that must not run in the state (and on the
    freed pages) of the last model call, and for tests.
    """
    global _timer
    libc = _libc()
    with _lock:
        if _timer is not None:
            _timer.cancel()
        if _depth == 0 and _tuned_now and libc is not None:
            _end(libc)
