"""Fault injection: processes really killed (SIGKILL) in the middle of training, preprocessing and prediction,
damaged checkpoints, a full disk, a read-only output folder, and two prediction processes sharing one folder.

Every kill happens inside a child process at a chosen point (a hook installed by a tiny driver script), so the
tests are deterministic: the child dies exactly where a power cut or ``kill -9`` would hurt most.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

from helpers_data import tree_snapshot, write_tiny_dataset
from helpers_model import trained  # noqa: F401  (fixture)
from helpers_process import run_in_own_session
from nnsynth.dataset.cases import parse_image_filename
from nnsynth.dataset.io import read_image
from nnsynth.training import checkpointing as ckpt

pytestmark = pytest.mark.slow

# the driver: run one nnsynth command in-process after installing a fault hook (HOOK is code run first)
DRIVER = """
import os, signal, sys
from nnsynth.training.engine import TrainingEngine
TrainingEngine.final_validation = lambda self: None   # not what these tests check; it costs the most time
def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
{hook}
from nnsynth.cli.{module} import cli
raise SystemExit(cli({argv!r}))
"""




def run_child(module: str, argv: List[str], env: Dict[str, str], hook: str = "", timeout: float = 240,
              preexec=None, wrap: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """Run ``nnsynth.cli.{module}.cli(argv)`` in a fresh Python process with ``hook`` installed."""
    code = DRIVER.format(hook=textwrap.dedent(hook), module=module, argv=argv)
    cmd = (wrap or []) + [sys.executable, "-c", code]
    return run_in_own_session(cmd, timeout, env=env, preexec_fn=preexec)


def child_env(**folders: Path) -> Dict[str, str]:
    env = dict(os.environ, NNSYNTH_NO_TQDM="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for var, key in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"), ("nnSynth_results", "results")):
        if key in folders:
            env[var] = str(folders[key])
    return env


def visible_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def hidden_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ================================================================================================================
# training
# ================================================================================================================
def test_training_killed_mid_epoch_and_mid_checkpoint_resumes_to_the_same_end(trained, tmp_path, monkeypatch):
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=tmp_path / "res")
    argv = ["501", "seq2seq", "0", "--epochs", "3", "--iters-per-epoch", "2", "--device", "cpu"]
    fold = tmp_path / "res" / "Dataset501_BrainDemo" / "seq2seq__nnsynthPlans__2d" / "fold_0"

    # 1) SIGKILL in the middle of the second epoch (its 2nd iteration)
    hook = """
    _orig = TrainingEngine.train_step
    _calls = [0]
    def train_step(self, batch):
        _calls[0] += 1
        if _calls[0] == 4:      # epoch 2 has done one of its two iterations
            die()
        return _orig(self, batch)
    TrainingEngine.train_step = train_step
    """
    r = run_child("train", argv, env, hook)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (fold / ckpt.CHECKPOINT_FINAL).exists()
    state = ckpt.load_checkpoint(fold / ckpt.CHECKPOINT_LATEST)
    assert state["epoch"] == 1 and state["iteration_in_epoch"] == 0

    # 2) resumed, then SIGKILLed while checkpoint_latest.pth of epoch 2 is half written
    hook = """
    import torch
    _save = torch.save
    def save(obj, f, *a, **k):
        _save(obj, f, *a, **k)
        if isinstance(obj, dict) and obj.get("epoch") == 2 and ".checkpoint_latest" in str(f):
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                fh.truncate(size // 2)
            die()
    torch.save = save
    """
    r = run_child("train", argv + ["--c"], env, hook)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert any(n.startswith(".checkpoint_latest") for n in hidden_files(fold)), "the kill hit the temporary file"
    # the file under the real name is untouched and complete: still epoch 1
    assert ckpt.load_checkpoint(fold / ckpt.CHECKPOINT_LATEST)["epoch"] == 1
    path, state = ckpt.find_resume_checkpoint(fold)
    assert path.name == ckpt.CHECKPOINT_LATEST and state["epoch"] == 1

    # 3) a plain --c (in this process, to save a start-up) finishes the run: the epoch count asked for
    from nnsynth.cli.train import cli
    from nnsynth.training.engine import TrainingEngine
    monkeypatch.setenv("nnSynth_results", str(tmp_path / "res"))
    monkeypatch.setattr(TrainingEngine, "final_validation", lambda self: None)
    assert cli(argv + ["--c"]) == 0
    final = ckpt.load_checkpoint(fold / ckpt.CHECKPOINT_FINAL)
    assert final["epoch"] == 3 and len(final["logs"]["train_loss"]) == 3
    for name in (ckpt.CHECKPOINT_LATEST, ckpt.CHECKPOINT_PREVIOUS, ckpt.CHECKPOINT_BEST):
        ckpt.load_checkpoint(fold / name)
    log = (fold / "training_log.txt").read_text()
    assert "Resuming from checkpoint_latest.pth (epoch 1, iteration 0)" in log


def test_killed_trainer_takes_its_background_workers_with_it(trained, tmp_path):
    """Data-loading workers must end with a SIGKILLed trainer (on machines with > 2 cores they are the default).

    They share the trainer's output pipes, so ``communicate`` only returns once every worker has exited; without
    the workers' watch on their trainer they loop on a full queue forever and this runs into its timeout.
    """
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=tmp_path / "res")
    argv = ["501", "seq2seq", "0", "--epochs", "3", "--iters-per-epoch", "4", "--device", "cpu", "--num-workers", "2"]
    hook = """
    _orig = TrainingEngine.train_step
    _calls = [0]
    def train_step(self, batch):
        _calls[0] += 1
        if _calls[0] == 3:      # the workers are running and have filled their queue
            import time
            time.sleep(2)
            die()
        return _orig(self, batch)
    TrainingEngine.train_step = train_step
    """
    r = run_child("train", argv, env, hook, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def test_truncated_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, monkeypatch, logs):
    from nnsynth.cli.train import cli
    from nnsynth.training.engine import TrainingEngine
    monkeypatch.setenv("nnSynth_results", str(tmp_path / "res"))
    monkeypatch.setattr(TrainingEngine, "final_validation", lambda self: None)
    argv = ["501", "seq2seq", "0", "--epochs", "2", "--iters-per-epoch", "2", "--device", "cpu"]
    assert cli(argv) == 0
    fold = tmp_path / "res" / "Dataset501_BrainDemo" / "seq2seq__nnsynthPlans__2d" / "fold_0"
    assert ckpt.load_checkpoint(fold / ckpt.CHECKPOINT_PREVIOUS)["epoch"] == 1   # the latest before the last
    (fold / ckpt.CHECKPOINT_FINAL).unlink()
    latest = fold / ckpt.CHECKPOINT_LATEST
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])      # truncated, e.g. a copy cut short
    with pytest.raises(ValueError, match="checkpoint_latest.pth cannot be read"):
        ckpt.load_checkpoint(latest)
    (fold / ckpt.CHECKPOINT_BEST).unlink()
    logs()
    assert cli(argv + ["--c"]) == 0
    assert "Skipping a damaged checkpoint" in logs() and "checkpoint_latest.pth" in logs()
    assert "Resuming from checkpoint_previous.pth (epoch 1, iteration 0)" in logs()
    final = ckpt.load_checkpoint(fold / ckpt.CHECKPOINT_FINAL)
    assert final["epoch"] == 2 and len(final["logs"]["train_loss"]) == 2


def test_resume_prefers_the_most_advanced_fallback(tmp_path, logs):
    def state(epoch: int, it: int = 0) -> dict:
        return {"network_weights": {}, "optimizer_state": {}, "epoch": epoch, "iteration_in_epoch": it,
                "trainer_name": "t"}
    ckpt.save_checkpoint(state(3), tmp_path / ckpt.CHECKPOINT_BEST)
    ckpt.save_checkpoint(state(4), tmp_path / ckpt.CHECKPOINT_LATEST)
    ckpt.save_checkpoint(state(5), tmp_path / ckpt.CHECKPOINT_LATEST, keep_previous=True)
    assert torch.load(tmp_path / ckpt.CHECKPOINT_PREVIOUS, weights_only=False)["epoch"] == 4
    (tmp_path / ckpt.CHECKPOINT_LATEST).write_bytes(b"PK\x03\x04 not a zip any more")
    path, s = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == ckpt.CHECKPOINT_PREVIOUS and s["epoch"] == 4
    assert "Using" in logs() and "damaged" in logs()
    ckpt.save_checkpoint(state(4, 1), tmp_path / ckpt.CHECKPOINT_BEST)       # best is further along: use it
    path, s = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == ckpt.CHECKPOINT_BEST and s["iteration_in_epoch"] == 1


# ================================================================================================================
# preprocessing
# ================================================================================================================
def test_preprocessing_killed_mid_case_is_finished_by_a_rerun(tmp_path, logs, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_dataset(raw, sequences=("T1", "T2"), cases=5, shape=(6, 10, 12))
    env = child_env(raw=raw, preprocessed=pre, results=tmp_path / "res")
    argv = ["-d", "501", "-c", "2d", "-np", "0", "--no-progress", "--device", "cpu"]
    # SIGKILL after the third case's arrays are on disk but before its properties file
    hook = """
    from nnsynth.preprocessing import storage
    _save = storage.save_json
    _n = [0]
    def save_json(obj, path, *a, **k):
        _n[0] += 1
        if _n[0] == 3:
            die()
        return _save(obj, path, *a, **k)
    storage.save_json = save_json
    """
    r = run_child("plan_and_preprocess", argv, env, hook)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    from nnsynth.preprocessing.storage import list_cases
    folder = pre / "Dataset501_Tiny" / "nnsynthPlans_2d"
    assert list_cases(folder) == ["case_000", "case_001"]          # what training would read
    assert (folder / "case_002.b2nd").is_file() and not (folder / "case_002.json").exists()
    before = tree_snapshot(folder)

    from nnsynth.cli.plan_and_preprocess import cli
    monkeypatch.setenv("nnSynth_raw", str(raw))
    monkeypatch.setenv("nnSynth_preprocessed", str(pre))
    assert cli(argv) == 0
    assert "2 of 5 cases are up to date and skipped" in logs()
    assert list_cases(folder) == [f"case_{i:03d}" for i in range(5)]
    after = tree_snapshot(folder)
    for name in ("case_000.json", "case_000.b2nd", "case_001.json", "case_001_seg.b2nd"):
        assert after[name] == before[name], f"{name} was redone"
    assert after["case_002.b2nd"] != before["case_002.b2nd"]
    assert all(n.endswith((".json", ".b2nd")) for n in visible_files(folder))


# ================================================================================================================
# prediction
# ================================================================================================================
def _prediction_input(trained, folder: Path, copies: int = 2) -> List[str]:
    """Test cases without their Flair (channel 0003), duplicated under new names: 2 * copies cases."""
    folder.mkdir(parents=True)
    names = []
    for src in sorted(trained["imagesTs"].iterdir()):
        case, cid = parse_image_filename(src.name, ".nii.gz")
        if cid == 3:
            continue
        for k in range(copies):
            shutil.copy(src, folder / f"{case}x{k}_{cid:04d}.nii.gz")
            names.append(f"{case}x{k}")
    return sorted(set(names))


def test_prediction_killed_mid_write_is_finished_by_continue(trained, tmp_path, logs):
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = _prediction_input(trained, inp)
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=trained["results"])
    argv = ["-i", str(inp), "-o", str(out), "-t", "Flair", "--device", "cpu", "-np", "0", "--no-progress"]
    # SIGKILL while the second output image is half written
    hook = """
    import SimpleITK as sitk
    _write = sitk.WriteImage
    _n = [0]
    def write(image, path, *a, **k):
        _write(image, path, *a, **k)
        _n[0] += 1
        if _n[0] == 2:
            with open(path, "r+b") as fh:
                fh.truncate(100)
            die()
    sitk.WriteImage = write
    """
    r = run_child("predict", argv, env, hook)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    done = visible_files(out)
    assert done == [f"{cases[0]}_0003.nii.gz"]                   # only the finished case under a real name
    read_image(out / done[0])                                     # complete and readable
    assert hidden_files(out) and all(parse_image_filename(n, ".nii.gz") is None for n in hidden_files(out))
    first = (out / done[0]).stat().st_mtime_ns

    from nnsynth.cli.predict import cli
    assert cli(argv + ["--continue"]) == 0
    assert "1 already done (--continue)" in logs() and f"{len(cases) - 1} case(s) predicted" in logs()
    assert (out / done[0]).stat().st_mtime_ns == first             # not redone
    assert [n for n in visible_files(out) if n.endswith(".nii.gz")] == [f"{c}_0003.nii.gz" for c in cases]
    for c in cases:
        arr, _ = read_image(out / f"{c}_0003.nii.gz")
        assert np.isfinite(arr).all() and arr.max() > 0


def test_two_processes_split_the_cases_without_overlap(trained, tmp_path):
    from nnsynth.utils.files import load_json
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = _prediction_input(trained, inp, copies=2)
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=trained["results"])
    procs = []
    for part in (0, 1):
        code = DRIVER.format(hook="", module="predict", argv=[
            "-i", str(inp), "-o", str(out), "-t", "Flair", "--device", "cpu", "-np", "0", "--no-progress",
            "--num-parts", "2", "--part-id", str(part)])
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    parts = [set(load_json(out / f"nnsynth_predictions_part{k}of2.json")["cases"]) for k in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(cases)
    assert [n for n in visible_files(out) if n.endswith(".nii.gz")] == [f"{c}_0003.nii.gz" for c in cases]
    assert not hidden_files(out)
    from nnsynth.cli.predict import cli
    assert cli(["-i", str(inp), "-o", str(out), "-t", "Flair", "--num-parts", "2", "--part-id", "2"]) == 1


def _limit_file_size() -> None:
    """In the child: files may not grow beyond 300 bytes (the kernel refuses the write with EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))


def test_full_disk_gives_a_clear_error_and_leaves_nothing_partial(trained, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _prediction_input(trained, inp, copies=1)
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=trained["results"])
    argv = ["-i", str(inp), "-o", str(out), "-t", "Flair", "--device", "cpu", "-np", "1", "--no-progress"]
    r = run_child("predict", argv, env, preexec=_limit_file_size)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr and "free on that disk" in r.stderr
    assert not [n for n in visible_files(out) if n.endswith(".nii.gz")]
    assert not hidden_files(out), "temporary files were left behind"


def _read_only_wrapper(folder: Path) -> Optional[List[str]]:
    """A command prefix under which ``folder`` is read-only for the child, or None if this machine cannot."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        return None
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(folder)]


def test_read_only_output_folder_gives_a_clear_error(trained, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _prediction_input(trained, inp, copies=1)
    out.mkdir()
    wrap = _read_only_wrapper(out)
    if wrap is None:
        pytest.skip("neither an unprivileged user nor mount namespaces: cannot make a read-only folder here")
    env = child_env(raw=trained["raw"], preprocessed=trained["preprocessed"], results=trained["results"])
    try:
        r = run_child("predict", ["-i", str(inp), "-o", str(out), "-t", "Flair", "--device", "cpu"], env, wrap=wrap)
    finally:
        out.chmod(0o755)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "Output folder: cannot write" in r.stderr
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr
    assert not list(out.iterdir())
