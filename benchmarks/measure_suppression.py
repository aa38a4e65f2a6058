"""Grey or blur outside the mask? A proxy measurement without trained CLIP weights.

No trained CLIP weights can be fetched here, so CLIP's *recognition* under
each suppression cannot be measured. What can be measured is how the crop
representation behaves, on synthetic microscopy images with known objects
(:mod:`napari_sam.synthetic`), with two encoders that stand in for CLIP's
image tower: open_clip's ViT-B-32 with random weights (seeded) and a
hand-made intensity/gradient histogram.

1. **Context leakage**: cosine similarity between the embedding of an
   object's crop in its own image and of the same object with everything
   outside its mask replaced by another image (1 = the embedding depends on
   the object only).
2. **Object vs background separability**: true objects against candidates
   of the same shapes placed on background (what a text prompt must reject),
   5-fold cross-validated balanced accuracy of a ridge classifier on the
   embeddings.

Usage::

    nice python benchmarks/measure_suppression.py [--images 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("grey", "blur", "none")


def _objects_and_background(sample, rng, max_objects: int):
    """Ground-truth masks, and the same shapes moved onto background."""
    labels = sample.labels
    objects, background = [], []
    ids = [i for i in range(1, labels.max() + 1) if (labels == i).sum() >= 40]
    for i in rng.permutation(ids)[:max_objects]:
        mask = labels == i
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        for _ in range(200):
            dy = rng.integers(0, labels.shape[0] - h) - rows.min()
            dx = rng.integers(0, labels.shape[1] - w) - cols.min()
            moved = np.zeros_like(mask)
            moved[rows + dy, cols + dx] = True
            if (labels[moved] == 0).mean() >= 0.9:
                objects.append(mask)
                background.append(moved)
                break
    return objects, background


def _boxes(masks):
    out = []
    for m in masks:
        rows, cols = np.nonzero(m)
        out.append((cols.min(), rows.min(), cols.max() - cols.min(), rows.max() - rows.min()))
    return out


class HistogramEncoder:
    """Intensity (16 bins) and gradient-magnitude (16 bins) histograms of the crop."""

    image_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.mean(dim=1) * 0.5 + 0.5  # B x S x S in 0..1
        gy, gx = torch.gradient(x, dim=(1, 2))
        grad = (gx**2 + gy**2).sqrt().clamp(max=0.5) * 2
        feats = []
        for img, g in zip(x, grad, strict=True):
            h1 = torch.histc(img.clamp(0, 1), bins=16, min=0, max=1)
            h2 = torch.histc(g, bins=16, min=0, max=1)
            feats.append(torch.cat([h1, h2]).sqrt())
        out = torch.stack(feats)
        return out / out.norm(dim=1, keepdim=True)


def _embed(encoder, image_rgb, masks, mode):
    from napari_sam._text_crops import CropSettings, prepare_crops

    feats = []
    for start in range(0, len(masks), 32):
        chunk = masks[start : start + 32]
        pixels = prepare_crops(
            image_rgb,
            chunk,
            _boxes(chunk),
            CropSettings(suppress=mode),
            size=encoder.image_size,
            mean=encoder.mean,
            std=encoder.std,
        )
        f = encoder.encode_images(pixels).float()
        feats.append(f / f.norm(dim=1, keepdim=True))
    return torch.cat(feats)


def _ridge_cv_accuracy(x: np.ndarray, y: np.ndarray, *, folds: int = 5, lam: float = 1.0) -> float:
    """Balanced accuracy of a (dual-form) ridge classifier, k-fold cross-validated."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    correct = np.zeros(len(y), bool)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        xt, yt = x[train], np.where(y[train], 1.0, -1.0)
        alpha = np.linalg.solve(xt @ xt.T + lam * len(train) * np.eye(len(train)), yt)
        pred = (x[test] @ (xt.T @ alpha)) > 0
        correct[test] = pred == y[test]
    return float(0.5 * (correct[y].mean() + correct[~y].mean()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--objects", type=int, default=16, help="per image")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "text_suppression.json"
    )
    args = parser.parse_args(argv)
    load_at_start = [round(v, 2) for v in os.getloadavg()]  # 2 cores, shared

    from napari_sam.image import prepare_image
    from napari_sam.synthetic import make_sample
    from napari_sam.text import load_clip

    torch.manual_seed(0)
    encoders = {"vit_b_32_random": load_clip("ViT-B-32", None), "histogram": HistogramEncoder()}
    rng = np.random.default_rng(0)
    samples = [
        make_sample(
            100 + i,
            shape_hw=(256, 256),
            kind=("nuclei", "cells")[i % 2],
            bright_objects=True,
            dtype=np.uint8,
            size_px=14.0,
        )
        for i in range(args.images + 1)
    ]
    images = [prepare_image(s.image) for s in samples]
    results: dict = {}
    start = time.perf_counter()
    for enc_name, encoder in encoders.items():
        per_mode = {m: {"leak": [], "x": [], "y": []} for m in MODES}
        for i in range(args.images):
            objects, background = _objects_and_background(samples[i], rng, args.objects)
            other = images[(i + 1) % len(images)]
            for mode in MODES:
                own = _embed(encoder, images[i], objects, mode)
                swapped = []
                for m in objects:
                    pasted = other.copy()
                    pasted[m] = images[i][m]
                    swapped.append(_embed(encoder, pasted, [m], mode))
                per_mode[mode]["leak"].extend((own * torch.cat(swapped)).sum(1).tolist())
                bg = _embed(encoder, images[i], background, mode)
                per_mode[mode]["x"].append(torch.cat([own, bg]).numpy())
                per_mode[mode]["y"].extend([True] * len(own) + [False] * len(bg))
        results[enc_name] = {
            mode: {
                "context_cosine_mean": float(np.mean(v["leak"])),
                "context_cosine_min": float(np.min(v["leak"])),
                "object_vs_background_balanced_accuracy": _ridge_cv_accuracy(
                    np.concatenate(v["x"]), np.array(v["y"])
                ),
                "n_objects": int(sum(v["y"])),
            }
            for mode, v in per_mode.items()
        }
    out = {
        "what": "crop suppression proxy (no trained CLIP weights available)",
        "images": args.images,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_start": load_at_start,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
