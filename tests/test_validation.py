"""Dataset validation: a valid dataset passes; every bad input of CONTRACT.md section 2 is rejected
with a message naming the file and the problem, all problems at once, and nothing is written."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnsynth.dataset.cases import parse_image_filename
from nnsynth.dataset.dataset_json import parse_dataset_json_dict
from nnsynth.dataset.validation import validate_dataset
from nnsynth.exceptions import DatasetFormatError

sys.path.insert(0, str(Path(__file__).parent))
from helpers_data import tiny_image, tree_snapshot, write_array, write_tiny_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "pre"), ("nnSynth_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def _one(problems, *needles):
    """The problems that contain every needle (there must be at least one)."""
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}; problems: {problems}"
    return hits


def _set_json(folder: Path, **changes):
    spec = json.loads((folder / "dataset.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            spec.pop(k, None)
        else:
            spec[k] = v
    (folder / "dataset.json").write_text(json.dumps(spec))


_DELETE = object()


# ---------------------------------------------------------------------------------------------- valid
@pytest.mark.parametrize("ending,shape", [(".nii.gz", (6, 8, 10)), (".mha", (8, 10)), (".nrrd", (5, 6, 7)),
                                          (".nii", (9, 7))])
def test_valid_dataset_passes(env, ending, shape):
    folder = write_tiny_dataset(env / "raw", file_ending=ending, shape=shape, labels=True, test_cases=1)
    report = validate_dataset(folder)
    assert report.problems == []
    assert report.ok
    report.raise_if_problems()
    assert list(report.availability.columns) == ["T1", "T1Gd", "T2", "Flair"]
    assert report.availability.values.all() and len(report.cases) == 4 and len(report.test_cases) == 1
    assert report.spec is not None and report.spec.num_training == 4


def test_missing_sequences_are_valid_with_warnings(env):
    folder = write_tiny_dataset(env / "raw", cases=4, missing={"case_000": ["T2"], "case_001": ["T1", "T1Gd", "T2"],
                                                               "case_002": ["Flair", "T2"], "case_003": ["T2"]})
    report = validate_dataset(folder)
    assert report.problems == []
    assert report.availability.loc["case_000", "T2"] == False  # noqa: E712
    _one(report.warnings, "only one sequence", "case_001")
    _one(report.warnings, "'T2'", "no training case")


def test_pairs_never_together_warning(env):
    folder = write_tiny_dataset(env / "raw", sequences=("A", "B", "C"), cases=2,
                                missing={"case_000": ["C"], "case_001": ["A"]})
    report = validate_dataset(folder)
    assert report.problems == []
    _one(report.warnings, "never present together", "A+C")


def test_parallel_same_result(env):
    folder = write_tiny_dataset(env / "raw", cases=3)
    (folder / "imagesTr" / "case_001_0002.nii.gz").write_bytes(b"garbage" * 10)
    serial = validate_dataset(folder)
    parallel = validate_dataset(folder, num_workers=2)
    assert serial.problems == parallel.problems and len(serial.problems) == 1


# ------------------------------------------------------------------------------------------ bad input
def test_truncated_gzip_is_rejected(env):
    folder = write_tiny_dataset(env / "raw")
    f = folder / "imagesTr" / "case_001_0002.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # ITK alone would silently read zeros here
    _one(validate_dataset(folder).problems, str(f), "truncated")


def test_garbage_bytes_are_rejected(env):
    folder = write_tiny_dataset(env / "raw")
    f = folder / "imagesTr" / "case_000_0001.nii.gz"
    f.write_bytes(os.urandom(500))
    _one(validate_dataset(folder).problems, str(f), "cannot read")


def test_truncated_uncompressed_nifti_is_rejected(env):
    folder = write_tiny_dataset(env / "raw", file_ending=".nii")
    f = folder / "imagesTr" / "case_002_0000.nii"
    f.write_bytes(f.read_bytes()[:-40])
    _one(validate_dataset(folder).problems, str(f), "truncated")


def test_multicomponent_image_is_rejected(env):
    import SimpleITK as sitk
    folder = write_tiny_dataset(env / "raw", shape=(6, 8, 10))
    f = folder / "imagesTr" / "case_000_0003.nii.gz"
    rgb = sitk.Compose([sitk.GetImageFromArray(tiny_image((6, 8, 10), i)) for i in range(3)])
    rgb.SetSpacing((1.0, 1.2, 1.5))
    rgb.SetOrigin((-10.0, 5.0, 2.5))
    sitk.WriteImage(rgb, str(f))
    _one(validate_dataset(folder).problems, str(f), "components")


def test_unknown_channel_and_bad_name(env):
    folder = write_tiny_dataset(env / "raw")
    unknown = write_array(tiny_image((6, 8, 10), 1), folder / "imagesTr" / "case_000_0007.nii.gz")
    bad_name = write_array(tiny_image((6, 8, 10), 1), folder / "imagesTr" / "case_000-T1.nii.gz")
    problems = validate_dataset(folder).problems
    _one(problems, str(unknown), "unknown channel id 0007")
    _one(problems, str(bad_name), "does not follow")


def test_geometry_mismatch_names_both_files(env):
    folder = write_tiny_dataset(env / "raw")
    bad = folder / "imagesTr" / "case_002_0003.nii.gz"
    write_array(tiny_image((6, 8, 10), 3), bad, spacing=(1.0, 1.2, 3.0))
    shape_bad = folder / "imagesTr" / "case_001_0001.nii.gz"
    write_array(tiny_image((6, 8, 11), 3), shape_bad)
    origin_bad = folder / "imagesTr" / "case_003_0002.nii.gz"
    write_array(tiny_image((6, 8, 10), 3), origin_bad, origin=(-10.0, 5.0, 9.0))
    problems = validate_dataset(folder).problems
    _one(problems, str(bad), str(folder / "imagesTr" / "case_002_0000.nii.gz"), "spacing")
    _one(problems, str(shape_bad), "case_001_0000", "shape")
    _one(problems, str(origin_bad), "origin")


def test_small_geometry_differences_are_tolerated(env):
    folder = write_tiny_dataset(env / "raw")
    write_array(tiny_image((6, 8, 10), 3), folder / "imagesTr" / "case_002_0003.nii.gz",
                spacing=(1.0, 1.2 * (1 + 2e-6), 1.5), origin=(-10.0 + 1e-5, 5.0, 2.5))
    assert validate_dataset(folder).problems == []


def test_mixed_2d_3d_in_one_case(env):
    folder = write_tiny_dataset(env / "raw")
    f = folder / "imagesTr" / "case_000_0002.nii.gz"
    write_array(tiny_image((8, 10), 3), f)
    _one(validate_dataset(folder).problems, "case_000", "2D and 3D", f.name)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("bad_value,word", [(np.nan, "NaN"), (-np.inf, "Inf")])
def test_nan_inf_rejected(env, bad_value, word, ending):
    """ITK's NIfTI reader turns NaN into 0, so this also checks that NIfTI voxels are scanned directly."""
    folder = write_tiny_dataset(env / "raw", file_ending=ending)
    f = folder / "imagesTr" / f"case_003_0001{ending}"
    arr = tiny_image((6, 8, 10), 5)
    arr[0, 0, 0] = bad_value  # outside the 'brain': still a problem
    write_array(arr, f)
    _one(validate_dataset(folder).problems, str(f), word)


def test_all_zero_rejected(env):
    folder = write_tiny_dataset(env / "raw")
    f = folder / "imagesTr" / "case_000_0000.nii.gz"
    write_array(np.zeros((6, 8, 10), np.float32), f)
    _one(validate_dataset(folder).problems, str(f), "all zeros")


def test_label_only_case_rejected(env):
    folder = write_tiny_dataset(env / "raw", labels=True)
    lab = folder / "labelsTr" / "orphan.nii.gz"
    write_array(np.zeros((6, 8, 10), np.uint8), lab)
    _one(validate_dataset(folder).problems, str(lab), "without images")


def test_label_problems(env):
    folder = write_tiny_dataset(env / "raw", labels=True)
    geom = folder / "labelsTr" / "case_000.nii.gz"
    write_array(np.zeros((6, 8, 10), np.uint8), geom, spacing=(2.0, 2.0, 2.0))
    values = folder / "labelsTr" / "case_001.nii.gz"
    write_array(np.full((6, 8, 10), 4, np.uint8), values)
    frac = folder / "labelsTr" / "case_002.nii.gz"
    write_array(np.full((6, 8, 10), 0.5, np.float32), frac)
    problems = validate_dataset(folder).problems
    _one(problems, str(geom), "label geometry", "case_000_0000")
    _one(problems, str(values), "[4]")
    _one(problems, str(frac), "non-integer")
    assert len(problems) == 3


def test_num_training_mismatch(env):
    folder = write_tiny_dataset(env / "raw", cases=3)
    _set_json(folder, numTraining=5)
    _one(validate_dataset(folder).problems, "dataset.json", "numTraining is 5", "3 cases")


def test_num_training_counts_only_imagesTr(env):
    folder = write_tiny_dataset(env / "raw", cases=3, test_cases=2)
    assert validate_dataset(folder).problems == []


@pytest.mark.parametrize("changes,needle", [
    ({"channel_names": _DELETE}, "missing required key 'channel_names'"),
    ({"numTraining": _DELETE}, "missing required key 'numTraining'"),
    ({"file_ending": _DELETE}, "missing required key 'file_ending'"),
    ({"numTraining": "four"}, "'numTraining' must be a non-negative integer"),
    ({"channel_names": ["T1", "T2"]}, "'channel_names' must be a non-empty object"),
    ({"file_ending": ".png"}, "'file_ending' '.png'"),
    ({"labels": {"background": "zero"}}, "label 'background' must be an integer"),
])
def test_bad_dataset_json(env, changes, needle):
    folder = write_tiny_dataset(env / "raw")
    _set_json(folder, **changes)
    report = validate_dataset(folder)
    _one(report.problems, str(folder / "dataset.json"), needle)
    with pytest.raises(DatasetFormatError) as e:
        report.raise_if_problems()
    assert needle in str(e.value)


def test_missing_or_invalid_json_file(env):
    folder = write_tiny_dataset(env / "raw")
    (folder / "dataset.json").write_text("{not json")
    _one(validate_dataset(folder).problems, "dataset.json", "not valid JSON")
    (folder / "dataset.json").unlink()
    _one(validate_dataset(folder).problems, "dataset.json", "not found")


def test_images_tr_missing_or_empty(env):
    folder = write_tiny_dataset(env / "raw", cases=1)
    for f in (folder / "imagesTr").iterdir():
        f.unlink()
    _set_json(folder, numTraining=0)
    _one(validate_dataset(folder).problems, "imagesTr", "empty")
    (folder / "imagesTr").rmdir()
    _one(validate_dataset(folder).problems, "imagesTr", "not found")


def test_test_images_checked_with_same_rules(env):
    folder = write_tiny_dataset(env / "raw", test_cases=1)
    f = folder / "imagesTs" / "test_000_0001.nii.gz"
    write_array(np.zeros((6, 8, 10), np.float32), f)
    _one(validate_dataset(folder).problems, str(f), "all zeros")


def test_several_problems_reported_at_once(env):
    folder = write_tiny_dataset(env / "raw", labels=True)
    _set_json(folder, numTraining="x")  # dataset.json problem: images are still checked
    (folder / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    write_array(np.zeros((6, 8, 10), np.float32), folder / "imagesTr" / "case_001_0001.nii.gz")
    arr = tiny_image((6, 8, 10), 1)
    arr[0, 0, 0] = np.nan
    write_array(arr, folder / "imagesTr" / "case_002_0002.nii.gz")
    write_array(tiny_image((6, 8, 10), 1), folder / "imagesTr" / "case_003_0009.nii.gz")
    problems = validate_dataset(folder).problems
    for needle in ("numTraining", "case_000_0000", "case_001_0001", "case_002_0002", "case_003_0009"):
        _one(problems, needle)
    assert len(problems) == 5


def test_nnunet_v2_dataset_valid_as_is(env):
    """An nnU-Net v2 dataset with region labels and extra keys is accepted unchanged."""
    folder = write_tiny_dataset(env / "raw", labels=True, name="Dataset137_BraTS2021")
    spec = json.loads((folder / "dataset.json").read_text())
    spec.update({"overwrite_image_reader_writer": "SimpleITKIO", "name": "BraTS2021", "license": "cc",
                 "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                            "enhancing tumor": 3}, "regions_class_order": [1, 2, 3]})
    (folder / "dataset.json").write_text(json.dumps(spec))
    before = tree_snapshot(folder)
    assert validate_dataset(folder).problems == []
    assert tree_snapshot(folder) == before


# ------------------------------------------------------------------------------------------------ CLI
def _run_cli(env_root: Path, *args: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(REPO), nnSynth_raw=str(env_root / "raw"),
                   nnSynth_preprocessed=str(env_root / "pre"), nnSynth_results=str(env_root / "res"))
    return subprocess.run([sys.executable, "-m", "nnsynth.cli.verify", *args], capture_output=True, text=True,
                          env=environ, cwd=env_root, timeout=120)


def test_cli_valid_and_invalid(env):
    folder = write_tiny_dataset(env / "raw", missing={"case_001": ["T2"]})
    ok = _run_cli(env, "-d", "501")
    assert ok.returncode == 0, ok.stderr
    assert "case_001" in ok.stdout and "T1Gd" in ok.stdout
    assert "Traceback" not in ok.stderr

    bad = folder / "imagesTr" / "case_002_0001.nii.gz"
    bad.write_bytes(gzip.compress(b"not an image"))
    zero = folder / "imagesTr" / "case_000_0003.nii.gz"
    write_array(np.zeros((6, 8, 10), np.float32), zero)
    _set_json(folder, numTraining=7)
    before = tree_snapshot(env)
    res = _run_cli(env, "-d", "Dataset501_Tiny")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    for needle in (str(bad), str(zero), "numTraining is 7"):
        assert needle in res.stderr
    assert tree_snapshot(env) == before  # nothing written, nothing touched


def test_cli_unknown_dataset_and_help(env):
    res = _run_cli(env, "-d", "999")
    assert res.returncode == 1 and "999" in res.stderr and "Traceback" not in res.stderr
    res = _run_cli(env, "-h")
    assert res.returncode == 0 and "-np" in res.stdout


# ------------------------------------------------------------------------------------ property tests
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4),
                     max_leaves=12)
_keys = st.sampled_from(["channel_names", "modality", "labels", "numTraining", "file_ending", "name"])
_ascii_digits = st.text(alphabet="0123456789 ", min_size=0, max_size=6)
_junk_spec = st.one_of(
    _json,
    st.dictionaries(_keys, _json | st.dictionaries(_ascii_digits | st.text(max_size=4), _json, max_size=4),
                    max_size=6),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_junk_spec)
def test_parse_dataset_json_never_raises(d):
    spec, problems = parse_dataset_json_dict(d)
    assert (spec is None) == bool(problems)
    assert all(isinstance(p, str) and p for p in problems)


def test_parse_dataset_json_superscript_channel_id():
    spec, problems = parse_dataset_json_dict({"channel_names": {"²": "T1", "0": "T2"}, "numTraining": 1,
                                              "file_ending": ".nii.gz"})
    assert spec is None and problems


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.sampled_from([".nii.gz", ".nii", ".mha", ".nrrd", ""]))
def test_parse_image_filename_never_raises(name, ending):
    parsed = parse_image_filename(name, ending)
    if parsed is not None:
        case, channel = parsed
        assert isinstance(case, str) and case and isinstance(channel, int) and 0 <= channel < 10_000
