"""DwGN (WAformer): a U-shaped weather-adaptive image transformer with half-dynamic convolutions.

Every block mixes a static path (ordinary convolutions) with a dynamic path whose kernels are generated per
image from its global statistics (GLGF), in the token mixer (HDMC: cross window attention between the two
paths) and in the feed-forward network (HDFN). See shared/spec/models.md for the layer-by-layer description.

How the per-image weights are applied, with a dynamic batch and the same result for any batch (the published
code folds the batch into convolution groups, which cannot export with a dynamic batch): a 1x1 layer's
per-image matrices multiply the pixels in one batched matmul. For a grouped 3x3 layer, GLGF's last step
writes every kernel weight as (template weight G4) x (recalibrated statistic s of the input channel it reads)
+ (one shared term G5(s) per image), so the layer equals a static grouped convolution with the template over
the input scaled by s, plus the shared term times the zero-padded 3x3 sum of each group's inputs: exact, and
as fast as a static convolution. `weights`/`kernels` build the explicit per-image weights the tests check
the fast forms against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from weather_restore.models.layers import (
    ChannelLayerNorm,
    PointwiseConv,
    attention,
    cached_shifted_window_mask,
    mirror_pad_to_multiple,
    window_merge,
    window_partition,
)


def global_average(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C)."""
    return x.mean(dim=(2, 3))


class GLGF(nn.Module):
    """Global-local weight generator: pooled features (B, inp) -> an n-vector of weights per image.

    s = sigmoid(G1(g) + G3(G2(g))) recalibrates the channel statistics g (G1: 16 groups inp -> inp, G2:
    16 groups inp -> 16, G3: 16 -> inp); then G4 (inp groups: channel i writes outputs i*n/inp ..
    (i+1)*n/inp - 1) plus G5 (inp -> 1) broadcast over all n outputs. No biases. The 1x1 convolutions of
    the paper act on pooled vectors, so they are kept as matrices (same parameter counts).
    """

    def __init__(self, inp: int, n: int, fgroup: int = 16, fan_in: int = 1):
        super().__init__()
        per_group = inp // fgroup
        self.fgroup = fgroup
        self.g1 = nn.Parameter(torch.empty(fgroup, per_group, per_group))  # (group, out, in)
        self.g2 = nn.Parameter(torch.empty(fgroup, per_group))
        self.g3 = nn.Parameter(torch.empty(inp, fgroup))
        self.g4 = nn.Parameter(torch.empty(inp, n // inp))
        self.g5 = nn.Parameter(torch.empty(inp))
        # G1-G3 as PyTorch initialises a conv; G4, G5 so that generated kernels start with the spread of a
        # default-initialised conv with `fan_in` inputs (the shared term as large as one such weight).
        for weight, bound in (
            (self.g1, per_group**-0.5),
            (self.g2, per_group**-0.5),
            (self.g3, fgroup**-0.5),
            (self.g4, fan_in**-0.5),
            (self.g5, (fan_in * inp) ** -0.5),
        ):
            nn.init.uniform_(weight, -bound, bound)

    def factors(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recalibrated statistics s (B, inp) and the shared term G5(s) (B, 1): output = G4 ⊙ s + G5(s)."""
        grouped = rearrange(pooled, "b (g i) -> b g i", g=self.fgroup)  # (B, 16, inp/16)
        local = rearrange(torch.einsum("bgi,goi->bgo", grouped, self.g1), "b g o -> b (g o)")
        squeezed = torch.einsum("bgi,gi->bg", grouped, self.g2)  # (B, 16)
        s = torch.sigmoid(local + squeezed @ self.g3.t())
        return s, (s @ self.g5)[:, None]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        s, shared = self.factors(pooled)
        return rearrange(self.g4 * s[:, :, None], "b i m -> b (i m)") + shared  # (B, n)


class SpatialGate(nn.Module):
    """Per-pixel gate from the channel mean: 3x3 conv -> sigmoid -> 3x3 conv, multiplied into the input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv2(torch.sigmoid(self.conv1(x.mean(dim=1, keepdim=True))))  # (B, 1, H, W)
        return x * gate


class DynamicPointwiseConv(nn.Module):
    """1x1 convolution inp -> oup whose (oup x inp) matrix GLGF generates per image, then a spatial gate."""

    def __init__(self, inp: int, oup: int, fgroup: int = 16):
        super().__init__()
        self.oup = oup
        self.generator = GLGF(inp, oup * inp, fgroup, fan_in=inp)
        self.gate = SpatialGate()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image matrices (B, oup, inp); generator channel i writes the column that reads channel i."""
        return rearrange(self.generator(global_average(x)), "b (i o) -> b o i", o=self.oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")  # a view for channels-last input
        y = torch.bmm(tokens, self.weights(x).transpose(1, 2))  # (B, H*W, oup)
        return self.gate(rearrange(y, "b (h w) o -> b o h w", h=height, w=width))


class DynamicGroupedConv(nn.Module):
    """Grouped 3x3 convolution inp -> oup whose kernels GLGF generates per image, times a per-channel scale
    from a second GLGF."""

    def __init__(self, inp: int, oup: int, groups: int, fgroup: int = 16):
        super().__init__()
        self.groups = groups
        self.in_per_group = inp // groups
        self.generator = GLGF(inp, oup * self.in_per_group * 9, fgroup, fan_in=self.in_per_group * 9)
        self.scale = GLGF(inp, oup, fgroup)
        self.register_buffer("box_kernel", torch.ones(groups, 1, 3, 3), persistent=False)

    def template(self) -> torch.Tensor:
        """G4 as a grouped kernel (oup, inp/groups, 3, 3): generator channel i writes the kernels reading
        input channel i (its group's outputs, 9 taps each)."""
        return rearrange(
            self.generator.g4,
            "(g i) (o kh kw) -> (g o) i kh kw",
            g=self.groups,
            i=self.in_per_group,
            kh=3,
            kw=3,
        )

    def kernels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit per-image kernels (B, oup, inp/groups, 3, 3) and channel scales (B, oup), straight from
        the generators' n-vectors."""
        pooled = global_average(x)
        kernels = rearrange(
            self.generator(pooled),
            "b (g i o kh kw) -> b (g o) i kh kw",
            g=self.groups,
            i=self.in_per_group,
            kh=3,
            kw=3,
        )
        return kernels, self.scale(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return self.forward_any_batch(x)
        # Eager: each image's own kernels, channel scale folded in, in one grouped convolution per image (no
        # elementwise passes over the input); a Python loop over images would not export with a dynamic batch.
        kernels, scale = self.kernels(x)
        kernels = kernels * scale[:, :, None, None, None]
        restored = [F.conv2d(x[i : i + 1], kernels[i], padding=1, groups=self.groups) for i in range(x.shape[0])]
        return restored[0] if len(restored) == 1 else torch.cat(restored)

    def forward_any_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as one graph for any batch (exported and compiled): a static grouped convolution with
        the template over the input scaled by s, plus the shared term times a 3x3 sum of each group."""
        pooled = global_average(x)
        s, shared = self.generator.factors(pooled)
        # The kernels' G4 * s part: the template over the input scaled per channel.
        y = F.conv2d(x * s[:, :, None, None], self.template(), padding=1, groups=self.groups)  # (B, oup, H, W)
        # The kernels' G5(s) part weights every input and tap of a group alike: a 3x3 sum of the group.
        group_sum = reduce(x, "b (g i) h w -> b g h w", "sum", g=self.groups)
        box = F.conv2d(group_sum, self.box_kernel, padding=1, groups=self.groups)  # (B, g, H, W)
        y = rearrange(y, "b (g o) h w -> b g o h w", g=self.groups) + (shared[:, :, None, None] * box)[:, :, None]
        return rearrange(y, "b g o h w -> b (g o) h w") * self.scale(pooled)[:, :, None, None]


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into a ((2·window-1)², heads) table of relative position biases."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, window²)
    relative = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, window², window²), in [0, 2w-2]
    return relative[0] * (2 * window - 1) + relative[1]


class HDMC(nn.Module):
    """Half-dynamic multi-head cross-attention in (shifted) windows.

    A static and a dynamic conv path each give q, k, v; the static attention map weights the dynamic values
    and the dynamic map weights the static values; both results are concatenated and projected back to C.
    """

    def __init__(self, channels: int, heads: int, window: int = 8, shift: int = 0, fgroup: int = 16):
        super().__init__()
        self.heads = heads
        self.window = window
        self.shift = shift
        self.static_pw = PointwiseConv(channels, 3 * channels, bias=False)
        self.static_conv = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * heads, bias=False)
        self.dynamic_pw = DynamicPointwiseConv(channels, 3 * channels, fgroup)
        self.dynamic_conv = DynamicGroupedConv(3 * channels, 3 * channels, 3 * heads, fgroup)
        self.relative_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        self.project = PointwiseConv(2 * channels, channels)

    def windows(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3C, H, W) -> q, k, v, each (B, nW*heads, window², C/heads), rolled by -shift first."""
        if self.shift:
            qkv = torch.roll(qkv, shifts=(-self.shift, -self.shift), dims=(2, 3))
        tokens = window_partition(rearrange(qkv, "b c h w -> b h w c"), self.window)  # (B, nW, ws², 3C)
        q, k, v = rearrange(tokens, "b n t (three h d) -> three b (n h) t d", three=3, h=self.heads)
        return q, k, v

    def merge(self, out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, nW*heads, window², C/heads) -> (B, C, H, W), rolled back by +shift."""
        out = rearrange(out, "b (n h) t d -> b n t (h d)", h=self.heads)
        out = rearrange(window_merge(out, self.window, height, width), "b h w c -> b c h w")
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(2, 3))
        return out

    def attention_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Relative position bias plus the shifted-window mask (zero when unshifted): (1, nW*heads, ws², ws²).

        Windows and heads share one axis so that the 4-D mask broadcasts over the batch, which keeps CPU's
        fused attention kernel in use.
        """
        bias = rearrange(self.relative_bias[self.bias_index], "t s h -> 1 h t s")
        mask = cached_shifted_window_mask(height, width, self.window, self.shift, device, bias.dtype)[:, None]
        return rearrange(bias + mask, "n h t s -> 1 (n h) t s")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        qs, ks, vs = self.windows(self.static_conv(F.gelu(self.static_pw(x))))
        qd, kd, vd = self.windows(self.dynamic_conv(F.gelu(self.dynamic_pw(x))))
        mask = self.attention_mask(height, width, x.device).to(qs.dtype)
        static_map_out = attention(qs, ks, vd, mask)
        dynamic_map_out = attention(qd, kd, vs, mask)
        out = torch.cat(
            [self.merge(static_map_out, height, width), self.merge(dynamic_map_out, height, width)], dim=1
        )  # (B, 2C, H, W)
        return self.project(out)


class HDFN(nn.Module):
    """Half-dynamic feed-forward network: static and dynamic conv paths mixed by a learned image-level α."""

    def __init__(self, channels: int, fgroup: int = 16, reduction: int = 16):
        super().__init__()
        hidden = 2 * channels
        self.static_pw = PointwiseConv(channels, hidden, bias=False)
        self.static_conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=channels, bias=False)
        self.dynamic_pw = DynamicPointwiseConv(channels, hidden, fgroup)
        self.dynamic_conv = DynamicGroupedConv(hidden, hidden, channels, fgroup)
        self.mix = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.Linear(channels // reduction, 1, bias=False),
        )
        self.project = PointwiseConv(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        static = self.static_conv(F.gelu(self.static_pw(x)))  # (B, 2C, H, W)
        dynamic = self.dynamic_conv(F.gelu(self.dynamic_pw(x)))
        alpha = torch.sigmoid(self.mix(global_average(x)))[:, :, None, None]  # (B, 1, 1, 1)
        return self.project(alpha * static + (1 - alpha) * dynamic)


class WeatherAdaptiveBlock(nn.Module):
    """x + HDMC(LN(x)), then x + HDFN(LN(x))."""

    def __init__(self, channels: int, heads: int, window: int = 8, shift: int = 0, fgroup: int = 16):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.hdmc = HDMC(channels, heads, window, shift, fgroup)
        self.norm2 = ChannelLayerNorm(channels)
        self.hdfn = HDFN(channels, fgroup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.hdmc(self.norm1(x))
        return x + self.hdfn(self.norm2(x))


def stage(channels: int, depth: int, head_dim: int, window: int, fgroup: int) -> nn.Sequential:
    """`depth` blocks at one level; even-indexed blocks use plain windows, odd-indexed shifted ones."""
    return nn.Sequential(
        *(
            WeatherAdaptiveBlock(channels, channels // head_dim, window, (window // 2) * (i % 2), fgroup)
            for i in range(depth)
        )
    )


class Downsample(nn.Module):
    """Bilinear ×0.5, then a 3x3 conv C -> 2C."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear ×0.5 without antialiasing samples midway between pixel pairs, so on the even sizes met
        # here it is exactly the 2x2 mean: pooling is cheaper and keeps sizes integer under export.
        return self.conv(F.avg_pool2d(x, 2))


class Upsample(nn.Module):
    """Bilinear ×2, then a 3x3 conv C -> C/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels // 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]  # an explicit size rather than a float scale keeps export shapes integer
        return self.conv(F.interpolate(x, size=(2 * height, 2 * width), mode="bilinear", align_corners=False))


class DwGN(nn.Module):
    """Image restorer [B, 3, H, W] in [0, 1] -> [B, 3, H, W]: three encoder levels, a bottleneck, three
    decoder levels with additive skips; the output is the input minus the predicted degradation."""

    def __init__(
        self,
        dim: int = 32,
        encoder_blocks: tuple[int, int, int] = (4, 4, 6),
        bottleneck_blocks: int = 8,
        decoder_blocks: tuple[int, int, int] = (6, 4, 4),
        head_dim: int = 32,
        window: int = 8,
        fgroup: int = 16,
    ):
        super().__init__()
        if dim % head_dim or dim % fgroup or dim < 16:
            raise ValueError(
                f"DwGN's width {dim} must be at least 16 and divide into heads of {head_dim} channels and "
                f"{fgroup} generator groups"
            )
        widths = [dim, 2 * dim, 4 * dim]
        # Three halvings, then whole windows at the bottleneck.
        self.multiple = window * 2 ** len(widths)
        self.intro = nn.Conv2d(3, dim, 3, padding=1)
        self.encoders = nn.ModuleList(
            stage(c, n, head_dim, window, fgroup) for c, n in zip(widths, encoder_blocks, strict=True)
        )
        self.downs = nn.ModuleList(Downsample(c) for c in widths)
        self.bottleneck = stage(8 * dim, bottleneck_blocks, head_dim, window, fgroup)
        self.ups = nn.ModuleList(Upsample(2 * c) for c in reversed(widths))
        self.decoders = nn.ModuleList(
            stage(c, n, head_dim, window, fgroup) for c, n in zip(reversed(widths), decoder_blocks, strict=True)
        )
        self.ending = nn.Conv2d(dim, 3, 3, padding=1)

    def start_from_identity(self) -> None:
        """Zero the ending convolution: the network then returns its input (a training's starting point)."""
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        height, width = degraded.shape[-2:]
        padded = mirror_pad_to_multiple(degraded, self.multiple)  # (B, 3, H', W')
        # Channels-last: window partitions, channel norms and per-pixel matmuls read contiguous channels.
        features = self.intro(padded.contiguous(memory_format=torch.channels_last))
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            features = encoder(features)
            skips.append(features)
            features = down(features)
        features = self.bottleneck(features)  # (B, 8·dim, H'/8, W'/8)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            features = decoder(up(features) + skip)
        restored = padded - self.ending(features)
        return restored[..., :height, :width]
