"""A pretraining process that kills itself with SIGKILL at a chosen point (helper for the fault tests, not a test).

``python tests/fault_driver.py KILL OVERRIDES...`` runs ``Trainer(compose_pretrain_config(OVERRIDES)).fit()`` and
sends itself SIGKILL (no handler, no cleanup: what ``kill -9`` or the kernel's OOM killer does) at ``KILL``:

* ``none``: no kill; the run finishes.
* ``write:<step>``: while ``step_<step>.pt`` is being written, after its first 64 KiB reached the temporary file;
* ``rename:<step>``: ``step_<step>.pt`` written and fsynced under its temporary name, before the rename;
* ``checksum:<step>``: ``step_<step>.pt`` renamed into place, before its ``.sha256`` is written;
* ``latest:<step>``: checkpoint and checksum in place, before ``checkpoints/latest`` names it;
* ``prune:<step>``: ``latest`` names ``step_<step>.pt``, before the oldest checkpoints are pruned;
* ``step:<step>``: after optimiser step ``step``, at a moment unrelated to any write;
* ``rank<r>-step:<step>``: under torchrun, rank ``r`` on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0)
  after step ``step``: a worker that dies mid-run, for ``torchrun --max-restarts``.

The file writes are intercepted by wrapping the functions the trainer calls, so the kill lands exactly inside the
write path at each of its stages; the process then dies as it would from outside.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import medssl.runtime.checkpoints as checkpoints
import medssl.runtime.files as files
import medssl.train.trainer as trainer_module
from medssl.runtime.checkpoints import load_checkpoint, load_latest_checkpoint
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DRIVER = Path(__file__).resolve()


def die() -> None:
    """SIGKILL this process: nothing after this line runs, no ``finally``, no atexit."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str) -> list[Any]:
    """Install the interception for ``kill`` (see the module docstring); returns the callbacks for the trainer."""
    if kill == "none":
        return []
    stage, _, number = kill.partition(":")
    step = int(number)
    name = f"step_{step:08d}.pt"
    if stage == "write":
        original_write = checkpoints._HashingWriter.write

        def write(self: Any, data: bytes) -> int:
            written = original_write(self, data)
            self.total = getattr(self, "total", 0) + written
            if f".{name}." in getattr(self.handle, "name", "") and self.total >= 64 << 10:
                self.handle.flush()
                die()
            return written

        checkpoints._HashingWriter.write = write  # type: ignore[method-assign]
    elif stage in ("rename", "prune"):
        original_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            target = Path(dst).name
            if stage == "rename" and target == name:
                die()
            original_replace(src, dst)
            if stage == "prune" and target == "latest" and Path(dst).read_text(encoding="utf-8").strip() == name:
                die()

        files.os.replace = replace  # type: ignore[attr-defined]
    elif stage in ("checksum", "latest"):
        module = checkpoints if stage == "checksum" else trainer_module
        original_text = module.atomic_write_text
        watched = name + ".sha256" if stage == "checksum" else "latest"

        def write_text(path: Path, text: str, *args: Any, **kwargs: Any) -> None:
            if Path(path).name == watched and (stage == "checksum" or text.strip() == name):
                die()
            original_text(path, text, *args, **kwargs)

        module.atomic_write_text = write_text  # type: ignore[attr-defined]
    elif stage == "step":
        return [lambda done, metrics: die() if done == step else None]
    elif stage.startswith("rank") and stage.endswith("-step"):
        rank = int(stage.removeprefix("rank").removesuffix("-step"))
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        mine = os.environ.get("RANK") == str(rank)
        return [lambda done, metrics: die() if done == step and first_attempt and mine else None]
    else:
        raise SystemExit(f"fault_driver: unknown kill point {kill!r}")
    return []


# ------------------------------------------------------------------ the harness (tests and benchmarks/kill9_soak.py)
def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def start(folder: Path, kill: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the driver to its end (or its kill) in ``folder``."""
    command = [sys.executable, str(DRIVER), kill, *args]
    return subprocess.run(command, cwd=folder, env=environment(), capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)  # fmt: skip


def resumed_step(stdout: str) -> int | None:
    found = re.search(r"resuming from \S+step_(\d+)\.pt at step (\d+)", stdout)
    if found is None:
        return None
    if int(found.group(1)) != int(found.group(2)):
        raise AssertionError(f"resumed from one file, at another step: {found.group(0)}")
    return int(found.group(2))


def assert_same_weights(a: Path, b: Path) -> None:
    expected, got = load_checkpoint(a)["objective"], load_checkpoint(b)["objective"]
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


def pointer(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text(encoding="utf-8") if latest.is_file() else None


def kill_at_random_moments(
    folder: Path, args: list[str], kills: int, seed: int, max_delay: float = 1.5
) -> list[dict[str, object]]:
    """Start the run and SIGKILL it from outside at a random moment after this start's first checkpoint (delays drawn
    from ``seed``), ``kills`` times. After each kill, record the newest complete checkpoint (verified; a skipped one is
    recorded as a warning), whether a write was interrupted (a temporary file on disk) and the step the start resumed
    from. A start that finishes before its kill is recorded as not killed."""
    rng = random.Random(seed)
    run_dir = Path(folder) / "outputs" / args[-1].split("=", 1)[1]
    records: list[dict[str, object]] = []
    for _ in range(kills):
        before = pointer(run_dir)
        process = subprocess.Popen([sys.executable, str(DRIVER), "none", *args], cwd=folder, env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace")  # fmt: skip
        begin = time.monotonic()
        while time.monotonic() - begin < 120 and process.poll() is None and pointer(run_dir) == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, max_delay))
        process.send_signal(signal.SIGKILL)
        stdout, _ = process.communicate(timeout=60)
        found = load_latest_checkpoint(run_dir, warn=lambda m: records.append({"warning": m}))
        records.append({
            "killed": process.returncode == -signal.SIGKILL,
            "resumed_from": resumed_step(stdout),
            "latest": None if found is None else int(found[1]["step"]),
            "in_write": bool(leftovers(run_dir)),
        })  # fmt: skip
    return records


def check_records(records: list[dict[str, object]]) -> int | None:
    """Every kill left a complete, verified checkpoint, and every start resumed from the one the kill before it left
    (nothing lost beyond the steps since it). Returns the last such step."""
    assert not [r for r in records if "warning" in r], records
    latest = None
    for record in records:
        assert record["resumed_from"] == latest, records
        latest = record["latest"]
    return latest


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    kill, overrides = argv[0], argv[1:]
    callbacks = arm(kill)
    result = Trainer(compose_pretrain_config(overrides), project_dir=Path.cwd(), callbacks=callbacks).fit()
    print(f"fault_driver: {result.status} at step {result.step}", flush=True)
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
