"""A training run's output folder: what is in it, whether to resume, and where each artefact goes.

    RUN/run.lock                         while a run writes here: its pid, host, start and command (lock.py)
    RUN/config.yaml                      the resolved config (every default spelled out)
    RUN/metrics.jsonl, RUN/loss.png      logged metrics and the loss curve
    RUN/samples/step-XXXXXXXX.png        sample grids (LDM) or reconstruction grids (VAE)
    RUN/checkpoints/step-XXXXXXXX/       model folders + training state (see checkpoint.py)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm.auto import tqdm

from ..arguments import writable_path
from ..errors import ConfigError
from ..formats.native import CHECKPOINTS_DIR, checkpoint_dir_name, list_checkpoints
from . import checkpoint
from .config import save_run_config
from .distributed import Runtime, barrier, gather_objects
from .lock import RunLock
from .metrics import MetricsLog

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"


class RunFolder:
    """Prepares RUN for this process: rank 0 checks it can write there, takes the folder's lock (one run at a time,
    until `release`) and removes a killed run's leftovers; every rank finds the checkpoint to resume from. A fresh
    run refuses a folder that already holds checkpoints (they would be mixed up). A run that fails while setting up
    leaves no empty folder behind."""

    def __init__(self, output: str | Path, runtime: Runtime, resume: bool, kind: str):
        self.path, self.runtime = Path(output), runtime
        self.lock = RunLock(self.path)
        if runtime.is_main:
            writable_path(self.path, "--output", folder=True)
            self.lock.acquire()
        try:
            self._open(resume, kind)
        except BaseException:
            self.release()
            raise

    def _open(self, resume: bool, kind: str) -> None:
        runtime = self.runtime
        if runtime.is_main:
            removed = checkpoint.clean_leftovers(self.path)
            if removed:
                self.say(f"removed unfinished checkpoint leftovers in {self.path / CHECKPOINTS_DIR}: "
                         f"{', '.join(removed)}")
        barrier(runtime)
        latest = checkpoint.latest_checkpoint(self.path)
        self.checkpoint = latest if resume else None
        if resume and self.checkpoint is None:
            self.say(f"--resume: {self.path} holds no whole checkpoint yet; starting from the beginning")
        if not resume and list_checkpoints(self.path):
            there = checkpoint.load_state(latest).get("kind") if latest is not None else kind
            if there != kind:  # what it holds first: resuming it would be refused too
                raise ConfigError(f"--output {self.path} holds a {there} training run, not a {kind} one: choose "
                                  "another --output folder")
            raise ConfigError(f"--output {self.path} already holds checkpoints of a run: pass --resume to continue it, "
                              "or choose another --output folder")
        self.state: dict[str, Any] = checkpoint.load_state(self.checkpoint) if self.checkpoint else {}
        if self.state and self.state.get("kind") != kind:
            raise ConfigError(f"--output {self.path} holds a {self.state.get('kind')} training run, not a {kind} one")
        if self.checkpoint is not None:
            self.say(f"resuming from {self.checkpoint}")
        self.start_step: int = self.state.get("step", 0)
        self.metrics = MetricsLog(self.path, self.start_step if self.checkpoint else None, runtime.is_main)

    def release(self) -> None:
        """The run is over (finished or failed): let the next one into the folder."""
        self.lock.release()

    def say(self, message: str) -> None:
        """One line for the user, on stderr above the progress bar, from the main process only."""
        if self.runtime.is_main:
            tqdm.write(message, file=sys.stderr)

    def save_config(self, config: Any) -> None:
        """Write the resolved config; on a resume, first say if it trains in another memory layout than the run did
        (a run whose config.yaml predates train.channels_last trained NCHW): the resume is then equal to an
        unbroken run only to float rounding."""
        before = self.path / CONFIG_FILE
        if self.checkpoint is not None and before.is_file():
            then = (yaml.safe_load(before.read_text()) or {}).get("train", {}).get("channels_last", False)
            if then != config.train.channels_last:
                self.say(f"note: {self.path} trained with train.channels_last {str(then).lower()}, this config says "
                         f"{str(config.train.channels_last).lower()}: the resumed steps match an unbroken run only to "
                         f"float rounding (--set train.channels_last={str(then).lower()} keeps them bit-exact)")
        if self.runtime.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            save_run_config(config, self.path / CONFIG_FILE)

    def sample_path(self, step: int) -> Path:
        folder = self.path / SAMPLES_DIR
        folder.mkdir(exist_ok=True)
        return folder / f"{checkpoint_dir_name(step)}.png"

    def save_checkpoint(self, step: int, write_models: Callable[[Path], None], state: dict[str, Any], keep: int) -> None:
        """Every rank calls this (the RNG states of all ranks are gathered); rank 0 writes the checkpoint of the
        `step` steps done: models via write_models(folder), then the training state."""
        state = {**state, "step": step, "world_size": self.runtime.world_size,
                 "rng": gather_objects(checkpoint.rng_state(), self.runtime)}
        if self.runtime.is_main:

            def write(folder: Path) -> None:
                write_models(folder)
                checkpoint.save_state(folder, state)

            checkpoint.write_checkpoint(self.path, step, write, keep)
        barrier(self.runtime)

    def restore_rng(self) -> None:
        """This rank's global RNG states as they were when the checkpoint was written."""
        if not self.state:
            return
        states = self.state["rng"]
        if len(states) != self.runtime.world_size:
            self.say(f"the checkpoint was written by {len(states)} processes, this run has "
                     f"{self.runtime.world_size}: the data order and random streams will differ from an unbroken run")
        checkpoint.set_rng_state(states[min(self.runtime.rank, len(states) - 1)])
