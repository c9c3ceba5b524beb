"""``medssl demo``: assemble (or take) a folder of images, scan it, run a short joint pretraining, export the
encoder as a MONAI bundle and fine-tune it (a linear probe of the phantoms' lesion label, against random init).

Every step is the one a user runs on their own data (``manifest scan``, ``pretrain``, ``export``, ``finetune``),
with the ``configs/demo.yaml`` settings; nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medssl.data.manifest import ManifestRow, read_manifest, write_csv, write_manifest
from medssl.data.pseudonym import SALT_FILE_NAME, resolve_salt
from medssl.data.scan import ScanOptions, scan_folder


@dataclass
class DemoPlan:
    out: Path  # everything the demo writes: data/, demo_manifest.csv, cache/, runs
    data: Path | None = None  # a user folder instead of the embedded data
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    progress: bool = True


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
    write_csv(manifest.with_name("demo_manifest.errors.csv"), ("path", "reason"), result.errors)
    if not result.rows:
        raise ValueError(f"--data: {folder}: no readable DICOM, NIfTI or PNG/JPEG image found")
    write_manifest(manifest, result.rows, folder)
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
    """Prepare the data and pretrain with ``configs/demo.yaml`` (plus ``plan.overrides``)."""
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
        downstream(plan, manifest, result.output_dir, config)
    return result


def labelled_rows(rows: list[ManifestRow], test_every: int = 3) -> list[ManifestRow]:
    """The rows with a label, every ``test_every``-th of each label (in path order) in the test split, the others
    in train; one subject per phantom, so the split is patient-disjoint."""
    out: list[ManifestRow] = []
    for label in sorted({r.label for r in rows if r.label}):
        members = sorted((r for r in rows if r.label == label), key=lambda r: r.path)
        out += [
            replace(r, split="test" if i % test_every == test_every - 1 else "train") for i, r in enumerate(members)
        ]
    return out


def downstream(plan: DemoPlan, manifest: Path, run_dir: Path, pretrain: Any) -> dict[str, dict[str, Any]]:
    """Export the run's encoder and probe it on the labelled rows (linear probe, pretrained vs random init).

    Skipped, with a message, when the data has fewer than two labels with a test and a training row each (a user
    folder without labels)."""
    from medssl.downstream.finetune import finetune_config, run_classification
    from medssl.export.bundle import export_bundle
    from medssl.train.config import to_container

    source = read_manifest(manifest)
    rows = labelled_rows(source.rows)
    splits = {(r.label, r.split) for r in rows}
    labels = {r.label for r in rows}
    if len(labels) < 2 or any((label, split) not in splits for label in labels for split in ("train", "test")):
        print("demo: no labelled images to fine-tune on (a labels CSV with a 'label' column gives some); done")
        return {}
    bundle = export_bundle(str(run_dir), plan.out / "bundle")
    print(f"demo: exported the encoder as a MONAI bundle: {bundle}")
    labelled = plan.out / "demo_labelled.csv"
    write_manifest(labelled, rows, source.root)
    data = to_container(pretrain)["data"]
    values = {
        "protocol": "linear",
        "model": {"encoder": pretrain.model.encoder},
        "data": {
            "manifest": str(labelled),
            "cache_dir": str(plan.out / "cache"),
            "preprocess": data["preprocess"],
            "size": data["views"]["global_size"],
        },
    }
    results = {}
    for name, pretrained in (("pretrained", str(bundle)), ("random init", "none")):
        config = finetune_config(values, [f"model.pretrained={pretrained}"])
        results[name] = run_classification(config)
    counts = ", ".join(f"{n} {sum(r.label == n for r in rows)}" for n in sorted(labels))
    print(
        f"demo: linear probe of the label ({counts}; {sum(r.split == 'test' for r in rows)} held out): AUROC "
        + ", ".join(f"{name} {r['auroc']:.3f}" for name, r in results.items())
        + " (a smoke-scale check: a handful of images after a short run)"
    )
    return results
