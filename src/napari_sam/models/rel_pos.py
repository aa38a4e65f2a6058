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
  one head and a few query rows of the grid at a time (bounded memory).
  Used for the global grid in float32, where folding would triple the head
  width.
- :func:`folded_matmul_attention`: the folded q', k' through plain batched
  matmuls and a softmax, a few heads at a time. Used for the global grid in
  half precision on CPUs without AMX, where bf16 matmuls are several times
  faster than the fused kernel (which computes in float32 there).

All three take the per-axis terms ``rel_h``, ``rel_w`` from
:func:`rel_pos_terms`: strided views of one product of the queries with
both tables.

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
# Queries per call of the fused kernel in the chunked-mask path.
_CHUNK_QUERIES = 1024


def _even_step(total: int, most: int) -> int:
    """Chunk length for ``total`` items in chunks of at most ``most``, as even as possible."""
    most = max(1, min(most, total))
    count = -(-total // most)
    return -(-total // count)


def _check_table(table: torch.Tensor, size: int) -> None:
    """A relative table for an attention extent of ``size`` tokens has ``2 size - 1`` rows."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected {2 * size - 1} "
            f"for an attention extent of {size} tokens (the encoder only runs at its "
            "configured img_size)"
        )


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
        Row term for each query and key row. Both are strided views of one
        ``B x heads x N x (2H + 2W - 2)`` product (entries overlap): read
        them, do not write into them.
    rel_w : Tensor of shape (B, heads, H, W, W), dtype of ``q``
        Column term for each query and key column.

    Notes
    -----
    One product of the queries with both tables, reversed and stacked
    (``L = (2H - 1) + (2W - 1)`` rows), gives each query's logit for every
    offset; query row ``r`` needs offsets ``r - 0, ..., r - (H - 1)``, which
    in the reversed table are the ``H`` consecutive entries from
    ``H - 1 - r``. So ``rel_h`` is a strided view of that product (one step
    back per query row), as is ``rel_w`` (one step back per query column):
    no expanded ``H x H x D`` table, no permuted copies of the queries.
    """
    h, w = hw
    _check_table(rel_pos_h, h)
    _check_table(rel_pos_w, w)
    b, heads, n, _ = q.shape
    tables = torch.cat([rel_pos_h.flip(0), rel_pos_w.flip(0)])
    if divisor != 1.0:
        tables = tables / divisor
    logits = torch.matmul(q, tables.to(q.dtype).t()).contiguous()  # B x heads x N x L
    width = logits.shape[-1]
    base = logits.storage_offset()
    outer = (heads * n * width, n * width)  # batch, head
    rel_h = logits.as_strided((b, heads, h, w, h), (*outer, w * width - 1, width, 1), base + h - 1)
    rel_w = logits.as_strided(
        (b, heads, h, w, w), (*outer, w * width, width - 1, 1), base + 2 * h - 1 + w - 1
    )
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
    v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``q' = [q, rel_h / scale, rel_w / scale, 0]``, ``k' = [k, one-hot row, one-hot col, 0]``.

    Both ``B x heads x N x E`` with ``E = D + H + W`` rounded up to
    ``multiple``; with ``v``, also ``v' = [v, 0]`` of the same width. Each is
    written once into its own head-major buffer, part by part, instead of a
    ``cat`` of permuted views. (Token-major buffers, the order of the
    ``qkv`` projection, are cheaper to write but make the fused kernel about
    10 % slower: ViT-B global grid, bf16, 144 against 131 ms.)
    """
    h, w = hw
    b, heads, n, d = q.shape
    padded = -(-(d + h + w) // multiple) * multiple

    def buffer(part: torch.Tensor) -> torch.Tensor:
        out = part.new_empty(b, heads, n, padded)
        out[..., :d] = part
        return out

    q_aug = buffer(q)
    # Inference reads q back from its rows of q' (a plain row stride, no copy
    # for the product); autograd needs the product's input unchanged after.
    source = q if torch.is_grad_enabled() else q_aug[..., :d]
    rel_h, rel_w = rel_pos_terms(source, rel_pos_h, rel_pos_w, hw, divisor=scale)
    grid = q_aug.view(b, heads, h, w, padded)
    grid[..., d : d + h] = rel_h
    grid[..., d + h : d + h + w] = rel_w
    q_aug[..., d + h + w :] = 0
    token = torch.arange(n, device=k.device)
    one_hot = torch.zeros(n, padded - d, dtype=k.dtype, device=k.device)
    one_hot[token, token // w] = 1
    one_hot[token, h + token % w] = 1
    k_aug = buffer(k)
    k_aug[..., d:] = one_hot
    if v is None:
        return q_aug, k_aug
    v_aug = buffer(v)
    v_aug[..., d:] = 0
    return q_aug, k_aug, v_aug


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
    q_aug, k_aug, v_aug = _fold(q, k, rel_pos_h, rel_pos_w, hw, scale, multiple=8, v=v)
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
    """Relative-position attention with the bias as a mask, one head and a few query rows at a time.

    Each call of the fused kernel gets one head and about ``_CHUNK_QUERIES``
    queries. Float32 ViT-B global grid (64 x 64, 12 heads), a Xeon with 2
    cores: 340 to 360 ms a block this way, against 460 to 480 ms for every
    head at once with five query rows (a 64 MiB mask per call), and about
    250 ms without any bias. Fewer queries per call make the kernel split
    them into smaller blocks; more heads per call make a larger mask to write
    and read back.

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
        Query rows of the grid per chunk; default: about ``_CHUNK_QUERIES``
        queries and a bias chunk of at most ``_CHUNK_BYTES`` (the full
        ``(H W)^2`` bias is never built).

    Returns
    -------
    Tensor of shape (B, heads, H * W, D)
    """
    h, w = hw
    b, heads, n, _ = q.shape
    if rows is None:
        most = min(_CHUNK_QUERIES // w, _CHUNK_BYTES // (b * w * n * q.element_size()))
        rows = _even_step(h, most)
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, hw)
    grad = torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad)
    # Inference: one bias buffer reused by every chunk and the output written
    # in place, so no chunk-sized blocks pile up between the chunks (with the
    # tuned allocator, such a pile fragments the heap: +550 MiB for ViT-B).
    buffer = None if grad else q.new_empty(b, 1, rows, w, h, w)
    out = None if grad else v.new_empty(b, heads, n, v.shape[-1])
    per_head = []
    for head in range(heads):
        one = slice(head, head + 1)
        chunks = []
        for top in range(0, h, rows):
            bottom = min(top + rows, h)
            # rel_h / rel_w are strided views: add into a row-major block, so
            # the mask below is a view, not one more copy of the largest tensor.
            part_h = rel_h[:, one, top:bottom, :, :, None]
            part_w = rel_w[:, one, top:bottom, :, None, :]
            if buffer is None:
                bias = part_h + part_w  # training: out= does not support autograd
            else:
                bias = buffer if bottom - top == rows else buffer[:, :, : bottom - top]
                torch.add(part_h, part_w, out=bias)
            queries = slice(top * w, bottom * w)
            chunk = F.scaled_dot_product_attention(
                q[:, one, queries],
                k[:, one],
                v[:, one],
                attn_mask=bias.reshape(b, 1, (bottom - top) * w, n),
                scale=scale,
            )
            if out is None:
                chunks.append(chunk)
            else:
                out[:, one, queries] = chunk
                del chunk
        if out is None:
            per_head.append(torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0])
    if out is not None:
        return out
    return torch.cat(per_head, dim=1) if heads > 1 else per_head[0]


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
