"""Measurement helpers shared by the benchmarks: wall time medians, peak RSS, reports.

Peak memory is the process's resident-set high-water mark (``VmHWM``) above
the RSS just before the measured call; Linux lets a process reset its own
high-water mark (``/proc/self/clear_refs``), so both implementations can be
measured in the same process, one call at a time.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Measurement:
    """One timed call: wall seconds and peak RSS above the pre-call RSS (MiB)."""

    seconds: float
    peak_mib: float | None


def _end_lingering_allocator_state() -> None:
    """End napari_sam's lingering tuned heap, so no call runs in the last one's state.

    Our allocator tuning outlasts a model call by two seconds
    (:mod:`napari_sam.allocator`); a reference call timed within them would
    run with our settings, on our freed pages, and our next call would reuse
    them. Each measured call starts from the usual state instead: an encode
    after an idle moment, not the next slice of a stack.
    """
    try:
        from napari_sam.allocator import release_now
    except ImportError:  # a benchmark of the reference alone
        return
    release_now()


def measure(fn: Callable[[], object]) -> Measurement:
    """Run ``fn`` once from the usual allocator state; return wall time and peak RSS increase."""
    _end_lingering_allocator_state()
    gc.collect()
    can_peak = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) / 1024 if can_peak else None
    return Measurement(seconds, peak)


@dataclass(frozen=True)
class Summary:
    """Medians over repeated measurements of one implementation."""

    median_s: float
    runs_s: list[float]
    peak_mib: float | None


def summarize(runs: list[Measurement]) -> Summary:
    peaks = [r.peak_mib for r in runs if r.peak_mib is not None]
    return Summary(
        median_s=statistics.median(r.seconds for r in runs),
        runs_s=[round(r.seconds, 4) for r in runs],
        peak_mib=max(peaks) if peaks else None,
    )


def alternate(
    ours: Callable[[], object], reference: Callable[[], object], *, repeats: int
) -> tuple[Summary, Summary]:
    """Time ``ours`` and ``reference`` alternately, ``repeats`` times each."""
    mine: list[Measurement] = []
    theirs: list[Measurement] = []
    for _ in range(repeats):
        mine.append(measure(ours))
        theirs.append(measure(reference))
    return summarize(mine), summarize(theirs)


def trimmed_peak(fn: Callable[[], object]) -> float | None:
    """Peak RSS increase (MiB) of one call of ``fn``, started from a trimmed heap.

    ``malloc_trim(0)`` first returns the memory freed by earlier calls (of
    either implementation), so the call cannot reuse another's pages and
    look smaller than it is. Linux/glibc only (None elsewhere).
    """
    import ctypes

    _end_lingering_allocator_state()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return measure(fn).peak_mib


def alternate_all(calls: dict[str, Callable[[], object]], *, repeats: int) -> dict[str, Summary]:
    """Time every call of ``calls`` in turn (a, b, c, a, b, c, ...), ``repeats`` times each."""
    runs: dict[str, list[Measurement]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            runs[name].append(measure(fn))
    return {name: summarize(r) for name, r in runs.items()}


def as_dict(summary: Summary) -> dict:
    return asdict(summary)


def run_context() -> dict:
    """What a timing depends on besides the code: torch, threads, load, OpenMP wait policy."""
    import os

    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }


def write_report(report: dict, path: Path) -> None:
    """Write ``report`` as indented JSON to ``path`` (folders made as needed) and print it."""
    text = json.dumps(report, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
