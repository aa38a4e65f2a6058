"""Linear layers with weights pre-packed for oneDNN (bf16 inference on CPUs with AMX).

``F.linear`` in bfloat16 on a CPU hands oneDNN the weight in plain layout,
to be put into its blocked layout on each call; for the ViT encoder's
``4096 x 768`` by ``768 x 3072`` products, packing it once and fusing the
activation saves about a quarter of the feed-forward's time (below).
:class:`PackedLinear` holds the weight already reordered
(``torch.ops.mkldnn._reorder_linear_weight``, the same packing torch's
inductor uses for CPU linears) and can apply the feed-forward's GELU in
the same kernel, on the float32 accumulators before the single rounding to
bf16. :func:`pack_linears` packs the ``nn.Linear`` layers of an inference
copy of a module in place and fuses each
:class:`~napari_sam.models.common.MLPBlock`'s GELU into its first layer.

Measured on a 2-core Xeon with AMX (torch 2.14, bf16): the ViT-B feed-forward
on ``4096`` tokens 31 ms packed and fused against 44 ms with ``F.linear``
(medians). Used only where that was measured: bf16 on a CPU with AMX
(:func:`napari_sam.models.rel_pos.cpu_has_amx`), and when the packing
kernels exist in this torch build and give ``F.linear``'s results
(:func:`packing_available`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock

__all__ = ["PackedLinear", "pack_linears", "packing_available"]

_ACTIVATIONS = ("none", "gelu")


def _packed_op():
    """The oneDNN linear kernel with a pre-packed weight, or None in builds without it."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops._linear_pointwise, ops._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def packing_available() -> bool:
    """Whether this torch build packs bf16 linears and gives ``F.linear``'s results.

    Checked once per process on a small random layer (with and without the
    fused GELU); any error or a mismatch beyond bf16 rounding means no.
    """
    found = _packed_op()
    if found is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 96, generator=gen).bfloat16()
        weight = torch.randn(80, 96, generator=gen).bfloat16()
        bias = torch.randn(80, generator=gen).bfloat16()
        with torch.inference_mode():
            layer = PackedLinear(weight, bias, rows_hint=64)
            fused = PackedLinear(weight, bias, rows_hint=64, activation="gelu")
            plain = F.linear(x.float(), weight.float(), bias.float())
            residual = torch.randn(64, 80, generator=gen).bfloat16()
            ok = all(
                torch.allclose(got.float(), want, rtol=0.02, atol=0.05)
                for got, want in (
                    (layer(x), plain),
                    (fused(x), F.gelu(plain)),
                    (layer(x, residual), plain + residual.float()),
                )
            )
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(ok)


class PackedLinear(nn.Module):
    """An inference-only linear layer whose weight is packed for oneDNN.

    Parameters
    ----------
    weight : Tensor of shape (out_features, in_features), bfloat16
        The layer's weight (as ``nn.Linear.weight``); packed here, not kept.
    bias : Tensor of shape (out_features,), optional
        Same dtype as ``weight``.
    rows_hint : int
        Typical number of rows (tokens) per call; picks the packed layout.
        Any number of rows works.
    activation : {"none", "gelu"}, optional
        Applied to the output in the same kernel (``"gelu"``: the exact, erf
        form, as ``nn.GELU()``). Default ``"none"``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        rows_hint: int,
        activation: str = "none",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        found = _packed_op()
        if found is None:
            raise RuntimeError("this torch build has no oneDNN linear packing (mkldnn)")
        self._op, reorder = found
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.activation = activation
        with torch.no_grad():
            packed = reorder(weight.detach().contiguous(), int(rows_hint))
        self.register_buffer("packed_weight", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the layer (and its activation) to the last axis.

        Parameters
        ----------
        x : Tensor of shape (..., in_features), dtype of the weight
        residual : Tensor of shape (..., out_features), optional
            Added to the output in the same kernel, rounded once (layers
            without an activation only); not changed. ViT-B encoder, bf16,
            4096 tokens: the second feed-forward layer 11.0 ms against
            12.5 ms for the layer and an in-place add, the attention's
            projection 2.6 against 3.4 ms.

        Returns
        -------
        Tensor of shape (..., out_features)
            A new tensor, also with ``residual``.
        """
        rows = x.reshape(-1, self.in_features)
        if residual is not None:
            if self.activation != "none":
                raise ValueError("a residual is added only by a layer without an activation")
            other = residual.reshape(-1, self.out_features)
            out = self._op.binary(rows, other, self.packed_weight, self.bias, "add")
            return out.reshape(residual.shape)
        algorithm = "none" if self.activation == "gelu" else ""
        out = self._op(rows, self.packed_weight, self.bias, self.activation, [], algorithm)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation!r}"
        )


def pack_linears(module: nn.Module, *, rows_hint: int) -> nn.Module:
    """Pack ``module``'s linear layers for oneDNN, in place (an inference copy's).

    Every ``nn.Linear`` becomes a :class:`PackedLinear`; in every
    :class:`~napari_sam.models.common.MLPBlock` with an exact ``nn.GELU`` the
    activation moves into the first layer's kernel (the block's ``act``
    becomes ``nn.Identity``). Pass a copy made for inference (such as
    :func:`napari_sam.precision.cast_module`'s build): parameter names change
    (``lin1.weight`` becomes ``lin1.packed_weight``) and no gradients flow.

    Parameters
    ----------
    module : nn.Module
        A bf16 module in eval mode.
    rows_hint : int
        Typical rows per call (tokens of one image), for the packed layout.

    Returns
    -------
    nn.Module
        ``module``, changed.
    """
    for parent in list(module.modules()):
        if (
            isinstance(parent, MLPBlock)
            and type(parent.act) is nn.GELU
            and parent.act.approximate == "none"
            and isinstance(parent.lin1, nn.Linear)
        ):
            lin1 = parent.lin1
            parent.lin1 = PackedLinear(
                lin1.weight, lin1.bias, rows_hint=rows_hint, activation="gelu"
            )
            parent.act = nn.Identity()
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = PackedLinear(child.weight, child.bias, rows_hint=rows_hint)
                setattr(parent, name, packed)
    return module
