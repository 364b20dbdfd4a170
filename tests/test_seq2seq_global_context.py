"""The Seq2Seq decoder's global subject context (plans ``network.global_context_heads``): attention-pooled
pointwise features shift the target's code, so every HyperConv can adapt to what the whole patch says about the
subject's contrast. It starts as an exact no-op, pools as the equation says, and trains."""
from __future__ import annotations

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet
from nnsynth.networks.seq2seq import GlobalContext
from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet

torch.set_num_threads(2)


def _cfg(heads: int, **over):
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8, 16], num_res_blocks=1, num_hyper_res_blocks=1,
               code_length=8, hyper_bank_size=4, skip_connections=True, joint_input=True, pointwise_width=4,
               global_context_heads=heads)
    cfg.update(over)
    return cfg


def _run(net: Seq2SeqNet, x: torch.Tensor) -> torch.Tensor:
    return net(x, torch.tensor([2, 0, 1]), None, torch.tensor([0, 1, 2]))


def test_a_new_context_changes_nothing():
    """The projection starts at zero: same weights elsewhere, same outputs as a network without the context."""
    torch.manual_seed(0)
    on = Seq2SeqNet(3, 3, 2, _cfg(2))
    off = Seq2SeqNet(3, 3, 2, _cfg(0))
    assert not any("context" in k for k in off.state_dict())
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "context" not in k})
    x = torch.rand(3, 3, 24, 20)
    assert torch.equal(_run(on, x), _run(off, x))


def test_pooling_is_a_softmax_weighted_mean_per_head():
    torch.manual_seed(1)
    ctx = GlobalContext(2, channels=3, heads=2, code_length=5)
    feats = torch.randn(2, 3, 6, 7)
    feats[0, 0, 2, 3] += 10.0                 # one clear maximum of channel 0 per sample
    feats[1, 0, 5, 1] += 10.0
    with torch.no_grad():
        ctx.project.weight.copy_(torch.randn(5, 6))
        ctx.project.bias.copy_(torch.randn(5))
        ctx.score.weight.zero_()
        ctx.score.bias.zero_()
        ctx.score.weight[1, 0] = 20.0         # head 1 looks where channel 0 is largest
    pooled = torch.stack([feats.mean((2, 3)),
                          feats.flatten(2)[torch.arange(2), :, feats[:, 0].flatten(1).argmax(1)]], 1)
    expected = ctx.project(pooled.flatten(1))
    assert torch.allclose(ctx(feats), expected, atol=1e-4)


def test_the_context_learns_and_reaches_every_hyperconv():
    torch.manual_seed(2)
    net = Seq2SeqNet(3, 3, 2, _cfg(2))
    x = torch.rand(3, 3, 24, 20)
    (_run(net, x) - torch.rand(3, 3, 24, 20)).abs().mean().backward()
    assert float(net.decoder.context.project.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        net.decoder.context.project.weight.normal_()
    # a change of the subject's levels far from a voxel moves the code, and so every kernel
    feats = net.encode(x, source=torch.tensor([0, 1, 2]))
    _, _, pointwise = net.decoder.split(feats)
    shifted = net.decoder.context(pointwise * 1.5) - net.decoder.context(pointwise)
    assert float(shifted.detach().abs().max()) > 1e-3


def test_needs_the_pointwise_path_and_stays_out_of_vq():
    with pytest.raises(PlansError, match="global_context_heads"):
        Seq2SeqNet(3, 3, 2, _cfg(2, pointwise_width=0))
    with pytest.raises(PlansError, match="global_context_heads"):
        Seq2SeqNet(3, 3, 2, _cfg(-1))
    assert DEFAULT_SEQ2SEQ_NETWORK["global_context_heads"] == 0
    vq = VQSeq2SeqNet(3, 3, 2, _cfg(2, joint_input=False, skip_connections=False), {"codebook_size": 8})
    assert vq.decoder.context is None
