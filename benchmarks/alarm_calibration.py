"""The health alarm replayed on finished quality studies: what it would have said, and whether their features beat
random init.

Usage (from the repository root)::

    .venv/bin/python benchmarks/alarm_calibration.py --task cxr --method swav2d --metric auroc \\
        collapsed=out/c-baseline healthy=out/c-koleo01 ... [--update BENCHMARKS.md --section alarm-table]

For every study (a ``benchmarks/quality.py --out`` folder) it reads the pretraining run's logged windows from the
study's MLflow store (``health/*`` metrics per logging step, the run's warm-up and prototype freeze from its params)
and feeds them, window by window, to :class:`medssl.train.alarms.UniformPredictionAlarm` as the trainer does; and
from ``quality.json`` the kNN probe of the method and of random init at 10% of the labels. A row per study: the 2D
embeddings' uniformity at the alarm's first window, its largest value from there on and at the end, what the alarm
said (tag and step) and the probe. Nothing is typed in: the thresholds are the shipped ones, the figures the
studies' own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from _report import markdown_table, metric_label, show_table
from lever_table import probe, study_parser

from medssl.train.alarms import UniformPredictionAlarm

FREEZE = "method.objective.freeze_prototypes_steps"


def windows(study: Path, run_name: str) -> tuple[dict[str, str], dict[int, dict[str, float]]]:
    """The run's params and its logged ``health/*`` metrics by step, from the study's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medssl-quality")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'") if experiment else []
    if not runs:
        raise SystemExit(f"{study}: no run named {run_name} in its MLflow store")
    run = runs[0]
    by_step: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        if key.startswith("health/"):
            for point in client.get_metric_history(run.info.run_id, key):
                by_step.setdefault(int(point.step), {})[key] = float(point.value)
    return dict(run.data.params), by_step


def replay(params: dict[str, str], by_step: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The alarm fed the run's windows as the trainer feeds them (starting after warm-up and the prototype freeze)."""
    start = max(int(params.get("trainer.optimizer.warmup_steps", 0)), int(params.get(FREEZE, 0)))
    alarm = UniformPredictionAlarm(start_step=start)
    said: list[str] = []
    for step in sorted(by_step):
        said += [
            f"{tag.removeprefix('health_').replace('_', ' ')} at step {step}"
            for tag, _ in alarm.update(step, by_step[step])
        ]
    spread = [
        (step, m["health/intra_uniformity"]) for step, m in sorted(by_step.items()) if "health/intra_uniformity" in m
    ]
    judged = [value for step, value in spread if step >= start]
    return {
        "start": start,
        "steps": max(by_step) if by_step else 0,
        "first": judged[0] if judged else None,
        "largest": max(judged) if judged else None,
        "end": spread[-1][1] if spread else None,
        "said": "; ".join(said) or "nothing",
    }


def _value(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def table(task: str, method: str, studies: list[tuple[str, Path]], metric: str) -> str:
    header = ["study", "steps", "alarm from step", "uniformity at its start", "largest from there", "end"]
    header += ["what the alarm said", f"kNN {metric_label(metric)} @10% ({method} / random)"]
    rows = []
    for name, study in studies:
        found = replay(*windows(study, f"{task}-{method}"))
        ours = probe(study, task, method, "knn", metric=metric)
        random = probe(study, task, "random", "knn", metric=metric)
        cells = [name, str(found["steps"]), str(found["start"]), _value(found["first"]), _value(found["largest"])]
        cells += [_value(found["end"]), found["said"]]
        cells.append(f"{ours[0]:.3f} / {random[0]:.3f}" if ours and random else "not finished")
        rows.append(cells)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, "NAME=FOLDER", "quality.py --out folders")
    parser.set_defaults(section="alarm-table")
    args = parser.parse_args(argv)
    studies = []
    for item in args.studies:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "quality.json").is_file():
            parser.error(f"{item!r}: expected NAME=FOLDER with FOLDER/quality.json")
        studies.append((name, Path(folder)))
    text = table(args.task, args.method, studies, args.metric)
    show_table(text, args.update, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
