"""Prompt encoder: parity with the reference for every prompt kind, token layout, errors."""

from __future__ import annotations

import math

import pytest
import torch

from .._reference import reference_for

GEN_SEED = 7


def _points(batch: int, n: int, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(GEN_SEED)
    coords = torch.rand(batch, n, 2, generator=gen) * 127
    return coords, torch.tensor([labels] * batch)


def _boxes(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(GEN_SEED + 1)
    corner = torch.rand(batch, 2, generator=gen) * 60
    return torch.cat([corner, corner + 30 + torch.rand(batch, 2, generator=gen) * 30], dim=1)


def _mask(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(GEN_SEED + 2))


CASES = {
    "point": lambda: {"points": _points(1, 1, [1]), "boxes": None, "masks": None},
    "points_with_negatives": lambda: {
        "points": _points(1, 4, [1, 0, 0, 1]),
        "boxes": None,
        "masks": None,
    },
    "box": lambda: {"points": None, "boxes": _boxes(1), "masks": None},
    "box_and_points": lambda: {"points": _points(1, 2, [1, 0]), "boxes": _boxes(1), "masks": None},
    "mask": lambda: {"points": _points(1, 1, [1]), "boxes": None, "masks": _mask(1)},
    "mask_only": lambda: {"points": None, "boxes": None, "masks": _mask(1)},
    "nothing": lambda: {"points": None, "boxes": None, "masks": None},
    "batched_boxes": lambda: {"points": None, "boxes": _boxes(5), "masks": None},
    "batched_boxes_points_masks": lambda: {
        "points": _points(3, 2, [1, -1]),
        "boxes": _boxes(3),
        "masks": _mask(3),
    },
}

# (batch, sparse tokens) expected for each case.
LAYOUT = {
    "point": (1, 2),  # point + padding
    "points_with_negatives": (1, 5),
    "box": (1, 2),  # two corners
    "box_and_points": (1, 4),  # no padding with a box
    "mask": (1, 2),
    "mask_only": (1, 0),
    "nothing": (1, 0),
    "batched_boxes": (5, 2),
    "batched_boxes_points_masks": (3, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_matches_reference(tiny_model, case):
    ref = reference_for(tiny_model).prompt_encoder
    prompts = CASES[case]()
    sparse, dense = tiny_model.prompt_encoder(**prompts)
    ref_sparse, ref_dense = ref(**prompts)
    batch, tokens = LAYOUT[case]
    assert sparse.shape == (batch, tokens, 32)
    assert dense.shape == (batch, 32, 8, 8)
    torch.testing.assert_close(sparse, ref_sparse)
    torch.testing.assert_close(dense, ref_dense)


@torch.no_grad()
def test_dense_pe_matches_reference_and_definition(tiny_model):
    encoder = tiny_model.prompt_encoder
    pe = encoder.get_dense_pe()
    assert pe.shape == (1, 32, 8, 8)
    torch.testing.assert_close(pe, reference_for(tiny_model).prompt_encoder.get_dense_pe())
    # Cell (row 2, col 5) of an 8 x 8 grid sits at x = 5.5 / 8, y = 2.5 / 8.
    gauss = encoder.pe_layer.positional_encoding_gaussian_matrix
    phase = 2 * math.pi * ((torch.tensor([5.5, 2.5]) / 8 * 2 - 1) @ gauss)
    torch.testing.assert_close(pe[0, :, 2, 5], torch.cat([phase.sin(), phase.cos()]))


@torch.no_grad()
def test_point_tokens_follow_label_semantics(tiny_model):
    encoder = tiny_model.prompt_encoder
    coords = torch.tensor([[[10.0, 20.0], [10.0, 20.0], [10.0, 20.0]]])
    sparse, _ = encoder((coords, torch.tensor([[1, 0, -1]])), None, None)
    pos = encoder.point_embeddings[1].weight[0]
    neg = encoder.point_embeddings[0].weight[0]
    # Same position: positive and negative tokens differ only by their kind embedding.
    torch.testing.assert_close(sparse[0, 0] - pos, sparse[0, 1] - neg)
    # A -1 label and the appended padding token are exactly the not-a-point embedding.
    not_a_point = encoder.not_a_point_embed.weight[0]
    assert torch.equal(sparse[0, 2], not_a_point)
    assert torch.equal(sparse[0, 3], not_a_point)
    # Integer coordinates are pixel centres: (10, 20) encodes as (10.5, 20.5) / 128.
    expected = encoder.pe_layer.encode_unit(torch.tensor([10.5, 20.5]) / 128)
    torch.testing.assert_close(sparse[0, 0], expected + pos)


@torch.no_grad()
def test_single_mask_is_shared_by_batched_boxes(tiny_model):
    encoder = tiny_model.prompt_encoder
    _, dense = encoder(None, _boxes(4), _mask(1))
    _, single = encoder(None, None, _mask(1))
    assert dense.shape == (4, 32, 8, 8)
    torch.testing.assert_close(dense, single.expand(4, -1, -1, -1))


def test_attributes(tiny_model):
    encoder = tiny_model.prompt_encoder
    assert encoder.image_embedding_hw == (8, 8)
    assert encoder.input_image_hw == (128, 128)
    assert encoder.mask_input_hw == (32, 32)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (
            {"points": (torch.zeros(1, 3, 2), torch.ones(1, 2)), "boxes": None, "masks": None},
            r"point labels must have shape \(1, 3\) \(B, N\), got \(1, 2\)",
        ),
        (
            {"points": (torch.zeros(1, 3), torch.ones(1, 3)), "boxes": None, "masks": None},
            r"point coords must have shape \(B, N, 2\), got \(1, 3\)",
        ),
        (
            {"points": None, "boxes": None, "masks": torch.zeros(1, 1, 16, 16)},
            r"masks must have shape \(B, 1, 32, 32\), got \(1, 1, 16, 16\)",
        ),
        (
            {"points": (torch.zeros(2, 1, 2), torch.ones(2, 1)), "boxes": torch.zeros(3, 4)},
            "prompt batch sizes must agree",
        ),
    ],
)
def test_bad_prompts_are_refused(tiny_model, prompts, message):
    prompts.setdefault("masks", None)
    with pytest.raises(ValueError, match=message):
        tiny_model.prompt_encoder(**prompts)
