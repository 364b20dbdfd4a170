"""Fingerprint: counts, bounding boxes, pairing graph and intensity statistics on tiny datasets."""
from __future__ import annotations

import numpy as np
import pytest

from helpers_data import tiny_image, write_array, write_tiny_dataset
from nnsynth.planning.fingerprint import extract_fingerprint, intensity_statistics, pairing_graph

SEQS = ("T1", "T1Gd", "T2", "Flair")


def test_counts_bbox_and_stats_match_numpy(tmp_path):
    missing = {"case_001": ["T2"], "case_002": ["T1", "Flair"]}
    folder = write_tiny_dataset(tmp_path, cases=4, shape=(6, 8, 10), missing=missing)
    fp = extract_fingerprint(folder, progress=False)
    assert fp["num_cases"] == 4
    assert fp["sequence_counts"] == {"T1": 3, "T1Gd": 4, "T2": 3, "Flair": 3}
    assert fp["cases"]["case_002"]["sequences"] == ["T1Gd", "T2"]
    # tiny_image fills the centred box [s//4, s - s//4) of every axis
    assert fp["cases"]["case_000"]["bbox"] == [[1, 5], [2, 6], [2, 8]]
    assert fp["cases"]["case_000"]["shape_after_crop"] == [4, 4, 6]
    assert fp["cases"]["case_000"]["relative_size_after_crop"] == pytest.approx(96 / 480)
    assert fp["spacings"][0] == pytest.approx([1.5, 1.2, 1.0])  # array order (z, y, x) of spacing (1.0, 1.2, 1.5)
    # stats on the same voxels: a small dataset is sampled completely
    t2 = []
    for ci in (0, 1, 2, 3):
        if ci == 1:
            continue
        im = tiny_image((6, 8, 10), 100 * ci + 2)
        t2.append(im[im != 0])
    v = np.concatenate(t2).astype(np.float64)
    st = fp["intensity_statistics_per_sequence"]["T2"]
    assert st["num_cases"] == 3 and st["num_samples"] == v.size
    assert st["mean"] == pytest.approx(v.mean(), rel=1e-6)
    assert st["median"] == pytest.approx(np.median(v), rel=1e-6)
    assert st["std"] == pytest.approx(v.std(), rel=1e-5)
    assert st["min"] == pytest.approx(v.min()) and st["max"] == pytest.approx(v.max())
    assert st["percentile_00_5"] == pytest.approx(np.percentile(v, 0.5), rel=1e-6)
    assert st["percentile_99_5"] == pytest.approx(np.percentile(v, 99.5), rel=1e-6)


def test_sampling_is_bounded_and_seeded(tmp_path):
    folder = write_tiny_dataset(tmp_path, cases=3, shape=(6, 8, 10))
    a = extract_fingerprint(folder, max_voxels_total=40, progress=False)
    b = extract_fingerprint(folder, max_voxels_total=40, progress=False)
    total = sum(s["num_samples"] for s in a["intensity_statistics_per_sequence"].values())
    assert total <= 40
    assert a["intensity_statistics_per_sequence"] == b["intensity_statistics_per_sequence"]


def test_pairing_graph_direct_indirect_unreachable(tmp_path):
    # the VQ paper's unpaired setting: (T1,T1Gd), (T1Gd,T2), (T2,Flair), plus an isolated 5th sequence
    seqs = ("T1", "T1Gd", "T2", "Flair", "DWI")
    keep = {"a": {"T1", "T1Gd"}, "b": {"T1Gd", "T2"}, "c": {"T2", "Flair"}, "d": {"DWI"}}
    missing = {c: [s for s in seqs if s not in k] for c, k in keep.items()}
    folder = write_tiny_dataset(tmp_path, sequences=seqs, cases=list(keep), missing=missing)
    fp = extract_fingerprint(folder, progress=False)
    g = fp["pairing"]
    assert g["pair_counts"]["T1"]["T1Gd"] == 1 and g["pair_counts"]["T1"]["Flair"] == 0
    assert g["pair_counts"]["T2"]["T2"] == 2
    assert g["direct"]["T1Gd"] == ["T1", "T2"]
    assert g["indirect"]["T1"]["Flair"] == ["T1", "T1Gd", "T2", "Flair"]
    assert g["indirect"]["Flair"]["T1Gd"] == ["Flair", "T2", "T1Gd"]
    assert g["unreachable"]["T1"] == ["DWI"] and set(g["unreachable"]["DWI"]) == set(seqs[:4])


def test_pairing_graph_fully_paired():
    g = pairing_graph({"x": ["A", "B", "C"]}, ["A", "B", "C"])
    assert g["indirect"]["A"] == {} and g["unreachable"]["A"] == [] and g["direct"]["A"] == ["B", "C"]


def test_2d_images(tmp_path):
    folder = tmp_path / "Dataset502_Flat"
    for c in range(2):
        for s in range(2):
            write_array(tiny_image((12, 16), c * 10 + s), folder / "imagesTr" / f"c{c}_{s:04d}.nii.gz",
                        spacing=(0.5, 0.7), origin=(0.0, 0.0))
    (folder / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2"}, "numTraining": 2, '
                                         '"file_ending": ".nii.gz"}')
    fp = extract_fingerprint(folder, progress=False)
    assert fp["is_2d"]
    assert fp["cases"]["c0"]["shape"] == [1, 12, 16]
    assert fp["spacings"][0][1:] == pytest.approx([0.7, 0.5]) and fp["spacings"][0][0] > 100


def test_intensity_statistics_empty():
    assert intensity_statistics(np.zeros(0))["mean"] == 0.0
