"""Shared helpers for benchmark scripts: write a tagged section into BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def update_section(path: Path, text: str, tag: str) -> None:
    """Replace the block between ``<!-- tag:start -->`` and ``<!-- tag:end -->`` (or append it)."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    block = f"{start}\n{text}{end}\n"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = before + block + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(current, encoding="utf-8")
    os.replace(tmp, path)


def show_table(text: str, update: str | None, tag: str) -> None:
    """Print ``text`` and, with ``update`` (a Markdown file), write it into that file's ``tag`` section."""
    print(text)
    if update:
        update_section(Path(update), text + "\n", tag)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header cells, a separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def metric_label(metric: str) -> str:
    """How a table's header names a probe metric (``acc``, ``AUROC``, ``balanced acc``)."""
    return {"accuracy": "acc", "auroc": "AUROC", "balanced_accuracy": "balanced acc"}.get(metric, metric)


def machine_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine a study ran on: architecture, CPU model (from ``cpuinfo`` where there is one), cores, Python, torch
    and the CPU kernel level torch dispatches to. Training runs are bit-reproducible on one machine but not across
    CPUs whose kernels differ (random init's hippocampus Dice moved between two machines with identical code), so a
    figure is compared only with figures of the same description."""
    import torch

    model = platform.processor() or "unknown CPU"
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(errors="replace").splitlines()
                 if line.startswith("model name") and ":" in line]  # fmt: skip
        model = names[0] if names else model
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"{platform.machine()} ({model}), {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({capability} kernels)")  # fmt: skip
