"""Atomic checkpoints: everything a resume needs to continue the exact same trajectory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write to a temporary file, then rename over the old checkpoint: a crash mid-write
    leaves the previous checkpoint intact."""
    path = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    state = {**state, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}}
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (expected {CHECKPOINT}); "
                                "is this a moekit run directory?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["model"], state["step"]
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a moekit checkpoint "
                         f"({type(err).__name__}); restore it from a copy or start a new run") from None
    return state


def restore_rng(state: dict) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
