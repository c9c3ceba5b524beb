"""One table of a lever study: each lever's quality study (a ``benchmarks/quality.py --out`` folder) side by side.

Usage (from the repository root)::

    .venv/bin/python benchmarks/lever_table.py --task mednist --method swav2d \\
        baseline=outputs/levers/s1-baseline eps0.03=outputs/levers/s1-eps003 ... [--update BENCHMARKS.md]
    .venv/bin/python benchmarks/lever_table.py --task cxr --metric auroc \\
        baseline=out/b-s0,out/b-s1,out/b-s2 koleo=out/k-s0,out/k-s1,out/k-s2     # one folder per pretraining seed
    .venv/bin/python benchmarks/lever_table.py --task sepclr --method sepclr/salient --baseline sepclr/common \\
        --fraction 1 --metric auroc --seeds-only sepclr=out/sep-s0,out/sep-s1,out/sep-s2   # salient minus common

For every study it reads ``quality.json`` (the probes of ``--method`` and of ``--baseline``, random init unless
told, at ``--fraction`` of the labels, 10% unless told, mean over the evaluation seeds) and, from the study's MLflow
store, the pretraining run's health curves: the L_intra loss and its gap to ``ln K`` at the end, the embedding
uniformity at the first and the last logged step, the prediction entropy (normalised) and the Sinkhorn codes'
entropy (nats; the loss is never below it) at the end; for an instance method (SimCLR, no L_intra) its InfoNCE loss
and embedding uniformity, with n/a in the SwAV-only columns. Nothing is typed in: every figure comes from the study's
own files.

A lever given several folders (``NAME=F1,F2,...``, one pretraining seed each) gets one row per folder and a line in
a second table: per pretraining seed, ``--metric`` of ``--method`` minus random init's, averaged over the evaluation
seeds, for kNN and the linear probe.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from _report import markdown_table, metric_label, show_table
from curves import history, study_run


def probe(
    study: Path, task: str, backbone: str, protocol: str, fraction: float = 0.1, metric: str = "accuracy"
) -> tuple[float, float] | None:
    """(mean, std) of ``metric`` in one probe row of the study's ``quality.json``, or None when absent."""
    results = json.loads((study / "quality.json").read_text(encoding="utf-8"))
    for row in results["tables"].get(task, {}).get("rows", []):
        if row["backbone"] == backbone and row["protocol"] == protocol and row["label_fraction"] == fraction:
            return float(row[metric][0]), float(row[metric][1])
    return None


def per_seed(
    study: Path,
    task: str,
    backbone: str,
    protocol: str,
    fraction: float = 0.1,
    metric: str = "accuracy",
    baseline: str = "random",
) -> list[float]:
    """``metric`` of ``backbone`` minus ``baseline``'s (random init unless told), evaluation seed by seed
    (``evaluation-<task>/results.json``)."""
    path = study / f"evaluation-{task}" / "results.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))["results"]

    def by_seed(name: str) -> dict[int, float]:
        return {
            int(r["seed"]): float(r[metric])
            for r in rows
            if r["backbone"] == name and r["protocol"] == protocol and r["label_fraction"] == fraction
        }

    ours, theirs = by_seed(backbone), by_seed(baseline)
    return [ours[seed] - theirs[seed] for seed in sorted(ours) if seed in theirs]


def health(study: Path, run_name: str) -> dict[str, Any]:
    """First and last values of the pretraining run's curves, and its steps, from the study's MLflow store."""
    found = study_run(study, run_name)
    if found is None:
        return {}
    client, run = found
    out: dict[str, Any] = {
        "prototypes": run.data.params.get("model.intra_prototypes", "[512]"),
        "seed": run.data.params.get("seed"),
    }
    keys = (
        "loss/intra",
        "health/intra_uniformity",
        "health/intra_prediction_entropy",
        "health/intra_code_entropy",
        "loss/total",
        "health/uniformity",
    )  # the last two: an instance method's (SimCLR) only loss and spread
    for key in keys:
        if points := history(client, run, key):
            out[key] = (points[0][1], points[-1][1], points[-1][0])
    return out


def table(
    task: str,
    method: str,
    studies: list[tuple[str, Path]],
    metric: str = "accuracy",
    baseline: str = "random",
    fraction: float = 0.1,
) -> str:
    """One row per study: the pretraining run's health curves and both probes of ``method`` and ``baseline`` with
    ``fraction`` of the labels."""
    short, at = metric_label(metric), f"@{fraction:.0%}"
    header = ["lever", "steps", "L_intra end", "ln K − L_intra", "uniformity first → end", "prediction entropy end"]
    header.append("code entropy end (nats)")
    header += [f"kNN {short} {at} ({method} / {baseline})", f"linear {short} {at} ({method} / {baseline})"]
    header.append(f"kNN − {baseline} per seed")
    rows = []
    for name, study in studies:
        curves = health(study, f"{task}-{method}")
        k = int(json.loads(curves.get("prototypes", "[512]"))[0])
        clustering = "loss/intra" in curves
        loss = curves.get("loss/intra") or curves.get("loss/total")  # SimCLR: its InfoNCE, with no ln K to compare
        spread = curves.get("health/intra_uniformity") or curves.get("health/uniformity")
        entropy = curves.get("health/intra_prediction_entropy")
        codes = curves.get("health/intra_code_entropy")  # logged from commit 9117aee on
        cells = [name, str(loss[2]) if loss else "?"]
        cells.append(f"{loss[1]:.2f}" if loss else "?")
        cells.append((f"{math.log(k) - loss[1]:.2f}" if clustering else "n/a (InfoNCE)") if loss else "?")
        cells.append(f"{spread[0]:.2f} → {spread[1]:.2f}" if spread else "?")
        cells.append(f"{entropy[1]:.3f}" if entropy else "?" if clustering else "n/a")
        cells.append(f"{codes[1]:.2f}" if codes else "not logged" if clustering else "n/a")
        for protocol in ("knn", "linear"):
            ours = probe(study, task, method, protocol, fraction, metric)
            theirs = probe(study, task, baseline, protocol, fraction, metric)
            cells.append(f"{ours[0]:.3f} ± {ours[1]:.3f} / {theirs[0]:.3f}" if ours and theirs else "not finished")
        differences = per_seed(study, task, method, "knn", fraction, metric, baseline)
        cells.append(", ".join(f"{d:+.3f}" for d in differences) if differences else "?")
        rows.append(cells)
    return markdown_table(header, rows)


def seed_table(
    task: str,
    method: str,
    levers: list[tuple[str, list[Path]]],
    metric: str = "accuracy",
    baseline: str = "random",
    fraction: float = 0.1,
) -> str:
    """Per lever, per pretraining seed (one folder each): ``metric`` of ``method`` minus ``baseline``'s (random init
    unless told), mean over evaluation seeds."""
    label = metric.replace("_", " ")
    header = ["lever", "pretraining seeds", f"kNN {label} − {baseline}, per pretraining seed", "mean"]
    header += [f"linear {label} − {baseline}, per pretraining seed", "mean"]
    rows = []
    for name, folders in levers:
        cells = [name, str(len(folders))]
        for protocol in ("knn", "linear"):
            means = [
                statistics.fmean(d)
                for f in folders
                if (d := per_seed(f, task, method, protocol, fraction, metric, baseline))
            ]
            cells.append(", ".join(f"{m:+.3f}" for m in means) if means else "?")
            cells.append(f"{statistics.fmean(means):+.3f}" if means else "?")
        rows.append(cells)
    return markdown_table(header, rows)


def study_parser(description: str | None, metavar: str, help_text: str) -> argparse.ArgumentParser:
    """The options of a table made from quality studies: the studies, ``--task``, ``--method``, ``--metric`` and
    where to write it (``--update`` FILE, ``--section`` TAG)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar=metavar, help=help_text)
    parser.add_argument("--metric", default="accuracy", choices=("accuracy", "auroc", "balanced_accuracy"))
    parser.add_argument("--task", default="mednist")
    parser.add_argument("--method", default="swav2d")
    parser.add_argument("--update", help="write the table into this Markdown file's --section")
    parser.add_argument("--section", default="table")
    parser.add_argument("--baseline", default="random", help="the backbone subtracted (e.g. sepclr/common)")
    parser.add_argument("--fraction", type=float, default=0.1, help="label fraction of the probes read")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "NAME=FOLDER[,FOLDER...]", "quality.py --out folders per lever (one per seed)")
    parser.set_defaults(section="levers-table")
    parser.add_argument("--seeds-only", action="store_true", help="only the per-pretraining-seed table")
    args = parser.parse_args(argv)
    levers: list[tuple[str, list[Path]]] = []
    for item in args.studies:
        name, _, spec = item.partition("=")
        folders = [Path(f) for f in spec.split(",") if f]
        if not folders or not all((f / "quality.json").is_file() for f in folders):
            parser.error(f"{item!r}: expected NAME=FOLDER[,FOLDER...] with FOLDER/quality.json")
        levers.append((name, folders))
    studies = [
        (
            name
            if len(folders) == 1
            else f"{name} (seed {health(folder, f'{args.task}-{args.method}').get('seed', i)})",
            folder,
        )
        for name, folders in levers
        for i, folder in enumerate(folders)
    ]
    parts = []
    if not args.seeds_only:
        parts.append(table(args.task, args.method, studies, args.metric, args.baseline, args.fraction))
    if args.seeds_only or any(len(folders) > 1 for _, folders in levers):
        parts.append(seed_table(args.task, args.method, levers, args.metric, args.baseline, args.fraction))
    text = "\n\n".join(parts)
    show_table(text, args.update, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
