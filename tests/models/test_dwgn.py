"""DwGN: shapes, parameter and FLOP targets, the dynamic convolutions, determinism, export and training."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weather_restore.metrics import count_flops
from weather_restore.models.dwgn import (
    HDMC,
    DwGN,
    DynamicGroupedConv,
    DynamicPointwiseConv,
    WeatherAdaptiveBlock,
)
from weather_restore.models.layers import ChannelLayerNorm

# Window 4 keeps the pad multiple at 32; two blocks in the first and last stages give shifted blocks.
TINY = {
    "dim": 16,
    "encoder_blocks": (2, 1, 1),
    "bottleneck_blocks": 1,
    "decoder_blocks": (1, 1, 2),
    "head_dim": 16,
    "window": 4,
}


def image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny() -> DwGN:
    torch.manual_seed(0)
    return DwGN(**TINY).eval()


@pytest.mark.parametrize("shape", [(1, 3, 20, 27), (2, 3, 45, 33), (1, 3, 64, 32)])
def test_output_has_the_input_shape_for_any_size(tiny, shape):
    with torch.no_grad():
        restored = tiny(image(*shape))
    assert restored.shape == shape
    assert torch.isfinite(restored).all()


@pytest.mark.parametrize("options", [{"dim": 24}, {"dim": 48, "head_dim": 32}, {"dim": 8, "head_dim": 8}])
def test_rejects_widths_that_do_not_divide_into_heads_and_generator_groups(options):
    with pytest.raises(ValueError, match="DwGN's width"):
        DwGN(**options)


def test_parameters_match_the_spec_piece_by_piece():
    block = WeatherAdaptiveBlock(32, heads=1)
    assert count_parameters(block) == 81_287
    assert count_parameters(block.hdmc) == 69_107
    assert count_parameters(block.hdfn) == 12_052
    assert count_parameters(block.hdmc.static_pw) + count_parameters(block.hdmc.static_conv) == 30_720
    assert count_parameters(block.hdmc.dynamic_pw) == 3_730
    assert count_parameters(block.hdmc.dynamic_conv) == 32_352
    assert block.hdmc.relative_bias.numel() == 225
    assert count_parameters(block.hdfn.dynamic_pw) + count_parameters(block.hdfn.dynamic_conv) == 6_738
    assert count_parameters(block.hdfn.mix) == 66
    for channels, expected in ((64, 194_922), (128, 519_344), (256, 1_556_796)):
        assert count_parameters(WeatherAdaptiveBlock(channels, heads=channels // 32)) == expected

    model = DwGN()
    assert count_parameters(model.intro) == 896
    assert count_parameters(model.ending) == 867
    assert count_parameters(model.downs) == 387_520
    assert count_parameters(model.ups) == 387_296
    assert count_parameters(model) == 21_672_747


def test_default_model_costs_26_87_g_macs_at_128():
    torch.manual_seed(0)
    macs = count_flops(DwGN(), image(1, 3, 128, 128))["macs"]
    assert abs(macs - 26.87e9) <= 0.05 * 26.87e9


def grouped_conv_reference(x: torch.Tensor, kernels: torch.Tensor, groups: int) -> torch.Tensor:
    """The published formulation: the batch folded into the groups of one convolution."""
    batch, _, height, width = x.shape
    folded = F.conv2d(
        x.reshape(1, -1, height, width),
        kernels.reshape(-1, *kernels.shape[2:]),
        padding=kernels.shape[-1] // 2,
        groups=batch * groups,
    )
    return folded.reshape(batch, -1, height, width)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_grouped_conv_matches_the_batch_folded_grouped_conv(batch):
    torch.manual_seed(0)
    conv = DynamicGroupedConv(48, 48, groups=3)
    x = torch.randn(batch, 48, 11, 9)
    kernels, scale = conv.kernels(x)
    assert kernels.shape == (batch, 48, 16, 3, 3)
    expected = grouped_conv_reference(x, kernels, groups=3) * scale[:, :, None, None]
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_grouped_conv_for_any_batch_equals_the_per_image_convolutions(batch):
    # eager runs one convolution per image; export and compile run the template form, one graph for any batch
    torch.manual_seed(0)
    conv = DynamicGroupedConv(48, 48, groups=3)
    x = torch.randn(batch, 48, 11, 9)
    torch.testing.assert_close(conv.forward_any_batch(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_pointwise_conv_matches_the_batch_folded_conv_and_is_always_gated(batch):
    torch.manual_seed(0)
    conv = DynamicPointwiseConv(32, 64)
    x = torch.randn(batch, 32, 10, 7)
    weights = conv.weights(x)
    assert weights.shape == (batch, 64, 32)
    ungated = grouped_conv_reference(x, weights[..., None, None], groups=1)
    torch.testing.assert_close(conv(x), conv.gate(ungated), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conv(x), ungated, atol=1e-2)


def test_hdmc_crosses_the_attention_maps_of_its_two_paths_with_one_shared_bias():
    torch.manual_seed(0)
    window, heads, channels = 4, 2, 32
    hdmc = HDMC(channels, heads, window)
    x = torch.randn(1, channels, window, window)  # a single window
    with torch.no_grad():
        qs, ks, vs = hdmc.static_conv(F.gelu(hdmc.static_pw(x))).reshape(3, heads, -1, window * window)
        qd, kd, vd = hdmc.dynamic_conv(F.gelu(hdmc.dynamic_pw(x))).reshape(3, heads, -1, window * window)
        bias = torch.empty(heads, window * window, window * window)
        for t in range(window * window):
            for u in range(window * window):
                dy, dx = t // window - u // window, t % window - u % window
                bias[:, t, u] = hdmc.relative_bias[(dy + window - 1) * (2 * window - 1) + dx + window - 1]

        def attend(q, k, v):  # (heads, d, tokens) each
            weights = torch.softmax(q.transpose(1, 2) @ k / q.shape[1] ** 0.5 + bias, dim=-1)
            return (weights @ v.transpose(1, 2)).transpose(1, 2)  # (heads, d, tokens)

        crossed = torch.cat([attend(qs, ks, vd), attend(qd, kd, vs)])  # static map on dynamic values first
        expected = hdmc.project(crossed.reshape(1, 2 * channels, window, window))
        torch.testing.assert_close(hdmc(x), expected, atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient_at_batch_one():
    torch.manual_seed(0)
    model = DwGN(**TINY)
    # As after training: at initialisation a norm's output sums to zero over channels at every pixel, and
    # G5 of a 1x1 generator multiplies exactly that sum, so its gradient would vanish.
    for module in model.modules():
        if isinstance(module, ChannelLayerNorm):
            nn.init.normal_(module.bias, std=0.1)
    model(image(1, 3, 32, 32)).abs().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_eval_is_deterministic_and_each_image_is_restored_on_its_own(tiny):
    pair = image(2, 3, 40, 36)
    with torch.no_grad():
        restored = tiny(pair)
        assert torch.equal(restored, tiny(pair))
        singles = torch.cat([tiny(pair[:1]), tiny(pair[1:])])
    torch.testing.assert_close(restored, singles, atol=1e-5, rtol=0)


# The TorchScript-based exporter (dynamo=False): it records the padding arithmetic on the input size, so
# one graph serves any batch, height and width (checked below), and exports the tiny model in ~15 s. The
# dynamo exporter gives the same graph quality (parity 4e-7) but its symbolic-shape export of the padded,
# windowed sizes took several minutes on a 2-core machine.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_onnx_export_has_dynamic_batch_and_size(tiny, tmp_path):
    path = tmp_path / "dwgn.onnx"
    torch.onnx.export(
        tiny,
        (image(2, 3, 40, 36),),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["degraded"],
        output_names=["restored"],
        dynamic_axes={name: {0: "batch", 2: "height", 3: "width"} for name in ("degraded", "restored")},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (3, 3, 45, 70)]:
        degraded = image(*shape, seed=1)
        with torch.no_grad():
            expected = tiny(degraded).numpy()
        (restored,) = session.run(None, {"degraded": degraded.numpy()})
        assert restored.shape == shape
        assert np.abs(restored - expected).max() < 1e-4


def test_bfloat16_autocast_runs_and_stays_close(tiny):
    degraded = image(1, 3, 32, 48)
    with torch.no_grad():
        expected = tiny(degraded)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            restored = tiny(degraded)
    assert restored.shape == degraded.shape
    assert (restored.float() - expected).abs().max() < 0.1


def test_compiles_without_graph_breaks():
    # One plain and one shifted block with every level's resampling: Dynamo's tracing of the einops
    # patterns costs seconds per block on 2 cores, so the full tiny model would dominate this file's time.
    torch.manual_seed(0)
    model = DwGN(**{**TINY, "encoder_blocks": (2, 0, 0), "bottleneck_blocks": 0, "decoder_blocks": (0, 0, 0)})
    compiled = torch.compile(model.eval(), backend="aot_eager", fullgraph=True)
    degraded = image(1, 3, 45, 33)
    with torch.no_grad():
        torch.testing.assert_close(compiled(degraded), model(degraded), atol=1e-5, rtol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = torch.stack([0.5 + 0.4 * torch.sin(6 * rows * (c + 1) + 4 * cols) for c in range(3)])[None]
    clean = torch.cat([clean, clean.flip(-1)])  # (2, 3, 32, 32)
    degraded = 0.6 * clean + 0.35  # a haze veil
    input_error = F.l1_loss(degraded, clean).item()
    model = DwGN(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):  # about 80 steps are needed
        loss = F.l1_loss(model(degraded), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < input_error / 10:
            break
    assert losses[-1] < input_error / 10
    assert losses[-1] < losses[0] / 10


def test_starting_from_identity_returns_the_input_and_still_learns():
    torch.manual_seed(0)
    model = DwGN(**TINY)
    model.start_from_identity()
    degraded, clean = image(2, 3, 24, 40), image(2, 3, 24, 40, seed=1)
    restored = model(degraded)
    assert torch.equal(restored, degraded)
    (restored - clean).abs().mean().backward()
    assert model.ending.weight.grad.abs().sum() > 0  # the zeroed layer learns first, then the rest follow
