"""nnsynth_analyze: A_ij, C_t, C_d and M_d by hand, then the command on the tiny trained model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from helpers_model import trained  # noqa: F401  (fixture)
from nnsynth.evaluation.analysis import (differentiation, differentiation_map, ranking_table, summarize_analysis,
                                         synthesis_matrix, totipotency, z_normalise)

NAN = np.nan
PSNR = np.array([[NAN, 20, 30], [10, NAN, 20], [30, 10, NAN]])   # rows: source, columns: target
Z = 1.0 / np.sqrt(400 / 6) * 10                                     # off-diagonal mean 20, population std sqrt(400/6)


def test_z_normalise_uses_off_diagonal_only():
    z = z_normalise(PSNR)
    np.testing.assert_allclose(z, [[NAN, 0, Z], [-Z, NAN, 0], [Z, -Z, NAN]])
    m = PSNR.copy()
    np.fill_diagonal(m, 1000.0)                                      # the diagonal must not matter
    np.testing.assert_allclose(z_normalise(m)[~np.eye(3, dtype=bool)], z[~np.eye(3, dtype=bool)])
    assert np.all(z_normalise(np.full((3, 3), 0.7))[~np.eye(3, dtype=bool)] == 0)


def test_synthesis_matrix_totipotency_differentiation_by_hand():
    ssim = np.full((3, 3), 0.5)                                      # constant: contributes 0
    a, used = synthesis_matrix({"psnr": PSNR, "ssim": ssim})
    assert used == ["psnr", "ssim"]
    np.testing.assert_allclose(a, [[NAN, 0, Z], [-Z, NAN, 0], [Z, -Z, NAN]])
    # C_t(i) = mean_j A_ij (row means), C_d(i) = -mean_j A_ji (minus column means), j != i
    np.testing.assert_allclose(totipotency(a), [Z / 2, -Z / 2, 0])
    np.testing.assert_allclose(differentiation(a), [0, Z / 2, -Z / 2])
    # LPIPS enters with a minus sign: an LPIPS matrix mirroring PSNR doubles A
    a2, used2 = synthesis_matrix({"psnr": PSNR, "ssim": ssim, "lpips": -PSNR})
    assert used2 == ["psnr", "ssim", "lpips"]
    np.testing.assert_allclose(a2, 2 * a)
    # an unavailable LPIPS (all NaN) is left out
    _, used3 = synthesis_matrix({"psnr": PSNR, "ssim": ssim, "lpips": np.full((3, 3), NAN)})
    assert used3 == ["psnr", "ssim"]
    table = ranking_table(["A", "B", "C"], totipotency(a), differentiation(a))
    assert table.sort_values("rank_totipotency")["sequence"].tolist() == ["A", "C", "B"]
    assert table.sort_values("rank_differentiation")["sequence"].tolist() == ["B", "A", "C"]


def test_differentiation_map_excludes_the_target_itself():
    target = np.full((2, 3, 3), 0.5, np.float32)
    preds = {0: target + 0.1, 1: target - 0.3, 2: target + 100.0}   # 2 is the target: must be ignored
    md = differentiation_map(target, preds, 2)
    np.testing.assert_allclose(md, 0.2, atol=1e-6)
    with pytest.raises(Exception):
        differentiation_map(target, {2: target}, 2)


def test_summarize_analysis_files(tmp_path):
    rows = []
    seqs = ["A", "B", "C"]
    for case in ("c1", "c2"):
        for i, s in enumerate(seqs):
            for j, t in enumerate(seqs):
                if i != j:
                    rows.append({"case": case, "source": s, "target": t, "psnr": PSNR[i, j] + (case == "c2"),
                                 "ssim": 0.5, "mae": 0.1})
        rows.append({"case": case, "source": None, "target": "A", "mean_differentiation_map": 0.25})
    summary = summarize_analysis(rows, seqs, tmp_path, "LPIPS unavailable here")
    for name in ("pair_metrics.csv", "matrix_psnr.csv", "synthesis_matrix.csv", "ranking.csv",
                 "synthesis_matrix.png", "ranking.png", "analysis.json"):
        assert (tmp_path / name).is_file(), name
    a = pd.read_csv(tmp_path / "synthesis_matrix.csv", index_col=0).to_numpy()
    np.testing.assert_allclose(a, [[NAN, 0, Z], [-Z, NAN, 0], [Z, -Z, NAN]])
    assert summary["formula"] == "A_ij = nPSNR + nSSIM" and summary["lpips"] == "LPIPS unavailable here"
    assert summary["mean_differentiation_map"] == {"A": 0.25}
    assert summary["ranking_totipotency"][0] == "A"


def test_analyze_command_on_trained_model(trained, tmp_path):
    from nnsynth.cli import analyze
    src = tmp_path / "in"
    src.mkdir()
    case = sorted(p.name[:-12] for p in trained["imagesTs"].glob("*_0000.nii.gz"))[0]
    for cid in (0, 3):
        img = sitk.ReadImage(str(trained["imagesTs"] / f"{case}_{cid:04d}.nii.gz"))
        size = list(img.GetSize())
        slab = sitk.RegionOfInterest(img, size[:2] + [5], [0, 0, size[2] // 2 - 2])
        sitk.WriteImage(slab, str(src / f"{case}_{cid:04d}.nii.gz"))
    out = tmp_path / "analysis"
    assert analyze.cli(["-i", str(src), "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["num_cases"] == 1 and summary["sequences"] == ["T1", "T1Gd", "T2", "Flair"]
    assert "nLPIPS" not in summary["formula"] and "LPIPS" in summary["lpips"]
    pairs = pd.read_csv(out / "pair_metrics.csv")
    assert sorted(zip(pairs["source"], pairs["target"])) == [("Flair", "T1"), ("T1", "Flair")]
    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert maps == [f"{case}_0000_differentiation.nii.gz", f"{case}_0003_differentiation.nii.gz"]
    ref = sitk.ReadImage(str(src / f"{case}_0000.nii.gz"))
    m = sitk.ReadImage(str(out / "maps" / maps[0]))
    assert m.GetSize() == ref.GetSize() and np.allclose(m.GetOrigin(), ref.GetOrigin())
    assert (out / "synthesis_matrix.png").stat().st_size > 0
