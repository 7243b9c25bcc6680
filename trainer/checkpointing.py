"""Checkpoints that survive kills: atomic writes, integrity checks, ``last`` resolution, ZeRO dirs.

* :class:`AtomicCheckpointIO` (added to every run by ``RecipeCLI``) writes a checkpoint to a
  temporary file in the same directory, fsyncs it, renames it over the target and fsyncs the
  directory: a kill leaves either the old file or the new one, never half of one. It loads
  with ``weights_only=True``.
* :func:`verify_checkpoint` checks a file's zip structure and every member's CRC (``torch.load``
  happily loads a file with flipped bytes), or a ZeRO directory's completeness.
* :func:`resolve_resume_path` turns ``--ckpt_path last`` / ``last-or-fresh`` into the checkpoint
  holding the latest training state (global step, batches, epochs and validations read from the
  checkpoint, among those of the most recent run) that passes :func:`verify_checkpoint`, says in
  one line which one and why, and reports (one line each) the ones it skips.
* :func:`load_checkpoint` returns a plain Lightning checkpoint dict for a ``.ckpt`` file or a
  DeepSpeed ZeRO directory (stages 0-3, consolidated to fp32), always with ``weights_only=True``.
"""
from __future__ import annotations

import io
import json
import pickle
import sys
import types
import zipfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trainer.atomic import atomic_file
from trainer.errors import UserError
from trainer.inputs import file_problem

#: ``--ckpt_path`` values resolved by :func:`resolve_resume_path`
LAST = "last"
LAST_OR_FRESH = "last-or-fresh"

ZERO_COMPLETE = "compressseg_complete.json"  # written by trainer.strategies after a full save
ZERO_WRITING = "compressseg_writing"  # present while trainer.strategies is writing a directory
_DEEPSPEED_KEYS = (
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
    "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
)


# ============================================================================ loading
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on CPU with ``weights_only=True``.

    ``path`` is a ``.ckpt`` file or a DeepSpeed ZeRO checkpoint directory (stages 0-3), which
    is consolidated into full fp32 weights under ``state_dict`` (keys as in the LightningModule),
    next to the run's own entries (``hyper_parameters``, ``compressseg``, ``loops``...).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return load_zero_checkpoint(path)
    problem = _file_problem(path)
    if problem:
        raise UserError(f"{path} is not a readable checkpoint ({problem})")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    return ckpt


def _torch_load(path: Path, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    unsafe = next((line for line in lines if "Unsupported global" in line), None)
    return (unsafe or (lines[0] if lines else type(exc).__name__)).strip()[:200]


# ============================================================================ integrity
def verify_checkpoint(path: str | Path) -> str | None:
    """``None`` if ``path`` looks complete and uncorrupted, else a short reason.

    Files: zip structure (truncation) and each member's CRC-32 (bit flips). ZeRO directories:
    not caught mid-write, all expected files present (see :func:`zero_checkpoint_problem`),
    each of them CRC-clean.
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        problem = zero_checkpoint_problem(path)
        if problem:
            return problem
        for f in sorted((path / _zero_tag(path)).glob("*.pt")):
            if problem := _file_problem(f):
                return f"{f.name}: {problem}"
        return None
    return _file_problem(path)


def _file_problem(path: Path) -> str | None:
    if problem := file_problem(path):  # a FIFO would block the read below; a device is no checkpoint
        return problem
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist()):
                return "zip without data.pkl: not written by torch.save"
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        return f"truncated or not a torch.save file: {exc}"
    except (OSError, EOFError, ValueError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    return f"corrupt: CRC mismatch in {bad}" if bad else None


# ============================================================================ ZeRO directories
def _zero_tag(path: Path) -> str:
    latest = path / "latest"
    return latest.read_text().strip() if latest.is_file() else "checkpoint"


def zero_checkpoint_problem(path: str | Path) -> str | None:
    """``None`` if the ZeRO directory ``path`` holds every file a consolidation needs, else what is missing.

    Layout (DeepSpeed via Lightning): ``latest`` names a tag folder holding the model states
    (``mp_rank_00_model_states.pt``; ZeRO-3: one ``zero_pp_rank_R_mp_rank_00_model_states.pt``
    per rank) and, for stages 1-3 and bf16, one ``*zero_pp_rank_R_mp_rank_00_optim_states.pt``
    per data-parallel rank R.
    """
    path = Path(path)
    if (path / ZERO_WRITING).exists():
        return f"was being written when its run stopped ({ZERO_WRITING} present)"
    if not (path / "latest").is_file():
        if (path.parent / "latest").is_file():
            return f"missing 'latest': pass the parent directory {path.parent}"
        return "missing file 'latest' (not a DeepSpeed checkpoint directory, or an incomplete one)"
    tag = _zero_tag(path)
    tag_dir = path / tag
    if not tag_dir.is_dir():
        return f"missing folder {tag}/ named by 'latest'"
    marker = path / ZERO_COMPLETE
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError):
            return f"unreadable {ZERO_COMPLETE}"
        for name, size in listed.items():
            f = path / name
            if not f.is_file():
                return f"missing {name} (listed in {ZERO_COMPLETE})"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {ZERO_COMPLETE} says {size}"
        return None
    # no marker: a stock Lightning/DeepSpeed directory; derive the expected files from it
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    zero3_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    first = model_file if model_file.is_file() else zero3_file
    if not first.is_file():
        return f"missing {tag}/mp_rank_00_model_states.pt (or {zero3_file.name} for ZeRO-3)"
    if problem := _file_problem(first):
        return f"{tag}/{first.name}: {problem}"
    states = _zero_load(first, mmap=True)
    world = int(states.get("dp_world_size", 1))
    stage = int((states.get("ds_config", {}).get("zero_optimization") or {}).get("stage", 0))
    has_optim_shards = any(tag_dir.glob("*_optim_states.pt"))
    missing = []
    for rank in range(world):
        if first is zero3_file and not (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file():
            missing.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        if (stage > 0 or has_optim_shards) and not any(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")):
            missing.append(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    if missing:
        return f"missing {', '.join(f'{tag}/{m}' for m in missing)} (written by {world} ranks, ZeRO stage {stage})"
    return None


def load_zero_checkpoint(path: str | Path) -> dict[str, Any]:
    """Consolidate a DeepSpeed ZeRO checkpoint directory into a Lightning checkpoint dict (fp32)."""
    path = Path(path)
    problem = zero_checkpoint_problem(path)
    if problem:
        raise UserError(f"ZeRO checkpoint {path} is incomplete: {problem}")
    tag_dir = path / _zero_tag(path)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        model_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = _zero_load(model_file)
    if any(tag_dir.glob("*_optim_states.pt")):
        # stages 1-3 and bf16 stage 0 keep the fp32 master weights in the optimizer shards
        with _deepspeed_weights_only():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            try:  # DeepSpeed prints progress to stdout; keep the CLI's output clean
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name)
            except (RuntimeError, ValueError, KeyError, FileNotFoundError, pickle.UnpicklingError) as exc:
                raise UserError(f"ZeRO checkpoint {path} cannot be consolidated: {_first_line(exc)}") from None
    else:  # stage 0: the engine's module state is the full model (bf16/fp16 masters: see below)
        weights = _stage0_weights(path, states)
    ckpt = {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
    ckpt["state_dict"] = {_strip(k, "_forward_module."): v.float() if v.is_floating_point() else v
                          for k, v in weights.items()}
    if "hyper_parameters" not in ckpt:
        raise UserError(f"ZeRO checkpoint {path} holds no Lightning state (no 'hyper_parameters'); was it written by Lightning?")
    return ckpt


def _stage0_weights(path: Path, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Stage 0 keeps the module in the training dtype; with bf16/fp16 the fp32 master weights
    are the optimizer's ``fp32_groups``, in the order of the module's trainable parameters."""
    module = dict(states["module"])
    low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    groups = (states.get("optimizer") or {}).get("fp32_groups") if isinstance(states.get("optimizer"), dict) else None
    if not low or not groups:
        return module
    buffers = set(states.get("buffer_names") or [])
    frozen = set((states.get("frozen_param_shapes") or {}).keys())
    names = [k for k in module if k not in buffers and k not in frozen]
    masters = [t for group in groups for t in (group if isinstance(group, (list, tuple)) else [group])]
    if len(masters) != len(names) or any(m.shape != module[n].shape for n, m in zip(names, masters)):
        _rank_zero_print(f"warning: {path}: fp32 master weights do not map onto the module; "
                         f"using its {module[low[0]].dtype} weights upcast to fp32")
        return module
    module.update({n: m.float() for n, m in zip(names, masters)})
    return module


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's plain-data classes found in optimizer shards (checked by the tests)."""
    out = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            out.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return out


def _zero_load(path: Path, mmap: bool = False) -> dict[str, Any]:
    try:  # model-state files hold only plain data (the optimizer shards need the allowlist)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint shard ({type(exc).__name__}: {_first_line(exc)})") from None


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` as seen by DeepSpeed's ``zero_to_fp32``, whose ``torch.load`` is forced to weights_only=True."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, **kwargs):  # noqa: ARG004 - overridden on purpose
        return torch.load(f, map_location=map_location, weights_only=True, **kwargs)


@contextmanager
def _deepspeed_weights_only() -> Iterator[None]:
    # zero_to_fp32 calls torch.load(..., weights_only=False) on every shard; DeepSpeed's own
    # consolidation logic is kept, but its loads go through weights_only=True with an allowlist
    # of DeepSpeed's plain-data classes.
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        zero_to_fp32.torch = original


# ============================================================================ atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and whose loads are ``weights_only=True``.

    Save: ``.NAME.XXXX.tmp`` in the target's directory -> ``torch.save`` -> fsync -> rename
    over the target -> fsync the directory. Leftover temporaries of a killed save of the same
    target are removed first. Remote paths (``s3://``...) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return _torch_load(path, map_location=map_location or (lambda storage, loc: storage))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a kill at any moment leaves the old file or the new one
    (temporaries a SIGKILL left behind are removed first: one writer owns a checkpoint path)."""
    with atomic_file(path, "wb", clean_stale=True) as fh:
        torch.save(obj, fh)


# ============================================================================ --ckpt_path last
def checkpoint_dirs(trainer) -> list[Path]:
    """Where a run's checkpoints may be: explicit ModelCheckpoint dirpaths, and every
    ``checkpoints/`` folder up to three levels below ``default_root_dir`` and the loggers'
    ``save_dir`` (Lightning's default ``<logger>/version_N/checkpoints`` changes with every run)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs: list[Path] = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            dirs.append(Path(cb.dirpath))
    roots = {Path(trainer.default_root_dir)}
    roots |= {Path(lg.save_dir) for lg in trainer.loggers if getattr(lg, "save_dir", None)}
    for root in sorted(roots):
        for pattern in ("checkpoints", "*/checkpoints", "*/*/checkpoints", "*/*/*/checkpoints"):
            dirs.extend(sorted(root.glob(pattern)))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def list_checkpoints(dirs: Iterable[Path]) -> list[Path]:
    """``*.ckpt`` files and ZeRO directories in ``dirs`` (resolved, each once, in name order)."""
    found = {p.resolve() for d in dirs if d.is_dir() for p in d.glob("*.ckpt") if not p.name.startswith(".")}
    return sorted(found)


def _mtime(path: Path) -> float:
    if path.is_dir():
        for name in (ZERO_COMPLETE, "latest"):
            if (path / name).exists():
                return (path / name).stat().st_mtime
    return path.stat().st_mtime


@dataclass(frozen=True)
class TrainingState:
    """Where a checkpoint stands in training, read from the checkpoint itself.

    ``order`` sorts checkpoints of one run by training progress: optimizer steps, then training
    batches (a checkpoint written mid-accumulation), then epochs ended (an epoch-end save after
    the last batch's save), then validation batches (a save after a validation).
    """

    path: Path
    global_step: int
    epoch: int
    train_batches: int
    epochs_ended: int
    val_batches: int
    writer: str | None  # the process that wrote it (RequeueOnSignal's id); None for other writers
    mtime: float

    @property
    def order(self) -> tuple[int, int, int, int]:
        return self.global_step, self.train_batches, self.epochs_ended, self.val_batches

    def brief(self) -> str:
        return f"{self.path.name} step {self.global_step}"


def read_training_state(path: Path) -> TrainingState:
    """The :class:`TrainingState` of a checkpoint file or ZeRO directory (cheap: tensors are
    memory-mapped, not read). Raises UserError when it cannot be read."""
    if path.is_dir():
        if problem := zero_checkpoint_problem(path):
            raise UserError(problem)
        tag_dir = path / _zero_tag(path)
        states = tag_dir / "mp_rank_00_model_states.pt"
        ckpt = _zero_load(states if states.is_file() else tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", mmap=True)
    else:
        if path.stat().st_size == 0:
            raise UserError("empty file")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise UserError(f"unreadable: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise UserError("not a Lightning training checkpoint (no 'global_step')")
    fit = (ckpt.get("loops") or {}).get("fit_loop") or {}

    def total(key: str, field: str) -> int:
        return int(((fit.get(key) or {}).get("total") or {}).get(field, 0))

    callbacks = ckpt.get("callbacks") or {}
    requeue_state = next((v for k, v in callbacks.items() if str(k).startswith("RequeueOnSignal")), None) or {}
    return TrainingState(
        path=path, global_step=int(ckpt["global_step"]), epoch=int(ckpt.get("epoch", 0)),
        train_batches=total("epoch_loop.batch_progress", "processed"),
        epochs_ended=total("epoch_progress", "processed"),
        val_batches=total("epoch_loop.val_loop.batch_progress", "processed"),
        writer=requeue_state.get("writer") if isinstance(requeue_state, dict) else None, mtime=_mtime(path))


def order_for_resume(states: list[TrainingState]) -> list[TrainingState]:
    """Resume candidates, best first: the checkpoints written by the most recent process (the
    writer of the newest file) by training progress, then each earlier writer's the same way.

    Training progress, not modification time, decides within a run: a monitor checkpoint
    (``best.ckpt``) or a copied ``last.ckpt`` can be newer on disk than a later training state.
    Grouping by writer keeps a stale checkpoint of an earlier, longer run in the same directory
    (or the abandoned branch of a run resumed from an older checkpoint) from winning.
    """
    groups: dict[str | None, list[TrainingState]] = {}
    for state in sorted(states, key=lambda s: s.mtime, reverse=True):
        groups.setdefault(state.writer, []).append(state)
    return [s for group in groups.values() for s in sorted(group, key=lambda s: (s.order, s.mtime), reverse=True)]


def resolve_resume_path(trainer, value: str | None, log=None) -> str | None:
    """Resolve ``last`` / ``last-or-fresh`` to the checkpoint with the latest training state; check explicit paths.

    ``last`` with no checkpoint is an error; ``last-or-fresh`` then starts from scratch. A
    checkpoint that cannot be read or fails :func:`verify_checkpoint` is reported in one line
    and the next candidate is used (order: :func:`order_for_resume`). The choice and its reason
    are logged in one line. Other values (``best``, ``hpc``, ``None``...) are returned unchanged.
    """
    log = log or _rank_zero_print
    if value not in (LAST, LAST_OR_FRESH):
        if value and Path(value).exists() and (problem := verify_checkpoint(value)):
            raise UserError(f"--ckpt_path {value}: {problem}")
        return value
    dirs = checkpoint_dirs(trainer)
    candidates = list_checkpoints(dirs)
    states = []
    for candidate in candidates:
        try:
            states.append(read_training_state(candidate))
        except UserError as problem:
            log(f"warning: skipping checkpoint {candidate}: {problem}")
    ordered = order_for_resume(states)
    for state in ordered:
        problem = verify_checkpoint(state.path)
        if problem is None:
            log(_resume_line(state, ordered))
            return str(state.path)
        log(f"warning: skipping checkpoint {state.path}: {problem}")
    where = ", ".join(str(d) for d in dirs) or f"{trainer.default_root_dir} (no checkpoints/ folder)"
    if candidates:
        raise UserError(f"--ckpt_path {value}: none of the {len(candidates)} checkpoints under {where} is usable (see warnings above)")
    if value == LAST_OR_FRESH:
        log(f"no checkpoint under {where}; starting fresh (--ckpt_path {LAST_OR_FRESH})")
        return None
    raise UserError(f"--ckpt_path last: no checkpoint under {where}; pass --ckpt_path {LAST_OR_FRESH} to start fresh when there is none")


def _resume_line(chosen: TrainingState, ordered: list[TrainingState]) -> str:
    same_run = [s for s in ordered if s.writer == chosen.writer and s is not chosen]
    earlier = len(ordered) - len(same_run) - 1
    others = ", ".join(s.brief() for s in same_run[:4]) + (", ..." if len(same_run) > 4 else "")
    why = (f"the latest training state of the {len(same_run) + 1} checkpoints its run wrote"
           + (f" (others: {others})" if others else "")
           + (f"; {earlier} from earlier runs not considered" if earlier else ""))
    return (f"resuming from {chosen.path}: global step {chosen.global_step}, epoch {chosen.epoch}, "
            f"{chosen.train_batches} training batches: {why}")


def _rank_zero_print(message: str) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


# ============================================================================ epoch-boundary resume
class LastBatchResumeFix(pl.Callback):
    """Makes a checkpoint written after the last training batch of an epoch resume exactly.

    Lightning 2.6 with a resumable (``StatefulDataLoader``) train loader: such a checkpoint
    (``ModelCheckpoint(every_n_train_steps=...)`` at the epoch's last batch) stores
    ``is_last_batch=True`` and a loader state "all batches yielded" (Lightning's fetcher stops
    by length, so the loader never marks itself finished). On resume, ``FitLoop.reset``
    counts the epoch as done without its ``on_train_epoch_end`` hooks, then runs an empty
    epoch (the loader resumes at its end) under the next epoch's number: one epoch of data is
    skipped (verified: the resumed run trains epoch N+2's batches as epoch N+1).

    Saving ``is_last_batch=False`` instead makes Lightning resume *inside* the finished epoch:
    the restored loader ends it at once, the epoch-end hooks run, and the next epoch starts
    normally, as in the uninterrupted run (only a validation due right after that batch is
    not repeated). Applied only when every train loader is resumable; otherwise Lightning's
    own handling is kept. Added to every run by ``RecipeCLI``; pinned by the kill-and-resume
    tests (tests/distributed/test_dist_resume.py).
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        fit_loop = trainer.fit_loop
        progress = fit_loop.epoch_loop.batch_progress
        saved_in_batch_end = progress.current.completed == progress.current.processed - 1
        if not (trainer.training and progress.is_last_batch and saved_in_batch_end):
            return
        loader = fit_loop._combined_loader
        if loader is None or not all(isinstance(dl, _Stateful) for dl in loader.flattened):
            return
        state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if isinstance(state, dict) and state.get("is_last_batch"):
            state["is_last_batch"] = False


# ============================================================================ always-on pieces
def always_on_trainer_kwargs(trainer_config: dict[str, Any]) -> dict[str, Any]:
    """``callbacks`` and ``plugins`` for ``Trainer(...)`` with the run-integrity pieces added.

    Added unless the recipe already has one of the kind: :class:`AtomicCheckpointIO`,
    ``RNGState`` (first, so it restores RNG before other callbacks draw), ``RequeueOnSignal``,
    :class:`LastBatchResumeFix`,
    and under SLURM ``SLURMEnvironment(auto_requeue=False)`` (requeue is ours, outside the
    signal handler; Lightning's auto-requeue would write a second checkpoint from inside it).
    """
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
    from lightning.pytorch.plugins.io import CheckpointIO

    from trainer.callbacks.requeue import RequeueOnSignal
    from trainer.callbacks.rng import RNGState

    callbacks = _as_list(trainer_config.get("callbacks"))
    if not any(isinstance(cb, RNGState) for cb in callbacks):
        callbacks.insert(0, RNGState())
    if not any(isinstance(cb, RequeueOnSignal) for cb in callbacks):
        callbacks.append(RequeueOnSignal())
    if not any(isinstance(cb, LastBatchResumeFix) for cb in callbacks):
        callbacks.append(LastBatchResumeFix())
    plugins = _as_list(trainer_config.get("plugins"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    envs = [p for p in plugins if isinstance(p, ClusterEnvironment)]
    for env in envs:
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            env.auto_requeue = False  # RequeueOnSignal requeues; two requeuers would fight
    if not envs and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"callbacks": callbacks, "plugins": plugins}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
