"""Joint input of the Seq2Seq backbone (plans ``network.joint_input``): the encoder reads every given sequence in its
own channel group, so a single source is the joint stack with one group filled (what TSF and one-to-one synthesis
use), absent sequences cannot leak in, several sources are encoded in one pass, and (unlike the mean of separate
encodings) the encoding knows which source showed what."""
from __future__ import annotations

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, estimate_feature_map_voxels
from nnsynth.networks.tsf import TSFNet
from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
from nnsynth.planning.planner import iteration_cost

torch.set_num_threads(2)


def _net(joint=True, **over):
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK, encoder_channels=[4, 8, 16], num_res_blocks=1, num_hyper_res_blocks=1,
               code_length=8, hyper_bank_size=4, skip_connections=True, joint_input=joint)
    cfg.update(over)
    return cfg


def test_single_source_is_the_stack_with_one_group_and_absent_slots_are_ignored():
    torch.manual_seed(0)
    net = Seq2SeqNet(4, 3, 2, _net()).eval()
    assert net.encoder_in_channels == 4 * (3 + 1)
    x = torch.rand(2, 3, 20, 27)                                           # 27: padded to 28 inside
    with torch.no_grad():
        single = net.encode(x, torch.tensor([1, 2]))
        images = torch.rand(2, 4, 3, 20, 27)                               # garbage in every other slot
        images[:, 0] = float("nan")
        images[0, 1], images[1, 2] = x[0], x[1]
        available = torch.zeros(2, 4)
        available[0, 1] = available[1, 2] = 1
        joint = net.encode_joint(images, available)
        assert torch.equal(single, joint)
        assert torch.equal(net.encode(x, 1)[0], single[0])                 # one int for the whole batch
        assert single.shape == (2, net.latent_channels, 5, 7)
        # the same image read as another sequence is another encoding (the encoder knows what it reads)
        assert (net.encode(x, 0) - net.encode(x, 3)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="joint_input"):
        net.encode(x)
    with pytest.raises(ValueError, match="indices"):
        net.encode(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="at least one"):
        net.encode_joint(images, torch.zeros(2, 4))


def test_grouped_forward_and_encode_sources_are_the_joint_encoding():
    torch.manual_seed(1)
    net = Seq2SeqNet(4, 3, 2, _net()).eval()
    a, b, c = (torch.rand(2, 3, 16, 16) for _ in range(3))
    target = torch.tensor([3, 0])
    with torch.no_grad():
        # row 0 from sequences 0 and 2, row 1 from sequence 1 alone
        y = net(torch.stack([a[0], c[0], b[1]]), target, torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]))
        images = torch.zeros(2, 4, 3, 16, 16)
        images[0, 0], images[0, 2], images[1, 1] = a[0], c[0], b[1]
        available = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0.]])
        ref = net.decode(net.encode_joint(images, available), target, output_size=(16, 16))
        assert torch.allclose(y, ref, atol=1e-6)
        assert torch.allclose(net.decode(net.encode(b[1:], 1), target[1:]), ref[1:], atol=1e-6)
        both = net.encode_sources({0: a, 2: c})
        images = torch.zeros(2, 4, 3, 16, 16)
        images[:, 0], images[:, 2] = a, c
        assert torch.equal(both, net.encode_joint(images, torch.tensor([[1, 0, 1, 0.]] * 2)))
    with pytest.raises(ValueError, match="source"):
        net(a, target, torch.tensor([0, 1]))


def test_mean_fusion_is_blind_to_which_source_showed_what_joint_is_not():
    """With a shared encoder and the mean of encodings, swapping which image is 'T1' and which 'T2' changes
    nothing; the joint encoder tells them apart. That is the information a voxelwise lookup over several sources
    uses and the mean throws away."""
    torch.manual_seed(2)
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    mean_net = Seq2SeqNet(4, 3, 2, _net(joint=False)).eval()
    joint_net = Seq2SeqNet(4, 3, 2, _net()).eval()
    with torch.no_grad():
        for net, blind in ((mean_net, True), (joint_net, False)):
            one = net.encode_sources({0: a, 2: b})
            swapped = net.encode_sources({0: b, 2: a})
            assert torch.allclose(one, swapped, atol=1e-6) is blind


def test_joint_input_learns_what_the_mean_of_encodings_cannot():
    """Target = where source 0 is brighter than source 1 (an asymmetric function of two sources), fresh random
    images every step, scored on unseen ones: the mean of shared-encoder encodings is symmetric in its sources, so
    its L1 cannot go below 0.5; the joint encoder learns the comparison."""
    def batch(n=8):
        a, b = torch.rand(n, 1, 16, 16), torch.rand(n, 1, 16, 16)
        return torch.cat([a, b]), (a > b).float()

    groups, sources, target = torch.arange(8).repeat(2), torch.tensor([0] * 8 + [1] * 8), torch.full((8,), 2)
    torch.manual_seed(3)
    test_x, test_y = batch()
    losses = {}
    for joint in (False, True):
        torch.manual_seed(4)
        net = Seq2SeqNet(3, 1, 2, _net(joint, encoder_channels=[8, 16, 16]))
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(60):          # about 0.51 (mean) vs 0.14 (joint) at the end
            x, y = batch()
            loss = (net(x, target, groups, sources) - y).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[joint] = float((net.eval()(test_x, target, groups, sources) - test_y).abs().mean())
    assert losses[False] > 0.45 and losses[True] < 0.6 * losses[False], losses


def test_vq_and_tsf_with_a_joint_backbone():
    vq = VQSeq2SeqNet(4, 3, 2, _net(), {"latent_dim": 3, "codebook_size": 16})
    assert not vq.joint_input and vq.encoder_in_channels == 3
    torch.manual_seed(5)
    tsf = TSFNet(Seq2SeqNet(4, 3, 2, _net())).eval()
    images = torch.rand(2, 4, 3, 16, 16)
    src = torch.zeros(2, 4)
    src[:, 2] = 1
    omega = tsf.omega(src, torch.tensor([0, 3]))
    with torch.no_grad():   # TSF with one source: exactly that source's (single-group) encoding
        assert torch.equal(tsf.fuse(images, src, omega), tsf.backbone.encode(images[:, 2], 2))


def test_plans_validation_and_cost_models():
    with pytest.raises(PlansError, match="exclude each other"):
        Seq2SeqNet(4, 3, 2, _net(source_conditioning=True))
    with pytest.raises(PlansError, match="true or false"):
        Seq2SeqNet(4, 3, 2, _net(joint="yes"))
    off, on = _net(joint=False), _net()
    assert estimate_feature_map_voxels((32, 32), on, 3, 4) > estimate_feature_map_voxels((32, 32), off, 3, 4)
    assert iteration_cost((32, 32), on, 3, 4)[0] > iteration_cost((32, 32), off, 3, 4)[0]
    assert iteration_cost((32, 32), off, 3, 4) == iteration_cost((32, 32), off, 3)


def test_latent_segmentation_reads_the_joint_encoding():
    from nnsynth.networks.segmentation import LatentEncoder
    torch.manual_seed(6)
    backbone = Seq2SeqNet(4, 3, 2, _net())
    enc = LatentEncoder(backbone, "seq2seq")
    images, available = torch.rand(2, 4, 3, 16, 16), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1.]])
    with torch.no_grad():
        assert torch.equal(enc(images, available), backbone.encode_joint(images, available))
        assert torch.allclose(enc(images, available)[1:], backbone.encode(images[1:, 3], 3), atol=1e-5)
    plain = Seq2SeqNet(4, 3, 2, _net(joint=False))
    with torch.no_grad():   # separate encodings: their mean, as before
        ref = (plain.encode(images[0, 0:1]) + plain.encode(images[0, 1:2])) / 2
        assert torch.allclose(LatentEncoder(plain, "seq2seq")(images, available)[:1], ref, atol=1e-6)
