"""Encoder and prompt-to-mask speed: napari-sam-lab against the reference, one process.

Both implementations get the same random weights (ours copied into the
reference's ``Sam`` with ``strict=True``) and the same 1024 x 1024 RGB image.
Calls alternate (ours in each precision, then the reference, again ...)
and medians are compared; peak RSS is the high-water mark above the RSS
just before each call. Auto-vs-exact agreement is the mean mask IoU over
random click and box prompts (random weights: a consistency check, not a
quality measure).

Usage::

    python benchmarks/bench_predictor.py [--model vit_b] [--precision auto exact]
        [--repeats 3] [--prompt-repeats 20] [--tuned-reference] [--out PATH]

Writes JSON (medians, every run, ratios, peak RSS, machine load) to
``benchmarks/results/predictor_<model>.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import alternate_all, as_dict, measure, trimmed_peak

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    """CPU model, relevant flags, cores, load average, threads, what ``auto`` means here."""
    from napari_sam.precision import _cpu_flags, resolve_precision

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags() or frozenset()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    return {
        "cpu": model,
        "flags": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "auto_dtype": str(resolve_precision("auto")).removeprefix("torch."),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "NAPARI_SAM_MALLOC_TUNING": os.environ.get("NAPARI_SAM_MALLOC_TUNING", "(default: on)"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agreement(model, embeddings: dict, image_hw: tuple[int, int], count: int = 8) -> dict:
    """Mean and min mask IoU of each precision against ``exact`` (clicks, boxes)."""
    import napari_sam as ns

    rng = np.random.default_rng(1)
    h, w = image_hw
    clicks = rng.uniform([0, 0], [w - 1, h - 1], size=(count, 2))
    corners = rng.uniform([0, 0], [w / 2, h / 2], size=(count, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(64, w / 2, size=(count, 2))], axis=1)

    def masks(emb, kind: str, i: int) -> np.ndarray:
        if kind == "click":
            pred = ns.predict_masks(model, emb, points_xy=clicks[i : i + 1], point_labels=[1])
            return pred.best().masks[0, 0]
        return ns.predict_masks(model, emb, boxes_xyxy=boxes[i], multimask=False).masks[0, 0]

    out = {}
    for name, emb in embeddings.items():
        if name == "exact":
            continue
        for kind in ("click", "box"):
            ious = [
                _iou(masks(emb, kind, i), masks(embeddings["exact"], kind, i)) for i in range(count)
            ]
            out[f"{name}_vs_exact_{kind}"] = {
                "mean_iou": round(float(np.mean(ious)), 4),
                "min_iou": round(float(np.min(ious)), 4),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--precision", nargs="+", default=["auto", "exact"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-repeats", type=int, default=20)
    parser.add_argument(
        "--tuned-reference",
        action="store_true",
        help="also time the reference inside napari_sam's allocator tuning",
    )
    parser.add_argument("--skip-prompts", action="store_true")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the trimmed-heap peak RSS of one encode each (to ..._memory.json)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    suffix = "_memory" if args.memory_only else ""
    out_path = args.out or RESULTS / f"predictor_{args.model}{suffix}.json"

    from segment_anything import SamPredictor, sam_model_registry

    import napari_sam as ns
    from napari_sam.allocator import tuned_allocator

    info_before = machine_info()
    torch.manual_seed(0)
    ours = ns.build_model(args.model)
    ref = sam_model_registry[args.model]().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref_predictor = SamPredictor(ref)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    point_xy = np.array([[412.0, 530.0]])
    label = np.array([1])

    def ours_encode(precision: str):
        return lambda: ns.encode_image(ours, image, precision=precision)

    def ref_encode():
        with torch.inference_mode():
            ref_predictor.set_image(image)

    def ref_encode_tuned():
        with tuned_allocator():
            ref_encode()

    first_call = {p: round(measure(ours_encode(p)).seconds, 3) for p in args.precision}
    ref_encode()  # warm-up (first-call allocations, kernel selection)
    if args.memory_only:
        return _write(out_path, _memory(args, ours_encode, ref_encode, info_before))
    calls = {f"ours_{p}": ours_encode(p) for p in args.precision}
    calls["reference"] = ref_encode
    if args.tuned_reference:
        calls["reference_tuned_allocator"] = ref_encode_tuned
    enc = alternate_all(calls, repeats=args.repeats)

    result = {
        "benchmark": "predictor",
        "model": args.model,
        "image_hw": [1024, 1024],
        "machine": info_before,
        "peak_rss_note": "MiB above the RSS just before the call (VmHWM reset per call)",
        "first_call_s": first_call,
        "encode": {name: as_dict(s) for name, s in enc.items()},
    }
    ref_enc = enc["reference"]
    for p in args.precision:
        mine = enc[f"ours_{p}"]
        result["encode"][f"speedup_{p}"] = round(ref_enc.median_s / mine.median_s, 3)
        if mine.peak_mib is not None and ref_enc.peak_mib:
            result["encode"][f"peak_ratio_{p}"] = round(mine.peak_mib / ref_enc.peak_mib, 3)

    embeddings = {p: ns.encode_image(ours, image, precision=p) for p in args.precision}
    if not args.skip_prompts:
        result["prompt_to_mask_per_call"] = _prompts(
            ours, ref_predictor, image, embeddings, args, point_xy, label
        )
    if "exact" in embeddings:
        result["agreement_random_weights"] = agreement(ours, embeddings, image.shape[:2])
    result["encode_peak_mib_trimmed"] = _memory(args, ours_encode, ref_encode, None)["peak_mib"]
    return _write(out_path, result)


def _write(out_path: Path, result: dict) -> dict:
    result["machine_after"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def _memory(args, ours_encode, ref_encode, info) -> dict:
    """Peak RSS of one encode per implementation, each from a trimmed heap."""
    peaks = {f"ours_{p}": trimmed_peak(ours_encode(p)) for p in args.precision}
    peaks["reference"] = trimmed_peak(ref_encode)
    ratios = {
        f"peak_ratio_{p}": round(peaks[f"ours_{p}"] / peaks["reference"], 3)
        for p in args.precision
        if peaks[f"ours_{p}"] is not None and peaks["reference"]
    }
    rounded = {k: None if v is None else round(v, 1) for k, v in peaks.items()}
    result = {"benchmark": "predictor_memory", "model": args.model, "peak_mib": rounded, **ratios}
    if info is not None:
        result["machine"] = info
    return result


def _prompts(ours, ref_predictor, image, embeddings, args, point_xy, label) -> dict:
    """One click to a full-resolution mask, per call, for each precision and the reference."""
    import napari_sam as ns

    with torch.inference_mode():
        ref_predictor.set_image(image)
    n = args.prompt_repeats

    def ours_prompt(emb):
        def run():
            for _ in range(n):
                ns.predict_masks(ours, emb, points_xy=point_xy, point_labels=label)

        return run

    def ref_prompt():
        with torch.inference_mode():
            for _ in range(n):
                ref_predictor.predict(point_coords=point_xy, point_labels=label)

    calls = {f"ours_{p}": ours_prompt(e) for p, e in embeddings.items()}
    calls["reference"] = ref_prompt
    for fn in calls.values():
        fn()  # warm-up
    start = time.perf_counter()
    summaries = alternate_all(calls, repeats=args.repeats)
    out = {name: round(1000 * s.median_s / n, 2) for name, s in summaries.items()}
    out = {f"{k}_ms": v for k, v in out.items()}
    for p in embeddings:
        out[f"speedup_{p}"] = round(
            summaries["reference"].median_s / summaries[f"ours_{p}"].median_s, 3
        )
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


if __name__ == "__main__":
    main()
