"""The two-way transformer of SAM's mask decoder.

Prompt tokens and image tokens update each other: each layer runs token
self-attention, token-to-image cross-attention, a token MLP, then
image-to-token cross-attention; a final token-to-image attention closes
the stack. Positional encodings are re-added to queries and keys before
every attention (except the first layer's self-attention, which sees the
raw tokens and has no residual, as in the released model).

The image tokens may come as a batch of one shared by every prompt: the
first layer then projects them once and broadcasts (its image-to-token
update makes them per-prompt from there on).

Parameter names match the official checkpoints (``layers.<i>.self_attn.q_proj``,
``layers.<i>.cross_attn_token_to_image``, ``norm_final_attn``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]

# Attention with at most this many queries or keys uses explicit matmuls.
_SMALL_SIDE = 64
_HALF = (torch.bfloat16, torch.float16)


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width.

    Parameters
    ----------
    embedding_dim : int
        Width of inputs and output.
    num_heads : int
        Number of heads; must divide ``embedding_dim // downsample_rate``.
    downsample_rate : int, optional
        Internal width is ``embedding_dim // downsample_rate``. Default 1.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = embedding_dim // downsample_rate
        if num_heads <= 0 or inner % num_heads:
            raise ValueError(
                f"num_heads must divide the internal width {inner} "
                f"(embedding_dim // downsample_rate), got {num_heads}"
            )
        self.num_heads = num_heads
        self.internal_dim = inner
        self.q_proj = nn.Linear(embedding_dim, inner)
        self.k_proj = nn.Linear(embedding_dim, inner)
        self.v_proj = nn.Linear(embedding_dim, inner)
        self.out_proj = nn.Linear(inner, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x D`` -> ``B x heads x N x D / heads``."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_pe: torch.Tensor | None = None,
        k_pe: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``q + q_pe`` to ``k + k_pe`` with values ``v``.

        Parameters
        ----------
        q : Tensor of shape (B or 1, Nq, C)
        k, v : Tensor of shape (B or 1, Nk, C)
            A batch of one is projected once and broadcast.
        q_pe, k_pe : Tensor of shape (B or 1, Nq or Nk, C), optional
            Positional encodings added to the queries and keys before their
            projections. A batch-1 encoding of a batch of many image tokens
            is projected once (the projection is linear) instead of added
            to every prompt's copy.
        residual : Tensor of shape (B or 1, Nq, C), optional
            Added to the result (fused into the last matmul where possible).

        Returns
        -------
        Tensor of shape (B, Nq, C)
        """
        qp = _project(self.q_proj, q, q_pe)  # (B or 1) x Nq x inner
        kp = _project(self.k_proj, k, k_pe)  # (B or 1) x Nk x inner
        vp = self.v_proj(v)
        n_q, n_k = qp.shape[1], kp.shape[1]
        if n_k < n_q and n_k <= _SMALL_SIDE:
            return self._few_keys(qp, kp, vp, residual)
        if n_q < n_k and n_q <= _SMALL_SIDE:
            out = self.out_proj(self._few_queries(qp, kp, vp))
        else:
            qh, kh, vh = self._heads(qp), self._heads(kp), self._heads(vp)  # B x heads x N x d
            if min(n_q, n_k) <= _SMALL_SIDE:
                # Token self-attention (few queries, few keys): plain matmuls (the
                # reference's arithmetic) beat the fused kernel's tiling.
                logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[3])  # B x h x Nq x Nk
                heads_out = logits.softmax(dim=-1) @ vh  # B x heads x Nq x d
            else:
                batch = max(qh.shape[0], kh.shape[0], vh.shape[0])
                qh, kh, vh = (t.expand(batch, -1, -1, -1) for t in (qh, kh, vh))
                heads_out = F.scaled_dot_product_attention(qh, kh, vh)  # B x heads x Nq x d
            b, _, n, _ = heads_out.shape
            out = self.out_proj(heads_out.transpose(1, 2).reshape(b, n, self.internal_dim))
        return out if residual is None else residual + out

    def _few_queries(self, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        """Attention of a few query tokens over many keys, one head at a time.

        Each head reads its columns of the projected keys and values in place
        (a strided matrix is a valid matmul operand), so the large key and
        value tensors are never copied into a heads-first layout, and keys
        shared by every prompt (batch 1) are never expanded to the batch.
        Half precision takes :meth:`_few_queries_block_diagonal` instead, and
        a single prompt one heads-first matmul (its copies are small).

        Parameters
        ----------
        qp : Tensor of shape (B, Nq, inner)
        kp, vp : Tensor of shape (B or 1, Nk, inner)

        Returns
        -------
        Tensor of shape (B, Nq, inner)
            Head outputs side by side, before ``out_proj``.
        """
        batch, n_q, inner = qp.shape
        n_k = kp.shape[1]
        d = inner // self.num_heads
        if qp.dtype in _HALF:
            return self._few_queries_block_diagonal(qp, kp, vp)
        if batch == 1:  # one prompt: heads-first copies are small, one matmul beats 8
            qh, kh, vh = self._heads(qp), self._heads(kp), self._heads(vp)  # 1 x h x N x d
            probs = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
            return (probs @ vh).transpose(1, 2).reshape(1, n_q, inner)
        shared = kp.shape[0] == 1 and vp.shape[0] == 1
        out = qp.new_empty(batch, n_q, inner)
        for head in range(self.num_heads):
            cols = slice(head * d, (head + 1) * d)
            qh, kh, vh = qp[..., cols], kp[..., cols], vp[..., cols]
            if shared:  # fold the batch into the rows: one matmul against the shared keys
                logits = (qh.reshape(batch * n_q, d) @ kh[0].T).view(batch, n_q, n_k)
                probs = (logits / math.sqrt(d)).softmax(dim=-1)
                out[..., cols] = (probs.view(batch * n_q, n_k) @ vh[0]).view(batch, n_q, d)
            else:
                logits = qh @ kh.transpose(1, 2)  # B x Nq x Nk
                probs = (logits / math.sqrt(d)).softmax(dim=-1)
                out[..., cols] = probs @ vh.expand(batch, -1, -1)
        return out

    def _few_queries_block_diagonal(
        self, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_few_queries` as two full-width matmuls (half precision).

        Every head's queries sit in their own rows, zero outside the head's
        columns (``B x heads Nq x inner``), so one matmul against all of the
        keys gives every head's logits, and one against all of the values
        gives each head its columns (the diagonal blocks). Eight times the
        multiply-adds of per-head matmuls, yet several times faster in
        bfloat16 on a CPU, where matmuls of a few rows by 16 columns each
        cost far more than their arithmetic (measured: 0.19 vs 0.71 ms for
        the logits of one prompt, 1.3 vs 3.8 ms for eight).
        """
        batch, n_q, inner = qp.shape
        heads, d = self.num_heads, inner // self.num_heads
        q_bd = _block_diagonal(qp, heads) / math.sqrt(d)  # B x heads Nq x inner
        if kp.shape[0] == 1:
            logits = (q_bd.reshape(-1, inner) @ kp[0].T).view(batch, heads * n_q, -1)
        else:  # keys first: the many keys are read as they lie, not copied transposed
            logits = torch.bmm(kp, q_bd.transpose(1, 2)).transpose(1, 2)
        probs = logits.softmax(dim=-1)  # B x heads Nq x Nk
        if vp.shape[0] == 1:
            full = (probs.view(-1, probs.shape[-1]) @ vp[0]).view(batch, heads * n_q, inner)
        else:
            full = torch.bmm(probs, vp.expand(batch, -1, -1))
        return _own_columns(full, heads)

    def _few_keys(
        self,
        qp: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """Many query tokens (the image) attending to a few keys (the prompt tokens).

        Logits are laid out keys-first (``B x heads x Nk x Nq``), so the long
        axis stays contiguous and the softmax over the few keys is
        vectorised; each head reads its columns of the projected queries in
        place. With ``heads * Nk`` below the internal width, ``out_proj`` is
        folded into the values (each head's ``Nk`` values projected to ``C``
        first), which costs ``Nq * heads * Nk * C`` multiply-adds instead of
        ``Nq * inner * C`` (SAM's decoder: 8 heads, 7 tokens, 128 internal:
        2.3x fewer), and the bias and the residual ride on that matmul.
        The same sums in another order: equal up to float rounding.

        Parameters
        ----------
        qp : Tensor of shape (B or 1, Nq, inner)
        kp, vp : Tensor of shape (B, Nk, inner)
        residual : Tensor of shape (B or 1, Nq, C), optional

        Returns
        -------
        Tensor of shape (B, Nq, C)
        """
        _, n_k, inner = kp.shape
        if self.num_heads * n_k >= inner:
            batch = max(qp.shape[0], kp.shape[0], vp.shape[0])
            probs_t = self._few_keys_probs(qp, kp)
            heads_out = probs_t.transpose(-1, -2) @ self._heads(vp)  # B x heads x Nq x d
            out = self.out_proj(heads_out.transpose(1, 2).reshape(batch, qp.shape[1], inner))
            return out if residual is None else residual + out
        mix, projected = self._few_keys_factors(qp, kp, vp)
        if residual is None:
            return torch.bmm(mix, projected)
        return torch.baddbmm(residual.expand(mix.shape[0], -1, -1), mix, projected)

    def _few_keys_probs(self, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        """Softmax over the few keys, laid out ``B x heads x Nk x Nq``."""
        _, n_k, inner = kp.shape
        batch = max(qp.shape[0], kp.shape[0])
        n_q, heads = qp.shape[1], self.num_heads
        d = inner // heads
        if qp.dtype in _HALF:  # one full-width matmul (see _few_queries_block_diagonal)
            k_bd = _block_diagonal(kp, heads)  # (B or 1) x heads Nk x inner
            if qp.shape[0] == 1:
                logits = k_bd.reshape(-1, inner) @ qp[0].T  # (B heads Nk) x Nq
            else:
                logits = torch.bmm(k_bd.expand(batch, -1, -1), qp.transpose(1, 2))
            logits = logits.view(batch, heads, n_k, n_q)
            return (logits / math.sqrt(d)).softmax(dim=2)
        if batch == 1:  # one prompt: a heads-first copy and one matmul beat 8 matmuls
            logits = self._heads(kp) @ self._heads(qp).transpose(-1, -2)  # 1 x h x Nk x Nq
            return (logits / math.sqrt(d)).softmax(dim=2)
        logits = []
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            qh, kh = qp[..., cols], kp[..., cols]
            if qp.shape[0] == 1 and kp.shape[0] == batch:  # shared image side: batch into rows
                logits.append((kh.reshape(batch * n_k, d) @ qh[0].T).view(batch, n_k, n_q))
            else:
                logits.append(torch.matmul(kh, qh.transpose(1, 2)).expand(batch, -1, -1))
        return (torch.stack(logits, dim=1) / math.sqrt(d)).softmax(dim=2)  # B x h x Nk x Nq

    def _few_keys_factors(
        self, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output of :meth:`_few_keys` as a product ``mix @ projected``.

        Parameters
        ----------
        qp : Tensor of shape (B or 1, Nq, inner)
        kp, vp : Tensor of shape (B, Nk, inner)

        Returns
        -------
        mix : Tensor of shape (B, Nq, heads * Nk)
            Each query's probabilities over the (head, key) pairs.
        projected : Tensor of shape (B, heads * Nk, C)
            Each head's values through its slice of ``out_proj``, plus
            ``bias / heads`` (each head's probabilities sum to 1, so every
            output gets the bias once).
        """
        batch = max(qp.shape[0], kp.shape[0], vp.shape[0])
        # B x Nq x h Nk (keys-first logits: the softmax over few keys is vectorised)
        mix = self._few_keys_probs(qp, kp).flatten(1, 2).transpose(1, 2)
        return mix, self._folded_values(vp, batch)

    def _folded_values(self, vp: torch.Tensor, batch: int) -> torch.Tensor:
        """Each head's few values through its slice of ``out_proj``: ``B x heads Nk x C``.

        Plus ``bias / heads`` (each head's probabilities sum to 1, so every
        output gets the bias once); ``vp`` is ``(B or 1) x Nk x inner``.
        """
        n_k, inner = vp.shape[1:]
        heads = self.num_heads
        d = inner // heads
        weight = self.out_proj.weight.view(-1, heads, d)  # C x heads x d
        projected = torch.einsum("bkhd,chd->bhkc", vp.view(vp.shape[0], n_k, heads, d), weight)
        projected = projected + self.out_proj.bias / heads
        return projected.expand(batch, -1, -1, -1).flatten(1, 2)  # B x h Nk x C


def _block_diagonal(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x n x inner`` -> ``B x heads n x inner``: head ``h``'s rows keep only its columns."""
    batch, n, inner = x.shape
    d = inner // heads
    eye = torch.eye(heads, dtype=x.dtype, device=x.device)
    per_head = x.view(batch, n, heads, d).transpose(1, 2)  # B x heads x n x d
    return (per_head[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(batch, -1, inner)


def _own_columns(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x heads n x inner`` -> ``B x n x inner``: head ``h``'s rows give its own columns.

    The inverse of :func:`_block_diagonal` for a product whose row blocks are
    per head (each head's output read off the diagonal blocks).
    """
    batch, rows, inner = x.shape
    n, d = rows // heads, inner // heads
    own = torch.diagonal(x.view(batch, heads, n, heads, d), dim1=1, dim2=3)  # B x n x d x heads
    return own.permute(0, 1, 3, 2).reshape(batch, n, inner)


def _project(linear: nn.Linear, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
    """``linear(x + pe)``; a batch-1 ``pe`` of many tokens is projected once and added after."""
    if pe is None:
        return linear(x)
    if pe.shape[0] == x.shape[0] or x.shape[1] <= _SMALL_SIDE:
        return linear(x + pe)
    shared = F.linear(pe, linear.weight, linear.bias)  # 1 x N x inner: once, not per prompt
    return torch.matmul(x, linear.weight.T).add_(shared)


class TwoWayAttentionBlock(nn.Module):
    """One layer of the two-way transformer.

    Parameters
    ----------
    embedding_dim : int
        Token width ``C``.
    num_heads : int
        Attention heads.
    mlp_dim : int
        Hidden width of the token MLP.
    activation : type of nn.Module, optional
        MLP activation. Default ``nn.ReLU``.
    attention_downsample_rate : int, optional
        Width reduction inside the cross-attentions. Default 2.
    skip_first_layer_pe : bool, optional
        First layer: self-attention without positional encoding and without
        a residual. Default False.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        rate = attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, rate)

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """The layer's first step: prompt-token self-attention, then ``norm1``.

        Parameters
        ----------
        queries, query_pe : Tensor of shape (B, Nq, C)

        Returns
        -------
        Tensor of shape (B, Nq, C)
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update prompt tokens and image tokens.

        Parameters
        ----------
        queries : Tensor of shape (B, Nq, C)
            Prompt/output tokens.
        keys : Tensor of shape (B or 1, Nk, C)
            Image tokens (a batch of one is shared by every prompt).
        query_pe : Tensor of shape (B, Nq, C)
            Positional encoding of the tokens (the initial tokens).
        key_pe : Tensor of shape (1 or B, Nk, C)
            Positional encoding of the image tokens.

        Returns
        -------
        queries : Tensor of shape (B, Nq, C)
        keys : Tensor of shape (B, Nk, C)
        """
        queries = self.token_self_attention(queries, query_pe)

        # Image tokens are many: their positional encoding goes in as k_pe /
        # q_pe (projected once when shared), never added to every prompt's copy.
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, keys, keys, k_pe=key_pe))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        update = self.cross_attn_image_to_token(keys, q, queries, q_pe=key_pe, residual=keys)
        return queries, self.norm4(update)


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention.

    Parameters
    ----------
    depth : int
        Number of two-way layers.
    embedding_dim : int
        Token width ``C``.
    num_heads : int
        Attention heads.
    mlp_dim : int
        Hidden width of the token MLPs.
    activation : type of nn.Module, optional
        MLP activation. Default ``nn.ReLU``.
    attention_downsample_rate : int, optional
        Width reduction inside the cross-attentions. Default 2.
    """

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Parameters
        ----------
        image_embedding : Tensor of shape (B or 1, C, h, w)
            Image tokens as a feature map (a batch of one is shared by every
            prompt and projected once).
        image_pe : Tensor of shape (1 or B, C, h, w)
            Positional encoding of the image tokens.
        point_embedding : Tensor of shape (B, N, C)
            Output and prompt tokens; also their positional encoding.

        Returns
        -------
        queries : Tensor of shape (B, N, C)
            Updated tokens.
        keys : Tensor of shape (B, h * w, C)
            Updated image tokens (batch 1 only if ``depth`` is 0 and the
            input was shared).
        """
        # Row-major tokens once, so every later op reads contiguous memory.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()  # B x hw x C
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()  # (1 or B) x hw x C
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)

        q = queries + point_embedding
        queries = queries + self.final_attn_token_to_image(q, keys, keys, k_pe=key_pe)
        return self.norm_final_attn(queries), keys
