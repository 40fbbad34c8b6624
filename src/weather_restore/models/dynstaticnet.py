"""DynStaticNet: a U-shaped video restorer built from dynamic-static blocks.

Each block sharpens local structure with a multi-gradient aggregation convolution (MGAConv), then splits its
channels: one half attends within 8x8 windows of each frame (static appearance), the other attends across the
frames at every pixel (dynamic motion). Decoder and refinement blocks add learned degradation queries to their
attention queries. Frames are folded into the batch for every 2-D operation: (B*T, C, H, W).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from weather_restore.models.layers import (
    ChannelLayerNorm,
    HaarDWT,
    Linear,
    PointwiseConv,
    attention,
    cached_shifted_window_mask,
    linear,
    mirror_pad_to_multiple,
    window_merge,
    window_partition,
)


class MGAConv(nn.Module):
    """Multi-gradient aggregation convolution: a depthwise 3x3 whose kernel is the sum of a plain, a
    central-difference, a horizontal-gradient and a vertical-gradient kernel, then pointwise and full 3x3 convs.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.plain = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.central = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.horizontal = nn.Parameter(torch.empty(dim, 3))  # u: left column u, right column -u
        self.vertical = nn.Parameter(torch.empty(dim, 3))  # v: top row v, bottom row -v
        for kernel in (self.plain, self.central, self.horizontal, self.vertical):
            nn.init.uniform_(kernel, -1 / 3, 1 / 3)  # nn.Conv2d's default bound for a depthwise 3x3
        self.plain_bias = nn.Parameter(torch.zeros(dim))
        self.central_bias = nn.Parameter(torch.zeros(dim))
        self.horizontal_bias = nn.Parameter(torch.zeros(dim))
        self.vertical_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("centre", F.one_hot(torch.tensor(4), 9).float().view(3, 3), persistent=False)
        self.register_buffer("difference", torch.tensor([1.0, 0.0, -1.0]), persistent=False)
        self.pointwise = PointwiseConv(dim, dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The depthwise kernel (C, 1, 3, 3) and bias (C,) that sum the four learned ones."""
        central = self.central - self.central.sum(dim=(2, 3), keepdim=True) * self.centre
        horizontal = torch.einsum("ci,j->cij", self.horizontal, self.difference)
        vertical = torch.einsum("cj,i->cij", self.vertical, self.difference)
        weight = self.plain + central + (horizontal + vertical).unsqueeze(1)
        bias = self.plain_bias + self.central_bias + self.horizontal_bias + self.vertical_bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.merged_kernel()  # merged once, so one depthwise conv runs
        gradients = F.conv2d(x, weight, bias, padding=1, groups=self.dim)
        return x + self.conv(x + F.gelu(self.pointwise(gradients)))


class Attention(nn.Module):
    """Multi-head self-attention over groups of tokens (N, G, L, C): each of the G groups attends within itself.

    With a degradation query P (L, C) or (1, C), the projected query is added to the content queries,
    q = Wq x + Wp P, so that the model learns where to look for degradation without weather labels.
    """

    def __init__(self, dim: int, heads: int, query_tokens: int | None = None, dropout: float = 0.01):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{dim} channels do not split into {heads} heads")
        self.heads = heads
        self.attn_drop = dropout
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.degradation_query = None
        self.query_proj = None
        if query_tokens is not None:
            self.degradation_query = nn.Parameter(torch.randn(query_tokens, dim) * 0.02)
            self.query_proj = Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N, G, L, C); mask, additive, (G, L, L) or None."""
        groups = tokens.shape[1]
        bias = self.qkv.bias
        if self.degradation_query is not None:
            # q's third of the projection gets the projected query (k and v get zeros): added with the bias
            query = self.query_proj(self.degradation_query)
            bias = bias + F.pad(query, (0, 2 * query.shape[-1]))  # (L, 3C) or (1, 3C)
        qkv = linear(tokens, self.qkv.weight, bias)  # (N, G, L, 3C)
        dropout = self.attn_drop if self.training else 0.0
        if mask is None:
            # each group a batch entry: q, k, v stay views of qkv (no copy), which the fused CPU kernel reads as is
            q, k, v = rearrange(qkv, "n g l (three h d) -> three (n g) h l d", three=3, h=self.heads)
            out = attention(q, k, v, dropout=dropout)
            out = rearrange(out, "(n g) h l d -> n g l (h d)", g=groups)
        else:
            # groups into the head axis: 4-D inputs run the fused CPU kernel and one mask broadcasts over N
            q, k, v = rearrange(qkv, "n g l (three h d) -> three n (g h) l d", three=3, h=self.heads)
            mask = repeat(mask, "g l m -> 1 (g h) l m", h=self.heads)  # 4-D, or SDPA falls back to math
            out = attention(q, k, v, mask, dropout)
            out = rearrange(out, "n (g h) l d -> n g l (h d)", g=groups)
        return self.proj_drop(self.proj(out))


class WindowAttention(nn.Module):
    """Attention within the non-overlapping windows of each frame, optionally shifted: (N, C, H, W) -> same."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, degradation_query: bool, dropout: float = 0.01):
        super().__init__()
        self.window = window
        self.shift = shift
        self.attention = Attention(dim, heads, window * window if degradation_query else None, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = rearrange(x, "n c h w -> n h w c")
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = cached_shifted_window_mask(height, width, self.window, self.shift, x.device, x.dtype)
        windows = self.attention(window_partition(x, self.window), mask)  # (N, nW, ws*ws, C)
        x = window_merge(windows, self.window, height, width)  # (N, H, W, C)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return rearrange(x, "n h w c -> n c h w")


class TemporalAttention(nn.Module):
    """Attention across the frames of a clip at every pixel: (B*T, C, H, W) -> same."""

    def __init__(self, dim: int, heads: int, degradation_query: bool, dropout: float = 0.01):
        super().__init__()
        self.attention = Attention(dim, heads, 1 if degradation_query else None, dropout)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        height = x.shape[-2]
        tokens = rearrange(x, "(b t) c h w -> b (h w) t c", t=frames)  # every pixel: a sequence of T frames
        return rearrange(self.attention(tokens), "b (h w) t c -> (b t) c h w", h=height)


class GatedFFN(nn.Module):
    """Gated feed-forward: pointwise C -> 2C, depthwise 3x3, then GELU(a) * b over the two halves."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = PointwiseConv(dim, 2 * dim)
        self.depthwise = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.depthwise(self.expand(x)).chunk(2, dim=1)
        # a is a channel slice of a channels-last tensor, so strided, and GELU runs scalar on it (7x slower on
        # CPU, backward too); on a dense copy it vectorises
        return F.gelu(a.contiguous(memory_format=torch.channels_last)) * b


class DynamicStaticBlock(nn.Module):
    """MGAConv, then a static branch (window attention) on half the channels and a dynamic branch (temporal
    attention) on the other half, each followed by the block's gated FFN; (B*T, C, H, W) -> same.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int, degradation_query: bool, dropout: float = 0.01):
        super().__init__()
        half = dim // 2
        self.mga = MGAConv(dim)
        self.spatial_norm = ChannelLayerNorm(half)
        self.spatial_attention = WindowAttention(half, heads, window, shift, degradation_query, dropout)
        self.spatial_ffn_norm = ChannelLayerNorm(half)
        self.temporal_norm = ChannelLayerNorm(half)
        self.temporal_attention = TemporalAttention(half, heads, degradation_query, dropout)
        self.temporal_ffn_norm = ChannelLayerNorm(half)
        self.ffn = GatedFFN(half)  # shared by both branches, as in the paper

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        static, dynamic = self.mga(x).chunk(2, dim=1)
        static = static + self.spatial_attention(self.spatial_norm(static))
        static = static + self.ffn(self.spatial_ffn_norm(static))
        dynamic = dynamic + self.temporal_attention(self.temporal_norm(dynamic), frames)
        dynamic = dynamic + self.ffn(self.temporal_ffn_norm(dynamic))
        return torch.cat([static, dynamic], dim=1)


class Stage(nn.Module):
    """A run of dynamic-static blocks at one resolution; odd-indexed blocks use shifted windows."""

    def __init__(self, dim: int, heads: int, depth: int, window: int, degradation_query: bool, dropout: float = 0.01):
        super().__init__()
        self.blocks = nn.ModuleList(
            DynamicStaticBlock(dim, heads, window, window // 2 if i % 2 else 0, degradation_query, dropout)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, frames)
        return x


class Downsample(nn.Module):
    """Haar DWT (C -> 4C sub-bands, half size), pointwise 4C -> 2C, BatchNorm, ReLU."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(HaarDWT(dim), PointwiseConv(4 * dim, 2 * dim), nn.BatchNorm2d(2 * dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv C -> 2C, PixelShuffle 2 (-> C/2 channels, double size), BatchNorm, GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, padding=1, bias=False),
            nn.PixelShuffle(2),
            nn.BatchNorm2d(dim // 2),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DynStaticNet(nn.Module):
    """Restores a clip (B, T, 3, H, W) in [0, 1]: two encoder levels, a bottleneck, two decoder levels and a
    refinement stage, all at full temporal length; the output conv's correction is added to the input.

    `dropout` applies to the attention weights and outputs in training. On CPU, attention dropout sends
    F.scaled_dot_product_attention to its unfused kernel, which keeps every attention matrix for backward:
    a training step on 10 frames of 64x64 took about 40% longer and 4.3 GB instead of 3.3 GB; 0 avoids that.
    """

    def __init__(
        self,
        dim: int = 24,
        heads: tuple[int, int, int] = (1, 2, 4),
        blocks: tuple[int, int, int] = (4, 6, 8),
        refinement_blocks: int = 4,
        refinement_heads: int = 2,
        window: int = 8,
        dropout: float = 0.01,
    ):
        super().__init__()
        self.multiple = 4 * window  # two Haar halvings, then whole windows
        stage = partial(Stage, window=window, dropout=dropout)
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.LeakyReLU(0.2))
        self.encoder1 = stage(dim, heads[0], blocks[0], degradation_query=False)
        self.down1 = Downsample(dim)
        self.encoder2 = stage(2 * dim, heads[1], blocks[1], degradation_query=False)
        self.down2 = Downsample(2 * dim)
        self.bottleneck = stage(4 * dim, heads[2], blocks[2], degradation_query=False)
        self.up2 = Upsample(4 * dim)
        self.fuse2 = PointwiseConv(4 * dim, 2 * dim)
        self.decoder2 = stage(2 * dim, heads[1], blocks[1], degradation_query=True)
        self.up1 = Upsample(2 * dim)
        self.fuse1 = PointwiseConv(2 * dim, dim)
        self.decoder1 = stage(dim, heads[0], blocks[0], degradation_query=True)
        self.refinement = stage(dim, refinement_heads, refinement_blocks, degradation_query=True)
        self.output = nn.Conv2d(dim, 3, 3, padding=1)

    def start_from_identity(self) -> None:
        """Zero the output convolution: the network then returns its input (a training's starting point)."""
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        frames, height, width = degraded.shape[1], degraded.shape[-2], degraded.shape[-1]
        x = rearrange(mirror_pad_to_multiple(degraded, self.multiple), "b t c h w -> (b t) c h w")
        # Channels-last: convolutions skip their layout reorders, and the channel norms, window partitions and
        # per-pixel token views read contiguous channels.
        x = x.contiguous(memory_format=torch.channels_last)
        skip1 = self.encoder1(self.embed(x), frames)
        skip2 = self.encoder2(self.down1(skip1), frames)
        x = self.bottleneck(self.down2(skip2), frames)
        x = self.decoder2(self.fuse2(torch.cat([self.up2(x), skip2], dim=1)), frames)
        x = self.decoder1(self.fuse1(torch.cat([self.up1(x), skip1], dim=1)), frames)
        x = self.refinement(x, frames)
        correction = rearrange(self.output(x), "(b t) c h w -> b t c h w", t=frames)
        return degraded + correction[..., :height, :width]
