"""One-shot segmentation from the latent space (issue 8): metrics, networks, loss, and the CLI chain
train vq_seq2seq -> train seg_from_latent (1 labelled case) -> predict --segment -> evaluate --seg."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsynth.evaluation.segmentation import assd, dice, region_scores, tumour_regions

TINY_NETWORK = ["encoder_channels=[4,8,8]", "num_res_blocks=1", "num_hyper_res_blocks=1", "val_iters=1",
                "hyper_mlp_hidden=8"]
TINY_SEG = {"base_features": 4, "max_features": 16, "max_stages": 3}
BRATS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


# ============================================================================================================
# metrics pinned on hand-made masks
# ============================================================================================================
def test_dice_hand_made():
    ref = np.zeros((1, 1, 10), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, 2:8] = True            # 6 voxels
    pred[0, 0, 5:9] = True           # 4 voxels, 3 shared
    assert dice(pred, ref) == pytest.approx(2 * 3 / 10)
    assert dice(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    assert dice(pred, np.zeros_like(ref)) == 0.0


def test_assd_hand_made_in_mm():
    # single voxels 3 voxels apart along x with 2 mm voxels along x: 6 mm both ways
    a = np.zeros((3, 3, 12), bool)
    b = np.zeros_like(a)
    a[1, 1, 5], b[1, 1, 8] = True, True
    assert assd(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    # a line and the same line one slice below, slices 2.5 mm apart: every surface voxel is 2.5 mm away
    ref = np.zeros((2, 1, 7), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, 2:5] = True
    pred[1, 0, 2:5] = True
    assert assd(pred, ref, (2.5, 1.0, 1.0)) == pytest.approx(2.5)
    # one extra voxel at 1 mm: (1 + 0 * 3 + 0 * 3) / (4 + 3) surface voxels
    pred2 = np.zeros_like(ref)
    pred2[0, 0, 2:6] = True
    assert assd(pred2, ref, (2.5, 1.0, 1.0)) == pytest.approx(1.0 / 7.0)
    assert dice(pred2, ref) == pytest.approx(6.0 / 7.0)
    # identical, both empty, one empty
    assert assd(ref, ref, (1, 1, 1)) == 0.0
    assert assd(np.zeros_like(ref), np.zeros_like(ref)) == 0.0
    assert math.isnan(assd(ref, np.zeros_like(ref)))


def test_assd_uses_the_surface_only():
    # a filled 5x5 square against the same square shifted by one pixel (1 mm): the interior does not count
    ref = np.zeros((9, 9), bool)
    ref[2:7, 2:7] = True
    pred = np.roll(ref, 1, axis=1)
    # pred surface (16 px): the 3 + 3 px of its left and right edges are 1 px from the ref surface, and so is
    # the one corner pixel past the ref on the top and on the bottom row; the rest lies on the ref surface:
    # 8 px at 1 px each way -> (8 + 8) / (16 + 16)
    assert assd(pred, ref, (1.0, 1.0)) == pytest.approx(16.0 / 32.0)
    assert assd(pred, ref, (2.0, 2.0)) == pytest.approx(2 * 16.0 / 32.0)


def test_regions_and_region_scores():
    regions = tumour_regions(BRATS)
    assert regions == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    assert tumour_regions({"background": 0, "liver": 1, "lesion": 2}) == {"liver": [1], "lesion": [2], "WT": [1, 2]}
    ref = np.array([[0, 1, 2, 3, 3, 0]])
    pred = np.array([[0, 3, 2, 2, 3, 0]])
    s = region_scores(pred, ref, regions, (1.0, 1.0))
    assert s["dice_WT"] == pytest.approx(1.0)
    assert s["dice_TC"] == pytest.approx(2 * 2 / 5)      # ref TC {1,3,4}, pred TC {1,4}
    assert s["dice_ET"] == pytest.approx(2 * 1 / 4)      # ref {3,4}, pred {1,4}
    from nnsynth.exceptions import NnsynthError
    with pytest.raises(NnsynthError, match="region lists"):
        tumour_regions({"background": 0, "whole": [1, 2]})
    with pytest.raises(NnsynthError, match="background"):
        tumour_regions({"NCR": 1})


# ============================================================================================================
# loss and networks
# ============================================================================================================
def test_dice_ce_loss_prefers_the_truth():
    from nnsynth.losses.segmentation import DiceCELoss
    labels = torch.randint(0, 4, (2, 3, 8, 8))
    good = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float() * 20
    bad = torch.roll(good, 1, dims=1)
    loss = DiceCELoss()
    lg, parts = loss(good, labels)
    lb, _ = loss(bad, labels)
    assert float(lg) < 1e-3 and float(lb) > 1.0 and set(parts) == {"ce", "dice_loss"}


def _tiny_vq(k: int = 3, spatial_dims: int = 2):
    from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
    net = {"encoder_channels": [4, 8, 8], "encoder_kernel_sizes": [7, 3, 3], "num_res_blocks": 1,
           "num_hyper_res_blocks": 1, "hyper_bank_size": 4, "code_length": 8}
    return VQSeq2SeqNet(4, k, spatial_dims, net, {"latent_dim": 3, "codebook_size": 16, "init": "random"})


def test_latent_encoder_is_the_vqc_mean_and_stays_frozen():
    from nnsynth.networks.segmentation import LatentEncoder, LatentSegmentationNet
    torch.manual_seed(0)
    backbone = _tiny_vq()
    backbone.train()
    backbone.quantize(torch.rand(2, 3, 16, 16))           # initialise the codebook as training would
    codebook = backbone.quantizer.codebook.detach().clone()
    enc = LatentEncoder(backbone, "vq_seq2seq")
    images = torch.rand(2, 4, 3, 18, 22)                  # not a multiple of 4: padded inside
    avail = torch.tensor([[True, False, True, False], [True, True, True, True]])
    images[~avail] = 0
    z = enc(images, avail)
    assert z.shape == (2, 3, 5, 6)
    with torch.no_grad():
        expect0 = (backbone.quantize(images[0, 0:1]).z_q + backbone.quantize(images[0, 2:3]).z_q) / 2
    assert torch.allclose(z[0:1], expect0, atol=1e-6)
    net = LatentSegmentationNet(enc, 4, 2, 3, [18, 22], TINY_SEG)
    net.train()
    assert not enc.training and not backbone.quantizer.training
    out = net(images, avail)
    assert out.shape == (2, 4, 3, 18, 22)                  # (B, C, k, y, x) at image resolution
    out.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None for p in net.unet.parameters())
    assert torch.equal(backbone.quantizer.codebook.detach(), codebook)   # the codebook never moves


def test_image_net_and_3d_shapes():
    from nnsynth.networks.segmentation import ImageSegmentationNet, LatentEncoder, LatentSegmentationNet
    net = ImageSegmentationNet(4, 4, 2, 3, [20, 24], TINY_SEG)
    images = torch.rand(2, 4, 3, 20, 24)
    avail = torch.ones(2, 4, dtype=torch.bool)
    assert net(images, avail).shape == (2, 4, 3, 20, 24)
    # a missing sequence is zero whatever the tensor holds
    avail[0, 1] = False
    a = net(images, avail)
    images2 = images.clone()
    images2[0, 1] = 5.0
    assert torch.allclose(a, net(images2, avail))
    lat = LatentSegmentationNet(LatentEncoder(_tiny_vq(1, 3), "vq_seq2seq"), 4, 3, 1, [12, 16, 16], TINY_SEG)
    assert lat(torch.rand(1, 4, 1, 12, 16, 16), torch.ones(1, 4, dtype=torch.bool)).shape == (1, 4, 12, 16, 16)


# ============================================================================================================
# the CLI chain on the tiny demo dataset
# ============================================================================================================
_CACHE: Dict[str, Dict[str, Path]] = {}


def _add_tiny_seg_settings(preprocessed: Path) -> None:
    """The plans are editable JSON: a tiny segmentation U-Net for the tests."""
    path = preprocessed / "Dataset501_BrainDemo" / "nnsynthPlans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["2d"]["segmentation"] = dict(TINY_SEG)
    path.write_text(json.dumps(plans, indent=2))


def _build(root: Path) -> Dict[str, Path]:
    from nnsynth.cli import make_demo, plan_and_preprocess, train
    from nnsynth.training.engine import TrainingEngine
    folders = {k: root / k for k in ("raw", "preprocessed", "results")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnSynth_raw", str(folders["raw"]))
        mp.setenv("nnSynth_preprocessed", str(folders["preprocessed"]))
        mp.setenv("nnSynth_results", str(folders["results"]))
        mp.setenv("NNSYNTH_NO_TQDM", "1")
        assert make_demo.cli(["-d", "501", "--cases", "5", "--test-cases", "2", "--spacing", "4",
                              "--size-scale", "0.5", "--no-montage"]) == 0
        assert plan_and_preprocess.cli(["-d", "501", "-c", "2d", "-np", "0", "--no-progress",
                                        "--overwrite", *TINY_NETWORK]) == 0
        _add_tiny_seg_settings(folders["preprocessed"])
        with pytest.MonkeyPatch.context() as mp2:     # the synthesis model's own validation is not tested here
            mp2.setattr(TrainingEngine, "final_validation", lambda self: None)
            assert train.cli(["501", "vq_seq2seq", "0", "--epochs", "1", "--iters-per-epoch", "2",
                              "--device", "cpu"]) == 0
        assert train.cli(["501", "seg_from_latent", "0", "--latent-from", "vq_seq2seq", "--labelled-cases", "1",
                          "--epochs", "2", "--iters-per-epoch", "3", "--device", "cpu"]) == 0
    ds = folders["raw"] / "Dataset501_BrainDemo"
    return {**folders, "dataset": ds, "imagesTs": ds / "imagesTs", "labelsTs": ds / "labelsTs",
            "seg": folders["results"] / "Dataset501_BrainDemo" / "seg_from_latent__nnsynthPlans__2d"}


@pytest.fixture
def chain(tmp_path_factory, monkeypatch) -> Dict[str, Path]:
    if "chain" not in _CACHE:
        _CACHE["chain"] = _build(tmp_path_factory.mktemp("seg_chain"))
    f = _CACHE["chain"]
    monkeypatch.setenv("nnSynth_raw", str(f["raw"]))
    monkeypatch.setenv("nnSynth_preprocessed", str(f["preprocessed"]))
    monkeypatch.setenv("nnSynth_results", str(f["results"]))
    monkeypatch.setenv("NNSYNTH_NO_TQDM", "1")
    return f


def test_seg_from_latent_trains_from_the_cli_with_one_labelled_case(chain):
    fold = chain["seg"] / "fold_0"
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth", "training_log.txt",
                 "progress.png"):
        assert (fold / name).is_file(), name
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    extra = state["extra"]
    assert state["trainer_name"] == "seg_from_latent" and state["epoch"] == 2
    assert len(extra["labelled_cases"]) == 1 and extra["labels"] == BRATS
    assert extra["backbone"]["kind"] == "vq_seq2seq" and "vq_seq2seq__nnsynthPlans__2d" in extra["backbone"]["checkpoint"]
    # the frozen encoder is the vq_seq2seq's, weight for weight
    vq = torch.load(chain["results"] / "Dataset501_BrainDemo" / "vq_seq2seq__nnsynthPlans__2d" / "fold_0" /
                    "checkpoint_final.pth", weights_only=False)["network_weights"]
    for k, v in vq.items():
        if k.startswith(("encoder.", "quantizer.")) and v.is_floating_point():
            assert torch.equal(state["network_weights"][f"encoder.backbone.{k}"], v), k
    # the one labelled case has every sequence and a tumour (paper: one subject containing all sequences)
    case = extra["labelled_cases"][0]
    files = sorted((chain["dataset"] / "imagesTr").glob(f"{case}_*.nii.gz"))
    assert len(files) == 4
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(chain["dataset"] / "labelsTr" / f"{case}.nii.gz")))
    assert (lab > 0).any()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["regions"] == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    assert {"dice_ET", "dice_TC", "dice_WT", "assd_WT"} <= set(summary["mean"])
    assert summary["n"] == len(summary["per_case"]) >= 1
    log = (fold / "training_log.txt").read_text()
    assert "validation Dice" in log and "Full-volume validation" in log


def _geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_predict_segment_and_evaluate_seg_with_missing_sequences(chain, tmp_path):
    from nnsynth.cli import evaluate, predict
    inp = tmp_path / "in"
    shutil.copytree(chain["imagesTs"], inp)
    cases = sorted({p.name.rsplit("_", 1)[0] for p in inp.iterdir()})
    assert len(cases) == 2
    for cid in (1, 3):                                     # the first test case keeps only T1 and T2
        (inp / f"{cases[0]}_{cid:04d}.nii.gz").unlink()
    out = tmp_path / "out"
    assert predict.cli(["-i", str(inp), "-o", str(out), "--segment", "-d", "501", "--device", "cpu",
                        "--no-progress"]) == 0
    for c in cases:
        pred = out / f"{c}.nii.gz"
        assert pred.is_file()
        assert _geometry(pred) == _geometry(inp / f"{c}_0000.nii.gz")
        img = sitk.ReadImage(str(pred))
        assert img.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1, 2, 3}
    record = json.loads((out / "nnsynth_segmentations.json").read_text())
    assert record["cases"][cases[0]]["sources"] == ["T1", "T2"]
    assert record["cases"][cases[1]]["sources"] == ["T1", "T1Gd", "T2", "Flair"]
    # -t seg is the same thing
    out2 = tmp_path / "out2"
    assert predict.cli(["-i", str(inp), "-o", str(out2), "-t", "seg", "--device", "cpu", "--no-progress"]) == 0
    for c in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{c}.nii.gz")))
        assert np.array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / f"{c}.nii.gz"))))
    # evaluation: CSV + summary, numbers equal to the metric functions on the files
    assert evaluate.cli(["-r", str(chain["labelsTs"]), "-p", str(out), "--seg", "-d", "501", "--no-progress"]) == 0
    import pandas as pd
    df = pd.read_csv(out / "segmentation_metrics.csv")
    assert list(df["case"]) == cases and {"dice_ET", "dice_TC", "dice_WT", "assd_ET", "assd_TC", "assd_WT"} <= set(df)
    summary = json.loads((out / "segmentation_summary.json").read_text())
    assert summary["all"]["n"] == 2 and summary["problems"] == {}
    ref_img = sitk.ReadImage(str(chain["labelsTs"] / f"{cases[1]}.nii.gz"))
    ref = sitk.GetArrayFromImage(ref_img)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cases[1]}.nii.gz")))
    expect = region_scores(pred, ref, tumour_regions(BRATS), ref_img.GetSpacing()[::-1])
    row = df[df["case"] == cases[1]].iloc[0]
    assert row["dice_WT"] == pytest.approx(expect["dice_WT"])
    assert row["sources"] == "T1+T1Gd+T2+Flair"
    if math.isfinite(expect["assd_WT"]):
        assert row["assd_WT"] == pytest.approx(expect["assd_WT"])


def test_seg_from_images_baseline_with_named_case(chain, tmp_path):
    from nnsynth.cli import predict, train
    state = torch.load(chain["seg"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    case = state["extra"]["labelled_cases"][0]
    assert train.cli(["501", "seg_from_images", "0", "--cases", case, "--epochs", "1", "--iters-per-epoch", "2",
                      "--device", "cpu"]) == 0
    model = chain["results"] / "Dataset501_BrainDemo" / "seg_from_images__nnsynthPlans__2d"
    base = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert base["extra"]["labelled_cases"] == [case]
    # same budget: the optimiser settings of seg_from_latent
    assert base["optimizer_state"]["param_groups"][0]["weight_decay"] == \
        state["optimizer_state"]["param_groups"][0]["weight_decay"]
    out = tmp_path / "out"
    assert predict.cli(["-i", str(chain["imagesTs"]), "-o", str(out), "-t", "seg", "-tr", "seg_from_images",
                        "--device", "cpu", "--no-progress"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 2
    # two segmentation models now: without -tr the choice is refused with the candidates listed
    assert predict.cli(["-i", str(chain["imagesTs"]), "-o", str(tmp_path / "x"), "--segment", "--device", "cpu",
                        "--no-progress"]) == 1
    shutil.rmtree(model)


def test_training_reduces_the_loss(chain):
    from nnsynth.cli.train import load_plans
    from nnsynth.training.trainers.seg_from_latent import SegFromLatentTrainer
    pre = chain["preprocessed"] / "Dataset501_BrainDemo"
    plans = load_plans(pre, "nnsynthPlans")
    training = plans["configurations"]["2d"]["training"]
    training["per_trainer"]["seg_from_latent"]["lr"] = 1e-2      # a short run: a larger step, no warm-up
    training["warmup_iters"] = 0
    out = chain["results"] / "Dataset501_BrainDemo" / "seg_from_latent__nnsynthPlans__2d"
    tr = SegFromLatentTrainer(plans=plans, configuration="2d", fold=0, preprocessed_dataset_folder=pre,
                              output_folder=out, device="cpu", num_epochs=1, iters_per_epoch=60, seed=3)
    tr.initialize()
    batch = next(tr.train_iter)                  # augmented patches of the one labelled case, tumour-centred
    assert batch["labels"].shape == (batch["images"].shape[0],) + tuple(batch["images"].shape[2:])
    assert int(batch["labels"].max()) > 0
    with torch.no_grad():
        before = float(tr.compute_loss(batch)[0])
    for _ in range(60):                          # the engine's own optimisation step, on this batch
        tr.train_step(batch)
    with torch.no_grad():
        after = float(tr.compute_loss(batch)[0])
    assert after < 0.8 * before, (before, after)


def test_user_errors(chain, caplog, tmp_path):
    from nnsynth.cli import train
    assert train.cli(["501", "seg_from_images", "0", "--latent-from", "vq_seq2seq", "--device", "cpu"]) == 1
    assert "--latent-from does not apply" in caplog.text
    assert train.cli(["501", "seg_from_latent", "0", "--cases", "nope", "--epochs", "1", "--iters-per-epoch", "1",
                      "--device", "cpu"]) == 1
    assert "nope: not a preprocessed case" in caplog.text
    assert train.cli(["501", "seg_from_latent", "0", "--latent-from", "seq2seq", "--device", "cpu"]) == 1
    assert "needs a trained seq2seq" in caplog.text and "nnsynth_train" in caplog.text
    assert train.cli(["501", "seg_from_latent", "0", "--labelled-cases", "2", "--cases", "a", "--device",
                      "cpu"]) == 1
    assert "make them agree" in caplog.text


def test_no_labels_is_a_clear_error(tmp_path, monkeypatch):
    from nnsynth.exceptions import NnsynthError
    from nnsynth.training.trainers.seg_from_latent import SegFromImagesTrainer
    from test_training_engine import make_preprocessed, tiny_plans
    pre = make_preprocessed(tmp_path / "pre", n_cases=4)
    tr = SegFromImagesTrainer(plans=tiny_plans(), configuration="2d", fold="all", preprocessed_dataset_folder=pre,
                              output_folder=tmp_path / "out", device="cpu")
    with pytest.raises(NnsynthError, match="needs labels"):
        tr.initialize()


def test_3d_image_baseline_trains_and_validates(tmp_path):
    """The 3d layout (patches (1, z, y, x) per sequence) through the engine, with a case missing sequences."""
    from nnsynth.preprocessing.storage import save_case
    from nnsynth.training.trainers.seg_from_latent import SegFromImagesTrainer
    from nnsynth.utils.files import save_json
    from test_training_engine import tiny_case, tiny_plans
    plans = tiny_plans("nnsynthPlans_3d", patch=(8, 16, 16), epochs=1, iters=2, spatial_dims=3)
    plans["configurations"]["3d"]["segmentation"] = dict(TINY_SEG)
    plans["configurations"]["3d"]["batch_size"] = 2
    folder = tmp_path / "Dataset990_Tiny"
    shape = (12, 20, 20)
    for i in range(3):
        avail = (True, i != 1, True, i != 1)                     # case 1 lacks T1Gd and Flair
        data, seg, props = tiny_case(i, shape, avail)
        seg[0, 4:8, 6:12, 6:12] = 2
        seg[0, 5:7, 8:10, 8:10] = 3
        props.update({"has_label": True, "spacing": [2.0, 1.0, 1.0]})
        save_case(folder / "nnsynthPlans_3d", f"case_{i:03d}", data, seg, props)
    save_json(plans, folder / "nnsynthPlans.json")
    save_json({"channel_names": {"0": "T1", "1": "T1Gd", "2": "T2", "3": "Flair"}, "numTraining": 3,
               "file_ending": ".nii.gz", "labels": BRATS}, folder / "dataset.json")
    tr = SegFromImagesTrainer(plans=plans, configuration="3d", fold="all", preprocessed_dataset_folder=folder,
                              output_folder=tmp_path / "out", device="cpu", labelled_case_names=["case_000"])
    tr.run_training()
    batch = next(tr.train_iter)
    assert batch["images"].shape == (2, 4, 1, 8, 16, 16) and batch["labels"].shape == (2, 8, 16, 16)
    summary = json.loads((tmp_path / "out" / "fold_all" / "validation" / "summary.json").read_text())
    assert [r["case"] for r in summary["per_case"]] == ["case_001", "case_002"]   # the labelled case is left out
    assert summary["per_case"][0]["sources"] == "T1+T2"
    assert set(summary["mean"]) >= {"dice_ET", "dice_TC", "dice_WT", "assd_ET"}
