"""Shared test set-up: every test gets its own nnsynth folders and a small thread budget."""
from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: longer end-to-end tests (still run in CI)")
    import torch
    # tiny test networks run fastest single-threaded, and the suite often shares its cores (CI, DDP tests)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def nnsynth_folders(tmp_path, monkeypatch):
    """Point nnSynth_raw/preprocessed/results at a fresh temporary folder for each test."""
    root = tmp_path / "nnsynth_data"
    folders = {}
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"),
                     ("nnSynth_results", "results")):
        (root / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(root / sub))
        folders[sub] = root / sub
    return folders


@pytest.fixture
def logs(caplog, capsys):
    """Everything nnsynth logged so far in this test (the CLI logs to stderr, library code to caplog)."""
    seen = []

    def text() -> str:
        seen.append(capsys.readouterr().err)
        return caplog.text + "".join(seen)
    return text
