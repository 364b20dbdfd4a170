"""The pointwise intensity path of the Seq2Seq backbone (plans ``network.pointwise_width``): instance
normalisation makes the network blind to a voxel's absolute intensity in the normalised space, the path gives it
back, it travels inside the encoding like a skip map, and the paper's network (and VQ-Seq2Seq) stay without it."""
from __future__ import annotations

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, estimate_feature_map_voxels
from nnsynth.networks.seq2seq import fuse_mean
from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
from nnsynth.planning.planner import iteration_cost

torch.set_num_threads(2)


def _net(width: int, **over):
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8, 16], num_res_blocks=1, num_hyper_res_blocks=1,
               code_length=8, hyper_bank_size=4, skip_connections=True, joint_input=True, pointwise_width=width)
    cfg.update(over)
    return cfg


def _synthesise(net: Seq2SeqNet, images: torch.Tensor) -> torch.Tensor:
    """Target 3 from sequences 0 and 1 of every row, jointly encoded."""
    b = images.shape[0]
    x = images[:, :2].flatten(0, 1)
    rows = torch.arange(b).repeat_interleave(2)
    with torch.no_grad():
        return net(x, torch.full((b,), 3), groups=rows, source=torch.tensor([0, 1]).repeat(b))


def test_only_the_pointwise_path_sees_absolute_intensity():
    """An affine change of the input intensities (the same for every source) passes each convolution as an
    affine change that the instance normalisation after it removes: without the path the output hardly depends
    on where the tissue sits on the normalised scale (what is left comes from the norm's epsilon); with it, it
    does, already at initialisation."""
    change = {}
    for width in (0, 16):
        torch.manual_seed(0)
        net = Seq2SeqNet(4, 3, 2, _net(width)).eval()
        images = 0.2 + 0.5 * torch.rand(2, 4, 3, 24, 24)
        change[width] = float((_synthesise(net, images) - _synthesise(net, 0.1 + 0.7 * images)).abs().max())
    assert change[0] < 1e-3
    assert change[16] > 10 * change[0]


def test_encoding_layout_round_trip_and_fusion():
    torch.manual_seed(1)
    net = Seq2SeqNet(4, 3, 2, _net(4))
    # bottleneck 16 + folded skips (8 x 4 + 4 x 16) + pointwise 4 channels folded 4 x 4
    assert net.latent_channels == 16 + 8 * 4 + 4 * 16 + 4 * 16
    feats = net.encode(torch.rand(3, 3, 16, 20), source=torch.tensor([0, 1, 2]))
    assert feats.shape == (3, net.latent_channels, 4, 5)
    bottleneck, skips, pointwise = net.decoder.split(feats)
    assert pointwise.shape == (3, 4, 16, 20) and [s.shape[1] for s in skips] == [8, 4]
    assert torch.equal(net.decoder.pack(bottleneck, list(reversed(skips)), pointwise), feats)
    with pytest.raises(ValueError, match="pointwise"):
        net.decoder.pack(bottleneck, list(reversed(skips)))
    # fusing encodings averages the pointwise maps like every other part
    fused = net.decoder.split(fuse_mean(feats, torch.tensor([0, 0, 1]), 2))[2]
    assert torch.allclose(fused[0], (pointwise[0] + pointwise[1]) / 2, atol=1e-6)
    assert torch.equal(fused[1], pointwise[2])


def test_decoder_reads_the_pointwise_features():
    torch.manual_seed(2)
    net = Seq2SeqNet(4, 3, 2, _net(4)).eval()
    feats = net.encode(torch.rand(1, 3, 16, 16), source=torch.tensor([0]))
    bottleneck, skips, pointwise = net.decoder.split(feats)
    code = torch.tensor([2])
    changed = net.decoder.pack(bottleneck, list(reversed(skips)), torch.randn_like(pointwise))
    assert (net.decode(changed, code) - net.decode(feats, code)).abs().max() > 1e-3


def test_off_by_default_in_the_paper_network_and_never_in_vq():
    assert DEFAULT_SEQ2SEQ_NETWORK["pointwise_width"] == 0
    off = Seq2SeqNet(4, 3, 2, _net(0))
    assert not any("pointwise" in k for k in off.state_dict())
    on = Seq2SeqNet(4, 3, 2, _net(4))
    assert estimate_feature_map_voxels((32, 32), on.network_config, 3, 4) > \
        estimate_feature_map_voxels((32, 32), off.network_config, 3, 4)
    assert iteration_cost((32, 32), _net(4), 3, 4)[0] > iteration_cost((32, 32), _net(0), 3, 4)[0]
    vq = VQSeq2SeqNet(4, 3, 2, _net(4, joint_input=False, skip_connections=False), {"codebook_size": 8})
    assert vq.decoder.pointwise is None and vq.encoder.pointwise is None
    with pytest.raises(PlansError, match="pointwise_width"):
        Seq2SeqNet(4, 3, 2, _net(-1))
