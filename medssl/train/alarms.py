"""Run-health alarms: turn the logged health metrics into one clear message while a run can still be stopped.

:class:`UniformPredictionAlarm` watches, per SwAV stream (``intra``, ``inter``), the prediction entropy
(``health/*_prediction_entropy``, the mean entropy of ``softmax(scores / temperature)`` divided by ``ln K``,
:class:`medssl.objectives.swav.SwAVLoss`), the gap between ``ln K`` and the loss (``health/*_gap_to_uniform``) and,
for the 2D stream, the uniformity of the embeddings (``health/intra_uniformity``, Wang & Isola, ICML 2020).

* **Stuck**: the entropy stays at ``threshold`` or above, or the gap below ``gap_threshold``, for ``patience``
  consecutive logging windows: the predictions are (nearly) uniform over the prototypes and the swapped-prediction
  loss sits at or near ``ln K``, SwAV's trivial solution (Caron et al., NeurIPS 2020; the facebookresearch/swav
  README calls a loss stuck at ``ln(nmb_prototypes)`` a collapse). The soft form (entropy 0.94-0.97, loss a few
  tenths of a nat under ``ln K``) escapes an entropy threshold, hence the gap.
* **Cone**: the 2D embeddings' uniformity stays above ``cone_threshold`` for ``patience`` windows: they are drawn
  together, and the encoder loses features (2D SwAV without a spreading term on Kermany: uniformity -2.5 -> -0.5,
  kNN AUROC 0.10 under random init; BENCHMARKS.md, issue 14).

A cone is a **health warning** (tag ``health_warning_<stream>``). A stuck stream is a warning too, unless the 2D
embeddings are measured and spread (uniformity at or under ``cone_threshold``): then it is a **health note** (tag
``health_note_intra``), since at short budgets the clustering of a healthy run has not started yet and its
features still beat random init (the loss says little there; the probes tell). :func:`frozen_prototypes_warning`
checks a run's configuration before it starts: SwAV prototypes frozen for the whole run never train. Pure
bookkeeping: no I/O, the trainer prints and logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CONE_THRESHOLD",
    "FLAT_CODES_ROOM",
    "GAP_THRESHOLD",
    "UniformPredictionAlarm",
    "by_predicting_crop",
    "codes_or_predictions",
    "frozen_prototypes_warning",
]

# ln K - loss (nats) under which SwAV counts as stuck: calibrated in BENCHMARKS.md ("health alarm calibration").
GAP_THRESHOLD = 0.5
# Uniformity (Wang & Isola, t = 2) of the 2D clustering stream's embeddings above which they count as drawn into a
# cone: calibrated in BENCHMARKS.md ("health alarm calibration") on collapsed runs (-0.95 to -0.50 after the first
# tenth) and healthy ones (-2.03 at most after the first tenth).
CONE_THRESHOLD = -1.75
# ln K − H(codes) (nats) under which a stuck stream's Sinkhorn targets count as flat: SwAV's loss is H(codes) +
# KL(codes || predictions), so it can never fall further than this under ln K, whatever the encoder learns; 1 nat is
# the gap issue 14 asks of a healthy run (BENCHMARKS.md: Kermany's codes at epsilon 0.05 left 0.56 nat of room).
FLAT_CODES_ROOM = 1.0
CONE_ADVICE = (
    "raise the spreading term (method.objective.koleo_weight, 0.1 by default; 0 turns it off) or add one "
    "(method.objective.uniformity_weight), or for a short CPU budget use method=simclr (or "
    "method.objective.intra_clustering=simclr under the 3D terms), whose negatives keep the embeddings apart"
)

ADVICE = {
    "intra": (
        "try a larger batch without the small crops (trainer.batch.images=256 data.views.n_local=0, with "
        "model.max_pool=true to pay for it: on Kermany the loss ended 1.03-1.19 nat under ln K over three seeds, with "
        "the two local crops 0.35-0.41), a queue so that queue + batch covers the prototypes "
        "(method.objective.queue_length, e.g. 480 for a batch of 32 and 512 prototypes) or a sharper Sinkhorn "
        "(method.objective.epsilon=0.03); for a short CPU budget method=simclr (or "
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
    """Fires once per stream (``intra``, ``inter``): a warning when its predictions stay uniform or its 2D
    embeddings stay in a cone, a note when its predictions stay uniform while its 2D embeddings are spread.

    Args:
        threshold: normalised prediction entropy counted as uniform (1.0 = exactly uniform; a freshly initialised
            ResNet-18 + projector measured 0.94 with 512 prototypes and a temperature of 0.1 on Kermany crops).
        gap_threshold: ``ln K − loss`` (nats) under which the loss counts as stuck at the trivial solution.
        cone_threshold: ``health/intra_uniformity`` above which the 2D embeddings count as drawn into a cone (the
            volume embeddings of ``inter`` start near one point and are not judged by it).
        patience: consecutive logging windows in a state before its message.
        start_step: windows logged before this step are ignored (learning-rate warm-up, prototype freeze).
    """

    threshold: float = 0.98
    gap_threshold: float = GAP_THRESHOLD
    cone_threshold: float = CONE_THRESHOLD
    patience: int = 5
    start_step: int = 0
    _stuck: dict[str, int] = field(default_factory=dict, init=False)
    _cone: dict[str, int] = field(default_factory=dict, init=False)
    fired: set[str] = field(default_factory=set, init=False)
    noted: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or self.patience < 1 or self.start_step < 0:
            raise ValueError(
                f"threshold must be in (0, 1], patience >= 1 and start_step >= 0, got {self.threshold}, "
                f"{self.patience}, {self.start_step}"
            )
        if not self.gap_threshold >= 0:
            raise ValueError(f"gap_threshold must be >= 0, got {self.gap_threshold}")
        if not -10 < self.cone_threshold < 0:  # uniformity with t = 2 lies in [-4, 0]
            raise ValueError(f"cone_threshold must be a uniformity in (-10, 0), got {self.cone_threshold}")

    def update(self, step: int, metrics: Mapping[str, float]) -> list[tuple[str, str]]:
        """Feed one logging window's metrics; returns ``(tag, message)`` for what fires now: tag
        ``health_warning_<stream>`` (at most once per stream and run) or ``health_note_<stream>`` (likewise)."""
        messages = []
        for stream in ("intra", "inter"):
            value = metrics.get(f"health/{stream}_prediction_entropy")
            gap = metrics.get(f"health/{stream}_gap_to_uniform")
            if (value is None and gap is None) or step < self.start_step or stream in self.fired:
                continue
            spread = metrics.get(f"health/{stream}_uniformity") if stream == "intra" else None
            uniform = value is not None and value >= self.threshold
            near = gap is not None and gap < self.gap_threshold
            cone = spread is not None and spread > self.cone_threshold
            self._stuck[stream] = self._stuck.get(stream, 0) + 1 if uniform or near else 0
            self._cone[stream] = self._cone.get(stream, 0) + 1 if cone else 0
            stuck = self._stuck[stream] >= self.patience
            what = ""
            if uniform:
                what = f"normalised prediction entropy {value:.3f} >= {self.threshold:g}"
            elif near:
                what = f"loss only {gap:.2f} nat below ln K, under {self.gap_threshold:g}"
            if self._cone[stream] >= self.patience:
                self.fired.add(stream)
                also = f"; the predictions are (nearly) uniform over the prototypes too ({what})" if stuck else ""
                messages.append(
                    (
                        f"health_warning_{stream}",
                        f"health warning at step {step}: the L_{stream} embeddings are drawn into a cone (uniformity "
                        f"{spread:.2f} above {self.cone_threshold:g} for {self.patience} logging windows{also}): the "
                        f"clustering collapses and the encoder loses features (2D SwAV runs like this fell below "
                        f"random init, BENCHMARKS.md issue 14). {CONE_ADVICE[0].upper()}{CONE_ADVICE[1:]}.",
                    )
                )
            elif stuck and spread is None:
                self.fired.add(stream)
                messages.append(
                    (
                        f"health_warning_{stream}",
                        f"health warning at step {step}: L_{stream} predictions are (nearly) uniform over the "
                        f"prototypes ({what} for {self.patience} logging windows): the {stream} clustering sits at "
                        f"SwAV's trivial solution and teaches the encoder little."
                        f"{codes_or_predictions(stream, metrics)} {ADVICE[stream][0].upper()}{ADVICE[stream][1:]}.",
                    )
                )
            elif stuck and stream not in self.noted:
                self.noted.add(stream)
                messages.append(
                    (
                        f"health_note_{stream}",
                        f"health note at step {step}: L_{stream} predictions are (nearly) uniform over the prototypes "
                        f"({what} for {self.patience} logging windows): the clustering has not started, as is usual "
                        f"at a short budget. The embeddings are spread (uniformity {spread:.2f}, at or under "
                        f"{self.cone_threshold:g}), so the encoder still learns: such 2D SwAV runs were level with or "
                        f"above random init on Kermany and MedNIST (BENCHMARKS.md, issue 14); the probes tell, not "
                        f"the loss. A warning follows if the embeddings draw into a cone."
                        f"{codes_or_predictions(stream, metrics)} To start the clustering: {ADVICE[stream]}.",
                    )
                )
        return messages


def codes_or_predictions(stream: str, metrics: Mapping[str, float]) -> str:
    """Which side holds a stuck stream's loss near ``ln K``, as a sentence ('' when the window lacks the metrics).

    With the loss ``L`` (``loss/<stream>``), its gap ``ln K − L`` and the codes' entropy ``H`` (nats), the room
    ``ln K − H`` is the most the gap can become and ``L − H`` is the KL by which the predictions miss the codes: flat
    codes (room under :data:`FLAT_CODES_ROOM`) are the Sinkhorn's doing (epsilon, rows per prototype), sharp codes
    that the predictions miss are the encoder's, which has not learnt to predict them yet.
    """
    loss = metrics.get(f"loss/{stream}")
    gap = metrics.get(f"health/{stream}_gap_to_uniform")
    codes = metrics.get(f"health/{stream}_code_entropy")
    if loss is None or gap is None or codes is None:
        return ""
    room, miss = loss + gap - codes, loss - codes
    if room < FLAT_CODES_ROOM:
        holder = (
            f" The Sinkhorn targets themselves are flat: their entropy, {codes:.2f} nats, leaves the loss at most "
            f"{room:.2f} nat under ln K whatever the encoder learns; a smaller method.objective.epsilon sharpens them."
        )
    else:
        holder = (
            f" The Sinkhorn targets are sharp enough (entropy {codes:.2f} nats, room for the loss to fall {room:.2f} "
            f"nat under ln K) and the predictions miss them by {miss:.2f} nats (KL): the encoder has not learnt to "
            f"predict them yet, which takes steps; a smaller epsilon (one of the levers below) lowers the loss by "
            f"sharpening the codes and widens such a KL (Kermany, from epsilon 0.05: 0.45 -> 1.85 nats at 0.02 and a "
            f"batch of 32, 0.76 -> 2.1 at 0.03 and 256), and sharper predictions did not close it either "
            f"(BENCHMARKS.md, issue 14, rounds 3 and 6)."
        )
    return holder + by_predicting_crop(stream, metrics)


def by_predicting_crop(stream: str, metrics: Mapping[str, float]) -> str:
    """The loss's gap to ``ln K`` over the global crops' and over the local crops' predictions, as a sentence ('' when
    the window lacks either split, e.g. without local crops)."""
    assigned = metrics.get(f"health/{stream}_gap_to_uniform_assigned")
    other = metrics.get(f"health/{stream}_gap_to_uniform_other")
    if assigned is None or other is None:
        return ""
    return (
        f" By predicting crop: the global crops predict each other's codes {assigned:.2f} nat under ln K, the local "
        f"crops {other:.2f}."
    )


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
