"""Segmentation backbones of several quality studies side by side, seed by seed (hippocampus, issue 14).

Usage (from the repository root)::

    .venv/bin/python benchmarks/seg_table.py --baseline random \\
        "random=out/hippo-a:random" "SimCLR, 485 steps=out/hippo-a:simclr" "joint=out/hippo-b:joint-simclr" \\
        [--fraction 0.1] [--update BENCHMARKS.md --section NAME]

Each entry is ``LABEL=STUDY:BACKBONE``: a ``benchmarks/quality.py --out`` folder and a backbone of its hippocampus
table. Several folders for one label (``LABEL=S1:B,S2:B``, one pretraining seed each) give one row per folder and a
row over all of them; when the baseline label names as many folders, they are compared pairwise, the j-th with the
j-th (the same pretraining seed). The table shows, per row, the mean Dice over the fine-tuning seeds, each seed's
Dice, and each seed's difference from the ``--baseline`` row (the entry with that label; Dice x 100), read from the
studies' ``quality.json`` (``per_seed``): nothing is typed in. Seeds are matched by number; a study without
per-seed figures is refused with its path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from _report import markdown_table, show_table


def seed_dice(study: Path, backbone: str, fraction: float) -> dict[int, float]:
    """Seed -> mean Dice of one backbone at one label fraction in the study's ``quality.json``."""
    path = study / "quality.json"
    rows = json.loads(path.read_text(encoding="utf-8"))["tables"].get("hippocampus", {}).get("rows", [])
    for row in rows:
        if row["backbone"] == backbone and row["label_fraction"] == fraction:
            if "per_seed" not in row:
                raise SystemExit(f"{path}: {backbone} at {fraction:g} has no per-seed Dice (a study from before them)")
            return dict(zip(row["per_seed"]["seeds"], row["per_seed"]["dice_mean"], strict=True))
    raise SystemExit(f"{path}: no hippocampus row for backbone {backbone!r} at label fraction {fraction:g}")


def parse_entry(text: str) -> tuple[str, list[tuple[Path, str]]]:
    """``LABEL=S1:B1,S2:B2`` -> (label, [(study, backbone), ...])."""
    label, sep, sources = text.partition("=")
    pairs = [source.rpartition(":") for source in sources.split(",") if source]
    if not sep or not label or not pairs or any(not study or not backbone for study, _, backbone in pairs):
        raise SystemExit(f"entry {text!r}: expected LABEL=STUDY:BACKBONE[,STUDY:BACKBONE...]")
    return label, [(Path(study), backbone) for study, _, backbone in pairs]


def table(entries: list[tuple[str, list[tuple[Path, str]]]], baseline: str | None, fraction: float) -> str:
    """One row per (label, study): mean ± std Dice, each seed's Dice, each seed's difference from the baseline; and,
    for a label with several studies, a row over all of them (every study's every seed).

    When the baseline label and an entry name the same number of studies (one per pretraining seed, in the same
    order), the entry's j-th study is compared with the baseline's j-th (paired by pretraining seed); otherwise every
    study is compared with the baseline's first."""
    references: list[dict[int, float]] = []
    if baseline is not None:
        chosen = [sources for label, sources in entries if label == baseline]
        if not chosen:
            raise SystemExit(f"--baseline {baseline!r} is not one of the entries' labels")
        references = [seed_dice(study, backbone, fraction) for study, backbone in chosen[0]]
    header = ["backbone", "Dice mean", "per seed"]
    if references:
        header += [f"− {baseline} per seed (x 100)", "mean"]
    rows = []
    for label, sources in entries:
        paired = len(references) == len(sources)
        pooled: list[float] = []
        pooled_differences: list[float] = []
        for j, (study, backbone) in enumerate(sources):
            dice = seed_dice(study, backbone, fraction)
            values = [dice[s] for s in sorted(dice)]
            pooled += values
            name = f"{label} ({study.name})" if len(sources) > 1 else label  # which study: its folder's name
            cells = [name, _mean_std(values), ", ".join(f"{v:.3f}" for v in values)]
            if references:
                reference = references[j if paired else 0]
                differences = [100 * (dice[s] - reference[s]) for s in sorted(dice) if s in reference]
                pooled_differences += differences
                cells += [", ".join(f"{d:+.1f}" for d in differences), f"{statistics.fmean(differences):+.1f}"]
            rows.append(cells)
        if len(sources) > 1:
            cells = [f"{label}, all {len(sources)}", _mean_std(pooled), f"{len(pooled)} runs"]
            if references:
                cells += [
                    "paired by study" if paired else "each against the first",
                    f"{statistics.fmean(pooled_differences):+.1f}",
                ]
            rows.append(cells)
    return markdown_table(header, rows)


def _mean_std(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", metavar="LABEL=STUDY:BACKBONE[,...]")
    parser.add_argument("--baseline", help="the label of the row every seed is compared with")
    parser.add_argument("--fraction", type=float, default=0.1, help="label fraction (default 0.1)")
    parser.add_argument("--update", help="write the table into this Markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--section", default="seg-table", help="section name in --update")
    args = parser.parse_args(argv)
    text = table([parse_entry(e) for e in args.entries], args.baseline, args.fraction)
    show_table(text, args.update, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
