"""Run-health alarms: turn the logged health metrics into one clear warning while a run can still be stopped.

:class:`UniformPredictionAlarm` watches the SwAV prediction entropy (``health/*_prediction_entropy``, the mean entropy
of ``softmax(scores / temperature)`` divided by ``ln K``, :class:`medssl.objectives.swav.SwAVLoss`) and the gap
between ``ln K`` and the loss (``health/*_gap_to_uniform``). When the entropy stays at ``threshold`` or above, or the
gap below ``gap_threshold``, for ``patience`` consecutive logging windows, the predictions are (nearly) uniform over
the prototypes: the swapped-prediction loss sits at or near ``ln K`` and the encoder receives little clustering
signal. The soft form (entropy 0.94-0.97, loss a few tenths of a nat under ``ln K``) escapes an entropy threshold,
hence the gap. This is SwAV's trivial
solution (Caron et al., NeurIPS 2020; the facebookresearch/swav README calls a loss stuck at ``ln(nmb_prototypes)`` a
collapse); small batches and few prototypes make it likely. :func:`frozen_prototypes_warning` checks a run's
configuration before it starts: SwAV prototypes frozen for the whole run never train. Pure bookkeeping: no I/O, the
trainer prints and logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["GAP_THRESHOLD", "UniformPredictionAlarm", "frozen_prototypes_warning"]

# ln K - loss (nats) under which SwAV counts as stuck: calibrated in BENCHMARKS.md ("health alarm calibration").
GAP_THRESHOLD = 0.5

ADVICE = {
    "intra": (
        "try a queue so that queue + batch covers the prototypes (method.objective.queue_length, e.g. 480 for a batch "
        "of 32 and 512 prototypes), a sharper Sinkhorn (method.objective.epsilon=0.03) or a larger batch "
        "(trainer.batch.images). At short budgets the loss stays near ln K even when the features are good: with the "
        "KoLeo term on (method.objective.koleo_weight, 0.1 by default) check the embedding uniformity, which falls "
        "in a good run and rises into a cone in a collapsed one; for a short CPU budget method=simclr (or "
        "method.objective.intra_clustering=simclr under the 3D terms) learns where SwAV has not started "
        "(BENCHMARKS.md, issue 14 levers)"
    ),
    "inter": (
        "try a queue of volume embeddings (method.objective.inter_queue_length), a sharper Sinkhorn "
        "(method.objective.epsilon=0.03), fewer volume prototypes (model.inter_prototypes) or more stacks per batch "
        "(trainer.batch.stacks)"
    ),
}


@dataclass
class UniformPredictionAlarm:
    """Fires once per stream (``intra``, ``inter``) when its predictions stay uniform.

    Args:
        threshold: normalised prediction entropy counted as uniform (1.0 = exactly uniform; a freshly initialised
            ResNet-18 + projector measured 0.94 with 512 prototypes and a temperature of 0.1 on Kermany crops).
        gap_threshold: ``ln K − loss`` (nats) under which the loss counts as stuck at the trivial solution.
        patience: consecutive logging windows at or above ``threshold`` before the alarm fires.
        start_step: windows logged before this step are ignored (learning-rate warm-up).
    """

    threshold: float = 0.98
    gap_threshold: float = GAP_THRESHOLD
    patience: int = 5
    start_step: int = 0
    _streak: dict[str, int] = field(default_factory=dict, init=False)
    fired: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or self.patience < 1 or self.start_step < 0:
            raise ValueError(
                f"threshold must be in (0, 1], patience >= 1 and start_step >= 0, got {self.threshold}, "
                f"{self.patience}, {self.start_step}"
            )
        if not self.gap_threshold >= 0:
            raise ValueError(f"gap_threshold must be >= 0, got {self.gap_threshold}")

    def update(self, step: int, metrics: Mapping[str, float]) -> list[tuple[str, str]]:
        """Feed one logging window's metrics; returns ``(stream, warning)`` for the alarms that fire now (each
        stream at most once per run)."""
        messages = []
        for stream in ("intra", "inter"):
            value = metrics.get(f"health/{stream}_prediction_entropy")
            gap = metrics.get(f"health/{stream}_gap_to_uniform")
            if (value is None and gap is None) or step < self.start_step or stream in self.fired:
                continue
            uniform = value is not None and value >= self.threshold
            near = gap is not None and gap < self.gap_threshold
            self._streak[stream] = self._streak.get(stream, 0) + 1 if uniform or near else 0
            if self._streak[stream] >= self.patience:
                self.fired.add(stream)
                if uniform:
                    what = f"normalised prediction entropy {value:.3f} >= {self.threshold:g}"
                else:
                    what = f"loss only {gap:.2f} nat below ln K, under {self.gap_threshold:g}"
                messages.append(
                    (
                        stream,
                        f"health warning at step {step}: L_{stream} predictions are (nearly) uniform over the "
                        f"prototypes ({what} for {self.patience} logging windows): the {stream} clustering sits at "
                        f"SwAV's trivial solution and teaches the encoder little. "
                        f"{ADVICE[stream][0].upper()}{ADVICE[stream][1:]}.",
                    )
                )
        return messages


def frozen_prototypes_warning(swav_streams: Sequence[str], freeze_steps: int, max_steps: int) -> str | None:
    """The warning for a run whose SwAV prototypes stay frozen from its first to its last step, else ``None``.

    SwAV freezes the prototypes for its first epoch (``freeze_prototypes_niters``, Caron et al., NeurIPS 2020): a
    small share of a long schedule. A short run (a CPU budget, a smoke test) can end before the freeze does; its
    encoder then only learns to cluster around the random initial prototypes.

    Args:
        swav_streams: the streams clustered by SwAV prototypes in this run (``intra``, ``inter``; weight > 0).
        freeze_steps: ``method.objective.freeze_prototypes_steps``.
        max_steps: ``trainer.max_steps``.
    """
    if not swav_streams or freeze_steps < max_steps:
        return None
    return (
        f"configuration warning: the {' and '.join(f'L_{s}' for s in swav_streams)} prototypes are frozen for "
        f"{freeze_steps} steps (method.objective.freeze_prototypes_steps) but the run has {max_steps} "
        f"(trainer.max_steps): they never train. Set method.objective.freeze_prototypes_steps below max_steps, e.g. "
        f"{max(1, max_steps // 10)} (a tenth of the run)."
    )
