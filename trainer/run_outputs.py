"""Folders a run creates, removed again when the run fails before writing anything into them.

A run that stops on a bad recipe value, a bad checkpoint or bad data after the Trainer exists
would otherwise leave ``<root>/logs/version_0`` holding only ``config.yaml``/``hparams.yaml``
(and the next run would log to ``version_1``). :data:`FRESH_OUTPUTS` notes, when the Trainer is
built, which of its output folders do not exist yet; after a failure it removes each of them
that holds nothing but such bookkeeping files. Folders with a checkpoint or logged metrics
are kept: they record what the failed run did.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

#: files a run writes before it has done anything (LightningCLI's config, the logger's hparams)
BOOKKEEPING = {"config.yaml", "hparams.yaml"}


def _only_bookkeeping(folder: Path) -> bool:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if name in BOOKKEEPING:
                continue
            if name == "metrics.csv" and _lines(path) <= 1:  # a header and no metric row
                continue
            return False
    return True


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 2


class FreshOutputs:
    """Output folders of this process's run that did not exist before it."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def note(self, *paths) -> None:
        for p in paths:
            if p and "://" not in str(p) and not os.path.lexists(p):
                self.paths.append(Path(p))

    def note_trainer(self, trainer) -> None:
        """The Trainer's root, its loggers' folders and its checkpoint folders."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        paths = [trainer.default_root_dir]
        for logger in trainer.loggers:
            for attr in ("save_dir", "root_dir", "log_dir"):
                try:  # computing a CSV/TensorBoard log_dir picks the next version, creates nothing
                    paths.append(getattr(logger, attr, None))
                except Exception:  # noqa: BLE001 - a logger that cannot tell is simply not tracked
                    pass
        paths += [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        self.note(*paths)

    def remove_empty(self) -> None:
        """Remove the noted folders that exist now and hold only bookkeeping files."""
        for path in sorted(set(self.paths), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and _only_bookkeeping(path):
                shutil.rmtree(path, ignore_errors=True)  # other ranks may race us to it
        self.paths.clear()


FRESH_OUTPUTS = FreshOutputs()
