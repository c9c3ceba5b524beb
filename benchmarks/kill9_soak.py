"""kill -9 soak (issue 18): one short pretraining killed from outside at many random moments, then finished.

Usage (from the repository root)::

    .venv/bin/python benchmarks/kill9_soak.py --kills 40 --update BENCHMARKS.md

The long variant of ``tests/test_faults.py``: the same real pretraining process (``tests/fault_driver.py``, the joint
method on a tiny real-file dataset, a checkpoint after every step so that kills often land inside a write), started
again after each SIGKILL, which arrives at a random moment after that start's first new checkpoint. After every kill:
the newest complete checkpoint is loaded and verified (a corrupt or unverifiable one would be a failure), the next
start must resume exactly there (no more lost than the steps since it), and a temporary file on disk counts the kill
as one that landed inside a write. At the end the run finishes and its weights must equal, to the bit, those of the
same command never killed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from _report import update_section  # noqa: E402
from fault_driver import assert_same_weights, check_records, kill_at_random_moments, resumed_step, start  # noqa: E402
from training import tiny_overrides, write_training_data  # noqa: E402


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200, help="the run's length in optimiser steps")
    parser.add_argument("--seed", type=int, default=18, help="draws the kill moments")
    parser.add_argument("--max-delay", type=float, default=1.5, help="seconds after a start's first new checkpoint")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--update", type=Path, default=None, help="write the section into this Markdown file")
    return parser.parse_args(argv)


def soak(folder: Path, kills: int, steps: int, seed: int, max_delay: float) -> dict[str, object]:
    """The never-killed reference, ``kills`` random kills of the same command, the finishing start; the checks of
    ``tests/test_faults.py`` on every record. Returns the figures."""
    manifest = write_training_data(folder, volumes=3, images=8)

    def command(name: str) -> list[str]:
        return tiny_overrides(manifest, folder, "method=joint", f"trainer.max_steps={steps}",
                              "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2", "logging=none",
                              f"run.name={name}")  # fmt: skip

    begin = time.monotonic()
    reference = start(folder, "none", command("never-killed"), timeout=7200)
    if reference.returncode != 0:
        raise SystemExit(reference.stdout[-3000:] + reference.stderr[-3000:])
    records: list[dict[str, object]] = []
    while len([r for r in records if "warning" not in r]) < kills:
        batch = kill_at_random_moments(folder, command("killed"), kills=1, seed=seed + len(records),
                                       max_delay=max_delay)  # fmt: skip
        records.extend(batch)
        if batch and batch[-1].get("latest") == steps:  # the run finished before a kill: start it over
            break
    last = check_records(records)
    finish = start(folder, "none", command("killed"), timeout=7200)
    if finish.returncode != 0:
        raise SystemExit(finish.stdout[-3000:] + finish.stderr[-3000:])
    assert resumed_step(finish.stdout) == last
    assert_same_weights(
        folder / "outputs" / "never-killed" / "checkpoints" / f"step_{steps:08d}.pt",
        folder / "outputs" / "killed" / "checkpoints" / f"step_{steps:08d}.pt",
    )
    killed = [r for r in records if r.get("killed")]
    resumed = [int(r["resumed_from"]) for r in records[1:] if r.get("resumed_from") is not None]
    return {
        "kills": len(killed),
        "in_write": sum(bool(r["in_write"]) for r in killed),
        "warnings": len([r for r in records if "warning" in r]),
        "resumed": len(resumed),
        "seconds": time.monotonic() - begin,
        "identical": True,
    }


def section(figures: dict[str, object], args: argparse.Namespace) -> str:
    command = f"python benchmarks/kill9_soak.py --kills {args.kills} --steps {args.steps} --seed {args.seed}"
    return "\n".join([
        "## kill -9 soak (`benchmarks/kill9_soak.py`)",
        "",
        f"Command: `{command} --update BENCHMARKS.md`  ",
        f"Machine: {platform.machine()}, 2 CPU cores, Python {platform.python_version()}; "
        f"{figures['seconds']:.0f} s in all.",
        "",
        f"One {args.steps}-step joint pretraining (tiny model, a checkpoint after every step) killed with SIGKILL from "
        f"outside at a random moment (0-{args.max_delay} s after each start's first new checkpoint), restarted, "
        "killed again, then finished; `tests/test_faults.py` runs the same harness with 2 kills plus one kill at each "
        "stage of a checkpoint write.",
        "",
        "| kills | landed inside a checkpoint write | corrupt or unverified checkpoint loaded | starts that resumed "
        "from the newest complete checkpoint | final weights equal the never-killed run's |",
        "|---|---|---|---|---|",
        f"| {figures['kills']} | {figures['in_write']} | {figures['warnings']} | all {figures['resumed']} | "
        f"{'yes, to the bit' if figures['identical'] else 'no'} |",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        figures = soak(Path(tmp), args.kills, args.steps, args.seed, args.max_delay)
    text = section(figures, args)
    print(text)
    if args.update is not None:
        update_section(args.update, text, "kill9_soak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
