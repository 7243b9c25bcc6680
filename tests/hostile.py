"""Helpers of the hostile-input tests: run a command, demand the README's promise.

The promise: bad input gets one line (``error: ...`` naming the culprit), exit status 2, no
traceback, and nothing half-written or lost. ``run_cli`` runs ``launch.py``'s dispatcher
in-process (the same code path as the script, without a new interpreter per case);
``launch`` runs the real script in a subprocess for cases that must be seen end to end.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``trainer.cli.main(argv)`` in this process: ``(exit status, stdout, stderr)``."""
    from trainer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return int(code), out.getvalue(), err.getvalue()


def launch(argv: list[str], env: dict[str, str], timeout: float = 300, cwd: Path = ROOT) -> tuple[int, str, str]:
    """``python launch.py ARGV`` in a subprocess: ``(exit status, stdout, stderr)``."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert the promise for one failed command and return its error line."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert code == 2, (code, err[-2000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(path: Path) -> list[str]:
    """Every path below ``path`` (relative, sorted): what a failed command must not change."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def written(path: Path, data: bytes | str) -> Path:
    """``path`` after writing ``data`` to it (for one-line test parameters)."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
