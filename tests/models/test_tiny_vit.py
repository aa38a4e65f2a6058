"""TinyViT (MobileSAM ``vit_t``) against the reference ``mobile_sam`` package."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_sam.models.sam import build_image_encoder
from napari_sam.models.tiny_vit import TinyViT, relative_offset_index
from napari_sam.registry import ModelConfig, get_config

from .._reference import build_reference, randomize_

# Same architecture as tiny_vit_t, with windows that need padding (16 % 5, 8 % 3)
# and one that equals its stage resolution (8): the reference takes other paths there.
PADDED = dataclasses.replace(
    get_config("tiny_vit_t"),
    name="tiny_vit_t_padded",
    encoder=dataclasses.replace(get_config("tiny_vit_t").encoder, window_sizes=(4, 5, 8, 3)),
)


def _encoder(config: ModelConfig) -> TinyViT:
    encoder = build_image_encoder(config)
    assert isinstance(encoder, TinyViT)
    return encoder


@torch.no_grad()
def _randomize_bn_stats_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def _random_pair(config: ModelConfig, seed: int = 0):
    """Our randomised encoder and the reference encoder carrying its weights, both eval."""
    ours = randomize_(_encoder(config), seed=seed)
    _randomize_bn_stats_(ours, seed)
    ref = build_reference(config).image_encoder
    ref.load_state_dict(ours.state_dict(), strict=True)
    # The reference caches its bias table in `.eval()`: call it after loading.
    return ours.eval(), ref.eval()


@torch.no_grad()
def _reference_features(ref: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The reference encoder's output.

    Its ``forward_features`` hard-codes a 64 x 64 token grid (1024 px input);
    at other sizes run its own modules in the same order with the right grid.
    """
    side = images.shape[-1] // 16
    if side == 64:
        return ref(images)
    x = ref.patch_embed(images)
    for layer in ref.layers:
        x = layer(x)  # B x side*side x C
    return ref.neck(x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2))


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", ["vit_t", "tiny_vit_t"])
def test_state_dict_matches_reference(name):
    config = get_config(name)
    ours = _encoder(config).state_dict()
    ref = build_reference(config).image_encoder.state_dict()
    assert sorted(ours) == sorted(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in ref.items()
    }
    # What the checkpoint carries besides the encoder proper.
    assert {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"} <= set(ours)
    assert ours["head.weight"].shape == (1000, config.encoder.embed_dims[-1])
    assert "layers.1.blocks.0.local_conv.bn.num_batches_tracked" in ours
    assert not any("attention_bias_idxs" in k for k in ours)
    assert "neck.0.weight" in ours and "neck.3.bias" in ours


def test_vit_t_checkpoint_layout():
    """Spot-check the official layout: widths, strides, bias tables (no reference needed)."""
    model = _encoder(get_config("vit_t"))
    state = model.state_dict()
    assert state["patch_embed.seq.0.c.weight"].shape == (32, 3, 3, 3)
    assert state["layers.2.blocks.0.attn.attention_biases"].shape == (5, 14 * 14)
    assert state["layers.3.blocks.1.attn.qkv.weight"].shape == (3 * 320, 320)
    assert state["neck.0.weight"].shape == (256, 320, 1, 1)
    assert "layers.3.downsample.conv1.c.weight" not in state
    strides = [layer.downsample.conv2.c.stride for layer in model.layers[:3]]
    assert strides == [(2, 2), (2, 2), (1, 1)]


@pytest.mark.parametrize("name", ["vit_t", "tiny_vit_t"])
def test_bias_indices_match_reference(name):
    config = get_config(name)
    ours = dict(_encoder(config).named_buffers())
    ref = dict(build_reference(config).image_encoder.named_buffers())
    keys = [k for k in ours if k.endswith("attention_bias_idxs")]
    assert len(keys) == sum(config.encoder.depths[1:])
    for key in keys:
        assert torch.equal(ours[key], ref[key]), key


def test_relative_offset_index_small_window():
    idx = relative_offset_index(2)  # tokens (0,0) (0,1) (1,0) (1,1)
    expected = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]])
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("config", [get_config("tiny_vit_t"), PADDED], ids=lambda c: c.name)
def test_features_match_reference(config):
    ours, ref = _random_pair(config, seed=1)
    images = torch.randn(
        2, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        features = ours(images)
        flipped = ours(images.flip(-1))
    expected = _reference_features(ref, images)
    side = config.img_size // 16
    assert features.shape == (2, config.prompt_embed_dim, side, side)
    assert _rel_err(features, expected) < 1e-4
    # The comparison can fail: a different input gives different features.
    assert _rel_err(flipped, expected) > 1e-2


def test_eval_mode_uses_running_statistics():
    config = get_config("tiny_vit_t")
    ours, _ = _random_pair(config)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eval_out = ours(images)
        train_out = ours.train()(images)
    assert _rel_err(train_out, eval_out) > 1e-2


@pytest.mark.slow
def test_vit_t_features_match_reference_at_1024():
    config = get_config("vit_t")
    ours, ref = _random_pair(config, seed=4)
    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = ours(images)
    expected = _reference_features(ref, images)
    assert features.shape == (1, 256, 64, 64)
    assert _rel_err(features, expected) < 1e-4


def test_full_vit_t_model_loads_into_reference_mobile_sam():
    import warnings

    from napari_sam.registry import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry

    ours = build_model("vit_t").state_dict()
    ref = sam_model_registry["vit_t"]()
    assert sorted(ours) == sorted(ref.state_dict())
    ref.load_state_dict(ours, strict=True)


def test_rejects_images_without_three_channels():
    model = _encoder(get_config("tiny_vit_t"))
    with pytest.raises(
        ValueError, match=r"images must have shape \(B, 3, H, W\), got \(1, 1, 128, 128\)"
    ):
        model(torch.zeros(1, 1, 128, 128))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"depths": (1, 1, 1)}, r"depths must have 4 entries, got \(1, 1, 1\)"),
        ({"num_heads": (1, 3, 3, 4)}, r"divisible by num_heads.*num_heads=\(1, 3, 3, 4\)"),
        ({"window_sizes": (4, 0, 4, 2)}, r"window_sizes must be positive, got \(4, 0, 4, 2\)"),
    ],
)
def test_rejects_invalid_configuration(change, message):
    config = get_config("tiny_vit_t")
    bad = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, **change))
    with pytest.raises(ValueError, match=message):
        _encoder(bad)
