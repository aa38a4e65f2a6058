"""Recognising which registered SAM architecture a state dict has.

Hand rules over key names and tensor shapes, compared with the facts of each
registered :class:`~napari_sam.registry.ModelConfig`; no model is built.
Re-exported by :mod:`napari_sam.weights`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._state_dict import UnknownArchitectureError

if TYPE_CHECKING:
    from .registry import ModelConfig


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct integer indexes directly after ``prefix`` in the keys."""
    n = len(prefix)
    found = {k[n:].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return len({s for s in found if s.isdigit()})


def _dim(state: Mapping[str, Any], key: str, axis: int = 0) -> int | None:
    value = state.get(key)
    return None if value is None or value.dim() <= axis else int(value.shape[axis])


def _signature(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Architecture facts readable from the keys and shapes (None: not SAM)."""
    enc = "image_encoder."
    sig: dict[str, Any] = {
        "prompt_embed_dim": _dim(state, enc + "neck.0.weight"),
        "transformer_depth": _count(state, "mask_decoder.transformer.layers."),
        "transformer_mlp_dim": _dim(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight"),
        "iou_head_depth": _count(state, "mask_decoder.iou_prediction_head.layers."),
        "iou_head_hidden_dim": _dim(state, "mask_decoder.iou_prediction_head.layers.0.weight"),
        "mask_in_chans": _dim(state, "prompt_encoder.mask_downscaling.3.weight"),
    }
    tokens = _dim(state, "mask_decoder.mask_tokens.weight")
    sig["num_multimask_outputs"] = None if tokens is None else tokens - 1
    proj = state.get(enc + "patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4:
        depth = _count(state, enc + "blocks.")
        pos = state.get(enc + "pos_embed")
        grid = int(pos.shape[1]) if pos is not None and pos.dim() == 4 else None
        rel = [_dim(state, f"{enc}blocks.{i}.attn.rel_pos_h") for i in range(depth)]
        sig.update(
            family="ViT",
            embed_dim=int(proj.shape[0]),
            patch_size=int(proj.shape[-1]),
            depth=depth,
            embedding_side=grid,
            global_attn_indexes=None
            if grid is None
            else tuple(i for i, r in enumerate(rel) if r == 2 * grid - 1),
        )
        return sig
    if any(k.startswith((enc + "layers.", enc + "patch_embed.seq.")) for k in state):
        n_layers = _count(state, enc + "layers.")
        layer = [f"{enc}layers.{i}.blocks.0." for i in range(n_layers)]
        biases = [state.get(p + "attn.attention_biases") for p in layer[1:]]
        sig.update(
            family="TinyViT",
            depths=tuple(_count(state, f"{enc}layers.{i}.blocks.") for i in range(n_layers)),
            embed_dims=tuple(
                _dim(state, p + "attn.norm.weight") or _dim(state, p + "conv3.c.weight")
                for p in layer
            ),
            num_heads=tuple(None if b is None else int(b.shape[0]) for b in biases),
            window_sizes=tuple(None if b is None else math.isqrt(int(b.shape[1])) for b in biases),
        )
        return sig
    return None


def _config_signature(config: ModelConfig) -> dict[str, Any]:
    """The facts of :func:`_signature` for a registered configuration."""
    from .registry import ViTConfig

    dec, enc = config.decoder, config.encoder
    sig: dict[str, Any] = {
        "prompt_embed_dim": config.prompt_embed_dim,
        "transformer_depth": dec.transformer_depth,
        "transformer_mlp_dim": dec.transformer_mlp_dim,
        "iou_head_depth": dec.iou_head_depth,
        "iou_head_hidden_dim": dec.iou_head_hidden_dim,
        "mask_in_chans": dec.mask_in_chans,
        "num_multimask_outputs": dec.num_multimask_outputs,
    }
    if isinstance(enc, ViTConfig):
        grid = config.img_size // enc.patch_size
        sig.update(
            family="ViT",
            embed_dim=enc.embed_dim,
            patch_size=enc.patch_size,
            depth=enc.depth,
            embedding_side=grid,
            global_attn_indexes=tuple(
                i
                for i in range(enc.depth)
                if i in enc.global_attn_indexes or enc.window_size == grid
            ),
        )
    else:
        sig.update(
            family="TinyViT",
            depths=tuple(enc.depths),
            embed_dims=tuple(enc.embed_dims),
            num_heads=tuple(enc.num_heads[1:]),
            window_sizes=tuple(enc.window_sizes[1:]),
        )
    return sig


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``"field: file X, config Y"`` for each fact that is known and differs."""
    return [
        f"{k}: file {v}, config {expected.get(k)}"
        for k, v in found.items()
        if v is not None and v != expected.get(k)
    ]


def infer_config(state: Mapping[str, Any], *, source: str = "state dict") -> ModelConfig:
    """The registered configuration whose architecture ``state`` has.

    ViT encoders are told apart by ``image_encoder.patch_embed.proj.weight``
    (embedding width, patch size), the number of blocks, the position
    embedding (input size) and which blocks attend globally; TinyViT
    (MobileSAM) encoders by their ``image_encoder.layers.*`` /
    ``patch_embed.seq`` keys, depths, widths, heads and windows. Decoder sizes
    are compared too. A TinyViT file does not record its input size.

    Parameters
    ----------
    state : mapping of str to Tensor
        A state dict (as from :func:`read_state_dict`).
    source : str
        What the state came from, for messages.

    Returns
    -------
    ModelConfig
        The first matching entry of ``MODEL_CONFIGS`` (official ones first).

    Raises
    ------
    UnknownArchitectureError
        Not a SAM state dict, or no registered configuration matches; the
        message gives the facts found and the closest configuration.
    """
    from .registry import MODEL_CONFIGS

    found = _signature(state)
    if found is None:
        first = list(state)[:5]
        raise UnknownArchitectureError(
            f"{source} is not a SAM state dict: it has neither a ViT "
            "('image_encoder.patch_embed.proj.weight') nor a TinyViT "
            f"('image_encoder.layers.*') image encoder; first keys: {first}"
        )
    candidates = []
    for config in MODEL_CONFIGS.values():
        diffs = _differences(found, _config_signature(config))
        if not diffs:
            return config
        candidates.append((len(diffs), config.name, diffs))
    _, closest, diffs = min(candidates)
    facts = ", ".join(f"{k}={v}" for k, v in found.items() if v is not None)
    raise UnknownArchitectureError(
        f"{source} matches no registered model ({', '.join(MODEL_CONFIGS)}): it has {facts}. "
        f"Closest is {closest!r}, which differs in {'; '.join(diffs)}"
    )
