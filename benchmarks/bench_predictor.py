"""Encoder and prompt-to-mask speed: napari-sam-lab against the reference, one process.

Both implementations get the same random ViT-B weights (ours copied into the
reference's ``Sam`` with ``strict=True``) and the same 1024 x 1024 RGB image;
calls alternate (ours, reference, ours, ...) and the medians are compared.

Usage::

    python benchmarks/bench_predictor.py [--model vit_b] [--repeats 3] [--out PATH]

Writes JSON (medians, every run, ratios, peak RSS above the pre-call RSS).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import alternate, as_dict


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-repeats", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "predictor.json"
    )
    args = parser.parse_args(argv)

    from segment_anything import SamPredictor, sam_model_registry

    import napari_sam as ns

    torch.manual_seed(0)
    ours = ns.build_model(args.model)
    ref = sam_model_registry[args.model]().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref_predictor = SamPredictor(ref)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    point_xy = np.array([[412.0, 530.0]])
    label = np.array([1])

    def ours_encode():
        return ns.encode_image(ours, image)

    def ref_encode():
        with torch.inference_mode():
            ref_predictor.set_image(image)

    ours_encode(), ref_encode()  # warm-up (first-call allocations, kernel selection)
    enc_ours, enc_ref = alternate(ours_encode, ref_encode, repeats=args.repeats)

    embedding = ours_encode()
    ref_encode()

    def ours_prompt():
        for _ in range(args.prompt_repeats):
            ns.predict_masks(ours, embedding, points_xy=point_xy, point_labels=label)

    def ref_prompt():
        with torch.inference_mode():
            for _ in range(args.prompt_repeats):
                ref_predictor.predict(point_coords=point_xy, point_labels=label)

    ours_prompt(), ref_prompt()
    pr_ours, pr_ref = alternate(ours_prompt, ref_prompt, repeats=args.repeats)

    result = {
        "benchmark": "predictor",
        "model": args.model,
        "image_hw": [1024, 1024],
        "precision": "fp32 (exact)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "encode": {
            "ours": as_dict(enc_ours),
            "reference": as_dict(enc_ref),
            "speedup": enc_ref.median_s / enc_ours.median_s,
        },
        "prompt_to_mask_per_call": {
            "ours_ms": 1000 * pr_ours.median_s / args.prompt_repeats,
            "reference_ms": 1000 * pr_ref.median_s / args.prompt_repeats,
            "speedup": pr_ref.median_s / pr_ours.median_s,
        },
    }
    if enc_ours.peak_mib is not None and enc_ref.peak_mib:
        result["encode"]["peak_ratio"] = enc_ours.peak_mib / enc_ref.peak_mib
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
