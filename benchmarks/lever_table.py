"""One table of a lever study: each lever's quality study (a ``benchmarks/quality.py --out`` folder) side by side.

Usage (from the repository root)::

    .venv/bin/python benchmarks/lever_table.py --task mednist --method swav2d \\
        baseline=outputs/levers/s1-baseline eps0.03=outputs/levers/s1-eps003 ... [--update BENCHMARKS.md]

For every study it reads ``quality.json`` (the probes of ``--method`` and of random init at 10% of the labels, mean
over the evaluation seeds) and, from the study's MLflow store, the pretraining run's health curves: the L_intra loss
and its gap to ``ln K`` at the end, the embedding uniformity at the first and the last logged step, the prediction
entropy at the end. Nothing is typed in: every figure comes from the study's own files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from _report import update_section


def probe(study: Path, task: str, backbone: str, protocol: str, fraction: float = 0.1) -> tuple[float, float] | None:
    """(mean, std) accuracy of one probe row of the study's ``quality.json``, or None when absent."""
    results = json.loads((study / "quality.json").read_text(encoding="utf-8"))
    for row in results["tables"].get(task, {}).get("rows", []):
        if row["backbone"] == backbone and row["protocol"] == protocol and row["label_fraction"] == fraction:
            return float(row["accuracy"][0]), float(row["accuracy"][1])
    return None


def per_seed(study: Path, task: str, backbone: str, protocol: str, fraction: float = 0.1) -> list[float]:
    """Accuracy of ``backbone`` minus random init's, seed by seed (``evaluation-<task>/results.json``)."""
    path = study / f"evaluation-{task}" / "results.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))["results"]

    def by_seed(name: str) -> dict[int, float]:
        return {
            int(r["seed"]): float(r["accuracy"])
            for r in rows
            if r["backbone"] == name and r["protocol"] == protocol and r["label_fraction"] == fraction
        }

    ours, random = by_seed(backbone), by_seed("random")
    return [ours[seed] - random[seed] for seed in sorted(ours) if seed in random]


def health(study: Path, run_name: str) -> dict[str, Any]:
    """First and last values of the pretraining run's curves, and its steps, from the study's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medssl-quality")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    if not runs:
        return {}
    run = runs[0]
    out: dict[str, Any] = {"prototypes": run.data.params.get("model.intra_prototypes", "[512]")}
    for key in ("loss/intra", "health/intra_uniformity", "health/intra_prediction_entropy"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        if history:
            out[key] = (history[0].value, history[-1].value, history[-1].step)
    return out


def table(task: str, method: str, studies: list[tuple[str, Path]]) -> str:
    lines = [
        f"| lever | steps | L_intra end | ln K − L_intra | uniformity first → end | prediction entropy end | "
        f"kNN acc @10% ({method} / random) | linear acc @10% ({method} / random) | kNN − random per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, study in studies:
        curves = health(study, f"{task}-{method}")
        k = int(json.loads(curves.get("prototypes", "[512]"))[0])
        loss = curves.get("loss/intra")
        spread = curves.get("health/intra_uniformity")
        entropy = curves.get("health/intra_prediction_entropy")
        cells = [name, str(loss[2]) if loss else "?"]
        cells.append(f"{loss[1]:.2f}" if loss else "?")
        cells.append(f"{math.log(k) - loss[1]:.2f}" if loss else "?")
        cells.append(f"{spread[0]:.2f} → {spread[1]:.2f}" if spread else "?")
        cells.append(f"{entropy[1]:.3f}" if entropy else "?")
        for protocol in ("knn", "linear"):
            ours, random = probe(study, task, method, protocol), probe(study, task, "random", protocol)
            cells.append(f"{ours[0]:.3f} ± {ours[1]:.3f} / {random[0]:.3f}" if ours and random else "not finished")
        differences = per_seed(study, task, method, "knn")
        cells.append(", ".join(f"{d:+.3f}" for d in differences) if differences else "?")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="NAME=FOLDER", help="a quality.py --out folder per lever")
    parser.add_argument("--task", default="mednist")
    parser.add_argument("--method", default="swav2d")
    parser.add_argument("--update", help="write the table into this Markdown file's --section")
    parser.add_argument("--section", default="levers-table")
    args = parser.parse_args(argv)
    studies = []
    for item in args.studies:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "quality.json").is_file():
            parser.error(f"{item!r}: expected NAME=FOLDER with FOLDER/quality.json")
        studies.append((name, Path(folder)))
    text = table(args.task, args.method, studies)
    print(text)
    if args.update:
        update_section(Path(args.update), text + "\n", args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
