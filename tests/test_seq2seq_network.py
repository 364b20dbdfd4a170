"""Seq2SeqNet: shapes (2.5D and 3D, odd sizes), [0, 1] range, code conditioning, real learning, sizes."""
from __future__ import annotations

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, count_parameters, estimate_feature_map_voxels

torch.set_num_threads(2)


def _tiny(**over):
    net = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8, 16], num_res_blocks=1, num_hyper_res_blocks=1,
               code_length=8, hyper_bank_size=4)
    net.update(over)
    return net


@pytest.mark.parametrize("size", [(32, 32), (37, 45), (5, 6)])
def test_shapes_2d_k3_and_range(size):
    torch.manual_seed(0)
    net = Seq2SeqNet(4, 3, 2, _tiny())
    x = torch.rand(2, 3, *size)
    y = net(x, torch.tensor([0, 3]))
    assert y.shape == x.shape
    assert y.min().item() >= 0.0 and y.max().item() <= 1.0
    feats = net.encode(x)
    assert feats.shape == (2, 16, -(-size[0] // 4), -(-size[1] // 4))
    assert net.decode(feats, net.sequence_code(torch.tensor([1, 1])), output_size=size).shape == x.shape


def test_shapes_3d_odd():
    torch.manual_seed(0)
    net = Seq2SeqNet(3, 1, 3, _tiny())
    x = torch.rand(2, 1, 9, 14, 17)
    y = net(x, torch.tensor([2, 0]))
    assert y.shape == x.shape
    assert 0.0 <= y.min().item() and y.max().item() <= 1.0


def test_codes_change_output_and_sequence_code():
    torch.manual_seed(1)
    net = Seq2SeqNet(4, 3, 2, _tiny())
    code = net.sequence_code(torch.tensor([0, 2]))
    assert code.shape == (2, 8) and code.dtype == torch.float32
    torch.testing.assert_close(code[1], torch.eye(8)[2])
    x = torch.rand(1, 3, 16, 16).expand(2, 3, 16, 16).contiguous()
    y = net(x, torch.tensor([0, 2]))
    assert (y[0] - y[1]).abs().mean() > 1e-4
    # the batch is processed per sample: batched equals one by one
    torch.testing.assert_close(y[1:], net(x[1:], torch.tensor([2])), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="indices"):
        net.sequence_code(torch.tensor([4]))
    with pytest.raises(ValueError):
        net(torch.rand(1, 2, 16, 16), torch.tensor([0]))


def test_config_errors_are_plans_errors():
    with pytest.raises(PlansError, match="code_length"):
        Seq2SeqNet(9, 1, 2, _tiny())
    with pytest.raises(PlansError, match="lacks"):
        Seq2SeqNet(2, 1, 2, {"encoder_channels": [4, 8, 16]})
    with pytest.raises(PlansError, match="one entry per"):
        Seq2SeqNet(2, 1, 2, _tiny(encoder_kernel_sizes=[7, 3]))


def test_few_steps_reduce_l1():
    """Real learning: a tiny translation (target = smooth nonlinear function of the source) is fitted."""
    torch.manual_seed(2)
    net = Seq2SeqNet(2, 3, 2, _tiny(encoder_channels=[8, 16, 16]))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    src = torch.stack([(0.5 + 0.4 * torch.sin(3 * xx + k) * torch.cos(2 * yy)) for k in range(3)])[None]
    src = torch.cat([src, src.flip(-1)])
    tgt = 1.0 - src ** 2
    target = torch.tensor([1, 1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (net(src, target) - tgt).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_parameter_counts_scale_with_channels():
    small = count_parameters(Seq2SeqNet(4, 3, 2, _tiny(encoder_channels=[4, 8, 16])))
    large = count_parameters(Seq2SeqNet(4, 3, 2, _tiny(encoder_channels=[8, 16, 32])))
    assert 3.0 < large / small < 4.5          # dominated by C^2 terms
    paper = Seq2SeqNet(4, 3, 2, DEFAULT_SEQ2SEQ_NETWORK)
    assert paper.count_parameters() > 10 * small


def test_feature_map_estimate_matches_hook_count():
    torch.manual_seed(3)
    net = Seq2SeqNet(4, 3, 2, _tiny())
    counted = []

    def hook(_m, _i, out):
        counted.append(out.numel())

    leaves = [m for m in net.modules() if len(list(m.children())) == 0 and not isinstance(m, torch.nn.Identity)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        net(torch.rand(1, 3, 40, 36), torch.tensor([1]))
    for h in handles:
        h.remove()
    estimate = estimate_feature_map_voxels((40, 36), net.network_config, in_channels=3)
    assert estimate == net.estimate_feature_map_voxels((40, 36))
    assert 0.7 * sum(counted) < estimate < 2.5 * sum(counted)
    assert estimate_feature_map_voxels((80, 72), net.network_config, 3) > 3.5 * estimate
