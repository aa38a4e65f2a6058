"""napari-sam-lab: Segment Anything for napari, scriptable headless.

The public API is loaded lazily, so ``import napari_sam`` is cheap and never
imports napari, Qt or magicgui::

    import napari_sam as ns
    model = ns.load_model("vit_b")
    emb = ns.encode_image(model, image)
    pred = ns.predict_masks(model, emb, points_xy=[[120, 80]], point_labels=[1])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "registry",
    "get_config": "registry",
    "MODEL_CONFIGS": "registry",
    "ModelConfig": "registry",
    "load_model": "weights",
    "KNOWN_CHECKPOINTS": "weights",
    "fetch_checkpoint": "weights",
    "cache_dir": "weights",
    "encode_image": "predict",
    "predict_masks": "predict",
    "ImageEmbedding": "predict",
    "MaskPrediction": "predict",
    "Predictor": "predict",
    "prepare_image": "image",
    "generate_masks": "automatic",
    "MaskRecord": "automatic",
    "masks_to_labels": "labels",
    "load_clip": "text",
    "segment_text": "text",
    "TextSegmentation": "text",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
