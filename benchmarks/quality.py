"""Representation quality on real data: does pretraining help downstream? (issue 6)

Usage (from the repository root)::

    .venv/bin/python benchmarks/quality.py --budget-minutes 60 --update BENCHMARKS.md   # the full table (hours)
    .venv/bin/python benchmarks/quality.py --quick                                      # ~10-minute smoke check

Every dataset of ``--data`` (default ../shared/data) is split by patient before anything else (a fixed salt, so
every method sees the same split); pretraining reads the unlabelled *train* images only (MedNIST: all images, as
the protocol says) and never a label. Each method is pretrained for the same wall-clock budget on this machine
(``--budget-minutes`` per run: a short calibration measures the seconds per step, ``trainer.max_steps`` is set so
the cosine schedule ends at the budget, and ``trainer.max_minutes`` caps it), with the same encoder.

Tasks (``--tasks``):

* ``cxr``: Kermany chest X-rays, NORMAL vs PNEUMONIA: linear probe and kNN on frozen features (AUROC, accuracy)
  at 64 px, patient-disjoint test split; methods random / simclr / swav2d (2D-only data: the joint method's 3D
  terms have nothing to read). Then end-to-end fine-tuning (``--finetune-steps``): each pretrained backbone with
  10% of the labels against supervised training from scratch with 10% and with all the labels.
* ``hippocampus``: MSD hippocampus T1 MR: 3D (or ``--seg-mode 2d``) segmentation Dice (anterior, posterior) with
  10% and 100% of the labelled training cases (``--seg-steps`` each), each pretrained backbone (encoder at
  ``--seg-encoder-lr-scale`` x the decoder's learning rate, default 1 as in medssl finetune) and random init
  (supervised from scratch: the encoder at the full learning rate); methods random / simclr / swav2d / joint and the
  joint ablations (no L_mask, no L_inter, full instead of deformable attention),
  ``joint-simclr`` (InfoNCE as the 2D term) and ``staged-simclr`` (``joint-simclr`` started with ``trainer.init_from``
  from the study's finished SimCLR run, as the paper's code stages it; give both budgets, e.g. ``--steps
  simclr=243,staged-simclr=125`` for half a budget each).
* ``mednist``: 6-class MedNIST, kNN and linear-probe accuracy; methods random / simclr / swav2d.
* ``sepclr``: SepCLR on Kermany (background = NORMAL, target = PNEUMONIA); linear probes for bacterial vs viral
  pneumonia (file names) on the salient and the common space.

``--pretrain-seeds 0,1,2`` runs the whole study once per pretraining seed (``<out>/pretrain-seed-S``) and pools
them (``pretrain_seeds.py``): each backbone minus its baseline, pretraining seed by pretraining seed.

Results: mean ± std over ``--seeds`` seeds, ``<out>/quality.json`` and ``<out>/quality.md``; ``--update
BENCHMARKS.md`` writes the tables, the budget, the machine and this command into BENCHMARKS.md. Every
pretraining and fine-tuning run is in the MLflow store ``<out>/mlruns`` (plots in the runs' artifacts).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _report import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "figures"  # --update copies the summary plot here (linked from BENCHMARKS.md)
SALT = "medssl-quality-benchmark"  # fixed: the same patient split for every method and every run
KERMANY_SUBJECT = r"(person\d+|NORMAL2-IM-\d+|IM-\d+)"

METHODS: dict[str, list[str]] = {  # name -> pretraining overrides (random init has none: it is not pretrained)
    "simclr": ["method=simclr"],
    "swav2d": ["method=swav2d"],
    "joint": ["method=joint"],
    "joint-no-mask": ["method=joint", "method.objective.weights.mask=0.0"],
    "joint-no-inter": ["method=joint", "method.objective.weights.inter=0.0"],
    "joint-full-attention": ["method=joint", "model.attention=full"],
    # the joint method on top of SimCLR's InfoNCE instead of 2D SwAV (issue 14): its 2D-only counterpart is simclr
    "joint-simclr": ["method=joint", "method.objective.intra_clustering=simclr", "data.views.n_local=0"],
    # staged as the paper's released code does (issue 14): the 3D terms start from a finished 2D run of this study
    "staged-simclr": ["method=joint", "method.objective.intra_clustering=simclr", "data.views.n_local=0"],
}
STARTS_FROM = {"staged-simclr": "simclr"}  # method -> the method of the same task whose finished run it starts from
TASK_METHODS = {
    "cxr": ["random", "simclr", "swav2d"],
    "mednist": ["random", "simclr", "swav2d"],
    "hippocampus": [
        "random",
        "simclr",
        "swav2d",
        "joint",
        "joint-no-mask",
        "joint-no-inter",
        "joint-full-attention",
        "joint-simclr",
        "staged-simclr",
    ],
    "sepclr": ["random", "sepclr"],
}
QUICK_METHODS = {"cxr": ["random", "swav2d"], "mednist": ["random", "swav2d"], "hippocampus": ["random", "joint"],
                 "sepclr": ["random", "sepclr"]}  # fmt: skip


@dataclass
class Settings:
    data: Path
    out: Path
    budget_minutes: float
    seeds: list[int]
    quick: bool
    encoder: str
    size: int
    seg_mode: str
    workers: int
    overrides: list[str]
    cache_dir: Path
    reuse: bool  # reuse finished pretraining runs in <out>/runs instead of pretraining again
    seg_steps: int  # hippocampus: segmentation fine-tuning steps
    seg_encoder_lr_scale: float  # hippocampus: a pretrained encoder's learning rate / the decoder's (random init: 1)
    seg_fractions: tuple[float, ...]  # hippocampus: fractions of the labelled training cases to fine-tune with
    seg_slice_transformer: str  # hippocampus, --seg-mode 2.5d: auto (a joint bundle's own) or random for every backbone
    finetune_steps: int  # cxr: end-to-end fine-tuning steps (0: no fine-tuning comparison)
    random_rows: list[dict[str, Any]] | None = None  # hippocampus: random init's rows from an earlier pretraining
    # seed's study (--pretrain-seeds): random init does not depend on the pretraining seed, so it is not run again
    steps: dict[str, int] | None = None  # method -> optimiser steps ("*": every method); None: calibrate per run

    @property
    def tracking_uri(self) -> str:
        """The study's MLflow store: every pretraining, evaluation and summary run of one ``--out`` folder."""
        return f"sqlite:///{self.out / 'mlruns' / 'mlflow.db'}"


# ---------------------------------------------------------------- manifests (split by patient first)
def _scan(folder: Path, modality: str, subject: str | None, exclude: Sequence[str], masks: str | None = None) -> list:
    from medssl.data.row_transforms import pair_masks
    from medssl.data.scan import ScanOptions, scan_folder

    pattern = re.compile(subject) if subject else None
    options = ScanOptions(salt=SALT, subject_pattern=pattern, modality=modality, progress=False,
                          exclude=[*exclude, *([f"{masks}/*"] if masks else [])])  # fmt: skip
    rows = scan_folder(folder, options).rows
    if masks:
        rows, _ = pair_masks(rows, folder, masks)
    return rows


def _thin(rows: list, keep: int | None) -> list:
    """Every k-th row (in path order) so that about ``keep`` remain (quick mode)."""
    if keep is None or len(rows) <= keep:
        return rows
    step = len(rows) / keep
    return [rows[int(i * step)] for i in range(keep)]


def prepare_manifests(settings: Settings) -> dict[str, Path]:
    from medssl.data.manifest import write_manifest
    from medssl.data.row_transforms import assign_splits

    out = settings.out / "manifests"
    out.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    kermany = settings.data / "kermany-cxr-224"
    if kermany.is_dir():
        rows = _scan(kermany / "train", "DX", KERMANY_SUBJECT, [])
        rows = [replace(r, label=r.path.split("/")[0]) for r in rows]
        rows = [replace(r, group="background" if r.label == "NORMAL" else "target") for r in rows]
        rows = _thin(rows, 600 if settings.quick else None)
        rows = assign_splits(rows, {"train": 0.8, "test": 0.2}, SALT)
        write_manifest(out / "cxr.csv", rows, kermany / "train")
        manifests["cxr"] = out / "cxr.csv"
        subtypes = [
            replace(r, label="viral" if "virus" in r.path else "bacterial") for r in rows if r.group == "target"
        ]
        write_manifest(out / "pneumonia_subtypes.csv", subtypes, kermany / "train")
        manifests["pneumonia_subtypes"] = out / "pneumonia_subtypes.csv"
    mednist = settings.data / "mednist-subset"
    if mednist.is_dir():
        rows = _scan(mednist, "OT", None, ["labels.csv", "README.md"])
        rows = [replace(r, label=r.path.split("/")[0]) for r in rows]
        rows = _thin(rows, 900 if settings.quick else None)
        rows = assign_splits(rows, {"train": 0.8, "test": 0.2}, SALT)  # no patient ids: one subject per image
        write_manifest(out / "mednist.csv", rows, mednist)
        manifests["mednist"] = out / "mednist.csv"
    hippocampus = settings.data / "msd-hippocampus"
    if hippocampus.is_dir():
        rows = _scan(hippocampus, "MR", None, ["README.md"], masks="labels")
        rows = _thin(rows, 60 if settings.quick else None)
        rows = assign_splits(rows, {"train": 0.8, "test": 0.2}, SALT)
        write_manifest(out / "hippocampus.csv", rows, hippocampus)
        manifests["hippocampus"] = out / "hippocampus.csv"
    return manifests


# ---------------------------------------------------------------- pretraining at a fixed budget
def _pretrain_overrides(settings: Settings, manifest: Path, task: str, method: str, name: str) -> list[str]:
    overrides = [
        f"data.manifest={manifest}",
        f"data.cache_dir={settings.cache_dir}",
        f"run.output_dir={settings.out / 'runs'}",
        f"run.name={name}",
        f"logging.tracking_uri={settings.tracking_uri}",
        "logging.experiment=medssl-quality",
        f"model.encoder={settings.encoder}",
        f"data.views.global_size={settings.size}",
        f"data.views.local_size={settings.size // 2}",
        "data.views.n_local=2",
        "data.preprocess.max_side_2d=128",
        f"trainer.num_workers={settings.workers}",
        "trainer.progress=false",
        "trainer.resume=null",
    ]
    if task != "mednist":
        overrides.append("data.splits=[train]")  # pretraining sees the unlabelled train part only
    if task == "hippocampus":
        overrides += ["data.stacks.n_slices=8", f"data.stacks.size={settings.size}"]
    if method == "sepclr":
        return [*overrides, "method=sepclr", "data.background=background", "data.target=target", *settings.overrides]
    return [*overrides, *METHODS[method], *settings.overrides]


def budget_overrides(settings: Settings, steps: int) -> list[str]:
    """The schedule of a budgeted run of ``steps`` (calibrated) steps: warm-up for the first tenth, and SwAV
    prototypes frozen for the same tenth (the shipped 300 steps outlast a 15-minute CPU run of the joint method,
    about 240 steps, whose prototypes then never train); the study's ``--override`` values still win. With fixed
    ``--steps`` there is no wall-clock cap: a busy machine changes how long the run takes, never its result."""
    tenth = max(1, steps // 10)
    cap = [] if settings.steps is not None else [f"trainer.max_minutes={settings.budget_minutes}"]
    return [
        f"trainer.max_steps={steps}",
        *cap,
        f"trainer.optimizer.warmup_steps={tenth}",
        f"trainer.checkpoint_every={max(steps // 4, 1)}",
        f"method.objective.freeze_prototypes_steps={tenth}",
        *settings.overrides,
    ]


def pretrain(settings: Settings, manifest: Path, task: str, method: str) -> Path:
    """Calibrate the seconds per step, then pretrain for ``settings.budget_minutes``; returns the run folder."""
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    name = f"{task}-{method}"
    finished = settings.out / "runs" / name
    if settings.reuse and (finished / "backbone.pt").is_file():
        print(f"quality: reusing the finished pretraining run {finished} (--reuse)", flush=True)
        return finished
    base = _pretrain_overrides(settings, manifest, task, method, name)
    if method in STARTS_FROM:  # the 2D stage first (or its finished run), then this run from its weights
        first = pretrain(dataclasses.replace(settings, reuse=True), manifest, task, STARTS_FROM[method])
        base = [*base, f"trainer.init_from={first}"]
    fixed = step_budget(settings, method)
    if fixed is not None:
        print(f"quality: {name}: a budget of {fixed} optimiser steps (--steps, no wall-clock cap)", flush=True)
        start = time.perf_counter()
        result = Trainer(compose_pretrain_config([*base, *budget_overrides(settings, fixed)])).fit()
        print(f"quality: pretrained {name}: {result.step} steps in {(time.perf_counter() - start) / 60:.1f} min; "
              f"run {result.run_id}", flush=True)  # fmt: skip
        return result.output_dir
    steps, seconds_per_step = calibrate(settings, base, name)
    config = compose_pretrain_config([*base, *budget_overrides(settings, steps)])
    start = time.perf_counter()
    result = Trainer(config).fit()
    print(f"quality: pretrained {name}: {result.step} steps ({seconds_per_step:.2f} s/step calibrated) in "
          f"{(time.perf_counter() - start) / 60:.1f} min; run {result.run_id}", flush=True)  # fmt: skip
    return result.output_dir


def calibrate(settings: Settings, base: list[str], name: str) -> tuple[int, float]:
    """Optimiser steps that fit ``settings.budget_minutes`` (with 8% to spare), from the median seconds per step
    of a short run with the same overrides; returns (steps, seconds per step)."""
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    stamps: list[float] = []
    calibration = compose_pretrain_config(
        [
            *base,
            f"run.name={name}-calibration",
            "trainer.max_steps=8",
            "logging=none",
            "trainer.checkpoint_every=0",
            "method.objective.freeze_prototypes_steps=1",
        ]
    )
    Trainer(calibration, callbacks=[lambda step, metrics: stamps.append(time.perf_counter())]).fit()
    seconds_per_step = statistics.median(b - a for a, b in itertools.pairwise(stamps[2:]))  # after loader start
    return max(10, int(settings.budget_minutes * 60 / seconds_per_step * 0.92)), seconds_per_step


def calibrate_budgets(settings: Settings, methods: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """``--calibrate``: per task, the step budget of each pretrained method at ``--budget-minutes`` (run once on
    an idle machine; pass the printed ``--steps`` to the comparison so that load cannot change its result)."""
    manifests = prepare_manifests(settings)
    budgets: dict[str, dict[str, int]] = {}
    for task, names in methods.items():
        manifest = manifests.get("cxr" if task == "sepclr" else task)
        if manifest is None:
            print(f"quality: --calibrate: no {task} data under {settings.data}", flush=True)
            continue
        budgets[task] = {}
        for method in names:
            if method == "random":
                continue
            name = f"{task}-{method}"
            steps, seconds = calibrate(settings, _pretrain_overrides(settings, manifest, task, method, name), name)
            budgets[task][method] = steps
            print(f"quality: calibrated {name}: {seconds:.2f} s/step -> {steps} steps in "
                  f"{settings.budget_minutes:g} min", flush=True)  # fmt: skip
        print(f"quality: {task}: --steps " + ",".join(f"{m}={n}" for m, n in budgets[task].items()), flush=True)
    return budgets


def step_budget(settings: Settings, method: str) -> int | None:
    """The fixed optimiser-step budget of ``method`` (``--steps``), or None to calibrate against the wall clock."""
    if settings.steps is None:
        return None
    if method in settings.steps:
        return settings.steps[method]
    if "*" in settings.steps:
        return settings.steps["*"]
    raise ValueError(f"--steps names no budget for method {method!r} (and no default): {settings.steps}")


def parse_steps(text: str | None) -> dict[str, int] | None:
    """``--steps``: ``600`` (every method) or ``simclr=880,swav2d=640`` (per method; ``*=N`` for the others)."""
    if not text:
        return None
    budgets: dict[str, int] = {}
    for item in text.split(","):
        name, _, value = item.rpartition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--steps: {item!r} is not N or METHOD=N with N >= 1")
        budgets[name.strip() or "*"] = int(value)
    return budgets


def random_architecture(settings: Settings, sources: dict[str, str]) -> str:
    """The ``encoder`` of the random-init baseline: the first pretrained bundle of ``sources`` (random init copies its
    network without its weights, :func:`medssl.downstream.common.load_backbone`), so that an ``--override`` that
    changes the architecture (``model.max_pool=true``) changes the baseline with it; the study's encoder name when
    nothing was pretrained. With the default architecture both give the same network and the same draw per seed."""
    return next((source for source in sources.values() if source != "none"), settings.encoder)


def bundle(settings: Settings, run_dir: Path) -> str:
    from medssl.export.bundle import export_bundle

    return str(export_bundle(str(run_dir), settings.out / "bundles" / run_dir.name, log_to_mlflow=False))


# ---------------------------------------------------------------- evaluations
def _classification(settings: Settings, manifest: Path, backbones: dict[str, str], spaces: list[str],
                    fractions: list[float], out_name: str, protocols: Sequence[str] = ("linear", "knn"),
                    encoder_lr_scale: float = 0.1) -> list[dict[str, Any]]:  # fmt: skip
    from medssl.data.preprocess import PreprocessConfig
    from medssl.downstream.classifier import FinetuneSchedule
    from medssl.downstream.evaluate import EvaluateConfig, run_evaluate
    from medssl.downstream.finetune import FinetuneDataConfig

    config = EvaluateConfig(
        backbones=backbones,
        encoder=settings.encoder,
        spaces=spaces,
        protocols=list(protocols),
        label_fractions=fractions,
        seeds=settings.seeds,
        finetune=FinetuneSchedule(steps=settings.finetune_steps, encoder_lr_scale=encoder_lr_scale)
        if "finetune" in protocols
        else FinetuneSchedule(),
        data=FinetuneDataConfig(
            manifest=str(manifest),
            cache_dir=str(settings.cache_dir),
            preprocess=PreprocessConfig(max_side_2d=128),  # the pretraining cache's settings
            size=settings.size,
        ),
        out=str(settings.out / out_name),
        tracking_uri=settings.tracking_uri,
        experiment="medssl-quality",
    )
    return run_evaluate(config)["summary"]


def _finetuning(settings: Settings, manifest: Path, backbones: dict[str, str]) -> list[dict[str, Any]]:
    """Every pretrained backbone fine-tuned end to end with 10% of the labels (encoder at 0.1x the head's learning
    rate), against supervised training from scratch (random init, encoder at the full learning rate) with 10% and
    with all the labels; the same number of steps for every run."""
    pretrained = {name: source for name, source in backbones.items() if source != "none"}
    rows = _classification(settings, manifest, pretrained, ["backbone"], [0.1], "finetune-pretrained", ["finetune"])
    scratch = _classification(settings, manifest, {"scratch": "none"}, ["backbone"], [0.1, 1.0], "finetune-scratch",
                              ["finetune"], encoder_lr_scale=1.0)  # fmt: skip
    return rows + scratch


def _segmentation(settings: Settings, manifest: Path, backbones: dict[str, str]) -> list[dict[str, Any]]:
    from medssl.downstream.common import FinetuneModelConfig, LabelledDataConfig
    from medssl.downstream.segmentation import SegmentationConfig, run_segmentation

    rows = []
    for name, source in backbones.items():
        for fraction in settings.seg_fractions:
            dice: dict[str, list[float]] = {}
            for seed in settings.seeds:
                config = SegmentationConfig(
                    mode=settings.seg_mode,
                    seed=seed,
                    model=FinetuneModelConfig(pretrained=source, encoder=settings.encoder),
                    encoder_lr_scale=1.0 if source == "none" else settings.seg_encoder_lr_scale,  # random: scratch
                    data=LabelledDataConfig(manifest=str(manifest), label_fraction=fraction),
                    num_classes=3,
                    class_names=["anterior", "posterior"],
                    roi_size=32 if settings.seg_mode == "3d" else 48,
                    roi_depth=8 if settings.seg_mode == "2.5d" else None,
                    slice_transformer=settings.seg_slice_transformer,
                    batch_size={"2d": 8, "2.5d": 2, "3d": 4}[settings.seg_mode],  # 2.5d: 2 stacks of 8 slices
                    steps=settings.seg_steps,
                    log_every=0,
                    tracking_uri=settings.tracking_uri,
                    experiment="medssl-quality",
                )
                result = run_segmentation(config)
                for key in ("dice/anterior", "dice/posterior", "dice_mean"):
                    dice.setdefault(key, []).append(float(result[key]))
            rows.append({"backbone": name, "label_fraction": fraction, "seeds": len(settings.seeds),
                         **{k: _mean_std(v) for k, v in dice.items()},
                         "per_seed": {"seeds": list(settings.seeds), **dice}})  # fmt: skip
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


# ---------------------------------------------------------------- report
def _cell(pair: Sequence[float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def classification_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backbone | probe | label fraction | AUROC | accuracy | balanced accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['protocol']} | {r['label_fraction']:g} | {_cell(r['auroc'])} | "
                     f"{_cell(r['accuracy'])} | {_cell(r['balanced_accuracy'])} |")  # fmt: skip
    return "\n".join(lines)


def segmentation_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backbone | label fraction | Dice anterior | Dice posterior | Dice mean |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['label_fraction']:g} | {_cell(r['dice/anterior'])} | "
                     f"{_cell(r['dice/posterior'])} | {_cell(r['dice_mean'])} |")  # fmt: skip
    return "\n".join(lines)


def summary_figure(results: dict[str, Any]) -> Any:
    """One panel per task: the headline metric (classification AUROC, segmentation mean Dice), mean ± std over seeds,
    one bar per backbone x probe x label fraction, coloured by backbone."""
    from matplotlib.figure import Figure

    tables = results["tables"]
    figure = Figure(figsize=(6 * max(len(tables), 1), 1.2 + 0.3 * max((len(t["rows"]) for t in tables.values()),
                                                                       default=1)), layout="constrained")  # fmt: skip
    axes = figure.subplots(1, max(len(tables), 1), squeeze=False)[0]
    for axis, (task, table) in zip(axes, tables.items(), strict=False):
        metric = "auroc" if table["kind"] == "classification" else "dice_mean"
        rows = table["rows"]
        backbones = sorted({r["backbone"].split("/")[0] for r in rows})
        colours = [f"C{backbones.index(r['backbone'].split('/')[0])}" for r in rows]
        means = [r[metric][0] for r in rows]
        stds = [r[metric][1] for r in rows]
        labels = [" ".join(str(x) for x in (r["backbone"], r.get("protocol", ""), f"{r['label_fraction']:g}") if x)
                  for r in rows]  # fmt: skip
        axis.barh(range(len(rows)), means, xerr=stds, capsize=3, color=colours)
        axis.set_yticks(range(len(rows)), labels, fontsize="small")
        axis.invert_yaxis()
        low = min((m - s for m, s in zip(means, stds, strict=True)), default=0.0)
        axis.set_xlim(max(0.0, low - 0.05), 1.0)
        axis.set_xlabel(f"{metric} (mean ± std over seeds)")
        axis.set_title(task)
        axis.grid(axis="x", alpha=0.3)
    return figure


def log_summary(settings: Settings, files: Sequence[Path]) -> str:
    """One ``quality-summary`` MLflow run (experiment medssl-quality) holding the tables, the JSON and the plot."""
    from medssl.runtime.tracking import Tracker

    tracker = Tracker(settings.tracking_uri, "medssl-quality", run_name="quality-summary")
    tracker.log_params({"budget_minutes": str(settings.budget_minutes), "encoder": settings.encoder,
                        "size": str(settings.size), "seeds": str(settings.seeds), "quick": str(settings.quick),
                        "overrides": " ".join(settings.overrides) or "none"})  # fmt: skip
    for path in files:
        tracker.log_artifact(path)
    tracker.finish()
    return str(tracker.run_id)


def run(settings: Settings, tasks: list[str], methods: dict[str, list[str]]) -> dict[str, Any]:
    manifests = prepare_manifests(settings)
    results: dict[str, Any] = {"tables": {}, "missing": []}

    def pretrained(task: str, manifest: Path) -> dict[str, str]:
        """Backbone name -> bundle folder (``none`` for random init), every method pretrained at the budget."""
        sources = {}
        for method in methods[task]:
            if method == "random":
                sources[method] = "none"
            else:
                sources[method] = bundle(settings, pretrain(settings, manifest, task, method))
        return sources

    def evaluated(sources: dict[str, str]) -> Settings:
        """The settings the evaluations run with: random init is the pretrained backbones' network."""
        return replace(settings, encoder=random_architecture(settings, sources))

    for task in tasks:
        needed = {"cxr": "cxr", "mednist": "mednist", "hippocampus": "hippocampus", "sepclr": "cxr"}[task]
        if needed not in manifests:
            results["missing"].append(f"{task}: no {needed} data under {settings.data}")
            continue
        start = time.perf_counter()
        if task in ("cxr", "mednist"):
            sources = pretrained(task, manifests[task])
            evaluation = evaluated(sources)
            rows = _classification(evaluation, manifests[task], sources, ["backbone"], [0.1, 1.0], f"evaluation-{task}")
            if task == "cxr" and settings.finetune_steps > 0:
                rows += _finetuning(evaluation, manifests[task], sources)
            results["tables"][task] = {"kind": "classification", "rows": rows}
        elif task == "hippocampus":
            sources = pretrained(task, manifests[task])
            if settings.random_rows is not None and "random" in sources:
                print("quality: random init's hippocampus rows: the first pretraining seed's study's", flush=True)
                kept = {name: source for name, source in sources.items() if name != "random"}
                rows = [*settings.random_rows, *_segmentation(evaluated(sources), manifests[task], kept)]
            else:
                rows = _segmentation(evaluated(sources), manifests[task], sources)
            results["tables"][task] = {"kind": "segmentation", "rows": rows}
        else:
            run_dir = pretrain(settings, manifests["cxr"], "sepclr", "sepclr")
            sources = {"sepclr": str(run_dir), "random": "none"}
            rows = _classification(settings, manifests["pneumonia_subtypes"], sources, ["common", "salient"], [1.0],
                                   "evaluation-sepclr")  # fmt: skip
            results["tables"][task] = {"kind": "classification", "rows": rows}
        results["tables"][task]["minutes"] = (time.perf_counter() - start) / 60
        print(f"quality: {task} done in {results['tables'][task]['minutes']:.1f} min", flush=True)
    return results


TITLES = {
    "cxr": "Kermany chest X-ray, NORMAL vs PNEUMONIA (frozen features, patient-disjoint test)",
    "mednist": "MedNIST, 6 classes (frozen features)",
    "hippocampus": "MSD hippocampus segmentation (pretrained encoder fine-tuned)",
    "sepclr": "SepCLR on Kermany: bacterial vs viral pneumonia on the common and salient spaces",
}


def _budget_text(settings: Settings) -> str:
    if settings.steps is None:
        return f"{settings.budget_minutes:g} min"
    return ", ".join(f"{n} steps" if m == "*" else f"{m} {n} steps" for m, n in settings.steps.items())


def report(results: dict[str, Any], settings: Settings, command: str, minutes: float, figure: str | None = None
           ) -> str:  # fmt: skip
    scope = "QUICK smoke settings (subsets, short runs)" if settings.quick else "full data"
    store = settings.out / "mlruns"
    heading = "smoke check (--quick)" if settings.quick else ", ".join(results["tables"]) or "no task"
    lines = [
        f"## Representation quality (benchmarks/quality.py): {heading}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}; "
        f"budget {_budget_text(settings)} of pretraining per method; encoder {settings.encoder} at "
        f"{settings.size} px; seeds {settings.seeds}; {scope}; total {minutes:.0f} min. Runs and plots: MLflow "
        f"store `{store}` (experiment medssl-quality).",
        "",
    ]
    if settings.reuse:
        lines += ["Finished pretraining runs were reused (`--reuse`): each kept the budget it was run with.", ""]
    if settings.random_rows is not None:
        lines += ["Random init's hippocampus rows are the first pretraining seed's study's (`--pretrain-seeds`: random "
                  "init does not depend on the pretraining seed, so its fine-tunes ran once).", ""]  # fmt: skip
    if settings.steps is not None:
        budgets = ", ".join(f"{m} {n}" for m, n in settings.steps.items())
        lines += [f"Budgets in optimiser steps (`--steps`, no wall-clock cap): {budgets}.", ""]
    if settings.overrides:
        lines += [f"Pretraining overrides on top of the shipped defaults: `{' '.join(settings.overrides)}`.", ""]
    for task, table in results["tables"].items():
        lines += [f"### {TITLES[task]}", ""]
        rows = table["rows"]
        lines.append(classification_table(rows) if table["kind"] == "classification" else segmentation_table(rows))
        lines += ["", f"({table['minutes']:.0f} min)", ""]
    for missing in results["missing"]:
        lines.append(f"- not run: {missing}")
    if figure:
        lines += [f"![quality summary]({figure})", ""]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings, dict[str, list[str]]]:
    """The command line -> (arguments, settings, task -> methods); a wrong task or method name is an error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "quality"))
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="pretraining wall-clock per method")
    parser.add_argument("--quick", action="store_true", help="subsets, 1-minute budgets, one seed: ~10 minutes")
    parser.add_argument("--tasks", default="cxr,hippocampus,mednist,sepclr")
    parser.add_argument("--methods", help="comma-separated subset of the methods of every task")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--seg-mode",
        choices=("2d", "2.5d", "3d"),
        default="3d",
        help="hippocampus: slice-wise U-Net, stacks of 8 slices with the slice transformer as context, or 3D crops",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seg-steps", type=int, default=300, help="hippocampus: segmentation fine-tuning steps")
    parser.add_argument(
        "--seg-encoder-lr-scale",
        type=float,
        default=1.0,
        help="hippocampus: a pretrained encoder's learning rate relative to the decoder's (random: 1)",
    )
    parser.add_argument(
        "--seg-slice-transformer",
        choices=("auto", "random"),
        default="auto",
        help="hippocampus, --seg-mode 2.5d: each joint bundle's own slice transformer (auto) or a random one for "
        "every backbone (the ablation that keeps the joint encoder and drops its transformer)",
    )
    parser.add_argument(
        "--seg-fractions",
        default="0.1,1",
        help="hippocampus: comma-separated fractions of the labelled training cases, each fine-tuned per seed",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=600,
        help="cxr: end-to-end fine-tuning steps (10%% labels vs supervised from scratch); 0 skips it",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for every pretraining run (repeatable), e.g. model.intra_prototypes=[128]",
    )
    parser.add_argument(
        "--steps",
        help="fixed optimiser-step budgets instead of a wall-clock budget: N, or METHOD=N,... (calibrated once on an "
        "idle machine; no max_minutes cap, so a busy machine cannot change the result)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="only measure and print each method's step budget at --budget-minutes (run on an idle machine)",
    )
    parser.add_argument("--cache-dir", help="preprocessed-image cache (default <out>/cache), shareable across --out")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished pretraining runs in <out>/runs (e.g. to add evaluations to a finished run)",
    )
    parser.add_argument(
        "--pretrain-seeds",
        help="comma-separated pretraining seeds (e.g. 0,1,2): the whole study once per seed in <out>/pretrain-seed-S, "
        "then each backbone minus its baseline per pretraining seed in <out>/quality.md",
    )
    parser.add_argument("--update", help="write the section into this Markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--section", help="section name in --update (default quality-<tasks>): keep variants apart")
    args = parser.parse_args(argv)
    settings = Settings(
        data=Path(args.data),
        out=Path(args.out),
        budget_minutes=1.0 if args.quick and args.budget_minutes == 60.0 else args.budget_minutes,
        seeds=list(range(1 if args.quick else args.seeds)),
        quick=args.quick,
        encoder="resnet10" if args.quick and args.encoder == "resnet18" else args.encoder,
        size=args.size,
        seg_mode="2d" if args.quick and args.seg_mode == "3d" else args.seg_mode,
        workers=args.workers,
        overrides=list(args.override),
        cache_dir=Path(args.cache_dir) if args.cache_dir else Path(args.out) / "cache",
        seg_steps=40 if args.quick and args.seg_steps == 300 else args.seg_steps,
        seg_encoder_lr_scale=args.seg_encoder_lr_scale,
        seg_fractions=_fractions(parser, args.seg_fractions),
        seg_slice_transformer=args.seg_slice_transformer,
        reuse=args.reuse,
        finetune_steps=40 if args.quick and args.finetune_steps == 600 else args.finetune_steps,
    )
    try:
        settings.steps = parse_steps(args.steps)
    except ValueError as exc:
        parser.error(str(exc))
    args.pretrain_seeds = _seeds(parser, args.pretrain_seeds, settings.overrides)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASK_METHODS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {sorted(TASK_METHODS)}")
    methods = {t: list((QUICK_METHODS if args.quick else TASK_METHODS)[t]) for t in tasks}
    if args.methods:
        chosen = [m for m in args.methods.split(",") if m]
        known = {m for ms in TASK_METHODS.values() for m in ms}
        if any(m not in known for m in chosen):
            parser.error(f"--methods: unknown {[m for m in chosen if m not in known]}; choose from {sorted(known)}")
        methods = {t: [m for m in ms if m in chosen or m == "random"] for t, ms in methods.items()}
    return args, settings, methods


def _fractions(parser: argparse.ArgumentParser, text: str) -> tuple[float, ...]:
    """``--seg-fractions``: ``0.1,1`` -> (0.1, 1.0); each in (0, 1], or the command line is refused."""
    try:
        fractions = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        parser.error(f"--seg-fractions: {text!r} is not a comma-separated list of numbers")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        parser.error(f"--seg-fractions: {text!r}: each fraction must be in (0, 1]")
    return fractions


def study(settings: Settings, tasks: list[str], methods: dict[str, list[str]], command: str, tag: str,
          update: str | None) -> str:  # fmt: skip
    """Run one study (every task, every method, one pretraining each) and write ``quality.json``, ``quality.md``, the
    summary plot and its MLflow run into ``settings.out``; with ``update``, copy the plot under benchmarks/figures as
    ``tag``. Returns the Markdown report."""
    settings.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(settings, tasks, methods)
    minutes = (time.perf_counter() - start) / 60
    plot = settings.out / "quality.png"
    summary_figure(results).savefig(plot, dpi=100)
    link = None
    if update:
        FIGURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, FIGURES / f"{tag}.png")
        link = os.path.relpath(FIGURES / f"{tag}.png", Path(update).resolve().parent)
    text = report(results, settings, command, minutes, link)
    (settings.out / "quality.json").write_text(json.dumps({**results, "command": command}, indent=2, default=str))
    (settings.out / "quality.md").write_text(text, encoding="utf-8")
    run_id = log_summary(settings, [settings.out / "quality.md", settings.out / "quality.json", plot])
    print(text)
    print(f"quality: summary run {run_id} in {settings.out / 'mlruns'}; plot {plot}")
    return text


def seed_studies(settings: Settings, tasks: list[str], methods: dict[str, list[str]], command: str,
                 seeds: list[int]) -> str:  # fmt: skip
    """``--pretrain-seeds``: the whole study once per pretraining seed (``<out>/pretrain-seed-S``, ``seed=S`` on
    every pretraining run; the evaluation seeds, the split and the cache are shared), then the pooled comparison
    (``pretrain_seeds``) in ``<out>/quality.md``. Returns that Markdown."""
    from pretrain_seeds import report as pooled_report
    from pretrain_seeds import study_folder

    start = time.perf_counter()
    random_rows = None
    for seed in seeds:
        one = replace(settings, out=study_folder(settings.out, seed), overrides=[*settings.overrides, f"seed={seed}"],
                      random_rows=random_rows)  # fmt: skip
        study(one, tasks, methods, f"{command}  # pretraining seed {seed}", "", None)
        if random_rows is None and "hippocampus" in tasks:  # the same fine-tunes for every pretraining seed: run once
            written = json.loads((one.out / "quality.json").read_text(encoding="utf-8"))["tables"].get("hippocampus")
            random_rows = [row for row in (written or {}).get("rows", []) if row["backbone"] == "random"] or None
    minutes = (time.perf_counter() - start) / 60
    header = [
        f"## Representation quality (benchmarks/quality.py): {', '.join(tasks)}, pretraining seeds "
        f"{', '.join(map(str, seeds))}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}; budget {_budget_text(settings)} of pretraining per method and seed; "
        f"encoder {settings.encoder} at {settings.size} px; evaluation seeds {settings.seeds} per pretraining seed; "
        f"total {minutes:.0f} min.",
        "",
        "Each figure: the backbone minus the one it is compared with, for each pretraining seed the mean over the "
        "evaluation seeds (probes: AUROC, accuracy, balanced accuracy; segmentation: Dice x 100).",
        "",
    ]
    if settings.overrides:
        header += [f"Pretraining overrides on top of the shipped defaults: `{' '.join(settings.overrides)}`.", ""]
    text = pooled_report(header, {t: methods[t] for t in tasks}, seeds, settings.out, settings.seg_fractions, TITLES)
    (settings.out / "quality.md").write_text(text, encoding="utf-8")
    print(text)
    return text


def _seeds(parser: argparse.ArgumentParser, text: str | None, overrides: list[str]) -> list[int]:
    """``--pretrain-seeds``: ``0,1,2`` -> [0, 1, 2] (distinct integers); refused beside an ``--override seed=``."""
    if text is None:
        return []
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--pretrain-seeds: {text!r} is not a comma-separated list of integers")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--pretrain-seeds: {text!r}: give distinct seeds, e.g. 0,1,2")
    if any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in overrides):
        parser.error("--pretrain-seeds sets each run's seed: drop --override seed=...")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    args, settings, methods = parse(argv)
    tasks = list(methods)
    settings.out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        calibrate_budgets(settings, methods)
        return 0
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tag = args.section or ("quality-quick" if settings.quick else "quality-" + "-".join(tasks))  # others kept
    if args.pretrain_seeds:
        text = seed_studies(settings, tasks, methods, command.strip(), args.pretrain_seeds)
    else:
        text = study(settings, tasks, methods, command.strip(), tag, args.update)
    if args.update:
        update_section(Path(args.update), text, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
