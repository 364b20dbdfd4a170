"""Every console script in setup.py resolves, answers -h, and planned commands exit 2 with a message."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"
ENTRY_RE = re.compile(r'"(nnsynth_[a-z_]+)=([a-z_.]+):([a-z_]+)"')
CONTRACT_COMMANDS = {"nnsynth_plan_and_preprocess", "nnsynth_train", "nnsynth_predict", "nnsynth_evaluate",
                     "nnsynth_verify_dataset", "nnsynth_make_demo_dataset", "nnsynth_analyze"}


def _entry_points():
    return ENTRY_RE.findall(SETUP.read_text())


def test_every_contract_command_is_a_console_script():
    names = {name for name, _, _ in _entry_points()}
    assert CONTRACT_COMMANDS <= names, CONTRACT_COMMANDS - names


@pytest.mark.parametrize("name,module,func", _entry_points())
def test_help_exits_zero(name, module, func, capsys):
    cli = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exc:
        cli(["-h"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()
