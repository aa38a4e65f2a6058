"""Point added in napari -> mask preview shown: the latency a person feels per click.

A napari ``ViewerModel`` (no window needed) with the plugin's session,
synchronous (``threaded=False``), ViT-B with random weights on a 1024 x 1024
image whose embedding is computed first. Each measurement adds one positive
point to the session's Points layer and stops when the preview Labels layer
holds the new mask: prompt conversion, decoder, upscaling, thresholding and
the layer update, everything between the click and the picture except the
canvas redraw. The points are cleared between measurements.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_preview.py [--clicks 20] [--precision auto]

Writes JSON to ``benchmarks/results/preview_<model>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import run_context, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--precision", nargs="+", default=["auto", "exact"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    import torch
    from napari.components import ViewerModel
    from tests._reference import randomize_

    from napari_sam._napari.session import SamSession
    from napari_sam.registry import build_model

    torch.manual_seed(0)
    model = randomize_(build_model(args.model), seed=0).eval()
    rng = np.random.default_rng(0)
    image_data = rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
    results = {}
    for precision in args.precision:
        viewer = ViewerModel()
        image = viewer.add_image(image_data)
        session = SamSession(viewer, threaded=False, precision=precision)
        session.set_model(model)
        session.set_image(image)
        points = session.points_layer
        times = []
        for i in range(args.clicks + 1):  # the first click warms up (and computes the embedding)
            row, col = rng.integers(args.size // 16, args.size - args.size // 16, 2)
            start = time.perf_counter()
            points.add([row, col])
            elapsed = time.perf_counter() - start
            assert session.preview_layer.data.any() or session.result is not None
            if i:
                times.append(elapsed * 1000)
            session.clear_prompts()
        results[precision] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "max_ms": max(times),
            "clicks": len(times),
        }
        print(precision, results[precision], flush=True)
    report = {
        "benchmark": "point to preview (napari session, synchronous)",
        "model": f"{args.model} (random weights)",
        "image_hw": [args.size, args.size],
        **run_context(),
        "results": results,
    }
    write_report(report, args.out or HERE / "results" / f"preview_{args.model}.json")
    return report


if __name__ == "__main__":
    main()
