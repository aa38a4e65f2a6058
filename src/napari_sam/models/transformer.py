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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend from ``q`` to ``k``/``v``.

        Parameters
        ----------
        q : Tensor of shape (B or 1, Nq, C)
        k, v : Tensor of shape (B or 1, Nk, C)
            A batch of one is projected once and broadcast.

        Returns
        -------
        Tensor of shape (B, Nq, C)
        """
        qh = self._heads(self.q_proj(q))  # B x heads x Nq x d
        kh = self._heads(self.k_proj(k))  # B x heads x Nk x d
        vh = self._heads(self.v_proj(v))  # B x heads x Nk x d
        n_q, n_k, d = qh.shape[2], kh.shape[2], qh.shape[3]
        if n_k < n_q and n_k <= _SMALL_SIDE:
            # Image tokens attending to a few prompt tokens: keep the long axis
            # contiguous, so the softmax (over the few keys) is vectorised.
            logits_t = kh @ qh.transpose(-1, -2) / math.sqrt(d)  # B x heads x Nk x Nq
            out = logits_t.softmax(dim=-2).transpose(-1, -2) @ vh  # B x heads x Nq x d
        elif min(n_q, n_k) <= _SMALL_SIDE:
            # Prompt tokens as queries: small logits, plain matmuls (the
            # reference's arithmetic) beat the fused kernel's tiling.
            logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # B x heads x Nq x Nk
            out = logits.softmax(dim=-1) @ vh  # B x heads x Nq x d (batch broadcast)
        else:
            batch = max(qh.shape[0], kh.shape[0], vh.shape[0])
            qh, kh, vh = (t.expand(batch, -1, -1, -1) for t in (qh, kh, vh))
            out = F.scaled_dot_product_attention(qh, kh, vh)  # B x heads x Nq x d
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


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
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        # k is unchanged: keys were not updated since it was formed.
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


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
        k = keys + key_pe
        queries = queries + self.final_attn_token_to_image(q, k, keys)
        return self.norm_final_attn(queries), keys
