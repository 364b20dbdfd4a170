"""``nnsynth_train`` end to end on the real chain: demo dataset -> nnsynth_plan_and_preprocess -> nnsynth_train."""
from __future__ import annotations

import pytest
import torch

from nnsynth.utils.files import load_json


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "pre"), ("nnSynth_results", "res")):
        mp.setenv(var, str(root / sub))
    mp.setenv("NNSYNTH_NO_TQDM", "1")
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.dataset.demo import make_demo_dataset
    make_demo_dataset(dataset=991, name="CliDemo", num_cases=5, num_test_cases=0, spacing=4, size_scale=0.5,
                      montage=False, progress=False)
    # a small network keeps the test fast; everything else is the planner's
    rc = plan_cli(["-d", "991", "-c", "2d", "-np", "1", "--device", "cpu", "--overwrite", "num_res_blocks=1",
                   "num_hyper_res_blocks=1", "encoder_channels=[8,16,16]", "val_iters=2"])
    assert rc == 0
    yield root
    mp.undo()


@pytest.fixture
def env_vars(env, monkeypatch):
    """The shared module folders (conftest points every test at its own empty ones first)."""
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "pre"), ("nnSynth_results", "res")):
        monkeypatch.setenv(var, str(env / sub))
    monkeypatch.setenv("NNSYNTH_NO_TQDM", "1")
    return env


def test_train_cli_end_to_end(env_vars):
    env = env_vars
    from nnsynth.cli.train import cli
    assert cli(["991", "seq2seq", "0", "--epochs", "2", "--iters-per-epoch", "2", "--device", "cpu"]) == 0
    model = env / "res" / "Dataset991_CliDemo" / "seq2seq__nnsynthPlans__2d"
    fold = model / "fold_0"
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth", "training_log.txt",
                 "progress.png", "validation/summary.json"):
        assert (fold / name).is_file(), name
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (model / name).is_file(), name
    assert (env / "pre" / "Dataset991_CliDemo" / "splits_final.json").is_file()
    summary = load_json(fold / "validation" / "summary.json")
    assert summary["per_case"] and summary["mean"]["psnr"] > 0
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["epoch"] == 2
    # the quantile calibration comes from the same validation: one entry per target it predicted twice or more
    calibration = load_json(fold / "calibration.json")
    predicted = {r["target"] for r in summary["per_case"]}
    assert calibration["per_target"] and set(calibration["per_target"]) <= predicted
    assert "fold 0" in calibration["source"]
    for target, entry in calibration["per_target"].items():
        assert entry["images"] == sum(r["target"] == target for r in summary["per_case"])
        assert len(entry["offsets"]) == len(calibration["percentiles"])
    (fold / "validation" / "summary.json").unlink()
    (fold / "calibration.json").unlink()
    assert cli(["991", "seq2seq", "0", "--device", "cpu", "--val-only"]) == 0   # re-creates the summary
    assert (fold / "validation" / "summary.json").is_file()
    assert load_json(fold / "calibration.json") == calibration                  # same weights, same calibration


def test_train_cli_errors(env_vars, caplog):
    from nnsynth.cli.train import cli
    assert cli(["991", "no_such_trainer", "0"]) == 1
    assert "Unknown trainer" in caplog.text
    import importlib.util
    if importlib.util.find_spec("nnsynth.training.trainers.codebrain") is None:
        assert cli(["991", "codebrain", "0"]) == 2            # registered, not built yet
    assert cli(["991", "seq2seq", "7", "--device", "cpu"]) == 1   # no such fold
    assert cli(["991", "seq2seq", "0", "-c", "5d", "--device", "cpu"]) == 1
    assert cli(["991", "seq2seq", "0", "-p", "NoSuchPlans", "--device", "cpu"]) == 1
    assert cli(["992", "seq2seq", "0"]) == 1                  # unknown dataset
    with pytest.raises(SystemExit) as e:
        cli(["-h"])
    assert e.value.code == 0
