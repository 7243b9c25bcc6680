"""trainer/atomic.py: the one way files are replaced in place."""
from __future__ import annotations

import h5py
import pytest

from trainer import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "run" / "status.json"
    atomic.write_text(target, "old")  # creates the folder
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_file(target, "w") as fh:
            fh.write("half")
            raise KeyboardInterrupt  # a kill signal raised mid-write
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["status.json"]
    atomic.write_text(target, "new")
    assert target.read_text() == "new"


def test_a_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "cache.h5"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".cache.h5.") and not target.exists()
        with h5py.File(tmp, "w") as f:
            f["x"] = [1, 2, 3]
    with h5py.File(target, "r") as f:
        assert list(f["x"][...]) == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["cache.h5"]
