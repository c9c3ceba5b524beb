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


def curves(study: Path, run_name: str, keys: Sequence[str], every: int = 1) -> dict[str, list[tuple[int, float]]]:
    """Metric -> [(step, value), ...] of the study's run ``run_name`` (experiment medssl-quality), every
    ``every``-th point; a missing run is an error naming the store."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{study / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("medssl-quality")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'") if experiment else []
    if not runs:
        raise SystemExit(f"{store}: no run named {run_name!r} in experiment medssl-quality")
    out = {}
    for key in keys:
        history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
        out[key] = [(m.step, m.value) for m in history[::every]]
    return out


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
