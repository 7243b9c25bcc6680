#!/usr/bin/env python3
"""Entry point: ``python3 launch.py COMMAND ...``; ``python3 launch.py --help`` lists the
commands (the list lives in ``trainer/cli.py``, next to the dispatch table it describes)."""
import importlib.util
import sys

from trainer.env import ensure_env, in_project_env

BOOTSTRAP = {"main", "setup"}


def _wants_bootstrap(argv: list[str]) -> bool:
    """main/setup/test-the-suite always run in the project's .venv; other commands run in the
    current interpreter when it already has the dependencies (a user's cluster env)."""
    if in_project_env():
        return False
    if argv and (argv[0] in BOOTSTRAP or (argv[0] == "test" and not any(a.startswith(("--config", "-c")) for a in argv))):
        return True
    return not all(importlib.util.find_spec(m) for m in ("torch", "lightning", "h5py"))


if __name__ == "__main__":
    if _wants_bootstrap(sys.argv[1:]):
        ensure_env()
    from trainer.cli import main

    sys.exit(main(sys.argv[1:]))
