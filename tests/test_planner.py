"""Planner on synthetic fingerprints: plans change with sequences, anisotropy, dataset size and device
the way documentation/plans.md says; overrides; custom planners."""
from __future__ import annotations

import numpy as np
import pytest

from nnsynth.exceptions import PlansError
from nnsynth.planning.planner import (CPU_REFERENCE, GLOBAL_CONTEXT_HEADS, POINTWISE_WIDTH, VQ_MIN_LATENT_CELLS,
                                      DefaultPlanner, get_planner_class, iteration_cost, register_planner)
from nnsynth.planning.plans import apply_overrides, get_configuration, get_trainer_settings

NAMES = ["T1", "T1Gd", "T2", "Flair", "PD", "DWI"]


def make_fp(n_seq=4, spacing=(1.0, 1.0, 1.0), shape=(140, 170, 140), n_cases=24, jitter=True):
    """A fingerprint dict like extract_fingerprint's (only what the planner reads)."""
    rng = np.random.default_rng(0)
    sp = [[float(s) for s in spacing] for _ in range(n_cases)]
    sh = [[int(s + (rng.integers(-4, 5) if jitter else 0)) for s in shape] for _ in range(n_cases)]
    return {"sequences": NAMES[:n_seq], "channel_ids": list(range(n_seq)), "num_cases": n_cases,
            "is_2d": False, "spacings": sp, "shapes_after_crop": sh}


def plan(fp=None, device="cpu", memory_gb=8.0, **kw):
    return DefaultPlanner(fp or make_fp(**kw), "Dataset999_T", device=device, memory_gb=memory_gb).plan()


def cpu_budget(network):
    """Multiply-adds of one CPU_REFERENCE iteration with the plan's other network settings (the CPU budget)."""
    ref = dict(network, **{k: CPU_REFERENCE[k] for k in ("encoder_channels", "num_res_blocks", "num_hyper_res_blocks")})
    return iteration_cost(CPU_REFERENCE["patch_size"], ref, 3)[0] * CPU_REFERENCE["batch_size"]


@pytest.mark.parametrize("n,latent,fsq_d", [(2, 3, 12), (3, 3, 9), (4, 3, 7), (6, 4, 5)])
def test_sequence_count_rules(n, latent, fsq_d):
    p = plan(n_seq=n)
    assert p["sequences"] == NAMES[:n]
    for conf in p["configurations"].values():
        assert conf["network"]["code_length"] >= n and conf["network"]["code_length"] == 64
        assert conf["vq"]["latent_dim"] == latent
        assert conf["fsq"]["levels"] == [5] * fsq_d and conf["fsq"]["code_dim"] == fsq_d


def test_code_length_grows_past_64():
    fp = make_fp(n_seq=4)
    fp["sequences"] = [f"S{i}" for i in range(70)]
    fp["channel_ids"] = list(range(70))
    assert plan(fp)["configurations"]["2d"]["network"]["code_length"] == 128


def test_paper_anchor_values_on_gpu_scale():
    p = plan(device="cuda", memory_gb=24.0)  # BraTS-like: 4 sequences, 1 mm, ~140x170x140 after crop
    c = p["configurations"]["2d"]
    assert c["vq"]["latent_dim"] == 3 and c["vq"]["codebook_size"] == 256
    assert c["vq"]["codebook_size_segmentation"] == 16
    assert c["fsq"]["levels"] == [5] * 7
    assert c["network"]["encoder_channels"] == [64, 128, 256]
    assert c["num_adjacent_slices"] == 3 and c["training"]["amp"] is True
    assert c["loss"]["seq2seq"] == {"lambda_l1": 10.0, "lambda_perceptual": 0.01, "lambda_ssim": 0.0,
                                    "lambda_adv": 0.0, "lambda_cycle": 0.0,
                                    "intensity_balance": 0.5,   # 0.5: not in the paper
                                    "lambda_seg": 1.0}          # the label head: not in the paper
    assert c["vq"]["beta"] == 0.25 and c["loss"]["vq_seq2seq"]["tau"] == 0.07


@pytest.mark.parametrize("spacing,levels", [(1.0, 2), (2.0, 2), (4.0, 1), (8.0, 0)])
def test_vq_latent_grid_keeps_enough_cells_across_the_image(spacing, levels):
    """The paper's 1 mm BraTS slices get its 4x coarser latent grid; coarser images give up stride-2 levels so
    that at least VQ_MIN_LATENT_CELLS cells stay across the smallest axis; the codebook follows the grid."""
    shape = tuple(int(s / spacing) for s in (140, 170, 140))
    c = plan(spacing=(spacing,) * 3, shape=shape, jitter=False)["configurations"]
    assert c["2d"]["vq"]["downsampling_levels"] == levels
    median = c["2d"]["median_shape"]
    assert c["2d"]["vq"]["latent_vectors_per_case"] == int(np.prod(median) / 4 ** levels)
    assert min(median[1:]) / 2 ** levels >= VQ_MIN_LATENT_CELLS
    assert levels == 2 or min(median[1:]) / 2 ** (levels + 1) < VQ_MIN_LATENT_CELLS   # the coarsest such grid
    assert DefaultPlanner.vq_downsampling_levels([300, 300], 2) == 2      # never more than the network has
    assert DefaultPlanner.vq_downsampling_levels([10, 40], 2) == 0


def test_codebook_shrinks_for_small_datasets():
    small = plan(n_cases=2, shape=(8, 16, 16))["configurations"]["2d"]["vq"]
    large = plan(n_cases=200)["configurations"]["2d"]["vq"]
    assert small["codebook_size"] == 16 < large["codebook_size"] == 256
    assert small["codebook_size"] & (small["codebook_size"] - 1) == 0  # power of two


def test_synthesis_defaults_beyond_the_paper():
    """New plans: skip connections and joint input in the network (VQ-Seq2Seq ignores both), intensity-balanced
    L1 for seq2seq and tsf_seq2seq (training.md); each can be switched back to the paper with --overwrite."""
    for c in plan()["configurations"].values():
        assert c["network"]["skip_connections"] is True and c["network"]["joint_input"] is True
        assert c["network"]["source_conditioning"] is False
        assert c["loss"]["seq2seq"]["intensity_balance"] == c["loss"]["tsf_seq2seq"]["intensity_balance"] == 0.5
        assert c["training"]["per_trainer"]["seq2seq"]["lr"] == 2e-3          # CPU plans; GPU: the paper's 2e-4
        assert c["training"]["per_trainer"]["seq2seq"]["betas"] == [0.9, 0.99]  # CPU plans: short runs
        assert c["training"]["per_trainer"]["seq2seq"]["all_sources_fraction"] == 0.5   # the prediction task
        assert c["training"]["per_trainer"]["seq2seq"]["balance_targets"] is True    # targets weighted by 1 / availability
        # each synthesis input's brightness varies by up to +-25 % in 30 % of the samples (benchmarks.md)
        assert (c["augmentation"]["p_brightness"], c["augmentation"]["brightness"]) == (0.3, [0.75, 1.25])
    gpu_seq2seq = plan(device="cuda")["configurations"]["2d"]["training"]["per_trainer"]["seq2seq"]
    assert gpu_seq2seq["lr"] == 2e-4 and gpu_seq2seq["betas"] == [0.9, 0.999]


def test_isotropic_identity_transpose():
    p = plan(spacing=(1.0, 1.0, 1.0))
    assert p["transpose_forward"] == [0, 1, 2]
    assert p["configurations"]["3d"]["resampling"]["separate_through_plane"] is False


def test_anisotropic_axis_goes_first_and_is_resampled_with_order_0():
    # 1 x 1 x 5 mm with the coarse axis last in array order (e.g. sagittal acquisitions)
    p = plan(spacing=(1.0, 1.0, 5.0), shape=(200, 220, 36))
    assert p["transpose_forward"] == [2, 0, 1] and p["transpose_backward"] == [1, 2, 0]
    c3, c2 = p["configurations"]["3d"], p["configurations"]["2d"]
    assert c3["spacing"] == pytest.approx([5.0, 1.0, 1.0])
    assert c3["resampling"]["separate_through_plane"] is True
    assert c3["resampling"]["order_data_through_plane_if_anisotropic"] == 0
    assert c3["median_shape"][0] == pytest.approx(36, abs=4)
    # 2.5D slices are taken along the coarse axis: in-plane patch covers the fine axes
    assert len(c2["patch_size"]) == 2 and c2["augmentation"]["mirror_axes"] == []
    iso = plan(spacing=(1.0, 1.0, 1.0))
    assert iso["configurations"]["2d"]["augmentation"]["mirror_axes"] == [1]


def test_anisotropic_target_spacing_uses_10th_percentile():
    fp = make_fp(spacing=(5.0, 1.0, 1.0), shape=(30, 200, 200))
    fp["spacings"] = [[z, 1.0, 1.0] for z in np.linspace(3.5, 6.0, 24)]
    p = plan(fp)
    assert p["configurations"]["3d"]["spacing"][0] == pytest.approx(np.percentile(np.linspace(3.5, 6.0, 24), 10))
    assert p["configurations"]["3d"]["spacing"][1:] == [1.0, 1.0]


def test_cpu_plan_is_smaller_than_gpu_plan_and_within_time_budget():
    cpu, gpu = plan(device="cpu"), plan(device="cuda", memory_gb=24.0)
    for name in ("2d", "3d"):
        c, g = cpu["configurations"][name], gpu["configurations"][name]
        assert c["batch_size"] * np.prod(c["patch_size"]) < g["batch_size"] * np.prod(g["patch_size"])
        assert sum(c["network"]["encoder_channels"]) < sum(g["network"]["encoder_channels"])
        # the paper's 6 + 6 bottleneck blocks on a GPU; CPU runs are iteration-bound and keep 2 + 2
        assert (g["network"]["num_res_blocks"], g["network"]["num_hyper_res_blocks"]) == (6, 6)
        assert (c["network"]["num_res_blocks"], c["network"]["num_hyper_res_blocks"]) == (2, 2)
        # the voxelwise intensity path of the Seq2Seq backbone, on both (networks/seq2seq.py)
        assert c["network"]["pointwise_width"] == g["network"]["pointwise_width"] == POINTWISE_WIDTH > 0
        # and the decoder's global subject context on top of it
        heads = (c["network"]["global_context_heads"], g["network"]["global_context_heads"])
        assert heads == (GLOBAL_CONTEXT_HEADS,) * 2 and GLOBAL_CONTEXT_HEADS > 0
        assert c["training"]["amp"] is False
        # CPU runs are time-budgeted: a 20-minute --max-minutes run must not hit the epoch ceiling on a fast
        # 2-core machine (~90 epochs of 100 iterations); warm-up is one CPU epoch, the GPU keeps nnU-Net's scale
        assert (c["training"]["num_epochs"], c["training"]["iters_per_epoch"]) == (250, 100)
        assert (g["training"]["num_epochs"], g["training"]["iters_per_epoch"]) == (1000, 250)
        assert (c["training"]["warmup_iters"], g["training"]["warmup_iters"]) == (100, 1000)
    c = cpu["configurations"]["2d"]
    assert iteration_cost(c["patch_size"], c["network"], c["num_adjacent_slices"])[0] * c["batch_size"] \
        <= cpu_budget(c["network"])
    assert cpu["compute"] == {"device": "cpu", "memory_gb": 8.0}


def test_cpu_batch_stops_at_four_where_the_compute_budget_would_buy_more():
    """A CPU step costs the same per sample at any batch, so small images get more updates, not a bigger batch
    (benchmarks.md, twentieth session); a GPU plan of the same data still fills its memory."""
    demo_like = dict(spacing=(2.0, 2.0, 2.0), shape=(80, 95, 75))   # the demo at 2 mm: the budget buys batch 7
    cpu = plan(**demo_like)["configurations"]["2d"]
    assert cpu["patch_size"] == [96, 80] and cpu["batch_size"] == 4
    assert iteration_cost(cpu["patch_size"], cpu["network"], cpu["num_adjacent_slices"])[0] * 5 \
        <= cpu_budget(cpu["network"])
    assert plan(device="cuda", memory_gb=24.0, **demo_like)["configurations"]["2d"]["batch_size"] > 4


def test_memory_budget_limits_gpu_batch():
    small = plan(device="cuda", memory_gb=2.0)["configurations"]["3d"]
    big = plan(device="cuda", memory_gb=40.0)["configurations"]["3d"]
    assert small["batch_size"] * np.prod(small["patch_size"]) < big["batch_size"] * np.prod(big["patch_size"])
    for c in (small, big):
        assert all(p % 8 == 0 for p in c["patch_size"]) and c["batch_size"] >= 2


def test_2d_dataset_has_no_3d_configuration():
    fp = make_fp(spacing=(999.0, 0.5, 0.5), shape=(1, 200, 180))
    fp["is_2d"] = True
    p = plan(fp)
    assert list(p["configurations"]) == ["2d"]
    assert p["transpose_forward"] == [0, 1, 2]
    assert p["configurations"]["2d"]["num_adjacent_slices"] == 1


def test_trainer_settings_merge():
    c = plan()["configurations"]["2d"]
    vq = get_trainer_settings(c, "vq_seq2seq")
    assert vq["optimizer"] == "adamw" and vq["lr"] == 1e-4 and vq["betas"] == [0.9, 0.95]
    assert vq["loss"]["lambda_con"] == 10.0 and "num_epochs" in vq
    cb = get_trainer_settings(c, "codebrain")
    assert cb["schedule"] == "cosine" and cb["min_lr"] == 5e-5
    assert get_trainer_settings(c, "seq2seq")["multi_source"] is True       # fused multi-source training
    assert "multi_source" not in get_trainer_settings(c, "vq_seq2seq")


def test_overrides():
    p = plan()
    q = apply_overrides(p, ["latent_dim=4", "2d.batch_size=8", "3d.patch_size=[32,32,32]",
                            "training.schedule=cosine", "compute.device=cuda"])
    assert q["configurations"]["2d"]["vq"]["latent_dim"] == 4 and q["configurations"]["3d"]["vq"]["latent_dim"] == 4
    assert q["configurations"]["2d"]["batch_size"] == 8
    assert q["configurations"]["3d"]["batch_size"] == p["configurations"]["3d"]["batch_size"]
    assert q["configurations"]["3d"]["patch_size"] == [32, 32, 32]
    assert q["configurations"]["2d"]["training"]["schedule"] == "cosine"
    assert q["compute"]["device"] == "cuda"
    assert p["configurations"]["2d"]["vq"]["latent_dim"] == 3  # original untouched
    with pytest.raises(PlansError, match="latent_dim"):
        apply_overrides(p, ["latent_dimm=4"])
    with pytest.raises(PlansError, match="ambiguous"):
        apply_overrides(p, ["lr=1"])
    with pytest.raises(PlansError, match="key=value"):
        apply_overrides(p, ["latent_dim"])
    with pytest.raises(PlansError, match="section"):
        apply_overrides(p, ["2d.vq=3"])
    with pytest.raises(PlansError, match="available: 2d, 3d"):
        get_configuration(p, "3d_fullres")


class HalfBatchPlanner(DefaultPlanner):
    """A custom planner as a user would write one: override one rule."""

    def patch_and_batch(self, *a, **kw):
        patch, batch = super().patch_and_batch(*a, **kw)
        return patch, 1


def test_custom_planner_by_dotted_path_and_registered_name():
    cls = get_planner_class(f"{__name__}.HalfBatchPlanner")
    assert cls is HalfBatchPlanner
    p = cls(make_fp(), "Dataset999_T", device="cpu", memory_gb=8).plan()
    assert p["planner"].endswith("HalfBatchPlanner") and p["configurations"]["2d"]["batch_size"] == 1
    register_planner("half")(HalfBatchPlanner)
    assert get_planner_class("half") is HalfBatchPlanner
    assert get_planner_class("default") is DefaultPlanner
    with pytest.raises(PlansError, match="Did you mean: default"):
        get_planner_class("defualt")
    with pytest.raises(PlansError, match="cannot import"):
        get_planner_class("no_such_module_xyz.Planner")


class DeeperPlanner(DefaultPlanner):
    """A user's planner with one more stride-2 level than the paper's network."""

    def network(self, spatial_dims):
        net = super().network(spatial_dims)
        net["encoder_channels"] = net["encoder_channels"] + [net["encoder_channels"][-1]]
        net["encoder_kernel_sizes"] = net["encoder_kernel_sizes"] + [3]
        return net


def test_cost_model_counts_any_number_of_levels():
    # hand count, 16 x 16 patch, 3x3 kernels, channels 2/4/8/8, no residual blocks, skips or pointwise path:
    # encoder 4608 + 4608 + 4608 + 2304, decoder 9216 + 18432 + 18432, output convolution 4608
    net = {"encoder_channels": [2, 4, 8, 8], "encoder_kernel_sizes": [3, 3, 3, 3], "num_res_blocks": 0,
           "num_hyper_res_blocks": 0}
    assert iteration_cost((16, 16), net, 1)[0] == 66816
    p = DeeperPlanner(make_fp(), "Dataset999_T", device="cpu", memory_gb=8).plan()
    c = p["configurations"]["2d"]
    assert len(c["network"]["encoder_channels"]) == 4 and all(s % 8 == 0 for s in c["patch_size"])
