"""HyperConv pins the paper's Algorithm 1: kernel = param @ f(s), per-sample kernels in one grouped conv."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnsynth.networks.hyperconv import HyperConv

torch.set_num_threads(2)


def _by_hand(hc: HyperConv, code: torch.Tensor):
    """param @ MLP(code), computed with explicit layer calls (Linear -> LeakyReLU -> Linear)."""
    lin1, act, lin2 = hc.mlp[0], hc.mlp[1], hc.mlp[2]
    h = code @ lin1.weight.t() + lin1.bias
    h = torch.where(h > 0, h, 0.2 * h)
    f = h @ lin2.weight.t() + lin2.bias                      # (1, c_w)
    kernel = (hc.weight_bank * f[0]).sum(-1)                 # sum_w param[..., w] * f_w
    bias = (hc.bias_bank * f[0]).sum(-1)
    return kernel, bias


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_one_hot_kernel_is_bank_mixed_by_mlp(padding_mode):
    torch.manual_seed(0)
    hc = HyperConv(3, 5, 3, code_length=8, spatial_dims=2, padding_mode=padding_mode, bank_size=4)
    code = F.one_hot(torch.tensor([2]), 8).float()
    kernel, bias = _by_hand(hc, code)
    assert kernel.shape == (5, 3, 3, 3)
    torch.testing.assert_close(hc.mixed_weight(code)[0], kernel)
    x = torch.randn(1, 3, 9, 11)
    xp = F.pad(x, [1, 1, 1, 1], mode="reflect") if padding_mode == "reflect" else F.pad(x, [1, 1, 1, 1])
    expected = F.conv2d(xp, kernel, bias)
    torch.testing.assert_close(hc(x, code), expected, rtol=1e-5, atol=1e-5)
    # a different one-hot code gives a different kernel
    other = F.one_hot(torch.tensor([5]), 8).float()
    assert not torch.allclose(hc.mixed_weight(other), hc.mixed_weight(code))


def test_single_linear_mlp_variant():
    torch.manual_seed(1)
    hc = HyperConv(2, 2, 3, code_length=4, mlp_hidden=None, bank_size=3, padding_mode="zeros")
    code = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    f = hc.mlp[0].weight[:, 1] + hc.mlp[0].bias
    torch.testing.assert_close(hc.mixed_weight(code)[0], hc.weight_bank @ f)


@pytest.mark.parametrize(
    "spatial_dims,groups,stride,kernel,padding_mode",
    [(2, 1, 1, 3, "reflect"), (2, 2, 2, 3, "reflect"), (2, 4, 1, 5, "zeros"), (3, 1, 1, 3, "reflect"),
     (3, 2, 2, 3, "zeros")],
)
def test_batched_codes_equal_one_by_one(spatial_dims, groups, stride, kernel, padding_mode):
    torch.manual_seed(2)
    hc = HyperConv(4, 8, kernel, code_length=6, spatial_dims=spatial_dims, stride=stride, groups=groups,
                   padding_mode=padding_mode, bank_size=5)
    size = (7, 9, 8)[:spatial_dims] if spatial_dims == 3 else (11, 10)
    x = torch.randn(3, 4, *size)
    code = torch.stack([F.one_hot(torch.tensor(i), 6).float() for i in (0, 3, 5)])
    y = hc(x, code)
    singles = torch.cat([hc(x[i:i + 1], code[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(y, singles, rtol=1e-5, atol=1e-5)
    # and each single equals a plain conv with its mixed kernel (groups respected)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    p = kernel // 2
    xp = F.pad(x, [p, p] * spatial_dims, mode="reflect" if padding_mode == "reflect" else "constant")
    for i in range(3):
        ref = conv(xp[i:i + 1], hc.mixed_weight(code[i:i + 1])[0], hc.mixed_bias(code[i:i + 1])[0], stride=stride,
                   groups=groups)
        torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    assert y.shape[2:] == tuple((s + stride - 1) // stride for s in size)


def test_groups_really_restrict_connections():
    torch.manual_seed(3)
    hc = HyperConv(4, 4, 3, code_length=4, groups=2, padding_mode="zeros")
    assert hc.weight_bank.shape == (4, 2, 3, 3, 16)
    x = torch.randn(2, 4, 6, 6)
    code = torch.eye(4)[:2]
    x2 = x.clone()
    x2[:, 2:] += 1.0                       # changes only group 2's inputs
    y, y2 = hc(x, code), hc(x2, code)
    torch.testing.assert_close(y[:, :2], y2[:, :2])
    assert not torch.allclose(y[:, 2:], y2[:, 2:])


def test_gradients_reach_bank_and_mlp():
    torch.manual_seed(4)
    hc = HyperConv(2, 3, 3, code_length=4, bank_size=4)
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    hc(x, torch.eye(4)[[1, 3]]).square().mean().backward()
    for name, p in hc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_batch_mismatch_raises_clear_error():
    hc = HyperConv(2, 3, 3, code_length=4)
    with pytest.raises(ValueError, match="batch size"):
        hc(torch.randn(3, 2, 8, 8), torch.eye(4)[:2])
    with pytest.raises(ValueError, match="code"):
        hc(torch.randn(2, 2, 8, 8), torch.eye(5)[:2])
    with pytest.raises(ValueError, match="input channels"):
        hc(torch.randn(2, 5, 8, 8), torch.eye(4)[:2])
    with pytest.raises(ValueError, match="divisible"):
        HyperConv(3, 4, 3, code_length=4, groups=2)


def test_single_code_broadcasts_and_shared_code_fast_path():
    torch.manual_seed(5)
    hc = HyperConv(2, 3, 3, code_length=4)
    x = torch.randn(3, 2, 8, 8)
    one = torch.eye(4)[2:3]
    y = hc(x, one)
    torch.testing.assert_close(y, hc(x, one.expand(3, 4).contiguous()))
    torch.testing.assert_close(y[1:2], hc(x[1:2], one))


def test_init_gives_conv_like_variance():
    torch.manual_seed(6)
    hc = HyperConv(64, 64, 3, code_length=64)
    w = hc.mixed_weight(torch.eye(64)[:8])
    expected_std = (2 / 1.04) ** 0.5 / (64 * 9) ** 0.5
    assert 0.5 * expected_std < float(w.detach().std()) < 2.0 * expected_std


def test_tiny_map_reflect_falls_back():
    hc = HyperConv(1, 1, 7, code_length=2)
    y = hc(torch.randn(2, 1, 2, 2), torch.eye(2))
    assert y.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("spatial_dims,out_channels,groups,stride", [(2, 3, 1, 1), (2, 6, 2, 2), (3, 1, 1, 1)])
def test_cpu_channel_padding_is_exact(monkeypatch, spatial_dims, out_channels, groups, stride):
    """The CPU path pads each group's outputs to a multiple of 8 (oneDNN's fast grouped kernels); outputs and
    every gradient equal the unpadded grouped convolution's."""
    from nnsynth.networks import hyperconv as hc_mod
    torch.manual_seed(0)
    hc = HyperConv(4, out_channels, 3, code_length=5, spatial_dims=spatial_dims, stride=stride, groups=groups)
    x = torch.randn(3, 4, *(7,) * spatial_dims)
    code = F.one_hot(torch.tensor([0, 3, 4]), 5).float()
    assert hc._padded_group_channels(x) == 8

    def run(multiple):
        monkeypatch.setattr(hc_mod, "CPU_GROUP_CHANNEL_MULTIPLE", multiple)
        hc.zero_grad()
        xi = x.clone().requires_grad_()
        y = hc(xi, code)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), xi.grad, hc.weight_bank.grad.clone(), hc.bias_bank.grad.clone(), hc.mlp[0].weight.grad.clone()

    for a, b in zip(run(8), run(1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert HyperConv(4, 3, 1, code_length=5)._padded_group_channels(x) == 3      # 1x1 kernels: never padded
