"""Schedules and checkpoint files (groundwork of the trainer)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from medssl.runtime.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medssl.train.schedules import warmup_cosine


class NotData:
    """An arbitrary object: a checkpoint holding one must not be unpickled."""


def test_warmup_cosine_matches_the_formula():
    values = warmup_cosine(base=1.0, final=0.01, total_steps=10, warmup_steps=4, start_warmup=0.2)
    assert values.shape == (10,)
    np.testing.assert_allclose(values[:4], [0.2, 0.4, 0.6, 0.8])
    for k in range(4, 10):
        t, big_t = k - 4, 6
        assert values[k] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * t / big_t)))
    assert values[4] == pytest.approx(1.0)
    assert np.all(np.diff(values[4:]) < 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(1.0, 0.0, total_steps=5, warmup_steps=6)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(
        tmp_path / "run" / "last.pt",
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7, "rng": rng_state()},
    )
    assert not list(path.parent.glob(".*.tmp"))
    state = load_checkpoint(path)
    assert state["step"] == 7
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(state["model"])
    torch.testing.assert_close(restored.weight, model.weight)


def test_rng_state_restores_python_numpy_and_torch(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, {"x": torch.ones(100)})
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"broken\.pt"):
        load_checkpoint(broken)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"object": NotData()}, unsafe)
    with pytest.raises(ValueError, match=r"unsafe\.pt"):
        load_checkpoint(unsafe)  # weights_only refuses arbitrary pickled objects


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
