"""Metrics as pure functions: PSNR, SSIM and LPIPS of restored frames, and FLOPs of a model's forward.

PSNR and SSIM are computed on RGB in [0, 1], per frame, and equal scikit-image's `peak_signal_noise_ratio` and
`structural_similarity(channel_axis=-1, data_range=1)` on the same frames (tests hold them to it).
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def psnr(restored: torch.Tensor, clean: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each frame of (N, C, H, W) tensors: one value per frame (inf where they are equal)."""
    diff = restored.double() - clean.double()
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


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
