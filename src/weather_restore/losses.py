"""Training losses on restored/clean frames in [0, 1], shaped (..., C, H, W): every loss is minimised."""

from __future__ import annotations

from collections.abc import Callable

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frame_psnr(restored: torch.Tensor, clean: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PSNR of every frame: MSE over (C, H, W), then -10 log10(MSE + eps); shape (...) of the leading dims."""
    mse = (restored - clean).pow(2).flatten(-3).mean(-1)
    return -10.0 * torch.log10(mse + eps)


def psnr_loss(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Negative PSNR averaged over frames and batch (the reference's loss, per frame as it should be)."""
    return -frame_psnr(restored, clean).mean()


def charbonnier_loss(restored: torch.Tensor, clean: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sqrt((x - y)^2 + eps^2), averaged: L1 with a smooth minimum."""
    return torch.sqrt((restored - clean).pow(2) + eps * eps).mean()


def l1_loss(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (restored - clean).abs().mean()


LOSSES: dict[str, Loss] = {"psnr": psnr_loss, "charbonnier": charbonnier_loss, "l1": l1_loss}
