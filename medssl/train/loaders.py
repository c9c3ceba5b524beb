"""Data streams of a pretraining run: global batches, split across processes and accumulation steps.

A *global batch* is what one optimiser step sees, summed over all processes. Epoch ``e`` of a
stream is a fixed function of ``(seed, e)``; its global batches are cut into ``world_size x
accumulate`` equal shares and process ``r`` takes share ``m * world_size + r`` at accumulation
step ``m``. Hence

* one process and ``K`` processes see the same samples in each optimiser step (DDP equivalence);
* the position in the data is one number per stream (global batches consumed), which a checkpoint
  stores and a resumed run skips to without loading any sample;
* one set of loader workers serves the whole run: indices carry their epoch, ``(epoch, index)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medssl.data.datasets import SkippedEntries
from medssl.data.samplers import BalancedGroupBatchSampler


def shuffled_batches(size: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Epoch ``epoch`` of a dataset of ``size`` samples as global batches of ``batch`` indices.

    ``max(1, size // batch)`` batches from consecutive permutations (a dataset smaller than one batch is
    repeated, so tiny datasets still train); the remainder of the last permutation is dropped.
    """
    if size < 1:
        raise ValueError("the dataset is empty")
    n_batches = max(1, size // batch)
    rng = np.random.default_rng([seed, epoch])
    rounds = -(-n_batches * batch // size)
    order = np.concatenate([rng.permutation(size) for _ in range(rounds)])[: n_batches * batch]
    return list(order.reshape(n_batches, batch))


def balanced_batches(sampler: BalancedGroupBatchSampler, epoch: int) -> list[np.ndarray]:
    """Epoch ``epoch`` of a (single-replica) balanced sampler: each batch is background half, then target half."""
    sampler.set_epoch(epoch)
    return [np.asarray(b, dtype=np.int64) for b in sampler]


def share(batch: np.ndarray, parts: int, part: int, balanced: bool) -> list[int]:
    """Share ``part`` of ``parts`` of a global batch; ``balanced`` splits each half separately, so that every share
    keeps the background/target balance."""
    if not balanced:
        return [int(i) for i in np.array_split(batch, parts)[part]]
    half = len(batch) // 2
    return [int(i) for i in np.concatenate([np.array_split(h, parts)[part] for h in (batch[:half], batch[half:])])]


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless: this process's shares of the global batches, epoch after epoch, from global batch ``start`` of
    ``epoch`` on (:meth:`set_position`).

    Indices are tagged with their epoch, ``(epoch, index)``: the dataset seeds each sample by epoch without
    ``set_epoch``, so that one set of loader workers serves the whole run (no re-forking at epoch boundaries).

    Args:
        epoch_batches: ``epoch -> list of global batches`` (index arrays; the same number every epoch).
        world_size, rank: processes and this one's rank.
        accumulate: gradient-accumulation steps per optimiser step.
        balanced: keep background/target halves balanced in every share (SepCLR).
    """

    def __init__(
        self,
        epoch_batches: Callable[[int], list[np.ndarray]],
        world_size: int = 1,
        rank: int = 0,
        accumulate: int = 1,
        balanced: bool = False,
    ) -> None:
        self.epoch_batches = epoch_batches
        self.world_size = world_size
        self.rank = rank
        self.accumulate = accumulate
        self.balanced = balanced
        self.epoch = 0
        self.start = 0
        self.batches_per_epoch = len(epoch_batches(0))

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        parts = self.world_size * self.accumulate
        epoch, start = self.epoch, self.start
        while True:
            for batch in self.epoch_batches(epoch)[start:]:
                for micro in range(self.accumulate):
                    yield [(epoch, i) for i in share(batch, parts, micro * self.world_size + self.rank, self.balanced)]
            epoch, start = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: Ctrl-C and schedulers signal the whole process group, and the main
    process must outlive its workers long enough to finish the step and write its checkpoint (it then stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader_context() -> Any:
    """Fork where the platform has it (fast start, shares the memory-mapped cache); the default elsewhere."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


@dataclass(eq=False)
class Stream:
    """An endless iterator of this process's micro-batches for one data stream.

    ``consumed`` counts global batches (optimiser steps) taken from the stream; :meth:`restore` moves to a
    count without reading any sample. ``next_step()`` returns the ``accumulate`` micro-batches of one step.
    ``skipped`` counts the samples this process's batches had replaced because their cache entry could not be read
    (from the batches' ``"skipped"`` keys, whichever loader worker met them): ``skipped.take_window()`` per logging
    window, ``skipped.total`` for the run.
    """

    name: str
    dataset: Dataset
    sampler: ShardedBatchSampler
    num_workers: int = 0
    pin_memory: bool = False
    consumed: int = field(default=0, init=False)
    skipped: SkippedEntries = field(default_factory=SkippedEntries, init=False)
    _iterator: Iterator[Any] | None = field(default=None, init=False, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next step reads from."""
        return self.consumed // self.batches_per_epoch

    @property
    def at_epoch_start(self) -> bool:
        """True when the next step is the first of an epoch after the first one."""
        return self.consumed > 0 and self.consumed % self.batches_per_epoch == 0

    def restore(self, consumed: int) -> None:
        self.consumed = int(consumed)
        self.close()

    def close(self) -> None:
        """Stop the loader workers (a new iterator starts at ``consumed`` when needed)."""
        self._iterator = None

    def _open(self) -> None:
        self.sampler.set_position(*divmod(self.consumed, self.batches_per_epoch))
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=getattr(self.dataset, "collate", None),  # padded planes of different sizes
            multiprocessing_context=_loader_context() if self.num_workers else None,
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
        )
        self._iterator = iter(loader)

    def next_step(self) -> list[Any]:
        """The micro-batches of the next optimiser step (one per accumulation step)."""
        if self._iterator is None:
            self._open()
        micro = [next(self._iterator) for _ in range(self.sampler.accumulate)]  # type: ignore[arg-type]
        self.consumed += 1
        for batch in micro:
            if isinstance(batch, dict):
                self.skipped.add(batch.get("skipped", ()))
        return micro


@dataclass
class StepTimer:
    """Wall time of the step's phases against the whole step: ``data`` (waiting for the loader's batches) and
    ``augment`` (moving them to the device and making the views there). On an accelerator the device work is
    asynchronous, so ``augment`` counts what the host spends launching it."""

    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def fraction(self, name: str) -> float:
        return self.seconds.get(name, 0.0) / self.total_seconds if self.total_seconds > 0 else 0.0

    def reset(self) -> None:
        self.seconds = {}
        self.total_seconds = 0.0


def to_device(value: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move tensors (nested in lists/dicts) to ``device``; 4-d image batches optionally to channels-last."""
    if isinstance(value, torch.Tensor):
        moved = value.to(device, non_blocking=True)
        if channels_last and moved.dim() == 4 and moved.is_floating_point():
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved
    if isinstance(value, dict):
        return {k: to_device(v, device, channels_last) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device, channels_last) for v in value)
    return value
