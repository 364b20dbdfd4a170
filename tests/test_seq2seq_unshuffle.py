"""``network.input_unshuffle``: the Seq2Seq backbone's convolutions work at 1/f resolution. The encoder folds every
f^d block of input voxels into channels before its stem, the final HyperConv gives every block back as channels,
and only the pointwise intensity path stays at full resolution. Nothing is lost on the way in (space_to_depth is
a permutation), and the planner's cost model counts the cheaper network."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, estimate_feature_map_voxels
from nnsynth.networks.hyperconv import HyperConv
from nnsynth.networks.seq2seq import downsample_factor
from nnsynth.planning.planner import iteration_cost

torch.set_num_threads(2)


def _net(unshuffle: int, **over):
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8], encoder_kernel_sizes=[3, 3], num_res_blocks=1,
               num_hyper_res_blocks=1, code_length=8, hyper_bank_size=4, skip_connections=True, joint_input=True,
               pointwise_width=4, global_context_heads=2, input_unshuffle=unshuffle)
    cfg.update(over)
    return cfg


def _conv_macs(net: Seq2SeqNet, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> float:
    """Multiply-adds of every convolution of one forward pass per sample, counted on the real modules."""
    total = [0.0]

    def count(module, args, out):
        total[0] += out[0].numel() * module.in_channels * float(torch.tensor(module.kernel_size).prod())

    skip = {id(net.decoder.context.score)} if net.decoder.context is not None else set()
    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, (nn.Conv2d, nn.Conv3d, HyperConv)) and id(m) not in skip]
    try:
        with torch.no_grad():
            net(x, target, source=source)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@pytest.mark.parametrize("dims,size", [(2, (21, 14)), (3, (9, 6, 10))])
def test_shapes_resolution_and_padding(dims, size):
    torch.manual_seed(0)
    k = 3 if dims == 2 else 1
    net = Seq2SeqNet(3, k, dims, _net(2)).eval()
    assert net.divisor == 4 == downsample_factor(net.network_config)
    seen = {}
    net.decoder.final.register_forward_hook(lambda m, a, o: seen.update(final_in=a[0].shape, final_out=o.shape))
    net.encoder.layers[0].register_forward_hook(lambda m, a, o: seen.update(stem_in=a[0].shape))
    x = torch.rand((2, k) + size)
    with torch.no_grad():
        y = net(x, torch.tensor([2, 1]), source=torch.tensor([0, 0]))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    padded = net.padded_size(size)
    half = tuple(s // 2 for s in padded)
    # joint input: 3 sequences x (k slices + availability), folded 2^d-fold before the stem
    assert tuple(seen["stem_in"]) == (2, 3 * (k + 1) * 2 ** dims) + half
    assert tuple(seen["final_in"]) == (2, 4) + half
    assert tuple(seen["final_out"]) == (2, k * 2 ** dims) + half
    # the encoding keeps the layout every fusion relies on: bottleneck at 1/4, pointwise map at full resolution
    feats = net.encode(x, torch.tensor([0, 0]))
    bottleneck, skips, pointwise = net.decoder.split(feats)
    assert tuple(bottleneck.shape[2:]) == tuple(s // 4 for s in padded)
    assert [tuple(s.shape[2:]) for s in skips] == [half]
    assert tuple(pointwise.shape[2:]) == padded
    assert torch.equal(net.decoder.pack(bottleneck, list(reversed(skips)), pointwise), feats)


def test_each_output_block_comes_from_its_own_position_of_the_last_feature_map():
    """depth_to_space after the final HyperConv: position (i, j) of its output writes voxels (2i..2i+1, 2j..2j+1)
    and nothing else."""
    torch.manual_seed(1)
    net = Seq2SeqNet(2, 1, 2, _net(2, pointwise_width=0, global_context_heads=0)).eval()
    x = torch.rand(1, 1, 16, 16)
    # the decoder's last feature map at block (i, j) writes output voxels (2i..2i+1, 2j..2j+1) only
    feats = net.encode(x, torch.tensor([0]))
    seen = {}
    handle = net.decoder.final.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    with torch.no_grad():
        base = net.decode(feats, torch.tensor([1]))
    handle.remove()
    bumped = seen["o"].clone()
    bumped[0, :, 3, 4] += 1.0
    net.decoder.final.register_forward_hook(lambda m, a, o: bumped)
    with torch.no_grad():
        out = net.decode(feats, torch.tensor([1]))
    changed = ((out - base).abs()[0, 0] > 0).nonzero().tolist()
    assert changed == [[6, 8], [6, 9], [7, 8], [7, 9]]


def test_off_is_the_same_network_and_values_are_checked():
    assert DEFAULT_SEQ2SEQ_NETWORK["input_unshuffle"] == 1
    torch.manual_seed(3)
    a = Seq2SeqNet(3, 3, 2, _net(1))
    cfg = _net(1)
    del cfg["input_unshuffle"]
    torch.manual_seed(3)
    b = Seq2SeqNet(3, 3, 2, cfg)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    for bad in (0, 3, True, 2.0, "2"):
        with pytest.raises(PlansError, match="input_unshuffle"):
            Seq2SeqNet(3, 3, 2, _net(bad))


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_cost_models_count_the_real_network(unshuffle):
    """The planner's multiply-add count is the network's own convolution count (the 2 attention scores of the
    global context aside), so plans with input_unshuffle get the batch their cost really allows."""
    torch.manual_seed(4)
    cfg = _net(unshuffle, encoder_channels=[4, 8, 16], encoder_kernel_sizes=[5, 3, 3])
    net = Seq2SeqNet(3, 3, 2, cfg).eval()
    patch = (32, 24)
    x = torch.rand((1, 3) + patch)
    counted = _conv_macs(net, x, torch.tensor([0]), torch.tensor([1]))
    modelled = iteration_cost(patch, cfg, 3, 3)[0]
    assert modelled == pytest.approx(counted, rel=1e-6)
    if unshuffle == 2:
        plain = dict(cfg, input_unshuffle=1)
        assert modelled < 0.7 * iteration_cost(patch, plain, 3, 3)[0]
        assert estimate_feature_map_voxels(patch, cfg, 3, 3) < 0.7 * estimate_feature_map_voxels(patch, plain, 3, 3)
