"""The pretraining loop: devices, precision, DDP, accumulation, schedules, checkpoints, tracking.

Losses and models stay pure modules; this is the one place that owns devices, the process group,
files and the experiment tracker. One :class:`Trainer` runs one MLflow run, on one process or on
each process that ``torchrun`` starts (only rank 0 logs and writes checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import logging
import math
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from medssl.data.datasets import SkippedEntries
from medssl.models.joint import JointModel
from medssl.objectives.joint import SepBatch, StackBatch
from medssl.runtime.checkpoints import (
    checkpoint_step,
    checksum_path,
    load_checkpoint,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medssl.runtime.files import atomic_write_text, remove_stale_temporaries
from medssl.runtime.preflight import check_room, check_writable, checkpoint_bytes
from medssl.runtime.progress import Progress, progress
from medssl.runtime.seeding import seed_everything
from medssl.train.alarms import UniformPredictionAlarm, frozen_prototypes_warning
from medssl.train.config import PretrainConfig, optimizer_settings, to_container
from medssl.train.distributed import (
    DistributedContext,
    broadcast_object,
    raise_any_rank_error,
    setup_distributed,
    teardown_distributed,
)
from medssl.train.initialise import initialise_model
from medssl.train.loaders import StepTimer, Stream, to_device
from medssl.train.methods import method_named
from medssl.train.optim import build_optimizer, set_schedule_values
from medssl.train.pipeline import build_streams, needed_streams, prepare_data
from medssl.train.prepared import PreparedData
from medssl.train.schedules import warmup_cosine

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medssl-pretrain/1"
# trainer.max_minutes: the run's length comes from the median seconds per step of a process's steps
# CALIBRATION_SKIP + 1 .. CALIBRATION_STEPS (the first ones include the loader workers' start-up), planned to end at
# BUDGET_MARGIN of the budget (checkpoints, logging and the final export need the rest).
CALIBRATION_SKIP = 2
CALIBRATION_STEPS = 8
BUDGET_MARGIN = 0.92


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


@dataclass
class TrainResult:
    status: str  # "finished" or "interrupted"
    step: int
    run_name: str
    output_dir: Path
    run_id: str | None = None
    artifact_uri: str | None = None
    checkpoint: Path | None = None
    backbone: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunState:
    """Everything a checkpoint restores."""

    run_name: str
    run_dir: Path
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    streams: dict[str, Stream]
    step: int = 0
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    calibration: dict[str, Any] | None = None  # trainer.max_minutes: the calibrated length and scaled step counts
    streams_dropped: list[str] = field(default_factory=list)  # loss terms without data (a 2D-only archive)


class MetricWindow:
    """Step metrics averaged between two log steps, with throughput and the data-wait fraction."""

    def __init__(self) -> None:
        self.timer = StepTimer()
        self.sums: dict[str, float] = {}
        self.events: dict[str, float] = {}  # once-per-epoch values (k-means), logged as they are
        self.steps = 0
        self.samples = 0

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples

    def close(self, epoch: int) -> dict[str, float]:
        """The window's averages (``throughput/*``, ``epoch`` included); starts a new window."""
        metrics = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        metrics.update(self.events)
        metrics["throughput/samples_per_s"] = self.samples / max(self.timer.total_seconds, 1e-9)
        metrics["throughput/data_wait_fraction"] = self.timer.fraction("data")
        metrics["throughput/augment_fraction"] = self.timer.fraction("augment")
        metrics["epoch"] = float(epoch)
        self.sums, self.events, self.steps, self.samples = {}, {}, 0, 0
        self.timer.reset()
        return metrics


@dataclass
class _Run:
    """What a running loop holds fixed: process group, objective (and its DDP wrapper), optimiser, streams, tracking."""

    ctx: DistributedContext
    objective: nn.Module
    wrapped: nn.Module
    model: JointModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    streams: dict[str, Stream]
    data: PreparedData
    tracker: Any
    channels_last: bool
    autocast: Callable[[], Any]
    alarm: UniformPredictionAlarm
    bar: Progress
    clip_grad: float = 0.0
    stop: _StopRequest | None = None

    @property
    def primary(self) -> Stream:
        """The stream whose epochs count (the 2D images when there are any)."""
        return self.streams.get("images") or next(iter(self.streams.values()))


@dataclass
class _Loop:
    """What changes as the loop runs: the run state, its length and schedules (a calibration resets them), the
    metric window, the clock stamps of the calibration, how the run ended."""

    state: RunState
    max_steps: int
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    calibrating: bool
    start: float = 0.0
    stamps: list[float] = field(default_factory=list)
    window: MetricWindow = field(default_factory=MetricWindow)
    last_metrics: dict[str, float] = field(default_factory=dict)
    status: str = "finished"


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """``None`` for fp32; bf16 where the GPU supports it, fp16 (with loss scaling) on older GPUs."""
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_run_name(config: PretrainConfig) -> str:
    return f"{config.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_resume_checkpoint(
    config: PretrainConfig, run_dir: Path | None, warn: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]] | None:
    """What ``trainer.resume`` points at, read: ``auto`` (this run name's folder, if it has checkpoints), a run
    folder, a checkpoint file, or nothing (``null``).

    From a run folder the newest checkpoint that loads is used: one that is missing, truncated or fails its checksum is
    skipped for the one before it, and ``warn`` names it. A checkpoint file given by name is used or refused as is.

    Raises:
        FileNotFoundError: ``trainer.resume`` names nothing there.
        ValueError: no checkpoint of the folder loads, or one is not a plain weights file (never skipped).
    """
    resume = config.trainer.resume
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        return load_latest_checkpoint(run_dir, warn) if run_dir is not None else None
    path = Path(resume)
    if path.is_file():
        return path, load_checkpoint(path)
    if path.is_dir():
        for folder in (path, path.parent):  # a run folder, or its checkpoints/ folder
            found = load_latest_checkpoint(folder, warn)
            if found is not None:
                return found
        raise FileNotFoundError(f"trainer.resume: {path}: no checkpoints/latest in this folder")
    raise FileNotFoundError(f"trainer.resume: {path}: no such checkpoint file or run folder")


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _skipped_entries(run: _Run, window: bool) -> dict[str, Counter[str]]:
    """Per stream, the samples replaced because their cache entry could not be read, summed over every rank: since the
    last logging window (``window``) or since this start. A collective under DDP: every rank calls it at the same
    steps."""
    local = {
        name: stream.skipped.take_window() if window else Counter(stream.skipped.total)
        for name, stream in run.streams.items()
    }
    if not run.ctx.enabled:
        return local
    gathered: list[Any] = [None] * run.ctx.world_size
    dist.all_gather_object(gathered, local)
    return {name: sum((rank[name] for rank in gathered), Counter()) for name in local}


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option that keeps buffers per process: ``forward_sync_buffers`` where PyTorch has it (``broadcast_buffers``
    is deprecated there), ``broadcast_buffers`` before."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


class Trainer:
    """Runs ``config`` to ``trainer.max_steps``, or to the length calibrated for ``trainer.max_minutes`` (or until
    SIGTERM/SIGINT, after a checkpoint).

    Args:
        config: the typed pretraining configuration.
        project_dir: where relative paths, the default MLflow store and ``outputs/`` live.
        callbacks: ``fn(step, metrics)`` called after every optimiser step on every rank (tests, notebooks).
        clock: seconds, for ``trainer.max_minutes`` (the calibration of the run's length and the wall-clock stop);
            ``time.perf_counter`` unless a test gives a fake clock.
    """

    def __init__(
        self,
        config: PretrainConfig,
        project_dir: str | Path | None = None,
        callbacks: list[Callable[[int, dict[str, float]], None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.project_dir = Path(project_dir or Path.cwd()).resolve()
        self.callbacks = list(callbacks or [])
        self.clock = clock or time.perf_counter
        self.method = method_named(config.method.name)

    # ------------------------------------------------------------------ setup
    def _build_objective(self, data: PreparedData) -> nn.Module:
        """The method's objective over a new model."""
        try:
            model = JointModel(self.config.model)
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None
        return self.method.build(model, self.config, data)

    def _paths(self, run_name: str) -> Path:
        out = Path(self.config.run.output_dir)
        out = out if out.is_absolute() else self.project_dir / out
        return out / run_name

    # ------------------------------------------------------------------ run
    def fit(self) -> TrainResult:
        cfg = self.config
        ctx = setup_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
        try:
            return self._fit(ctx)
        finally:
            teardown_distributed()

    def _fit(self, ctx: DistributedContext) -> TrainResult:
        """Set up, run the loop (one step, then the between-step hooks in order), finish."""
        run, loop = self._set_up(ctx)
        between_steps = [
            self._calibrate_once,
            self._log_window,
            self._pictures_every,
            self._stop_on_signal,
            self._checkpoint_every,
            self._stop_on_budget,
        ]
        try:
            with _StopRequest() as run.stop:
                run.objective.train()
                loop.start = self.clock()
                loop.stamps = [loop.start]
                while loop.state.step < loop.max_steps or loop.calibrating:
                    self._step(run, loop)
                    if any(hook(run, loop) for hook in between_steps):  # a hook that returns True ends the run
                        break
        except BaseException:
            run.bar.close()
            run.tracker.finish("FAILED")
            raise
        return self._finish(run, loop)

    def _set_up(self, ctx: DistributedContext) -> tuple[_Run, _Loop]:
        """Run name and resume point, data and streams (rank 0 builds the cache), model, objective, optimiser, DDP,
        tracking, the schedules (kept from a checkpoint's calibration)."""
        from medssl.runtime import tracking  # mlflow import is slow; only the trainer needs it

        cfg = self.config
        tcfg = cfg.trainer
        device = ctx.device
        run_name = str(broadcast_object(cfg.run.name or default_run_name(cfg)))
        run_dir = self._paths(run_name)
        resume_path, checkpoint = self._load_resume(ctx, run_name, run_dir)
        if checkpoint is not None and checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"trainer.resume: {resume_path}: not a medssl pretraining checkpoint")
        if checkpoint is not None and cfg.run.name is None:
            run_name = str(checkpoint["run_name"])
            run_dir = self._paths(run_name)
        self._on_main(ctx, lambda: self._preflight_folders(run_dir))  # before the cache build, which may take hours

        # Data: rank 0 builds the cache, the others wait and then open it.
        streams_needed = needed_streams(cfg)
        if ctx.is_main:
            data = prepare_data(cfg, streams_needed, build=True, progress=tcfg.progress)
        if ctx.enabled:
            dist.barrier()
        if not ctx.is_main:
            data = prepare_data(cfg, streams_needed, build=False, progress=False)
        streams = build_streams(cfg, data, ctx, pin_memory=device.type == "cuda")

        # Model, objective, optimiser.
        seed_everything(cfg.seed)
        objective = self._build_objective(data)
        model: JointModel = objective.model  # type: ignore[assignment]
        dropped_note = self.method.without_volumes_message(cfg, data.dropped) if data.dropped else None
        if dropped_note is not None and ctx.is_main:
            print(f"{run_name}: {dropped_note}", flush=True)
        init_note = None
        if tcfg.init_from and checkpoint is not None:
            if ctx.is_main:
                print(f"{run_name}: trainer.init_from={tcfg.init_from} ignored: resuming from {resume_path} (resume "
                      "wins; set trainer.resume=null to start over from init_from)", flush=True)  # fmt: skip
        elif tcfg.init_from:
            init_failure: Exception | None = None
            try:
                init_note = initialise_model(model, tcfg.init_from).message()  # every rank reads the file
            except (ValueError, OSError) as exc:
                init_failure = exc
            raise_any_rank_error(init_failure)  # one rank that cannot read it stops them all, none waits
            if ctx.is_main:
                print(f"{run_name}: {init_note}", flush=True)
        channels_last = tcfg.channels_last and device.type == "cuda"
        if ctx.enabled and device.type == "cuda" and tcfg.sync_batchnorm:
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
            model = objective.model  # type: ignore[assignment]
        objective.to(device)
        if channels_last:
            model.encoder.to(memory_format=torch.channels_last)
        opt = optimizer_settings(cfg)  # trainer.optimizer with the method's own weight decay
        optimizer = build_optimizer(objective, opt)
        amp_dtype = resolve_precision(tcfg.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        lr_schedule, wd_schedule = _schedules(cfg, tcfg.max_steps, opt.warmup_steps)

        # Room on disk for two checkpoints of this objective (and its optimiser state), and for what the MLflow store
        # receives at the end (the backbone, the final checkpoint), before the first step.
        self._on_main(ctx, lambda: self._preflight_space(run_dir, objective, model))
        state = RunState(run_name, run_dir, objective, optimizer, scaler, streams, streams_dropped=list(data.dropped))
        if checkpoint is not None:
            self._restore(state, checkpoint)
            if ctx.is_main:
                print(f"{run_name}: resuming from {resume_path} at step {state.step}", flush=True)
        # trainer.max_minutes: the run's length is calibrated after its first steps, or kept from the checkpoint.
        max_steps, warmup_steps = tcfg.max_steps, opt.warmup_steps
        if state.calibration is not None and tcfg.max_minutes is None:
            if ctx.is_main:
                print(f"{run_name}: trainer.max_minutes is null: the checkpoint's calibrated length "
                      f"({state.calibration['max_steps']} steps) is dropped; running to trainer.max_steps={max_steps}",
                      flush=True)  # fmt: skip
            state.calibration = None
        if state.calibration is not None:
            lr_schedule, wd_schedule = self._apply_calibration(state.calibration, objective)
            max_steps, warmup_steps = int(state.calibration["max_steps"]), int(state.calibration["warmup_steps"])
            if ctx.is_main:
                print(f"{run_name}: keeping the calibrated length of {max_steps} steps from the checkpoint", flush=True)
        calibrating = tcfg.max_minutes is not None and state.calibration is None
        if tcfg.compile:
            model.encoder.compile()

        wrapped: nn.Module = objective
        if ctx.enabled:
            wrapped = DistributedDataParallel(
                objective,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,  # stages and methods leave heads unused
                **_no_buffer_sync(),  # queues, memory banks and BN statistics stay per process
            )

        # Tracking (rank 0).
        config_dict = to_container(cfg)
        config_dict["run"]["name"] = run_name
        tracker = tracking.Tracker(
            cfg.logging.tracking_uri or tracking.default_tracking_uri(self.project_dir),
            cfg.logging.experiment,
            run_name=run_name,
            run_id=state.mlflow_run_id,
            enabled=ctx.is_main and cfg.logging.mlflow,
            tags={"medssl.method": cfg.method.name, "medssl.world_size": str(ctx.world_size)},
        )
        state.mlflow_run_id = tracker.run_id
        self._log_run_start(tracker, config_dict, data, resumed=checkpoint is not None)
        if dropped_note is not None:
            tracker.set_tags({"medssl.streams_dropped": dropped_note})
        if init_note is not None:
            tracker.set_tags({"medssl.init_from": init_note})
        swav_streams = self.method.prototype_streams(cfg, data.dropped)
        frozen = frozen_prototypes_warning(swav_streams, cfg.method.objective.freeze_prototypes_steps,
                                           tcfg.max_steps)  # fmt: skip
        if frozen is not None:
            if ctx.is_main:
                print(f"{run_name}: {frozen}", flush=True)
            tracker.set_tags({"health_warning_prototypes": frozen})

        run = _Run(
            ctx=ctx,
            objective=objective,
            wrapped=wrapped,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            streams=streams,
            data=data,
            tracker=tracker,
            channels_last=channels_last,
            clip_grad=opt.clip_grad,
            autocast=functools.partial(
                torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ),
            # SwAV's trivial solution, warned about once; not before warm-up and the prototype freeze are over
            alarm=UniformPredictionAlarm(start_step=max(warmup_steps, self.method.quiet_steps(objective))),
            bar=progress(
                total=max_steps,
                initial=state.step,
                enabled=ctx.is_main and tcfg.progress,
                desc=run_name,
                unit="step",
                dynamic_ncols=True,
            ),
        )
        return run, _Loop(state, max_steps, lr_schedule, wd_schedule, calibrating)

    def _finish(self, run: _Run, loop: _Loop) -> TrainResult:
        """The last checkpoint; for a finished run the backbone and the final pictures; the MLflow run's status."""
        ctx, state, tracker, status = run.ctx, loop.state, run.tracker, loop.status
        run.bar.close()
        skipped = {name: counts for name, counts in _skipped_entries(run, window=False).items() if counts}
        if skipped:  # the run went on past unreadable cache entries: say which (keys, never archive paths)
            tracker.log_dict({name: dict(counts) for name, counts in skipped.items()}, "data/skipped_entries.json")
            tracker.set_tags({"medssl.skipped_samples": str(sum(sum(c.values()) for c in skipped.values()))})
            if ctx.is_main:
                for name, counts in skipped.items():
                    print(f"{state.run_name}: warning: {name} stream, this start: {SkippedEntries.describe(counts)}; "
                          "rebuild the cache (medssl manifest preprocess) to restore them", flush=True)  # fmt: skip
        for stream in run.streams.values():
            stream.close()
        log_artifact = status == "finished" and self.config.logging.log_checkpoints
        saved = self._checkpoint(ctx, state, tracker, log_artifact=log_artifact)
        backbone = None
        if status == "finished" and ctx.is_main:
            backbone = self._export_backbone(state.run_dir, run.model, tracker, state.run_name)
            self._log_pictures(tracker, run.model, run.data, state.history, ctx.device, state.step)
        if ctx.enabled:
            dist.barrier()
        tracker.finish("FINISHED" if status == "finished" else "KILLED")
        result = TrainResult(
            status=status,
            step=state.step,
            run_name=state.run_name,
            output_dir=state.run_dir,
            run_id=tracker.run_id,
            artifact_uri=tracker.artifact_uri,
            checkpoint=saved,
            backbone=backbone,
            metrics=loop.last_metrics,
        )
        if ctx.is_main:
            self._summary(result, tracker)
        return result

    # ------------------------------------------------------------------ the step
    def _step(self, run: _Run, loop: _Loop) -> None:
        """One optimiser step: the method's pre-step work, data, forward and backward over the accumulation steps,
        clipping, the optimiser; the step's metrics (averaged over processes) go to the window and the callbacks."""
        cfg, tcfg, method, state = self.config, self.config.trainer, self.method, loop.state
        objective, optimizer, scaler, window = run.objective, run.optimizer, run.scaler, loop.window
        step = state.step
        step_start = time.perf_counter()
        primary = run.primary
        seed = cfg.seed * 1_000_003 + primary.epoch
        window.events.update(method.before_step(objective, step, primary.at_epoch_start, seed))
        set_schedule_values(optimizer, _at(loop.lr_schedule, step), _at(loop.wd_schedule, step))
        optimizer.zero_grad(set_to_none=True)

        active = method.active_streams(objective, step)
        with window.timer.phase("data"):
            fetched = {name: s.next_step() for name, s in run.streams.items() if active is None or name in active}

        step_metrics: dict[str, Tensor] = {}
        for micro in range(tcfg.accumulate):
            with window.timer.phase("augment"):
                batch = {k: v[micro] for k, v in fetched.items()}
                inputs = method.inputs(self._inputs(batch, run, cfg.data.target))
            # gradients are all-reduced once per optimiser step, on the last accumulation step
            sync = micro == tcfg.accumulate - 1 or not run.ctx.enabled
            no_sync = contextlib.nullcontext() if sync else run.wrapped.no_sync()  # type: ignore[operator]
            with no_sync, run.autocast():
                loss, metrics = run.wrapped(step=step, **inputs)
            scaler.scale(loss / tcfg.accumulate).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0) + _scalar(k, v).float() / tcfg.accumulate
        method.after_backward(objective, step)
        clip = run.clip_grad
        if clip > 0:
            scaler.unscale_(optimizer)
            step_metrics["grad_norm"] = nn.utils.clip_grad_norm_(objective.parameters(), clip).detach().float()

        host = _reduce_and_check(step_metrics, step, run.ctx)
        scaler.step(optimizer)
        scaler.update()
        state.step = step + 1
        window.timer.total_seconds += time.perf_counter() - step_start
        host["lr"] = _at(loop.lr_schedule, step)
        window.add(host, sum(getattr(tcfg.batch, name) for name in fetched))
        for callback in self.callbacks:
            callback(state.step, host)
        run.bar.update(1)

    # ------------------------------------------------------------------ between steps (True: end the run)
    def _calibrate_once(self, run: _Run, loop: _Loop) -> bool:
        """``trainer.max_minutes``: after ``CALIBRATION_STEPS`` timed steps, the run's length and its schedules."""
        if not loop.calibrating:
            return False
        loop.stamps.append(self.clock())
        if len(loop.stamps) > CALIBRATION_STEPS:
            state = loop.state
            state.calibration = self._calibrate(loop.stamps, state.step, run.ctx, run.tracker, run.bar, state.run_name)
            loop.lr_schedule, loop.wd_schedule = self._apply_calibration(state.calibration, run.objective)
            loop.max_steps = int(state.calibration["max_steps"])
            warmup = int(state.calibration["warmup_steps"])
            run.alarm.start_step = max(warmup, self.method.quiet_steps(run.objective))
            run.bar.total = loop.max_steps
            run.bar.refresh()
            loop.calibrating = False
        return False

    def _log_window(self, run: _Run, loop: _Loop) -> bool:
        """Every ``trainer.log_every`` steps and at the end: the window's averages to MLflow, the history and the
        progress bar; the health alarm reads them."""
        step = loop.state.step
        if step % self.config.trainer.log_every and step != loop.max_steps:
            return False
        metrics = loop.last_metrics = loop.window.close(run.primary.epoch)
        for name, counts in _skipped_entries(
            run, window=True
        ).items():  # cache entries unreadable since the last window
            if counts:
                metrics[f"data/skipped_samples_{name}"] = float(sum(counts.values()))
                if run.ctx.is_main:
                    run.bar.write(f"{loop.state.run_name}: warning: {name} stream: {SkippedEntries.describe(counts)}")
        run.tracker.log_metrics(metrics, step)
        for tag, message in run.alarm.update(step, metrics):
            if run.ctx.is_main:
                run.bar.write(f"{loop.state.run_name}: {message}")
            run.tracker.set_tags({tag: message})
        for k, v in metrics.items():
            loop.state.history.setdefault(k, []).append([float(step), float(v)])
        run.bar.set_postfix(
            loss=f"{metrics.get('loss/total', float('nan')):.4f}",
            samples_s=f"{metrics['throughput/samples_per_s']:.1f}",
            refresh=False,
        )
        return False

    def _pictures_every(self, run: _Run, loop: _Loop) -> bool:
        every, step = self.config.logging.pictures.every, loop.state.step
        if every and step % every == 0 and step < loop.max_steps and run.ctx.is_main:
            self._log_pictures(run.tracker, run.model, run.data, loop.state.history, run.ctx.device, step)
        return False

    def _stop_on_signal(self, run: _Run, loop: _Loop) -> bool:
        """SIGTERM/SIGINT on any process: every process stops after this step (the final checkpoint follows)."""
        assert run.stop is not None
        if _agreed(run.stop.signal is not None, run.ctx, run.ctx.device):
            loop.status = "interrupted"
            return True
        return False

    def _checkpoint_every(self, run: _Run, loop: _Loop) -> bool:
        every, step = self.config.trainer.checkpoint_every, loop.state.step
        if every and step % every == 0 and step < loop.max_steps:
            self._checkpoint(run.ctx, loop.state, run.tracker, log_artifact=False)
        return False

    def _stop_on_budget(self, run: _Run, loop: _Loop) -> bool:
        """``trainer.max_minutes`` as a safety stop (the calibrated length normally ends the run first)."""
        minutes = self.config.trainer.max_minutes
        if minutes is None or not (loop.state.step < loop.max_steps or loop.calibrating):
            return False
        if not _agreed(self.clock() - loop.start >= minutes * 60, run.ctx, run.ctx.device):
            return False
        if run.ctx.is_main:
            run.bar.write(f"{loop.state.run_name}: trainer.max_minutes={minutes:g} reached at step {loop.state.step}")
        return True

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _inputs(batches: dict[str, Any], run: _Run, target: str) -> dict[str, Any]:
        """Loader batches -> keyword arguments of the objective's forward; each stream's dataset makes the views of
        its batch on the run's device.

        ``target``: the manifest ``group`` of SepCLR's target samples (``data.target``); every other group of the
        balanced ``sep`` batch (``data.background``) is background.
        """
        device, data = run.ctx.device, run.data
        inputs: dict[str, Any] = {}
        if "images" in batches and data.images is not None:
            images = batches["images"]
            inputs["crops"] = to_device(data.images.views(images, device), device, run.channels_last)
            inputs["crop_index"] = images["index"].to(device)
        if "stacks" in batches and data.stacks is not None:
            stacks = batches["stacks"]
            inputs["stacks"] = StackBatch(
                views=data.stacks.views(stacks, device),
                mask=stacks["mask"].to(device),
                positions=stacks["positions"].to(device),
                index=stacks["index"].to(device),
                mask_noise=stacks["mask_noise"].to(device),
            )
        if "sep" in batches and data.sep is not None:
            sep = batches["sep"]
            is_target = torch.tensor([g == target for g in sep["group"]], dtype=torch.bool, device=device)
            views = to_device(data.sep.views(sep, device)[:2], device, run.channels_last)
            inputs["sep"] = SepBatch(views=views, is_target=is_target)
        return inputs

    def _log_run_start(self, tracker: Any, config_dict: dict[str, Any], data: PreparedData, resumed: bool) -> None:
        from medssl.runtime import tracking

        summary = data.manifest.summary()
        fingerprint = tracking.manifest_fingerprint(Path(self.config.data.manifest))
        params = tracking.flatten_config(config_dict)
        params.update({f"manifest.{k}": str(v) for k, v in fingerprint.items() if k != "sha256"})
        tracker.log_params(params, allow_changes=resumed)
        tracker.set_tags({"medssl.manifest_sha256": fingerprint.get("sha256", ""), "medssl.resumed": str(resumed)})
        if tracker.enabled:  # versions and git commit of the code (of this start, for a resumed run)
            tracker.set_tags(tracking.provenance_tags())
        import yaml

        tracker.log_text(yaml.safe_dump(config_dict, sort_keys=False), "config/pretrain.yaml")
        tracker.log_dict(
            {
                "manifest": summary,
                "fingerprint": fingerprint,
                "samples": {
                    "images": len(data.images) if data.images is not None else 0,
                    "stacks": len(data.stacks) if data.stacks is not None else 0,
                },
            },
            "data/summary.json",
        )

    def _load_resume(
        self, ctx: DistributedContext, run_name: str, run_dir: Path
    ) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 finds the checkpoint to resume from (a skipped one is printed with why); every rank loads it."""
        found: tuple[Path, dict[str, Any]] | None = None
        choice: object = None
        if ctx.is_main:
            removed = remove_stale_temporaries(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
            if removed:
                print(f"{run_name}: removed {len(removed)} unfinished checkpoint file(s) of a killed write: "
                      f"{', '.join(p.name for p in removed)}", flush=True)  # fmt: skip
            try:
                found = load_resume_checkpoint(self.config, run_dir, lambda m: print(f"{run_name}: {m}", flush=True))
                choice = str(found[0]) if found is not None else None
            except (ValueError, FileNotFoundError) as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, Exception):
            raise choice
        if choice is None:
            return None, None
        path = Path(str(choice))
        failure: Exception | None = None
        if found is None:  # the other ranks read the file rank 0 chose; if one cannot, every rank stops
            try:
                found = path, load_checkpoint(path)
            except (ValueError, OSError) as exc:
                failure = exc
        raise_any_rank_error(failure)
        assert found is not None
        return found

    def _preflight_folders(self, run_dir: Path) -> None:
        """The run folder, the cache (rank 0 builds it) and a local MLflow store can be written."""
        from medssl.runtime import tracking

        check_writable(run_dir, "run.output_dir")
        check_writable(Path(self.config.data.cache_dir), "data.cache_dir")
        if self.config.logging.mlflow:
            uri = self.config.logging.tracking_uri or tracking.default_tracking_uri(self.project_dir)
            store = tracking.local_store_folder(uri)
            if store is not None:
                check_writable(store, "the MLflow store (logging.tracking_uri)")

    def _preflight_space(self, run_dir: Path, objective: nn.Module, model: nn.Module) -> None:
        """``run.output_dir`` has room for two checkpoints, a local MLflow store for the backbone and the final
        checkpoint it receives (the same file system's needs add up)."""
        from medssl.runtime import tracking

        checkpoint = checkpoint_bytes(objective)
        demands = [(run_dir, 2 * checkpoint, "run.output_dir")]
        if self.config.logging.mlflow:
            uri = self.config.logging.tracking_uri or tracking.default_tracking_uri(self.project_dir)
            store = tracking.local_store_folder(uri)
            if store is not None:
                logged = checkpoint_bytes(model, optimizer_slots=0) * (2 if self.config.logging.log_model else 1)
                logged += checkpoint if self.config.logging.log_checkpoints else 0
                demands.append((store, logged, "the MLflow store (logging.tracking_uri)"))
        check_room(demands)

    @staticmethod
    def _on_main(ctx: DistributedContext, check: Callable[[], None]) -> None:
        """Run ``check`` on rank 0; its error (a ``ValueError``) is raised on every rank, so none waits for the
        others at a barrier."""
        error: ValueError | None = None
        if ctx.is_main:
            try:
                check()
            except ValueError as exc:
                error = exc
        raise_any_rank_error(error)

    def _restore(self, state: RunState, checkpoint: dict[str, Any]) -> None:
        state.objective.load_state_dict(checkpoint["objective"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scaler.load_state_dict(checkpoint["scaler"])
        for name, stream in state.streams.items():
            stream.restore(int(checkpoint["streams"].get(name, 0)))
        set_rng_state(checkpoint["rng"])
        state.step = int(checkpoint["step"])
        state.history = {k: [list(map(float, p)) for p in v] for k, v in checkpoint.get("history", {}).items()}
        state.mlflow_run_id = checkpoint.get("mlflow_run_id")
        state.calibration = checkpoint.get("calibration")

    def _checkpoint(self, ctx: DistributedContext, state: RunState, tracker: Any, log_artifact: bool) -> Path | None:
        """Rank 0 writes ``checkpoints/step_<k>.pt`` atomically, points ``checkpoints/latest`` at it and prunes old
        ones (``trainer.keep_checkpoints``); every rank waits for it."""
        path: Path | None = None
        if ctx.is_main:
            content = {
                "format": CHECKPOINT_FORMAT,
                "step": state.step,
                "run_name": state.run_name,
                "objective": state.objective.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict(),
                "streams": {name: s.consumed for name, s in state.streams.items()},
                "rng": rng_state(),
                "history": state.history,
                "mlflow_run_id": state.mlflow_run_id,
                "world_size": ctx.world_size,
                "config": to_container(self.config),
                "calibration": state.calibration,
                "streams_dropped": list(state.streams_dropped),
            }
            directory = state.run_dir / "checkpoints"
            path = save_checkpoint(directory / f"step_{state.step:08d}.pt", content)
            atomic_write_text(directory / "latest", path.name + "\n")
            # Prune the oldest, never a file newer than this one (left by a run killed before it moved `latest`).
            kept = sorted(
                (step, old) for old in directory.glob("step_*.pt") if (step := checkpoint_step(old)) is not None
            )
            for _, old in [item for item in kept if item[0] <= state.step][: -self.config.trainer.keep_checkpoints]:
                old.unlink(missing_ok=True)
                checksum_path(old).unlink(missing_ok=True)
            if log_artifact:
                tracker.log_artifact(path, "checkpoints")
        if ctx.enabled:
            dist.barrier()
        return path

    def _calibrate(
        self, stamps: list[float], step: int, ctx: DistributedContext, tracker: Any, bar: Progress, run_name: str
    ) -> dict[str, Any]:
        """``trainer.max_minutes``: rank 0 sets the run's length from its timed steps, every rank gets it; printed
        and logged (param ``trainer.calibrated_max_steps``, tag ``medssl.calibration``)."""
        tcfg = self.config.trainer
        assert tcfg.max_minutes is not None
        calibration: dict[str, Any] | None = None
        if ctx.is_main:
            calibration = calibrate_schedule(self.config, stamps, step, tcfg.max_minutes)
        calibration = broadcast_object(calibration)  # type: ignore[assignment]
        assert calibration is not None
        if ctx.is_main:
            counts = "".join(
                f", {key.replace('_', ' ')} {calibration[key]}"
                for key in self.method.step_counts(self.config)
                if calibration.get(key) is not None
            )
            note = (
                f"trainer.max_minutes={tcfg.max_minutes:g}: {calibration['seconds_per_step']:.3g} s/step (median of "
                f"steps {step - CALIBRATION_STEPS + CALIBRATION_SKIP + 1}-{step}): the run is "
                f"{calibration['max_steps']} steps (trainer.max_steps={tcfg.max_steps} x {calibration['ratio']:.3g}; "
                f"warm-up {calibration['warmup_steps']}{counts})"
            )
            bar.write(f"{run_name}: {note}")
            tracker.log_params(
                {
                    "trainer.calibrated_max_steps": str(calibration["max_steps"]),
                    "trainer.calibrated_seconds_per_step": f"{calibration['seconds_per_step']:.4g}",
                },
                allow_changes=True,  # a run killed before its calibration calibrates again when resumed
            )
            tracker.set_tags({"medssl.calibration": note})
        return calibration

    def _apply_calibration(self, calibration: dict[str, Any], objective: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Set the calibrated step counts on the objective (the method's hook); returns the learning-rate and
        weight-decay schedules for the calibrated length."""
        self.method.set_step_counts(objective, calibration)
        return _schedules(self.config, int(calibration["max_steps"]), int(calibration["warmup_steps"]))

    def _export_backbone(self, run_dir: Path, model: JointModel, tracker: Any, run_name: str) -> Path:
        """The encoder's MONAI ResNet weights (``backbone.pt``) and how to rebuild it (``backbone.json``)."""
        encoder = model.encoder  # compiled in place (nn.Module.compile): same module, same keys
        backbone = encoder.backbone
        weights = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
        path = save_checkpoint(run_dir / "backbone.pt", weights)
        meta = {
            "network": "monai.networks.nets.ResNet",
            "kwargs": encoder.backbone_config,
            "out_dim": int(encoder.stage_channels[-1]),  # what the exported backbone computes (no projection)
            "encoder": self.config.model.encoder,
            "method": self.config.method.name,
            "run_name": run_name,
            "run_id": tracker.run_id,
            "preprocess": to_container(self.config)["data"]["preprocess"],
            "input": {
                "channels": self.config.model.in_channels,
                "spatial_dims": 2,
                "crop": self.config.data.views.global_size,
            },
        }
        atomic_write_text(run_dir / "backbone.json", json.dumps(meta, indent=2))
        tracker.log_artifact(path, "backbone")
        tracker.log_artifact(run_dir / "backbone.json", "backbone")
        if self.config.logging.log_model and tracker.enabled:
            self._log_backbone_model(tracker, meta, weights)
        return path

    def _log_backbone_model(self, tracker: Any, meta: dict[str, Any], weights: dict[str, Tensor]) -> None:
        """The backbone as the MLflow model ``backbone_model`` (and a registered version with ``logging.register_as``):
        :func:`medssl.train.backbone_model.log_backbone_model`. A failure is a printed warning and the tag
        ``medssl.model_error``: the run finished and its ``backbone/`` files are logged."""
        from medssl.train.backbone_model import log_backbone_model

        lcfg = self.config.logging
        try:
            note = log_backbone_model(tracker, meta, weights, register_as=lcfg.register_as, alias=lcfg.register_alias)
        except Exception as exc:  # reported: the backbone files are already saved and logged
            log.warning("logging the backbone as an MLflow model failed", exc_info=True)
            note = f"warning: backbone not logged as an MLflow model ({type(exc).__name__}: {str(exc)[:300]})"
            tracker.set_tags({"medssl.model_error": note})
        print(f"{meta['run_name']}: {note}", flush=True)

    def _log_pictures(
        self,
        tracker: Any,
        model: JointModel,
        data: PreparedData,
        history: dict[str, list[list[float]]],
        device: torch.device,
        step: int,
    ) -> None:
        from medssl.train import pictures

        pcfg = self.config.logging.pictures
        folder = f"pictures/step_{step:08d}"
        if history:
            tracker.log_figure(
                pictures.curves_figure({k: [tuple(p) for p in v] for k, v in history.items()}), f"{folder}/curves.png"
            )
        dataset = data.images or data.sep
        if dataset is None or pcfg.samples < 1:
            return
        snapshot = pictures.embedding_snapshot(
            model,
            dataset,
            min(pcfg.samples, len(dataset)),
            self.config.data.views.global_size,
            device,
            generator_seed=self.config.seed,
        )
        figures = pictures.snapshot_figures(snapshot, f"encoder features, step {step}")
        for name, figure in figures.items():
            if name.startswith("prototype") and not self.method.trains_intra_prototypes(self.config):
                continue  # untrained prototypes: their gallery would mislead
            if name == "prototype_gallery.png" and not pcfg.gallery:
                continue
            tracker.log_figure(figure, f"{folder}/{name}")

    @staticmethod
    def _summary(result: TrainResult, tracker: Any) -> None:
        from medssl.runtime import tracking

        loss = result.metrics.get("loss/total", math.nan)
        where = result.artifact_uri or str(result.output_dir)
        print(
            f"medssl pretrain: {result.status} at step {result.step} (loss {loss:.4f}); run {result.run_name}"
            f"{' id ' + result.run_id if result.run_id else ''}; artifacts: {where}; checkpoints: "
            f"{result.output_dir / 'checkpoints'}"
        )
        if result.run_id:
            print(f"look at it with: {tracking.ui_command(tracker.tracking_uri)}")
        if result.status == "interrupted":
            print(f"resume with: medssl pretrain ... run.name={result.run_name} (trainer.resume=auto)")


def calibrate_schedule(config: PretrainConfig, stamps: list[float], done: int, max_minutes: float) -> dict[str, Any]:
    """The run's length for a wall-clock budget, and the schedule's step counts scaled to it.

    Args:
        config: the run's configuration; ``trainer.max_steps`` is the reference length of its step counts
            (``trainer.optimizer.warmup_steps`` and the method's :meth:`~medssl.train.methods.base.Method.step_counts`,
            e.g. the joint family's prototype freeze, queue start and stages, SimCLR's MoCHi start).
        stamps: the clock (seconds) when this process's loop started and after each of its steps.
        done: the run's step count now (``len(stamps) - 1`` steps after the loop's start, more when resumed).
        max_minutes: the budget, counted from the loop's start.
    Returns:
        plain data (kept in checkpoints): ``max_steps`` (the run ends after it: the steps done plus as many as the
        rest of ``BUDGET_MARGIN`` of the budget holds at the median seconds per step of the steps after the first
        ``CALIBRATION_SKIP``), ``ratio`` (``max_steps`` / ``trainer.max_steps``), ``seconds_per_step``, ``at_step``,
        the scaled ``warmup_steps`` and the method's scaled step counts (``freeze_prototypes_steps``,
        ``queue_start_step``, ``stages``; ``mixing_start_step``: None where not configured); ``stages`` is None for a
        method without stages.
    """
    durations = [b - a for a, b in itertools.pairwise(stamps)][CALIBRATION_SKIP:] or [stamps[-1] - stamps[0]]
    seconds = max(float(statistics.median(durations)), 1e-9)
    left = max_minutes * 60 * BUDGET_MARGIN - (stamps[-1] - stamps[0])
    total = max(done, done + int(max(left, 0.0) // seconds))
    reference = config.trainer.max_steps
    ratio = total / reference

    counts = method_named(config.method.name).step_counts(config)
    return {
        "max_steps": total,
        "reference_max_steps": reference,
        "ratio": ratio,
        "seconds_per_step": seconds,
        "at_step": done,
        "warmup_steps": min(round(config.trainer.optimizer.warmup_steps * ratio), total),
        "stages": None,  # a method with stages sets them below
        **{key: _scaled(value, ratio) for key, value in counts.items()},
    }


def _scaled(value: int | list[int] | None, ratio: float) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [round(v * ratio) for v in value]
    return round(value * ratio)


def _scalar(key: str, value: object) -> Tensor:
    """An objective's metric, detached; anything but a 0-d tensor is an error (it used to be dropped silently)."""
    if not isinstance(value, Tensor) or value.ndim != 0:
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
        raise TypeError(f"objective metric {key!r} is a {type(value).__name__}{shape}; metrics must be 0-d tensors")
    return value.detach()


def _schedules(config: PretrainConfig, total_steps: int, warmup_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step learning rate (linear warm-up, cosine to ``final_lr`` over ``total_steps``) and weight decay (the
    method's own where it sets one)."""
    opt = optimizer_settings(config)
    base_lr = opt.lr * (config.trainer.batch.images / 256 if opt.scale_lr_with_batch else 1.0)
    lr = warmup_cosine(base_lr, opt.final_lr, total_steps, min(warmup_steps, total_steps), opt.start_warmup_lr)
    wd_end = opt.weight_decay if opt.weight_decay_end is None else opt.weight_decay_end
    return lr, warmup_cosine(opt.weight_decay, wd_end, total_steps)


def _at(schedule: np.ndarray, step: int) -> float:
    """``schedule[step]``; its last value past its end (the steps that time a ``max_minutes`` run may outrun the
    reference schedule)."""
    return float(schedule[min(step, len(schedule) - 1)])


def _reduce_and_check(step_metrics: dict[str, Tensor], step: int, ctx: DistributedContext) -> dict[str, float]:
    """The step's metrics averaged over processes, as floats (one synchronisation per step); raises
    :class:`NonFiniteLossError` on every rank when a loss is NaN or infinite on any. Only losses count: with fp16
    an infinite gradient norm is the loss scaler's business (it skips that step)."""
    keys = sorted(step_metrics)
    values = torch.stack([step_metrics[k].reshape(()) for k in keys])
    loss_rows = [i for i, k in enumerate(keys) if k.startswith("loss/")]
    non_finite = (~torch.isfinite(values[loss_rows])).any().float().reshape(1)
    if ctx.enabled:
        dist.all_reduce(values)
        values /= ctx.world_size
        dist.all_reduce(non_finite, op=dist.ReduceOp.MAX)
    host = dict(zip(keys, values.tolist(), strict=True))
    if non_finite.item() > 0:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in host.items() if k.startswith("loss/"))
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({losses}); lower trainer.optimizer.lr, "
            "set trainer.optimizer.clip_grad, or use trainer.precision=fp32"
        )
    return host


def _agreed(flag: bool, ctx: DistributedContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (a signal may reach the processes at different steps)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
