"""Pieces both models use: Haar wavelet downsampling, channel LayerNorm, padding, windows and their masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class HaarDWT(nn.Module):
    """One level of the 2-D Haar transform: (N, C, H, W) -> (N, 4C, H/2, W/2), H and W even.

    For each 2x2 block [[a, b], [c, d]] the four outputs are (a+b+c+d)/2, (a+b-c-d)/2, (a-b+c-d)/2 and
    (a-b-c+d)/2; channel c's sub-bands sit at 4c..4c+3. A stride-2 convolution with a fixed kernel bank.
    """

    def __init__(self, channels: int):
        super().__init__()
        bank = (
            torch.tensor(
                [
                    [[1.0, 1.0], [1.0, 1.0]],
                    [[1.0, 1.0], [-1.0, -1.0]],
                    [[1.0, -1.0], [1.0, -1.0]],
                    [[1.0, -1.0], [-1.0, 1.0]],
                ]
            )
            / 2.0
        )
        self.channels = channels
        self.register_buffer("bank", bank.unsqueeze(1).repeat(channels, 1, 1, 1), persistent=False)  # (4C,1,2,2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.bank.to(x.dtype), stride=2, groups=self.channels)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (N, C, H, W), with a weight and a bias per channel."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # An ONNX graph's tensors are NCHW: LayerNormalization over the channels would need a Transpose before
            # and after, and ONNX Runtime normalises rows of a few channels slowly. Reducing over axis 1 runs
            # vectorised over the pixels instead (DynStaticNet's shipped graph: 3.43 -> 2.76 s on 10 frames of 128²).
            mean = x.mean(dim=1, keepdim=True)
            centred = x - mean
            variance = (centred * centred).mean(dim=1, keepdim=True)
            scale = torch.rsqrt(variance + self.eps)
            return centred * scale * self.weight[:, None, None] + self.bias[:, None, None]
        # One fused kernel over the last dim: on a channels-last x both permutes are views (no copy).
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether x is on the CPU in plain eager mode (not traced, exported or compiled): where the hand-picked
    kernels below pay off; graphs keep the plain operators, which their compilers fuse themselves."""
    return x.is_cpu and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, the bias (out,) or broadcast over the trailing dims of the output (e.g. (L, out)).

    In eager CPU mode the bias is added in place after the matmul: CPU addmm first copies the bias into the
    output and then accumulates into it, 25-35% slower on the few-channel layers here.
    """
    if bias is None or not eager_cpu(x):
        return F.linear(x, weight, bias) if bias is None or bias.dim() == 1 else F.linear(x, weight) + bias
    return torch.matmul(x, weight.t()).add_(bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (an nn.Conv2d: same parameters and state) computed in eager mode as a matmul over the
    channels of each pixel: on channels-last input both permutes are views, whereas CPU convolution sends 1x1
    kernels on channels-last input down its slow im2col path. Other devices, exported and compiled graphs keep the
    Conv (so FLOP counts on the meta device still call it a convolution).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not eager_cpu(x):
            return super().forward(x)
        return linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v: F.scaled_dot_product_attention, except in an ONNX export.

    The exporters decompose SDPA into k's Transpose, a Mul by √scale on each of q and kᵀ, then the MatMul; the
    Mul between Transpose and MatMul keeps ONNX Runtime from fusing the two into one FusedMatMul, so it transposes
    every window's (or pixel's) k on its own: DynStaticNet's temporal attention, with 10-frame sequences, spent
    more time in those Transposes than in its MatMuls. Written out with the scale on q alone, the pair fuses.
    """
    if not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, nW, window*window, C), windows in row-major order."""
    return rearrange(x, "n (hw wh) (ww wx) c -> n (hw ww) (wh wx) c", wh=window, wx=window)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(N, nW, window*window, C) -> (N, H, W, C); the inverse of `window_partition`."""
    return rearrange(
        windows,
        "n (hw ww) (wh wx) c -> n (hw wh) (ww wx) c",
        hw=height // window,
        ww=width // window,
        wh=window,
        wx=window,
    )


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive attention mask (nW, window*window, window*window) for windows shifted by `shift` pixels.

    After rolling the image by -shift, windows at the bottom and right edges hold pixels from up to three
    regions that were not neighbours; tokens of different regions must not attend to each other. Built from
    arange so that it follows symbolic sizes under export and compile.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - window).long() + (rows >= height - shift).long()
    col_region = (cols >= width - window).long() + (cols >= width - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]  # (1, H, W, 1)
    region = window_partition(region, window)[0, :, :, 0]  # (nW, window*window)
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, float("-inf"))


_MASKS: dict[tuple, torch.Tensor] = {}


def cached_shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """`shifted_window_mask`, built once per size in eager mode (every shifted block of a forward reuses it).

    While tracing for export or compiling, it is built in the graph instead, so that sizes stay symbolic.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or not isinstance(height, int):
        return shifted_window_mask(height, width, window, shift, device).to(dtype)
    key = (height, width, window, shift, str(device), dtype)
    if key not in _MASKS:
        if len(_MASKS) >= 64:  # restore's tiles come in a handful of sizes; a long-lived process sees few more
            _MASKS.clear()
        with torch.inference_mode(False):  # built under inference mode, it could not be saved for a backward
            _MASKS[key] = shifted_window_mask(height, width, window, shift, device).to(dtype)
    return _MASKS[key]


def mirror_pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last two dims of x at the bottom/right to multiples of `multiple` by mirroring.

    Equals reflection padding wherever it fits; frames smaller than the pad are mirrored again (a b c b a b ..).
    Nothing branches on a size (as a choice between reflection and replication padding would): the indices come
    from arange arithmetic, so an exported graph (torch.export, ONNX) keeps height and width dynamic.
    """
    for dim in (-2, -1):
        size = x.shape[dim]
        index = torch.arange((size + multiple - 1) // multiple * multiple, device=x.device)
        period = (torch.zeros((), dtype=torch.long, device=x.device) + 2 * size - 2).clamp(min=1)
        index = index.remainder(period)
        x = x.index_select(dim, torch.minimum(index, period - index))  # fold the way back of each period
    return x
