"""nnsynth_evaluate on synthetic folders: metric values, CSV and summary structure, profiles, LPIPS message."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsynth.cli import evaluate as evaluate_cli
from nnsynth.evaluation.evaluate import evaluate_folders, evaluate_pair, summarize
from nnsynth.evaluation.metrics import compute_metrics


def _brain(shape=(8, 12, 12), seed=0):
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.float32)
    ref[1:-1, 2:-2, 2:-2] = rng.uniform(50, 150, size=(shape[0] - 2, shape[1] - 4, shape[2] - 4))
    return ref


def _write(arr, path, spacing=(1.0, 1.0, 2.0)):
    img = sitk.GetImageFromArray(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def no_lpips(monkeypatch, tmp_path):
    monkeypatch.delenv("NNSYNTH_LPIPS_WEIGHTS", raising=False)
    monkeypatch.delenv("NNSYNTH_BACKBONE_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


def test_pair_metrics_known_values(no_lpips):
    ref = _brain()
    # each image is normalised by its own percentiles: a scaled copy is a perfect prediction
    m = evaluate_pair(ref, 3.0 * ref)
    assert m["psnr"] > 100 and m["ssim"] == pytest.approx(1.0) and m["mae"] < 1e-6     # exact up to rounding
    assert "lpips" not in m
    pred = ref + np.random.default_rng(1).normal(0, 10, ref.shape).astype(np.float32) * (ref != 0)
    m = evaluate_pair(ref, pred)
    ref_m = compute_metrics(ref, pred, ref != 0, compute_lpips=False)
    for k in ("psnr", "ssim", "mae"):
        assert m[k] == pytest.approx(ref_m[k])
    assert 10 < m["psnr"] < 40 and 0 < m["ssim"] < 1
    # profiles change the numbers (codebrain reports MAE x 1000)
    cb = evaluate_pair(ref, pred, profile="codebrain")
    assert cb["mae"] > 10 * m["mae"]
    br = evaluate_pair(ref, 2.0 * ref, profile="brasyn")
    assert br["ssim"] == pytest.approx(1.0) and br["mae"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(Exception, match="Unknown profile"):
        evaluate_pair(ref, pred, profile="nope")


def test_tumour_split_separates_regions(no_lpips):
    ref = _brain(seed=3)
    label = np.zeros(ref.shape, np.uint8)
    label[3:5, 5:8, 5:8] = 2
    pred = ref.copy()
    tumour = label > 0
    # permuting values inside the tumour keeps both percentiles: only the tumour differs after normalisation
    pred[tumour] = np.random.default_rng(0).permutation(ref[tumour])
    m = evaluate_pair(ref, pred, label=label)
    assert m["mae_non_tumour"] == 0.0 and math.isinf(m["psnr_non_tumour"])
    assert m["mae_tumour"] > 0 and m["psnr_tumour"] < 40
    assert m["ssim_tumour"] < m["ssim_non_tumour"] <= 1.0 + 1e-9
    none = evaluate_pair(ref, pred, label=np.zeros_like(label))
    assert none["psnr_tumour"] is None and none["ssim_tumour"] is None


def _folders(tmp_path):
    ref, pred, inp = tmp_path / "ref", tmp_path / "pred", tmp_path / "in"
    rng = np.random.default_rng(5)
    for c in range(3):
        for cid in (2, 3):
            r = _brain(seed=10 * c + cid)
            _write(r, ref / f"case{c}_{cid:04d}.nii.gz")
            if not (c == 2 and cid == 2):
                noisy = r + rng.normal(0, 5 + 5 * c, r.shape).astype(np.float32) * (r != 0)
                _write(noisy, pred / f"case{c}_{cid:04d}.nii.gz")
        _write(_brain(seed=99), inp / f"case{c}_0000.nii.gz")
    _write(_brain(seed=7), pred / "orphan_0003.nii.gz")              # no reference
    record = {"channel_names": {"0": "T1", "1": "T1Gd", "2": "T2", "3": "Flair"},
              "cases": {"case0": {"Flair": {"sources": ["T1", "T2"]}, "T2": {"sources": ["T1"]}},
                        "case1": {"Flair": {"sources": ["T1", "T2"]}, "T2": {"sources": ["T1"]}}}}
    (pred / "nnsynth_predictions.json").write_text(json.dumps(record))
    return ref, pred, inp


def test_folder_csv_and_summary(tmp_path, no_lpips, capsys):
    ref, pred, inp = _folders(tmp_path)
    rc = evaluate_cli.cli(["-r", str(ref), "-p", str(pred), "--no-progress"])
    assert rc == 1                                                      # the orphan prediction is a problem
    err = capsys.readouterr().err
    assert err.count("LPIPS column left out") == 1
    df = pd.read_csv(pred / "metrics.csv")
    assert list(df.columns) == ["case", "target", "sources", "task", "file", "psnr", "ssim", "mae"]
    assert len(df) == 5
    summary = json.loads((pred / "summary.json").read_text())
    assert set(summary["tasks"]) == {"T1+T2 -> Flair", "T1 -> T2", "? -> Flair"}
    flair = df[df["task"] == "T1+T2 -> Flair"]
    t = summary["tasks"]["T1+T2 -> Flair"]
    assert t["n"] == 2
    assert t["mean"]["psnr"] == pytest.approx(flair["psnr"].mean())
    assert t["std"]["psnr"] == pytest.approx(flair["psnr"].std(ddof=1))
    assert summary["tasks"]["? -> Flair"]["std"]["psnr"] is None    # one value: no std
    assert summary["all"]["n"] == 5 and summary["targets"]["T2"]["n"] == 2
    assert "orphan_0003.nii.gz" in summary["problems"]
    assert "LPIPS column left out" in summary["lpips"] and "lpips" not in summary["metrics"]
    # sources from the prediction input folder when PRED has no record; another CSV path and profile
    (pred / "nnsynth_predictions.json").unlink()
    (pred / "orphan_0003.nii.gz").unlink()
    out = tmp_path / "eval" / "m.csv"
    df2, s2 = evaluate_folders(ref, pred, output_csv=out, sources_folder=inp, profile="seq2seq", progress=False)
    assert out.is_file() and (out.parent / "summary.json").is_file()
    assert set(df2["task"]) == {"0000 -> 0003", "0000 -> 0002"}       # no dataset.json: channel ids as names
    assert s2["profile"] == "seq2seq" and s2["problems"] == {}
    both = df2.merge(df, on="file", suffixes=("_s2s", "_contract"))
    assert len(both) == 5 and not np.allclose(both["psnr_s2s"], both["psnr_contract"])


def test_labels_add_region_columns(tmp_path, no_lpips):
    ref, pred, _ = _folders(tmp_path)
    (pred / "orphan_0003.nii.gz").unlink()
    labels = tmp_path / "labels"
    for c in range(2):
        lab = np.zeros((8, 12, 12), np.uint8)
        lab[3:5, 4:7, 4:7] = 1
        _write(lab, labels / f"case{c}.nii.gz")
    df, summary = evaluate_folders(ref, pred, labels_folder=labels, profile="brasyn", progress=False)
    for col in ("psnr_tumour", "ssim_tumour", "mae_tumour", "psnr_non_tumour", "ssim_non_tumour", "mae_non_tumour"):
        assert col in df.columns and col in summary["all"]["mean"]
    assert df[df["case"] == "case2"]["ssim_tumour"].isna().all()     # no label file: empty tumour columns
    assert df[df["case"] == "case0"]["ssim_tumour"].notna().all()


def test_summarize_handles_empty_and_nan():
    df = pd.DataFrame({"case": ["a", "b"], "target": ["F", "F"], "task": ["x -> F"] * 2,
                       "psnr": [10.0, float("inf")], "ssim": [0.5, 0.7]})
    s = summarize(df, ["psnr", "ssim"])
    assert s["all"]["mean"]["psnr"] == 10.0 and s["all"]["std"]["psnr"] is None
    assert s["all"]["mean"]["ssim"] == pytest.approx(0.6)
    empty = summarize(df.iloc[:0], ["psnr"])
    assert empty["all"]["n"] == 0 and empty["tasks"] == {}


def test_report_markdown_and_montages(tmp_path, no_lpips):
    ref, pred, inp = _folders(tmp_path)
    (pred / "orphan_0003.nii.gz").unlink()
    out = tmp_path / "eval"
    rc = evaluate_cli.cli(["-r", str(ref), "-p", str(pred), "-o", str(out / "metrics.csv"), "--report",
                           "--sources-from", str(inp), "--no-progress"])
    assert rc == 0
    text = (out / "report.md").read_text()
    assert "## Mean (std) per task" in text and "T1+T2 -> Flair" in text
    pngs = sorted((out / "report_montages").glob("*.png"))
    assert len(pngs) == 5 and all(p.stat().st_size > 1000 for p in pngs)
    for p in pngs:
        assert f"report_montages/{p.name}" in text
