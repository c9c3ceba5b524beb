"""A pretraining run's logged curves from a quality study's MLflow store, every ``--every``-th logged point.

Usage (from the repository root)::

    .venv/bin/python benchmarks/curves.py out/hippo-interq128 hippocampus-joint-simclr loss/inter \\
        health/inter_code_entropy health/inter_prediction_entropy [--every 2]

Prints one line per metric: ``step:value`` pairs in step order, read with MLflow's own client; nothing is typed in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def study_run(study: Path, run_name: str) -> tuple[Any, Any] | None:
    """(MLflow client, run) of the run ``run_name`` in the study's store (experiment medssl-quality), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medssl-quality")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'") if experiment else []
    return (client, runs[0]) if runs else None


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric of ``run``, in step order (empty when not logged)."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def curves(study: Path, run_name: str, keys: Sequence[str], every: int = 1) -> dict[str, list[tuple[int, float]]]:
    """Metric -> [(step, value), ...] of the study's run ``run_name``, every ``every``-th point; a missing run is an
    error naming the store."""
    found = study_run(study, run_name)
    if found is None:
        raise SystemExit(f"{study / 'mlruns'}: no run named {run_name!r} in experiment medssl-quality")
    return {key: history(*found, key)[::every] for key in keys}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a benchmarks/quality.py --out folder")
    parser.add_argument("run", help="the pretraining run's name, e.g. hippocampus-joint-simclr")
    parser.add_argument("keys", nargs="+", help="metric keys, e.g. loss/inter health/inter_code_entropy")
    parser.add_argument("--every", type=int, default=1, help="print every n-th logged point")
    args = parser.parse_args(argv)
    for key, points in curves(args.study, args.run, args.keys, max(1, args.every)).items():
        print(f"{key}: " + (" ".join(f"{step}:{value:.2f}" for step, value in points) or "not logged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
