"""The benchmark helpers that score averaged predictions and diagnose intensity errors: their numbers back claims
in documentation/benchmarks.md."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnsynth.dataset.io import Geometry, write_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import diagnose_intensity  # noqa: E402
import score_prediction_average  # noqa: E402


def _write(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), array.shape)
    write_image(array.astype(np.float32), geometry, folder / name)


def test_opposite_errors_cancel_in_the_average_and_matching_names_are_scored(tmp_path):
    rng = np.random.default_rng(0)
    truth = gaussian_filter(rng.random((10, 16, 14)), 1.5) + 0.5
    truth[:, :2] = 0                                   # background, outside the scored mask
    error = gaussian_filter(rng.standard_normal(truth.shape), 1.0) * 0.05 * (truth != 0)
    _write(tmp_path / "truth", "c1.nii.gz", truth)
    _write(tmp_path / "a", "c1.nii.gz", truth + error)
    _write(tmp_path / "b", "c1.nii.gz", truth - error)
    _write(tmp_path / "b", "only_b.nii.gz", truth)     # not in every folder: not scored

    res = score_prediction_average.score(tmp_path / "truth", [tmp_path / "a", tmp_path / "b"])

    assert res["images"] == ["c1.nii.gz"]
    assert math.isfinite(res["means"]["0"]["psnr"]) and math.isfinite(res["means"]["1"]["psnr"])
    assert res["means"]["mean"]["psnr"] > res["means"]["0"]["psnr"] + 20   # exact up to float32 rounding
    assert res["means"]["mean"]["mae"] < 1e-5 < res["means"]["0"]["mae"]


def _brain_with_lesion():
    rng = np.random.default_rng(1)
    truth = 0.4 + 0.2 * gaussian_filter(rng.random((12, 20, 20)), 2.0) / 0.5
    truth[:, :2] = 0                                   # background
    label = np.zeros(truth.shape, np.int64)
    label[3:9, 6:14, 6:14] = 2                         # a bright lesion, 8 % of the brain
    truth[label == 2] = 1.2
    return truth, label


def test_diagnosis_finds_a_dim_lesion_and_the_stretch_it_causes(tmp_path):
    truth, label = _brain_with_lesion()
    perfect = diagnose_intensity.diagnose(truth, truth, label)
    assert perfect["low_tail"] == pytest.approx(0.0, abs=0.02) and perfect["high_tail"] == pytest.approx(1.0, abs=0.02)
    assert perfect["classes"]["2"]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert perfect["classes"]["2 core"]["voxels"] < perfect["classes"]["2"]["voxels"]

    dim = truth.copy()
    dim[label == 2] = 0.9                              # the lesion synthesised too dim, normal tissue exact
    d = diagnose_intensity.diagnose(truth, dim, label)
    on_truth_scale = (0.9 - np.percentile(truth[truth != 0], 0.5)) / (1.2 - np.percentile(truth[truth != 0], 0.5))
    assert d["classes"]["2"]["ratio"] == pytest.approx(on_truth_scale, abs=0.03)
    assert d["classes"]["0"]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert d["high_tail"] == pytest.approx(on_truth_scale, abs=0.03)     # its brightest 0.5 % is the dim lesion
    # the metric stretches the whole dim prediction: normal tissue is exact, yet the score drops far below the
    # score after the best affine map
    assert d["psnr"] < perfect["psnr"] - 10 and d["affine_psnr"] > d["psnr"] + 3

    _write(tmp_path / "truth", "c_0003.nii.gz", truth)
    _write(tmp_path / "labels", "c.nii.gz", label)
    _write(tmp_path / "dim", "c_0003.nii.gz", dim)
    res = diagnose_intensity.run(tmp_path / "truth", [tmp_path / "dim"], tmp_path / "labels")
    mean = res["folders"][str(tmp_path / "dim")]["mean"]
    assert mean["class_ratio"]["2"] == pytest.approx(d["classes"]["2"]["ratio"])
    no_labels = diagnose_intensity.run(tmp_path / "truth", [tmp_path / "dim"])
    assert no_labels["folders"][str(tmp_path / "dim")]["per_image"][0]["classes"] == {}


def test_training_step_profile_splits_data_from_step_and_names_the_convolutions(tmp_path):
    import profile_training_step
    from test_training_engine import make_preprocessed

    pre = make_preprocessed(tmp_path / "pre", n_cases=4)
    res = profile_training_step.profile(pre / "nnsynthPlans.json", "seq2seq", "2d", "0", steps=3, warmup=1,
                                        profile_steps=2)
    assert res["load_ms"] > 0 and res["step_ms"] > res["load_ms"]
    assert set(res["epoch_work_s"]) == {"validation_s", "progress_png_s", "checkpoint_s", "preview_png_s"}
    assert all(v > 0 for v in res["epoch_work_s"].values())
    convs = res["profile"]["convolutions_ms_per_step"]
    assert any(k.startswith("forward") for k in convs) and any(k.startswith("backward") for k in convs)
    # the convolutions are part of, and at most, the operator time of a step
    assert 0 < sum(convs.values()) <= res["profile"]["self_cpu_ms_per_step"]


def test_source_subset_ensemble_scores_every_combination_and_keeps_only_complete_cases(tmp_path):
    import source_subset_ensemble as sse

    rng = np.random.default_rng(2)
    truth = gaussian_filter(rng.random((8, 12, 12)), 1.5) + 0.5
    error = gaussian_filter(rng.standard_normal(truth.shape), 1.0) * 0.05
    members = {sse.ALL: truth + error, sse.member_name("T1"): truth - error, sse.member_name("T2"): truth + 3 * error}
    scores = sse.score_combinations([truth], [members])
    assert len(scores) == 7                            # 3 alone, 3 pairs, 1 triple
    assert scores[f"{sse.ALL} + without T1"] > scores[sse.ALL] + 20     # opposite errors cancel
    assert scores[sse.ALL] > scores["without T2"]

    for name in ("a_0000", "a_0001", "b_0000"):
        _write(tmp_path, f"{name}.nii.gz", truth)
    assert sse.complete_cases(tmp_path, {"T1": "0000", "T2": "0001"}, ".nii.gz") == ["a"]
