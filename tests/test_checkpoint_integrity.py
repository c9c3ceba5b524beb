"""Checkpoints carry a SHA-256 beside them; a resumed run skips a corrupt latest checkpoint for the previous one and
says so; the folders a run writes and the free space are checked before the first step."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.runtime.checkpoints import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    checksum_path,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from medssl.runtime.preflight import PreflightError, check_room, check_writable, checkpoint_bytes
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer


class NotData:
    """An arbitrary object: a checkpoint holding one is not plain weights."""


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def a_run(folder: Path, steps: tuple[int, ...]) -> Path:
    """``folder/checkpoints`` with ``step_<k>.pt`` for each of ``steps`` and ``latest`` naming the last."""
    directory = folder / "checkpoints"
    for step in steps:
        save_checkpoint(directory / f"step_{step:08d}.pt", {"step": step, "w": torch.full((64,), float(step))})
    (directory / "latest").write_text(f"step_{steps[-1]:08d}.pt\n", encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------------------------- checksums


def test_a_checkpoint_is_written_with_its_sha256_and_verified_on_load(tmp_path):
    path = save_checkpoint(tmp_path / "step_00000001.pt", {"step": 1, "w": torch.ones(100)})
    sidecar = checksum_path(path)
    assert sidecar.name == "step_00000001.pt.sha256"
    assert sidecar.read_text(encoding="utf-8") == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(path)["step"] == 1
    flip_a_byte(path)
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001\.pt: checksum mismatch"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    """Files of older runs (and a kill between the checkpoint and its checksum) have no ``.sha256``."""
    path = save_checkpoint(tmp_path / "old.pt", {"step": 3})
    checksum_path(path).unlink()
    assert load_checkpoint(path)["step"] == 3
    torch.save({"step": 4}, tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt")["step"] == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garble checksum"])
def test_resume_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path, damage):
    directory = a_run(tmp_path, (2, 4, 6))
    latest = directory / "step_00000006.pt"
    if damage == "truncate":
        latest.write_bytes(latest.read_bytes()[:100])
    elif damage == "flip":
        flip_a_byte(latest)
    elif damage == "delete":
        latest.unlink()
    else:
        checksum_path(latest).write_text("not a checksum\n", encoding="utf-8")
    warnings: list[str] = []
    found = load_latest_checkpoint(tmp_path, warnings.append)
    assert found is not None
    path, state = found
    assert path == directory / "step_00000004.pt" and state["step"] == 4
    assert len(warnings) == 1 and str(latest) in warnings[0] and "skipped" in warnings[0]


def test_resume_skips_as_many_as_needed_and_fails_clearly_when_none_loads(tmp_path):
    directory = a_run(tmp_path, (2, 4, 6))
    save_checkpoint(directory / "step_00000008.pt", {"step": 8})  # newer than `latest`: never committed
    flip_a_byte(directory / "step_00000006.pt")
    (directory / "step_00000004.pt").write_bytes(b"")
    warnings: list[str] = []
    _, state = load_latest_checkpoint(tmp_path, warnings.append)  # type: ignore[misc]
    assert state["step"] == 2 and len(warnings) == 2
    flip_a_byte(directory / "step_00000002.pt")
    with pytest.raises(CorruptCheckpointError, match="no checkpoint loads") as caught:
        load_latest_checkpoint(tmp_path, warnings.append)
    for step in (2, 4, 6):
        assert f"step_{step:08d}.pt" in str(caught.value)
    assert load_latest_checkpoint(tmp_path / "elsewhere", warnings.append) is None  # no `latest`: a new run


def test_an_unsafe_latest_checkpoint_is_refused_not_skipped(tmp_path):
    directory = a_run(tmp_path, (2, 4))
    torch.save({"object": NotData()}, directory / "step_00000004.pt")
    checksum_path(directory / "step_00000004.pt").unlink()
    with pytest.raises(UnsafeCheckpointError, match="not a plain weights file"):
        load_latest_checkpoint(tmp_path, print)


# ---------------------------------------------------------------------------------------------- preflight


def test_a_folder_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(PreflightError, match=r"run\.output_dir: .*a-file/run cannot be written"):
        check_writable(blocker / "run", "run.output_dir")
    check_writable(tmp_path / "new" / "run", "run.output_dir")  # created, probe removed
    assert list((tmp_path / "new" / "run").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits")
def test_a_read_only_folder_is_not_writable(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PreflightError, match=r"read-only cannot be written \(Permission denied\)"):
            check_writable(folder, "data.cache_dir")
    finally:
        folder.chmod(0o755)


def test_too_little_free_space_names_the_folder_what_is_needed_and_what_is_free(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (100 << 20), 100 << 20))
    model = torch.nn.Linear(1000, 1000)  # about 4 MB of parameters
    estimate = checkpoint_bytes(model)
    assert estimate == 3 * (1000 * 1000 + 1000) * 4  # state dict + two optimiser slots
    with pytest.raises(PreflightError) as caught:
        check_room([(tmp_path, 2 * estimate, "run.output_dir")])
    message = str(caught.value)
    assert str(tmp_path) in message and "100.0 MiB free" in message and "needs at least 278.9 MiB" in message
    check_room([(tmp_path, 2 * estimate, "run.output_dir")], margin=0)  # 2 x 11.5 MiB fit


def test_places_on_one_file_system_add_up_and_a_folder_not_made_yet_counts_on_its_parent(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 300 << 20))
    run_dir, store = tmp_path / "outputs" / "run", tmp_path / "not" / "made" / "mlruns"
    check_room([(run_dir, 200 << 20, "run.output_dir")], margin=0)
    check_room([(store, 200 << 20, "the MLflow store")], margin=0)
    with pytest.raises(PreflightError) as caught:  # each fits alone, not both on the same disk
        check_room([(run_dir, 200 << 20, "run.output_dir"), (store, 200 << 20, "the MLflow store")], margin=0)
    message = str(caught.value)
    assert "300.0 MiB free, this run needs at least 400.0 MiB" in message
    listed = f"run.output_dir: {run_dir} needs about 200.0 MiB; the MLflow store: {store} needs about 200.0 MiB"
    assert listed in message


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("integrity")
    return folder, write_training_data(folder, volumes=2, images=4)


def run(folder: Path, manifest: Path, *extra: str):
    return Trainer(compose_pretrain_config(tiny_overrides(manifest, folder, *extra)), project_dir=folder).fit()


def test_a_resumed_run_skips_a_corrupt_latest_checkpoint_and_prints_where_it_resumes(dataset, capsys):
    folder, manifest = dataset
    common = ("trainer.checkpoint_every=2", "logging=none", "run.name=fallback")
    run(folder, manifest, "trainer.max_steps=4", *common)
    directory = folder / "outputs" / "fallback" / "checkpoints"
    assert sorted(p.name for p in directory.glob("step_*")) == [
        "step_00000002.pt", "step_00000002.pt.sha256", "step_00000004.pt", "step_00000004.pt.sha256",
    ]  # fmt: skip
    flip_a_byte(directory / "step_00000004.pt")
    capsys.readouterr()
    resumed = run(folder, manifest, "trainer.max_steps=5", *common)
    out = capsys.readouterr().out
    assert f"fallback: warning: checkpoint {directory / 'step_00000004.pt'} skipped: checksum mismatch" in out
    assert f"fallback: resuming from {directory / 'step_00000002.pt'} at step 2" in out
    assert resumed.status == "finished" and resumed.step == 5
    assert load_checkpoint(directory / "step_00000004.pt")["step"] == 4  # written again, with its checksum
    assert sorted(p.name for p in directory.glob("step_*.pt")) == ["step_00000004.pt", "step_00000005.pt"]
    assert not checksum_path(directory / "step_00000002.pt").exists()  # pruned with its checkpoint


@pytest.mark.parametrize("blocked", ["outputs", "cache", "mlruns"])
def test_an_unwritable_folder_stops_the_run_before_any_work(dataset, tmp_path, capsys, blocked):
    """``run.output_dir``, ``data.cache_dir`` and the local MLflow store: exit code 2 before the cache is built."""
    _, manifest = dataset
    (tmp_path / blocked).write_text("a file where a folder should be", encoding="utf-8")
    code = main(["pretrain", *tiny_overrides(manifest, tmp_path, "trainer.max_steps=1", "run.name=blocked")])
    err = capsys.readouterr().err
    assert code == 2
    what = {"outputs": "run.output_dir", "cache": "data.cache_dir", "mlruns": "the MLflow store"}[blocked]
    assert f"error: {what}" in err and str(tmp_path / blocked) in err and "cannot be written" in err
    assert not list(tmp_path.glob("cache/*"))  # the cache was not built (preflight may leave its empty folder)


def test_too_little_disk_space_stops_the_run_before_the_first_step(dataset, tmp_path, capsys, monkeypatch):
    _, manifest = dataset
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (10 << 20), 10 << 20))
    code = main(
        ["pretrain", *tiny_overrides(manifest, tmp_path, "trainer.max_steps=1", "run.name=full", "logging=none")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: run.output_dir: {tmp_path / 'outputs' / 'full'} has 10.0 MiB free, this run needs at least" in err
    assert not (tmp_path / "outputs" / "full" / "checkpoints").exists()
