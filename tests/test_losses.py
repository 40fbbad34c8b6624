import math

import torch

from weather_restore.losses import LOSSES, charbonnier_loss, l1_loss, psnr_loss
from weather_restore.metrics import psnr


def test_psnr_loss_averages_per_frame_psnr_rather_than_pooling_the_error():
    clean = torch.zeros(1, 2, 3, 4, 4)
    restored = clean.clone()
    restored[0, 0] += 0.1  # 20 dB
    restored[0, 1] += 0.01  # 40 dB
    assert math.isclose(psnr_loss(restored, clean).item(), -30.0, abs_tol=1e-3)


def test_losses_are_zero_at_the_target_and_grow_with_the_error():
    clean = torch.rand(2, 3, 8, 8)
    for name in ("charbonnier", "l1"):
        loss = LOSSES[name]
        assert loss(clean, clean).item() < 1e-2
        assert loss(clean + 0.2, clean) > loss(clean + 0.1, clean)
    assert math.isclose(l1_loss(clean + 0.1, clean).item(), 0.1, rel_tol=1e-4)
    assert math.isclose(charbonnier_loss(clean, clean).item(), 1e-3, rel_tol=1e-4)
    assert psnr_loss(clean + 0.01, clean) < psnr_loss(clean + 0.1, clean)


def test_the_psnr_loss_is_the_metric_and_stays_finite_on_a_perfect_frame():
    clean = torch.rand(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    restored = (clean + 0.05).clamp(0, 1)
    assert math.isclose(psnr_loss(restored, clean).item(), -psnr(restored, clean).mean().item(), rel_tol=1e-6)
    perfect = clean.clone().requires_grad_()
    loss = psnr_loss(perfect, clean)
    loss.backward()
    assert math.isclose(loss.item(), -80.0, rel_tol=1e-6) and torch.isfinite(perfect.grad).all()
