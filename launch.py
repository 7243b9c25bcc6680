#!/usr/bin/env python3
"""Entry point: ``python3 launch.py COMMAND ...``.

Commands:
    main                     install if needed, then run the demo job on phantom data
    test [pytest args]       install if needed, then run the test suite
    setup                    only create/update the .venv
    fit|validate|test|predict --config recipes/X.yaml   (LightningCLI)
    export --ckpt PATH --format onnx --out DIR
    verify ARTIFACT_DIR [--data FILE]          re-verify an export here (deployment machine), exit 0/2
    quantize --ckpt PATH --out NEW.ckpt        post-training quantization
    distill-cache --teacher CKPT --data-config recipes/X.yaml --out FILE
    data generate|convert|inspect ...
    submit --config recipes/X.yaml --nodes N --gpus-per-node G --time HH:MM:SS
    pipeline recipes/pipeline_X.yaml
    report RUN_DIR

``test`` with no further words runs the suite; ``test --config ...`` is Lightning's test.
"""
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
