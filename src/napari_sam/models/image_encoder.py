"""SAM's ViT image encoder (ViT-B/L/H): windowed attention, global blocks, neck.

The encoder is a plain ViT over ``patch_size`` patches with an absolute
position embedding, where most blocks attend within non-overlapping
``window_size`` windows and the blocks listed in ``global_attn_indexes``
attend over the whole token grid. Every attention adds a decomposed
relative-position bias (one table per axis, MViTv2 style). A convolutional
neck maps the tokens to ``out_chans`` channels.

Attention never builds the ``(HW)^2`` bias: the relative positions are
folded into q and k for the windows, and the global grid runs either the
fused kernel with a chunked mask (float32) or folded bf16 matmuls (half
precision on CPUs); see :mod:`napari_sam.models.rel_pos`. In float32 every
path agrees with the explicit softmax formulation to rounding.

Parameter names match the official checkpoints (``patch_embed.proj``,
``pos_embed``, ``blocks.<i>.attn.qkv``, ``blocks.<i>.attn.rel_pos_h``,
``neck.<i>``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock
from .packed import PackedLinear
from .rel_pos import decomposed_rel_pos_bias, rel_pos_attention

__all__ = ["ImageEncoderViT", "decomposed_rel_pos_bias", "merge_windows", "split_windows"]


# --------------------------------------------------------------------------- helpers


def split_windows(tokens: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a token grid into non-overlapping square windows, zero-padding the edges.

    Parameters
    ----------
    tokens : Tensor of shape (B, H, W, C)
        Token grid.
    window : int
        Window side in tokens.

    Returns
    -------
    windows : Tensor of shape (B * nH * nW, window, window, C)
        The windows, row-major per image (``nH = ceil(H / window)``).
    padded_hw : tuple of int
        ``(Hp, Wp)``, the grid size after padding to multiples of ``window``.
    """
    b, h, w, c = tokens.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        tokens = F.pad(tokens, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    grid = tokens.reshape(b, hp // window, window, wp // window, window, c)
    windows = grid.transpose(2, 3).reshape(-1, window, window, c)
    return windows, (hp, wp)


def merge_windows(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`split_windows`: reassemble the grid and drop the padding.

    Parameters
    ----------
    windows : Tensor of shape (B * nH * nW, window, window, C)
        Windows as returned by :func:`split_windows`.
    window : int
        Window side in tokens.
    padded_hw : tuple of int
        ``(Hp, Wp)`` returned by :func:`split_windows`.
    hw : tuple of int
        ``(H, W)``, the grid size before padding.

    Returns
    -------
    Tensor of shape (B, H, W, C)
    """
    hp, wp = padded_hw
    h, w = hw
    c = windows.shape[-1]
    grid = windows.reshape(-1, hp // window, wp // window, window, window, c)
    tokens = grid.transpose(2, 3).reshape(-1, hp, wp, c)
    if hp != h or wp != w:
        tokens = tokens[:, :h, :w]
    return tokens


# --------------------------------------------------------------------------- blocks


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a token grid with decomposed relative positions.

    Parameters
    ----------
    dim : int
        Token width.
    num_heads : int
        Number of heads; must divide ``dim``.
    extent_hw : tuple of int
        ``(H, W)`` of the grid this attention sees (the window, or the whole
        grid for global blocks); sizes the relative tables.

    Attributes
    ----------
    fold : bool
        Always fold the relative positions into q and k of the fused kernel
        (see :func:`~napari_sam.models.rel_pos.rel_pos_attention`). Default:
        when folding at most doubles the head width (the windows, not the
        global grid of the official models).
    """

    def __init__(self, dim: int, num_heads: int, extent_hw: tuple[int, int]) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.fold = extent_hw[0] + extent_hw[1] <= head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * extent_hw[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * extent_hw[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within each grid of the batch.

        Parameters
        ----------
        x : Tensor of shape (B, H, W, C)

        Returns
        -------
        Tensor of shape (B, H, W, C)
        """
        return self.proj(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's heads, concatenated, before the output projection ``proj``.

        Parameters
        ----------
        x : Tensor of shape (B, H, W, C)

        Returns
        -------
        Tensor of shape (B, H, W, C)
        """
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)  # B x N x 3 x heads x D
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x heads x N x D
        out = rel_pos_attention(
            q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale, fold=self.fold
        )
        return out.transpose(1, 2).reshape(b, h, w, c)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window > 0``.

    Parameters
    ----------
    dim : int
        Token width.
    num_heads : int
        Attention heads.
    mlp_dim : int
        Hidden width of the feed-forward block.
    window : int
        Window side in tokens, or 0 for global attention.
    grid_hw : tuple of int
        Token grid of the whole image (sizes the relative tables of a global block).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, window: int, grid_hw: tuple[int, int]
    ) -> None:
        super().__init__()
        self.window = window
        extent = (window, window) if window > 0 else grid_hw
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, extent)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention and MLP with residuals.

        Parameters
        ----------
        x : Tensor of shape (B, H, W, C)

        Returns
        -------
        Tensor of shape (B, H, W, C)
            Without autograd (``no_grad``/``inference_mode``) this is ``x``,
            updated in place.
        """
        y = self.norm1(x)
        if self.window > 0:
            # Padding is added after the norm, so padded tokens are exact zeros.
            # The projection is per token, so it runs after the merge, on the
            # tokens that are kept.
            hw = (y.shape[1], y.shape[2])
            windows, padded_hw = split_windows(y, self.window)
            y = merge_windows(self.attn.attend(windows), self.window, padded_hw, hw)
        else:
            y = self.attn.attend(y)
        mlp = self.mlp
        if torch.is_grad_enabled():
            x = x + self.attn.proj(y)
            return x + mlp(self.norm2(x))
        x = _add_linear(self.attn.proj, y, x)
        return _add_linear(mlp.lin2, mlp.act(mlp.lin1(self.norm2(x))), x)


def _add_linear(layer: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + layer(y)`` for inference: one kernel for a packed layer, else in place into ``x``.

    Both through the layer's ``__call__``, so its hooks still run (pre-encoding
    pauses before every leaf layer).
    """
    if isinstance(layer, PackedLinear) and layer.activation == "none":
        return layer(y, residual=x)
    return x.add_(layer(y))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with a strided convolution.

    Parameters
    ----------
    patch_size : int
        Patch side in pixels.
    embed_dim : int
        Token width.
    in_chans : int, optional
        Image channels. Default 3.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed patches.

        Parameters
        ----------
        images : Tensor of shape (B, 3, S, S)

        Returns
        -------
        Tensor of shape (B, S / p, S / p, embed_dim), channels last, contiguous
            Contiguous, not a permuted view: the blocks update the residual
            stream in place, so its layout lasts through the whole encoder,
            and layer norms and adds over a channels-strided stream run 5 to
            10 times slower (ViT-B bf16: 2.0 s instead of 1.5 s).
        """
        return self.proj(images).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- model


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder.

    Parameters
    ----------
    img_size : int
        Side of the square input in pixels (1024 for the official models).
    patch_size : int
        Patch side in pixels; must divide ``img_size``.
    embed_dim : int
        Token width.
    depth : int
        Number of transformer blocks.
    num_heads : int
        Attention heads per block; must divide ``embed_dim``.
    mlp_ratio : float
        Feed-forward hidden width as a multiple of ``embed_dim``.
    out_chans : int
        Channels of the output embedding.
    global_attn_indexes : sequence of int
        Blocks that attend over the whole grid; all others use windows.
    window_size : int
        Window side in tokens for the windowed blocks (0: every block global).

    Notes
    -----
    The defaults are ViT-B.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
    ) -> None:
        super().__init__()
        _check_args(img_size, patch_size, embed_dim, depth, num_heads, global_attn_indexes)
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        grid_hw = (img_size // patch_size, img_size // patch_size)
        self.grid_hw = grid_hw
        global_blocks = set(global_attn_indexes)

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid_hw, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                int(embed_dim * mlp_ratio),
                window=0 if i in global_blocks else window_size,
                grid_hw=grid_hw,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode normalised, padded images.

        Parameters
        ----------
        images : Tensor of shape (B, 3, img_size, img_size), float
            Normalised model input.

        Returns
        -------
        Tensor of shape (B, out_chans, img_size / patch_size, img_size / patch_size)
            Image embeddings.
        """
        expected = (3, self.img_size, self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        x = self.patch_embed(images) + self.pos_embed  # B x h x w x C
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # B x out_chans x h x w


def _check_args(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
) -> None:
    """Validate the encoder's size arguments, naming the offending parameter."""
    if patch_size <= 0 or img_size % patch_size:
        raise ValueError(
            f"patch_size must be a positive divisor of img_size={img_size}, got {patch_size}"
        )
    if num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(
            f"num_heads must be a positive divisor of embed_dim={embed_dim}, got {num_heads}"
        )
    bad = [i for i in global_attn_indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"global_attn_indexes must lie in [0, depth={depth}), got {tuple(global_attn_indexes)}"
        )
