"""A tiny trained seq2seq model for the prediction / analysis tests, built ONCE per test session.

The real CLI chain: nnsynth_make_demo_dataset (tiny) -> nnsynth_plan_and_preprocess (tiny network through
``--overwrite``) -> nnsynth_train (1 epoch x 2 iterations). Only the engine's final full-volume validation is
switched off, since it costs more than the training itself and is not what these tests check.
A 3D model (same data, 1 iteration) lives in a separate results root so the 2D one stays "the only model".
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import pytest

_CACHE: Dict[str, Dict[str, Path]] = {}
TINY_NETWORK = ["encoder_channels=[4,8,8]", "num_res_blocks=1", "num_hyper_res_blocks=1", "val_iters=1",
                "hyper_mlp_hidden=8"]


def _build(root: Path) -> Dict[str, Path]:
    from nnsynth.cli import make_demo, plan_and_preprocess, train
    from nnsynth.training.engine import TrainingEngine

    folders = {k: root / k for k in ("raw", "preprocessed", "results", "results3d")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnSynth_raw", str(folders["raw"]))
        mp.setenv("nnSynth_preprocessed", str(folders["preprocessed"]))
        mp.setenv("nnSynth_results", str(folders["results"]))
        mp.setenv("NNSYNTH_NO_TQDM", "1")
        mp.setattr(TrainingEngine, "final_validation", lambda self: None)
        assert make_demo.cli(["-d", "501", "--cases", "5", "--test-cases", "2", "--spacing", "4",
                              "--size-scale", "0.5", "--no-montage"]) == 0
        assert plan_and_preprocess.cli(["-d", "501", "-c", "2d", "3d", "-np", "0", "--no-progress",
                                        "--overwrite", *TINY_NETWORK]) == 0
        assert train.cli(["501", "seq2seq", "0", "-c", "3d", "--epochs", "1", "--iters-per-epoch", "1",
                          "--device", "cpu"]) == 0
        shutil.move(str(folders["results"] / "Dataset501_BrainDemo"), str(folders["results3d"]))
        assert train.cli(["501", "seq2seq", "0", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu"]) == 0
    ds = folders["raw"] / "Dataset501_BrainDemo"
    return {**folders, "dataset": ds, "imagesTs": ds / "imagesTs", "truth": ds / "imagesTs_truth",
            "labelsTs": ds / "labelsTs",
            "model": folders["results"] / "Dataset501_BrainDemo" / "seq2seq__nnsynthPlans__2d",
            "model3d": folders["results3d"] / "Dataset501_BrainDemo" / "seq2seq__nnsynthPlans__3d"}


def trained_model_folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Paths of the session's tiny trained models and their dataset (built on first use)."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = _build(tmp_path_factory.mktemp("tiny_model"))
    return _CACHE["tiny"]


@pytest.fixture
def trained(tmp_path_factory, monkeypatch) -> Dict[str, Path]:
    """The tiny trained 2D model as the only model under nnSynth_results (for this test)."""
    f = trained_model_folders(tmp_path_factory)
    monkeypatch.setenv("nnSynth_raw", str(f["raw"]))
    monkeypatch.setenv("nnSynth_preprocessed", str(f["preprocessed"]))
    monkeypatch.setenv("nnSynth_results", str(f["results"]))
    monkeypatch.setenv("NNSYNTH_NO_TQDM", "1")
    return f
