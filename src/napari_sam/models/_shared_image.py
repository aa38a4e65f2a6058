"""The two-way transformer for prompts that share one image, in factored form.

When every prompt of a batch sees the same image tokens ``x`` (one image
embedding, no per-prompt mask prompt), the image side of SAM's decoder
changes per prompt only through the image-to-token attentions, and each of
those adds a low-rank term: for image token ``j``,

    y_{l+1, j} = keys_{l, j} + P_{l, j} U_l

where ``P_l`` (``N x R``) are the attention probabilities of that token over
the ``R = heads x tokens`` (head, prompt token) pairs and ``U_l`` (``R x C``)
are the prompt tokens' values with ``out_proj`` folded in (see
``Attention._few_keys``). The layer norms in between only centre each token
(linear), scale it by a per-token number ``r`` (its inverse standard
deviation) and apply a per-channel affine map. So every linear map ``W`` of
the image tokens at any layer splits into a part shared by all prompts and
an ``N x R`` by ``R x out`` product per layer (``mean_l``, ``r_l``: mean and
inverse standard deviation of ``y_l`` over channels; ``g_l, b_l``: the norm
that makes ``keys_l = r_l g_l (y_l - mean_l) + b_l``; ``x_c``: ``x`` centred
over channels, and the first layer's values centred too, so ``y_1`` is):

    W (y_1 - mean_1)     = x_c W^T + P_0 (U_0 W^T) - mean_1 (W 1)
    W (y_{l+1} - mean)   = r_l (W diag(g_l)) (y_l - mean_l) + W b_l + P_l (U_l W^T) - mean (W 1)

The shared products ``x_c (W G)^T`` are computed once per image and kept in
a :class:`SharedImageWork`; per prompt, a 256-wide projection of 4096
tokens then costs ``4096 x R`` multiply-adds per output channel with
``R = 56`` instead of 256. The same sums in another order: equal to the
direct arithmetic up to float rounding. Each level's tokens are still
materialised once (a residual needs them), and its norm gives their
statistics. In float32 the token-to-image attentions after the first
layer never form their keys and values either (:meth:`FactoredKeys.attend`):
the queries are contracted with each factor first, and the values' factors
are summed with the attention weights.

In half precision the attentions after the first layer go through the
formed tokens instead, forming no keys, values or image queries either
(:func:`_attend_through`, :func:`_few_keys_mix_through`): the prompt side
is contracted with the projection's weight first (``(q W_k) x^T``, then
``(p x) W_v^T``), a few products of ``N x C`` tokens with ``C x heads T``
per prompt. On a CPU in bf16 a low-rank ``N x R`` by ``R x out`` product
(``R = 56``) runs at a fifth of the rate of a full-width one, and a pass
over an ``N x out`` result costs about as much as such a product, so this
is the faster form there (measured on a Xeon with AMX: batches of 4, 6.1
against 7.5 ms a prompt; one prompt 20.0 ms, 27.7 ms with the factors).
The mask upscaling then starts from the last formed tokens
(:attr:`FactoredKeys.formed`), in half precision or for one prompt.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import module_tensors
from .transformer import (
    _HALF,
    Attention,
    TwoWayAttentionBlock,
    TwoWayTransformer,
    _block_diagonal,
    _own_columns,
)

__all__ = ["FactoredKeys", "SharedImageWork", "can_factor", "factored_transformer"]


@dataclass(eq=False)
class SharedImageWork:
    """Per-image products of the factored decoder, reusable across calls.

    A caller that decodes several prompt batches against the same image
    embedding (clicks in a session, the batches of an automatic run) keeps
    one of these per embedding and precision; the decoder fills it on first
    use (image products, and the weights with norm scales folded in) and
    checks ``token`` (its weights and inputs) on every call.
    """

    token: tuple | None = None
    products: dict[object, Any] = field(default_factory=dict)

    def check(self, token: tuple) -> None:
        """Forget every product if ``token`` differs from the one they were made for."""
        if token != self.token:
            self.products.clear()
            self.token = token

    def get(self, key: object, build: Callable[[], Any]) -> Any:
        """The product named ``key``, built by ``build()`` on first use."""
        value = self.products.get(key)
        if value is None:
            value = self.products[key] = build()
        return value


def _version_token(*tensors: torch.Tensor) -> tuple:
    """Storage, in-place version (none for inference tensors), dtype and shape of each tensor."""
    return tuple(
        (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, tuple(t.shape))
        for t in tensors
    )


def work_token(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """Identifies the weights and shared inputs a :class:`SharedImageWork` was built from.

    Weights by storage and in-place version. Inputs by storage, version and
    a checksum of an evenly strided sample of their values (about a
    thousand), so a new tensor with other values that reuses a freed
    tensor's memory is not mistaken for the old one, at a cost far below one
    prompt's decoding; an input that broadcasts at most that many values
    (the dense embedding of "no mask", cast anew on each call in half
    precision) by those values alone.
    """
    parts = []
    for t in inputs:
        compact = broadcast_source(t)
        if compact.numel() <= _SAMPLE:
            values = tuple(compact.float().flatten().tolist())
            parts.append((t.dtype, tuple(t.shape), tuple(compact.shape), values))
            continue
        at = _sample_at(compact.numel(), compact.device)
        if compact.is_contiguous():
            sample = compact.view(-1)[at]
        else:
            sample = compact[_sample_coords(tuple(compact.shape), compact.device)]  # no copy
        parts.append((*_version_token(t)[0], float(sample.float().sum())))
    return (_version_token(*module_tensors(module)), tuple(parts))


_SAMPLE = 1024


def broadcast_source(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every broadcast axis (stride 0, size > 1) narrowed to its one slice.

    ``broadcast_source(t).expand_as(t)`` is ``t``; the values it repeats are
    read (or cast) once.
    """
    for dim in range(t.ndim):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


@functools.lru_cache(maxsize=16)
def _sample_at(numel: int, device: torch.device) -> torch.Tensor:
    """About a thousand evenly spread flat indices into ``numel`` values."""
    return torch.linspace(0, numel - 1, _SAMPLE, device=device).long()


@functools.lru_cache(maxsize=16)
def _sample_coords(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`_sample_at`'s flat indices as one index tensor per axis of ``shape``.

    Plain integer arithmetic: ``torch.unravel_index`` checks its arguments
    through ``torch.fx``'s symbolic shapes, whose first import (sympy) cost
    the first click of a process 0.7 s.
    """
    flat = _sample_at(math.prod(shape), device)
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return tuple(reversed(coords))


def can_factor(transformer: nn.Module, n_tokens: int) -> bool:
    """Whether :func:`factored_transformer` applies (and pays) for ``n_tokens`` prompt tokens.

    It needs the standard two-way transformer (exactly these classes) with
    at least one layer, inference without gradients, and few enough tokens
    that ``heads x tokens`` is below the cross-attention width (beyond that
    the low-rank terms are no cheaper than the direct projections).
    """
    if type(transformer) is not TwoWayTransformer or transformer.depth < 1:
        return False
    if torch.is_grad_enabled():
        return False
    for layer in transformer.layers:
        if type(layer) is not TwoWayAttentionBlock:
            return False
        attn = layer.cross_attn_image_to_token
        if attn.num_heads * n_tokens >= attn.internal_dim:
            return False
    return True


@dataclass(eq=False)
class _Level:
    """What defines one level's image tokens ``y`` (before its norm) beyond the shared ``x_c``.

    ``y_1 = x_c + p u`` (``u`` centred: ``y_1`` is centred); ``y_{l+1} = keys_l + p u``.
    """

    p: torch.Tensor  # B x N x R: probabilities of the image-to-token attention that made it
    u: torch.Tensor  # B x R x C: its folded values
    rstd: torch.Tensor  # B x N x 1: 1 / std of y over channels (from the norm)
    mean: torch.Tensor  # B x N x 1: mean of y over channels (from the norm)
    norm: nn.LayerNorm  # the norm applied to y


@dataclass(eq=False)
class FactoredKeys:
    """Image tokens of every prompt after the last layer, kept in factored form.

    Attributes
    ----------
    x_c : Tensor of shape (1, N, C)
        Shared image tokens, centred over channels.
    levels : list of _Level
        One per transformer layer (level ``l + 1`` is the output of layer ``l``).
    work : SharedImageWork
        Shared products (filled on demand).
    formed : Tensor of shape (B, N, C), optional
        The last level's tokens after its norm, where projecting them beats
        the factors (:func:`factored_transformer` decides); :meth:`project`
        of the last level then uses them.
    """

    x_c: torch.Tensor
    levels: list[_Level]
    work: SharedImageWork
    formed: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor) -> FactoredKeys:
        """The same keys for the prompts ``index`` only (as ``keys[index]`` of a tensor)."""
        levels = [
            _Level(lv.p[index], lv.u[index], lv.rstd[index], lv.mean[index], lv.norm)
            for lv in self.levels
        ]
        formed = None if self.formed is None else self.formed[index]
        return FactoredKeys(self.x_c, levels, self.work, formed)

    def _centred_product(self, level: int, weight: torch.Tensor, name: tuple) -> torch.Tensor:
        """``weight @ (y_level - mean)`` for every prompt and token: ``B x N x out``.

        ``weight`` is ``out x C``; ``name`` identifies it (with the chain of
        norm scales folded in) for the shared product cache. With
        ``keys_l = r_l g_l (y_l - mean_l) + b_l`` and ``y_{l+1} = keys_l + p_l u_l``::

            W (y_1 - mean_1)     = x_c W^T + p_0 (u_0 W^T) - mean_1 (W 1)
            W (y_{l+1} - mean)   = r_l W g_l (y_l - mean_l) + W b_l + p_l (u_l W^T) - mean (W 1)
        """
        lv = self.levels[level - 1]
        h = lv.u @ weight.T  # B x R x out
        ones = self.work.get((*name, "ones"), lambda: weight.sum(dim=1))
        if level == 1:
            base = self.work.get(name, lambda: self.x_c @ weight.T)  # 1 x N x out
            base = base.expand(h.shape[0], -1, -1)
        else:
            prev, inner_name, scaled, shift = self._through_norm(level, weight, name)
            base = self._centred_product(level - 1, scaled, inner_name)
            base = base.mul_(prev.rstd).add_(shift)
        return torch.baddbmm(base, lv.p, h).addcmul_(lv.mean, ones, value=-1)

    def _through_norm(
        self, level: int, weight: torch.Tensor, name: tuple
    ) -> tuple[_Level, tuple, torch.Tensor, torch.Tensor]:
        """Level ``level - 1`` and ``weight`` pushed through its norm (``level > 1``).

        ``W keys_{l-1} = r W diag(g) (y - mean) + W b``: returns that level,
        the cache name of ``W diag(g)``, ``W diag(g)`` and ``W b`` (cached).
        """
        prev = self.levels[level - 2]
        inner_name = (*name, "g")
        scaled = self.work.get((*inner_name, "weight"), lambda: weight * prev.norm.weight)
        shift = self.work.get((*name, "shift"), lambda: weight @ prev.norm.bias)
        return prev, inner_name, scaled, shift

    def project(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        name: str,
        *,
        level: int | None = None,
        added: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``F.linear(keys_level, weight, bias) (+ added)`` for every prompt: ``B x N x out``.

        From the factors, or for the last level from :attr:`formed` where
        the tokens were kept.

        Parameters
        ----------
        weight : Tensor of shape (out, C)
        bias : Tensor of shape (out,), optional
        name : str
            Names ``weight`` for the shared-product cache.
        level : int, optional
            Which layer's output (1-based); default the last.
        added : Tensor of shape (1, N, out), optional
            A shared term added to the result (a projected positional encoding).
        """
        if self.formed is not None and level in (None, len(self.levels)):
            out = F.linear(self.formed, weight, bias)
            return out if added is None else out.add_(added)
        level = len(self.levels) if level is None else level
        lv = self.levels[level - 1]
        g, b = lv.norm.weight, lv.norm.bias
        key = (name, level)
        scaled = self.work.get((*key, "weight"), lambda: weight * g)
        const = self.work.get(
            (*key, "const"), lambda: weight @ b if bias is None else torch.addmv(bias, weight, b)
        )
        out = self._centred_product(level, scaled, key).mul_(lv.rstd).add_(const)
        return out if added is None else out.add_(added)

    def attend(
        self, attn: Attention, q: torch.Tensor, pe: torch.Tensor, name: str, *, level: int
    ) -> torch.Tensor:
        """Prompt tokens attending to this level's image tokens; keys and values never formed.

        Equals ``attn._few_queries(attn.q_proj(q), attn.k_proj(keys + pe),
        attn.v_proj(keys))`` (``keys``: this level's tokens): each head's
        logits are its queries dotted with the factors of its keys (the
        shared product, the per-token scalings and the ``P (U W^T)`` terms of
        :meth:`_centred_product`, every one contracted with the queries
        first), and its output the probability-weighted sums of the factors
        of its values. Per prompt that is a few ``N x R`` by ``R x heads
        tokens`` products instead of two ``N x R`` by ``R x inner`` ones and
        the ``N x inner`` keys and values they would fill.

        Parameters
        ----------
        attn : Attention
            A token-to-image attention.
        q : Tensor of shape (B, T, C)
            Prompt tokens plus their positional encoding.
        pe : Tensor of shape (1, N, C)
            The image tokens' positional encoding (added to the keys).
        name : str
            Names ``attn`` for the shared-product cache.
        level : int
            Which layer's output the keys are (1-based).

        Returns
        -------
        Tensor of shape (B, T, inner)
            The head outputs side by side, before ``out_proj``.
        """
        lv = self.levels[level - 1]
        qp = attn.q_proj(q)
        batch, n_q, inner = qp.shape
        heads, n = attn.num_heads, lv.p.shape[1]
        d = inner // heads
        qs = qp * (1.0 / math.sqrt(d))
        q_bd = _block_diagonal(qs, heads)  # B x heads T x inner
        q_heads = qs.view(batch, n_q, heads, d).permute(2, 0, 1, 3).reshape(heads, -1, d)
        g, b = lv.norm.weight, lv.norm.bias
        key = (name, level)
        k, v = attn.k_proj, attn.v_proj
        w_k = self.work.get((*key, "k weight"), lambda: k.weight * g)
        c_k = self.work.get((*key, "k const"), lambda: torch.addmv(k.bias, k.weight, b))
        w_v = self.work.get((*key, "v weight"), lambda: v.weight * g)
        c_v = self.work.get((*key, "v const"), lambda: torch.addmv(v.bias, v.weight, b))
        pe_k = self.work.get(  # heads x d x N
            (*key, "k pe"),
            lambda: _heads_first(pe @ k.weight.T, heads).transpose(1, 2).contiguous(),
        )
        rstd = lv.rstd.view(1, batch, 1, n)
        logits = self._dot(level, w_k, (*key, "k"), q_heads, q_bd)  # heads x B T x N
        logits.view(heads, batch, n_q, n).mul_(rstd).add_(_rows_first(q_bd @ c_k, heads))
        probs = logits.baddbmm_(q_heads, pe_k).softmax(dim=-1)
        probs.view(heads, batch, n_q, n).mul_(rstd)  # v = r (W' (y - mean)) + c_v, sum p = 1
        return self._weighted(level, w_v, (*key, "v"), probs).add_(c_v)

    def _dot(
        self,
        level: int,
        weight: torch.Tensor,
        name: tuple,
        q_heads: torch.Tensor,
        q_bd: torch.Tensor,
    ) -> torch.Tensor:
        """Each head's queries dotted with its rows of ``weight (y_level - mean)``.

        The terms of :meth:`_centred_product`, each contracted with the
        queries before it meets the image tokens. ``weight`` is ``inner x C``
        (head ``h``'s rows ``h d .. (h + 1) d``); ``q_heads`` the queries
        ``heads x B T x d``, ``q_bd`` the same block-diagonal
        (``B x heads T x inner``). Returns ``heads x B T x N``.
        """
        lv = self.levels[level - 1]
        heads, batch, n = q_heads.shape[0], q_bd.shape[0], lv.p.shape[1]
        n_q = q_heads.shape[1] // batch
        if level == 1:
            shared = self.work.get(  # heads x d x N
                (*name, "shared"),
                lambda: _heads_first(self.x_c @ weight.T, heads).transpose(1, 2).contiguous(),
            )
            out = torch.bmm(q_heads, shared)
        else:
            prev, inner_name, scaled, shift = self._through_norm(level, weight, name)
            out = self._dot(level - 1, scaled, inner_name, q_heads, q_bd)
            out.view(heads, batch, n_q, n).mul_(prev.rstd.view(1, batch, 1, n)).add_(
                _rows_first(q_bd @ shift, heads)
            )
        ones = self.work.get((*name, "ones"), lambda: weight.sum(dim=1))
        low_rank = (lv.u @ weight.T) @ q_bd.transpose(1, 2)  # B x R x heads T
        terms = torch.bmm(low_rank.transpose(1, 2), lv.p.transpose(1, 2))  # B x heads T x N
        out4 = out.view(heads, batch, n_q, n)
        out4.add_(terms.view(batch, heads, n_q, n).transpose(0, 1))
        means = lv.mean.view(1, batch, 1, n)
        return out4.addcmul_(_rows_first(q_bd @ ones, heads), means, value=-1).view_as(out)

    def _weighted(
        self, level: int, weight: torch.Tensor, name: tuple, w: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j w[h, b t, j] (weight (y_level - mean))[b, j, head h's rows]``: ``B x T x inner``.

        ``w`` is ``heads x B T x N`` (each head's attention weights, read
        only); the terms of :meth:`_centred_product` are summed over the
        image tokens one by one.
        """
        lv = self.levels[level - 1]
        heads, bt, n = w.shape
        batch, inner = lv.p.shape[0], weight.shape[0]
        n_q, d = bt // batch, inner // heads
        by_prompt = w.view(heads, batch, n_q, n).transpose(0, 1).reshape(batch, heads * n_q, n)
        full = torch.bmm(by_prompt, lv.p) @ (lv.u @ weight.T)  # B x heads T x inner
        ones = self.work.get((*name, "ones"), lambda: weight.sum(dim=1))
        full.addcmul_(torch.bmm(by_prompt, lv.mean), ones, value=-1)
        own = _own_columns(full, heads)  # B x T x inner
        per_head = own.view(batch, n_q, heads, d)
        if level == 1:
            shared = self.work.get(  # heads x N x d
                (*name, "shared"), lambda: _heads_first(self.x_c @ weight.T, heads)
            )
            per_head.add_(torch.bmm(w, shared).view(heads, batch, n_q, d).permute(1, 2, 0, 3))
            return own
        prev, inner_name, scaled, shift = self._through_norm(level, weight, name)
        scaled_w = (w.view(heads, batch, n_q, n) * prev.rstd.view(1, batch, 1, n)).view_as(w)
        own.add_(self._weighted(level - 1, scaled, inner_name, scaled_w))
        total = w.sum(dim=-1).view(heads, batch, n_q, 1).permute(1, 2, 0, 3)  # B x T x heads x 1
        per_head.addcmul_(total, shift.view(heads, d))
        return own


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``1 x N x inner`` -> ``heads x N x inner / heads`` (contiguous)."""
    n, inner = x.shape[-2:]
    return x.reshape(n, heads, inner // heads).transpose(0, 1).contiguous()


def _rows_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x heads T`` (block-diagonal rows) -> ``heads x B x T x 1``, to broadcast over tokens."""
    batch = x.shape[0]
    return x.view(batch, heads, -1).transpose(0, 1)[..., None]


def factored_transformer(
    transformer: TwoWayTransformer,
    src: Callable[[], torch.Tensor],
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    work: SharedImageWork,
) -> tuple[torch.Tensor, FactoredKeys]:
    """Run the two-way transformer for a batch of prompts on one shared image.

    Parameters
    ----------
    transformer : TwoWayTransformer
        Checked with :func:`can_factor` by the caller.
    src : callable
        ``src()`` gives the image tokens shared by every prompt, ``1 x C x h x w``
        (embedding plus the shared dense prompt); called only when ``work``
        does not hold them yet.
    image_pe : Tensor of shape (1, C, h, w)
    tokens : Tensor of shape (B, T, C)
        Output and prompt tokens (also their positional encoding).
    work : SharedImageWork
        Shared products for these tokens (validated by the caller).

    Returns
    -------
    queries : Tensor of shape (B, T, C)
        As :meth:`TwoWayTransformer.forward`.
    keys : FactoredKeys
        The image tokens after the last layer, for :meth:`FactoredKeys.project`.
    """
    x = work.get("x", lambda: src().flatten(2).transpose(1, 2).contiguous())  # 1 x N x C
    pe = work.get("pe", lambda: image_pe.flatten(2).transpose(1, 2).contiguous())
    x_c = work.get("x_c", lambda: (x.float() - x.float().mean(-1, keepdim=True)).to(x.dtype))
    levels: list[_Level] = []
    keys = FactoredKeys(x_c, levels, work)
    # After the first layer: attention over the factors (FactoredKeys.attend) in float32,
    # through the formed tokens in half precision (see the module notes).
    half, batch = x.dtype in _HALF, tokens.shape[0]
    queries, query_pe = tokens, tokens
    image: torch.Tensor | None = None  # the current level's normalised image tokens
    for i, layer in enumerate(transformer.layers):
        queries = layer.token_self_attention(queries, query_pe)

        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        q = queries + query_pe
        inner = t2i.internal_dim
        if i == 0:
            kv = work.get(("kv", 0), lambda l=layer: _shared_kv(l, x, pe))
            q_img = work.get(("q", 0), lambda l=layer: _shared_q(l, x, pe))
            attended = t2i._few_queries(t2i.q_proj(q), kv[..., :inner], kv[..., inner:])
        elif half:
            attended = _attend_through(work, ("t2i", i), t2i, q, image, pe)
        else:
            attended = keys.attend(t2i, q, pe, f"layer{i}", level=i)
            q_img = _level_queries(keys, layer, pe, i)
        queries = layer.norm2(queries + t2i.out_proj(attended))
        queries = layer.norm3(queries + layer.mlp(queries))

        q = queries + query_pe
        kp, vp = i2t.k_proj(q), i2t.v_proj(queries)
        if i > 0 and half:  # B x N x R, B x R x C
            p = _few_keys_mix_through(work, ("i2t", i), i2t, kp, image, pe)
            u = i2t._folded_values(vp, batch)
        else:
            p, u = i2t._few_keys_factors(q_img, kp, vp)
        if i == 0:  # centred values keep y_1 centred like x_c (no cancellation later)
            u = u - u.mean(dim=-1, keepdim=True)
            y = torch.baddbmm(x_c.expand(p.shape[0], -1, -1), p, u)
        else:
            y = torch.baddbmm(image, p, u)
        norm = layer.norm4
        image, mean, rstd = torch.native_layer_norm(
            y, norm.weight.shape, norm.weight, norm.bias, norm.eps
        )
        levels.append(_Level(p, u, rstd, mean, norm))
        del y

    final = transformer.final_attn_token_to_image
    q = queries + query_pe
    if half:
        attended = _attend_through(work, ("final",), final, q, image, pe)
    else:
        attended = keys.attend(final, q, pe, "final", level=len(levels))
    queries = transformer.norm_final_attn(queries + final.out_proj(attended))
    if half or batch == 1:
        # The upscaling projects the formed tokens (measured: bf16 batches of 4, 8.2 vs 8.5 ms
        # a prompt; one float32 prompt about the same). Float32 batches keep the factors.
        keys.formed = image
    return queries, keys


def _shared_kv(layer: TwoWayAttentionBlock, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Layer 0's token-to-image keys and values of the shared image: ``1 x N x 2 inner``."""
    attn = layer.cross_attn_token_to_image
    return torch.cat([attn.k_proj(x + pe), attn.v_proj(x)], dim=-1)


def _shared_q(layer: TwoWayAttentionBlock, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Layer 0's image-to-token queries of the shared image: ``1 x N x inner``."""
    return layer.cross_attn_image_to_token.q_proj(x + pe)


def _logits_through(
    work: SharedImageWork,
    name: tuple,
    vectors: torch.Tensor,
    linear: nn.Linear,
    tokens: torch.Tensor,
    pe: torch.Tensor,
) -> torch.Tensor:
    """``vectors @ linear(tokens + pe)^T`` without forming the projection: ``B x R x N``.

    ``(vectors W) tokens^T + vectors (W pe + b)^T``: the first a product
    with ``C``-wide rows per prompt, the second with a shared term kept in
    ``work`` under ``name``.

    Parameters
    ----------
    vectors : Tensor of shape (B, R, inner)
        Prompt-side vectors (block-diagonal per head, scaled).
    linear : nn.Linear
        The image-side projection, ``inner x C``.
    tokens : Tensor of shape (B, N, C)
        Formed image tokens.
    pe : Tensor of shape (1, N, C)
    """
    weight = linear.weight
    shift = work.get(("through", *name), lambda: F.linear(pe, weight, linear.bias))  # 1 x N x inner
    batch, rows, inner = vectors.shape
    base = (vectors.reshape(-1, inner) @ shift[0].T).view(batch, rows, -1)
    return torch.baddbmm(base, vectors @ weight, tokens.transpose(1, 2))


def _attend_through(
    work: SharedImageWork,
    name: tuple,
    attn: Attention,
    q: torch.Tensor,
    tokens: torch.Tensor,
    pe: torch.Tensor,
) -> torch.Tensor:
    """Prompt tokens attending to formed image tokens, their keys and values never formed.

    Equals ``attn._few_queries(attn.q_proj(q), attn.k_proj(tokens + pe),
    attn.v_proj(tokens))`` up to rounding: the logits by
    :func:`_logits_through`, each head's output as ``(p tokens) W_v^T`` (its
    probabilities sum to 1, so it gets the bias once).

    Parameters
    ----------
    q : Tensor of shape (B, T, C)
        Prompt tokens plus their positional encoding.
    tokens : Tensor of shape (B, N, C)
    pe : Tensor of shape (1, N, C)

    Returns
    -------
    Tensor of shape (B, T, inner)
        The head outputs side by side, before ``out_proj``.
    """
    qp = attn.q_proj(q)
    heads = attn.num_heads
    d = qp.shape[-1] // heads
    q_bd = _block_diagonal(qp, heads) * (1.0 / math.sqrt(d))  # B x heads T x inner
    probs = _logits_through(work, name, q_bd, attn.k_proj, tokens, pe).softmax(dim=-1)
    mixed = torch.bmm(probs, tokens)  # B x heads T x C
    full = F.linear(mixed, attn.v_proj.weight, attn.v_proj.bias)  # B x heads T x inner
    return _own_columns(full, heads)


def _few_keys_mix_through(
    work: SharedImageWork,
    name: tuple,
    attn: Attention,
    kp: torch.Tensor,
    tokens: torch.Tensor,
    pe: torch.Tensor,
) -> torch.Tensor:
    """Image tokens attending to the prompt keys ``kp``, image queries never formed.

    The probabilities of :meth:`Attention._few_keys_factors` for the queries
    ``attn.q_proj(tokens + pe)``: ``B x N x heads T`` (a transposed view).
    """
    heads = attn.num_heads
    scale = 1.0 / math.sqrt(kp.shape[-1] // heads)
    k_bd = _block_diagonal(kp, heads) * scale  # B x heads T x inner
    logits = _logits_through(work, name, k_bd, attn.q_proj, tokens, pe)  # B x heads T x N
    probs = logits.view(kp.shape[0], heads, kp.shape[1], -1).softmax(dim=2)
    return probs.flatten(1, 2).transpose(1, 2)


def _level_queries(
    keys: FactoredKeys, layer: TwoWayAttentionBlock, pe: torch.Tensor, i: int
) -> torch.Tensor:
    """Layer ``i``'s image-to-token queries of every prompt: ``B x N x inner``."""
    q_proj = layer.cross_attn_image_to_token.q_proj
    added = keys.work.get(("q pe", i), lambda: pe @ q_proj.weight.T)
    return keys.project(q_proj.weight, q_proj.bias, f"layer{i} q", level=i, added=added)
