"""Agreement of ``precision="auto"`` with ``"exact"``: click, box and automatic masks.

For each held-out synthetic image (dataset seed 2, never trained on), both
precisions encode the image; then, for every labelled object, a positive
click at its centre (multimask, best predicted IoU kept) and its tight box
(single mask) give one mask per precision, and their IoU is recorded.
The automatic generator (default settings unless ``--automatic`` says
otherwise) runs on both embeddings; each object of either side is matched
to the other side's best-overlapping object, and the fraction matched at
IoU >= 0.9 is reported both ways, with why the unmatched ones are unmatched
(no partner above IoU 0.5: the object passed a filter on one side only; else
a partner with a different mask).

``--noise-floor`` calibrates that number: the exact embedding plus Gaussian
noise as large as ``auto``'s own deviation from it (same norm, per image),
decoded in exact. What this perturbation loses is the share of objects that
any error of that size loses (objects at a filter threshold), not something
a better half-precision path could keep.

Always also reported: the ``auto`` embedding decoded in exact
(``decoder_precision="exact"``, the Automatic widget's "Decode in exact
precision"), which separates what the bf16 encoder and the bf16 decoder lose.

``auto`` resolves to bf16 only on hardware that runs it fast (see
:mod:`napari_sam.precision`); elsewhere it is fp32 and the agreement is 1.

Usage::

    python benchmarks/bench_agreement.py --model demo --images 12
    python benchmarks/bench_agreement.py --model vit_b --random --images 2 --size 1024

Writes JSON to ``benchmarks/results/agreement_<model>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import write_report  # noqa: E402


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _centre(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the pixel farthest from the object's boundary."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return float(x), float(y)


#: An object is matched when the other side has one at this IoU or more.
MATCH_IOU = 0.9


def best_ious(ours: list[np.ndarray], theirs: list[np.ndarray]) -> list[float]:
    """For each of ``ours``, the IoU of its best-overlapping object in ``theirs`` (0 if none)."""
    return [max((_iou(a, b) for b in theirs), default=0.0) for a in ours]


def _matched(best: list[float], at: float = MATCH_IOU) -> int:
    """How many of the objects with these best-partner IoUs are matched (IoU >= ``at``)."""
    return sum(b >= at for b in best)


def _unmatched(best: list[float], at: float = MATCH_IOU) -> dict:
    """Unmatched objects split by their best partner: none above 0.5, or one below ``at``."""
    return {
        "no_partner": sum(b < 0.5 for b in best),
        "different_mask": sum(0.5 <= b < at for b in best),
    }


def _perturbed(embedding, relative: float, seed: int):
    """``embedding`` plus Gaussian noise of norm ``relative`` times the features' norm."""
    import dataclasses

    import torch

    features = embedding.features
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(seed))
    noise *= relative * features.norm() / noise.norm()
    return dataclasses.replace(embedding, features=features + noise)


def _prompt_ious(model, emb_a, emb_b, labels: np.ndarray, max_objects: int) -> dict:
    from napari_sam.predict import predict_masks

    clicks, boxes = [], []
    ids = [i for i in np.unique(labels) if i][:max_objects]
    for obj in ids:
        mask = labels == obj
        ys, xs = np.nonzero(mask)
        point = [_centre(mask)]
        box = [xs.min(), ys.min(), xs.max(), ys.max()]
        got = []
        for emb in (emb_a, emb_b):
            click = predict_masks(model, emb, points_xy=point, point_labels=[1])
            best = int(np.argmax(click.iou_scores[0]))
            boxed = predict_masks(model, emb, boxes_xyxy=box, multimask=False)
            got.append((click.masks[0, best], boxed.masks[0, 0]))
        clicks.append(_iou(got[0][0], got[1][0]))
        boxes.append(_iou(got[0][1], got[1][1]))
    return {"click": clicks, "box": boxes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--random", action="store_true", help="random weights (randomize_)")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--max-objects", type=int, default=10, help="prompted objects per image")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="also decode the exact embedding plus noise the size of auto's deviation",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    import torch

    from napari_sam.automatic import generate_masks
    from napari_sam.precision import precision_name, resolve_precision
    from napari_sam.predict import encode_image
    from napari_sam.registry import build_model
    from napari_sam.synthetic import make_dataset
    from napari_sam.weights import load_model

    if args.random:
        from tests._reference import randomize_

        torch.manual_seed(0)
        model = randomize_(build_model(args.model), seed=0)
    else:
        model = load_model(args.model)
    model.eval()
    auto = precision_name(resolve_precision("auto", "cpu"))
    samples = make_dataset(args.images, seed=2, shape_hw=(args.size, args.size))
    clicks, boxes, counts, deviations = [], [], [], []
    best: dict[str, list[float]] = {
        name: []
        for name in (
            "exact_in_auto",
            "auto_in_exact",
            "exact_in_exact_decoded",
            "exact_decoded_in_exact",
            "exact_in_noisy",
            "noisy_in_exact",
        )
    }
    settings = {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
    }
    for index, sample in enumerate(samples):
        exact = encode_image(model, sample.image, precision="exact")
        fast = encode_image(model, sample.image, precision="auto")
        ious = _prompt_ious(model, exact, fast, sample.labels, args.max_objects)
        clicks += ious["click"]
        boxes += ious["box"]
        deviation = float((fast.features.float() - exact.features).norm() / exact.features.norm())
        deviations.append(deviation)
        found = [
            [r.segmentation for r in generate_masks(model, emb, **settings)]
            for emb in (exact, fast)
        ]
        exact_in_auto, auto_in_exact = best_ious(found[0], found[1]), best_ious(found[1], found[0])
        best["exact_in_auto"] += exact_in_auto
        best["auto_in_exact"] += auto_in_exact
        decoded = [
            r.segmentation for r in generate_masks(model, fast, precision="exact", **settings)
        ]
        best["exact_in_exact_decoded"] += best_ious(found[0], decoded)
        best["exact_decoded_in_exact"] += best_ious(decoded, found[0])
        counts.append([len(found[0]), len(found[1])])
        line = (
            f"image: click {np.mean(ious['click']):.4f} box {np.mean(ious['box']):.4f} "
            f"automatic {len(found[0])} exact / {len(found[1])} auto objects, matched "
            f"{_matched(exact_in_auto)} / {_matched(auto_in_exact)}; "
            f"auto decoded in exact {len(decoded)} objects"
        )
        if args.noise_floor:
            noisy = _perturbed(exact, deviation, seed=index)
            found_noisy = [
                r.segmentation for r in generate_masks(model, noisy, precision="exact", **settings)
            ]
            best["exact_in_noisy"] += best_ious(found[0], found_noisy)
            best["noisy_in_exact"] += best_ious(found_noisy, found[0])
            line += f"; exact + noise {len(found_noisy)} objects"
        print(line, flush=True)
    n_exact, n_auto = (sum(c[i] for c in counts) for i in (0, 1))

    def matched(name: str) -> float | None:
        values = best[name]
        return _matched(values) / len(values) if values else None

    report = {
        "benchmark": "agreement of auto with exact",
        "model": f"{args.model}{' (random weights)' if args.random else ''}",
        "auto_resolves_to": auto,
        "images": args.images,
        "image_hw": [args.size, args.size],
        "objects_prompted": len(clicks),
        "click_mean_iou": statistics.fmean(clicks) if clicks else None,
        "click_min_iou": min(clicks) if clicks else None,
        "box_mean_iou": statistics.fmean(boxes) if boxes else None,
        "box_min_iou": min(boxes) if boxes else None,
        "embedding_relative_deviation_mean": statistics.fmean(deviations),
        "automatic_objects": {"exact": n_exact, "auto": n_auto},
        # pooled over images: objects of one side with a partner at IoU >= 0.9
        "automatic_exact_matched_in_auto": matched("exact_in_auto"),
        "automatic_auto_matched_in_exact": matched("auto_in_exact"),
        "automatic_unmatched": {
            "exact_objects": _unmatched(best["exact_in_auto"]),
            "auto_objects": _unmatched(best["auto_in_exact"]),
        },
        "auto_encoded_exact_decoded": {
            "objects": len(best["exact_decoded_in_exact"]),
            "exact_matched_in_it": matched("exact_in_exact_decoded"),
            "it_matched_in_exact": matched("exact_decoded_in_exact"),
        },
        "automatic_settings": (
            f"{args.points_per_side} x {args.points_per_side} grid, pred_iou_thresh "
            f"{args.pred_iou_thresh}, stability_score_thresh {args.stability_score_thresh}"
        ),
    }
    if args.noise_floor:
        report["noise_floor"] = {
            "what": "exact embedding + Gaussian noise of auto's deviation, decoded in exact",
            "objects": len(best["noisy_in_exact"]),
            "exact_matched_in_noisy": matched("exact_in_noisy"),
            "noisy_matched_in_exact": matched("noisy_in_exact"),
            "unmatched": {
                "exact_objects": _unmatched(best["exact_in_noisy"]),
                "noisy_objects": _unmatched(best["noisy_in_exact"]),
            },
        }
    write_report(report, args.out or HERE / "results" / f"agreement_{args.model}.json")
    return report


if __name__ == "__main__":
    main()
