"""trainer/inputs.py: files that are not files, YAML that explodes, folders that cannot be written."""
from __future__ import annotations

import os

import pytest

from hostile import make_fifo
from trainer.errors import UserError
from trainer.inputs import (MAX_YAML_NODES, check_yaml_text, file_problem, load_yaml_file, make_dirs, read_text_file,
                            require_file)


def alias_bomb(levels: int = 9) -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    prev = "a"
    for name in "bcdefghijk"[: levels - 1]:
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text


def test_file_problem_names_what_a_path_is(tmp_path):
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    fifo = make_fifo(tmp_path / "pipe")
    assert file_problem(tmp_path / "f") is None
    assert file_problem(tmp_path / "nope") == "does not exist"
    assert file_problem(tmp_path) == "is a directory, not a file"
    assert file_problem(tmp_path / "dangling") == "is a broken symbolic link"
    assert "FIFO" in file_problem(fifo)  # and nothing opened it: no hang
    assert "device" in file_problem("/dev/null")
    assert "parent in the path is a file" in file_problem(tmp_path / "f" / "x")
    with pytest.raises(UserError, match=r"^recipe .*pipe is a FIFO \(named pipe\), not a regular file$"):
        require_file(fifo, "recipe")


@pytest.mark.timeout(120)  # expanded, the bomb's 9**9 strings would never finish
def test_alias_bomb_is_refused_and_ordinary_aliases_pass():
    with pytest.raises(UserError, match=rf"expands to more than {MAX_YAML_NODES} nodes through its aliases"):
        check_yaml_text(alias_bomb(), "recipe x.yaml")
    check_yaml_text("base: &b {lr: 0.1, wd: 0.01}\nopt1: *b\nopt2: *b\n", "recipe")  # normal anchors still work


@pytest.mark.parametrize("text, words", [
    ("[" * 3000 + "]" * 3000, "nested too deeply"),
    ("x:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 400)), "nested too deeply"),
    ("&a [*a, *a]", "through its aliases"),  # an alias that contains itself
    ("a: [1, 2\n", "not valid YAML"),
])
def test_deep_recursive_and_broken_yaml_is_one_line(text, words):
    with pytest.raises(UserError, match=words) as info:
        check_yaml_text(text, "recipe r.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("recipe r.yaml:")


def test_oversized_and_binary_yaml_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 500_000)
    with pytest.raises(UserError, match="more than the .* allowed"):
        load_yaml_file(big, "recipe")
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x80\x02\x8a\x0a" + bytes(range(256)))  # a pickle renamed .yaml
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_text_file(binary, "recipe")


def test_make_dirs_reports_a_file_in_the_way_and_creates_nothing(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(UserError, match="blocker is a file, not a folder"):
        make_dirs(tmp_path / "blocker" / "a" / "b", "output out.h5")
    created = make_dirs(tmp_path / "new" / "deeper", "output")
    assert created == [str(tmp_path / "new"), str(tmp_path / "new" / "deeper")]
