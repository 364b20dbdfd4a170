"""nnsynth_predict works for every trainer that exists: each is trained for two iterations through the CLI on
the tiny demo data of ``helpers_model`` and must write a Flair for each test case in the case's geometry."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers_model import trained_model_folders
from nnsynth.cli import analyze, predict, train
from nnsynth.dataset.io import read_image
from nnsynth.training.engine import TrainingEngine

TRAINERS = [("vq_seq2seq", []), ("tsf_seq2seq", ["--pretrained-from", "seq2seq"]), ("codebrain", [])]


@pytest.mark.parametrize("trainer,extra", TRAINERS)
def test_predict_with_every_trainer(trainer, extra, tmp_path, tmp_path_factory, monkeypatch):
    f = trained_model_folders(tmp_path_factory)
    results = tmp_path / "results"
    shutil.copytree(f["results"], results)          # the tiny seq2seq (tsf starts from it)
    for var, path in (("nnSynth_raw", f["raw"]), ("nnSynth_preprocessed", f["preprocessed"]),
                      ("nnSynth_results", results)):
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("NNSYNTH_NO_TQDM", "1")
    monkeypatch.setattr(TrainingEngine, "final_validation", lambda self: None)
    assert train.cli(["501", trainer, "0", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu",
                      *extra]) == 0
    inp = tmp_path / "in"
    inp.mkdir()
    for p in f["imagesTs"].iterdir():
        if not p.name.endswith("_0003.nii.gz"):      # hold Flair back
            shutil.copy(p, inp / p.name)
    out = tmp_path / "out"
    assert predict.cli(["-i", str(inp), "-o", str(out), "-t", "Flair", "-d", "501", "-tr", trainer,
                        "-f", "0", "--device", "cpu", "--save-maps"]) == 0
    written = sorted(out.glob("*_0003.nii.gz"))
    cases = sorted({p.name.rsplit("_", 1)[0] for p in inp.iterdir()})
    assert [p.name for p in written] == [f"{c}_0003.nii.gz" for c in cases]
    for p in written:
        arr, geo = read_image(p)
        _, ref_geo = read_image(inp / p.name.replace("_0003", "_0000"))
        assert ref_geo.mismatch(geo) == ""
        assert np.isfinite(arr).all() and arr.std() > 0
    if trainer == "tsf_seq2seq":                      # explanations: TSEM image and contribution weights
        for c in cases:
            tsem = sorted((out / "maps").glob(f"{c}_0003_tsem.nii.gz"))
            assert tsem, sorted(p.name for p in (out / "maps").iterdir())
            weights = json.loads((out / "maps" / f"{c}_0003_contributions.json").read_text())
            values = [v for v in _numbers(weights)]
            assert values and abs(sum(values) - 1.0) < 1e-3
        assert analyze.cli(["-d", "501", "-tr", "tsf_seq2seq", "-f", "0", "--device", "cpu", "--no-maps",
                            "-o", str(tmp_path / "analysis")]) == 0
        assert (tmp_path / "analysis" / "contributions.csv").is_file()


def _numbers(d):
    """The float leaves of a (nested) JSON dict of weights."""
    for v in d.values():
        if isinstance(v, dict):
            yield from _numbers(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield float(v)
