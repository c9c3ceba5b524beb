"""Global batches split across processes and accumulation steps; resumable, epoch-crossing streams."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.samplers import BalancedGroupBatchSampler
from medssl.train.loaders import ShardedBatchSampler, Stream, balanced_batches, share, shuffled_batches


def test_shuffled_batches_depend_on_seed_and_epoch_and_cover_the_dataset():
    first = shuffled_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in first] == [4, 4] and len(set(np.concatenate(first).tolist())) == 8
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(shuffled_batches(10, 4, 3, 0)))
    assert not np.array_equal(np.concatenate(first), np.concatenate(shuffled_batches(10, 4, 3, 1)))
    tiny = shuffled_batches(3, 8, seed=0, epoch=0)  # smaller than one batch: repeated, still one batch
    assert len(tiny) == 1 and len(tiny[0]) == 8 and set(tiny[0].tolist()) == {0, 1, 2}


def test_the_shares_of_all_processes_and_accumulation_steps_make_the_global_batch():
    batches = lambda epoch: shuffled_batches(40, 8, seed=1, epoch=epoch)  # noqa: E731
    world, accumulate = 2, 2
    samplers = [ShardedBatchSampler(batches, world, rank, accumulate) for rank in range(world)]
    streams = [list(itertools.islice(iter(s), 5 * accumulate)) for s in samplers]  # 5 global batches
    for step in range(5):
        union = [i for rank in range(world) for m in range(accumulate) for i in streams[rank][step * accumulate + m]]
        expected = [(step // 5, int(i)) for i in batches(0)[step]]
        assert sorted(union) == sorted(expected)
        assert all(len(streams[r][step * accumulate + m]) == 2 for r in range(world) for m in range(accumulate))


def test_sampler_crosses_epochs_with_epoch_tags_and_starts_anywhere():
    batches = lambda epoch: shuffled_batches(6, 2, seed=0, epoch=epoch)  # noqa: E731 - 3 batches per epoch
    sampler = ShardedBatchSampler(batches)
    run = list(itertools.islice(iter(sampler), 7))
    assert [b[0][0] for b in run] == [0, 0, 0, 1, 1, 1, 2]
    sampler.set_position(1, 1)
    assert list(itertools.islice(iter(sampler), 3)) == run[4:7]


def test_balanced_shares_keep_background_and_target_halves():
    groups = ["background"] * 10 + ["target"] * 6
    sampler = BalancedGroupBatchSampler(groups, 8, "background", "target", seed=0)
    batch = balanced_batches(sampler, 0)[0]
    for part in range(4):
        piece = share(batch, 4, part, balanced=True)
        assert [groups[i] for i in piece] == ["background", "target"]


class _Indexed(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        return torch.tensor([epoch, index])


def test_restored_stream_continues_with_the_same_batches():
    def stream() -> Stream:
        return Stream("s", _Indexed(10), ShardedBatchSampler(lambda e: shuffled_batches(10, 3, 0, e)))

    straight = stream()
    expected = [straight.next_step()[0] for _ in range(8)]  # 3 batches per epoch: crosses two boundaries
    resumed = stream()
    resumed.restore(5)
    got = [resumed.next_step()[0] for _ in range(3)]
    for a, b in zip(got, expected[5:], strict=True):
        torch.testing.assert_close(a, b)
    assert resumed.consumed == 8 and resumed.epoch == 2 and not resumed.at_epoch_start
    assert stream().batches_per_epoch == 3
