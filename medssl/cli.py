"""The ``medssl`` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from medssl import __version__
from medssl.data.errors import DataError, ManifestError, UnreadableCacheError

log = logging.getLogger("medssl")


def _parse_fractions(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split-fractions: expected e.g. train=0.8,val=0.1,test=0.1, got {text!r}"
        ) from None


def _parse_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"--subject-pattern: invalid regular expression ({exc})") from None


def cmd_manifest_scan(args: argparse.Namespace) -> int:
    from medssl.data.pseudonym import SALT_FILE_NAME, resolve_salt
    from medssl.data.scan import ScanOptions, assign_splits, join_labels, pair_masks, scan_folder, write_scan

    out = Path(args.out)
    salt, salt_origin = resolve_salt(args.salt, Path(args.salt_file) if args.salt_file else out.parent / SALT_FILE_NAME)
    options = ScanOptions(
        salt=salt,
        subject_pattern=args.subject_pattern,
        modality=args.modality,
        exclude=[*(args.exclude or ()), *([f"{args.masks.strip('/')}/*"] if args.masks else [])],
        workers=args.workers,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    result = scan_folder(Path(args.folder), options)
    rows = result.rows
    warnings: list[str] = []
    if args.masks:
        rows, warnings = pair_masks(rows, Path(args.folder), args.masks)
    for labels in args.labels or ():
        rows, more = join_labels(rows, Path(labels), Path(args.folder), salt)
        warnings.extend(more)
    if args.split_fractions:
        rows = assign_splits(rows, args.split_fractions, salt)
    written = write_scan(
        out, rows, result.errors, Path(args.folder), salt, Path(args.paths) if args.paths else None
    )  # the manifest (if any rows), the errors and the path map: files named by key outside the map
    errors_path = written.errors
    elapsed = time.perf_counter() - start
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    n2d = sum(r.dims == 2 for r in rows)
    n3d = sum(r.dims == 3 for r in rows)
    nseries = sum(r.format == "dicom_series" for r in rows)
    # the folder is not echoed: it is the archive root, which only the path map holds (PACS exports of one patient
    # are folders named after the patient)
    print(f"scanned {result.files_seen} files in {elapsed:.1f} s (pseudonym salt: {salt_origin})")
    print(f"  found {len(rows)} items: {n2d} 2D images, {n3d} 3D volumes ({nseries} DICOM series)")
    print(f"  subjects: {len({r.subject for r in rows if r.subject})}")
    if result.errors:
        print(f"  skipped {len(result.errors)} file(s) or series, reasons in {errors_path}:")
        for reason, count in result.error_summary().most_common():
            print(f"    {count:6d}  {reason}")
    if result.hidden_skipped:
        print(f"  ignored {result.hidden_skipped} hidden file(s)/folder(s)")
    if not rows:
        print(f"error: nothing usable found in {args.folder}; no manifest written", file=sys.stderr)
        return 2
    print(f"  manifest: {out} (files named by key; shareable without the map)")
    print(f"  path map: {written.path_map} (key -> path under the archive: private, keep it with the data)")
    return 0


def cmd_manifest_validate(args: argparse.Namespace) -> int:
    from medssl.data.manifest import validate_manifest

    report = validate_manifest(Path(args.manifest), root=args.root, check_files=not args.no_files, paths=args.paths)
    for warning in report.warnings[: args.max_messages]:
        print(f"warning: {warning}")
    if len(report.warnings) > args.max_messages:
        print(f"warning: ... and {len(report.warnings) - args.max_messages} more warnings")
    for error in report.errors[: args.max_messages]:
        print(f"error: {error}")
    if len(report.errors) > args.max_messages:
        print(f"error: ... and {len(report.errors) - args.max_messages} more errors")
    if report.summary:
        print("summary: " + ", ".join(f"{key} {value}" for key, value in report.summary.items()))
    print(
        f"{args.manifest}: {'OK' if report.ok else 'INVALID'} "
        f"({len(report.errors)} errors, {len(report.warnings)} warnings)"
    )
    return 0 if report.ok else 1


def cmd_manifest_relocate(args: argparse.Namespace) -> int:
    from medssl.data.manifest import missing_map_message, read_manifest
    from medssl.data.pathmap import rewrite_root

    manifest = read_manifest(args.manifest, paths=args.paths)
    if manifest.path_map_file is None:
        raise ManifestError(f"{args.manifest}: names files by path, not through a path map; give --root instead")
    if manifest.path_map is None:
        raise ManifestError(missing_map_message(Path(args.manifest), manifest.path_map_file))
    root = Path(args.root)
    if not root.is_dir():
        raise DataError(root, "folder not found")
    rewrite_root(manifest.path_map_file, root)
    missing = sum(not (root / relative).exists() for relative in manifest.path_map.paths.values())
    print(f"{manifest.path_map_file}: root is now {root}; the manifest and the cache are unchanged")
    if missing:
        total = len(manifest.path_map)
        print(f"warning: {missing} of {total} mapped files are not under the new root", file=sys.stderr)
    return 0


def cmd_manifest_preprocess(args: argparse.Namespace) -> int:
    from medssl.data.cache import build_cache
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig

    config = PreprocessConfig.from_overrides(args.set or [])
    manifest = read_manifest(args.manifest, root=args.root, paths=args.paths)
    start = time.perf_counter()
    report = build_cache(manifest, Path(args.cache), config, workers=args.workers, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(
        f"cache {report.directory}: {report.built} built, {report.reused} already cached, "
        f"{len(report.errors)} failed in {elapsed:.1f} s"
    )
    if report.errors:
        print(f"  failures listed in {report.errors_path}:")
        for path, reason in report.errors[:20]:
            print(f"    {path}: {reason}")
    return 0 if report.built + report.reused > 0 else 2


def _exit_code(status: str) -> int:
    """0 when the run finished; 128 + SIGTERM when it stopped on a signal after its checkpoint (schedulers requeue)."""
    return 0 if status == "finished" else 143


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    config = compose_pretrain_config(args.overrides, config_name=args.config_name, directory=args.config_dir)
    if args.print_config:
        import yaml

        from medssl.train.config import to_container

        print(yaml.safe_dump(to_container(config), sort_keys=False), end="")
        return 0
    result = Trainer(config).fit()
    return _exit_code(result.status)


def cmd_demo(args: argparse.Namespace) -> int:
    from medssl.demo import DemoPlan, run_demo

    plan = DemoPlan(
        out=Path(args.out),
        data=Path(args.data) if args.data else None,
        steps=args.steps,
        overrides=tuple(args.overrides),
        progress=not args.no_progress,
    )
    result = run_demo(plan)  # ends with "demo finished: backbone ..." and where the run's pictures are
    return _exit_code(result.status)


def cmd_export(args: argparse.Namespace) -> int:
    from medssl.export.bundle import export_bundle

    path = export_bundle(
        args.source,
        Path(args.out),
        tracking_uri=args.tracking_uri,
        log_to_mlflow=not args.no_mlflow,
        spatial_dims=args.spatial_dims,
        depth_kernel=args.depth_kernel,
    )
    print(f"MONAI bundle: {path} (configs/metadata.json, configs/inference.json, models/model.pt)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from medssl.downstream.finetune import compose_finetune_config, run_finetune

    run_finetune(compose_finetune_config(args.overrides, directory=args.config_dir))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medssl.downstream.evaluate import compose_evaluate_config, run_evaluate

    run_evaluate(compose_evaluate_config(args.overrides, path=args.config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medssl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    manifest = commands.add_parser("manifest", help="scan, validate and preprocess data manifests")
    manifest_commands = manifest.add_subparsers(dest="manifest_command", required=True)

    scan = manifest_commands.add_parser("scan", help="walk a folder and write one row per image or volume")
    scan.add_argument("folder", help="folder to scan (DICOM, NIfTI, PNG/JPEG): the archive root of the path map")
    scan.add_argument("--out", required=True, help="manifest CSV to write (errors go to <name>.errors.csv beside it)")
    scan.add_argument(
        "--paths",
        help="path map to write (default: <name>.paths.csv beside the manifest): the only file that names the "
        "scanned files; private, with permissions no wider than the archive's",
    )
    scan.add_argument("--labels", action="append", help="CSV keyed by 'path' with split/group/label/subject/modality")
    scan.add_argument(
        "--masks", help="sub-folder of label maps paired with images by file name (e.g. labelsTr); not scanned itself"
    )
    scan.add_argument("--split-fractions", type=_parse_fractions, help="e.g. train=0.8,val=0.1,test=0.1 (by subject)")
    scan.add_argument(
        "--subject-pattern",
        type=_parse_regex,
        help="regex on the relative path whose first group is the subject of non-DICOM files (e.g. '(person\\d+)_')",
    )
    scan.add_argument("--modality", help="modality of files that do not record one (NIfTI, PNG/JPEG), e.g. MR, CT, DX")
    scan.add_argument("--exclude", action="append", help="glob on relative paths to leave out (repeatable)")
    scan.add_argument("--salt", help="pseudonymisation salt (default: $MEDSSL_SALT or a salt file)")
    scan.add_argument("--salt-file", help="salt file (default: .medssl_salt beside the manifest, created if absent)")
    scan.add_argument("--workers", type=int, default=8, help="threads reading headers")
    scan.add_argument("--no-progress", action="store_true")
    scan.set_defaults(func=cmd_manifest_scan)

    validate = manifest_commands.add_parser("validate", help="check columns, paths, duplicates and split leakage")
    validate.add_argument("manifest")
    validate.add_argument("--root", help="override the archive root written in the path map (or manifest)")
    validate.add_argument("--paths", help="the manifest's path map (default: the one the manifest names)")
    validate.add_argument("--no-files", action="store_true", help="do not check that files exist")
    validate.add_argument("--max-messages", type=int, default=50)
    validate.set_defaults(func=cmd_manifest_validate)

    relocate = manifest_commands.add_parser(
        "relocate", help="the archive moved: rewrite the root of the manifest's path map (nothing else changes)"
    )
    relocate.add_argument("manifest")
    relocate.add_argument("root", help="the archive's new folder")
    relocate.add_argument("--paths", help="the manifest's path map (default: the one the manifest names)")
    relocate.set_defaults(func=cmd_manifest_relocate)

    preprocess = manifest_commands.add_parser("preprocess", help="build the preprocessed on-disk cache")
    preprocess.add_argument("manifest")
    preprocess.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    preprocess.add_argument("--root", help="override the archive root written in the path map (or manifest)")
    preprocess.add_argument("--paths", help="the manifest's path map (default: the one the manifest names)")
    preprocess.add_argument("--workers", type=int, default=2, help="processes")
    preprocess.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="preprocessing setting, e.g. spacing=[1,1,1]"
    )
    preprocess.add_argument("--no-progress", action="store_true")
    preprocess.set_defaults(func=cmd_manifest_preprocess)
    pretrain = commands.add_parser(
        "pretrain",
        help="self-supervised pretraining (Hydra overrides, e.g. method=joint trainer.max_steps=200)",
        description="Compose configs/pretrain.yaml with Hydra overrides and train. Under torchrun "
        "(torchrun --nproc_per_node=K -m medssl pretrain ...) every process joins one DDP run.",
    )
    pretrain.add_argument("overrides", nargs="*", help="Hydra overrides: group=option or key=value")
    pretrain.add_argument("--config-name", default="pretrain", help="top-level config (default: pretrain)")
    pretrain.add_argument(
        "--config-dir",
        help="a folder of your own configs added to the shipped ones, as Hydra's --config-dir (default: "
        "$MEDSSL_CONFIG_DIR): new options such as data/archive.yaml and top-level configs for --config-name",
    )
    pretrain.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    pretrain.set_defaults(func=cmd_pretrain)

    demo = commands.add_parser(
        "demo",
        help="short joint pretraining on embedded real images (no download), or on --data DIR",
        description="Assemble real images shipped by pip packages (nilearn, pydicom-data, pydicom, nibabel) plus "
        "synthetic phantoms, scan them, and pretrain with configs/demo.yaml. Prints where to look afterwards.",
    )
    demo.add_argument("overrides", nargs="*", help="Hydra overrides on top of configs/demo.yaml")
    demo.add_argument("--data", help="use this folder (DICOM/NIfTI/PNG, e.g. ../shared/data) instead of the demo data")
    demo.add_argument("--out", default="outputs/demo", help="where the demo writes (default: outputs/demo)")
    demo.add_argument("--steps", type=int, help="optimiser steps (default: trainer.max_steps of configs/trainer/demo)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)

    export = commands.add_parser("export", help="write a pretrained encoder as a MONAI bundle")
    export.add_argument("source", help="run folder (outputs/<run>), checkpoint file, or MLflow run id")
    export.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    export.add_argument("--tracking-uri", help="MLflow store of a run id (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    export.add_argument("--no-mlflow", action="store_true", help="do not log the bundle to the run")
    export.add_argument(
        "--spatial-dims", type=int, default=2, choices=(2, 3), help="3: the encoder inflated to a 3D ResNet (I3D)"
    )
    export.add_argument("--depth-kernel", type=int, help="3D stem kernel depth (odd; default 3)")
    export.set_defaults(func=cmd_export)

    finetune = commands.add_parser(
        "finetune",
        help="downstream training from a pretrained encoder: classification (linear, kNN, finetune), "
        "segmentation (2D slice-wise or 3D U-Net), detection (RetinaNet)",
        description="configs/finetune/<task>.yaml plus overrides, e.g. task=classification protocol=knn "
        "model.pretrained=bundles/ct-joint data.label_fraction=0.1 seed=1; task=segmentation mode=3d; "
        "task=detection spatial_dims=3",
    )
    finetune.add_argument("overrides", nargs="*", help="key=value overrides")
    finetune.add_argument(
        "--config-dir",
        help="a folder of your own configs (default: $MEDSSL_CONFIG_DIR): <dir>/finetune/<task>.yaml or "
        "<dir>/<task>.yaml replaces the shipped task file",
    )
    finetune.set_defaults(func=cmd_finetune)

    evaluate = commands.add_parser(
        "evaluate",
        help="a classification protocol (probes/fine-tuning x label fractions x seeds) for several backbones: "
        "table and plots",
        description="configs/evaluate/classification.yaml plus overrides, e.g. "
        "'backbones={joint: bundles/ct-joint, random: none}' label_fractions=[0.1,1.0] seeds=[0,1,2]",
    )
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides")
    evaluate.add_argument("--config", help="protocol file (default: configs/evaluate/classification.yaml)")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (DataError, ManifestError, UnreadableCacheError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from medssl.train.trainer import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
