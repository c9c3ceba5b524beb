"""Faults a long run meets on a shared machine (issue 18): ``kill -9`` at every stage of a checkpoint write and at
random moments, a worker killed under ``torchrun --max-restarts``, a rank that cannot read the checkpoint rank 0
chose.

Each killed process is a real pretraining process (``tests/fault_driver.py``) that sends itself SIGKILL at the named
point, or is killed from outside; the next start of the same command resumes. What must hold every time: the process
that resumes says so on the console, from the newest checkpoint that was completely written (never a corrupt one,
never more steps lost than those since it), the temporary file of an interrupted write is removed, and the run ends
with exactly the weights of a run that was never killed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_driver import (
    DRIVER,
    assert_same_weights,
    check_records,
    environment,
    kill_at_random_moments,
    leftovers,
    resumed_step,
    start,
)
from training import tiny_overrides, write_training_data

from medssl.runtime.checkpoints import load_checkpoint, load_latest_checkpoint

STEPS = 8
# (kill point, the step the next start resumes from): checkpoints every step, so the newest complete one is the
# previous step's unless the kill came after `latest` moved
KILLS = [
    ("write:2", 1),  # 64 KiB into step_2's temporary file
    ("rename:3", 2),  # step_3 fsynced under its temporary name
    ("checksum:4", 3),  # step_4 in place without its .sha256; `latest` still names step_3
    ("latest:5", 4),  # step_5 and its checksum in place, `latest` not moved
    ("prune:6", 6),  # `latest` names step_6, the oldest not yet pruned
]  # kills between writes: test_kill_9_at_random_moments


def overrides(folder: Path, manifest: Path, name: str) -> list[str]:
    return tiny_overrides(
        manifest,
        folder,
        "method=joint",
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=2",
        "logging=none",
        f"run.name={name}",
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The training data, and a run of the same command that was never killed (its last checkpoint)."""
    folder = tmp_path_factory.mktemp("faults")
    manifest = write_training_data(folder, volumes=3, images=8)
    done = start(folder, "none", overrides(folder, manifest, "never-killed"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, manifest, folder / "outputs" / "never-killed" / "checkpoints" / f"step_{STEPS:08d}.pt"


def test_kill_9_at_every_stage_of_a_checkpoint_write_loses_nothing_and_ends_identical(data):
    folder, manifest, reference = data
    args = overrides(folder, manifest, "killed")
    run_dir = folder / "outputs" / "killed"
    previous_kill, removal_due = None, False
    for kill, resume_at in KILLS:
        done = start(folder, kill, args)
        assert done.returncode == -signal.SIGKILL, (
            f"{kill}: {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
        if previous_kill is not None:
            assert resumed_step(done.stdout) == previous_kill, f"{kill}: {done.stdout[-2000:]}"
        if removal_due:  # the previous start died inside a write: this one removed its temporary file
            assert "unfinished checkpoint file(s) of a killed write" in done.stdout, f"{kill}: {done.stdout[-2000:]}"
        removal_due = kill.split(":")[0] in ("write", "rename")
        assert bool(leftovers(run_dir)) == removal_due, f"{kill}: {leftovers(run_dir)}"
        # What the next start will load: the newest complete checkpoint, verified by its checksum.
        skipped: list[str] = []
        path, state = load_latest_checkpoint(run_dir, warn=skipped.append)
        assert not skipped, f"{kill}: {skipped}"
        assert state["step"] == resume_at, f"{kill}: latest is {path.name}"
        previous_kill = resume_at
    done = start(folder, "none", args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert resumed_step(done.stdout) == previous_kill
    assert f"finished at step {STEPS}" in done.stdout
    assert not leftovers(run_dir)
    assert_same_weights(reference, run_dir / "checkpoints" / f"step_{STEPS:08d}.pt")


def test_kill_9_at_random_moments_never_loads_a_corrupt_checkpoint_and_ends_identical(data):
    folder, manifest, reference = data
    args = overrides(folder, manifest, "random-kills")
    records = kill_at_random_moments(folder, args, kills=2, seed=18)
    last = check_records(records)
    done = start(folder, "none", args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert resumed_step(done.stdout) == last
    assert_same_weights(reference, folder / "outputs" / "random-kills" / "checkpoints" / f"step_{STEPS:08d}.pt")


def test_torchrun_max_restarts_turns_a_killed_worker_into_a_finished_run(data):
    folder, manifest, _ = data
    args = overrides(folder, manifest, "elastic")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
        "--monitor-interval=0.5", str(DRIVER), "rank1-step:5", *args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=folder, env=environment(), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=420)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"resuming from \S+step_(\d+)\.pt at step (4|5)", output), output[-4000:]
    assert output.count(f"fault_driver: finished at step {STEPS}") == 2, output[-4000:]
    final = load_checkpoint(folder / "outputs" / "elastic" / "checkpoints" / f"step_{STEPS:08d}.pt")
    assert final["step"] == STEPS and final["world_size"] == 2


def _rank_that_cannot_read(rank: int, init_file: str, folder: str, manifest: str) -> None:
    """Rank 1 cannot read the checkpoint rank 0 chose (a file system that differs between nodes, a flaky mount)."""
    import torch.distributed as dist

    import medssl.train.trainer as trainer_module
    from medssl.runtime.checkpoints import CorruptCheckpointError
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))  # fmt: skip
    if rank == 1:

        def unreadable(path, *args, **kwargs):
            raise CorruptCheckpointError(f"{path}: not a readable medssl checkpoint (Input/output error)")

        trainer_module.load_checkpoint = unreadable
    config = compose_pretrain_config([*overrides(Path(folder), Path(manifest), "unreadable"), "trainer.max_steps=9"])
    begin = time.monotonic()
    try:
        Trainer(config, project_dir=folder).fit()
    except CorruptCheckpointError as exc:
        outcome = f"raised after {time.monotonic() - begin:.0f} s: {exc}"
    else:
        outcome = "trained"
    Path(folder, f"unreadable-rank{rank}.txt").write_text(outcome, encoding="utf-8")


def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank_at_once(data):
    from ranks import spawn_ranks

    folder, manifest, reference = data
    shutil.copytree(reference.parents[1], folder / "outputs" / "unreadable")  # a finished run to resume
    spawn_ranks(_rank_that_cannot_read, (str(folder), str(manifest)))
    outcomes = [Path(folder, f"unreadable-rank{r}.txt").read_text(encoding="utf-8") for r in (0, 1)]
    for outcome in outcomes:
        assert outcome.startswith("raised after"), outcomes
        assert "step_00000008.pt: not a readable medssl checkpoint (Input/output error)" in outcome, outcomes
        assert int(outcome.split()[2]) < 30, outcomes  # not the process group's timeout (60 s here)
    assert outcomes[0].startswith("raised after") and ": rank 1: " in outcomes[0], "rank 0 says which rank failed"
