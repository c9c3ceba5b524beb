"""The prepared GPU check: pretraining throughput of the joint method and SimCLR on one accelerator.

Usage on a machine with a GPU (from the repository root; under 8 minutes)::

    python benchmarks/gpu_check.py --update BENCHMARKS.md            # bf16, channels-last, 12 loader workers
    python benchmarks/gpu_check.py --compile --update BENCHMARKS.md   # the same with torch.compile on the encoder

and on any machine, as the test suite does, a dry run with tiny shapes on the CPU (same code path, no GPU)::

    python benchmarks/gpu_check.py --dry --data DIR --update /tmp/check.md

It runs ``benchmarks/pretrain_throughput.py``'s measurement (one ``Trainer.fit()`` per method in a fresh process:
warm-up steps, then rounds of step / bare encoder / step) with the GPU preset (``trainer=gpu``: batch 256 images +
32 stacks, LARS), bf16 autocast, channels-last, ``--workers`` loader workers, views made on the device. It reports
per method: samples/s end to end, the loader's data wait, the on-device views' share of the step, the step's
compute against the bare encoder on the same batch, and the encoder's model FLOP utilisation: the encoder's
forward + backward FLOPs for the step's shapes (``torch.utils.flop_counter.FlopCounterMode``) per second of the
step's compute, over the device's dense bf16 peak (a table of known devices, or ``--peak-tflops``). The section
``gpu_check`` of ``--update`` gets the table; nothing is written for a device without figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _isolated import run_isolated
from _report import update_section
from pretrain_throughput import ROOT, phase_method, phase_prepare_cache, prepare_dataset, summarise

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, SXM parts where there are several)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known device, by name; None for an unknown one (and for CPUs)."""
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def phase_flops(model: str, groups: list[list[int]], overrides: list[str]) -> float:
    """Forward + backward FLOPs of the pretraining encoder on one step's inputs (``[n, h, w]`` per resolution)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medssl.models.joint import JointModel
    from medssl.train.config import compose_pretrain_config

    config = compose_pretrain_config([f"model={model}", *overrides])
    encoder = JointModel(config.model).encoder.train()
    channels = config.model.in_channels
    counter = FlopCounterMode(display=False)
    with counter:
        for n, h, w in groups:
            encoder(torch.rand(n, channels, h, w)).float().mean().backward()
    return float(counter.get_total_flops())


def settings(parsed: argparse.Namespace) -> dict[str, Any]:
    """``pretrain_throughput`` arguments for the GPU check (or its dry run on the CPU with tiny shapes)."""
    args: dict[str, Any] = {
        "model": "resnet18",
        "workers": 12,
        "device": "cuda",
        "precision": "bf16",
        "batch_images": 256,
        "batch_stacks": 32,
        "warmup": 4 if parsed.compile else 2,  # compilation happens in the first steps
        "rounds": 4,
        "threads": 0,
        "override": ["trainer=gpu", *(["trainer.compile=true"] if parsed.compile else [])],
    }
    if parsed.dry:
        tiny = ["data.views.global_size=32", "data.views.local_size=16", "data.views.n_local=2"]
        tiny += ["data.stacks.size=32", "data.stacks.n_slices=4", "data.preprocess.max_side_2d=64"]
        args.update(model="small", workers=1, device="cpu", precision="fp32", batch_images=4, batch_stacks=2)
        args.update(warmup=1, rounds=1, threads=1, override=tiny)
    if parsed.workers is not None:
        args["workers"] = parsed.workers
    args["override"] = [*args["override"], *parsed.override]
    return args


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    lines = [
        "## GPU check (`benchmarks/gpu_check.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {meta['device']}; {meta['precision']}, channels-last {meta['channels_last']}, torch.compile "
        f"{meta['compile']}, {meta['workers']} loader workers, views made on the device; data: {meta['data']}; "
        f"batch {meta['batch_images']} images + {meta['batch_stacks']} stacks (joint), {meta['batch_images']} "
        f"images (SimCLR); {meta['warmup']} warm-up steps, {meta['rounds']} timed rounds; {meta['minutes']:.1f} min.",
        "",
        "| method | samples/s (end to end) | data wait | views on device | compute / bare encoder "
        "| encoder TFLOP/step (fwd+bwd) | encoder TFLOP/s | model FLOP utilisation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"**{100 * r['mfu']:.1f}%** of {r['peak']:.0f}" if r["mfu"] is not None else "- (peak unknown)"
        lines.append(
            f"| {r['method']} | **{r['end_to_end']:.1f}** | {100 * r['wait_fraction']:.1f}% "
            f"| {100 * r['augment_fraction']:.1f}% | {r['compute_ratio']:.2f} | {r['tflop_per_step']:.3f} "
            f"| {r['tflops']:.2f} | {mfu} |"
        )
    lines += [
        "",
        "- Data wait: the step's time waiting for the loader's batches; views on device: moving the batch to the "
        "device and making its views there (the host's launch time on an accelerator); both from the trainer's "
        "own per-step accounting.",
        "- Compute / bare encoder: the step without the data wait against one forward + backward of a fresh encoder "
        "on tensors of the step's shapes (`benchmarks/pretrain_throughput.py`).",
        "- Model FLOP utilisation: the encoder's forward + backward FLOPs per step (FlopCounterMode) / the step's "
        "compute seconds / the device's dense bf16 peak.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: check that the script runs end to end")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (trainer.compile=true)")
    parser.add_argument("--workers", type=int, help="loader workers (default 12; dry: 1)")
    parser.add_argument("--data", help="a data folder (default: the demo data, assembled under --workdir)")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "gpu-check"), help="manifests and caches")
    parser.add_argument("--methods", nargs="+", default=["joint", "simclr"], choices=["joint", "simclr"])
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--update", help="write the section gpu_check into this Markdown file (e.g. BENCHMARKS.md)")
    parsed = parser.parse_args(argv)
    start = time.perf_counter()
    args = settings(parsed)
    workdir = Path(parsed.workdir) / ("dry" if parsed.dry else "gpu")
    workdir.mkdir(parents=True, exist_ok=True)
    data = prepare_dataset(parsed.data, workdir)
    args.update(manifest=data["manifest"], cache=data["cache"])
    run_isolated(phase_prepare_cache, args=args)
    rows = []
    for method in parsed.methods:
        result = run_isolated(phase_method, args=args, method=method)
        summary = summarise(result)
        flops = phase_flops(args["model"], result["bare_groups"], args["override"])
        compute_s = result["samples_per_step"] / summary["compute"]
        peak = parsed.peak_tflops or peak_tflops(result["device_name"])
        tflops = flops / compute_s / 1e12
        rows.append(
            {
                "method": method,
                "device": f"{result['device']} ({result['device_name']})",
                "end_to_end": summary["end_to_end"],
                "wait_fraction": summary["wait_fraction"],
                "augment_fraction": summary["augment_fraction"],
                "compute_ratio": summary["compute_ratio"],
                "tflop_per_step": flops / 1e12,
                "tflops": tflops,
                "peak": peak,
                "mfu": tflops / peak if peak else None,
            }
        )
        print(method, json.dumps(rows[-1]), flush=True)
    meta = {
        "device": rows[0]["device"],
        "precision": args["precision"],
        "channels_last": args["device"] != "cpu",
        "compile": parsed.compile,
        "workers": args["workers"],
        "data": data["name"],
        "batch_images": args["batch_images"],
        "batch_stacks": args["batch_stacks"],
        "warmup": args["warmup"],
        "rounds": args["rounds"],
        "minutes": (time.perf_counter() - start) / 60,
    }
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, meta, command.strip())
    print(text)
    if parsed.update:
        update_section(Path(parsed.update), text, tag="gpu_check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
