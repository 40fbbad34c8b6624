"""The shared layers: Haar DWT, channel LayerNorm, linear, mirror padding, windows and the shifted-window mask."""

import torch
import torch.nn.functional as F
from torch import nn

from weather_restore.models.layers import (
    ChannelLayerNorm,
    HaarDWT,
    Linear,
    attention,
    linear,
    mirror_pad_to_multiple,
    shifted_window_mask,
    window_merge,
    window_partition,
)


def test_haar_dwt_equals_the_formula():
    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    bands = [(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]
    expected = torch.stack(bands, dim=2).flatten(1, 2)  # channel k's sub-bands at 4k..4k+3
    torch.testing.assert_close(HaarDWT(3)(x), expected)


def test_haar_dwt_has_no_parameters_and_preserves_energy():
    dwt = HaarDWT(4)
    x = torch.randn(1, 4, 8, 8)
    assert not list(dwt.parameters())
    torch.testing.assert_close(dwt(x).pow(2).sum(), x.pow(2).sum())  # orthonormal


def test_channel_layer_norm_equals_layer_norm_over_channels():
    norm = ChannelLayerNorm(5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 4, 3)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_window_partition_then_merge_is_identity():
    x = torch.randn(2, 16, 24, 3)
    windows = window_partition(x, 8)
    assert windows.shape == (2, 6, 64, 3)
    torch.testing.assert_close(windows[0, 1].reshape(8, 8, 3), x[0, :8, 8:16])  # row-major windows
    torch.testing.assert_close(window_merge(windows, 8, 16, 24), x)


def test_mirror_padding_reflects_where_it_fits_and_mirrors_again_beyond():
    x = torch.randn(1, 2, 3, 20, 45)
    padded = mirror_pad_to_multiple(x, 32)
    assert padded.shape == (1, 2, 3, 32, 64)
    flat = x.flatten(0, 1)
    torch.testing.assert_close(padded.flatten(0, 1), F.pad(flat, (0, 19, 0, 12), mode="reflect"))
    tiny = torch.arange(3.0).view(1, 1, 1, 3)
    assert mirror_pad_to_multiple(tiny, 8)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert mirror_pad_to_multiple(torch.ones(1, 1, 1, 1), 4).shape == (1, 1, 4, 4)


def test_mirror_padding_leaves_multiples_alone():
    x = torch.randn(1, 3, 32, 64)
    assert torch.equal(mirror_pad_to_multiple(x, 32), x)


def test_shifted_mask_blocks_attention_between_wrapped_regions():
    height, width, window, shift = 16, 24, 8, 4
    mask = shifted_window_mask(height, width, window, shift)
    assert mask.shape == ((height // window) * (width // window), window * window, window * window)
    # after rolling by -shift, the last `shift` rows and columns hold pixels wrapped from the opposite edge
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    wrapped = torch.stack([rows >= height - shift, cols >= width - shift], dim=-1).long()  # (H, W, 2)
    labels = window_partition(wrapped[None], window)[0]  # (nW, L, 2)
    for w in range(mask.shape[0]):
        neighbours = (labels[w][:, None, :] == labels[w][None, :, :]).all(dim=-1)
        assert torch.equal(mask[w] == 0, neighbours)
        assert torch.all(mask[w][~neighbours] == float("-inf"))
    assert torch.all(mask[0] == 0)  # windows away from the edges are whole


def test_a_shift_mask_cached_under_inference_mode_still_serves_a_training_step():
    from weather_restore.models.layers import cached_shifted_window_mask

    with torch.inference_mode():
        cached_shifted_window_mask(24, 16, 8, 4, torch.device("cpu"), torch.float32)
    mask = cached_shifted_window_mask(24, 16, 8, 4, torch.device("cpu"), torch.float32)
    scores = torch.zeros(mask.shape, requires_grad=True)
    (scores * mask).sum().backward()  # mul saves the mask for backward, which an inference tensor refuses
    assert not mask.is_inference()


def test_linear_adds_a_per_channel_or_per_token_bias_and_keeps_nn_linear_state_and_gradients():
    x = torch.randn(2, 5, 4, 6, requires_grad=True)
    weight, bias, per_token = torch.randn(9, 6), torch.randn(9), torch.randn(4, 9)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
    torch.testing.assert_close(linear(x, weight, per_token), F.linear(x, weight) + per_token)
    linear(x, weight, per_token).square().sum().backward()  # the in-place bias add keeps autograd intact
    expected = torch.autograd.grad((F.linear(x, weight) + per_token).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    torch.manual_seed(0)
    reference = nn.Linear(6, 9)
    layer = Linear(6, 9)
    layer.load_state_dict(reference.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(layer(x), reference(x))


class _ExportForms(nn.Module):
    """A channel LayerNorm, then attention among each pixel's row neighbours with and without a mask: the two
    layers that take another form inside an ONNX export."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
            self.norm.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        tokens = x.permute(0, 2, 3, 1)  # (N, H, W, C): each row's W pixels are the tokens, the H rows the heads
        width = tokens.shape[-2]
        mask = torch.zeros(width, width).masked_fill(torch.ones(width, width, dtype=torch.bool).triu(1), float("-inf"))
        return attention(tokens, tokens * 0.5, tokens, mask) + attention(tokens, tokens, tokens * 2)


def test_the_export_forms_of_layer_norm_and_attention_compute_what_eager_does(tmp_path):
    """ChannelLayerNorm and `attention` run other operators inside an ONNX export (reductions on the channel
    axis; the scale on q alone, so that ONNX Runtime fuses k's Transpose into its MatMul); ONNX Runtime must give
    what eager PyTorch gives."""
    import onnx
    import onnxruntime as ort

    module = _ExportForms(6).eval()
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    path = tmp_path / "forms.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        eager = module(x)
    torch.testing.assert_close(torch.from_numpy(exported), eager, atol=1e-5, rtol=1e-5)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops  # the export form ran, not F.layer_norm
