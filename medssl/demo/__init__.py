"""``medssl demo``: assemble (or take) a folder of images, scan it, run a short joint pretraining, export the
encoder as a MONAI bundle and compare it with random initialisation on a labelled set of generated phantoms
(:mod:`medssl.demo.evaluation`: a linear probe on frozen features, test AUROC with bootstrap 95% intervals), then
say what the comparison shows and where the run's pictures are.

Every step is the one a user runs on their own data (``manifest scan``, ``pretrain``, ``export``, the frozen-feature
probe of ``finetune``), with the ``configs/demo.yaml`` settings; nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medssl.data.pseudonym import SALT_FILE_NAME, resolve_salt
from medssl.data.scan import ScanOptions, scan_folder, write_scan

if TYPE_CHECKING:
    from medssl.demo.evaluation import Comparison, PhantomSetSpec


@dataclass
class DemoPlan:
    out: Path  # everything the demo writes: data/, demo_manifest.csv, cache/, runs
    data: Path | None = None  # a user folder instead of the embedded data
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    progress: bool = True
    evaluation: PhantomSetSpec | None = None  # the closing comparison's labelled set; None: evaluation.DEFAULT_SPEC


def prepare_manifest(plan: DemoPlan) -> tuple[Path, bool]:
    """The demo folder (assembled from pip packages unless ``plan.data``) scanned into ``<out>/demo_manifest.csv``;
    also whether it holds any volume."""
    from medssl.demo.data import assemble_demo_data, scan_demo_data

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    salt, _ = resolve_salt(None, out / SALT_FILE_NAME)
    options = ScanOptions(salt=salt, progress=plan.progress)
    start = time.perf_counter()
    if plan.data is None:
        folder = out / "data"
        report = assemble_demo_data(folder)
        for line in report.summary_lines():
            print(line)
        result, warnings = scan_demo_data(folder, options)
    else:
        folder = plan.data
        if not folder.is_dir():
            raise ValueError(f"--data: {folder}: no such folder")
        result, warnings = scan_folder(folder, options), []
    for warning in warnings:
        print(f"warning: {warning}")
    manifest = out / "demo_manifest.csv"
    write_scan(manifest, result.rows, result.errors, folder, salt)  # files named by key; paths in the private map
    if not result.rows:
        raise ValueError(f"--data: {folder}: no readable DICOM, NIfTI or PNG/JPEG image found")
    n2d = sum(r.dims == 2 for r in result.rows)
    print(
        f"demo data: {len(result.rows)} items ({n2d} 2D images, {len(result.rows) - n2d} 3D volumes) from {folder} "
        f"scanned in {time.perf_counter() - start:.1f} s; manifest {manifest}"
        + (
            f"; {len(result.errors)} skipped (see {manifest.with_name('demo_manifest.errors.csv')})"
            if result.errors
            else ""
        )
    )
    return manifest, any(r.dims == 3 for r in result.rows)


def run_demo(plan: DemoPlan):  # type: ignore[no-untyped-def]  # -> TrainResult (import kept lazy)
    """Prepare the data, pretrain with ``configs/demo.yaml`` (plus ``plan.overrides``) and, when the run finished,
    close with :func:`closing` (export, comparison, verdict, where the pictures are)."""
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    manifest, has_volumes = prepare_manifest(plan)
    overrides = [
        f"data.manifest={manifest}",
        f"data.cache_dir={plan.out / 'cache'}",
        f"run.output_dir={plan.out / 'runs'}",
        f"trainer.progress={str(plan.progress).lower()}",
    ]
    if not has_volumes:  # a user folder may have no volumes: the 2D stream only
        print("demo: no 3D volume in the data; pretraining the 2D stream only (method=swav2d)")
        overrides.append("method=swav2d")
    if plan.steps is not None:
        overrides.append(f"trainer.max_steps={plan.steps}")
    config = compose_pretrain_config([*overrides, *plan.overrides], config_name="demo")
    result = Trainer(config).fit()
    if result.status == "finished":
        closing(plan, result, config)
    return result


def closing(plan: DemoPlan, result: Any, config: Any) -> Comparison | None:
    """The demo's last lines: with the embedded data, export the encoder and :func:`compare_with_random_init`;
    then the backbone and the command that shows the run's pictures in MLflow. Returns the comparison (``None``
    with ``--data``: the labelled phantoms are the embedded data's task, not a user folder's)."""
    comparison = None
    if plan.data is None:
        comparison = compare_with_random_init(plan, result, config)
    else:
        print(
            "demo: --data: no closing comparison (it probes generated phantoms, the embedded data's task); "
            "probe labels of your own with medssl export and medssl finetune task=classification (README)"
        )
    print(f"demo finished: backbone {result.backbone}")
    print(pictures_line(result, config, comparison is not None))
    return comparison


def compare_with_random_init(plan: DemoPlan, result: Any, config: Any) -> Comparison:
    """Export the run's encoder as a MONAI bundle, then compare it with the same architecture at random
    initialisation on labelled phantoms (:mod:`medssl.demo.evaluation`); print the set, both AUROCs and their
    difference with 95% intervals, and the verdict; add them to the run's MLflow record. Returns the
    :class:`~medssl.demo.evaluation.Comparison`."""
    from medssl.demo import evaluation
    from medssl.downstream.finetune import load_encoder
    from medssl.export.bundle import export_bundle
    from medssl.runtime.devices import resolve_device
    from medssl.runtime.seeding import seed_everything

    bundle = export_bundle(str(result.output_dir), plan.out / "bundle")
    print(f"demo: exported the encoder as a MONAI bundle: {bundle}")
    spec = plan.evaluation or evaluation.DEFAULT_SPEC
    start = time.perf_counter()
    data = evaluation.phantom_images(spec, config.data.views.global_size, config.data.preprocess)
    pretrained, loaded = load_encoder(str(bundle), config.model.encoder)
    print(f"demo: pretrained encoder: {loaded}")
    seed_everything(config.seed)
    random_init, _ = load_encoder("none", config.model.encoder)
    encoders = {"pretrained": pretrained, "random init": random_init}
    comparison = evaluation.compare_encoders(encoders, data, resolve_device(config.trainer.device), config.seed)
    boot = comparison.bootstrap
    print(
        f"demo: closing comparison on {data.describe()} that pretraining never saw: a linear probe of the label on "
        f"frozen features of the pretrained encoder and of random initialisation (seed {config.seed}), both with "
        f"BatchNorm statistics recomputed on the probe's training images; fitted on {comparison.n_train} images "
        f"({comparison.train_subjects} phantoms), tested on {comparison.n_test} ({comparison.test_subjects} "
        f"phantoms) [{time.perf_counter() - start:.0f} s]"
    )
    print(
        f"demo: test AUROC (95% CI from {boot.resamples} bootstrap resamples of the test phantoms): pretrained "
        f"{boot.a}, random init {boot.b}; difference {boot.difference.signed()}"
    )
    print(f"demo: {comparison.sentence}")
    _log_comparison(comparison, result, config, data.describe())
    return comparison


def _log_comparison(comparison: Comparison, result: Any, config: Any, described: str) -> None:
    """The comparison's metrics, numbers and figure (``pictures/demo_comparison.png``) in the pretraining run."""
    if not result.run_id:
        return
    from medssl.runtime import tracking

    uri = config.logging.tracking_uri or tracking.default_tracking_uri(Path.cwd())
    boot = comparison.bootstrap
    tracker = tracking.Tracker(uri, config.logging.experiment, run_id=result.run_id)
    try:  # the pretraining run stays FINISHED whatever happens here
        tracker.log_metrics(comparison.metrics(), step=result.step)
        tracker.log_dict(
            {
                "set": described,
                "train_slices": comparison.n_train,
                "test_slices": comparison.n_test,
                "bootstrap_resamples": boot.resamples,
                "auroc": {"pretrained": asdict(boot.a), "random init": asdict(boot.b)},
                "difference": asdict(boot.difference),
                "verdict": comparison.sentence,
            },
            "demo/comparison.json",
        )
        tracker.log_figure(comparison.figure(), "pictures/demo_comparison.png")
    finally:
        tracker.finish()


def pictures_line(result: Any, config: Any, with_comparison: bool = False) -> str:
    """Where the run's pictures are and the command that shows them (the demo's last line)."""
    if not result.run_id:
        return f"demo: no MLflow run (logging.mlflow is off); the run's files are in {result.output_dir}"
    from medssl.runtime import tracking

    uri = config.logging.tracking_uri or tracking.default_tracking_uri(Path.cwd())
    command = tracking.ui_command(uri)
    if not uri.startswith(("http://", "https://")):
        command += ", then open http://127.0.0.1:5000"
    return (
        f"demo: pictures of run {result.run_name} (experiment {config.logging.experiment}; artifacts pictures/: loss "
        "and health curves, a PCA of the encoder features by modality and label, a prototype gallery"
        + (", demo_comparison.png: the ROC curves and bootstrap of the comparison" if with_comparison else "")
        + f"): {command}"
    )
