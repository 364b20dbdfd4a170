"""Every command shown in ```bash blocks of README.md and documentation/*.md is run (doc examples must not rot).

Convention (documentation/architecture.md, "Documentation examples"):

- a fenced block tagged ``bash`` is executed, block by block and page by page in ``PAGE_ORDER`` (then any other
  page, alphabetically), all in one sandbox folder: the current directory is the sandbox and ``nnSynth_raw``,
  ``nnSynth_preprocessed`` and ``nnSynth_results`` point into it, so later pages see what earlier pages made
  (the getting-started demo dataset and its trained ``seq2seq`` model);
- blocks tagged ``text``, ``sh``, ``json``, ``python`` or untagged are shown only (synopses with ``[options]``,
  installs, the ``.ci`` scripts that CI runs itself, commands that need data or hardware a test cannot have);
- the runner keeps budgets small by appending options (``SUBSTITUTIONS``): tiny demo datasets, a tiny network,
  ``--epochs 1 --iters-per-epoch 2``, ``--device cpu``; ``export nnSynth_*=...`` lines are skipped (the sandbox
  sets those), a leading ``time`` is dropped, and the sandbox holds a two-case BraTS-style folder ``BraTS2023/``
  for ``nnsynth_convert_brats`` examples;
- a block directly preceded by a line ``<!-- file: NAME -->`` (e.g. a ```python trainer) is written to the
  sandbox as ``NAME`` before the page's commands run; the sandbox is on ``sys.path``, so it can be imported;
- a plain ``nnsynth_*`` line runs in this process (fast); any other line, or a line with shell operators, runs
  with ``bash -e``; ``export NAME=VALUE`` sets NAME for the following commands. Every line must succeed.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from helpers_data import tiny_image, tiny_label, write_array

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "documentation"
PAGE_ORDER = ["README.md", "getting_started.md", "dataset_format.md", "demo_dataset.md", "commands.md", "plans.md",
              "training.md", "prediction.md", "extending.md", "troubleshooting.md"]
TINY_NETWORK = ["encoder_channels=[4,8,8]", "num_res_blocks=1", "num_hyper_res_blocks=1", "val_iters=1",
                "hyper_mlp_hidden=8"]
SUBSTITUTIONS: Dict[str, List[str]] = {
    "nnsynth_make_demo_dataset": ["--cases", "5", "--test-cases", "2", "--spacing", "4", "--size-scale", "0.5",
                                  "--no-montage", "--overwrite"],
    "nnsynth_plan_and_preprocess": ["-np", "0", "--no-progress", "--device", "cpu"],
    "nnsynth_train": ["--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu"],
    "nnsynth_predict": ["--device", "cpu", "--no-progress"],
    "nnsynth_analyze": ["--device", "cpu", "--no-progress", "--max-cases", "1"],
    "nnsynth_evaluate": ["--no-progress"],
}
SHELL_OPERATORS = re.compile(r"[|;&<>`]|\$\(")
BLOCK = re.compile(r"^```([A-Za-z0-9_-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def bash_blocks(page: Path) -> List[str]:
    """The ```bash blocks of a page, in order."""
    return [body for tag, body in BLOCK.findall(page.read_text()) if tag == "bash"]


FILE_MARKER = re.compile(r"^<!-- file: ([\w./-]+) -->\n```[A-Za-z0-9_-]*[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def files_to_write(page: Path) -> List[Tuple[str, str]]:
    """(name, content) of the blocks marked ``<!-- file: NAME -->``."""
    return FILE_MARKER.findall(page.read_text())


def pages() -> List[Path]:
    found = {p.name: p for p in sorted(DOCS.glob("*.md"))}
    found["README.md"] = REPO / "README.md"
    ordered = [found.pop(n) for n in PAGE_ORDER if n in found]
    return ordered + [found[n] for n in sorted(found)]


def logical_lines(block: str) -> List[str]:
    """Join ``\\`` continuations, drop comments and blank lines."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def with_budget(args: List[str]) -> List[str]:
    """Append the small-budget options of ``SUBSTITUTIONS`` (tiny network merged into any ``--overwrite``)."""
    name, rest = args[0], list(args[1:])
    if name == "nnsynth_plan_and_preprocess":
        if "--overwrite" in rest:
            i = rest.index("--overwrite") + 1
            rest[i:i] = TINY_NETWORK
        else:
            rest += ["--overwrite", *TINY_NETWORK]
    return [name] + rest + SUBSTITUTIONS.get(name, [])


def entry_points() -> Dict[str, Callable]:
    from importlib import import_module
    text = (REPO / "setup.py").read_text()
    out = {}
    for name, target in re.findall(r'"(nnsynth_\w+)=([\w.]+:\w+)"', text):
        module, func = target.split(":")
        out[name] = getattr(import_module(module), func)
    return out


def make_brats_folder(root: Path) -> None:
    """Two BraTS 2023-style cases (one lacks t2f), so nnsynth_convert_brats examples have an input."""
    for i, (case, suffixes) in enumerate([("BraTS-GLI-00000-000", ("t1n", "t1c", "t2w", "t2f")),
                                          ("BraTS-GLI-00001-000", ("t1n", "t1c", "t2w"))]):
        for j, s in enumerate(suffixes):
            write_array(tiny_image((6, 8, 10), 10 * i + j), root / case / f"{case}-{s}.nii.gz")
        write_array(tiny_label((6, 8, 10), i), root / case / f"{case}-seg.nii.gz")


def run_line(line: str, env: Dict[str, str], sandbox: Path, commands: Dict[str, Callable]) -> Tuple[int, str]:
    """Run one documented command; returns (exit code, what it was run as)."""
    if re.match(r"^export\s+nnSynth_(raw|preprocessed|results)=", line):
        return 0, "(skipped: the sandbox sets the nnSynth_* folders)"
    m = re.match(r"^export\s+(\w+)=(.*)$", line)
    if m:
        value = os.path.expandvars(" ".join(shlex.split(m.group(2))))
        os.environ[m.group(1)] = env[m.group(1)] = value   # the test's monkeypatch restores os.environ
        return 0, f"export {m.group(1)}"
    line = re.sub(r"^time\s+", "", line)
    first = line.split()[0]
    if first in commands and not SHELL_OPERATORS.search(line):
        args = []
        for tok in shlex.split(os.path.expandvars(line)):
            matches = sorted(glob.glob(tok)) if any(c in tok for c in "*?[") and not tok.startswith("[") else []
            args += matches or [tok]
        args = with_budget(args)
        try:
            rc = commands[args[0]](args[1:])
        except SystemExit as e:   # argparse errors
            rc = e.code if isinstance(e.code, int) else 1
        return int(rc or 0), " ".join(args)
    r = subprocess.run(["bash", "-e", "-c", line], cwd=sandbox, env=env, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, f"bash: {line}\n{r.stdout[-1500:]}{r.stderr[-1500:]}"


@pytest.fixture
def one_thread():
    """Other test modules set 2 torch threads at import; on a shared 2-core machine one is much faster here."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_bash_block_of_the_docs_runs(tmp_path, monkeypatch, one_thread):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    monkeypatch.chdir(sandbox)
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"), ("nnSynth_results", "results")):
        (sandbox / "nnsynth_data" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(sandbox / "nnsynth_data" / sub))
    monkeypatch.setenv("NNSYNTH_NO_TQDM", "1")
    make_brats_folder(sandbox / "BraTS2023")
    monkeypatch.syspath_prepend(str(sandbox))
    commands = entry_points()
    for name in ("NNSYNTH_TRAINERS",):
        monkeypatch.setenv(name, os.environ.get(name, ""))     # restored after the test
    env = dict(os.environ)
    ran = 0
    for page in pages():
        for name, content in files_to_write(page):
            (sandbox / name).parent.mkdir(parents=True, exist_ok=True)
            (sandbox / name).write_text(content)
        for bi, block in enumerate(bash_blocks(page)):
            for line in logical_lines(block):
                rc, how = run_line(line, env, sandbox, commands)
                assert rc == 0, f"{page.name}, ```bash block {bi + 1}: `{line}` failed with exit code {rc}\n{how}"
                ran += 1
    assert ran >= 20, f"only {ran} documented commands found; did the ```bash convention change?"


def test_bash_blocks_only_use_known_commands():
    """A typo in a documented command name would otherwise only show up as a shell error."""
    known = set(entry_points()) | {"mkdir", "cp", "ls", "export", "time", "cat", "rm", "ln", "cd", "echo", "python"}
    for page in pages():
        for block in bash_blocks(page):
            for line in logical_lines(block):
                first = line.split()[0]
                assert first in known or "=" in first, f"{page.name}: unknown command {first!r} in `{line}`"
