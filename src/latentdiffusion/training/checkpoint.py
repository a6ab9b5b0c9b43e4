"""Training checkpoints: written whole or not at all, pruned to the newest K, read back for an exact resume.

A checkpoint is `RUN/checkpoints/step-XXXXXXXX/`: a native model folder (`formats.native`), EMA weights in `ema/`,
and `training_state.pt` (optimizer, scaler, step, data position, RNG states). It is built as a hidden sibling
(`.tmp-step-...`), fsynced, then renamed into place, so `list_checkpoints` never sees a partial one; old ones are
renamed away (`.trash-...`) before they are deleted for the same reason. Leftovers of either kind are removed
when a run starts.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import WeightsError
from ..formats.native import CHECKPOINTS_DIR, checkpoint_dir_name, list_checkpoints

STATE_FILE = "training_state.pt"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove half-written and half-deleted checkpoints left by a killed run; returns their names."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return sorted(p.name for p in leftovers)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest whole checkpoint of a run that can be resumed from, or None."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    path = checkpoints[-1][1]
    if not (path / STATE_FILE).is_file():
        raise WeightsError(f"{path} holds no {STATE_FILE}: it is a model folder, not a resumable checkpoint")
    return path


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Call write(folder) on a fresh hidden folder, fsync it, rename it to step-XXXXXXXX, keep the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a run restarted from scratch): replace it whole
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _discard(old)
    return final


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """The resumable training state (tensors, numbers, strings, lists and dicts only)."""
    torch.save(state, folder / STATE_FILE)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """Read `training_state.pt` with weights_only=True: a checkpoint can never run code."""
    path = checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or holding objects other than plain data
        raise WeightsError(f"cannot read the training state {path}: {e}") from None


def rng_state() -> dict[str, Any]:
    """Every global random state a step may touch: Python, NumPy, torch CPU and CUDA."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _discard(path: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete at leisure."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
