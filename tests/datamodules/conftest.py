"""Tiny phantom files in every format, made once per session (seconds)."""
from __future__ import annotations

import pytest

from dmhelpers import FORMATS, phantom_cases, write_format


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict:
    """``data_files[(fmt, dims)]`` -> path, for fmt in FORMATS and dims in (2, 3)."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for dims in (2, 3):
        for fmt in FORMATS:
            ext = {"h5": ".h5", "h5-lzf": ".lzf.h5", "tfrecord": ".tfrecord", "tfrecord.gz": ".tfrecord.gz"}[fmt]
            files[fmt, dims] = write_format(str(root / f"phantom{dims}d{ext}"), fmt, phantom_cases(dims))
    return files
