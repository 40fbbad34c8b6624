import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from weather_restore.metrics import ALEXNET_WEIGHTS, LPIPSMetric, alexnet_weights_path, psnr, ssim


@pytest.fixture
def frames():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 24, 31, generator=generator)
    noise = 0.05 * torch.arange(1, 5).view(4, 1, 1, 1) * torch.randn(clean.shape, generator=generator)
    return (clean + noise).clamp(0, 1), clean


def as_hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


def test_psnr_equals_scikit_image_per_frame(frames):
    restored, clean = frames
    ours = psnr(restored, clean)
    reference = [
        peak_signal_noise_ratio(as_hwc(c), as_hwc(r), data_range=1.0) for r, c in zip(restored, clean, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-8)
    assert ours[0] > ours[3]


def test_psnr_of_clips_is_one_value_per_frame(frames):
    restored, clean = frames
    clips = psnr(restored.view(2, 2, 3, 24, 31), clean.view(2, 2, 3, 24, 31))
    assert clips.shape == (2, 2) and torch.equal(clips.flatten(), psnr(restored, clean))


def test_ssim_equals_scikit_image_per_frame(frames):
    restored, clean = frames
    ours = ssim(restored, clean)
    reference = [
        structural_similarity(
            as_hwc(c).astype(np.float64), as_hwc(r).astype(np.float64), data_range=1.0, channel_axis=-1
        )
        for r, c in zip(restored, clean, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-7, atol=1e-9)


def test_identical_frames_are_perfect(frames):
    _, clean = frames
    assert torch.isinf(psnr(clean, clean)).all()
    np.testing.assert_allclose(ssim(clean, clean).numpy(), 1.0, atol=1e-12)


def test_ssim_refuses_frames_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.rand(1, 3, 5, 9), torch.rand(1, 3, 5, 9))


def test_lpips_without_cached_weights_is_unavailable_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = LPIPSMetric()
    assert not metric.available
    assert str(tmp_path / "hub" / "checkpoints" / ALEXNET_WEIGHTS) in metric.reason
    assert metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)) is None


def test_lpips_with_a_locally_built_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    metric = LPIPSMetric()
    assert metric.available
    clean = torch.rand(2, 3, 64, 64)
    same = metric(clean, clean)
    different = metric(torch.rand(2, 3, 64, 64), clean)
    assert same.shape == (2,)
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-6)
    assert (different > 1e-4).all()
