"""``launch.py --help`` lists the commands a user can run, each of the dispatch table's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.cli import COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=120, cwd=ROOT)


def test_help_lists_every_command_and_no_arguments_exit_2():
    shown = _launch("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python3 launch.py COMMAND")
    listed = {line.split()[0] for line in shown.stdout.splitlines() if line.startswith("    ")}
    for command in [*COMMANDS, *LIGHTNING_COMMANDS]:
        assert command in listed or any(command in entry.split("|") for entry in listed), command
    bare = _launch()
    assert bare.returncode == 2 and bare.stderr.startswith("usage:") and not bare.stdout
