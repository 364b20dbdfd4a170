"""documentation/commands.md lists every option of every command (checked against the argparse parsers)."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Dict

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS_MD = REPO / "documentation" / "commands.md"


def console_scripts() -> Dict[str, str]:
    """``{command: module}`` from setup.py's console_scripts."""
    text = (REPO / "setup.py").read_text()
    return {name: module for name, module in re.findall(r'"(nnsynth_\w+)=([\w.]+):cli"', text)}


def sections() -> Dict[str, str]:
    """``{command: its section of commands.md}``."""
    text = COMMANDS_MD.read_text()
    return dict(re.findall(r"^## (nnsynth_\w+)\n(.*?)(?=^## |\Z)", text, re.S | re.M))


def test_every_console_script_has_a_section():
    scripts = console_scripts()
    assert len(scripts) >= 8
    assert sorted(sections()) == sorted(scripts)


@pytest.mark.parametrize("command", sorted(console_scripts()))
def test_every_option_of_every_parser_is_documented(command):
    parser = importlib.import_module(console_scripts()[command]).build_parser()
    assert parser.prog == command
    section = sections()[command]
    table = {row.split("|")[1] for row in section.splitlines() if row.startswith("| `")}
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.dest.upper()]
        for name in names:
            if not any(f"`{name}`" in cell for cell in table):
                missing.append(name)
        if action.help and action.option_strings:
            # the meaning column must be current, not just the flag: compare the help's first words
            words = " ".join(str(action.help).replace("%(default)s", str(action.default)).split()[:4])
            if words and words.replace("|", "\\|") not in section:
                missing.append(f"{names[0]} (help text changed: '{words} ...')")
    assert not missing, (f"documentation/commands.md, section {command}, lacks {missing}; add a table row "
                         f"(the rows are what `{command} -h` says)")


def test_common_options_are_documented():
    text = COMMANDS_MD.read_text()
    for flag in ("`-h`", "`--help`", "`-v`", "`--verbose`"):
        assert flag in text.split("## nnsynth_")[0]
