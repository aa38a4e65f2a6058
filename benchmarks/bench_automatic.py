"""Automatic mask generation: napari-sam-lab against SamAutomaticMaskGenerator.

Both implementations get the same random ViT-B weights (``randomize_`` with
one seed, copied into the reference with ``strict=True``), the same seeded
1024 x 1024 RGB image and a 32 x 32 point grid, in exact fp32, for two
settings: the defaults and all thresholds at 0 (``box_nms_thresh=1``, so
every one of the 3072 masks goes through the post-processing).

Every measurement runs in a fresh subprocess (so one run's retained memory
cannot hide the next one's peak), alternating ours / reference (the order
flips every repetition). Wall time is what the target is about; the CPU
time of the measured process (user + system, all threads) is reported too,
as it is far less disturbed by other work on a shared machine. Peak memory
is the resident-set high-water mark above the RSS just before ``generate``
(see ``_measure.py``). The first
repetition of each setting also checks that the masks are the same: every
mask of either side matched by one of the other's (same prompt point and
crop) at IoU >= 0.99, and the scores' largest differences.

Usage::

    nice python benchmarks/bench_automatic.py [--repeats 2] [--settings default zero]

Writes JSON to ``benchmarks/results/automatic.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import write_report  # noqa: E402

SETTINGS = {
    "default": {},
    "zero": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0},
}


def _worker(args: argparse.Namespace) -> None:
    """One measurement: build, run ``generate`` once, print JSON, save the masks."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(HERE)]
    from _measure import measure
    from tests._reference import randomize_, reference_for

    from napari_sam.automatic import generate_masks
    from napari_sam.registry import build_model

    torch.manual_seed(0)
    model = randomize_(build_model(args.model), seed=0)
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    kwargs = {"points_per_side": args.points_per_side, **SETTINGS[args.setting]}
    if args.worker == "ours":

        def run():
            return generate_masks(model, image, precision=args.precision, **kwargs)

    else:
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(reference_for(model), **kwargs)
        del model

        def run():
            with torch.inference_mode():
                return generator.generate(image)

    out: list = []
    cpu_before = _cpu_seconds()
    m = measure(lambda: out.append(run()))
    cpu = _cpu_seconds() - cpu_before
    (records,) = out
    if args.masks_out:
        _save_masks(records, args.worker, Path(args.masks_out))
    result = {"seconds": m.seconds, "cpu_s": cpu, "peak_mib": m.peak_mib, "n_masks": len(records)}
    print(json.dumps(result))


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (robust to other load)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _save_masks(records: list, impl: str, path: Path) -> None:
    if impl == "ours":
        masks = [r.segmentation for r in records]
        rows = [
            (r.predicted_iou, r.stability_score, *r.point_xy, *r.crop_box_xywh) for r in records
        ]
    else:
        masks = [r["segmentation"] for r in records]
        rows = [
            (r["predicted_iou"], r["stability_score"], *r["point_coords"][0], *r["crop_box"])
            for r in records
        ]
    bits = np.stack([np.packbits(m) for m in masks]) if masks else np.zeros((0, 0), np.uint8)
    shape = masks[0].shape if masks else (0, 0)
    np.savez(path, bits=bits, rows=np.array(rows, dtype=np.float64).reshape(-1, 8), shape=shape)


def _load_masks(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    data = np.load(path)
    return data["bits"], data["rows"], tuple(int(v) for v in data["shape"])


def compare_masks(ours_path: Path, ref_path: Path) -> dict:
    """Match masks by (point, crop) then IoU; report counts, worst IoU, score differences."""
    ours_bits, ours_rows, shape = _load_masks(ours_path)
    ref_bits, ref_rows, _ = _load_masks(ref_path)
    n_pixels = shape[0] * shape[1]
    groups: dict[tuple, list[int]] = {}
    for j, row in enumerate(ref_rows):
        groups.setdefault(tuple(np.round(row[2:], 6)), []).append(j)
    worst_iou, d_iou, d_stab, unmatched = 1.0, 0.0, 0.0, 0
    for i, row in enumerate(ours_rows):
        candidates = groups.get(tuple(np.round(row[2:], 6)), [])
        if not candidates:
            unmatched += 1
            continue
        mask = np.unpackbits(ours_bits[i])[:n_pixels].astype(bool)

        def iou(j, mask=mask):
            other = np.unpackbits(ref_bits[j])[:n_pixels].astype(bool)
            union = np.logical_or(mask, other).sum()
            return 1.0 if union == 0 else np.logical_and(mask, other).sum() / union

        scores = {j: iou(j) for j in candidates}
        j = max(scores, key=scores.get)
        candidates.remove(j)
        worst_iou = min(worst_iou, float(scores[j]))
        d_iou = max(d_iou, abs(row[0] - ref_rows[j][0]))
        if not (np.isnan(row[1]) and np.isnan(ref_rows[j][1])):
            d_stab = max(d_stab, abs(row[1] - ref_rows[j][1]))
    same = len(ours_rows) == len(ref_rows) and unmatched == 0 and worst_iou >= 0.99
    return {
        "n_ours": len(ours_rows),
        "n_reference": len(ref_rows),
        "unmatched": unmatched,
        "worst_matched_iou": worst_iou,
        "max_abs_diff_predicted_iou": d_iou,
        "max_abs_diff_stability_score": d_stab,
        "same_masks": bool(same and d_iou <= 1e-4 and d_stab <= 1e-4),
    }


def _run_worker(impl: str, setting: str, args: argparse.Namespace, masks_out: Path | None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        impl,
        "--setting",
        setting,
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--points-per-side",
        str(args.points_per_side),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
    ]
    if masks_out is not None:
        cmd += ["--masks-out", str(masks_out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{impl}/{setting} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{setting:8s} {impl:10s} {result}", flush=True)
    return result


def _summary(runs: list[dict]) -> dict:
    peaks = [r["peak_mib"] for r in runs if r["peak_mib"] is not None]
    cpu = [r["cpu_s"] for r in runs if "cpu_s" in r]
    return {
        "median_s": statistics.median(r["seconds"] for r in runs),
        "runs_s": [round(r["seconds"], 2) for r in runs],
        "median_cpu_s": statistics.median(cpu) if cpu else None,
        "runs_cpu_s": [round(c, 2) for c in cpu],
        "peak_mib_median": statistics.median(peaks) if peaks else None,
        "peak_mib_max": max(peaks) if peaks else None,
        "peak_mib_runs": [round(p) for p in peaks],
        "n_masks": runs[0]["n_masks"],
    }


def paired_ratios(ours: list[dict], reference: list[dict]) -> dict:
    """Reference / ours wall (and CPU) time of each repetition, and their medians."""
    wall = [r["seconds"] / o["seconds"] for o, r in zip(ours, reference, strict=True)]
    cpu = [r["cpu_s"] / o["cpu_s"] for o, r in zip(ours, reference, strict=True) if "cpu_s" in o]
    return {
        "wall": [round(v, 2) for v in wall],
        "wall_median": statistics.median(wall),
        "cpu": [round(v, 2) for v in cpu],
        "cpu_median": statistics.median(cpu) if cpu else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        default="exact",
        choices=["exact", "auto", "fp32", "bf16"],
        help="ours only (the reference is fp32)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "automatic.json")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--masks-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    started = time.time()
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {
        s: {"ours": [], "reference": []} for s in args.settings
    }
    checks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for setting in args.settings:
                order = ("ours", "reference") if rep % 2 == 0 else ("reference", "ours")
                paths = {impl: Path(tmp) / f"{setting}-{impl}.npz" for impl in order}
                for impl in order:
                    keep = paths[impl] if rep == 0 else None
                    runs[setting][impl].append(_run_worker(impl, setting, args, keep))
                if rep == 0:
                    checks[setting] = compare_masks(paths["ours"], paths["reference"])
                    print(setting, checks[setting], flush=True)

    results = {}
    for setting in args.settings:
        ours, ref = _summary(runs[setting]["ours"]), _summary(runs[setting]["reference"])
        entry = {
            "kwargs": {"points_per_side": args.points_per_side, **SETTINGS[setting]},
            "ours": ours,
            "reference": ref,
            # each repetition's two runs are adjacent in time: their ratio is the
            # least disturbed by the machine's load drifting between repetitions
            "speedup_pairs": paired_ratios(runs[setting]["ours"], runs[setting]["reference"]),
            "speedup": ref["median_s"] / ours["median_s"],
            "speedup_cpu_time": (
                ref["median_cpu_s"] / ours["median_cpu_s"] if ours["median_cpu_s"] else None
            ),
            "masks": checks[setting],
        }
        if ours["peak_mib_median"] is not None and ref["peak_mib_median"]:
            entry["peak_ratio_ours_over_reference"] = {
                "median": ours["peak_mib_median"] / ref["peak_mib_median"],
                "max": ours["peak_mib_max"] / ref["peak_mib_max"],
            }
        results[setting] = entry

    import torch

    report = {
        "benchmark": "automatic",
        "model": f"{args.model} (random weights, randomize_ seed 0)",
        "image_hw": [args.size, args.size],
        "grid": f"{args.points_per_side} x {args.points_per_side}",
        "precision": f"ours {args.precision}, reference fp32",
        "repeats": args.repeats,
        "isolation": "one subprocess per measurement, alternating ours / reference",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "machine": platform.processor() or platform.machine(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "wall_minutes": round((time.time() - started) / 60, 1),
        "settings": results,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
