"""MobileSAM's TinyViT image encoder (registry name ``vit_t``).

A four-stage hierarchical encoder: a convolutional stem (stride 4), one stage
of MBConv blocks, three stages of windowed-attention blocks with a learned
relative-position bias and a depthwise "local" convolution, patch merging
between stages, and SAM's neck to the prompt width. MobileSAM keeps the
resolution in the last patch merging (stride 1), so the output is ``S / 16``
per side, like SAM's ViT (64 x 64 at 1024 px).

Names follow the official ``mobile_sam.pt``, so it loads with ``strict=True``:

- every conv + BatchNorm pair is ``<name>.c.weight`` (no bias) and
  ``<name>.bn.{weight, bias, running_mean, running_var, num_batches_tracked}``;
- ``attention_biases`` (heads x window**2) is a parameter, while
  ``attention_bias_idxs`` is a non-persistent buffer (not in the checkpoint);
- the ImageNet classifier of TinyViT, ``norm_head`` (LayerNorm) and ``head``
  (Linear to 1000 classes), is stored in the checkpoint: it is kept here for
  strict loading and never used by :meth:`TinyViT.forward`.

Stochastic depth and dropout (training only, no parameters) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

__all__ = ["TinyViT"]

NUM_STAGES = 4
CHECKPOINT_NUM_CLASSES = 1000  # width of the unused classifier in mobile_sam.pt


class ConvBN(nn.Module):
    """Bias-free 2D convolution followed by BatchNorm (keys ``c.*``, ``bn.*``).

    Parameters
    ----------
    in_chans, out_chans : int
        Input and output channels.
    kernel_size, stride, groups : int, optional
        Convolution settings (default 1 each); padding is ``kernel_size // 2``.
    zero_init : bool, optional
        Start the BatchNorm scale at zero (residual branches). Default False.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        if zero_init:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x in_chans x H x W`` to ``B x out_chans x H/stride x W/stride``."""
        return self.bn(self.c(x))


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 ConvBN with GELU between (keys ``seq.0``, ``seq.2``).

    Parameters
    ----------
    embed_dim : int
        Output channels (the hidden layer has half of them).
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(3, embed_dim // 2, 3, stride=2),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x 3 x S x S`` to ``B x embed_dim x S/4 x S/4``."""
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the sum.

    Parameters
    ----------
    dim : int
        Input and output channels.
    expand_ratio : float
        Hidden channels are ``int(dim * expand_ratio)``.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x C x H x W`` to ``B x C x H x W``."""
        y = F.gelu(self.conv1(x))  # B x hidden x H x W
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change width (and resolution): 1x1 ConvBN, depthwise 3x3 ConvBN, 1x1 ConvBN.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output channels.
    stride : int
        Depthwise stride (2, or 1 for MobileSAM's last merge).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x in_dim x H x W`` to ``B x out_dim x H/stride x W/stride``."""
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window_size: int) -> torch.Tensor:
    """Bias-table index of every query/key pair in a square window.

    Pairs at the same absolute offset ``(|dy|, |dx|)`` share one entry,
    numbered ``|dy| * window_size + |dx|`` (the checkpoint's table order).

    Parameters
    ----------
    window_size : int
        Side of the window; ``N = window_size**2`` tokens, row-major.

    Returns
    -------
    Tensor of shape (N, N), int64
        Indices into a table of ``window_size**2`` entries.
    """
    side = torch.arange(window_size)
    rows = side.repeat_interleave(window_size)  # N: row of each token
    cols = side.repeat(window_size)  # N: column of each token
    dy = (rows[:, None] - rows[None, :]).abs()  # N x N
    dx = (cols[:, None] - cols[None, :]).abs()
    return dy * window_size + dx


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with a learned offset bias.

    Parameters
    ----------
    dim, num_heads : int
        Token width (divisible by ``num_heads``) and attention heads.
    window_size : int
        Window side; the bias table has ``window_size**2`` entries per head.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        # Per head, the output features are laid out [q | k | v].
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size**2))
        self.register_buffer(
            "attention_bias_idxs", relative_offset_index(window_size), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``Bw x N x C`` (``Bw`` windows of ``N = window_size**2`` tokens) to the same."""
        bw, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(bw, n, self.num_heads, 3, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each Bw x heads x N x hd
        bias = self.attention_biases[:, self.attention_bias_idxs]  # heads x N x N
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class FeedForward(nn.Module):
    """Pre-norm two-layer MLP with GELU (keys ``norm``, ``fc1``, ``fc2``).

    Parameters
    ----------
    dim, hidden_dim : int
        Input/output and hidden widths.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., dim)`` to ``(..., dim)``."""
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depthwise local conv (no residual), MLP (residual).

    Parameters
    ----------
    dim, num_heads : int
        Token width and attention heads.
    window_size : int
        Attention window side; the map is zero-padded at the bottom and right
        to a multiple of it (padded tokens take part as keys, as in MobileSAM).
    mlp_ratio : float
        MLP hidden width is ``int(dim * mlp_ratio)``.
    local_conv_size : int
        Kernel side of the depthwise convolution.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x H x W x C`` (channels last) to ``B x H x W x C``."""
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B x H x W x C
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = -h % ws, -w % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3)  # B x nh x nw x ws x ws x C
        out = self.attn(windows.reshape(b * nh * nw, ws * ws, c))  # B*nh*nw x ws*ws x C
        out = out.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return out[:, :h, :w]


class Stage(nn.Module):
    """A sequence of blocks, then an optional patch merging (keys ``blocks``, ``downsample``).

    Parameters
    ----------
    blocks : sequence of nn.Module
        The stage's blocks; ``downsample`` (PatchMerging or None) follows them.
    channels_last : bool
        Whether the blocks take ``B x H x W x C`` (attention), not ``B x C x H x W``.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], downsample: nn.Module | None, *, channels_last: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x C x H x W`` to ``B x C' x H' x W'`` (C', H', W' set by the merging)."""
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)  # B x H x W x C
        for block in self.blocks:
            x = block(x)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # B x C x H x W
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def _check_config(
    img_size: int,
    embed_dims: Sequence[int],
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_sizes: Sequence[int],
) -> None:
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    per_stage = dict(
        embed_dims=embed_dims, depths=depths, num_heads=num_heads, window_sizes=window_sizes
    )
    for name, values in per_stage.items():
        if len(values) != NUM_STAGES:
            raise ValueError(f"{name} must have {NUM_STAGES} entries, got {tuple(values)}")
    if any(ws <= 0 for ws in window_sizes):
        raise ValueError(f"window_sizes must be positive, got {tuple(window_sizes)}")
    for dim, heads in zip(embed_dims[1:], num_heads[1:], strict=True):
        if heads <= 0 or dim % heads:
            raise ValueError(
                f"embed_dims must be divisible by num_heads in the attention stages, "
                f"got embed_dims={tuple(embed_dims)} and num_heads={tuple(num_heads)}"
            )


class TinyViT(nn.Module):
    """MobileSAM's TinyViT image encoder.

    Parameters
    ----------
    img_size : int
        Side of the square model input the encoder is built for (1024 for
        ``vit_t``). Other sizes work; the output is always ``S / 16`` per side.
    embed_dims : sequence of 4 int
        Width of each stage.
    depths : sequence of 4 int
        Blocks per stage (stage 0 is MBConv, stages 1-3 attention).
    num_heads : sequence of 4 int
        Attention heads per stage (the entry for stage 0 is unused).
    window_sizes : sequence of 4 int
        Attention window side per stage (the entry for stage 0 is unused).
    mlp_ratio : float
        MLP hidden width relative to the stage width.
    mbconv_expand_ratio : float
        MBConv hidden width relative to the stage-0 width.
    local_conv_size : int
        Kernel side of the depthwise convolution in each attention block.
    out_chans : int
        Channels of the output embedding (the prompt width, 256 for ``vit_t``).

    Raises
    ------
    ValueError
        If the per-stage sequences do not have 4 entries, a window size is not
        positive, or an attention-stage width is not divisible by its heads.
    """

    def __init__(
        self,
        *,
        img_size: int,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_sizes: Sequence[int],
        mlp_ratio: float,
        mbconv_expand_ratio: float,
        local_conv_size: int,
        out_chans: int,
    ) -> None:
        super().__init__()
        _check_config(img_size, embed_dims, depths, num_heads, window_sizes)
        self.img_size = img_size
        self.patch_embed = PatchEmbed(embed_dims[0])
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            downsample = None
            if i < NUM_STAGES - 1:  # MobileSAM: the last merge keeps the resolution
                stride = 2 if i < NUM_STAGES - 2 else 1
                downsample = PatchMerging(dim, embed_dims[i + 1], stride)
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dim, num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                    for _ in range(depth)
                ]
            stages.append(Stage(blocks, downsample, channels_last=i > 0))
        self.layers = nn.ModuleList(stages)
        # TinyViT's ImageNet classifier: in the checkpoint, unused by SAM.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], CHECKPOINT_NUM_CLASSES)
        for module in self.modules():  # TinyViT's initialisation of linear layers
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode normalised images.

        Parameters
        ----------
        images : Tensor of shape (B, 3, S, S), float
            Normalised (pixel mean/std) and padded model input.

        Returns
        -------
        Tensor of shape (B, out_chans, S / 16, S / 16), same dtype
            Image embedding.

        Raises
        ------
        ValueError
            If ``images`` is not a 4D tensor with 3 channels.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.patch_embed(images)  # B x C0 x S/4 x S/4
        for stage in self.layers:
            x = stage(x)  # ... B x C3 x S/16 x S/16
        return self.neck(x)  # B x out_chans x S/16 x S/16
