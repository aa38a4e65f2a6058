"""Pre-encoding the next slice: the wait at each new slice, and clicks while a prefetch runs.

A napari ``ViewerModel`` with a Qt application (no window) so that the
session's workers run as in napari; ViT-B with random weights on a stack of
1024 x 1024 slices. The person steps through the stack: at each new slice
they wait for its embedding (``slice_wait``), click ``--clicks`` times right
away (point added -> preview written, as ``bench_preview.py``), then stay
long enough for any background work to finish, and move on. Run once with
the session's ``prefetch`` off and once on: with it on, each slice after the
first should be ready on arrival, and the clicks on it run while the next
slice is encoded (``clicks_during_prefetch``; the encoder steps aside
between its layers while a preview is computed, but the layer in flight
shares the CPU). No reference run: the reference has no such mode; the
"off" run is the baseline.

Usage::

    python benchmarks/bench_prefetch.py [--slices 6] [--clicks 6] [--precision auto]

Writes JSON to ``benchmarks/results/prefetch_<model>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import run_context, write_report  # noqa: E402


def _summary(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2),
        "p90": round(values[max(0, math.ceil(0.9 * len(values)) - 1)], 2),
        "max": round(values[-1], 2),
    }


def _walk(session, app, image, args, rng) -> dict:
    """Step through the stack once; the waits (s) and the clicks (ms), split by what ran."""

    def pump_until(condition, timeout=300.0):
        end = time.perf_counter() + timeout
        while not condition():
            if time.perf_counter() > end:
                raise TimeoutError("the session did not get there in time")
            app.processEvents()
            time.sleep(0.005)  # an idle event loop; polling harder would take CPU from the workers

    def ready():
        return session.embeddings.get(image, session.current_plane()) is not None

    viewer = session.viewer
    viewer.dims.set_current_step(0, 0)
    pump_until(lambda: ready() and not session.busy)
    waits, idle, during = [], [], []
    for z in range(1, args.slices):
        start = time.perf_counter()
        viewer.dims.set_current_step(0, z)
        pump_until(ready)
        waits.append(time.perf_counter() - start)
        for _ in range(args.clicks):
            row, col = rng.integers(args.size // 16, args.size - args.size // 16, 2)
            busy = session.embeddings.job is not None
            start = time.perf_counter()
            session.points_layer.add([z, row, col])
            elapsed = (time.perf_counter() - start) * 1000
            assert session.result is not None and session.result.plane.indices[0] == z
            (during if busy else idle).append(elapsed)
            session.clear_prompts()
            app.processEvents()
        pump_until(lambda: not session.busy)  # the person stays on the slice a while
    return {
        "slice_wait_s": _summary(waits),
        "clicks_idle_ms": _summary(idle),
        "clicks_during_prefetch_ms": _summary(during),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--clicks", type=int, default=6)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no window: no OpenGL needed
    import torch
    from napari.components import ViewerModel
    from qtpy.QtWidgets import QApplication
    from tests._reference import randomize_

    from napari_sam._napari.session import SamSession
    from napari_sam.registry import build_model

    app = QApplication.instance() or QApplication([])
    torch.manual_seed(0)
    model = randomize_(build_model(args.model), seed=0).eval()
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (args.slices, args.size, args.size), dtype=np.uint8)
    results = {}
    for prefetch in (False, True):
        viewer = ViewerModel()
        image = viewer.add_image(stack)
        session = SamSession(viewer, threaded=True, precision=args.precision)
        session.set_model(model)
        session.set_image(image)
        session.prefetch = prefetch
        name = "prefetch_on" if prefetch else "prefetch_off"
        results[name] = _walk(session, app, image, args, rng)
        print(name, results[name], flush=True)
        session.close()
    report = {
        "benchmark": "pre-encoding the next slice (napari session, worker threads)",
        "model": f"{args.model} (random weights)",
        "image_hw": [args.size, args.size],
        "precision": args.precision,
        **run_context(),
        "results": results,
    }
    write_report(report, args.out or HERE / "results" / f"prefetch_{args.model}.json")
    return report


if __name__ == "__main__":
    main()
