"""Checkpoints: everything a resume needs to continue the exact same trajectory.

One content, two containers (see moekit.parallel.checkpointing for the content):

    {"model": {...}, "optim": {...}, "meta": JSON text (step, sampler, config, tokenizer, layout),
     "rng": {"rank0": bytes, "rank1": bytes, ...}}

- ``checkpoint.pt``: one torch.save file of full tensors, written by a single process;
- ``checkpoint/``: a torch.distributed.checkpoint directory written by a parallel run, each
  rank saving its own pieces (with several nodes, the run directory must be on a shared
  filesystem). It loads into any layout, one process included; ``moekit export`` makes a
  consolidated single-device copy of the model.

Both are written atomically: a crash mid-save leaves the previous checkpoint loadable.
Each save removes the other container, so the newest checkpoint is the only one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT = "checkpoint.pt"
SHARDED = "checkpoint"


def rng_state() -> bytes:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()            # this rank's device
    return pickle.dumps(state)


def restore_rng(blob: bytes) -> None:
    rng = pickle.loads(blob)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _sharded_time(path: Path) -> float | None:
    """A sharded checkpoint counts only once its .metadata (written last) exists; dated by it."""
    meta = path / ".metadata"
    return meta.stat().st_mtime if meta.exists() else None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint (file or directory), or None."""
    run_dir = Path(run_dir)
    candidates = {}
    if (run_dir / CHECKPOINT).exists():
        candidates[run_dir / CHECKPOINT] = (run_dir / CHECKPOINT).stat().st_mtime
    for name in (SHARDED, SHARDED + ".old"):                  # .old: a crash between two renames
        if (run_dir / name).is_dir() and (t := _sharded_time(run_dir / name)) is not None:
            candidates[run_dir / name] = t
    if not candidates and (run_dir / SHARDED).is_dir():       # torn: let the reader say so
        return run_dir / SHARDED
    return max(candidates, key=candidates.get) if candidates else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """Rename first, then delete: a crash mid-delete leaves no half-deleted checkpoint/."""
    if path.exists():
        trash = path.with_name(path.name + ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


class _WriteErrors:
    """A binary file that remembers the first OSError of its writes (ENOSPC, EFBIG, EIO), which
    torch.save would otherwise turn into a RuntimeError that does not say what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(run_dir: Path, state: dict, meta: dict) -> Path:
    """Single process: write ``checkpoint.pt`` (to a temporary file, flushed to disk, then
    renamed over the old one)."""
    path, tmp = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".tmp")
    try:
        with open(tmp, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save({**state, "meta": json.dumps(meta), "rng": {"rank0": rng_state()}}, out)
            except RuntimeError:
                if out.error is not None:   # torch's zip writer reports a failed write as "unexpected pos"
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:      # a full disk (or a kill signal turned exception): no partial file left
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    _remove_dir(run_dir / SHARDED)                            # superseded
    return path


def save_sharded_checkpoint(run_dir: Path, state: dict, meta: dict) -> Path:
    """Every rank calls this: torch.distributed.checkpoint into ``checkpoint.tmp/``, then rank 0
    swaps it in for ``checkpoint/``."""
    import torch.distributed.checkpoint as dcp  # lazily: ~1 s of import every CLI start paid
    from torch.distributed.checkpoint.api import CheckpointException
    rank = dist.get_rank()
    final, tmp, old = run_dir / SHARDED, run_dir / (SHARDED + ".tmp"), run_dir / (SHARDED + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save({**state, "meta": json.dumps(meta), "rng": {f"rank{rank}": rng_state()}}, checkpoint_id=tmp)
    except CheckpointException as err:      # every rank raises it; the message is torch's traceback dump
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        errno_ = 28 if "No space left" in str(err) else None
        raise OSError(errno_, "no space left on device" if errno_ else "a rank could not write its shard",
                      str(tmp)) from None
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)            # a leftover from a crash mid-delete
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)        # superseded
    dist.barrier()
    return final


def _dcp_load(state: dict, path: Path) -> None:
    """dcp.load, collective in a parallel run; on one process without its notice about it.
    Its failures (a BaseException in torch) become one ValueError line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=path)
        except CheckpointException as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(" ")]
            cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
            raise ValueError(f"checkpoint {str(path)!r} could not be loaded ({cause[:300]}); check that it "
                             "is complete and was saved by this model, or restore it from a copy") from None


def _corrupt(path: Path, err: Exception) -> ValueError:
    return ValueError(f"checkpoint {str(path)!r} is corrupt or not a moekit checkpoint "
                      f"({type(err).__name__}); restore it from a copy or start a new run")


def _missing(run_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (expected {CHECKPOINT} or {SHARDED}/); "
                             "is this a moekit run directory?")


class Checkpoint:
    """A run's newest checkpoint, either container. ``meta`` is read on opening; tensors are read
    by ``load_into`` (resharded into any layout) or ``model_state`` (single process)."""

    def __init__(self, run_dir: Path):
        self.path = find_checkpoint(run_dir)
        if self.path is None:
            raise _missing(run_dir)
        self.sharded = self.path.is_dir()
        self._full = None
        self.legacy = False
        try:
            if self.sharded:   # a readable .metadata first (dcp.load would print tracebacks)
                import torch.distributed.checkpoint as dcp
                self._keys = set(dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata)
                holder = {"meta": ""}
                _dcp_load(holder, self.path)
                self.meta = json.loads(holder["meta"])
            else:
                self._full = torch.load(self.path, map_location="cpu", weights_only=False)
                if "meta" not in self._full and "optimizer" in self._full:   # before sharded checkpoints
                    self.meta = {k: self._full[k] for k in ("step", "sampler", "config", "tokenizer")
                                 if k in self._full}
                    self.legacy = True
                else:
                    self.meta = json.loads(self._full["meta"])
            self.meta["step"], self.meta["config"]
        except Exception as err:  # noqa: BLE001 - any read failure means the same thing here
            raise _corrupt(self.path, err) from None

    def require_resumable(self) -> None:
        if self.legacy:
            raise ValueError(f"checkpoint {str(self.path)!r} was written by an older moekit: eval, generate "
                             "and export read it, resuming does not; start a new run (or export the model)")

    def load_into(self, view: dict, rank: int = 0) -> bool:
        """Load model and optimizer into ``view`` (moekit.parallel.checkpointing.training_state)
        and this rank's RNG state if the checkpoint has one; returns whether it had."""
        from moekit.parallel.checkpointing import load_full_state
        self.require_resumable()
        if self.sharded:
            has = f"rng.rank{rank}" in self._keys    # ranks beyond the saving ones have none
            state = {**view, "rng": {f"rank{rank}": b""}} if has else view
            _dcp_load(state, self.path)                # one collective read on every rank
            if not has:
                return False
            blob = state["rng"][f"rank{rank}"]
        else:
            load_full_state(view, {k: self._full[k] for k in view})
            blob = self._full["rng"].get(f"rank{rank}")
            if blob is None:
                return False
        restore_rng(blob)
        return True

    def optimizer_state(self, params: dict) -> dict | None:
        """AdamW's state {parameter name: {"step", "exp_avg", "exp_avg_sq"}} in full tensors on
        one process (``params``: the model's named parameters, the template a sharded
        checkpoint is read into); None for an older checkpoint without it."""
        if self.legacy:
            return None
        if not self.sharded:
            return self._full.get("optim")
        names = [n for n in params if f"optim.{n}.exp_avg" in self._keys]
        holder = {"optim": {n: {"step": torch.tensor(0.0), "exp_avg": torch.empty_like(params[n]),
                                "exp_avg_sq": torch.empty_like(params[n])} for n in names}}
        _dcp_load(holder, self.path)
        return holder["optim"]

    def model_state(self, template: dict) -> dict:
        """The full model state dict on one process; ``template`` = a model's own state_dict()."""
        if not self.sharded:
            return self._full["model"]
        holder = {"model": {k: torch.empty_like(v) for k, v in template.items()}}
        _dcp_load(holder, self.path)
        return holder["model"]

