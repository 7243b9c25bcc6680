"""``HDF5SegDataModule``: the ``compressseg-h5`` layout (see :mod:`datamodules.schema`).

How arrays are read (``cache`` and ``memmap`` arguments; measured in ``README_data.md``):

* uncompressed contiguous datasets (what ``generate`` and ``convert`` write by default) are
  memory-mapped in place, one read-only map per process over the OS page cache that all
  ranks and workers of a node share;
* chunked/compressed datasets are decoded once per node into the memory-mapped cache of
  :mod:`datamodules.cache` (``cache="auto"``), or read with h5py hyperslabs every time
  (``cache="never"``; slow for compressed data, but needs no local disk).
"""
from __future__ import annotations

from typing import Literal

from datamodules.base import SegDataModule
from datamodules.cache import CacheStore, build_cache, cache_location, cache_ready
from datamodules.h5io import H5Store, iter_h5_cases, read_h5_description, read_h5_header, write_h5
from datamodules.store import CaseStore


class HDF5SegDataModule(SegDataModule):
    """Segmentation data from one ``compressseg-h5`` file.

    Args:
        path: the ``.h5`` file.
        spatial_dims: 2 or 3 (see :class:`~datamodules.base.SegDataModule`).
        patch_size: training crop, ``[H, W]`` or ``[D, H, W]``.
        memmap: map contiguous uncompressed datasets directly (fast). False reads them with
            h5py per sample (the naive baseline of the benchmark). Default True.
        **kwargs: every other argument of :class:`~datamodules.base.SegDataModule`
            (batch_size, num_workers, split, sampling, cache, augmentation, generate, ...).

    Example recipe::

        data:
          class_path: datamodules.hdf5.HDF5SegDataModule
          init_args:
            path: data/phantom2d.h5
            spatial_dims: 2
            patch_size: [96, 96]
            samples_per_epoch: 640
            generate: {cases: 40, shape: [16, 96, 96], seed: 0}
    """

    def __init__(
        self,
        path: str,
        spatial_dims: Literal[2, 3],
        patch_size: list[int],
        memmap: bool = True,
        **kwargs,
    ):
        self.memmap = bool(memmap)
        self._layout = None
        super().__init__(path, spatial_dims, patch_size, **kwargs)

    def _read_description(self) -> dict:
        return read_h5_description(self.path)

    def _write_cases(self, cases, num_classes, class_names, compression, preprocessing=None) -> None:
        write_h5(self.path, cases, num_classes=num_classes, class_names=class_names,
                 compression=compression, preprocessing=preprocessing)

    def _read_layout(self):
        """Header, byte offsets, and the cache location if the cache is used (else None)."""
        if self._layout is None:
            header, offsets = read_h5_header(self.path)
            mappable = all(o is not None for pair in offsets for o in pair)
            use_cache = self.cache == "always" or (self.cache == "auto" and not mappable)
            location = cache_location(self.cache_dir, [self.path]) if use_cache else None
            self._layout = (header, offsets, mappable, location)
        return self._layout

    def _prepare_source(self) -> None:
        header, _, _, location = self._read_layout()
        if location is not None and not cache_ready(location):
            build_cache(location, iter_h5_cases(self.path), num_classes=header.num_classes,
                        class_names=header.class_names, source=self.path)

    def _open_store(self) -> CaseStore:
        header, offsets, mappable, location = self._read_layout()
        if location is not None:
            return CacheStore(location)
        return H5Store(self.path, header, offsets, mode="memmap" if mappable and self.memmap else "h5py")
