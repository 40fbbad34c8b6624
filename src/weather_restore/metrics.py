"""Metrics as pure functions: PSNR, SSIM and LPIPS of restored frames, and FLOPs of a model's forward.

PSNR and SSIM are computed on RGB in [0, 1], per frame, and equal scikit-image's `peak_signal_noise_ratio` and
`structural_similarity(channel_axis=-1, data_range=1)` on the same frames (tests hold them to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten

# torch 2.14's FlopCounterMode has no formula for the CPU fused attention kernels that
# F.scaled_dot_product_attention runs on CPU: without these the attention matmuls vanish from the count.
# The math fallback decomposes into bmm, which is already counted. Registered once per process.
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_flash_attention_backward_flop(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CONV = {aten.convolution, aten._convolution, aten.convolution_backward, aten._slow_conv2d_forward}
_MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


def _kind(op: object) -> str:
    if op in _CONV:
        return "conv"
    if op in _MATMUL:
        return "matmul"
    if "attention" in str(op):
        return "attention"
    return "other"


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> dict[str, float | dict[str, float]]:
    """FLOPs of one forward of `model` on `inputs`, counted op by op by FlopCounterMode.

    Returns {"flops", "macs", "flops_by_kind": {"conv", "matmul", "attention", ...}, "macs_by_kind"}; one
    multiply-accumulate is two FLOPs. Everything is counted: convolutions (including functional ones),
    linear layers and matmuls (as "matmul") and the attention products. Runs with autograd enabled, since the
    counter's module tracker can fail under no_grad on modules applied to parameters; the output is dropped.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs)
    by_kind: dict[str, float] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        by_kind[_kind(op)] = by_kind.get(_kind(op), 0) + flops
    total = counter.get_total_flops()
    return {
        "flops": float(total),
        "macs": total / 2,
        "flops_by_kind": {kind: float(flops) for kind, flops in by_kind.items()},
        "macs_by_kind": {kind: flops / 2 for kind, flops in by_kind.items()},
    }


log = logging.getLogger(__name__)


def psnr(restored: torch.Tensor, clean: torch.Tensor, data_range: float = 1.0, eps: float = 0.0) -> torch.Tensor:
    """PSNR in dB of each frame of (..., C, H, W) tensors, in float64: one value per frame, shaped like the leading
    dims (inf where equal). The one PSNR of the project: validation, test, export parity and the PSNR loss, which
    passes `eps` (added to the MSE) to stay finite and differentiable on a perfect frame."""
    mse = (restored.double() - clean.double()).pow(2).flatten(-3).mean(dim=-1)
    return 10.0 * torch.log10(data_range**2 / (mse + eps))


def ssim(restored: torch.Tensor, clean: torch.Tensor, data_range: float = 1.0, window: int = 7) -> torch.Tensor:
    """SSIM of each frame of (N, C, H, W) tensors, as scikit-image computes it by default.

    A 7x7 uniform window with the sample covariance (N/(N-1)), K1 = 0.01, K2 = 0.03, averaged over the pixels
    whose window lies inside the image (scikit-image crops that border), then over the channels.
    """
    if min(restored.shape[-2:]) < window:
        raise ValueError(f"SSIM needs frames of at least {window}x{window}, got {tuple(restored.shape[-2:])}")
    x, y = restored.double(), clean.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731  valid windows only
    mx, my = mean(x), mean(y)
    norm = window * window / (window * window - 1)
    vx = norm * (mean(x * x) - mx * mx)
    vy = norm * (mean(y * y) - my * my)
    cxy = norm * (mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def alexnet_weights_path() -> Path:
    """Where torchvision looks for LPIPS's AlexNet backbone: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


class LPIPSMetric:
    """LPIPS (AlexNet) distance per frame, or unavailable when the backbone weights are not cached locally.

    Never downloads: `lpips` would fetch the AlexNet weights on first use, which hangs on an offline machine.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        path = alexnet_weights_path()
        self.model: nn.Module | None = None
        self.reason = ""
        if not path.is_file():
            self.reason = (
                f"LPIPS unavailable: the AlexNet backbone weights are not in the local torch cache; put "
                f"{ALEXNET_WEIGHTS} at {path} (or set TORCH_HOME) to enable it"
            )
            log.warning(self.reason)
            return
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    @classmethod
    def disabled(cls, reason: str) -> LPIPSMetric:
        """A metric that reports `reason` and returns None, without looking for weights."""
        metric = cls.__new__(cls)
        metric.model, metric.reason = None, reason
        return metric

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor | None:
        """One distance per frame of (N, 3, H, W) tensors in [0, 1]; None when unavailable."""
        if self.model is None:
            return None
        return self.model(restored * 2 - 1, clean * 2 - 1).flatten().double().cpu()


# --- temporal consistency ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalReference:
    """The motion of a clean clip, measured once and used to judge any version of it (restored, degraded, clean).

    `flows[t]` holds, for each pixel of frame t+1, its displacement (rows, columns) to frame t; `masks[t]` is True
    where that displacement passes the forward-backward check and lands inside frame t (not occluded).
    """

    flows: np.ndarray  # (T-1, 2, H, W)
    masks: np.ndarray  # (T-1, H, W) bool


def _gray(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) RGB in [0, 1] -> (T, H, W) luminance, as skimage.color.rgb2gray weighs it."""
    weights = torch.tensor([0.2125, 0.7154, 0.0721], dtype=torch.float64).view(1, 3, 1, 1)
    return (frames.double().cpu() * weights).sum(dim=1).numpy()


def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of a (..., H, W) array at (H, W) coordinates, edges repeated."""
    from scipy.ndimage import map_coordinates

    if image.ndim == 2:
        return map_coordinates(image, [rows, cols], order=1, mode="nearest")
    return np.stack([_sample(channel, rows, cols) for channel in image])


def temporal_reference(clean: torch.Tensor) -> TemporalReference:
    """TV-L1 optical flow between consecutive clean frames of a (T, 3, H, W) clip, with occlusion masks.

    The mask is Ruder et al.'s forward-backward check, as Lai et al. (ECCV 2018) use it for the warping error:
    a pixel is occluded where |b + f(x + b)|² > 0.01 (|b|² + |f(x + b)|²) + 0.5 (b the backward flow, f the
    forward flow), or where x + b leaves the frame.
    """
    from skimage.registration import optical_flow_tvl1

    gray = _gray(clean)
    height, width = gray.shape[1:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    flows, masks = [], []
    for previous, current in zip(gray[:-1], gray[1:], strict=True):
        backward = optical_flow_tvl1(current, previous).astype(np.float64)  # current(x) ~ previous(x + b)
        forward = optical_flow_tvl1(previous, current).astype(np.float64)  # previous(y) ~ current(y + f)
        to_rows, to_cols = rows + backward[0], cols + backward[1]
        forward_there = _sample(forward, to_rows, to_cols)
        mismatch = ((backward + forward_there) ** 2).sum(axis=0)
        scale = (backward**2).sum(axis=0) + (forward_there**2).sum(axis=0)
        inside = (to_rows >= 0) & (to_rows <= height - 1) & (to_cols >= 0) & (to_cols <= width - 1)
        flows.append(backward)
        masks.append(inside & (mismatch <= 0.01 * scale + 0.5))
    empty = (0, 2, height, width)
    return TemporalReference(
        np.stack(flows) if flows else np.zeros(empty), np.stack(masks) if masks else np.zeros(empty[:1] + empty[2:])
    )


def warping_error(frames: torch.Tensor, reference: TemporalReference) -> float:
    """Lai et al.'s warping error of a (T, 3, H, W) clip: frame t-1 warped onto frame t by the clean clip's flow,
    the squared difference to frame t averaged over the non-occluded pixels and the channels, then over t.

    Zero for a clip that follows the clean clip's motion exactly; flicker and wobble raise it. Compare it with the
    same figure of the clean clip (the flow's own residual) and of the degraded clip."""
    video = frames.double().cpu().numpy()
    height, width = video.shape[2:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    errors = []
    for t, (flow, mask) in enumerate(zip(reference.flows, reference.masks, strict=True)):
        if not mask.any():
            continue
        warped = _sample(video[t], rows + flow[0], cols + flow[1])
        errors.append(float(((video[t + 1] - warped) ** 2).mean(axis=0)[mask].mean()))
    return float(np.mean(errors)) if errors else 0.0


def flicker_error(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """The flow-free temporal error of a (T, 3, H, W) clip: mean |(R_t - R_{t-1}) - (C_t - C_{t-1})| over pixels,
    channels and t. Zero when the restored clip changes from frame to frame exactly as the clean one does."""
    if restored.shape[0] < 2:
        return 0.0
    restored_change = restored.double().diff(dim=0)
    clean_change = clean.double().to(restored.device).diff(dim=0)
    return float((restored_change - clean_change).abs().mean())
