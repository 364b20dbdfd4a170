"""BraTS 2023 folder -> nnsynth raw dataset: names, channels, labels, missing sequences, atomicity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnsynth.dataset.convert_brats import BRATS_CHANNEL_NAMES, BRATS_LABELS, convert_brats
from nnsynth.dataset.validation import validate_dataset
from nnsynth.exceptions import DatasetFormatError, NnsynthError

sys.path.insert(0, str(Path(__file__).parent))
from helpers_data import tiny_image, tiny_label, tree_snapshot, write_array  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE = (5, 6, 7)
SUFFIXES = ("t1n", "t1c", "t2w", "t2f")


def make_brats(root: Path, cases: dict) -> Path:
    """``cases``: {case: (suffixes present, has seg)} -> BraTS-style folder with one sub-folder per case."""
    for i, (case, (present, seg)) in enumerate(cases.items()):
        d = root / case
        for j, suf in enumerate(present):
            write_array(tiny_image(SHAPE, 10 * i + j), d / f"{case}-{suf}.nii.gz")
        if seg:
            write_array(tiny_label(SHAPE, i), d / f"{case}-seg.nii.gz")
    return root


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "pre"), ("nnSynth_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_convert_training_folder(env):
    src = make_brats(env / "BraTS2023" / "TrainingData", {
        "BraTS-GLI-00000-000": (SUFFIXES, True),
        "BraTS-GLI-00001-000": (("t1n", "t2w", "t2f"), True),   # t1c missing
        "BraTS-GLI-00002-000": (SUFFIXES, False),               # validation-style: no seg
    })
    (src / "README.txt").write_text("not an image")
    before = tree_snapshot(env / "BraTS2023")
    out = convert_brats([src], 502)
    assert out == env / "raw" / "Dataset502_BraTS"
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == BRATS_CHANNEL_NAMES == {"0": "T1", "1": "T1Gd", "2": "T2", "3": "Flair"}
    assert spec["labels"] == BRATS_LABELS and spec["numTraining"] == 3 and spec["file_ending"] == ".nii.gz"
    names = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert len(names) == 11 and "BraTS-GLI-00001-000_0001.nii.gz" not in names
    assert "BraTS-GLI-00001-000_0003.nii.gz" in names
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["BraTS-GLI-00000-000.nii.gz",
                                                                      "BraTS-GLI-00001-000.nii.gz"]
    assert (out / "imagesTr" / "BraTS-GLI-00000-000_0002.nii.gz").read_bytes() == \
        (src / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2w.nii.gz").read_bytes()
    report = validate_dataset(out)
    assert report.problems == []
    assert not report.availability.loc["BraTS-GLI-00001-000", "T1Gd"]
    assert tree_snapshot(env / "BraTS2023") == before  # input untouched
    assert [p.name for p in (env / "raw").iterdir()] == ["Dataset502_BraTS"]  # no temp folder left


def test_symlink_and_test_folder(env):
    tr = make_brats(env / "in" / "train", {"A-1": (SUFFIXES, True), "A-2": (("t1n", "t2f"), True)})
    ts = make_brats(env / "in" / "val", {"B-1": (("t1n", "t1c", "t2w"), False)})
    out = convert_brats([tr], 503, name="BraSyn", mode="symlink", test_folders=[ts])
    assert out.name == "Dataset503_BraSyn"
    link = out / "imagesTr" / "A-1_0000.nii.gz"
    assert link.is_symlink() and link.resolve() == (tr / "A-1" / "A-1-t1n.nii.gz").resolve()
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["B-1_0000.nii.gz", "B-1_0001.nii.gz",
                                                                     "B-1_0002.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert validate_dataset(out).problems == []


def test_uncompressed_input_is_converted(env):
    d = env / "in" / "C-1"
    for j, suf in enumerate(SUFFIXES):
        write_array(tiny_image(SHAPE, j), d / f"C-1-{suf}.nii")
    out = convert_brats([env / "in"], 504)
    assert (out / "imagesTr" / "C-1_0003.nii.gz").is_file()


def test_bad_input_writes_nothing(env):
    src = make_brats(env / "in", {"A-1": (SUFFIXES, True), "A-2": ((), True)})  # seg only
    bad = src / "A-1" / "A-1-t2f.nii.gz"
    write_array(np.zeros(SHAPE, np.float32), bad)
    with pytest.raises(DatasetFormatError) as e:
        convert_brats([src], 502)
    assert "A-2" in str(e.value) and "no image" in str(e.value)
    assert not (env / "raw").exists() or list((env / "raw").iterdir()) == []

    (src / "A-2" / "A-2-seg.nii.gz").unlink()
    with pytest.raises(DatasetFormatError) as e:
        convert_brats([src], 502)
    assert str(bad) in str(e.value) and "all zeros" in str(e.value)  # names the user's file, not the copy
    assert list((env / "raw").iterdir()) == []  # temp folder removed, nothing published


def test_existing_dataset_and_id_clash(env):
    src = make_brats(env / "in", {"A-1": (SUFFIXES, True)})
    out = convert_brats([src], 502)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    with pytest.raises(NnsynthError, match="already exists"):
        convert_brats([src], 502)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(NnsynthError, match="already used"):
        convert_brats([src], 502, name="Other")
    convert_brats([src], 502, overwrite=True)
    assert [p.name for p in (env / "raw").iterdir()] == ["Dataset502_BraTS"]


def test_no_cases_found(env):
    (env / "empty").mkdir()
    with pytest.raises(NnsynthError, match="No BraTS case"):
        convert_brats([env / "empty"], 502)
    with pytest.raises(DatasetFormatError, match="not found"):
        convert_brats([env / "missing"], 502)


def test_cli(env):
    src = make_brats(env / "in", {"A-1": (SUFFIXES, True), "A-2": (("t2w",), False)})
    environ = dict(os.environ, PYTHONPATH=str(REPO), nnSynth_raw=str(env / "raw"),
                   nnSynth_preprocessed=str(env / "pre"), nnSynth_results=str(env / "res"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "nnsynth.cli.convert_brats", *a],  # noqa: E731
                                    capture_output=True, text=True, env=environ, timeout=120)
    res = run("-i", str(src), "-d", "502", "--symlink")
    assert res.returncode == 0, res.stderr
    assert (env / "raw" / "Dataset502_BraTS" / "imagesTr" / "A-2_0002.nii.gz").is_symlink()
    res = run("-i", str(src), "-d", "502")
    assert res.returncode == 1 and "already exists" in res.stderr and "Traceback" not in res.stderr
    assert run("-h").returncode == 0
