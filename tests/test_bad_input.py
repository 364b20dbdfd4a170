"""Bad input at every entry point.

Property-based (hypothesis): arbitrary junk in dataset.json, file names, geometries, plan overrides and dataset
ids gives an nnsynth error with a message (or a correct result), never another exception or a hang.
Example-based: awkward images (NaN/Inf, constant, smaller than the patch, strongly anisotropic, 2D mixed with 3D,
int16/uint8/float64, oblique directions) either work end to end (checked) or are refused with a clear message.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_data import tiny_image, write_array, write_tiny_dataset
from helpers_model import trained  # noqa: F401  (fixture)
from nnsynth.dataset.cases import image_filename, parse_image_filename
from nnsynth.dataset.dataset_json import load_dataset_spec, parse_dataset_json_dict
from nnsynth.dataset.io import Geometry, read_image
from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.constants import SUPPORTED_FILE_ENDINGS

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# dataset.json-shaped junk: the real keys with arbitrary values, plus random extra keys
channel_names = st.dictionaries(st.text(alphabet="0123456789 x-٣", max_size=5), json_scalars, max_size=5)
dataset_dicts = st.fixed_dictionaries({}, optional={
    "channel_names": channel_names | json_values, "numTraining": json_scalars,
    "file_ending": st.sampled_from(list(SUPPORTED_FILE_ENDINGS) + [".png", "", "nii.gz"]) | json_scalars,
    "labels": st.dictionaries(st.text(max_size=6), json_scalars | st.lists(st.integers(0, 3)), max_size=4)
    | json_values}) | json_values




# ================================================================================================================
# property-based
# ================================================================================================================
@PROPERTY
@given(dataset_dicts)
def test_dataset_json_junk_gives_problems_or_a_valid_spec(d):
    spec, problems = parse_dataset_json_dict(d, "dataset.json")
    assert (spec is None) == bool(problems)
    assert all(isinstance(p, str) and p.startswith("dataset.json") for p in problems)
    if spec is not None:
        assert len(spec.channel_names) >= 2 and spec.file_ending in SUPPORTED_FILE_ENDINGS
        assert isinstance(spec.num_training, int) and spec.num_training >= 0
        assert len({n.lower() for n in spec.sequences}) == len(spec.sequences)


@PROPERTY
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_dataset_json_file_junk_gives_a_dataset_format_error(content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "dataset.json").write_bytes(content)
        try:
            spec = load_dataset_spec(folder)
        except NnsynthError as e:
            assert "dataset.json" in str(e)
        else:
            assert len(spec.channel_names) >= 2


@PROPERTY
@given(st.text(max_size=30), st.sampled_from(SUPPORTED_FILE_ENDINGS))
def test_case_name_parsing_round_trips(name, ending):
    parsed = parse_image_filename(name, ending)
    if parsed is not None:
        case, cid = parsed
        assert 0 <= cid <= 9999 and case
        assert image_filename(case, cid, ending) == name       # nothing is silently reinterpreted


@PROPERTY
@given(st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s and s not in (".", "..")),
       st.integers(0, 9999), st.sampled_from(SUPPORTED_FILE_ENDINGS))
def test_case_names_survive_a_round_trip(case, cid, ending):
    assert parse_image_filename(image_filename(case, cid, ending), ending) == (case, cid)


def test_non_ascii_digits_are_not_a_channel_id():
    assert parse_image_filename("case_\u0663\u0663\u0663\u0663.nii.gz", ".nii.gz") is None   # Arabic-Indic 3333


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def geometries(draw):
    nd = draw(st.sampled_from([2, 3]))
    return Geometry(tuple(draw(st.lists(floats, min_size=nd, max_size=nd))),
                    tuple(draw(st.lists(floats, min_size=nd, max_size=nd))),
                    tuple(draw(st.lists(floats, min_size=nd * nd, max_size=nd * nd))),
                    tuple(draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd))))


@PROPERTY
@given(geometries(), geometries())
def test_geometry_check_never_raises(a, b):
    why = a.mismatch(b)
    assert isinstance(why, str)
    if a == b and all(math.isfinite(x) for x in a.spacing + a.origin + a.direction):
        assert why == ""
    if a.shape != b.shape:
        assert why.startswith("shape")


def _small_plans():
    from nnsynth.planning.planner import DefaultPlanner
    fp = {"sequences": ["T1", "T2"], "channel_ids": [0, 1], "num_cases": 4, "is_2d": False,
          "spacings": [[1.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[20, 24, 24]] * 4}
    return DefaultPlanner(fp, "Dataset999_T", device="cpu", memory_gb=8.0).plan()


PLANS = _small_plans()
override_keys = st.sampled_from(["latent_dim", "2d.batch_size", "3d.patch_size", "training.lr", "amp",
                                 "training.schedule", "vq", "2d", "configurations", "fsq.levels", "x.y", ""]) | \
    st.text(max_size=15)
override_values = st.sampled_from(["4", "[64,64]", "true", "abc", "NaN", "Infinity", "-1e999", "{}", "null",
                                   "[1, \"a\"]", "", "[]", "3.5"]) | st.text(max_size=10)


@PROPERTY
@given(st.lists(st.tuples(override_keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20),
                min_size=1, max_size=3))
def test_plan_overrides_junk_gives_a_plans_error(overrides):
    try:
        out = apply_overrides_checked(overrides)
    except PlansError as e:
        assert str(e)
        return
    json.dumps(out, allow_nan=False)           # what is accepted stays valid, finite JSON
    assert set(out["configurations"]) == set(PLANS["configurations"])


def apply_overrides_checked(overrides):
    from nnsynth.planning.plans import apply_overrides
    return apply_overrides(PLANS, overrides)


@pytest.mark.parametrize("item,message", [
    ("2d.batch_size=abc", "expects a number"), ("training.lr=NaN", "finite"), ("amp=1", "true or false"),
    ("3d.patch_size=64", "expects a list"), ("2d.patch_size=[\"a\", 2]", "list of finite numbers"),
    ("training.schedule=3", "text value"), ("configurations={}", "is a section"),
    ("2d.network={\"norm\": \"batch\"}", "is a section")])
def test_plan_overrides_of_the_wrong_kind_are_refused(item, message):
    with pytest.raises(PlansError, match=message):
        apply_overrides_checked([item])


@PROPERTY
@given(st.text(max_size=20) | st.integers(-10 ** 6, 10 ** 6))
def test_dataset_ids_junk_gives_an_nnsynth_error(ident):
    from nnsynth import paths
    try:
        name = paths.resolve_dataset_name(ident)
    except NnsynthError as e:
        assert str(e)
    else:
        pytest.fail(f"{ident!r} resolved to {name} although no dataset exists")


# ================================================================================================================
# awkward images
# ================================================================================================================
def _dataset_with(tmp: Path, extra_case) -> Path:
    ds = write_tiny_dataset(tmp / "raw", sequences=("T1", "T2"), cases=3, shape=(6, 10, 12))
    extra_case(ds / "imagesTr")
    spec = json.loads((ds / "dataset.json").read_text())
    spec["numTraining"] = 4
    (ds / "dataset.json").write_text(json.dumps(spec))
    return ds


@pytest.mark.parametrize("bad,message", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_and_inf_are_refused_everywhere(tmp_path, monkeypatch, logs, bad, message):
    def extra(folder: Path) -> None:
        for c in (0, 1):
            arr = tiny_image((6, 10, 12), 7 + c)
            if c == 1:
                arr[3, 5, 5] = bad
            write_array(arr, folder / f"bad_{c:04d}.nii.gz")
    ds = _dataset_with(tmp_path, extra)
    with pytest.raises(NnsynthError, match=message):
        read_image(ds / "imagesTr" / "bad_0001.nii.gz")
    from nnsynth.dataset.validation import validate_dataset
    report = validate_dataset(ds)
    assert any("bad_0001.nii.gz" in p and message in p for p in report.problems)
    from nnsynth.cli.plan_and_preprocess import cli
    monkeypatch.setenv("nnSynth_raw", str(tmp_path / "raw"))
    assert cli(["-d", "501", "-c", "2d", "-np", "0", "--no-progress", "--device", "cpu"]) == 1
    assert "bad_0001.nii.gz" in logs() and message in logs() and "Traceback" not in logs()


def test_2d_and_3d_mixed_in_one_dataset_are_refused(tmp_path, monkeypatch, logs):
    def extra(folder: Path) -> None:
        for c in (0, 1):
            write_array(tiny_image((10, 12), 30 + c), folder / f"flat_{c:04d}.nii.gz")
    ds = _dataset_with(tmp_path, extra)
    from nnsynth.dataset.validation import validate_dataset
    problems = validate_dataset(ds).problems
    assert any("mixes 2D cases (flat)" in p and "separate datasets" in p for p in problems)
    from nnsynth.cli.plan_and_preprocess import cli
    monkeypatch.setenv("nnSynth_raw", str(tmp_path / "raw"))
    assert cli(["-d", "501", "-np", "0", "--no-progress", "--device", "cpu"]) == 1
    assert "mix 2D images (flat) and 3D images (case_000, case_001, case_002)" in logs()


def test_awkward_training_cases_preprocess_correctly(tmp_path, monkeypatch):
    """int16 / uint8 / float64 files, a constant sequence, a case smaller than the patch, an oblique one."""
    c, s = math.cos(0.4), math.sin(0.4)
    oblique = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)

    def extra(folder: Path) -> None:
        for ci, (name, dtype, shape) in enumerate([("i16", np.int16, (6, 10, 12)), ("u8", np.uint8, (6, 10, 12)),
                                                   ("f64", np.float64, (6, 10, 12)), ("const", np.float32, (6, 10, 12)),
                                                   ("tiny", np.float32, (2, 3, 3)), ("obl", np.float32, (6, 10, 12))]):
            for si in range(2):
                arr = tiny_image(shape, 50 + 10 * ci + si)
                if name == "const" and si == 1:
                    arr = np.full(shape, 7.0, np.float32)
                write_array(arr.astype(dtype), folder / f"{name}_{si:04d}.nii.gz",
                            direction=oblique if name == "obl" else None)
    ds = _dataset_with(tmp_path, extra)
    spec = json.loads((ds / "dataset.json").read_text())
    spec["numTraining"] = 9
    (ds / "dataset.json").write_text(json.dumps(spec))
    from nnsynth.dataset.validation import validate_dataset
    assert validate_dataset(ds).ok
    monkeypatch.setenv("nnSynth_raw", str(tmp_path / "raw"))
    from nnsynth.cli.plan_and_preprocess import cli
    assert cli(["-d", "501", "-np", "0", "--no-progress", "--device", "cpu"]) == 0
    from nnsynth import paths
    from nnsynth.preprocessing.storage import list_cases, load_case
    pre = paths.preprocessed_folder() / "Dataset501_Tiny"
    plans = json.loads((pre / "nnsynthPlans.json").read_text())
    for conf in ("2d", "3d"):
        folder = pre / plans["configurations"][conf]["data_identifier"]
        assert len(list_cases(folder)) == 9
        for case in list_cases(folder):
            data, seg, props = load_case(folder, case)
            assert data.dtype == np.float32 and np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
            assert (data[:, seg[0] < 0] == 0).all()
        data, _, props = load_case(folder, "const")
        assert props["normalization"]["T2"]["upper"] > props["normalization"]["T2"]["lower"]
        assert (data[1] == 0).all()                            # constant image: no contrast, no NaN
        _, _, props = load_case(folder, "obl")
        assert props["original_geometry"]["direction"] == pytest.approx(list(oblique))
    # a case smaller than the patch still gives full patches (zero-padded) to the trainer
    from nnsynth.training.dataloading import CaseStore, SynthesisSampler
    conf = plans["configurations"]["3d"]
    store = CaseStore(pre / conf["data_identifier"], ["tiny"])
    sampler = SynthesisSampler(store, ["tiny"], conf["patch_size"], 3, 1, 2, seed=0)
    batch = sampler.next_batch()
    assert list(batch["source"].shape[2:]) == list(conf["patch_size"])
    assert torch.isfinite(batch["source"]).all()


def test_full_volume_validation_handles_volumes_smaller_than_the_patch():
    """The engine's 3D full-volume synthesis (nnsynth_predict's sliding window) runs whole patches, padding
    small volumes (was a crash)."""
    from nnsynth.training.engine import TrainingEngine

    class Stub:
        spatial_dims, device, config = 3, torch.device("cpu"), {"patch_size": [8, 8, 8]}
        network = torch.nn.Identity()
        shapes = []

        def synthesize_slices(self, sources, target):
            x = next(iter(sources.values()))
            self.shapes.append(tuple(x.shape[2:]))
            return x

    data = np.random.default_rng(0).random((2, 3, 5, 20)).astype(np.float32)
    stub = Stub()
    out = TrainingEngine.synthesize_volume(stub, data, [0], 1)
    assert set(stub.shapes) == {(8, 8, 8)}
    np.testing.assert_allclose(out, data[0], atol=1e-6)          # Gaussian blending of the same values


def _case_files(src: Path, dst: Path, name: str, transform=None, keep=(0, 1, 2)) -> None:
    """Copy a demo test case's T1/T1Gd/T2 under ``name``, optionally changing array and geometry."""
    for cid in keep:
        img = sitk.ReadImage(str(src.parent / f"{src.name}_{cid:04d}.nii.gz"))
        if transform is not None:
            img = transform(img)
        sitk.WriteImage(img, str(dst / f"{name}_{cid:04d}.nii.gz"))


def test_prediction_of_awkward_inputs_works_or_is_refused_clearly(trained, tmp_path, logs):
    case = trained["imagesTs"] / sorted({p.name[:-12] for p in trained["imagesTs"].iterdir()})[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()

    def cast(dtype):
        def f(img):
            arr = sitk.GetArrayFromImage(img)
            if np.issubdtype(dtype, np.integer):
                arr = arr / arr.max() * (np.iinfo(dtype).max - 1)
            new = sitk.GetImageFromArray(arr.astype(dtype))
            new.CopyInformation(img)
            return new
        return f

    def oblique(img):
        c, s = math.cos(0.3), math.sin(0.3)
        img = sitk.Image(img)
        img.SetDirection((c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c))
        return img

    def aniso(img):
        arr = sitk.GetArrayFromImage(img)[::6]                   # thick slices: 4 x 24 mm
        new = sitk.GetImageFromArray(arr)
        new.SetSpacing((4.0, 4.0, 24.0))
        return new

    def tiny(img):
        arr = sitk.GetArrayFromImage(img)[8:11, 10:14, 8:12]    # 3 x 4 x 4 voxels, far below the patch
        new = sitk.GetImageFromArray(arr)
        new.SetSpacing(img.GetSpacing())
        return new

    def flat(img):
        arr = sitk.GetArrayFromImage(img)
        new = sitk.GetImageFromArray(arr[arr.shape[0] // 2])    # a single 2D slice
        new.SetSpacing(img.GetSpacing()[:2])
        return new

    def constant(img):
        arr = sitk.GetArrayFromImage(img)
        new = sitk.GetImageFromArray(np.where(arr > 0, 5.0, 0.0).astype(np.float32))
        new.CopyInformation(img)
        return new

    def with_nan(img):
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        arr[arr.shape[0] // 2, 5, 5] = np.nan
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(img)
        return new

    works = {"i16": cast(np.int16), "u8": cast(np.uint8), "f64": cast(np.float64), "oblique": oblique,
             "aniso": aniso, "tiny": tiny, "flat": flat, "constant": constant}
    for name, fn in works.items():
        _case_files(case, inp, name, fn)
    nan_image = with_nan(sitk.ReadImage(str(case.parent / f"{case.name}_0000.nii.gz")))
    sitk.WriteImage(nan_image, str(inp / "nan_0000.mha"))

    from nnsynth.cli.predict import cli
    assert cli(["-i", str(inp), "-o", str(out), "-t", "Flair", "--device", "cpu", "-np", "0", "--no-progress"]) == 1
    assert "FAILED nan: " in logs() and "NaN" in logs() and "Traceback" not in logs()
    assert f"{len(works)} case(s) predicted" in logs()
    for name in works:
        src = sitk.ReadImage(str(inp / f"{name}_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / f"{name}_0003.nii.gz"))
        assert pred.GetSize() == src.GetSize() and pred.GetDimension() == src.GetDimension()
        assert np.allclose(pred.GetSpacing(), src.GetSpacing()) and np.allclose(pred.GetOrigin(), src.GetOrigin())
        assert np.allclose(pred.GetDirection(), src.GetDirection())
        assert pred.GetPixelID() == sitk.sitkFloat32
        arr = sitk.GetArrayFromImage(pred)
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
        assert (arr[sitk.GetArrayFromImage(src) == 0] == 0).all()        # background stays background
    assert not (out / "nan_0003.mha").exists()


@pytest.mark.parametrize("text", ["²", "٣", "1²"])
def test_unicode_digits_are_not_ids_or_folds(text):
    """str.isdigit accepts superscripts, which int() refuses (found by the property test above in CI)."""
    from nnsynth import paths
    from nnsynth.exceptions import DatasetNotFoundError
    from nnsynth.training.splits import parse_fold
    with pytest.raises(DatasetNotFoundError):
        paths.resolve_dataset_name(text)
    with pytest.raises(NnsynthError):
        parse_fold(text)
