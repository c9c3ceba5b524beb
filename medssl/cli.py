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
    from medssl.data.scan import ScanOptions, scan_archive

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
    # rows stream from the walk through masks, labels and splits into the key-ordered outputs (nothing held a row):
    # the manifest (if any rows), the errors and the path map, files named by key outside the map
    report = scan_archive(
        Path(args.folder),
        options,
        out,
        masks=args.masks,
        labels=[Path(labels) for labels in args.labels or ()],
        split_fractions=args.split_fractions,
        path_map=Path(args.paths) if args.paths else None,
    )
    elapsed = time.perf_counter() - start
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = report.rows
    formats = rows["formats"]
    assert isinstance(formats, dict)
    # the folder is not echoed: it is the archive root, which only the path map holds (PACS exports of one patient
    # are folders named after the patient)
    print(f"scanned {report.walk.files_seen} files in {elapsed:.1f} s (pseudonym salt: {salt_origin})")
    print(
        f"  found {rows['rows']} items: {rows['images_2d']} 2D images, {rows['volumes_3d']} 3D volumes "
        f"({formats.get('dicom_series', 0)} DICOM series)"
    )
    print(f"  subjects: {rows['subjects']}")
    if report.errors:
        print(f"  skipped {report.errors.total()} file(s) or series, reasons in {report.outputs.errors}:")
        for reason, count in report.errors.most_common():
            print(f"    {count:6d}  {reason}")
    if report.walk.hidden_skipped:
        print(f"  ignored {report.walk.hidden_skipped} hidden file(s)/folder(s)")
    if report.outputs.manifest is None:
        print(f"error: nothing usable found in {args.folder}; no manifest written", file=sys.stderr)
        return 2
    print(f"  manifest: {out} (files named by key; shareable without the map)")
    print(f"  path map: {report.outputs.path_map} (key -> path under the archive: private, keep it with the data)")
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
    # the new root may be named after a patient (a one-patient PACS export): no message prints it, only the map
    # (which the user chose) and counts
    root = Path(args.root)
    if not root.is_dir():
        raise DataError(manifest.path_map_file, "the new root given is not a folder; the path map is unchanged")
    rewrite_root(manifest.path_map_file, root)
    missing = sum(not (root / relative).exists() for relative in manifest.path_map.paths.values())
    print(
        f"{manifest.path_map_file}: path map rewritten to the new root ({len(manifest.path_map)} entries); "
        "the manifest and the cache are unchanged"
    )
    if missing:
        total = len(manifest.path_map)
        print(f"warning: {missing} of {total} mapped files are not under the new root", file=sys.stderr)
    return 0


def cmd_manifest_preprocess(args: argparse.Namespace) -> int:
    from medssl.data.cache import build_cache
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig

    config = PreprocessConfig.from_overrides(args.set or [])
    # the build passes over the rows (digest, hashing) without holding them: flat in the manifest's size
    manifest = read_manifest(args.manifest, root=args.root, paths=args.paths, hold_rows=False)
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
    """``medssl pretrain``: a Hydra application (:mod:`medssl.train.app`): a run, a sweep (``-m``), ``--cfg``,
    ``--info``, ``--hydra-help`` or tab completion (``-sc``); ``--print-config`` prints the typed, resolved config."""
    from medssl.train import app

    where = {"config_name": args.config_name, "config_dir": args.config_dir}
    chosen = [
        flag
        for flag, given in (
            ("--print-config", args.print_config),
            ("-m/--multirun", args.multirun),
            ("--cfg", args.cfg is not None),
            ("--info", args.info is not None),
            ("-sc/--shell-completion", args.shell_completion),
            ("--hydra-help", args.hydra_help),
        )
        if given
    ]
    if len(chosen) > 1:
        raise ValueError(f"medssl pretrain: {' and '.join(chosen)} do not go together: give one of them")
    if args.resolve and args.cfg is None:
        raise ValueError("medssl pretrain: --resolve goes with --cfg (e.g. --cfg job --resolve)")
    if args.print_config:
        import yaml

        from medssl.train.config import compose_pretrain_config, to_container

        config = compose_pretrain_config(args.overrides, config_name=args.config_name, directory=args.config_dir)
        print(yaml.safe_dump(to_container(config), sort_keys=False), end="")
        return 0
    if args.cfg is not None:
        app.show_config(args.overrides, args.cfg, package=args.package, resolve=args.resolve, **where)
        return 0
    if args.info is not None:
        app.show_info(args.info, args.overrides, **where)
        return 0
    if args.shell_completion:
        app.shell_completion(args.overrides, **where)
        return 0
    if args.hydra_help:
        app.hydra_help(args.pretrain_parser, args.overrides, **where)
        return 0
    return app.exit_code(app.run_pretrain(args.overrides, multirun=args.multirun, **where))


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
        metadata=args.meta,
    )
    print(f"MONAI bundle: {path} (configs/metadata.json, configs/inference.json, models/model.pt, models/model.ts)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from medssl.downstream.finetune import compose_finetune_config, run_finetune

    run_finetune(compose_finetune_config(args.overrides, directory=args.config_dir))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medssl.downstream.evaluate import compose_evaluate_config, run_evaluate

    run_evaluate(compose_evaluate_config(args.overrides, path=args.config))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from medssl.downstream.embed import compose_embed_config, run_embed

    config = compose_embed_config(args.overrides, directory=args.config_dir)
    if config.out is None:
        raise ValueError("out=FILE is required: embeddings.parquet, embeddings.pt or embeddings.csv (by suffix)")
    run_embed(config)
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
        help="self-supervised pretraining (Hydra overrides, e.g. method=joint trainer.max_steps=200; -m sweeps)",
        description="A Hydra application: compose configs/pretrain.yaml with Hydra overrides and train in "
        "<run.output_dir>/<run name>/ (Hydra's job folder: .hydra/ holds config.yaml, overrides.yaml, hydra.yaml). "
        "-m runs a sweep (medssl pretrain -m seed=0,1,2 method=simclr,joint), one run folder per job in "
        "<run.output_dir>/<run.name or multirun-<time>>/. Under torchrun (torchrun --nproc_per_node=K -m medssl "
        "pretrain ...) every process joins one DDP run (no -m there).",
    )
    pretrain.add_argument(
        "overrides", nargs="*", help="Hydra overrides: group=option, key=value, +key=value; with -m, key=a,b sweeps"
    )
    pretrain.add_argument("--config-name", "-cn", default="pretrain", help="top-level config (default: pretrain)")
    pretrain.add_argument(
        "--config-dir",
        "-cd",
        help="a folder of your own configs added to the shipped ones, as Hydra's --config-dir (default: "
        "$MEDSSL_CONFIG_DIR): new options such as data/archive.yaml and top-level configs for --config-name",
    )
    pretrain.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved, type-checked config (every key) and exit; Hydra's composed view: --cfg job",
    )
    pretrain.add_argument(
        "--multirun", "-m", action="store_true", help="run a sweep: one job per combination of key=a,b values"
    )
    pretrain.add_argument(
        "--cfg", "-c", choices=("job", "hydra", "all"), help="print Hydra's composed config instead of training"
    )
    pretrain.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations")
    pretrain.add_argument("--package", "-p", help="with --cfg: the config package to show (e.g. trainer.optimizer)")
    pretrain.add_argument(
        "--info",
        "-i",
        nargs="?",
        const="all",
        choices=("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
        help="print Hydra's information on the composition (default: all)",
    )
    pretrain.add_argument(
        "--shell-completion",
        "-sc",
        action="store_true",
        help='tab completion of overrides: eval "$(medssl pretrain -sc install=bash)" (or install=zsh; '
        "uninstall=bash removes it)",
    )
    pretrain.add_argument("--hydra-help", action="store_true", help="Hydra's help: its flags and hydra/ groups")
    pretrain.set_defaults(func=cmd_pretrain, pretrain_parser=pretrain)

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
    export.add_argument("source", help="run folder, checkpoint file, MLflow run id, or models:/NAME@ALIAS")
    export.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    export.add_argument("--tracking-uri", help="MLflow store of a run id (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    export.add_argument("--no-mlflow", action="store_true", help="do not log the bundle to the run")
    export.add_argument(
        "--spatial-dims", type=int, default=2, choices=(2, 3), help="3: the encoder inflated to a 3D ResNet (I3D)"
    )
    export.add_argument("--depth-kernel", type=int, help="3D stem kernel depth (odd; default 3)")
    export.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE",
        help="bundle metadata (repeatable): version, changelog, authors, copyright, license, intended_use, name, "
        "description, data_source",
    )  # fmt: skip
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

    embed = commands.add_parser(
        "embed",
        help="embeddings of a manifest's images and volumes (per slice and pooled) from a pretrained encoder: "
        ".parquet, .pt or .csv",
        description="configs/embed/default.yaml plus overrides, e.g. model.pretrained=bundles/ct-joint "
        "data.manifest=data_manifests/archive.csv out=embeddings.parquet",
    )
    embed.add_argument("overrides", nargs="*", help="key=value overrides")
    embed.add_argument(
        "--config-dir", help="a folder of your own configs (default: $MEDSSL_CONFIG_DIR): <dir>/embed/default.yaml"
    )
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "pretrain" and not any(e.startswith("-") for e in extra):
        args.overrides.extend(extra)  # overrides after a flag (medssl pretrain a=1 -m b=2,3), as Hydra apps take them
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
