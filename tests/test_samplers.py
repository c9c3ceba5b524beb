"""Background/target balanced batches for SepCLR."""

from __future__ import annotations

import pytest

from medssl.data.samplers import BalancedGroupBatchSampler

GROUPS = ["healthy"] * 7 + ["patient"] * 20 + ["other"] * 3


def test_every_batch_is_half_background_half_target():
    sampler = BalancedGroupBatchSampler(GROUPS, batch_size=6, background="healthy", target="patient")
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7  # ceil(20 / 3)
    for batch in batches:
        assert [GROUPS[i] for i in batch] == ["healthy"] * 3 + ["patient"] * 3
    seen_targets = [i for batch in batches for i in batch if GROUPS[i] == "patient"]
    assert set(seen_targets) == {i for i, g in enumerate(GROUPS) if g == "patient"}


def test_epochs_reshuffle_and_seeds_reproduce():
    a = BalancedGroupBatchSampler(GROUPS, 4, "healthy", "patient", seed=1)
    b = BalancedGroupBatchSampler(GROUPS, 4, "healthy", "patient", seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_get_disjoint_batches():
    per_rank = [
        list(BalancedGroupBatchSampler(GROUPS, 4, "healthy", "patient", num_replicas=2, rank=r)) for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1])
    everything = BalancedGroupBatchSampler(GROUPS, 4, "healthy", "patient")
    all_batches = list(everything)[: 2 * len(per_rank[0])]
    assert sorted(map(tuple, per_rank[0] + per_rank[1])) == sorted(map(tuple, all_batches))


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="even"):
        BalancedGroupBatchSampler(GROUPS, 5, "healthy", "patient")
    with pytest.raises(ValueError, match=r"'missing'.*groups present"):
        BalancedGroupBatchSampler(GROUPS, 4, "healthy", "missing")
