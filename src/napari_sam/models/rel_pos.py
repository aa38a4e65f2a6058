"""Attention with decomposed relative positions (MViTv2, as in SAM's ViT encoder).

The logits of query ``i`` and key ``j`` on an ``H x W`` token grid are

    scale * q_i . k_j + q_i . R_h[row(i) - row(j)] + q_i . R_w[col(i) - col(j)]

with per-axis tables ``R_h`` (``2H - 1`` rows) and ``R_w`` (``2W - 1`` rows)
and the query before scaling. The bias has rank ``H + W`` per query, so it
folds into the dot product: ``q' = [q, rel_h / scale, rel_w / scale]`` and
``k' = [k, one-hot row of j, one-hot column of j]`` give
``scale * q' . k'`` = the logits above, with no ``(HW)^2`` mask.

Three ways to evaluate it, all equal up to rounding:

- :func:`folded_rel_pos_attention`: the folded q', k' through
  ``scaled_dot_product_attention`` (v zero-padded to the folded width, which
  the fused CPU kernel needs). Used for windows, where folding adds at most
  the head width.
- :func:`biased_rel_pos_attention`: the fused kernel with the bias as a mask,
  a few query rows of the grid at a time (bounded memory). Used for the
  global grid in float32, where folding would triple the head width.
- :func:`folded_matmul_attention`: the folded q', k' through plain batched
  matmuls and a softmax, a few heads at a time. Used for the global grid in
  half precision on CPUs without AMX, where bf16 matmuls are several times
  faster than the fused kernel (which computes in float32 there).

On CPUs with AMX tiles the fused kernel runs bf16 through them, and the
folded global grid goes through it too: ViT-B's 64 x 64 grid with 12 heads,
134 ms against 423 ms for the matmuls, which are bound by writing their
``N x N`` logits (Xeon with AMX, 2 cores, torch 2.14).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "biased_rel_pos_attention",
    "decomposed_rel_pos_bias",
    "folded_matmul_attention",
    "folded_rel_pos_attention",
    "rel_pos_attention",
    "rel_pos_terms",
]

# Temporary logits per chunk in the chunked paths (bytes).
_CHUNK_BYTES = 64 << 20


def _even_step(total: int, most: int) -> int:
    """Chunk length for ``total`` items in chunks of at most ``most``, as even as possible."""
    most = max(1, min(most, total))
    count = -(-total // most)
    return -(-total // count)


def _relative_lookup(table: torch.Tensor, size: int) -> torch.Tensor:
    """Expand a ``(2 * size - 1) x D`` relative table to ``size x size x D``.

    Entry ``[i, j]`` is the embedding of the offset ``i - j`` (query minus key).
    """
    if table.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected {2 * size - 1} "
            f"for an attention extent of {size} tokens (the encoder only runs at its "
            "configured img_size)"
        )
    pos = torch.arange(size, device=table.device)
    offsets = pos[:, None] - pos[None, :] + (size - 1)  # size x size, in [0, 2 size - 2]
    return table[offsets]


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    *,
    divisor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis relative-position logits of every query.

    ``rel_h[..., i, r] = q_i . R_h[row(i) - r] / divisor`` and
    ``rel_w[..., i, c] = q_i . R_w[col(i) - c] / divisor``, with the query
    vector before scaling.

    Parameters
    ----------
    q : Tensor of shape (B, heads, H * W, D)
        Queries of one attention call (unscaled).
    rel_pos_h, rel_pos_w : Tensor of shape (2 * H - 1, D) and (2 * W - 1, D)
        Relative position tables for rows and columns.
    hw : tuple of int
        ``(H, W)``, the token grid the queries and keys come from.
    divisor : float, optional
        Divides the tables first (the folded forms pass the softmax scale).
        Default 1.

    Returns
    -------
    rel_h : Tensor of shape (B, heads, H, W, H), dtype of ``q``
        Row term for each query and key row.
    rel_w : Tensor of shape (B, heads, H, W, W), dtype of ``q``
        Column term for each query and key column.
    """
    h, w = hw
    b, heads, _, d = q.shape
    table_h = _relative_lookup(rel_pos_h, h)  # H x H x D
    table_w = _relative_lookup(rel_pos_w, w)  # W x W x D
    if divisor != 1.0:
        table_h, table_w = table_h / divisor, table_w / divisor
    q_grid = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnhwd,hkd->bnhwk", q_grid, table_h.to(q.dtype))
    rel_w = torch.einsum("bnhwd,wkd->bnhwk", q_grid, table_w.to(q.dtype))
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from per-axis relative position tables.

    ``bias[q_tok, k_tok] = q . R_h[row(q) - row(k)] + q . R_w[col(q) - col(k)]``
    with the query vector ``q`` before scaling.

    Parameters
    ----------
    q : Tensor of shape (B, heads, H * W, D)
        Queries of one attention call (unscaled).
    rel_pos_h, rel_pos_w : Tensor of shape (2 * H - 1, D) and (2 * W - 1, D)
        Relative position tables for rows and columns.
    hw : tuple of int
        ``(H, W)``, the token grid the queries and keys come from.

    Returns
    -------
    Tensor of shape (B, heads, H * W, H * W), dtype of ``q``
        Bias to add to the attention logits.
    """
    b, heads, n, _ = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x heads x H x W x kH x kW
    return bias.reshape(b, heads, n, n)


def _fold(
    q: torch.Tensor,
    k: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q' = [q, rel_h / scale, rel_w / scale, 0]``, ``k' = [k, one-hot row, one-hot col, 0]``.

    Both ``B x heads x N x E`` with ``E = D + H + W`` rounded up to ``multiple``.
    """
    h, w = hw
    b, heads, n, d = q.shape
    width = d + h + w
    padded = -(-width // multiple) * multiple
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, divisor=scale)
    parts = [q, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)]
    if padded > width:
        parts.append(q.new_zeros(b, heads, n, padded - width))
    q_aug = torch.cat(parts, dim=-1)
    token = torch.arange(n, device=k.device)
    one_hot = torch.zeros(n, padded - d, dtype=k.dtype, device=k.device)
    one_hot[token, token // w] = 1
    one_hot[token, h + token % w] = 1
    k_aug = torch.cat([k, one_hot.expand(b, heads, n, padded - d)], dim=-1)
    return q_aug, k_aug


def folded_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Relative-position attention folded into q and k, through the fused SDPA kernel.

    Parameters
    ----------
    q, k, v : Tensor of shape (B, heads, H * W, D)
        Unscaled queries, keys and values.
    rel_pos_h, rel_pos_w : Tensor of shape (2 * H - 1, D) and (2 * W - 1, D)
        Relative position tables.
    hw : tuple of int
        ``(H, W)`` of the token grid.
    scale : float
        Softmax scale applied to ``q . k`` (``D ** -0.5``).

    Returns
    -------
    Tensor of shape (B, heads, H * W, D)
    """
    d = q.shape[-1]
    q_aug, k_aug = _fold(q, k, rel_pos_h, rel_pos_w, hw, scale, multiple=8)
    v_aug = F.pad(v, (0, q_aug.shape[-1] - d))
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=scale)[..., :d]


def folded_matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Relative-position attention folded into q and k, through batched matmuls.

    Computes ``softmax(scale q' k'^T) v`` a few heads at a time (logits of at
    most 64 MiB per chunk). Arguments and result as
    :func:`folded_rel_pos_attention`.
    """
    b, heads, n, _ = q.shape
    q_aug, k_aug = _fold(q, k, rel_pos_h, rel_pos_w, hw, 1.0, multiple=8)
    q_aug[..., : q.shape[-1]] *= scale  # q' = [scale q, rel_h, rel_w]: scale stays off the bias
    k_t = k_aug.transpose(-1, -2)
    step = _even_step(heads, _CHUNK_BYTES // (b * n * n * q.element_size()))
    if step == heads:
        return torch.matmul(torch.matmul(q_aug, k_t).softmax(-1), v)
    out = v.new_empty(v.shape)  # chunks written in place: no list of blocks to fragment the heap
    for first in range(0, heads, step):
        heads_ = slice(first, first + step)
        logits = torch.matmul(q_aug[:, heads_], k_t[:, heads_])  # B x h x N x N
        out[:, heads_] = torch.matmul(logits.softmax(-1), v[:, heads_])
        del logits
    return out


def biased_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
    *,
    rows: int | None = None,
) -> torch.Tensor:
    """Relative-position attention with the bias as a mask, a few query rows at a time.

    Parameters
    ----------
    q, k, v : Tensor of shape (B, heads, H * W, D)
        Unscaled queries, keys and values.
    rel_pos_h, rel_pos_w : Tensor of shape (2 * H - 1, D) and (2 * W - 1, D)
        Relative position tables.
    hw : tuple of int
        ``(H, W)`` of the token grid.
    scale : float
        Softmax scale applied to ``q . k``.
    rows : int, optional
        Query rows of the grid per chunk; default: a bias chunk of at most
        64 MiB (the full ``(H W)^2`` bias is never built).

    Returns
    -------
    Tensor of shape (B, heads, H * W, D)
    """
    h, w = hw
    b, heads, n, _ = q.shape
    if rows is None:
        rows = _even_step(h, _CHUNK_BYTES // (b * heads * w * n * q.element_size()))
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw)
    grad = torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad)
    # Inference: one bias buffer reused by every chunk and the output written
    # in place, so no chunk-sized blocks pile up between the chunks (with the
    # tuned allocator, such a pile fragments the heap: +550 MiB for ViT-B).
    buffer = None if grad else q.new_empty(b, heads, rows, w, h, w)
    out = None if grad else v.new_empty(b, heads, n, v.shape[-1])
    chunks = []
    for top in range(0, h, rows):
        bottom = min(top + rows, h)
        # einsum's outputs are permuted views: add into a row-major block, so
        # the mask below is a view, not one more copy of the largest tensor.
        part_h, part_w = rel_h[:, :, top:bottom, :, :, None], rel_w[:, :, top:bottom, :, None, :]
        if buffer is None:
            bias = part_h + part_w  # training: out= does not support autograd
        else:
            bias = buffer if bottom - top == rows else buffer[:, :, : bottom - top].contiguous()
            torch.add(part_h, part_w, out=bias)
        chunk = F.scaled_dot_product_attention(
            q[:, :, top * w : bottom * w],
            k,
            v,
            attn_mask=bias.reshape(b, heads, (bottom - top) * w, n),
            scale=scale,
        )
        if out is None:
            chunks.append(chunk)
        else:
            out[:, :, top * w : bottom * w] = chunk
            del chunk
    if out is not None:
        return out
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles the OS lets torch use (detected once per process)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # pragma: no cover - a torch build without the query
        return False


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
    *,
    fold: bool,
) -> torch.Tensor:
    """Pick the fastest evaluation for the grid, dtype and device (see the module notes).

    Parameters
    ----------
    q, k, v, rel_pos_h, rel_pos_w, hw, scale
        As :func:`folded_rel_pos_attention`.
    fold : bool
        Fold into the fused kernel whatever the dtype (the windows).

    Returns
    -------
    Tensor of shape (B, heads, H * W, D)
    """
    args = (q, k, v, rel_pos_h, rel_pos_w, hw, scale)
    if fold or q.device.type != "cpu":
        return folded_rel_pos_attention(*args)
    if q.dtype == torch.float32:
        return biased_rel_pos_attention(*args)
    if q.dtype == torch.bfloat16 and cpu_has_amx():
        return folded_rel_pos_attention(*args)
    return folded_matmul_attention(*args)
