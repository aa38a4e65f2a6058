"""models/common.py: module_tensors, the fast walk behind the weight fingerprints."""

from __future__ import annotations

import torch
from torch import nn

from napari_sam.models.common import LayerNorm2d, module_tensors
from napari_sam.registry import build_model


def test_module_tensors_lists_every_parameter_and_buffer():
    decoder = build_model("tiny_vit_b").mask_decoder
    expected = [*decoder.parameters(), *decoder.buffers()]
    got = module_tensors(decoder)
    assert len(got) == len(expected)
    assert {id(t) for t in got} == {id(t) for t in expected}
    assert [id(t) for t in got] == [id(t) for t in module_tensors(decoder)]  # a fixed order


def test_module_tensors_sees_buffers_replaced_parameters_and_empty_slots():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), LayerNorm2d(2))
    model.register_module("missing", None)
    model[0].register_parameter("bias", None)
    before = module_tensors(model)
    assert any(t is model[1].running_mean for t in before)
    assert not any(t is None for t in before)
    model[0].weight = nn.Parameter(torch.zeros(4, 3))
    after = module_tensors(model)
    assert any(t is model[0].weight for t in after)
    assert len(after) == len(before)
