"""Folder variables, their defaults, and dataset id <-> name resolution (CONTRACT.md section 1)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnsynth import paths
from nnsynth.exceptions import DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
VARS = ("nnSynth_raw", "nnSynth_preprocessed", "nnSynth_results")


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def unset(monkeypatch, tmp_path):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    cwd = tmp_path / "cwd"  # tmp_path itself holds the shared conftest's nnsynth_data
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(paths, "_warned", set())
    return cwd


@pytest.fixture
def env(monkeypatch, tmp_path):
    for v, sub in zip(VARS, ("raw", "pre", "res")):
        monkeypatch.setenv(v, str(tmp_path / "env" / sub))
        (tmp_path / "env" / sub).mkdir(parents=True)
    return tmp_path / "env"


def test_defaults_when_unset_and_one_log_line_each(unset):
    handler = _ListHandler()
    logger = logging.getLogger("nnsynth.paths")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            assert paths.raw_folder() == unset / "nnsynth_data" / "raw"
            assert paths.preprocessed_folder() == unset / "nnsynth_data" / "preprocessed"
            assert paths.results_folder() == unset / "nnsynth_data" / "results"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(handler.messages) == 3
    for v in VARS:
        assert sum(v in m for m in handler.messages) == 1
    assert not (unset / "nnsynth_data").exists()  # asking for a folder creates nothing


def test_import_never_crashes_with_env_unset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env["PYTHONPATH"] = str(REPO)
    code = ("import nnsynth, nnsynth.paths, nnsynth.dataset.validation, nnsynth.cli.verify, "
            "nnsynth.cli.convert_brats; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_env_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("nnSynth_raw", str(tmp_path / "a"))
    assert paths.raw_folder() == tmp_path / "a"
    monkeypatch.setenv("nnSynth_raw", str(tmp_path / "b"))
    assert paths.raw_folder() == tmp_path / "b"


@pytest.mark.parametrize("where", ["raw", "pre", "res"])
def test_id_to_name_in_any_folder(env, where):
    (env / where / "Dataset005_X").mkdir()
    for query in ("5", "005", 5, "Dataset005_X", " 5 "):
        assert paths.resolve_dataset_name(query) == "Dataset005_X"


def test_same_name_in_several_folders_is_fine(env):
    for sub in ("raw", "pre", "res"):
        (env / sub / "Dataset501_Brain").mkdir()
    assert paths.resolve_dataset_name("501") == "Dataset501_Brain"
    assert paths.raw_dataset_folder(501) == env / "raw" / "Dataset501_Brain"
    assert paths.preprocessed_dataset_folder("Dataset501_Brain") == env / "pre" / "Dataset501_Brain"


def test_zero_matches_is_a_clear_error(env):
    (env / "raw" / "Dataset006_Other").mkdir()
    with pytest.raises(DatasetNotFoundError, match="005"):
        paths.resolve_dataset_name("5")
    with pytest.raises(DatasetNotFoundError, match="neither a dataset id"):
        paths.resolve_dataset_name("brain")


def test_two_matches_is_a_clear_error(env):
    (env / "raw" / "Dataset005_X").mkdir()
    (env / "res" / "Dataset005_Y").mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        paths.resolve_dataset_name(5)
    assert "Dataset005_X" in str(e.value) and "Dataset005_Y" in str(e.value) and "ambiguous" in str(e.value)


def test_raw_folder_missing_is_a_clear_error(env):
    (env / "res" / "Dataset007_Z").mkdir()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        paths.raw_dataset_folder(7)


def test_files_and_hidden_folders_are_not_datasets(env):
    (env / "raw" / "Dataset008_File").write_text("")
    (env / "raw" / ".Dataset008_Tmp.tmp-abc").mkdir()
    with pytest.raises(DatasetNotFoundError):
        paths.resolve_dataset_name(8)


def test_make_dataset_name():
    assert paths.make_dataset_name(5, "X") == "Dataset005_X"
    assert paths.dataset_name_from_folder("Dataset123_A_b") == 123
    assert paths.dataset_name_from_folder("Dataset12_A") is None
    with pytest.raises(Exception):
        paths.make_dataset_name(1000, "X")
    with pytest.raises(Exception):
        paths.make_dataset_name(5, "bad name")
