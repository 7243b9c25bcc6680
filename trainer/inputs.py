"""Checks on files and YAML a user (or an attacker) hands to any command, before they are read.

* :func:`file_problem` / :func:`require_file`: a path must be a regular file. A directory, a
  device, a FIFO (opening one blocks forever), a socket or a broken link each get their own
  words instead of "does not exist" or a hang.
* :func:`check_yaml_text` / :func:`load_yaml_file`: YAML is size-limited and composed into
  PyYAML's node graph (aliases stay shared references there, so this is linear in the text)
  before anything builds Python objects from it. A graph whose expansion exceeds
  :data:`MAX_YAML_NODES` nodes (an alias bomb: 9 aliases of 9 aliases ... of a string expand
  to 9**9 strings and hang every consumer that walks or copies the tree) or nests deeper than
  :data:`MAX_YAML_DEPTH` levels is refused in one line.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError

MAX_YAML_BYTES = 4 * 2**20  # the largest shipped recipe is ~5 KB
MAX_YAML_NODES = 100_000  # nodes after expanding aliases
MAX_YAML_DEPTH = 100


def file_problem(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` is (a link to) a regular file, else what it is instead."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a parent in the path is a file)"
    except PermissionError:
        return "cannot be accessed (permission denied)"
    except OSError as exc:  # ELOOP, ENAMETOOLONG...
        return f"cannot be accessed ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device file" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    return f"is {kind}, not a regular file"


def require_file(path: str | os.PathLike, what: str) -> None:
    """Raise ``UserError("<what> <path> <problem>")`` unless ``path`` is a regular file."""
    problem = file_problem(path)
    if problem:
        raise UserError(f"{what} {os.fspath(path)} {problem}")


def check_yaml_text(text: str, where: str, syntax_errors: bool = True) -> None:
    """Refuse YAML that is too large, too deep or expands (through aliases) too far.

    ``syntax_errors=False`` ignores text that is not YAML at all (a command-line value that
    the recipe parser will treat as a plain string)."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where}: {len(text)} characters of YAML, more than the {MAX_YAML_BYTES} allowed")
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply to parse") from None
    except yaml.YAMLError as exc:
        if not syntax_errors:
            return
        raise UserError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    memo: dict[int, int] = {}
    total = sum(_expanded_size(node, memo, 0, where) for node in nodes if node is not None)
    if total > MAX_YAML_NODES:
        raise UserError(f"{where}: YAML expands to more than {MAX_YAML_NODES} nodes through its aliases; "
                        "an alias bomb? Write the values out")


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int, where: str) -> int:
    if depth > MAX_YAML_DEPTH:
        raise UserError(f"{where}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)")
    key = id(node)
    if key in memo:  # a shared (aliased) node: counted again, computed once
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a node that contains itself (recursive alias) is refused
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, depth + 1, where) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1, where) + _expanded_size(v, memo, depth + 1, where)
                       for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_YAML_NODES + 1)
    return memo[key]


def read_text_file(path: str | os.PathLike, what: str, limit: int = MAX_YAML_BYTES) -> str:
    """The text of a regular file no larger than ``limit`` bytes, as UTF-8."""
    require_file(path, what)
    size = os.path.getsize(path)
    if size > limit:
        raise UserError(f"{what} {os.fspath(path)} has {size} bytes, more than the {limit} allowed")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {os.fspath(path)} is not UTF-8 text (byte {exc.start}); is it the right file?") from None
    except OSError as exc:
        raise UserError(f"{what} {os.fspath(path)} cannot be read ({exc.strerror or exc})") from None


def load_yaml_text(text: str, where: str) -> Any:
    """``yaml.safe_load`` after :func:`check_yaml_text`; syntax errors are one line."""
    check_yaml_text(text, where)
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply to parse") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None


def load_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content, checked: regular file, size, aliases, depth, syntax."""
    return load_yaml_text(read_text_file(path, what), f"{what} {os.fspath(path)}")


# ----------------------------------------------------------------------------- output folders
def make_dirs(directory: str | os.PathLike, what: str) -> list[str]:
    """``os.makedirs`` that returns the folders it created (outermost first) and reports, in
    one line, a folder that cannot be written (read-only, a file in the way, permissions)."""
    directory = os.path.abspath(directory)
    missing, d = [], directory
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"cannot write {what}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK):  # also true for root on a read-only filesystem
        raise UserError(f"cannot write {what}: folder {d} is not writable")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        remove_dirs(missing[::-1])
        raise UserError(f"cannot write {what}: cannot create folder {directory} ({e.strerror or e})") from None
    return missing[::-1]


def check_writable(path: str | os.PathLike) -> None:
    """Raise unless ``path`` (a file or folder to be written) could be created: its nearest
    existing ancestor must be a writable folder. Nothing is created."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"cannot write {os.fspath(path)}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK):
        raise UserError(f"cannot write {os.fspath(path)}: folder {d} is not writable")


def remove_dirs(created: list[str]) -> None:
    """Remove folders made by :func:`make_dirs`, innermost first, where still empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break
