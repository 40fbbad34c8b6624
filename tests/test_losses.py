import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

from weather_restore.losses import LOSSES, charbonnier_loss, frame_psnr, l1_loss, psnr_loss


def test_frame_psnr_equals_scikit_image_per_frame():
    rng = np.random.default_rng(0)
    clean = rng.random((2, 3, 3, 8, 8)).astype(np.float32)
    restored = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    ours = frame_psnr(torch.from_numpy(restored), torch.from_numpy(clean))
    assert ours.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = peak_signal_noise_ratio(clean[b, t], restored[b, t], data_range=1.0)
            assert math.isclose(ours[b, t].item(), expected, rel_tol=1e-5)


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
