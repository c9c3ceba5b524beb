"""Data pipeline benchmark: scan, cache build, cached loaders and on-device views on real data.

Usage (from the repository root, with ../shared/data present)::

    .venv/bin/python benchmarks/data_pipeline.py --data ../shared/data --update BENCHMARKS.md

Per stream (2D multi-crop, 3D two-view stack):

* the loader's CPU time per sample (0 workers: the process's CPU time, ``time.process_time``, over the timed
  batches: what one worker spends per sample) and its samples/s with 0, 1 and 2 workers;
* the on-device views (``dataset.views``, :mod:`medssl.data.device_views`) of a batch against the bare encoder's
  forward + backward on the same views (the pretraining encoder, built as the trainer builds it), medians over
  the timed batches, in one process.

Every phase runs in a fresh (spawned) process so that its peak memory is its own; loader
processes' peaks include their DataLoader workers (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _isolated import run_isolated
from _report import update_section

DATASETS: dict[str, dict[str, Any]] = {
    "msd-hippocampus": {"exclude": ["labels/*"], "modality": "MR", "subject_pattern": None},
    "kermany-cxr-224": {"exclude": [], "modality": "DX", "subject_pattern": r"(person\d+|IM-\d+)"},
}


def _peak_mib() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


def phase_scan(folder: str, manifest: str, options: dict[str, Any]) -> dict[str, Any]:
    import re

    from medssl.data.manifest import write_manifest
    from medssl.data.scan import ScanOptions, scan_folder

    pattern = re.compile(options["subject_pattern"]) if options["subject_pattern"] else None
    start = time.perf_counter()
    result = scan_folder(
        Path(folder),
        ScanOptions(
            salt="benchmark",
            subject_pattern=pattern,
            modality=options["modality"],
            exclude=options["exclude"],
            progress=False,
        ),
    )
    write_manifest(Path(manifest), result.rows, Path(folder))
    seconds = time.perf_counter() - start
    return {"files": result.files_seen, "items": len(result.rows), "seconds": seconds, "peak_mib": _peak_mib()}


def phase_cache(manifest: str, cache: str, workers: int) -> dict[str, Any]:
    from medssl.data.cache import build_cache
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig

    rows = read_manifest(manifest)
    report = build_cache(rows, Path(cache), PreprocessConfig(), workers=workers, progress=False)
    again = time.perf_counter()
    rebuild = build_cache(rows, Path(cache), PreprocessConfig(), workers=workers, progress=False)
    again = time.perf_counter() - again
    size = sum(p.stat().st_size for p in Path(report.directory).glob("*.npy"))
    return {
        "built": report.built,
        "failed": len(report.errors),
        "seconds": report.seconds,
        "rebuild_seconds": again,
        "rebuild_reused": rebuild.reused,
        "cache_mib": size / 2**20,
        "peak_mib": _peak_mib(),
    }


def _datasets(manifest: str, cache: str, kind: str):  # type: ignore[no-untyped-def]
    from medssl.data.datasets import MultiCropSliceDataset, TwoViewStackDataset, cached_items
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig

    items = cached_items(read_manifest(manifest), Path(cache), PreprocessConfig())
    return TwoViewStackDataset(items) if kind == "3d" else MultiCropSliceDataset(items)


def phase_loader(manifest: str, cache: str, kind: str, workers: int, batches: int, batch_size: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    dataset = _datasets(manifest, cache, kind)
    if kind == "raw":  # bare memory-mapped slice reads, the floor under the 2D loader
        rng = np.random.default_rng(0)
        order = rng.permutation(len(dataset))[: batches * batch_size]
        start = time.perf_counter()
        for i in order:
            dataset.image(int(i), rng)
        seconds = time.perf_counter() - start
        return {
            "samples": len(order),
            "seconds": seconds,
            "samples_per_s": len(order) / seconds,
            "peak_mib": _peak_mib(),
        }
    generator = torch.Generator().manual_seed(0)
    # This phase runs in a spawned process, whose children would be spawned too (importing torch and
    # MONAI again, seconds each): use fork as a Linux training process does, and keep the workers.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=generator,
        collate_fn=dataset.collate,
        persistent_workers=workers > 0,
        multiprocessing_context="fork" if workers > 0 and sys.platform == "linux" else None,
    )

    def endless():  # small datasets run out of batches: go on with further epochs
        epoch = 0
        while True:
            dataset.set_epoch(epoch)
            yield from loader
            epoch += 1

    iterator = endless()
    start = time.perf_counter()
    next(iterator)  # worker start-up and first batch
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(batches):
        batch = next(iterator)
        count += batch["pixels"].shape[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "dataset_len": len(dataset),
        "first_batch_s": first,
        "samples": count,
        "seconds": seconds,
        "samples_per_s": count / seconds,
        "cpu_ms_per_sample": 1000 * cpu / count if workers == 0 else None,  # workers' CPU is not this process's
        "peak_mib": _peak_mib(),
    }


def phase_augment(manifest: str, cache: str, kind: str, batches: int, batch_size: int) -> dict[str, Any]:
    """Median seconds of ``dataset.views`` on a batch vs the bare encoder's forward + backward on those views."""
    import statistics

    import numpy as np
    import torch

    from medssl.models.joint import JointModel
    from medssl.train.config import compose_pretrain_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = _datasets(manifest, cache, kind)
    encoder = JointModel(compose_pretrain_config([]).model).encoder.train()
    order = np.random.default_rng(0).permutation(len(dataset))
    augment, forward_backward = [], []
    for b in range(batches + 1):  # the first batch warms up
        picks = order[np.arange(b * batch_size, (b + 1) * batch_size) % len(dataset)]
        batch = dataset.collate([dataset[int(i)] for i in picks])
        start = time.perf_counter()
        views = dataset.views(batch, "cpu")
        made = time.perf_counter() - start
        flat = [v.flatten(0, 1) if v.ndim == 5 else v for v in views]  # stacks: [B, N, 1, S, S] -> [B*N, 1, S, S]
        by_size: dict[int, list[torch.Tensor]] = {}
        for v in flat:
            by_size.setdefault(v.shape[-1], []).append(v)
        encoder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for same in by_size.values():  # one encoder call per resolution, as the trainer's model does
            encoder(torch.cat(same)).mean().backward()
        passed = time.perf_counter() - start
        if b:
            augment.append(made)
            forward_backward.append(passed)
    return {
        "views": [list(v.shape) for v in views],
        "augment_s": statistics.median(augment),
        "encoder_s": statistics.median(forward_backward),
        "ratio": statistics.median(a / e for a, e in zip(augment, forward_backward, strict=True)),
        "peak_mib": _peak_mib(),
    }


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        "## Data pipeline (`benchmarks/data_pipeline.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']}. Default `PreprocessConfig` (float16 cache); 2D multi-crop = 2x96 px + 4x48 px "
        f"views; 3D = two views of 16 slices at 96 px; batch {results['batch_size']}, {results['batches']} timed "
        "batches after the first; torch threads 1 per process. Peak RSS in MiB of the measuring process "
        "(cache build: / its worker processes; loader workers are forked and share the parent's pages).",
        "",
        "| dataset | scan | cache build (2 processes) | no-op rebuild | cache size |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        s, c = r["scan"], r["cache"]
        lines.append(
            f"| {name} | {s['files']} files, {s['items']} items in {s['seconds']:.2f} s "
            f"({s['items'] / s['seconds']:.0f} items/s; peak {s['peak_mib'][0]:.0f} MiB) "
            f"| {c['built']} items in {c['seconds']:.1f} s = **{c['built'] / c['seconds']:.1f} items/s** "
            f"(peak {c['peak_mib'][0]:.0f} / {c['peak_mib'][1]:.0f} MiB) "
            f"| {c['rebuild_seconds']:.2f} s ({c['rebuild_reused']} reused) | {c['cache_mib']:.1f} MiB |"
        )
    lines += [
        "",
        "The loader reads the cached plane (or stack) at storage precision and draws its views' numbers; the views "
        "are made in batch on the training device (`dataset.views`). Loader CPU per sample: 0 workers, the "
        "process's CPU time over the timed batches (what one worker spends per sample).",
        "",
        "| dataset | loader | samples in dataset | workers | samples/s | loader CPU ms/sample | first batch "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        for key, value in r["loaders"].items():
            kind, workers = key.split(":")
            first = f"{value['first_batch_s']:.2f} s" if "first_batch_s" in value else "-"
            cpu = value.get("cpu_ms_per_sample")
            lines.append(
                f"| {name} | {LABELS[kind]} | {value.get('dataset_len', '-')} | {workers} "
                f"| **{value['samples_per_s']:.1f}** | {'-' if cpu is None else f'**{cpu:.2f}**'} | {first} "
                f"| {value['peak_mib'][0]:.0f} |"
            )
    lines += [
        "",
        f"On-device views of a batch ({results['batch_size']} 2D samples, {results['stack_batch_size']} stacks) on "
        "this CPU (1 thread) against the bare encoder's forward + backward on the same views (default pretraining "
        "encoder), medians over the timed batches:",
        "",
        "| dataset | stream | views per batch | views (s) | encoder fwd+bwd (s) | views / encoder | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        for kind, value in r.get("augment", {}).items():
            shapes = ", ".join("x".join(str(d) for d in shape) for shape in value["views"])
            lines.append(
                f"| {name} | {LABELS[kind]} | {shapes} | {value['augment_s']:.4f} | {value['encoder_s']:.3f} "
                f"| **{100 * value['ratio']:.1f}%** | {value['peak_mib'][0]:.0f} |"
            )
    return "\n".join(lines) + "\n"


LABELS = {"raw": "bare cached slice read", "2d": "2D multi-crop", "3d": "3D two-view stack"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="folder holding msd-hippocampus and kermany-cxr-224")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-workers", type=int, default=2)
    parser.add_argument("--augment-batches", type=int, default=5, help="timed batches of views vs encoder")
    parser.add_argument(
        "--stack-batch-size", type=int, default=4, help="stacks per batch in the views-vs-encoder timing (CPU preset)"
    )
    parser.add_argument("--update", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    data = Path(args.data)
    missing = [name for name in DATASETS if not (data / name).is_dir()]
    if missing:
        print(f"error: {data} lacks {', '.join(missing)} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medssl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "batch_size": args.batch_size,
        "stack_batch_size": args.stack_batch_size,
        "batches": args.batches,
        "datasets": {},
    }
    try:
        for name, options in DATASETS.items():
            manifest = str(workdir / f"{name}.csv")
            cache = str(workdir / f"cache-{name}")
            shutil.rmtree(cache, ignore_errors=True)
            entry: dict[str, Any] = {
                "scan": run_isolated(phase_scan, folder=str(data / name), manifest=manifest, options=options)
            }
            entry["cache"] = run_isolated(phase_cache, manifest=manifest, cache=cache, workers=args.cache_workers)
            entry["loaders"] = {}
            kinds = ["raw", "2d"] + (["3d"] if name == "msd-hippocampus" else [])
            for kind in kinds:
                for workers in [0] if kind == "raw" else [0, 1, 2]:
                    entry["loaders"][f"{kind}:{workers}"] = run_isolated(
                        phase_loader,
                        manifest=manifest,
                        cache=cache,
                        kind=kind,
                        workers=workers,
                        batches=args.batches,
                        batch_size=args.batch_size,
                    )
                    print(name, kind, workers, json.dumps(entry["loaders"][f"{kind}:{workers}"]), flush=True)
            entry["augment"] = {}
            for kind in kinds[1:]:
                entry["augment"][kind] = run_isolated(
                    phase_augment,
                    manifest=manifest,
                    cache=cache,
                    kind=kind,
                    batches=args.augment_batches,
                    batch_size=args.batch_size if kind == "2d" else args.stack_batch_size,
                )
                print(name, "augment", kind, json.dumps(entry["augment"][kind]), flush=True)
            results["datasets"][name] = entry
            print(name, json.dumps({k: entry[k] for k in ("scan", "cache")}), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python benchmarks/data_pipeline.py " + " ".join(a for a in sys.argv[1:] if a)
    text = markdown(results, command)
    print(text)
    if args.update:
        update_section(Path(args.update), text, tag="data_pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
