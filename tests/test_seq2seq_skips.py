"""Skip connections of the Seq2Seq backbone (plans ``network.skip_connections``): the folding that carries skip
maps inside one encoding tensor is exact and linear, the decoder really reads them, the paper network is
unchanged when they are off, VQ-Seq2Seq never uses them and TSF fuses them like the bottleneck."""
from __future__ import annotations

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, estimate_feature_map_voxels
from nnsynth.networks.blocks import depth_to_space, space_to_depth
from nnsynth.networks.seq2seq import fuse_mean
from nnsynth.networks.tsf import TSFNet
from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet

torch.set_num_threads(2)


def _net(skips=True, **over):
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8, 16], num_res_blocks=1, num_hyper_res_blocks=1,
               code_length=8, hyper_bank_size=4, skip_connections=skips)
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("dims", [2, 3])
def test_space_to_depth_round_trip_and_block_layout(dims):
    x = torch.randn(2, 3, *([8] * dims))
    y = space_to_depth(x, 4)
    assert y.shape == (2, 3 * 4 ** dims) + (2,) * dims
    assert torch.equal(depth_to_space(y, 4), x)
    # channel 0 of the folded map at position (0, .., 0) is the first voxel of the first 4^d block
    assert y[0, 0].flatten()[0] == x[0, 0].flatten()[0]
    # one block = the channels of one output position
    block = x[0, 0][(slice(4, 8),) * dims].flatten()
    assert torch.equal(y[0, :4 ** dims][(slice(None),) + (1,) * dims].sort().values, block.sort().values)
    with pytest.raises(ValueError):
        space_to_depth(torch.zeros(1, 1, 6, 8), 4)


@pytest.mark.parametrize("dims,k,size", [(2, 3, (20, 27)), (3, 1, (9, 12, 10))])
def test_encoding_layout_and_shapes(dims, k, size):
    torch.manual_seed(0)
    net = Seq2SeqNet(4, k, dims, _net())
    x = torch.rand(2, k, *size)
    feats = net.encode(x)
    # bottleneck 16 + level-1 map 8 channels folded 2^d + full-resolution map 4 channels folded 4^d
    assert net.bottleneck_channels == 16
    assert feats.shape[1] == net.latent_channels == 16 + 8 * 2 ** dims + 4 * 4 ** dims
    assert feats.shape[2:] == tuple(-(-s // 4) for s in size)
    with torch.no_grad():
        y = net(x, torch.tensor([0, 3]))
    assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    bottleneck, skips, _ = net.decoder.split(feats)
    assert bottleneck.shape[1] == 16 and [s.shape[1] for s in skips] == [8, 4]
    assert torch.equal(net.decoder.pack(bottleneck, list(reversed(skips))), feats)


def test_decoder_reads_the_skip_maps():
    torch.manual_seed(1)
    net = Seq2SeqNet(4, 3, 2, _net()).eval()
    x = torch.rand(1, 3, 16, 16)
    feats = net.encode(x)
    code = torch.tensor([2])
    base = net.decode(feats, code)
    bottleneck, skips, _ = net.decoder.split(feats)
    changed = net.decoder.pack(bottleneck, [torch.randn_like(skips[1]), skips[0]])   # full-resolution map only
    assert (net.decode(changed, code) - base).abs().max() > 1e-3


def test_off_is_the_paper_network():
    on, off = Seq2SeqNet(4, 3, 2, _net(True)), Seq2SeqNet(4, 3, 2, _net(False))
    assert not any("skip_blocks" in k for k in off.state_dict())
    assert set(off.state_dict()) < set(on.state_dict())
    assert off.latent_channels == off.bottleneck_channels == 16
    assert DEFAULT_SEQ2SEQ_NETWORK["skip_connections"] is False
    est_on = estimate_feature_map_voxels((32, 32), on.network_config, 3)
    assert est_on > estimate_feature_map_voxels((32, 32), off.network_config, 3)
    with pytest.raises(PlansError, match="skip_connections"):
        Seq2SeqNet(4, 3, 2, _net("yes"))


def test_fusing_encodings_fuses_every_skip_map_the_same_way():
    torch.manual_seed(2)
    net = Seq2SeqNet(4, 3, 2, _net())
    x = torch.rand(3, 3, 16, 16)
    feats = net.encode(x)
    fused = fuse_mean(feats, torch.tensor([0, 0, 1]), 2)
    b, skips, _ = net.decoder.split(fused)
    parts = [net.decoder.split(feats[i:i + 1]) for i in range(3)]
    assert torch.allclose(b[0], (parts[0][0][0] + parts[1][0][0]) / 2)
    for level in range(2):
        assert torch.allclose(skips[level][0], (parts[0][1][level][0] + parts[1][1][level][0]) / 2, atol=1e-6)
        assert torch.equal(skips[level][1], parts[2][1][level][0])


def test_vq_never_uses_skips_and_tsf_fuses_them_exactly():
    vq = VQSeq2SeqNet(4, 3, 2, _net(), {"latent_dim": 3, "codebook_size": 16})
    assert not vq.skip_connections and vq.latent_channels == 16
    torch.manual_seed(3)
    tsf = TSFNet(Seq2SeqNet(4, 3, 2, _net()))
    assert tsf.bottleneck_channels == 16
    images = torch.rand(2, 4, 3, 16, 16)
    src = torch.zeros(2, 4)
    src[:, 1] = 1
    omega = tsf.omega(src, torch.tensor([0, 3]))
    assert torch.equal(tsf.fuse(images, src, omega), tsf.backbone.encode(images[:, 1]))
    x_prime, x_prime_a, _ = tsf(images, torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1.]]), torch.tensor([3, 0]))
    assert x_prime.shape == x_prime_a.shape == (2, 3, 16, 16)


def test_skips_learn_detail_faster_than_the_bottleneck_alone():
    """Same budget, same data: reproducing a fine random texture is what the skips are for."""
    torch.manual_seed(4)
    x = torch.rand(4, 3, 24, 24)
    losses = {}
    for skips in (False, True):
        torch.manual_seed(5)
        net = Seq2SeqNet(2, 3, 2, _net(skips))
        opt = torch.optim.Adam(net.parameters(), 5e-3)
        for _ in range(120):
            loss = (net(x, torch.zeros(4, dtype=torch.long)) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[skips] = float(loss.detach())   # about 0.09 with skips, 0.15 without
    assert losses[True] < 0.7 * losses[False], losses


def test_source_conditioned_encoder():
    """network.source_conditioning: the encoder's first conv is a HyperConv on the source's code, so the same image
    read as T1 or as T2 encodes differently; without the source the call is an error, not a silent guess."""
    torch.manual_seed(6)
    net = Seq2SeqNet(4, 3, 2, _net(source_conditioning=True))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        a, b = net.encode(x, torch.tensor([0, 0])), net.encode(x, torch.tensor([2, 2]))
        assert (a - b).abs().max() > 1e-3
        assert torch.equal(net.encode(x, 0), a)                           # one int for the whole batch
        both = net.encode(x, torch.tensor([0, 2]))
        assert torch.allclose(both[0], a[0], atol=1e-5) and torch.allclose(both[1], b[1], atol=1e-5)
        y = net(torch.rand(3, 3, 16, 16), torch.tensor([3, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))
        assert y.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="source"):
        net.encode(x)
    with pytest.raises(ValueError, match="entries"):
        net.encode(x, torch.tensor([0, 1, 2]))
    plain = Seq2SeqNet(4, 3, 2, _net())
    with torch.no_grad():
        assert torch.equal(plain.encode(x), plain.encode(x, torch.tensor([1, 3])))   # ignored when off
    vq = VQSeq2SeqNet(4, 3, 2, _net(source_conditioning=True), {"latent_dim": 3, "codebook_size": 16})
    assert not vq.source_conditioning
