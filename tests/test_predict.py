"""nnsynth_predict and the Python API on a tiny model trained once per session (tests/helpers_model.py)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers_model import trained  # noqa: F401  (fixture)
from nnsynth.cli import predict as predict_cli
from nnsynth.inference.predictor import (ModelNotFoundError, Predictor, find_model_folder, predict_folder)

FLAIR = "0003"


def _case_arrays(folder: Path, case: str, slab: int = 6):
    """The case's images, cut to a slab of ``slab`` central slices to keep the tests fast."""
    out = {}
    for p in sorted(folder.glob(f"{case}_*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        z0 = a.shape[0] // 2 - slab // 2
        out[int(p.name[-11:-7])] = np.ascontiguousarray(a[z0:z0 + slab])
    return out


def _first_case(f) -> str:
    return sorted(p.name[:-12] for p in f["imagesTs"].glob("*_0000.nii.gz"))[0]


def _write(arr, path: Path, spacing, origin, direction=None):
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


@pytest.fixture
def geometry_inputs(trained, tmp_path):
    """Three cases without Flair: anisotropic 3D, oblique 3D, 2D (written with .nii.gz and .mha endings)."""
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained))
    folder = tmp_path / "in"
    for cid in (0, 1, 2):
        a = arrays[cid]
        _write(a, folder / f"aniso_{cid:04d}.nii.gz", (4.0, 3.5, 6.5), (10.0, -20.0, 5.0))
        _write(a, folder / f"oblique_{cid:04d}.nii.gz", (4.0, 4.0, 4.0), (-3.0, 7.0, 1.5),
               _rotation(0.3, -0.2, 0.5))
        _write(a[a.shape[0] // 2], folder / f"flat_{cid:04d}.mha", (3.0, 4.5), (1.0, 2.0),
               (math.cos(0.4), -math.sin(0.4), math.sin(0.4), math.cos(0.4)))
    return folder


def test_outputs_keep_geometry_anisotropic_oblique_2d(trained, geometry_inputs, tmp_path):
    out = tmp_path / "out"
    # exactly one trained model: -i -o -t needs nothing else
    rc = predict_cli.cli(["-i", str(geometry_inputs), "-o", str(out), "-t", "Flair", "--device", "cpu", "-np", "1"])
    assert rc == 0
    for case, ending in (("aniso", ".nii.gz"), ("oblique", ".nii.gz"), ("flat", ".mha")):
        ref = sitk.ReadImage(str(geometry_inputs / f"{case}_0000{ending}"))
        pred = sitk.ReadImage(str(out / f"{case}_{FLAIR}{ending}"))
        assert pred.GetSize() == ref.GetSize()
        assert pred.GetDimension() == ref.GetDimension()
        # NIfTI stores the orientation in float32 (quaternion): re-writing it is exact to ~1e-8, not bit for bit
        np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), rtol=0, atol=1e-6)
        assert pred.GetPixelID() == sitk.sitkFloat32
        arr = sitk.GetArrayFromImage(pred)
        src = sitk.GetArrayFromImage(ref)
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
        assert arr.max() > 0
        # background stays background: nothing outside the sources' nonzero box
        nz = np.nonzero(src)
        outside = np.ones(src.shape, bool)
        outside[tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)] = False
        assert np.all(arr[outside] == 0)
    record = json.loads((out / "nnsynth_predictions.json").read_text())
    assert record["cases"]["aniso"]["Flair"]["sources"] == ["T1", "T1Gd", "T2"]
    assert "encoded jointly" in record["multi_source_rule"]   # plans made by this version: network.joint_input
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_bad_cases_are_reported_and_skipped(trained, tmp_path):
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained))
    src = tmp_path / "in"
    geo = dict(spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0))
    _write(arrays[0], src / "good_0000.nii.gz", **geo)                        # one source is enough
    _write(arrays[0], src / "unknown_0000.nii.gz", **geo)
    _write(arrays[1], src / "unknown_0007.nii.gz", **geo)                     # channel 7 does not exist
    _write(arrays[0], src / "mismatch_0000.nii.gz", **geo)
    _write(arrays[1], src / "mismatch_0001.nii.gz", (4.0, 4.0, 5.0), (0.0, 0.0, 0.0))
    (src / "broken_0000.nii.gz").write_bytes(b"not an image")
    _write(arrays[0], src / "has_0000.nii.gz", **geo)
    _write(arrays[3], src / "has_0003.nii.gz", **geo)                         # Flair already there
    out = tmp_path / "out"
    predictor = Predictor(trained["model"], device="cpu", progress=False)
    report = predict_folder(predictor, src, out, "Flair")
    assert set(report.failed) == {"unknown", "mismatch", "broken"}
    assert "unknown sequence" in report.failed["unknown"] and "0007" in report.failed["unknown"]
    assert "geometry" in report.failed["mismatch"]
    assert "broken_0000" in report.failed["broken"]
    assert report.kept == {"has": ["Flair"]}
    assert (out / f"good_{FLAIR}.nii.gz").is_file()
    assert not (out / f"has_{FLAIR}.nii.gz").exists()                       # not overwritten / not written
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"good_{FLAIR}.nii.gz"]
    # the command exits non-zero with the summary, after predicting the good case
    rc = predict_cli.cli(["-i", str(src), "-o", str(tmp_path / "out2"), "-t", "Flair", "--device", "cpu",
                          "-np", "0"])
    assert rc == 1
    assert (tmp_path / "out2" / f"good_{FLAIR}.nii.gz").is_file()
    # an unknown target name is a user error of the whole command
    assert predict_cli.cli(["-i", str(src), "-o", str(tmp_path / "o3"), "-t", "PD", "--device", "cpu"]) == 1


def test_all_targets_parts_and_continue(trained, tmp_path):
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained))
    src = tmp_path / "in"
    geo = dict(spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0))
    for i, present in enumerate([(0, 1, 2), (2, 3), (0,)]):
        for cid in present:
            _write(arrays[cid], src / f"c{i}_{cid:04d}.nii.gz", **geo)
    predictor = Predictor(trained["model"], device="cpu", progress=False)
    out = tmp_path / "out"
    r0 = predict_folder(predictor, src, out, "all", num_parts=2, part_id=0)
    r1 = predict_folder(predictor, src, out, "all", num_parts=2, part_id=1)
    assert set(r0.predicted) | set(r1.predicted) == {"c0", "c1", "c2"}
    assert not set(r0.predicted) & set(r1.predicted)
    assert sorted(r0.predicted["c0"]) == ["Flair"] and sorted(r1.predicted["c1"]) == ["T1", "T1Gd"]
    assert sorted(p.name for p in out.glob("c2_*")) == ["c2_0001.nii.gz", "c2_0002.nii.gz", "c2_0003.nii.gz"]
    assert (out / "nnsynth_predictions_part0of2.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    (out / "c1_0000.nii.gz").unlink()                                        # "interrupted" mid-case
    again = predict_folder(predictor, src, out, "all", continue_prediction=True)
    assert sorted(again.skipped_done) == ["c0", "c2"] and list(again.predicted) == ["c1"]
    for name, m in mtimes.items():
        if not name.startswith("c1"):
            assert (out / name).stat().st_mtime_ns == m


def test_fold_ensemble_tta_and_maps(trained, tmp_path):
    model = tmp_path / "results" / "Dataset501_BrainDemo" / trained["model"].name
    shutil.copytree(trained["model"], model)
    shutil.copytree(model / "fold_0", model / "fold_1")                     # two identical folds
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained))
    img = {s: arrays[i] for i, s in enumerate(["T1", "T2"])}
    from nnsynth.dataset.io import Geometry
    geometry = Geometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), arrays[0].shape)
    one = Predictor(model, folds=[0], device="cpu", progress=False).predict_case(img, geometry, ["Flair"])
    both = Predictor(model, device="cpu", progress=False)
    assert both.folds == ["0", "1"]
    two = both.predict_case(img, geometry, ["Flair"], save_maps=True)
    np.testing.assert_allclose(two.predictions["Flair"], one.predictions["Flair"], atol=1e-5)
    assert set(two.maps) == {("T1", "differentiation"), ("T2", "differentiation")}
    for m in two.maps.values():
        assert m.shape == arrays[0].shape and m.dtype == np.float32 and m.min() >= 0
    tta = Predictor(model, folds=[0], device="cpu", tta=True, progress=False).predict_case(img, geometry, ["Flair"])
    diff = np.abs(tta.predictions["Flair"] - one.predictions["Flair"])
    assert tta.predictions["Flair"].shape == arrays[0].shape and 0 < diff.max() < 1
    # the CLI writes the maps in the case geometry under OUT/maps
    src = tmp_path / "in"
    for i in range(2):
        _write(arrays[i], src / f"m_{i:04d}.nii.gz", (4.0, 4.0, 6.0), (1.0, 2.0, 3.0))
    out = tmp_path / "out"
    assert predict_cli.cli(["-i", str(src), "-o", str(out), "-t", "Flair", "-m", str(model), "-f", "0",
                            "--device", "cpu", "--save-maps", "-np", "0"]) == 0
    maps = sorted(p.name for p in (out / "maps").glob("*.nii.gz"))
    assert maps == ["m_0000_differentiation.nii.gz", "m_0001_differentiation.nii.gz"]
    ref = sitk.ReadImage(str(src / "m_0000.nii.gz"))
    mimg = sitk.ReadImage(str(out / "maps" / maps[0]))
    assert mimg.GetSize() == ref.GetSize() and mimg.GetSpacing() == ref.GetSpacing()


def test_3d_model_sliding_window(trained, tmp_path):
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained))
    from nnsynth.dataset.io import Geometry
    geometry = Geometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), arrays[0].shape)
    p = Predictor(trained["model3d"], device="cpu", progress=False, step_size=0.5)
    assert p.spatial_dims == 3
    res = p.predict_case({"T2": arrays[2]}, geometry, ["T1"])
    assert res.predictions["T1"].shape == arrays[0].shape
    assert res.sources["T1"] == ["T2"]


def test_api_simpleitk_and_numpy(trained):
    from nnsynth.inference.api import SynthesisModel
    model = SynthesisModel.from_results(device="cpu")
    arrays = _case_arrays(trained["imagesTs"], _first_case(trained), slab=4)
    t1, t2 = (sitk.GetImageFromArray(arrays[i]) for i in (0, 2))
    for img in (t1, t2):
        img.SetSpacing((4.0, 4.0, 5.0))
        img.SetOrigin((3.0, -1.0, 2.0))
        img.SetDirection(_rotation(0.1, 0.0, 0.2))
    flair = model.predict({"T1": t1, "T2": t2}, target="flair")
    assert isinstance(flair, sitk.Image)
    assert flair.GetSize() == t1.GetSize() and flair.GetSpacing() == t1.GetSpacing()
    assert flair.GetOrigin() == t1.GetOrigin() and flair.GetDirection() == t1.GetDirection()
    every = model.predict({"T1": t1, "T2": t2}, target="all")
    assert sorted(every) == ["Flair", "T1Gd"]
    np.testing.assert_allclose(sitk.GetArrayFromImage(every["Flair"]), sitk.GetArrayFromImage(flair), atol=1e-6)
    from nnsynth.dataset.io import geometry_of
    arrays = model.predict_arrays({"T1": sitk.GetArrayFromImage(t1)}, geometry_of(t1), targets=["T2"])
    assert arrays["T2"].shape == sitk.GetArrayFromImage(t1).shape and arrays["T2"].dtype == np.float32
    with pytest.raises(Exception, match="nothing to synthesise"):
        model.predict({"T1": t1}, target="T1")


def test_model_discovery_errors(trained, tmp_path, monkeypatch):
    assert find_model_folder().path == trained["model"]
    assert find_model_folder(dataset=501, trainer="seq2seq", configuration="2d").path == trained["model"]
    with pytest.raises(ModelNotFoundError, match="No trained model"):
        find_model_folder(trainer="vq_seq2seq")
    root = tmp_path / "results"
    shutil.copytree(trained["results"], root)
    shutil.copytree(trained["model3d"], root / "Dataset501_BrainDemo" / trained["model3d"].name)
    monkeypatch.setenv("nnSynth_results", str(root))
    with pytest.raises(ModelNotFoundError, match="Several trained models"):
        find_model_folder()
    assert find_model_folder(configuration="3d").configuration == "3d"
    with pytest.raises(ModelNotFoundError, match="fold"):
        Predictor(trained["model"], folds=[3], device="cpu")
    monkeypatch.setenv("nnSynth_results", str(tmp_path / "empty"))
    assert predict_cli.cli(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-t", "Flair"]) == 1
