"""The one training loop: every trainer (`ldm train-vae`, `ldm train`, LoRA, ControlNet, upscaler) goes through
`fit`, which writes set-up, step, accumulation, DDP gradient sync, clipping, the non-finite guard, EMA, logging,
sample grids, atomic checkpoints and exact resume once.

A trainer is a `Task`: a list of `Stage`s (what is trained: parameter groups with their learning rates, and the
loss, a function of a micro-batch), the modules it averages (EMA), and what its checkpoint holds (`write_models`,
`state`, `resume`). To add one (ControlNet, upscaler):

    class MyTask(Task):
        def __init__(self, setup: Setup, ...):      # build models; load them from setup.run.checkpoint on resume
            self.items = setup.dataset
            self.stages = [Stage(groups=[(params, lr)], loss=self.loss, module=distributed.wrap(m, setup.runtime))]
            self.ema = [(EMA(m, decay), m)] if decay else []
        def loss(self, mb: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]: ...   # (loss, {"loss": loss, ...})
        def write_models(self, folder: Path) -> None: ...                       # what from_pretrained(run) loads

    fit(lambda setup: MyTask(setup, ...), run_config, output, resume, kind="mytask")

A second stage (the VAE's discriminator) has its own optimizer, precision and checkpoint keys; while one stage
runs, the other stages' parameters do not require gradients. Random numbers come from `MicroBatch.generators`
(one stream per image, a function of seed, step and place in the global batch), so a resumed run and any split of
the global batch over processes and accumulation steps give the same update.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import DataConfig
from ..errors import ConfigError, LatentDiffusionError
from ..messages import warn
from . import distributed
from .batches import BatchOrder, batch_order, open_dataset, sample_generators
from .config import TrainConfig
from .distributed import Runtime, all_reduce_mean
from .ema import EMA
from .optim import clip_gradients, lr_at, make_optimizer, optimizer_kind
from .precision import Precision
from .run import RunFolder


class NonFiniteLossError(LatentDiffusionError):
    """A loss or gradient became NaN or infinite; the run stopped before it reached a checkpoint."""


class EpochItems(Dataset):
    """Items addressed as (epoch, index), so that epoch-dependent preprocessing (random crops and flips) is the
    same in the main process and in every worker, and after a resume."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def batches(dataset: Dataset, order: BatchOrder, num_workers: int) -> Iterator[Any]:
    """This rank's micro-batches in `order`, loaded by `num_workers` processes. The loader draws its worker seed
    from a generator of its own, never from the global RNG, whose state a resume restores."""
    loader = DataLoader(EpochItems(dataset), batch_sampler=order, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator())
    return iter(loader)


def unscale_and_clip(optimizer: torch.optim.Optimizer, precision: Precision, max_norm: float) -> torch.Tensor:
    """Gradients back to their true scale, clipped; returns their total norm before clipping (a tensor)."""
    precision.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return clip_gradients(params, max_norm)


def to_host(values: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, float]:
    """Scalar tensors averaged over ranks and read back as floats: the step's one device sync."""
    stacked = torch.stack([v.detach().float().reshape(()).to(runtime.device) for v in values.values()])
    return dict(zip(values, all_reduce_mean(stacked, runtime).tolist()))


def finish_step(optimizer: torch.optim.Optimizer, precision: Precision, values: dict[str, float], step: int,
                policy: str, say=print) -> bool:
    """Step the optimizer unless the loss (or, outside fp16, whose scaler handles it, the gradient norm) is not
    finite: then raise NonFiniteLossError (policy "stop") or drop this step's gradients (policy "skip").
    Returns whether the weights were updated."""
    checked = {k: v for k, v in values.items() if k != "grad_norm" or precision.mode != "fp16"}
    bad = {k: v for k, v in checked.items() if not math.isfinite(v)}
    if bad and policy == "stop":
        raise NonFiniteLossError(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step + 1}: "
                                 "stopped; nothing from this step was saved. Lower train.learning_rate, or set "
                                 "train.on_nonfinite=skip to skip such steps")
    if bad:
        say(f"step {step + 1}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}: update skipped")
    else:
        precision.step(optimizer)
    precision.update()
    optimizer.zero_grad(set_to_none=True)
    return not bad


def due(step_done: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step_done` steps, or at the last step."""
    return every > 0 and (step_done % every == 0 or step_done == last)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, each module's previous mode after it."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


# ------------------------------------------------------------------------------------------------- the one loop
@dataclass
class MicroBatch:
    """One micro-batch as the loop hands it to a stage: the collated `batch`, optimizer step `step`, accumulation
    index `index` (of `count`), and where its images sit in the step's global batch (`first`, of `global_batch`),
    so that `generators()` gives each image its own random stream wherever it runs."""

    batch: Any
    step: int
    index: int
    count: int
    first: int
    seed: int
    global_batch: int

    def generators(self, size: int, group: int = 0) -> list[torch.Generator]:
        """One generator per image of the micro-batch (`size` images), from (seed, step, place in the global batch);
        group g > 0 gives a second set of images in each item (DreamBooth's class images) streams of their own."""
        return sample_generators(self.seed, self.step, self.first + group * self.global_batch, size)


@dataclass
class Stage:
    """One optimizer of a trainer: what it trains and what it minimises.

    groups:  (parameters, base learning rate) pairs, one AdamW parameter group each (a text encoder's own rate)
    loss:    inputs -> (scalar loss to minimise, {name: scalar tensor} to log), run under autocast
    module:  the (DistributedDataParallel-wrapped) module the loss calls, whose gradient all-reduce waits for the
             last accumulation micro-batch
    prepare: MicroBatch -> the loss's inputs, outside autocast and the gradient sync (encoding, caption dropout);
             None hands the MicroBatch itself to the loss
    active:  whether the stage runs at a step (a discriminator from its start step on)
    name:    "" for the model's own stage; else the prefix of its checkpoint keys ("disc" -> disc_optimizer)
    grad_norm_key: the name its gradient norm is logged under
    """

    groups: list[tuple[list[nn.Parameter], float]]
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    module: nn.Module
    prepare: Callable[[MicroBatch], Any] | None = None
    active: Callable[[int], bool] = lambda step: True
    name: str = ""
    grad_norm_key: str = "grad_norm"

    def __post_init__(self) -> None:
        self.groups = [(list(params), lr) for params, lr in self.groups]

    def key(self, what: str) -> str:
        return f"{self.name}_{what}" if self.name else what

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for params, _ in self.groups for p in params]


class Task:
    """What a trainer is: the stages it optimises, the modules it averages, and what its checkpoints hold. The
    defaults suit a task without EMA, extra state or sample grids; override what differs."""

    label: str = "train"  # the progress bar's
    stages: list[Stage]  # stage 0 is the model; later ones (a discriminator) step after it, on their own optimizer
    ema: Sequence[tuple[EMA, nn.Module]] = ()  # (average, the module it follows), updated after stage 0 steps
    items: Dataset  # what the batches are drawn from (the data set, cached latents, instance + class pairs)
    pixel_multiple: int = 8  # image sides must be multiples of this (aspect-ratio buckets follow it)
    curve: tuple[str, str] = ("loss", "loss")  # the metric drawn into RUN/loss.png, and its title

    def describe(self) -> str:
        """What is trained, for the opening line: "12.3M parameters (UNet)"."""
        return f"{sum(p.numel() for s in self.stages for p in s.params) / 1e6:.2f}M parameters"

    def postfix(self, values: dict[str, float], lr: float) -> dict[str, str]:
        """The progress bar's figures after a step."""
        return {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}

    def resume(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Restore what `state()` and `write_models` saved (EMA weights, a discriminator); the optimizers are the
        loop's."""

    def state(self) -> dict[str, Any]:
        """Extra training state for the checkpoint (plain data and tensors only)."""
        return {}

    def write_models(self, folder: Path) -> None:
        """Write the checkpoint's model files into `folder` (what from_pretrained(run) loads)."""
        raise NotImplementedError

    def save_samples(self, step: int) -> None:
        """Sample or reconstruction grids after `step` steps, on the main process (sample_every)."""

    def finished(self) -> str:
        """The closing line."""
        return ""


@dataclass
class Setup:
    """What a task is built from: the run folder (with the checkpoint to resume from), where it runs, its data."""

    run: RunFolder
    runtime: Runtime
    dataset: Dataset
    progress: bool = True  # progress bars for long work (sample grids, class images): the main process's, if asked


class RunConfig(Protocol):
    """What `fit` reads of a run config (VAERunConfig, LDMRunConfig, ControlNetRunConfig, UpscalerRunConfig)."""

    @property
    def train(self) -> TrainConfig: ...

    @property
    def data(self) -> DataConfig: ...


def fit(make_task: Callable[[Setup], Task], config: RunConfig, output: str | Path, resume: bool, kind: str,
        progress: bool = True, captions: bool = True) -> Path:
    """Run the task `make_task` builds into run folder `output` and return it (`kind`, e.g. "ldm", is written into
    its checkpoints; --resume refuses a run of another kind): set-up, then for every step each active stage's
    forward over the accumulation micro-batches, backward, clip, then one host sync, the non-finite guard,
    optimizer steps, EMA, log, samples and an atomic checkpoint. captions=False: the task trains on the images
    alone (a VAE), which then need no captions."""
    cfg = config.train
    runtime = distributed.setup(cfg.device)
    run = None
    try:
        run = RunFolder(output, runtime, resume, kind)
        if run.checkpoint is not None and run.start_step >= cfg.max_steps:
            if run.start_step > cfg.max_steps:
                raise ConfigError(f"--resume: {run.checkpoint} is at step {run.start_step}, past train.max_steps "
                                  f"{cfg.max_steps}: give --max-steps above {run.start_step} to train on")
            warn(f"--resume: {run.path} is already at train.max_steps {cfg.max_steps}: nothing to train (give "
                 "--max-steps above it to train on)")
            return run.path
        dataset = open_dataset(config.data, run.say, captions)
        torch.manual_seed(cfg.seed)
        task = make_task(Setup(run, runtime, dataset, progress and runtime.is_main))
        if config.data.buckets and task.items is not dataset:
            raise ConfigError("data.buckets needs the images themselves: it does not combine with train.cache_latents")
        order = batch_order(dataset, config.data, cfg, runtime, run.start_step, task.pixel_multiple, run.say)
        if cfg.warmup_steps > cfg.max_steps:
            warn(f"train.warmup_steps {cfg.warmup_steps} is more than train.max_steps {cfg.max_steps}: the whole run "
                 f"is warm-up, and the learning rate reaches only {cfg.max_steps / cfg.warmup_steps:.0%} of its peak")
        run.save_config(config)
        return _loop(task, kind, cfg, config.data.num_workers, run, runtime, order, progress)
    finally:
        if run is not None:
            run.release()
        distributed.teardown(runtime)


def _check_same_parameters(optimizer: torch.optim.Optimizer, saved: dict[str, Any], checkpoint: Path,
                           kind: str) -> None:
    """A resumed optimizer must be the checkpoint's kind (train.optimizer) and train what the checkpoint's trained:
    else a config key changed since (the optimizer state would land on the wrong tensors, or be another's)."""
    then_kind = optimizer_kind(saved)
    if then_kind != kind:
        raise ConfigError(f"--resume: {checkpoint} was trained with train.optimizer {then_kind}, this config sets "
                          f"{kind}; resume with the run's own config, or start a new run")
    now = [len(group["params"]) for group in optimizer.param_groups]
    then = [len(group["params"]) for group in saved["param_groups"]]
    if now != then:
        raise ConfigError(f"--resume: {checkpoint} trained {sum(then)} parameter tensors, this config trains {sum(now)}:"
                          " a key that chooses what is trained (train.decoder_only, train.lora.*, ...) changed since; "
                          "resume with the run's own config, or start a new run")


SETTING_KEYS = {"weight_decay": "train.weight_decay", "betas": "train.adam_betas"}  # the config's optimizer settings
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # how it runs, not what it computes


def restore_settings(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's optimizer state with this run's settings (weight decay, betas, Muon's momentum, ...) in place
    of the saved ones, as diffusers' and kohya's scripts resume: a changed setting applies from the resumed step on,
    with a warning naming it. The learning rate is set every step from the schedule anyway."""
    groups = []
    changed: dict[str, tuple[Any, Any]] = {}
    for now, then in zip(optimizer.param_groups, saved["param_groups"]):
        group = dict(then)
        for key, value in now.items():
            if key in ("params", "lr", "initial_lr") or key not in then:
                continue
            same = list(value) == list(then[key]) if isinstance(value, (list, tuple)) else value == then[key]
            if not same and key not in _IMPLEMENTATION:
                changed.setdefault(key, (then[key], value))
            group[key] = value
        groups.append(group)
    for key, (then, now) in changed.items():
        then, now = (list(v) if isinstance(v, tuple) else v for v in (then, now))
        warn(f"--resume: {SETTING_KEYS.get(key, f'optimizer setting {key!r}')} changed since the checkpoint "
             f"({then} -> {now}): the new value applies from the resumed step on")
    return {**saved, "param_groups": groups}


def _loop(task: Task, kind: str, cfg: TrainConfig, num_workers: int, run: RunFolder, runtime: Runtime, order: BatchOrder,
          progress: bool) -> Path:
    say, stages = run.say, task.stages
    optimizers = [make_optimizer(s.groups, cfg.optimizer, cfg.adam_betas, cfg.weight_decay, s.module) for s in stages]
    precisions = [Precision(cfg.mixed_precision, runtime.device) for _ in stages]
    if run.checkpoint:
        for stage, optimizer, precision in zip(stages, optimizers, precisions):
            _check_same_parameters(optimizer, run.state[stage.key("optimizer")], run.checkpoint, cfg.optimizer)
            optimizer.load_state_dict(restore_settings(optimizer, run.state[stage.key("optimizer")]))
            precision.scaler.load_state_dict(run.state[stage.key("scaler")])
        task.resume(run.state, run.checkpoint)
        run.restore_rng()
    say(f"training {task.describe()} on {runtime.device}, precision {precisions[0].mode}, "
        f"steps {run.start_step} -> {cfg.max_steps}")

    data = batches(task.items, order, num_workers)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not (progress and runtime.is_main),
               desc=task.label, dynamic_ncols=True)
    window: dict[str, list[float]] = defaultdict(list, run.state.get("window", {}))  # the steps since the last log
    started, skipped = time.perf_counter(), run.state.get("skipped", 0)
    accumulation = cfg.gradient_accumulation
    for step in range(run.start_step, cfg.max_steps):
        micro = [MicroBatch(next(data), step, i, accumulation, order.first_position(i), cfg.seed, order.global_batch)
                 for i in range(accumulation)]
        active = [i for i, stage in enumerate(stages) if stage.active(step)]
        terms: dict[str, torch.Tensor] = {}
        owned: dict[int, list[str]] = {}  # the logged values of each stage: what its non-finite guard checks
        for i in active:
            stage, optimizer, precision = stages[i], optimizers[i], precisions[i]
            for group, (_, base_lr) in zip(optimizer.param_groups, stage.groups):
                group["lr"] = lr_at(step, base_lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule)
            if len(stages) > 1:  # one stage's loss must not reach another's weights (the generator's, the critic's)
                for other in stages:
                    other_trains = other is stage
                    for p in other.params:
                        p.requires_grad_(other_trains)
            for mb in micro:
                inputs = stage.prepare(mb) if stage.prepare is not None else mb
                with distributed.sync_gradients(stage.module, mb.index == accumulation - 1):
                    with precision.autocast():
                        loss, parts = stage.loss(inputs)
                    precision.backward(loss / accumulation)
                for key, value in parts.items():
                    terms[key] = terms.get(key, 0) + value.detach() / accumulation
                owned[i] = list(parts)
            terms[stage.grad_norm_key] = unscale_and_clip(optimizer, precision, cfg.grad_clip)
        values = to_host(terms, runtime)
        lr = optimizers[0].param_groups[0]["lr"]
        for i in active:
            own = {**{k: values[k] for k in owned[i]}, "grad_norm": values[stages[i].grad_norm_key]}
            updated = finish_step(optimizers[i], precisions[i], own, step, cfg.on_nonfinite, say)
            if i == 0 and updated:
                for average, module in task.ema:
                    average.update(module, step - skipped)
            elif i == 0:
                skipped += 1

        done = step + 1
        for key, value in values.items():
            window[key].append(value)
        bar.update(1)
        bar.set_postfix(task.postfix(values, lr))
        if due(done, cfg.log_every, cfg.max_steps):
            elapsed = time.perf_counter() - started
            run.metrics.log({"step": done, **{k: sum(v) / len(v) for k, v in window.items()}, "lr": lr,
                             "skipped": skipped, "elapsed_sec": elapsed,
                             "images_per_sec": (done - run.start_step) * order.global_batch / elapsed})
            window.clear()
        if due(done, cfg.sample_every, cfg.max_steps) and runtime.is_main:
            task.save_samples(done)
        if due(done, cfg.checkpoint_every, cfg.max_steps):
            state = {"kind": kind, "skipped": skipped, "epoch": step // order.steps_per_epoch,
                     "position": done % order.steps_per_epoch,
                     "window": {k: list(v) for k, v in window.items()}, **task.state()}
            for stage, optimizer, precision in zip(stages, optimizers, precisions):
                state[stage.key("optimizer")] = optimizer.state_dict()
                state[stage.key("scaler")] = precision.scaler.state_dict()
            run.save_checkpoint(done, task.write_models, state, cfg.keep_checkpoints)
            run.metrics.plot(*task.curve)
    bar.close()
    say(task.finished())
    return run.path
