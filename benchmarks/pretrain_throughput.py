"""Pretraining throughput through the real ``Trainer`` loop, against the bare encoder on the same batch.

Usage (from the repository root)::

    .venv/bin/python benchmarks/pretrain_throughput.py --update BENCHMARKS.md

Options: ``--data ../shared/data`` (msd-hippocampus volumes + kermany images; default: the demo data of
``medssl demo``, assembled under ``--workdir``, default ``outputs/bench``), ``--quick`` (``model=small``,
8 images per step, fewer steps), ``--workers`` (``trainer.num_workers``, default 2), ``--device``,
``--precision``, ``--batch-images``, ``--batch-stacks``, ``--warmup``, ``--rounds``, ``--override KEY=VALUE``.

For ``method=joint`` and ``method=simclr`` (same data, same encoder), one fresh (spawned) process each,
so that peak memory is its own:

1. ``Trainer(config).fit()`` with ``trainer.log_every=1``: the trainer's own per-step accounting
   (``throughput/samples_per_s``, ``throughput/data_wait_fraction``, read back from the final
   checkpoint's history) gives each step's time, data wait (waiting for the loader) and the views made on the
   device (``throughput/augment_fraction``: host-to-device copy and views).
   Samples per step as the trainer counts them: images + stacks (joint), images (simclr).
2. Compute-only throughput: samples / (step time - data wait).
3. The bare encoder: forward + backward of a fresh encoder on pre-built tensors of the shapes the step
   encoded (recorded by wrapping ``JointModel.encode``), one tensor per resolution as ``JointModel.encode``
   groups them; timed in the trainer's callback (which the trainer's clock leaves out).
4. After the warm-up steps (the last one's callback warms the bare encoder up) and one step that absorbs
   that pass, rounds of (step A, bare pass in A's callback, step B): each bare timing is
   paired with the steps either side (same background load on a shared machine); ratios are per round,
   then the median. B's data wait may be optimistic (open loader workers prefetch during the bare pass;
   a loader reopened at an epoch start is not helped). Headline: joint compute-only / bare >= 0.80.
5. Peak RSS of the process (``RUSAGE_SELF``: MONAI's import forks a child and the DataLoader workers are
   children, neither counted) after the warm-up steps, and on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _isolated import run_isolated
from _report import update_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = {  # ../shared/data subfolders used by --data ../shared/data: (exclude, modality, subject pattern)
    "msd-hippocampus": (["labels/*", "README.md"], "MR", None),
    "kermany-cxr-224": (["labels.csv", "README.md"], "DX", r"(person\d+|IM-\d+)"),
}


# ---------------------------------------------------------------- data
def prepare_dataset(data: str | None, workdir: Path) -> dict[str, Any]:
    """A manifest (and its cache) to train on: the demo data, ``../shared/data``'s two sets, or any folder."""
    from medssl.data.manifest import read_manifest, write_manifest
    from medssl.data.scan import ScanOptions, scan_folder
    from medssl.demo import DemoPlan, prepare_manifest

    start = time.perf_counter()
    if data is None:
        manifest, _ = prepare_manifest(DemoPlan(out=workdir, progress=False))
        name = "demo data (`medssl.demo.prepare_manifest`)"
    elif all((Path(data) / sub).is_dir() for sub in SHARED):
        root = Path(data)
        rows = []
        for sub, (exclude, modality, pattern) in SHARED.items():
            options = ScanOptions(
                salt="benchmark",
                subject_pattern=re.compile(pattern) if pattern else None,
                modality=modality,
                exclude=exclude,
                progress=False,
            )
            rows += [replace(r, path=f"{sub}/{r.path}") for r in scan_folder(root / sub, options).rows]
        manifest = workdir / "shared.csv"
        write_manifest(manifest, rows, root)
        name = f"{data}: {' + '.join(SHARED)}"
    else:
        manifest, _ = prepare_manifest(DemoPlan(out=workdir, data=Path(data), progress=False))
        name = str(data)
    rows = read_manifest(manifest).rows
    return {
        "manifest": str(manifest),
        "cache": str(workdir / "cache"),
        "name": name,
        "images_2d": sum(r.dims == 2 for r in rows),
        "volumes": sum(r.dims == 3 for r in rows),
        "scan_seconds": time.perf_counter() - start,
    }


def overrides_for(args: dict[str, Any], method: str, output_dir: str) -> list[str]:
    return [
        f"data.manifest={args['manifest']}",
        f"data.cache_dir={args['cache']}",
        f"model={args['model']}",
        f"method={method}",
        f"trainer.device={args['device']}",
        f"trainer.precision={args['precision']}",
        f"trainer.channels_last={str(args['device'] != 'cpu').lower()}",  # the GPU preset's setting (CUDA only)
        f"trainer.batch.images={args['batch_images']}",
        f"trainer.batch.stacks={args['batch_stacks']}",
        f"trainer.num_workers={args['workers']}",
        f"trainer.max_steps={args['warmup'] + 1 + 2 * args['rounds']}",
        "trainer.log_every=1",
        "trainer.checkpoint_every=0",
        "trainer.resume=null",
        "trainer.progress=false",
        "logging=none",
        "logging.pictures.samples=0",
        f"run.output_dir={output_dir}",
        f"run.name=bench-{method}",
        *args["override"],
    ]


def phase_prepare_cache(args: dict[str, Any]) -> dict[str, Any]:
    """Build the cache once, outside every timed run (the joint config reads every stream)."""
    from medssl.train.config import compose_pretrain_config
    from medssl.train.pipeline import needed_streams, prepare_data

    config = compose_pretrain_config(overrides_for(args, "joint", tempfile.gettempdir()))
    start = time.perf_counter()
    data = prepare_data(config, needed_streams(config), build=True, progress=False)
    v, st = config.data.views, config.data.stacks
    return {
        "views": f"{v.n_global} x {v.global_size} px + {v.n_local} x {v.local_size} px crops per 2D sample, "
        f"2 views x {st.n_slices} slices at {st.size} px per stack sample",
        "seconds": time.perf_counter() - start,
        "samples_2d": len(data.images) if data.images is not None else 0,
        "stacks": len(data.stacks) if data.stacks is not None else 0,
    }


# ---------------------------------------------------------------- measurement
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_method(args: dict[str, Any], method: str) -> dict[str, Any]:
    """One ``Trainer.fit()``; the bare encoder is timed inside the callback, between the trainer's steps.

    After the warm-up steps (the bare encoder's warm-up pass in the last one's callback) and one more step,
    steps come in rounds of two: step A, then (in A's callback) the bare encoder on the
    shapes A encoded, then step B. The trainer's own step time leaves callbacks out, so the bare timing is
    not in it; interleaving pairs every bare timing with the steps around it (same background load).
    """
    import torch

    from medssl.models import joint as joint_module
    from medssl.runtime.checkpoints import load_checkpoint
    from medssl.runtime.devices import resolve_device
    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer, resolve_precision

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    warmup = args["warmup"]
    out = tempfile.mkdtemp(prefix="medssl-bench-run-")
    try:
        config = compose_pretrain_config(overrides_for(args, method, out))
        device = resolve_device(config.trainer.device)
        cuda = device.type == "cuda"
        amp_dtype = resolve_precision(config.trainer.precision, device)

        # Record what each step encodes (shapes only) without touching the trainer.
        encoded: list[list[tuple[int, ...]]] = []
        original = joint_module.JointModel.encode

        def recording_encode(self, images):  # type: ignore[no-untyped-def]
            encoded.append([tuple(t.shape) for t in images])
            return original(self, images)

        joint_module.JointModel.encode = recording_encode  # type: ignore[method-assign]
        bare = BareEncoder(config, device, amp_dtype)
        entered: dict[int, float] = {}
        left: dict[int, float] = {}
        bare_s: dict[int, float] = {}
        memory = {"rss_train": 0.0, "cuda_train": 0.0, "cuda_bare": 0.0}

        first_a = warmup + 2  # step warmup + 1 follows the bare warm-up pass: it absorbs its effect on the loader
        load: list[float] = []

        def callback(step: int, metrics: dict[str, float]) -> None:
            if cuda:
                torch.cuda.synchronize()
                memory["cuda_train"] = max(memory["cuda_train"], torch.cuda.max_memory_allocated() / 2**20)
            entered[step] = time.perf_counter()
            load.append(os.getloadavg()[0])
            if step == warmup:
                memory["rss_train"] = _rss_mib()  # training's peak, before any bare pass
            if step == warmup or (step >= first_a and (step - first_a) % 2 == 0):
                seconds, extra = bare.time(encoded[-1])  # the shapes this step encoded
                memory["cuda_bare"] = max(memory["cuda_bare"], extra)
                if step > warmup:  # the first pass is the bare encoder's warm-up
                    bare_s[step] = seconds
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            left[step] = time.perf_counter()

        rss_before = _rss_mib()
        start = time.perf_counter()
        result = Trainer(config, project_dir=ROOT, callbacks=[callback]).fit()
        fit_seconds = time.perf_counter() - start
        joint_module.JointModel.encode = original  # type: ignore[method-assign]
        history = load_checkpoint(result.checkpoint)["history"]  # type: ignore[arg-type]
    finally:
        shutil.rmtree(out, ignore_errors=True)

    tcfg = config.trainer
    samples = tcfg.batch.images + (tcfg.batch.stacks if method == "joint" else 0)
    rate = {int(s): v for s, v in history["throughput/samples_per_s"]}
    wait = {int(s): v for s, v in history["throughput/data_wait_fraction"]}
    views = {int(s): v for s, v in history["throughput/augment_fraction"]}

    def step_record(s: int) -> dict[str, float]:
        step_time = samples / rate[s]  # the trainer's own accounting of step s
        return {
            "step": s,
            "step_s": step_time,
            "wait_s": wait[s] * step_time,
            "augment_s": views[s] * step_time,
            "compute_s": step_time * (1 - wait[s]),
            "wall_s": entered[s] - left[s - 1],  # from the previous callback's end: everything the loop does
            "encoded": sum(shape[0] for shape in encoded[s - 1]),
        }

    first = {"step_s": samples / rate[1], "wait_s": wait[1] * samples / rate[1]}  # worker start-up, first batches
    rounds = []
    for a in sorted(bare_s):
        if a + 1 in rate:
            rounds.append({"a": step_record(a), "b": step_record(a + 1), "bare_s": bare_s[a]})
    return {
        "method": method,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "threads": torch.get_num_threads(),
        "precision": str(amp_dtype or "float32").replace("torch.", ""),
        "encoder": config.model.encoder,
        "samples_per_step": samples,
        "rounds": rounds,
        "first_step": {"step_s": first["step_s"], "wait_s": first["wait_s"]},
        "bare_groups": bare.groups(encoded[rounds[0]["a"]["step"] - 1]),
        "load_average": [min(load), max(load)],
        "fit_seconds": fit_seconds,
        "rss_before_mib": rss_before,
        "rss_train_mib": memory["rss_train"],
        "rss_end_mib": _rss_mib(),
        "cuda_train_mib": memory["cuda_train"] if cuda else None,
        "cuda_bare_mib": memory["cuda_bare"] if cuda else None,
    }


class BareEncoder:
    """A fresh encoder (train mode) timed forward + backward on one pre-built tensor per resolution."""

    def __init__(self, config, device, amp_dtype) -> None:  # type: ignore[no-untyped-def]
        import torch

        from medssl.models.joint import JointModel

        self.torch = torch
        self.device = device
        self.amp_dtype = amp_dtype
        self.cuda = device.type == "cuda"
        self.channels_last = config.trainer.channels_last and self.cuda
        generator_state = torch.random.get_rng_state()  # leave the trainer's random stream as it was
        self.encoder = JointModel(config.model).encoder.to(device)  # the trainer's encoder, built the same way
        torch.random.set_rng_state(generator_state)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self._inputs: dict[tuple[tuple[int, ...], ...], list[Any]] = {}

    @staticmethod
    def groups(shapes: list[tuple[int, ...]]) -> list[list[int]]:
        """``[[n, h, w], ...]``: as ``JointModel.encode``, one call per spatial size, in first-seen order."""
        found: dict[tuple[int, ...], int] = {}
        for shape in shapes:
            found[shape[-2:]] = found.get(shape[-2:], 0) + shape[0]
        return [[n, h, w] for (h, w), n in found.items()]

    def time(self, shapes: list[tuple[int, ...]]) -> tuple[float, float]:
        """Seconds for the forward + backward passes over ``shapes``, and (CUDA) the extra peak MiB."""
        torch = self.torch
        key = tuple(shapes)
        if key not in self._inputs:
            generator = torch.Generator().manual_seed(0)
            self._inputs = {key: []}  # one batch's tensors at a time
            for n, h, w in self.groups(shapes):
                x = torch.rand(n, shapes[0][1], h, w, generator=generator).to(self.device)
                self._inputs[key].append(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        before = 0.0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        self.encoder.train()
        total = 0.0
        for x in self._inputs[key]:
            self.encoder.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                features = self.encoder(x)
            features.float().mean().backward()
            if self.cuda:
                torch.cuda.synchronize()
            total += time.perf_counter() - start
        self.encoder.zero_grad(set_to_none=True)
        extra = torch.cuda.max_memory_allocated() / 2**20 - before if self.cuda else 0.0
        return total, extra


# ---------------------------------------------------------------- report
def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Medians over the timed steps (A and B) and rounds; ratios per round (bare vs the mean of A and B)."""
    n = r["samples_per_step"]
    med = statistics.median
    rounds = r["rounds"]
    steps = [x[k] for x in rounds for k in ("a", "b")]
    around = [(x["a"], x["b"]) for x in rounds]
    compute = [(a["compute_s"] + b["compute_s"]) / 2 for a, b in around]
    step = [(a["step_s"] + b["step_s"]) / 2 for a, b in around]
    bare = [x["bare_s"] for x in rounds]
    return {
        "rounds": len(rounds),
        "end_to_end": n / med([x["step_s"] for x in steps]),
        "wall": n / med([x["wall_s"] for x in steps]),
        "wait_fraction": sum(x["wait_s"] for x in steps) / sum(x["step_s"] for x in steps),
        "augment_fraction": sum(x["augment_s"] for x in steps) / sum(x["step_s"] for x in steps),
        "compute": n / med([x["compute_s"] for x in steps]),
        "bare": n / med(bare),
        "compute_ratio": med([b / c for b, c in zip(bare, compute, strict=True)]),
        "compute_ratios": [b / c for b, c in zip(bare, compute, strict=True)],
        "end_to_end_ratio": med([b / c for b, c in zip(bare, step, strict=True)]),
        "encoded": med([x["encoded"] for x in steps]),
        "step_s": [x["step_s"] for x in steps],
        "wait_s": [x["wait_s"] for x in steps],
        "compute_s": [x["compute_s"] for x in steps],
        "wall_s": [x["wall_s"] for x in steps],
        "bare_s": bare,
    }


def epoch_lengths(meta: dict[str, Any], method: str) -> dict[str, int]:
    """Steps per epoch of each stream the method reads (``shuffled_batches``: ``max(1, size // batch)``)."""
    args, cache = meta["args"], meta["cache"]
    lengths = {"images": max(1, cache["samples_2d"] // args["batch_images"])}
    if method == "joint":
        lengths["stacks"] = max(1, cache["stacks"] // args["batch_stacks"])
    return lengths


def slow_steps(r: dict[str, Any], meta: dict[str, Any], factor: float = 1.2) -> list[str]:
    """Timed steps whose compute time exceeds ``factor`` x the median, and the streams starting an epoch there."""
    steps = [x[k] for x in r["rounds"] for k in ("a", "b")]
    median = statistics.median(x["compute_s"] for x in steps)
    lengths = epoch_lengths(meta, r["method"])
    found = []
    for x in steps:
        if x["compute_s"] > factor * median:
            opening = [name for name, n in lengths.items() if (x["step"] - 1) % n == 0]
            found.append(
                f"step {x['step']} (+{x['compute_s'] - median:.2f} s"
                + (f"; new {' and '.join(opening)} epoch" if opening else "")
                + ")"
            )
    return found


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    first = next(iter(results.values()))
    cuda = first["cuda_train_mib"] is not None
    args = meta["args"]
    data, cache = meta["data"], meta["cache"]
    lines = [
        "## Pretraining throughput (`benchmarks/pretrain_throughput.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta['machine']}; device {first['device']} ({first['device_name']}), torch threads "
        f"{first['threads']}, {first['precision']}. Data: {data['name']}: {data['images_2d']} 2D images and "
        f"{data['volumes']} volumes = {cache['samples_2d']} 2D samples (images + foreground slices) and "
        f"{cache['stacks']} stack samples. Encoder {first['encoder']} (`model={args['model']}`); "
        f"{cache['views']}; `trainer=cpu` (AdamW, gradient clipping) with trainer.batch.images="
        f"{args['batch_images']}, trainer.batch.stacks={args['batch_stacks']}, trainer.num_workers="
        f"{args['workers']}. Each method: one `Trainer.fit()` in a fresh process: {args['warmup']} warm-up "
        f"step(s) (+ the bare encoder's warm-up pass), 1 step left out, then {args['rounds']} rounds of (step A, "
        "bare encoder timed in A's callback, step B). Load average (1 min) during the runs: "
        f"{min(r['load_average'][0] for r in results.values()):.1f}-"
        f"{max(r['load_average'][1] for r in results.values()):.1f} (this benchmark alone accounts for about "
        f"{first['threads']}; anything above is other jobs on the machine).",
        "",
        "| method | samples/step | encoder inputs/step | end-to-end samples/s | data wait | views on device "
        "| compute-only samples/s | bare encoder samples/s | **compute-only / bare** | end-to-end / bare "
        f"| peak RSS MiB{' | CUDA peak MiB (run / bare extra)' if cuda else ''} |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for method, r in results.items():
        s = summarise(r)
        groups = " + ".join(f"{n} x {h} px" for n, h, _ in r["bare_groups"])
        row = (
            f"| {method} | {r['samples_per_step']} | {s['encoded']:.0f} ({groups}) | {s['end_to_end']:.2f} "
            f"| {100 * s['wait_fraction']:.1f}% | {100 * s['augment_fraction']:.1f}% | {s['compute']:.2f} "
            f"| {s['bare']:.2f} | **{s['compute_ratio']:.2f}** "
            f"| {s['end_to_end_ratio']:.2f} | {r['rss_train_mib']:.0f}"
        )
        if cuda:
            row += f" | {r['cuda_train_mib']:.0f} / {r['cuda_bare_mib']:.0f}"
        lines.append(row + " |")
    lines.append("")
    if "joint" in results:
        joint = summarise(results["joint"])
        verdict = "meets" if joint["compute_ratio"] >= 0.80 else "misses"
        lines += [
            f"**Joint compute-only / bare encoder on the same batch: {joint['compute_ratio']:.2f}** (target >= 0.80: "
            f"{verdict} it; per round {', '.join(f'{x:.2f}' for x in joint['compute_ratios'])}); end to end with "
            f"data loading: {joint['end_to_end_ratio']:.2f}.",
            "",
        ]
    lines += [
        "| method | step s | data wait s | compute s | wall between callbacks s "
        "| bare encoder s | trainer-logged vs wall-clock samples/s | first step s (data wait) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        s = summarise(r)
        lines.append(
            f"| {method} | {_spread(s['step_s'])} | {_spread(s['wait_s'])} | {_spread(s['compute_s'])} "
            f"| {_spread(s['wall_s'])} | {_spread(s['bare_s'])} | {s['end_to_end']:.2f} vs {s['wall']:.2f} "
            f"| {r['first_step']['step_s']:.2f} ({r['first_step']['wait_s']:.2f}) |"
        )
    lines.append("")
    for method, r in results.items():
        lengths = ", ".join(f"{name} every {n} steps" for name, n in epoch_lengths(meta, method).items())
        slow = slow_steps(r, meta)
        lines.append(
            f"- {method}: new stream epochs ({lengths}; the loader workers live across epochs); "
            f"timed steps with compute > 1.2 x the median: {', '.join(slow) if slow else 'none'}."
        )
    lines += [
        "- Seconds: median (min-max) over the timed steps (A and B) and the bare passes.",
        "- Samples/step as the trainer counts them: `trainer.batch.images` + `trainer.batch.stacks` (joint; a "
        "stack sample is 2 views of up to N real slices), `trainer.batch.images` (simclr).",
        "- Step time and data wait: the trainer's own per-step accounting (`throughput/samples_per_s`, "
        "`throughput/data_wait_fraction`, `trainer.log_every=1`); data wait = waiting for the loader's batches; "
        "views on device (`throughput/augment_fraction`) = copying them to the device and making their views there "
        "(inside compute). "
        "Compute-only = samples / (step - data wait). B's data wait can be optimistic (open loader workers "
        "prefetch during the bare pass).",
        "- Bare encoder: samples / (sum over resolutions of one forward + backward of a fresh encoder on a "
        "pre-built tensor of the step's shapes, grouped as `JointModel.encode` groups them).",
        "- Ratios: per round (bare vs the mean of the two steps around it), then the median.",
        "- Wall between callbacks: from the end of one callback to the start of the next, i.e. everything the "
        "loop does, including what the trainer's clock leaves out.",
        "- Peak RSS: `ru_maxrss` (`RUSAGE_SELF`) of the run's process after the warm-up steps, before the first "
        "timed bare pass.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a data folder (../shared/data: msd-hippocampus + kermany); default: demo data")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench"), help="manifests and caches go here")
    parser.add_argument("--methods", nargs="+", default=["joint", "simclr"], choices=["joint", "simclr"])
    parser.add_argument("--quick", action="store_true", help="model=small, batch 8 images, 1 warm-up step, 2 rounds")
    parser.add_argument("--model", help="model config group (default: resnet18, or small with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="trainer.num_workers")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-images", type=int, help="trainer.batch.images (default 16, --quick 8)")
    parser.add_argument("--batch-stacks", type=int, default=2, help="trainer.batch.stacks")
    parser.add_argument("--warmup", type=int, help="steps left out at the start, >= 1 (default 2, --quick 1)")
    parser.add_argument("--rounds", type=int, help="timed rounds of 2 steps + 1 bare pass (default 6, --quick 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--update", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    parsed = parser.parse_args()
    quick = parsed.quick
    args: dict[str, Any] = {
        "model": parsed.model or ("small" if quick else "resnet18"),
        "workers": parsed.workers,
        "device": parsed.device,
        "precision": parsed.precision,
        "batch_images": parsed.batch_images or (8 if quick else 16),
        "batch_stacks": parsed.batch_stacks,
        "warmup": parsed.warmup if parsed.warmup is not None else (1 if quick else 2),
        "rounds": parsed.rounds or (2 if quick else 6),
        "threads": parsed.threads,
        "override": parsed.override,
    }
    if args["warmup"] < 1:
        parser.error("--warmup must be >= 1 (the bare encoder warms up in the last warm-up step's callback)")
    if parsed.data:  # one scratch folder per data folder: its manifest and cache are reused by later runs
        folder = Path(parsed.data).resolve()
        workdir = Path(parsed.workdir) / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    else:
        workdir = Path(parsed.workdir) / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = prepare_dataset(parsed.data, workdir)
    args.update(manifest=data["manifest"], cache=data["cache"])
    cache = run_isolated(phase_prepare_cache, args=args)
    print("data", json.dumps(data), json.dumps(cache), flush=True)
    results = {}
    for method in parsed.methods:
        results[method] = run_isolated(phase_method, args=args, method=method)
        print(method, json.dumps(results[method]), json.dumps(summarise(results[method])), flush=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "data": data,
        "cache": cache,
        "args": args,
    }
    command = "python benchmarks/pretrain_throughput.py " + " ".join(a for a in sys.argv[1:] if a)
    text = markdown(results, meta, command.strip())
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if parsed.update:
        update_section(Path(parsed.update), text, tag="pretrain_throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
