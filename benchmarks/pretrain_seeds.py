"""Pool the studies of several pretraining seeds into one comparison (``quality.py --pretrain-seeds``, issue 14).

One quality study pretrains each method once and evaluates it over several evaluation seeds, so its spread says
nothing about the pretraining run itself; on the hippocampus the pretraining seed alone moved SimCLR's Dice by 2.7
points, more than any lever measured. ``quality.py --pretrain-seeds 0,1,2`` therefore runs the whole study once per
pretraining seed (``<out>/pretrain-seed-S``, each a complete study with its own ``quality.json``) and this module
writes the comparison that decides a claim: per task, each pretrained backbone minus its baseline, pretraining seed
by pretraining seed (each the mean over the evaluation seeds), the mean, and whether it is ahead on every seed.

* ``cxr`` / ``mednist``: each pretrained method minus random init, kNN and linear probe, 10% of the labels, in
  AUROC, accuracy and balanced accuracy.
* ``sepclr``: the salient space minus the common space (the issue's question), and each space minus random init of
  the same head, probes with all the labels.
* ``hippocampus``: Dice x 100 at each label fraction, each pretrained method minus random init, and each joint
  variant minus its 2D-only counterpart (``joint-simclr`` and ``staged-simclr`` minus ``simclr``, the SwAV-based
  joint variants minus ``swav2d``) where both ran.

Every figure is read from the studies' own files (``evaluation-<task>/results.json``, ``quality.json``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from _report import markdown_table
from lever_table import per_seed
from seg_table import seed_dice

# joint variant -> the 2D-only method whose objective is its intra term (the "own 2D-only counterpart")
COUNTERPART = {
    "joint": "swav2d",
    "joint-no-mask": "swav2d",
    "joint-no-inter": "swav2d",
    "joint-full-attention": "swav2d",
    "joint-simclr": "simclr",
    "staged-simclr": "simclr",
}
CLASSIFICATION_METRICS = ("auroc", "accuracy", "balanced_accuracy")
HEADER = ["backbone", "minus", "probe", "metric", "per pretraining seed", "mean", "ahead on every seed"]


def study_folder(out: Path, seed: int) -> Path:
    """Where ``quality.py --pretrain-seeds`` writes the study of one pretraining seed."""
    return out / f"pretrain-seed-{seed}"


def _row(backbone: str, minus: str, probe: str, metric: str, values: list[float], digits: int) -> list[str]:
    """One comparison: its per-seed differences, their mean and whether every one is above zero."""
    if not values:
        return [backbone, minus, probe, metric, "not evaluated", "", ""]
    cells = ", ".join(f"{v:+.{digits}f}" for v in values)
    verdict = "yes" if all(v > 0 for v in values) else "no"
    return [backbone, minus, probe, metric, cells, f"{statistics.fmean(values):+.{digits}f}", verdict]


def classification_rows(
    task: str, pairs: Sequence[tuple[str, str]], folders: Sequence[Path], fraction: float
) -> list[list[str]]:
    """Per (backbone, baseline) pair, probe and metric: the difference per pretraining seed, each the mean over the
    study's evaluation seeds (``lever_table.per_seed``)."""
    rows = []
    for backbone, baseline in pairs:
        for protocol in ("knn", "linear"):
            for metric in CLASSIFICATION_METRICS:
                means = []
                for folder in folders:
                    differences = per_seed(folder, task, backbone, protocol, fraction, metric, baseline)
                    if not differences:
                        means = []
                        break  # a seed without this comparison: the row says so rather than pooling fewer seeds
                    means.append(statistics.fmean(differences))
                label = f"{protocol} @{fraction:.0%}"
                rows.append(_row(backbone, baseline, label, metric.replace("_", " "), means, 3))
    return rows


def segmentation_rows(
    pairs: Sequence[tuple[str, str]], folders: Sequence[Path], fractions: Sequence[float]
) -> list[list[str]]:
    """Per (backbone, baseline) pair and label fraction: Dice x 100 minus the baseline's per pretraining seed, each
    the mean over the fine-tuning seeds (``seg_table.seed_dice``), seeds matched by number."""
    rows = []
    for backbone, baseline in pairs:
        for fraction in fractions:
            means = []
            for folder in folders:
                ours, theirs = seed_dice(folder, backbone, fraction), seed_dice(folder, baseline, fraction)
                means.append(statistics.fmean(100 * (ours[s] - theirs[s]) for s in sorted(ours) if s in theirs))
            rows.append(_row(backbone, baseline, f"fine-tuned @{fraction:.0%}", "Dice x 100", means, 1))
    return rows


def pooled_table(task: str, methods: Sequence[str], folders: Sequence[Path], fractions: Sequence[float]) -> str:
    """The task's comparison over the pretraining seeds' studies (``folders``, one per seed, in seed order)."""
    pretrained = [m for m in methods if m != "random"]
    if task == "sepclr":
        pairs = [("sepclr/salient", "sepclr/common"), ("sepclr/salient", "random/salient"),
                 ("sepclr/common", "random/common")]  # fmt: skip
        rows = classification_rows(task, pairs, folders, 1.0)
    elif task == "hippocampus":
        pairs = [(m, "random") for m in pretrained]
        pairs += [(m, COUNTERPART[m]) for m in pretrained if COUNTERPART.get(m) in pretrained]
        rows = segmentation_rows(pairs, folders, fractions)
    else:
        rows = classification_rows(task, [(m, "random") for m in pretrained], folders, 0.1)
    return markdown_table(HEADER, rows)


def report(header: Sequence[str], tasks: dict[str, list[str]], seeds: Sequence[int], out: Path,
           fractions: Sequence[float], titles: dict[str, str]) -> str:  # fmt: skip
    """The pooled Markdown: ``header`` lines, then per task its table over ``seeds`` and where each study is."""
    folders = [study_folder(out, seed) for seed in seeds]
    lines = list(header)
    for task, methods in tasks.items():
        if not all(_has_task(folder, task) for folder in folders):
            lines += [f"- not pooled: {task} (a pretraining seed's study has no {task} table)", ""]
            continue
        lines += [f"### {titles[task]}: per pretraining seed {', '.join(map(str, seeds))}", ""]
        lines += [pooled_table(task, methods, folders, fractions), ""]
    lines.append("Each pretraining seed's full study: " + ", ".join(f"`{f / 'quality.md'}`" for f in folders) + ".")
    return "\n".join(lines) + "\n"


def _has_task(folder: Path, task: str) -> bool:
    path = folder / "quality.json"
    return path.is_file() and task in json.loads(path.read_text(encoding="utf-8")).get("tables", {})
