"""DynStaticNet: shapes, the paper's pieces, parameter and FLOP targets, determinism, export and training."""

import importlib.util
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry

from weather_restore import metrics
from weather_restore.errors import ConfigError
from weather_restore.metrics import count_flops
from weather_restore.models import MODEL_NAMES, build_model
from weather_restore.models.dynstaticnet import DynStaticNet, MGAConv, TemporalAttention, WindowAttention
from weather_restore.models.facts import by_rank, by_registered_name, model_facts

TINY = {"dim": 8, "blocks": (1, 2, 1), "refinement_blocks": 1}


def clip(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> DynStaticNet:
    torch.manual_seed(0)
    return DynStaticNet(**TINY).eval()


@pytest.mark.parametrize("shape", [(1, 1, 3, 17, 23), (2, 3, 3, 40, 33), (1, 2, 3, 64, 64)])
def test_output_has_the_input_shape_for_any_size_and_frame_count(tiny, shape):
    with torch.no_grad():
        restored = tiny(clip(*shape))
    assert restored.shape == shape
    assert torch.isfinite(restored).all()


def test_parameters_match_the_spec_piece_by_piece():
    model = DynStaticNet()
    spec = {
        "embed": 672,
        "encoder1": 33_504,
        "down1": 4_752,
        "encoder2": 186_912,
        "down2": 18_720,
        "bottleneck": 959_232,
        "up2": 165_984,
        "fuse2": 4_656,
        "decoder2": 203_472,
        "up1": 41_520,
        "fuse1": 1_176,
        "decoder1": 37_872,
        "refinement": 37_872,
        "output": 651,
    }
    measured = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in spec}
    assert measured == spec
    assert sum(p.numel() for p in model.parameters()) == sum(spec.values()) == 1_696_995


def test_default_model_costs_51_6_g_macs_at_10_frames_of_128():
    # FLOPs depend on shapes only: counting on the meta device gives the CPU count (the next test) in 2 s
    with torch.device("meta"):
        model = DynStaticNet()
        frames = torch.empty(1, 10, 3, 128, 128)
    flops = count_flops(model, frames)
    assert flops["macs"] == pytest.approx(51.6e9, rel=0.05)
    assert flops["macs_by_kind"]["conv"] == pytest.approx(39.73e9, rel=0.01)


def test_flop_count_includes_the_cpu_attention_kernel(tiny):
    frames = clip(1, 3, 3, 32, 32)
    on_cpu = count_flops(tiny, frames)
    with torch.device("meta"):
        shadow = DynStaticNet(**TINY)
    on_meta = count_flops(shadow, frames.to("meta"))  # meta runs attention as plain bmm: counted by torch
    assert on_cpu["macs_by_kind"]["attention"] > 0
    assert on_cpu["flops"] == on_meta["flops"]
    assert on_cpu["macs"] == on_cpu["flops"] / 2


def test_importing_metrics_again_leaves_its_flop_formulas_registered_once(monkeypatch):
    # torch raises on a second registration of an op's formula: the module's code, run again under another name
    # (as a reload would, without replacing the module the other tests use), must find them there and keep them.
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    formula = flop_registry[attention]
    spec = importlib.util.spec_from_file_location("weather_restore_metrics_again", metrics.__file__)
    again = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, again)
    spec.loader.exec_module(again)
    assert again.count_flops is not metrics.count_flops
    assert flop_registry[attention] is formula


def test_mga_conv_merges_its_four_kernels_into_one_depthwise_conv():
    torch.manual_seed(0)
    mga = MGAConv(4)
    with torch.no_grad():
        for bias in (mga.plain_bias, mga.central_bias, mga.horizontal_bias, mga.vertical_bias):
            bias.uniform_(-1, 1)
    central = mga.central.detach().clone()
    central[:, 0, 1, 1] -= mga.central.detach().sum(dim=(1, 2, 3))
    horizontal = torch.zeros(4, 1, 3, 3)
    horizontal[:, 0, :, 0], horizontal[:, 0, :, 2] = mga.horizontal.detach(), -mga.horizontal.detach()
    vertical = torch.zeros(4, 1, 3, 3)
    vertical[:, 0, 0, :], vertical[:, 0, 2, :] = mga.vertical.detach(), -mga.vertical.detach()
    kernels = [
        (mga.plain.detach(), mga.plain_bias),
        (central, mga.central_bias),
        (horizontal, mga.horizontal_bias),
        (vertical, mga.vertical_bias),
    ]
    x = clip(2, 4, 9, 11) - 0.5
    expected = sum(F.conv2d(x, k, b.detach(), padding=1, groups=4) for k, b in kernels)
    weight, bias = mga.merged_kernel()
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1, groups=4), expected)
    # one depthwise (9C), one pointwise (C^2, a matmul over each pixel's channels on CPU) and one full 3x3 (9C^2)
    # multiply-accumulate per output pixel
    pixels = 2 * 9 * 11
    assert count_flops(mga, x)["macs_by_kind"] == {"conv": (9 * 4 + 9 * 4 * 4) * pixels, "matmul": 4 * 4 * pixels}


def test_shifted_window_attention_keeps_wrapped_regions_apart_and_rolls_back():
    torch.manual_seed(0)
    x = clip(1, 4, 16, 16)
    poked = x.clone()
    poked[0, :, 0, 0] += 1.0
    changed = {}
    for shift in (0, 4):
        attention = WindowAttention(4, heads=1, window=8, shift=shift, degradation_query=False).eval()
        with torch.no_grad():
            changed[shift] = (attention(poked) - attention(x)).abs().sum(dim=1)[0] > 0
    # plain windows: the pixel reaches its 8x8 window; shifted: the window holds wrapped pixels from the
    # far edges, which the mask hides, so only the top-left 4x4 of the original image is reached
    assert changed[0][:8, :8].all() and not changed[0][8:].any() and not changed[0][:, 8:].any()
    assert changed[4][:4, :4].all() and changed[4].sum() == 16


def test_temporal_attention_mixes_frames_of_one_pixel_only():
    torch.manual_seed(0)
    attention = TemporalAttention(4, heads=2, degradation_query=True).eval()
    x = clip(2 * 3, 4, 5, 6)  # two clips of three frames
    poked = x.clone()
    poked[1, :, 2, 3] += 1.0  # frame 1 of clip 0
    with torch.no_grad():
        changed = (attention(poked, frames=3) - attention(x, frames=3)).abs().sum(dim=1) > 0
    assert changed[:3, 2, 3].all()
    assert changed.sum() == 3


def test_degradation_queries_are_learned_and_only_in_decoder_and_refinement():
    model = DynStaticNet()
    queries = {n: p for n, p in model.named_parameters() if n.endswith("degradation_query")}
    stages = {name.split(".")[0] for name in queries}
    assert stages == {"decoder2", "decoder1", "refinement"}
    assert len(queries) == 2 * (6 + 4 + 4)  # spatial and temporal, in every such block
    spatial = queries["decoder1.blocks.0.spatial_attention.attention.degradation_query"]
    temporal = queries["decoder1.blocks.0.temporal_attention.attention.degradation_query"]
    assert spatial.shape == (64, 12) and temporal.shape == (1, 12)
    assert 0.015 < spatial.std().item() < 0.025


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = DynStaticNet(**TINY).train()
    degraded = clip(2, 3, 3, 32, 40)
    F.mse_loss(model(degraded), clip(2, 3, 3, 32, 40, seed=1)).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    assert any("degradation_query" in n for n, _ in model.named_parameters())


def test_eval_is_deterministic_and_each_clip_is_restored_on_its_own(tiny):
    clips = clip(2, 3, 3, 32, 40)
    with torch.no_grad():
        together = tiny(clips)
        assert torch.equal(tiny(clips), together)
        alone = torch.cat([tiny(clips[:1]), tiny(clips[1:])])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_onnx_export_has_dynamic_batch_frames_and_size(tmp_path):
    # The dynamo exporter (torch.export) traces sizes symbolically and records every guard it needs;
    # the TorchScript exporter (dynamo=False) also exports this model but is deprecated and silently bakes
    # any Python branch on a size. The padding is index arithmetic, so nothing size-specific is baked in.
    torch.manual_seed(0)
    model = DynStaticNet(dim=8, blocks=(2, 0, 0), refinement_blocks=0).eval()
    dynamic = torch.export.Dim.DYNAMIC
    path = tmp_path / "dynstaticnet.onnx"
    torch.onnx.export(
        model,
        (clip(2, 3, 3, 40, 72),),
        path,
        dynamo=True,
        opset_version=18,
        input_names=["degraded"],
        output_names=["restored"],
        dynamic_shapes={"degraded": {0: dynamic, 1: dynamic, 3: dynamic, 4: dynamic}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 2, 3, 8, 70), (3, 4, 3, 96, 33)]:
        frames = clip(*shape, seed=1)
        with torch.no_grad():
            expected = model(frames).numpy()
        (restored,) = session.run(None, {"degraded": frames.numpy()})
        assert restored.shape == shape
        np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-4)


def test_bfloat16_autocast_runs_and_stays_close(tiny):
    frames = clip(1, 2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            restored = tiny(frames)
    assert restored.shape == expected.shape
    assert (restored.float() - expected).abs().max() < 0.05


def test_compiles_without_graph_breaks(tiny):
    frames = clip(1, 2, 3, 40, 40)
    compiled = torch.compile(tiny, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(frames), tiny(frames))


def test_tiny_model_overfits_one_clip():
    torch.manual_seed(0)
    model = DynStaticNet(**TINY).train()
    clean = F.interpolate(clip(3, 3, 8, 8), size=32, mode="bilinear")[None]  # (1, 3, 3, 32, 32), smooth
    degraded = 0.6 * clean + 0.3 + 0.05 * clip(1, 3, 3, 32, 32, seed=1)  # haze-like veil and noise
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(model(degraded), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps"


def test_build_model_by_name():
    model = build_model("DynStaticNet", dim=8, blocks=(1, 1, 1), refinement_blocks=0)
    assert isinstance(model, DynStaticNet)
    assert MODEL_NAMES == ("dynstaticnet", "dwgn")
    with pytest.raises(ConfigError, match="dynstaticnet, dwgn"):
        build_model("unet")


def test_model_facts_give_each_layout():
    video, image = model_facts("dynstaticnet"), model_facts("DwGN")
    assert video.input_shape(2, 10, 64, 48) == (2, 10, 3, 64, 48)
    assert image.input_shape(2, 10, 64, 48) == (20, 3, 64, 48)
    assert (video.video, image.video) == (True, False)
    assert video.dynamic_axes == {0: "batch", 1: "frames", 3: "height", 4: "width"}
    assert image.dynamic_axes == {0: "batch", 2: "height", 3: "width"}
    assert (video.dynamic_shape, image.dynamic_shape) == ((-1, -1, 3, -1, -1), (-1, 3, -1, -1))
    assert image.description.endswith("takes frames [B, 3, H, W]")
    assert by_rank(5) is video and by_rank(4) is image and by_rank(3) is None
    assert by_registered_name("DwGN") is image and by_registered_name("dwgn") is None


def test_starting_from_identity_returns_the_input_and_still_learns():
    torch.manual_seed(0)
    model = DynStaticNet(**TINY)
    model.start_from_identity()
    frames, clean = clip(1, 2, 3, 24, 40), clip(1, 2, 3, 24, 40, seed=1)
    restored = model(frames)
    assert torch.equal(restored, frames)
    (restored - clean).abs().mean().backward()
    assert model.output.weight.grad.abs().sum() > 0  # the zeroed layer learns first, then the rest follow
