"""Train the shipped ``demo`` model from scratch on synthetic microscopy, on a CPU.

Reproduces ``src/napari_sam/data/demo_sam.pt`` (see docs/demo-model.md)::

    OMP_NUM_THREADS=2 PYTHONPATH=src python scripts/train_demo.py \\
        --out /tmp/demo_sam.pt --log /tmp/demo_train.jsonl

Every ``--checkpoint-every`` steps the weights are saved (atomically) to
``--out``; the final file is stored in float16 with ``--fp16``. ``--init``
continues from a checkpoint (e.g. to run the decay phase separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from napari_sam.evaluation import evaluate
from napari_sam.registry import build_model
from napari_sam.synthetic import make_dataset
from napari_sam.training import (
    LossWeights,
    Recipe,
    TrainingRecord,
    finetune,
    save_checkpoint,
    tie_decoder_attention_,
)

TRAIN_SEED, VAL_SEED, TEST_SEED = 0, 1, 2  # dataset seeds (disjoint images)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="checkpoint to write")
    p.add_argument(
        "--evaluate", type=Path, default=None, help="only evaluate this checkpoint (no training)"
    )
    p.add_argument("--eval-images", type=int, default=40, help="held-out images for --evaluate")
    p.add_argument("--log", type=Path, default=None, help="JSON-lines training log")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint")
    p.add_argument("--steps", type=int, default=100_000, help="step cap")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--objects", type=int, default=4, help="objects per image and step")
    p.add_argument("--click-rounds", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--decay-fraction", type=float, default=0.25)
    p.add_argument("--train-images", type=int, default=600)
    p.add_argument("--val-images", type=int, default=8)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--minutes", type=float, default=60.0, help="wall-time budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device to train on (e.g. cuda)")
    p.add_argument("--fp16", action="store_true", help="store the final file in float16")
    p.add_argument(
        "--decoder-only",
        action="store_true",
        help="freeze the image encoder (embeddings cached once, no augmentation): "
        "a fast polish of the prompt encoder and mask decoder",
    )
    return p.parse_args()


def _record_json(rec: TrainingRecord) -> dict:
    out = {"step": rec.step, "loss": rec.loss, "lr": rec.lr, "seconds": rec.seconds}
    if rec.validation is not None:
        for name in ("overall", "small", "large"):
            out[name] = dataclasses.asdict(getattr(rec.validation, name))
    return out


def _report(path: Path, n_images: int) -> None:
    """Print the held-out metrics of a checkpoint (all objects, small, large) as JSON."""
    model = build_model("demo", checkpoint=path)
    test = make_dataset(n_images, seed=TEST_SEED)
    t0 = time.perf_counter()
    result = evaluate(model, [s.image for s in test], [s.labels for s in test], max_objects=20)
    out = {
        name: dataclasses.asdict(getattr(result, name)) for name in ("overall", "small", "large")
    }
    out["images"], out["seconds"] = n_images, time.perf_counter() - t0
    print(json.dumps(out, indent=1), flush=True)


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal Adam states made steps several times slower
    if args.evaluate is not None:
        _report(args.evaluate, args.eval_images)
        return
    if args.out is None:
        raise SystemExit("--out is required for training")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train = make_dataset(args.train_images, seed=TRAIN_SEED)
    val = make_dataset(args.val_images, seed=VAL_SEED)
    print(
        f"data: {len(train)} train, {len(val)} val in {time.perf_counter() - t0:.0f} s", flush=True
    )
    model = build_model("demo", checkpoint=args.init)
    if args.init is None:
        tie_decoder_attention_(model)  # escapes the prompt-ignoring plateau (see its notes)
    recipe = Recipe(
        objects_per_image=args.objects,
        click_rounds=args.click_rounds,
        loss=LossWeights(bce=1.0, dice=1.0, focal=0.0, iou=1.0),
        warmup_steps=args.warmup,
        decay_fraction=args.decay_fraction,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        time_budget_s=args.minutes * 60,
    )
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
    log_fh = args.log.open("a") if args.log else None

    def log(rec: TrainingRecord) -> None:
        line = json.dumps(_record_json(rec))
        print(line, flush=True)
        if log_fh is not None:
            log_fh.write(line + "\n")
            log_fh.flush()

    result = finetune(
        model,
        [s.image for s in train],
        [s.labels for s in train],
        train_encoder=not args.decoder_only,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        checkpoint_path=args.out,
        recipe=recipe,
        validation=([s.image for s in val], [s.labels for s in val]),
        log=log,
        seed=args.seed,
    )
    if args.fp16:
        save_checkpoint(result.model, args.out, dtype=torch.float16)
    final = evaluate(result.model, [s.image for s in val], [s.labels for s in val])
    print("final", final.overall, final.small, final.large, sep="\n", flush=True)
    print(f"done: {result.steps_done} steps in {result.seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
