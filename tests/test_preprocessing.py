"""Preprocessing end to end (CLI), idempotent re-runs, workers, and the preprocess -> revert round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_data import tree_snapshot, write_tiny_dataset
from nnsynth.cli.plan_and_preprocess import cli
from nnsynth.dataset.io import Geometry
from nnsynth.planning.planner import DefaultPlanner
from nnsynth.preprocessing import storage
from nnsynth.preprocessing.normalization import denormalize, normalize, percentile_bounds
from nnsynth.preprocessing.preprocessor import preprocess_case, revert_preprocessing
from nnsynth.preprocessing.resampling import resample_image, separate_axis

MISSING = {"case_001": ["T2"], "case_002": ["T1", "Flair"]}


def _dataset(folders, **kw):
    kw.setdefault("cases", 4)
    kw.setdefault("shape", (8, 12, 10))
    kw.setdefault("missing", MISSING)
    return write_tiny_dataset(folders["raw"], labels=True, **kw)


def test_cli_end_to_end_and_reruns(nnsynth_folders):
    _dataset(nnsynth_folders)
    assert cli(["-d", "501", "--device", "cpu", "--no-progress"]) == 0
    out = nnsynth_folders["preprocessed"] / "Dataset501_Tiny"
    for name in ("dataset.json", "dataset_fingerprint.json", "nnsynthPlans.json"):
        assert (out / name).is_file()
    plans = json.loads((out / "nnsynthPlans.json").read_text())
    assert plans["compute"]["device"] == "cpu" and set(plans["configurations"]) == {"2d", "3d"}
    for conf in ("nnsynthPlans_2d", "nnsynthPlans_3d"):
        folder = out / conf
        assert storage.list_cases(folder) == [f"case_{i:03d}" for i in range(4)]
        data, seg, props = storage.load_case(folder, "case_002")
        assert data.dtype == np.float32 and seg.dtype == np.int8
        assert data.shape[0] == 4 and seg.shape == (1,) + data.shape[1:]
        assert props["available"] == [False, True, True, False]
        assert not data[0].any() and not data[3].any()
        assert set(props["normalization"]) == {"T1Gd", "T2"}
        assert data.min() >= 0.0 and data.max() <= 1.0 and data[1].max() == pytest.approx(1.0)
        assert (data[:, seg[0] == -1] == 0).all()
        assert set(np.unique(seg)) <= {-1, 0, 1, 2, 3}
        assert props["shape_after_cropping_and_before_resampling"] == [4, 6, 6]
        assert props["has_label"] and props["shape_before_cropping"] == [8, 12, 10]

    # re-run: nothing is rewritten
    before = tree_snapshot(out / "nnsynthPlans_2d")
    assert cli(["-d", "501", "--device", "cpu", "--no-progress"]) == 0
    assert tree_snapshot(out / "nnsynthPlans_2d") == before

    # simulated interruption: a case without its .json is redone, only that one
    (out / "nnsynthPlans_2d" / "case_001.json").unlink()
    assert cli(["-d", "501", "-c", "2d", "--device", "cpu", "--no-progress"]) == 0
    after = tree_snapshot(out / "nnsynthPlans_2d")
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("case_001") for k in changed)

    # an override that changes preprocessing (spacing) redoes everything; batch size alone does not
    assert cli(["-d", "501", "-c", "2d", "--device", "cpu", "--no-progress", "--overwrite",
                "2d.batch_size=3"]) == 0
    assert tree_snapshot(out / "nnsynthPlans_2d") == after
    # --clean redoes all
    assert cli(["-d", "501", "-c", "2d", "--device", "cpu", "--no-progress", "--clean"]) == 0
    cleaned = tree_snapshot(out / "nnsynthPlans_2d")
    assert all(cleaned[k] != after[k] for k in cleaned if k.endswith(".json"))


def test_workers_give_identical_arrays(nnsynth_folders, tmp_path, monkeypatch):
    _dataset(nnsynth_folders, shape=(10, 14, 12))
    assert cli(["-d", "501", "-c", "3d", "--device", "cpu", "-np", "0", "--no-progress"]) == 0
    out = nnsynth_folders["preprocessed"] / "Dataset501_Tiny"
    ref = {c: storage.load_case(out / "nnsynthPlans_3d", c)[:2] for c in storage.list_cases(out / "nnsynthPlans_3d")}
    monkeypatch.setenv("nnSynth_preprocessed", str(tmp_path / "pre2"))
    assert cli(["-d", "501", "-c", "3d", "--device", "cpu", "-np", "2", "--no-progress"]) == 0
    out2 = tmp_path / "pre2" / "Dataset501_Tiny" / "nnsynthPlans_3d"
    assert storage.list_cases(out2) == sorted(ref)
    for c, (d, s) in ref.items():
        d2, s2, _ = storage.load_case(out2, c)
        np.testing.assert_array_equal(d, d2)
        np.testing.assert_array_equal(s, s2)


def test_verify_reports_bad_cases_and_writes_nothing(nnsynth_folders):
    folder = _dataset(nnsynth_folders)
    (folder / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"not an image")
    assert cli(["-d", "501", "--verify", "--device", "cpu", "--no-progress"]) == 1
    assert not (nnsynth_folders["preprocessed"] / "Dataset501_Tiny" / "nnsynthPlans_2d").exists()
    # without --verify the bad case is reported as failed, the others are done
    assert cli(["-d", "501", "-c", "2d", "--device", "cpu", "--no-progress"]) == 1


def test_plan_only_and_2d_images(nnsynth_folders):
    from helpers_data import tiny_image, write_array
    folder = nnsynth_folders["raw"] / "Dataset502_Flat"
    for c in range(3):
        for s in range(2):
            write_array(tiny_image((20, 16), c * 10 + s), folder / "imagesTr" / f"c{c}_{s:04d}.nii.gz",
                        spacing=(0.5, 0.7), origin=(1.0, 2.0))
    (folder / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2"}, "numTraining": 3, '
                                         '"file_ending": ".nii.gz"}')
    assert cli(["-d", "502", "--device", "cpu", "--no-progress", "--no-preprocess"]) == 0
    out = nnsynth_folders["preprocessed"] / "Dataset502_Flat"
    assert (out / "nnsynthPlans.json").is_file() and not (out / "nnsynthPlans_2d").exists()
    assert cli(["-d", "502", "--device", "cpu", "--no-progress"]) == 0
    plans = json.loads((out / "nnsynthPlans.json").read_text())
    assert list(plans["configurations"]) == ["2d"]
    data, seg, props = storage.load_case(out / "nnsynthPlans_2d", "c0")
    assert data.shape == (2, 1, 10, 8) and props["is_2d"]
    back = revert_preprocessing(data[1], props, plans, "2d")
    assert back.shape == (20, 16)


def _smooth_brain(shape, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    img = (100 + 40 * np.sin(2 * y) + 30 * x + 20 * z + rng.normal(0, 0.1, shape)) * (r < 0.8)
    return img.astype(np.float32)


def _plans_for(spacing_array_order, shape, n_seq=2, device="cpu"):
    fp = {"sequences": ["T1", "T2", "FLAIR"][:n_seq], "channel_ids": list(range(n_seq)), "num_cases": 4,
          "is_2d": False, "spacings": [list(spacing_array_order)] * 4, "shapes_after_crop": [list(shape)] * 4}
    return DefaultPlanner(fp, "Dataset999_X", device=device, memory_gb=4).plan()


@pytest.mark.parametrize("spacing_xyz,direction,target", [
    ((1.0, 1.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), None),  # 1x1x5 mm, through-plane = array axis 0
    ((4.0, 0.8, 0.8), (0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1), None),  # coarse x axis, oblique: transposed
    ((1.0, 1.0, 1.0), (0, 0, 1, 0, 1, 0, 1, 0, 0), [1.3, 1.1, 0.9]),  # iso, resampled, permuted direction
])
def test_round_trip_preprocess_revert(spacing_xyz, direction, target):
    shape = (16, 28, 24)
    geom = Geometry(spacing_xyz, (3.0, -2.0, 7.5), tuple(float(d) for d in direction), shape)
    plans = _plans_for(geom.spacing_array_order, shape)
    if target is not None:
        for conf in plans["configurations"].values():
            conf["spacing"] = target
    images = [_smooth_brain(shape, 0), None]
    for name in ("3d", "2d"):
        data, seg, props = preprocess_case(images, geom, plans, name, case="x")
        assert props["available"] == [True, False] and not data[1].any()
        assert data.min() >= 0 and data.max() <= 1
        assert (seg == -1).any() and (seg == 0).any() and (data[:, seg[0] == -1] == 0).all()
        back = revert_preprocessing(data[0], props, plans, name)
        assert back.shape == shape
        assert Geometry.from_dict(props["original_geometry"]) == geom
        lo, hi = props["normalization"]["T1"]["lower"], props["normalization"]["T1"]["upper"]
        mask = images[0] != 0
        expected = normalize(images[0], mask, lo, hi)
        # compare away from the mask edge (interpolation at the border is not invertible)
        from scipy.ndimage import binary_erosion
        inner = binary_erosion(mask, iterations=2)
        err = np.abs(back - expected)[inner]
        assert err.mean() < 0.03, (name, err.mean())
        assert np.abs(back[~binary_dilation_(mask)]).max() < 0.1  # only cubic ringing near the edge
    if spacing_xyz[0] == 4.0:
        assert plans["transpose_forward"] == [2, 0, 1]
        assert props["spacing"][0] == pytest.approx(4.0)
        assert separate_axis(props["spacing_before_resampling"], props["spacing"]) == 0


def binary_dilation_(mask):
    from scipy.ndimage import binary_dilation
    return binary_dilation(mask, iterations=2)


def test_anisotropic_resampling_uses_order_0_through_plane():
    img = np.zeros((4, 8, 8), np.float32)
    img[1] = 1.0  # one thick slice
    out = resample_image(img, (8, 8, 8), order=3, separate=0, order_separate=0)
    assert set(np.unique(out)) <= {0.0, 1.0}  # nearest through-plane: no blending of slices
    smooth = resample_image(img, (8, 8, 8), order=3)
    assert len(np.unique(np.round(smooth, 4))) > 2


def test_normalization_round_trip():
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 50.0, (6, 7, 8)).astype(np.float32)
    img[:, :2] = 0
    lo, hi = percentile_bounds(img)
    mask = img != 0
    x = normalize(img, mask, lo, hi)
    assert x.min() == 0 and x.max() == 1 and (x[~mask] == 0).all()
    inside = mask & (img > lo) & (img < hi)
    np.testing.assert_allclose(denormalize(x, lo, hi)[inside], img[inside], rtol=1e-4)
    assert percentile_bounds(np.full((3, 3), 5.0, np.float32)) == (5.0, 6.0)
