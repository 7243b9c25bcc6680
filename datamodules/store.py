"""Random access to the arrays of a dataset's cases, the one thing each format must provide.

A store hands out *array-likes* (``numpy.memmap``, ``h5py.Dataset`` or ``numpy.ndarray``) that
support basic slicing, so the datasets in :mod:`datamodules.datasets` read only the region a
sample needs, whatever the format. Stores are pickled into DataLoader workers; file handles
are opened lazily in the process that uses them and dropped on pickling (an HDF5 handle
inherited through ``fork`` is not safe to use).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from datamodules.schema import CaseInfo, DatasetHeader


class CaseStore:
    """Base class: ``header`` plus ``image(i)`` / ``label(i)`` array-likes for case ``i``.

    Subclasses implement :meth:`_open` (returns the per-process handle state) and
    :meth:`_arrays`; the base class takes care of per-process lazy opening.
    """

    header: DatasetHeader

    def __init__(self, header: DatasetHeader):
        self.header = header
        self._handles: Any = None
        self._pid: int | None = None

    # -- per-process handles ---------------------------------------------------------------
    def _open(self) -> Any:
        return None

    def _close(self, handles: Any) -> None:
        pass

    def handles(self) -> Any:
        if self._pid != os.getpid():  # first use here, or inherited through fork: reopen
            self._handles, self._pid = self._open(), os.getpid()
        return self._handles

    def close(self) -> None:
        if self._handles is not None and self._pid == os.getpid():
            self._close(self._handles)
        self._handles, self._pid = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = None, None
        return state

    # -- data ----------------------------------------------------------------------------------
    def image(self, i: int):
        raise NotImplementedError

    def label(self, i: int):
        raise NotImplementedError

    @property
    def cases(self) -> list[CaseInfo]:
        return self.header.cases

    def __len__(self) -> int:
        return len(self.header.cases)


class ArrayStore(CaseStore):
    """Cases held in memory (tests, the benchmark's baseline, small in-process datasets)."""

    def __init__(self, header: DatasetHeader, images: list[np.ndarray], labels: list[np.ndarray]):
        super().__init__(header)
        self._images, self._labels = images, labels

    def image(self, i: int) -> np.ndarray:
        return self._images[i]

    def label(self, i: int) -> np.ndarray:
        return self._labels[i]


def read_region(array, starts, sizes) -> np.ndarray:
    """Read ``array[..., s0:s0+n0, s1:s1+n1, ...]`` over the trailing axes, zero-padded.

    ``starts`` may be negative and regions may run past the end: the part outside the array
    is filled with 0 (image background after normalisation, label background). Only the
    in-bounds part is read from ``array``, in one slicing call (one hyperslab for h5py).
    """
    k = len(starts)
    shape = array.shape[-k:]
    lead = tuple(array.shape[:-k])
    src, dst, inside = [], [], True
    for s, n, full in zip(starts, sizes, shape):
        lo, hi = max(int(s), 0), min(int(s) + int(n), full)
        if hi <= lo:
            inside = False
            break
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out_shape = lead + tuple(int(n) for n in sizes)
    if inside and all(d.start == 0 and d.stop == n for d, n in zip(dst, sizes)):
        out = array[(Ellipsis, *src)]  # the common case: fully inside, one read
        # views (memmap, in-memory arrays) are copied so callers may modify the result;
        # h5py already returns a fresh array
        if not isinstance(out, np.ndarray) or out.base is not None or not out.flags.writeable:
            out = np.array(out)
        return out
    out = np.zeros(out_shape, dtype=array.dtype)
    if inside:
        out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out
