"""The joint family (Nguyen et al., AAAI 2023): one objective, ``λ_intra L_intra + λ_inter L_inter + λ_mask L_mask
+ λ_sep L_sep``. The presets ``joint``, ``swav2d`` (L_intra alone), ``dcv2_2d`` (DeepCluster-v2 for L_intra),
``staged`` (the released code's 2D -> masked -> 3D schedule) and ``sepclr`` (L_sep alone) are this method under their
own names, so that runs are named and tagged after the preset that made them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.data.errors import ManifestError
from medssl.data.views import MultiCropConfig
from medssl.models.joint import JointModel
from medssl.objectives.joint import JointObjective, LossWeights
from medssl.train.methods.base import Method, MethodSettings, StepCounts
from medssl.train.prepared import PreparedData

STREAMS = ("images", "stacks", "sep")
# The model's modules that each loss term trains (besides the encoder).
TERM_MODULES: dict[str, tuple[str, ...]] = {
    "intra": ("projector", "intra_prototypes"),
    "inter": ("transformer", "inter_prototypes"),
    "mask": ("transformer", "masked"),
    "sep": ("sep_heads",),
}
CLUSTERING_NAMES = {"swav": "SwAV", "deepcluster": "DeepCluster-v2", "simclr": "SimCLR"}


def streams_of(weights: LossWeights) -> list[str]:
    """The streams that losses with these weights read: ``images`` (L_intra), ``stacks`` (L_inter, L_mask),
    ``sep`` (L_sep)."""
    active = {"images": weights.intra > 0, "stacks": weights.inter > 0 or weights.mask > 0, "sep": weights.sep > 0}
    return [name for name in STREAMS if active[name]]


class JointFamily(Method):
    """``method.objective`` (:class:`medssl.objectives.joint.JointObjectiveConfig`) sets the terms, their weights,
    the clustering of each stream, queues, spreading terms, the prototype freeze and the staged schedule."""

    def streams(self, config: MethodSettings) -> list[str]:
        objective = config.method.objective
        streams = streams_of(objective.weights)
        if objective.stages is not None:  # the staged schedule reads 2D and 3D in turn
            streams = [name for name in STREAMS if name in streams or name in ("images", "stacks")]
        if not streams:
            raise ValueError("method.objective.weights: every loss weight is 0; nothing to train")
        return streams

    def image_views(self, config: MethodSettings) -> MultiCropConfig:
        return config.data.views  # global and local crops (multi-crop)

    def terms_without_volumes(self, config: MethodSettings, manifest: Path) -> list[str]:
        """L_inter and L_mask are dropped when another term has data (the joint method then trains its 2D part);
        an error when every active term reads volumes, or for the staged schedule (its later stages are 3D)."""
        objective = config.method.objective
        if objective.stages is not None or self.streams(config) == ["stacks"]:
            needs = "the staged schedule's masked and 3D stages" if objective.stages is not None else "L_inter, L_mask"
            raise ManifestError(
                f"data.manifest: {manifest}: no 3D volume for the 3D stream ({needs}); "
                "use a 2D method (method=swav2d) or add volumes"
            )
        return [term for term in ("inter", "mask") if getattr(objective.weights, term) > 0]

    def build(self, model: JointModel, config: MethodSettings, data: PreparedData) -> nn.Module:
        """A copy of the method's settings (the trainer adjusts the copy: terms without data get weight 0, a
        ``trainer.max_minutes`` calibration scales its step counts)."""
        sizes = (len(data.images) if data.images is not None else 0, len(data.stacks) if data.stacks is not None else 0)
        settings = copy.deepcopy(config.method.objective)
        for term in data.dropped:  # no data for these terms (a 2D-only archive): train the others
            setattr(settings.weights, term, 0.0)
        if "inter" in data.dropped:  # no volumes: no DeepCluster-v2 memory bank of volume embeddings either
            settings.inter_clustering = "swav"
        return JointObjective(model, settings, dataset_sizes=sizes)

    def inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    def active_streams(self, objective: nn.Module, step: int) -> list[str] | None:
        return streams_of(_joint(objective).plan(step).weights)

    def before_step(self, objective: nn.Module, step: int, epoch_start: bool, seed: int) -> dict[str, float]:
        joint = _joint(objective)
        events: dict[str, float] = {}
        if epoch_start:  # DeepCluster-v2: k-means on the memory banks (nothing for SwAV)
            events = {k: float(v) for k, v in joint.cluster(torch.Generator().manual_seed(seed)).items()}
        joint.normalize_prototypes()
        return events

    def after_backward(self, objective: nn.Module, step: int) -> None:
        _joint(objective).after_backward(step)

    def step_counts(self, config: MethodSettings) -> StepCounts:
        objective = config.method.objective
        return {
            "freeze_prototypes_steps": objective.freeze_prototypes_steps,
            "queue_start_step": objective.queue_start_step,
            "stages": list(objective.stages) if objective.stages is not None else None,
        }

    def set_step_counts(self, objective: nn.Module, counts: StepCounts) -> None:
        """Sets ``config.freeze_prototypes_steps``, ``.queue_start_step``, ``.stages`` and the staged schedule's
        boundaries (the objective reads them each step)."""
        joint = _joint(objective)
        joint.config.freeze_prototypes_steps = int(counts["freeze_prototypes_steps"])
        joint.config.queue_start_step = int(counts["queue_start_step"])
        if counts["stages"] is not None:
            joint.config.stages = [int(v) for v in counts["stages"]]
            if joint.schedule is not None:
                joint.schedule.boundaries = [int(v) for v in counts["stages"]]

    def quiet_steps(self, objective: nn.Module) -> int:
        return _joint(objective).config.freeze_prototypes_steps

    def prototype_streams(self, config: MethodSettings, dropped: list[str]) -> list[str]:
        objective = config.method.objective
        return [
            stream
            for stream in ("intra", "inter")
            if getattr(objective.weights, stream) > 0
            and getattr(objective, f"{stream}_clustering") == "swav"
            and stream not in dropped
        ]

    def trains_intra_prototypes(self, config: MethodSettings) -> bool:
        return config.method.objective.intra_clustering != "simclr" and "images" in self.streams(config)

    def without_volumes_message(self, config: MethodSettings, dropped: list[str]) -> str:
        """E.g. the joint method's 2D SwAV part."""
        objective = config.method.objective
        kept = [term for term in ("intra", "sep") if getattr(objective.weights, term) > 0]
        clustering = CLUSTERING_NAMES.get(objective.intra_clustering, objective.intra_clustering)
        kind = f"2D {clustering}" if kept == ["intra"] else "2D"
        return (
            f"no 3D volume in the manifest: {' and '.join(f'L_{t}' for t in dropped)} have nothing to read and are "
            f"dropped; this run is {kind} ({', '.join(f'L_{t}' for t in kept)} only)"
        )

    def trained_modules(self, state: dict[str, Any]) -> list[str]:
        """The terms with a weight, the staged schedule's stages reached by the checkpoint's step, less the terms a
        2D-only archive dropped."""
        objective = state.get("config", {}).get("method", {}).get("objective", {})
        weights = objective.get("weights", {})
        terms = [t for t in ("intra", "inter", "mask", "sep") if float(weights.get(t, 0) or 0) > 0]
        stages = objective.get("stages")
        calibration = state.get("calibration") or {}  # a trainer.max_minutes run scaled its stages
        stages = calibration.get("stages", stages) if stages is not None else None
        if stages is not None:  # 2D until stages[0], L_mask until stages[1], then the configured terms
            step = int(state.get("step", 0))
            first, second = int(stages[0]), int(stages[1])
            staged = ["intra"] if step > 0 and first > 0 else []
            staged += ["mask"] if step > first and second > first else []
            staged += terms if step > second else []
            terms = staged
        dropped = set(state.get("streams_dropped", []))  # no volumes in the source's archive: never trained
        modules: list[str] = []
        for term in terms:
            if term not in dropped:
                modules += [m for m in TERM_MODULES[term] if m not in modules]
        return modules


def _joint(objective: nn.Module) -> JointObjective:
    if not isinstance(objective, JointObjective):
        raise TypeError(f"the joint family's hooks need a JointObjective, got {type(objective).__name__}")
    return objective
