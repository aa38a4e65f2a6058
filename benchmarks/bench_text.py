"""Text-prompt speed: score 100 candidate masks on a 1024 x 1024 image with CLIP ViT-B-32.

CLIP has random weights (no download; the arithmetic is the same as with
trained ones). The candidates are 100 run-length-encoded ellipses of radius
8 to 120 px, as the automatic masks would be. Timed: ``segment_text`` with
the candidates given (so no SAM run), for several crop batch sizes, plus its
parts: preparing the 100 crops, and embedding the texts.

Usage::

    nice python benchmarks/bench_text.py [--repeats 3] [--batch-sizes 1 32] [--out PATH]

Writes JSON (medians, every run, peak RSS above the pre-call RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import as_dict, measure, summarize


def _ellipse_records(shape_hw: tuple[int, int], n: int, seed: int) -> list:
    from napari_sam._rle import RunLengthMask
    from napari_sam.automatic import MaskRecord

    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[: shape_hw[0], : shape_hw[1]]
    records = []
    while len(records) < n:
        ry, rx = rng.uniform(8, 120, size=2)
        cy, cx = rng.uniform(0, shape_hw[0]), rng.uniform(0, shape_hw[1])
        mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        if mask.sum() < 50:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        records.append(
            MaskRecord(
                rle=RunLengthMask.from_mask(mask),
                bbox_xywh=(x0, y0, int(xs.max()) - x0, int(ys.max()) - y0),
                area=int(mask.sum()),
                predicted_iou=0.9,
                stability_score=0.95,
                point_xy=(float(cx), float(cy)),
                crop_box_xywh=(0, 0, shape_hw[1], shape_hw[0]),
            )
        )
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text.json")
    args = parser.parse_args(argv)
    load_at_start = [round(v, 2) for v in os.getloadavg()]  # 2 cores, shared

    from napari_sam._text_crops import CropSettings, prepare_crops
    from napari_sam.text import DEFAULT_TEMPLATES, embed_texts, load_clip, segment_text

    torch.manual_seed(0)
    clip = load_clip("ViT-B-32", None)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    records = _ellipse_records(image.shape[:2], args.candidates, seed=1)
    texts = ["nucleus", "mitotic cell"]

    def crops_only():
        masks = [r.segmentation for r in records]
        return prepare_crops(
            image,
            masks,
            [r.bbox_xywh for r in records],
            CropSettings(),
            size=clip.image_size,
            mean=clip.mean,
            std=clip.std,
        )

    def texts_only():
        return embed_texts(clip, [*texts, "background"], DEFAULT_TEMPLATES)

    segment_text(None, clip, image, texts, candidates=records[:4])  # warm-up
    out: dict = {
        "what": f"segment_text on {args.candidates} candidates, 1024x1024, CLIP ViT-B-32 random",
        "machine": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_start": load_at_start,
        "templates": len(DEFAULT_TEMPLATES),
        "texts": texts,
        "parts": {
            "prepare_crops_100": as_dict(summarize([measure(crops_only) for _ in range(3)])),
            "embed_texts": as_dict(summarize([measure(texts_only) for _ in range(3)])),
        },
        "segment_text": {},
    }
    for batch in args.batch_sizes:

        def run(batch=batch):
            return segment_text(None, clip, image, texts, candidates=records, batch_size=batch)

        summary = summarize([measure(run) for _ in range(args.repeats)])
        out["segment_text"][f"batch_{batch}"] = as_dict(summary)
        print(f"batch {batch}: median {summary.median_s:.2f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
