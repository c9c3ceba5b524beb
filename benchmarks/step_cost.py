"""Cost of one joint training step on CPU, split by part, against the bare encoder.

Usage (from the repository root)::

    .venv/bin/python benchmarks/step_cost.py --update BENCHMARKS.md

Every part is timed forward + backward on leaf inputs, so its cost is its own; the full step
(forward, backward, SGD update) is timed as the trainer runs it. The headline is the ratio of
the full step to the bare encoder forward + backward on the same crops. Peak memory is measured
in a fresh process per measurement (RSS growth over the set-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _isolated import run_isolated
from _report import update_section


def _setup(args: dict[str, Any]):
    import torch

    from medssl.models.joint import JointModel, JointModelConfig
    from medssl.objectives.joint import JointObjective, JointObjectiveConfig, LossWeights, StackBatch

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    config = JointModelConfig(attention=args["attention"])
    model = JointModel(config)
    objective = JointObjective(model, JointObjectiveConfig(weights=LossWeights(intra=1, inter=1, mask=1, sep=0)))
    b2, b3, n = args["batch_2d"], args["batch_3d"], args["slices"]
    g, small = args["global_size"], args["local_size"]
    crops = [torch.rand(b2, 1, g, g) for _ in range(2)] + [torch.rand(b2, 1, small, small) for _ in range(4)]
    mask = torch.ones(b3, n, dtype=torch.bool)
    positions = torch.arange(n, dtype=torch.float32).repeat(b3, 1)
    stacks = StackBatch([torch.rand(b3, n, 1, g, g) for _ in range(2)], mask, positions)
    return torch, model, objective, crops, stacks


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: dict[str, Any]) -> dict[str, Any]:
    from medssl.objectives.masked import masked_slice_loss

    torch, model, objective, crops, stacks = _setup(args)
    repeats = args["repeats"]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    slices = [v[stacks.mask] for v in stacks.views]
    images = crops + slices
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results: dict[str, Any] = {}

    def bare_encoder() -> None:
        model.zero_grad(set_to_none=True)
        features = model.encode(images)
        torch.stack([f.mean() for f in features]).sum().backward()

    def full_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective.normalize_prototypes()
        loss, _ = objective(crops, stacks, step=1000)
        loss.backward()
        objective.after_backward(1000)
        optimizer.step()

    if args["only"] == "bare":
        results["bare_encoder"] = _time(bare_encoder, repeats)
    elif args["only"] == "full":
        results["full_step"] = _time(full_step, repeats)
    else:
        with torch.no_grad():
            features = model.encode(images)
        dim = features[0].shape[-1]
        crop_features = [f.detach().requires_grad_(True) for f in features[: len(crops)]]
        tokens = [torch.randn(*stacks.mask.shape, dim, requires_grad=True) for _ in range(2)]

        def intra() -> None:
            model.zero_grad(set_to_none=True)
            z = [model.projector(f) for f in crop_features]
            objective._swav_heads(model.intra_prototypes, z)[0].backward()

        def transformer() -> None:
            model.zero_grad(set_to_none=True)
            out = [model.transformer(t, stacks.mask, stacks.positions).volume for t in tokens]
            torch.stack([o.sum() for o in out]).sum().backward()

        def inter() -> None:
            model.zero_grad(set_to_none=True)
            volumes = [model.transformer(t, stacks.mask, stacks.positions).volume for t in tokens]
            objective._swav_heads(model.inter_prototypes, volumes)[0].backward()

        def masked() -> None:
            model.zero_grad(set_to_none=True)
            losses = [
                masked_slice_loss(model.masked(t, stacks.mask, model.transformer, stacks.positions))[0] for t in tokens
            ]
            torch.stack(losses).mean().backward()

        def sgd() -> None:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()

        results["bare_encoder"] = _time(bare_encoder, repeats)
        results["slice_transformer"] = _time(transformer, repeats)
        results["L_intra (projector, prototypes, SwAV)"] = _time(intra, repeats)
        results["L_inter (transformer, prototypes, SwAV)"] = _time(inter, repeats)
        results["L_mask (transformer, decoder)"] = _time(masked, repeats)
        results["optimizer (SGD)"] = _time(sgd, repeats)
        results["full_step"] = _time(full_step, repeats)
    results["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    results["images"] = {"2d_crops": len(crops) * crops[0].shape[0], "3d_slices": sum(s.shape[0] for s in slices)}
    return results


def markdown(
    split: dict[str, Any], bare: dict[str, Any], full: dict[str, Any], args: dict[str, Any], command: str
) -> str:
    from medssl.models.joint import JointModelConfig

    cfg = JointModelConfig(attention=args["attention"])
    ratio = split["full_step"] / split["bare_encoder"]
    lines = [
        "## Joint step cost (`benchmarks/step_cost.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args['threads']}, float32. "
        f"Default joint configuration: {cfg.encoder} (stem stride {cfg.stem_stride}, max-pool {cfg.max_pool}), "
        f"slice transformer dim {cfg.transformer_dim} x {cfg.transformer_depth} layers ({cfg.attention} attention, "
        f"reference stride {cfg.reference_stride}), prototypes {cfg.intra_prototypes} (2D) / {cfg.inter_prototypes} "
        f"(3D), weights intra = inter = mask = 1. Batch: {args['batch_2d']} images x (2 x {args['global_size']} px + "
        f"4 x {args['local_size']} px crops) and {args['batch_3d']} volumes x 2 views x {args['slices']} slices at "
        f"{args['global_size']} px = {split['images']['2d_crops']} crops + {split['images']['3d_slices']} slices "
        f"through the encoder. Median of {args['repeats']} steps after one warm-up.",
        "",
        "| part (forward + backward, on leaf inputs) | seconds | share of the full step |",
        "|---|---|---|",
    ]
    for key, value in split.items():
        if key in ("images", "rss_growth_mib"):
            continue
        lines.append(f"| {key.replace('_', ' ')} | {value:.3f} | {100 * value / split['full_step']:.1f}% |")
    lines += [
        "",
        f"**Full step / bare encoder forward+backward on the same crops: {ratio:.3f}x** (target: at most 1.25x).",
        "",
        f"Peak memory (RSS growth over set-up, fresh process each): bare encoder {bare['rss_growth_mib']:.0f} MiB, "
        f"full step {full['rss_growth_mib']:.0f} MiB ({full['rss_growth_mib'] / max(bare['rss_growth_mib'], 1):.2f}x).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-2d", type=int, default=16)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--global-size", type=int, default=96)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--attention", default="deformable", choices=["deformable", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--update", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    parsed = parser.parse_args()
    args = {k: v for k, v in vars(parsed).items() if k != "update"}
    split = run_isolated(measure, args={**args, "only": None})
    print("split", split, flush=True)
    bare = run_isolated(measure, args={**args, "only": "bare"})
    full = run_isolated(measure, args={**args, "only": "full"})
    print("bare", bare, "full", full, flush=True)
    command = "python benchmarks/step_cost.py " + " ".join(sys.argv[1:])
    text = markdown(split, bare, full, args, command)
    print(text)
    if parsed.update:
        update_section(Path(parsed.update), text, tag="step_cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
