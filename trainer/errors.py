"""User-facing errors.

Anything a user can cause (a bad recipe key, a missing file, a wrong shape) raises
``UserError`` with a one-line message that names the culprit (file, key, shape or value) and,
where there is one, the fix. ``launch.py`` prints it as ``error: <message>`` and exits with
status 2; tracebacks are kept for bugs.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported in one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
