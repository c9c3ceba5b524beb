"""Batch samplers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class BalancedGroupBatchSampler(Sampler[list[int]]):
    """Batches with half background and half target samples, for SepCLR (Louiset et al., ICLR 2024).

    Each epoch walks a fresh permutation of the larger group; the smaller group is reshuffled and
    repeated as often as needed. ``num_replicas``/``rank`` shard the batches across processes
    (each rank gets ``len(self)`` distinct batches). Call ``set_epoch`` before each epoch.

    Args:
        groups: the group of every dataset index (e.g. ``dataset.groups``).
        batch_size: even number; ``batch_size // 2`` of each group per batch.
        background: group value of the background (e.g. healthy) samples.
        target: group value of the target (e.g. patient) samples.
    """

    def __init__(
        self,
        groups: Sequence[str],
        batch_size: int,
        background: str,
        target: str,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be an even number >= 2, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        values = np.asarray(list(groups), dtype=object)
        self.background = np.flatnonzero(values == background)
        self.target = np.flatnonzero(values == target)
        for name, indices in (("background", self.background), ("target", self.target)):
            if indices.size == 0:
                found = sorted({str(v) for v in values})[:10]
                raise ValueError(
                    f"no sample has group {background if name == 'background' else target!r} ({name}); "
                    f"groups present: {found}"
                )
        self.half = batch_size // 2
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        total = -(-max(len(self.background), len(self.target)) // self.half)
        return total // self.num_replicas

    def _stream(self, indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        rounds = -(-count // len(indices))
        return np.concatenate([rng.permutation(indices) for _ in range(rounds)])[:count]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = len(self) * self.num_replicas
        background = self._stream(self.background, n_batches * self.half, rng).reshape(n_batches, self.half)
        target = self._stream(self.target, n_batches * self.half, rng).reshape(n_batches, self.half)
        for b in range(self.rank, n_batches, self.num_replicas):
            yield [int(i) for i in np.concatenate([background[b], target[b]])]
