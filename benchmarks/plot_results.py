"""Plot the predictor benchmark results (benchmarks/results/predictor_*.json) for the docs.

Usage::

    python benchmarks/plot_results.py [--out docs/images/performance.png]

One panel per measurement (encode seconds, one click to a full-resolution
mask in milliseconds, encode peak RSS), bars for the reference and for each
of our precisions, the speed-up over the reference written on each bar.
Peaks come from the trimmed-heap pass (``predictor_<model>_memory.json`` or
``encode_peak_mib_trimmed``) where there is one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("vit_b", "vit_l", "vit_h")
COLOURS = {"reference": "#999999", "exact": "#4c72b0", "auto": "#dd8452"}


def load(results: Path) -> dict[str, dict]:
    """Benchmark JSON per model name, in ViT-B/L/H order."""
    found = {}
    for name in ORDER:
        path = results / f"predictor_{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
            memory = results / f"predictor_{name}_memory.json"
            if memory.exists():  # trimmed-heap peaks, measured in a separate run
                found[name]["encode_peak_mib_trimmed"] = json.loads(memory.read_text())["peak_mib"]
    return found


def _series(data: dict, kind: str) -> dict[str, float | None]:
    """Values of ``kind`` (encode_s, prompt_ms, peak_mib) per implementation."""
    enc = data["encode"]
    prompt = data.get("prompt_to_mask_per_call", {})
    out: dict[str, float | None] = {}
    for label, key in (("reference", "reference"), ("exact", "ours_exact"), ("auto", "ours_auto")):
        if kind == "encode_s":
            out[label] = enc.get(key, {}).get("median_s")
        elif kind == "peak_mib":
            trimmed = data.get("encode_peak_mib_trimmed")
            out[label] = trimmed.get(key) if trimmed else enc.get(key, {}).get("peak_mib")
        else:
            out[label] = prompt.get(f"{key}_ms")
    return out


def _panel(ax, found: dict[str, dict], kind: str, title: str, unit: str) -> None:
    width = 0.26
    found = {n: d for n, d in found.items() if any(_series(d, kind).values())}
    for m, data in enumerate(found.values()):
        values = _series(data, kind)
        ref = values["reference"]
        for i, (label, value) in enumerate(values.items()):
            if value is None:
                continue
            x = m + (i - 1) * width
            ax.bar(x, value, width, color=COLOURS[label], label=label if m == 0 else None)
            if label != "reference" and ref:
                ratio = ref / value
                text = f"{ratio:.1f}x" if kind != "peak_mib" else f"{1 / ratio:.2f}x"
                ax.text(x, value, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(found)), [n.replace("_", "-").upper() for n in found])
    ax.set_title(title)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "performance.png")
    args = parser.parse_args(argv)
    found = load(args.results)
    if not found:
        raise SystemExit(f"no predictor_*.json in {args.results}")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    _panel(axes[0], found, "encode_s", "Encode one 1024 px image", "seconds (median)")
    _panel(axes[1], found, "prompt_ms", "One click to a full-res mask", "ms per call (median)")
    _panel(axes[2], found, "peak_mib", "Encode peak RSS (ratio to ref.)", "MiB above pre-call")
    load_avg = next(iter(found.values()))["machine"].get("loadavg_1_5_15")
    cpu = next(iter(found.values()))["machine"].get("cpu")
    fig.suptitle(f"napari-sam-lab vs segment_anything, {cpu}, 2 cores, load avg {load_avg}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
