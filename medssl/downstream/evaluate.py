"""``medssl evaluate``: a classification protocol for several backbones (and random initialisation).

For every backbone (and feature space: the encoder, or SepCLR's common/salient heads) the frozen features are
extracted once; every (protocol, label fraction, seed) then gives one result (``finetune`` trains a fresh copy of
the encoder for each). Random initialisation is drawn once per seed (seeded), so that its spread over seeds includes
the initialisation, as a pretrained backbone's includes nothing but the labels and the probe. The report is a
Markdown table of mean ± std over seeds and one plot of the metric against the label fraction per protocol, written
to a folder and to MLflow.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from medssl.downstream.classifier import FinetuneSchedule
from medssl.downstream.finetune import (
    PROTOCOLS,
    FinetuneDataConfig,
    encode_splits,
    finetune_result,
    labelled_splits,
    load_encoder,
    probe,
)
from medssl.downstream.spaces import SPACES
from medssl.runtime.devices import resolve_device
from medssl.runtime.files import atomic_write_text
from medssl.runtime.progress import progress as progress_of
from medssl.runtime.seeding import seed_everything

METRICS = ("auroc", "accuracy", "balanced_accuracy")


@dataclass
class EvaluateConfig:
    """``backbones``: name -> bundle folder | MLflow run id | ``none`` (random init of ``encoder``); no default here,
    so that a command-line ``backbones={...}`` replaces the file's set instead of adding to it. ``encoder`` is an
    encoder name, or a bundle folder / run id whose architecture random init copies (without its weights), so that
    the baseline of a backbone pretrained with a non-default stem (``model.max_pool=true``) is the same network."""

    backbones: dict[str, str] = field(default_factory=dict)
    encoder: str = "resnet18"
    spaces: list[str] = field(default_factory=lambda: ["backbone"])  # + common, salient: SepCLR heads
    protocols: list[str] = field(default_factory=lambda: ["linear", "knn"])
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    knn_k: int = 20
    finetune: FinetuneSchedule = field(default_factory=FinetuneSchedule)  # the finetune protocol's schedule
    device: str = "auto"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    out: str = "outputs/evaluation"
    plot_metric: str = "auroc"
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "medssl-evaluate"
    progress: bool = True  # a line per finished job, and the progress of feature extraction and fine-tuning

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"protocols must be a non-empty list of {PROTOCOLS}, got {self.protocols}")
        if not self.backbones or not self.seeds or not self.label_fractions:
            raise ValueError("backbones, seeds and label_fractions must not be empty")
        if any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"label_fractions must be in (0, 1], got {self.label_fractions}")
        if not self.spaces or any(s not in SPACES for s in self.spaces):
            raise ValueError(f"spaces must be a non-empty list of {SPACES}, got {self.spaces}")
        if "finetune" in self.protocols and self.spaces != ["backbone"]:
            raise ValueError("protocol finetune trains the encoder: use it with spaces=[backbone]")
        if self.plot_metric not in METRICS:
            raise ValueError(f"plot_metric must be one of {METRICS}, got {self.plot_metric!r}")


def compose_evaluate_config(overrides: list[str] | None = None, path: str | Path | None = None) -> EvaluateConfig:
    from medssl.runtime.configs import config_file, structured_config

    source = Path(path) if path is not None else config_file("evaluate/classification.yaml")
    if not source.is_file():
        raise ValueError(f"--config: {source}: no such file")
    values = OmegaConf.load(source)
    if any(o.startswith("backbones=") for o in overrides or []):  # a given set of backbones replaces the file's
        values.pop("backbones", None)
    return structured_config(EvaluateConfig, values, overrides)


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (over seeds, ``ddof=0``) per (backbone, protocol, label fraction)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["backbone"], r["protocol"], r["label_fraction"]), []).append(r)
    rows = []
    for (backbone, protocol, fraction), members in groups.items():
        row: dict[str, Any] = {"backbone": backbone, "protocol": protocol, "label_fraction": fraction}
        row["seeds"] = len(members)
        row["train_samples"] = members[0]["train_samples"]
        for metric in METRICS:
            values = np.array([m[metric] for m in members], dtype=float)
            row[metric] = (float(values.mean()), float(values.std()))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backbone | probe | label fraction | training labels | seeds | AUROC | accuracy | balanced accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in METRICS)
        lines.append(
            f"| {r['backbone']} | {r['protocol']} | {r['label_fraction']:g} | {r['train_samples']} | {r['seeds']} | "
            f"{cells} |"
        )
    return "\n".join(lines)


def metric_figure(rows: list[dict[str, Any]], metric: str) -> Figure:
    """``metric`` (mean ± std over seeds) against the label fraction, one panel per probe, one line per backbone."""
    protocols = sorted({r["protocol"] for r in rows})
    figure = Figure(figsize=(5 * len(protocols), 3.8), layout="constrained")
    for axis, protocol in zip(figure.subplots(1, len(protocols), squeeze=False)[0], protocols, strict=True):
        for backbone in sorted({r["backbone"] for r in rows}):
            points = sorted((r for r in rows if r["protocol"] == protocol and r["backbone"] == backbone),
                            key=lambda r: r["label_fraction"])  # fmt: skip
            x = [p["label_fraction"] for p in points]
            mean = np.array([p[metric][0] for p in points])
            std = np.array([p[metric][1] for p in points])
            axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=backbone)
        axis.set_xscale("log")
        axis.set_xlabel("label fraction")
        axis.set_ylabel(metric)
        axis.set_title(protocol)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return figure


def run_evaluate(config: EvaluateConfig, project_dir: Path | None = None) -> dict[str, Any]:
    train, test = labelled_splits(config.data, config.progress)
    device = resolve_device(config.device)
    results: list[dict[str, Any]] = []
    loaded: dict[str, str] = {}
    extractors = [
        (name if space == "backbone" else f"{name}/{space}", source, space)
        for name, source in config.backbones.items()
        for space in config.spaces
    ]
    probes = [p for p in config.protocols if p != "finetune"]
    total = len(extractors) * len(config.protocols) * len(config.label_fractions) * len(config.seeds)
    jobs = progress_of(total=total, desc="medssl evaluate", unit="job", enabled=config.progress, interval=0)
    for name, source, space in extractors:
        # random init: every seed draws its own network, so that the spread over seeds includes the initialisation
        draws = [(seed, [seed]) for seed in config.seeds] if source == "none" else [(None, config.seeds)]
        for init_seed, seeds in draws:
            if init_seed is not None:
                seed_everything(init_seed)
            network, loaded[name] = load_encoder(source, config.encoder, config.tracking_uri, space)
            if init_seed is None or init_seed == config.seeds[0]:
                print(f"medssl evaluate: {name}: {loaded[name]}")
            features = None
            if probes:
                features = encode_splits(network, train, test, config.data.size, device, config.progress)
            for protocol, fraction, seed in itertools.product(config.protocols, config.label_fractions, seeds):
                if protocol == "finetune":
                    metrics = finetune_result(network, train, test, config.data.size, fraction, seed, config.finetune,
                                              device, config.progress)  # fmt: skip
                else:
                    assert features is not None
                    metrics = probe(features, protocol, fraction, seed, config.knn_k)
                results.append({"backbone": name, "protocol": protocol, "label_fraction": fraction, "seed": seed,
                                **{k: metrics[k] for k in (*METRICS, "train_samples", "recall")}})  # fmt: skip
                jobs.set_postfix_str(
                    f"{name} {protocol} fraction {fraction:g} seed {seed}: AUROC {metrics['auroc']:.4f}", refresh=False
                )
                jobs.update()
    jobs.close()
    rows = summarise(results)
    table = markdown_table(rows)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    report = (
        f"# medssl evaluation\n\nManifest `{config.data.manifest}`, splits {config.data.train_split} -> "
        f"{config.data.test_split}, images {config.data.size} px; mean ± std over seeds {config.seeds}.\n\n"
        + "\n".join(f"- {name}: {text}" for name, text in loaded.items())
        + f"\n\n{table}\n\n![{config.plot_metric}]({config.plot_metric}_vs_label_fraction.png)\n"
    )
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "results.json", json.dumps({"results": results, "summary": rows}, indent=2))
    figure = metric_figure(rows, config.plot_metric)
    figure.savefig(out / f"{config.plot_metric}_vs_label_fraction.png", dpi=100)
    print(table)
    print(f"medssl evaluate: report {out / 'report.md'}")
    run_id = None
    if config.mlflow:
        from medssl.runtime.tracking import Tracker, default_tracking_uri, flatten_config

        uri = config.tracking_uri or default_tracking_uri(project_dir or Path.cwd())
        tracker = Tracker(uri, config.experiment, run_name="classification")
        tracker.log_params(flatten_config(OmegaConf.to_container(OmegaConf.structured(config))))  # type: ignore[arg-type]
        for row in rows:
            key = f"{row['backbone']}/{row['protocol']}/fraction_{row['label_fraction']:g}"
            tracker.log_metrics({f"{key}/{m}_mean": row[m][0] for m in METRICS}, step=0)
        tracker.log_artifact(out / "report.md")
        tracker.log_artifact(out / "results.json")
        tracker.log_artifact(out / f"{config.plot_metric}_vs_label_fraction.png")
        tracker.finish()
        run_id = tracker.run_id
    return {"results": results, "summary": rows, "report": out / "report.md", "run_id": run_id}
