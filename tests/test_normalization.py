"""Intensity normalisation schemes (nnsynth/preprocessing/normalization.py): median_anchor keeps normal tissue at
one normalised level whatever the lesion, percentile_clip does not; fallbacks; planning and preprocessing use it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_data import write_tiny_dataset
from nnsynth.cli.plan_and_preprocess import cli
from nnsynth.exceptions import PlansError
from nnsynth.planning.planner import DefaultPlanner
from nnsynth.preprocessing import storage
from nnsynth.preprocessing.normalization import (MEDIAN_ANCHOR_MAX_RATIO, anchor_ratio, anchor_statistics,
                                                 case_bounds, check_scheme, denormalize, normalize,
                                                 percentile_bounds, plan_normalization)


def _brain(lesion_fraction: float, seed: int = 0) -> np.ndarray:
    """Background 0, 'tissue' around 100 (+-5 %), a bright lesion (300) over ``lesion_fraction`` of the brain."""
    rng = np.random.default_rng(seed)
    img = np.zeros((20, 30, 30), np.float32)
    brain = rng.normal(100.0, 5.0, (20, 24, 24)).astype(np.float32)
    n = int(lesion_fraction * brain.size)
    brain.reshape(-1)[:n] = 300.0
    img[:, 3:27, 3:27] = brain
    return img


def test_anchor_statistics_and_ratio():
    v = np.concatenate([np.zeros(50), np.arange(1, 201, dtype=float)])
    st = anchor_statistics(v)
    assert st["median"] == pytest.approx(100.5)
    assert st["lower"] == pytest.approx(np.percentile(np.arange(1, 201), 0.5))
    assert st["upper"] == pytest.approx(np.percentile(np.arange(1, 201), 99.5))
    assert anchor_ratio(st) == pytest.approx((st["upper"] - st["lower"]) / (st["median"] - st["lower"]))
    assert anchor_ratio({"lower": 5.0, "median": 5.0, "upper": 9.0}) is None
    assert anchor_statistics(np.zeros(10)) == {"lower": 0.0, "median": 0.0, "upper": 0.0}


def test_plan_takes_the_largest_training_ratio_and_falls_back_per_sequence():
    cases = [{"A": {"lower": 0, "median": 10, "upper": 15}, "B": {"lower": 0, "median": 1, "upper": 50}},
             {"A": {"lower": 0, "median": 10, "upper": 25}},
             {"A": {"lower": 2, "median": 2, "upper": 9}}]           # unusable spread: ignored
    scheme = plan_normalization(cases, ["A", "B", "C"])
    assert scheme["scheme"] == "median_anchor"
    assert scheme["upper_ratio"] == {"A": 2.5, "B": None, "C": None}   # B: 50 > MEDIAN_ANCHOR_MAX_RATIO
    assert 50 > MEDIAN_ANCHOR_MAX_RATIO
    assert check_scheme(scheme) == scheme
    for bad in ({"scheme": "zscore"}, {"scheme": "median_anchor"}, {"scheme": "median_anchor", "upper_ratio": {"A": 0.5}}):
        with pytest.raises(PlansError):
            check_scheme(bad)


def test_median_anchor_keeps_tissue_level_whatever_the_lesion():
    small, large = _brain(0.002, 1), _brain(0.2, 2)
    scheme = plan_normalization([{"F": anchor_statistics(small)}, {"F": anchor_statistics(large)}], ["F"])
    levels = {}
    for name, scheme_used in (("percentile", None), ("median", scheme)):
        out = []
        for img in (small, large):
            lo, hi = case_bounds(img, "F", scheme_used)
            x = normalize(img, img != 0, lo, hi)
            tissue = (img > 0) & (img < 200)
            out.append(float(np.median(x[tissue])))
        levels[name] = out
    # per-image percentiles: the large lesion pushes tissue down to a different level
    assert abs(levels["percentile"][0] - levels["percentile"][1]) > 0.1
    # median anchor: tissue lands at ~1 / ratio in both (the large lesion moves the median a little)
    assert abs(levels["median"][0] - levels["median"][1]) < 0.05, levels
    # no training image is clipped beyond its own 99.5th percentile: the lesion stays below or at 1
    lo, hi = case_bounds(large, "F", scheme)
    assert hi >= percentile_bounds(large)[1] - 1e-3


def test_case_bounds_fallbacks_and_round_trip():
    img = _brain(0.05)
    scheme = {"scheme": "median_anchor", "percentiles": [0.5, 99.5], "range": [0, 1], "upper_ratio": {"F": 2.0, "G": None}}
    st = anchor_statistics(img)
    assert case_bounds(img, "F", scheme) == pytest.approx((st["lower"], st["lower"] + 2.0 * (st["median"] - st["lower"])))
    assert case_bounds(img, "G", scheme) == percentile_bounds(img)          # null ratio
    assert case_bounds(img, "unknown", scheme) == percentile_bounds(img)
    flat = np.full((4, 4), 7.0, np.float32)
    assert case_bounds(flat, "F", scheme) == (7.0, 8.0)                       # median == lower
    lo, hi = case_bounds(img, "F", scheme)
    x = normalize(img, img != 0, lo, hi)
    inside = (img > lo) & (img < hi)
    np.testing.assert_allclose(denormalize(x, lo, hi)[inside], img[inside], rtol=1e-4)


def test_planning_and_preprocessing_use_median_anchor(nnsynth_folders):
    write_tiny_dataset(nnsynth_folders["raw"], cases=4, shape=(8, 12, 10), labels=True)
    assert cli(["-d", "501", "-c", "2d", "--device", "cpu", "--no-progress"]) == 0
    out = nnsynth_folders["preprocessed"] / "Dataset501_Tiny"
    plans = json.loads((out / "nnsynthPlans.json").read_text())
    fp = json.loads((out / "dataset_fingerprint.json").read_text())
    norm = plans["normalization"]
    assert norm["scheme"] == "median_anchor" and set(norm["upper_ratio"]) == set(plans["sequences"])
    for seq, r in norm["upper_ratio"].items():
        ratios = [anchor_ratio(c["intensity"][seq]) for c in fp["cases"].values() if seq in c["intensity"]]
        assert r == pytest.approx(max(ratios), rel=1e-5)
    data, _, props = storage.load_case(out / "nnsynthPlans_2d", "case_000")
    for c, seq in enumerate(plans["sequences"]):
        b = props["normalization"][seq]
        assert b["upper"] > b["lower"] and 0.0 <= data[c].min() and data[c].max() <= 1.0
    # a fingerprint from before per-case intensities existed plans percentile clipping
    for c in fp["cases"].values():
        c.pop("intensity")
    assert DefaultPlanner(fp, "Dataset501_Tiny", device="cpu").plan()["normalization"]["scheme"] == "percentile_clip"
