"""The demo's closing comparison: does the short pretraining change what a linear probe reads from the encoder?

**The labelled set** (:func:`phantom_images`): chest-radiograph phantoms by the demo's own generator
(:func:`medssl.demo.data.xray_phantom`, 256 x 256 like the demo folder's), half of them with a lung nodule
(``lesion``) and half without (``no_lesion``), drawn from another seed than the demo folder's phantoms, so pretraining
never saw them. Intensities are normalised as the pretraining cache normalises an X-ray
(:func:`medssl.data.preprocess.normalise_intensity`) and each image is resized to the pretraining crop size as
:class:`medssl.downstream.probes.LabelledImageDataset` resizes it. Why radiographs: the label is a small structure at
a known place, learnable from a whole 64-pixel image (random initialisation reads it well above chance and well below
1, so a difference can show either way), and an image costs a few tens of milliseconds to generate, so a few hundred
of them give intervals narrow enough to read. Whole axial slices of the CT and MR phantoms were tried first and
dropped: their lesions are a few pixels of a 64-pixel slice, and both encoders (BatchNorm statistics as they were)
scored little above chance, with intervals too wide to tell them apart.

**The split**: by phantom (subject), half of the phantoms of each label for fitting the probe, half for the test.

**The comparison** (:func:`compare_encoders`): the pretrained encoder and the same architecture at random
initialisation, both frozen, through one protocol: BatchNorm statistics recomputed on the probe's training images
(:func:`medssl.downstream.classifier.precise_batchnorm`), then the linear probe of ``medssl finetune
protocol=linear`` (:func:`medssl.downstream.probes.extract_features`, :func:`medssl.downstream.probes.linear_probe`).
Without the first step the comparison measures BatchNorm statistics more than weights: in the demo runs measured for
the README, the random network with recomputed statistics alone scored as well as or better than the pretrained
network as it was, and recomputing them for both widened the pretrained weights' lead. The test AUROC of
each (``sklearn.metrics.roc_auc_score``) and their difference get percentile-bootstrap 95% intervals
(:func:`paired_bootstrap_auroc`): the test phantoms are resampled with replacement within each label, and both
encoders are scored on the same resample (a paired interval for the difference). The intervals cover the sampling of
test images; the randomness of the pretraining run and of the random initialisation is not in them (one run of
each). :func:`verdict` turns the difference's interval into the demo's closing sentence.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import Dataset

from medssl.data.preprocess import PreprocessConfig, normalise_intensity
from medssl.demo.data import xray_phantom
from medssl.downstream.classifier import precise_batchnorm
from medssl.downstream.probes import extract_features, linear_probe
from medssl.runtime.checks import at_least

LESION, NO_LESION = "lesion", "no_lesion"
_STREAM = 13  # random stream of the generator, apart from the demo folder's X-ray phantoms (3)


@dataclass(frozen=True)
class PhantomSetSpec:
    """The labelled set: ``n`` chest-radiograph phantoms (rounded up to even: half with a nodule), the generator's
    seed (the demo folder's phantoms use 0), and the fraction of phantoms in the test half."""

    n: int = 400
    seed: int = 1
    test_fraction: float = 0.5

    def __post_init__(self) -> None:
        at_least(2, n=self.n)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


DEFAULT_SPEC = PhantomSetSpec()


@dataclass
class LabelledPhantoms:
    """The labelled set: ``images [N, 1, size, size]`` float32 in [0, 1], and per image its ``labels``
    (``lesion`` / ``no_lesion``), ``subjects`` (the phantom, e.g. ``xray-007``) and whether it is in the ``test``
    half (bool)."""

    images: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        """``400 generated chest-radiograph phantoms (lesion 200, no_lesion 200)``."""
        labels = ", ".join(f"{name} {int((self.labels == name).sum())}" for name in (LESION, NO_LESION))
        return f"{len(self)} generated chest-radiograph phantoms ({labels})"


class _Images(Dataset):
    """``{"image": [1, size, size], "label": str}`` per row of a :class:`LabelledPhantoms` subset (for
    :func:`extract_features`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.images[index]), "label": str(self.labels[index])}


def _resized(plane: np.ndarray, size: int) -> np.ndarray:
    """``[H, W]`` -> ``[1, size, size]`` float32, bilinear and anti-aliased (as ``LabelledImageDataset``), clipped to
    [0, 1] (the anti-aliasing filter overshoots by a few 1e-7)."""
    tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    image = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return image[0].clamp_(0.0, 1.0).numpy()


def phantom_images(
    spec: PhantomSetSpec = DEFAULT_SPEC, size: int = 64, config: PreprocessConfig | None = None
) -> LabelledPhantoms:
    """Generate the labelled set of ``spec`` (deterministic for its seed) and split it by phantom.

    Args:
        spec: how many phantoms, the seed, the test fraction.
        size: the side of the returned images (the pretraining's ``data.views.global_size``).
        config: the pretraining's preprocessing (its percentiles); default ``PreprocessConfig()``.
    """
    at_least(1, size=size)
    config = config or PreprocessConfig()
    images: list[np.ndarray] = []
    labels: list[str] = []
    subjects: list[str] = []
    for index in range(1, 2 * ((spec.n + 1) // 2) + 1):
        lesion = index % 2 == 0
        rng = np.random.default_rng([spec.seed, _STREAM, index, int(lesion)])
        picture = xray_phantom(rng, lesion).array
        images.append(_resized(normalise_intensity(picture, "DX", config)[0], size))
        labels.append(LESION if lesion else NO_LESION)
        subjects.append(f"xray-{index:03d}")
    out = LabelledPhantoms(
        images=np.stack(images), labels=np.asarray(labels, dtype=str), subjects=np.asarray(subjects, dtype=str)
    )
    out.test = split_by_subject(out.subjects, out.labels, spec.test_fraction, spec.seed)
    return out


def split_by_subject(subjects: np.ndarray, labels: np.ndarray, test_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Whether each row is in the test half: within each label, a seeded permutation of the subjects, the first
    ``round(test_fraction * n)`` (at least one, and one left for training when there are two) in the test. A
    subject's rows are all on one side.

    Args:
        subjects, labels: ``[N]`` per row; a subject counts in the stratum of its first row's label.
    Returns:
        ``[N]`` bool.
    """
    subjects = np.asarray(subjects)
    first = {s: i for i, s in reversed(list(enumerate(subjects.tolist())))}
    strata: dict[str, list[str]] = {}
    for subject, i in sorted(first.items()):
        strata.setdefault(str(labels[i]), []).append(subject)
    test_subjects: set[str] = set()
    rng = np.random.default_rng([seed, 2])
    for key in sorted(strata):
        members = strata[key]
        n_test = max(1, round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(n_test, len(members) - 1)
        test_subjects.update(members[i] for i in rng.permutation(len(members))[:n_test])
    return np.asarray([s in test_subjects for s in subjects.tolist()], dtype=bool)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.3f} (95% CI {self.low:.3f} to {self.high:.3f})"

    def signed(self) -> str:
        return f"{self.estimate:+.3f} (95% CI {self.low:+.3f} to {self.high:+.3f})"


@dataclass
class BootstrapResult:
    """Paired bootstrap of two scores' AUROC: ``a``, ``b``, ``difference`` (a - b) with their intervals, the
    resampled differences (``[R]``, NaN where a resample lacked a class) and how many resamples counted."""

    a: Interval
    b: Interval
    difference: Interval
    differences: np.ndarray
    resamples: int


def paired_bootstrap_auroc(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    clusters: Sequence[str] | np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """AUROC of two scores of the same items, with percentile-bootstrap intervals, paired.

    Each resample draws the ``clusters`` (subjects; default: every item its own) with replacement within each label
    stratum (a cluster's stratum is the set of its items' labels), keeps all items of a drawn cluster, and scores
    both ``scores_a`` and ``scores_b`` on that same resample; the 95% intervals are the 2.5th and 97.5th percentiles
    of the resampled AUROCs and of their difference. Deterministic for ``seed``.

    Args:
        labels: ``[N]`` 0/1 (1: the positive class); scores_a, scores_b: ``[N]`` scores of the positive class.
    """
    at_least(1, resamples=resamples)
    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if not (len(labels) == len(a) == len(b)) or set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError("need [N] 0/1 labels with both classes and two [N] score arrays")
    clusters = np.arange(len(labels)).astype(str) if clusters is None else np.asarray(clusters).astype(str)
    strata: dict[tuple[int, ...], list[np.ndarray]] = {}
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        strata.setdefault(tuple(np.unique(labels[members]).tolist()), []).append(members)
    groups = [strata[key] for key in sorted(strata)]
    rng = np.random.default_rng([seed, 3])
    values = np.full((resamples, 2), np.nan)
    for r in range(resamples):
        index = np.concatenate([group[j] for group in groups for j in rng.integers(len(group), size=len(group))])
        y = labels[index]
        if 0 < y.sum() < len(y):
            values[r] = roc_auc_score(y, a[index]), roc_auc_score(y, b[index])
    differences = values[:, 0] - values[:, 1]
    tails = [2.5, 97.5]
    counted = int(np.isfinite(differences).sum())
    if counted == 0:
        raise ValueError("no bootstrap resample had both classes")

    def interval(estimate: float, samples: np.ndarray) -> Interval:
        low, high = np.nanpercentile(samples, tails)
        return Interval(float(estimate), float(low), float(high))

    auroc_a, auroc_b = float(roc_auc_score(labels, a)), float(roc_auc_score(labels, b))
    return BootstrapResult(
        a=interval(auroc_a, values[:, 0]),
        b=interval(auroc_b, values[:, 1]),
        difference=interval(auroc_a - auroc_b, differences),
        differences=differences,
        resamples=counted,
    )


def verdict(difference: Interval) -> str:
    """The demo's closing sentence, chosen by the interval of the AUROC difference (pretrained - random init):
    above 0, below 0, or including 0."""
    if difference.low > 0:
        return (
            f"pretraining helped at this budget: test AUROC {difference.signed()} over random initialisation; the "
            "short run changed the encoder's features in a way this probe can use"
        )
    if difference.high < 0:
        return (
            f"pretraining did worse than random initialisation at this budget: test AUROC {difference.signed()}; "
            "the pretrained features serve this probe less well than untrained ones"
        )
    return (
        f"no difference at this budget: the test AUROC difference {difference.signed()} includes 0; this short run "
        "does not show that pretraining changed what a linear probe reads from the encoder"
    )


@dataclass
class Comparison:
    """The outcome of :func:`compare_encoders`: the bootstrap (``a`` = pretrained, ``b`` = random init), the test
    probabilities of ``lesion`` per encoder, and the split's sizes (images and phantoms)."""

    bootstrap: BootstrapResult
    probabilities: dict[str, np.ndarray]
    test_labels: np.ndarray  # [M] 0/1, 1 = lesion
    n_train: int
    n_test: int
    train_subjects: int
    test_subjects: int

    @property
    def sentence(self) -> str:
        return verdict(self.bootstrap.difference)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow (``demo/auroc_pretrained``, ``..._low``, ``..._high``, ...)."""
        out: dict[str, float] = {}
        for name, interval in (
            ("pretrained", self.bootstrap.a),
            ("random_init", self.bootstrap.b),
            ("difference", self.bootstrap.difference),
        ):
            out[f"demo/auroc_{name}"] = interval.estimate
            out[f"demo/auroc_{name}_low"] = interval.low
            out[f"demo/auroc_{name}_high"] = interval.high
        return out

    def figure(self) -> Any:
        """ROC curves of both encoders on the test images, and the bootstrap distribution of the difference."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from sklearn.metrics import RocCurveDisplay

        fig = Figure(figsize=(10, 4.2), layout="constrained")  # outside pyplot, as medssl.train.pictures
        FigureCanvasAgg(fig)
        roc, hist = fig.subplots(1, 2)
        for (name, probabilities), interval in zip(
            self.probabilities.items(), (self.bootstrap.a, self.bootstrap.b), strict=True
        ):
            label = f"{name} (95% CI {interval.low:.3f} to {interval.high:.3f})"
            RocCurveDisplay.from_predictions(self.test_labels, probabilities, ax=roc, name=label)
        roc.legend(loc="lower right", fontsize=8)
        roc.set_title(f"linear probe of 'lesion', {self.n_test} test images")
        hist.hist(self.bootstrap.differences[np.isfinite(self.bootstrap.differences)], bins=40, color="0.6")
        diff = self.bootstrap.difference
        for x, style in ((diff.low, "--"), (diff.high, "--"), (diff.estimate, "-")):
            hist.axvline(x, color="C0", linestyle=style)
        hist.axvline(0.0, color="k", linewidth=0.8)
        hist.set_xlabel("AUROC pretrained - random init")
        hist.set_title(f"{self.bootstrap.resamples} bootstrap resamples: {diff.signed()}", fontsize=9)
        return fig


def compare_encoders(
    encoders: dict[str, nn.Module],
    data: LabelledPhantoms,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resamples: int = 1000,
    progress: bool = False,
    batchnorm_from_training: bool = True,
) -> Comparison:
    """Fit the linear probe on the frozen features of each encoder (``{"pretrained": ..., "random init": ...}``,
    the first is ``a`` of the bootstrap) on the training half of ``data`` and score its test half.

    With ``batchnorm_from_training`` (the default), each encoder is copied and its BatchNorm running statistics are
    recomputed on the training half's images (:func:`medssl.downstream.classifier.precise_batchnorm`) before its
    features are taken; the weights stay frozen and the callers' networks untouched. Both encoders then normalise
    these images alike, and the comparison is between their weights: a random network's statistics are the
    initial 0 and 1, a pretrained one's were gathered over the changing weights and augmented crops of pretraining,
    and either mis-normalises these images in its own way.

    Raises:
        ValueError: a split without both labels.
    """
    if len(encoders) != 2:
        raise ValueError(f"need two encoders to compare, got {list(encoders)}")
    train, test = ~data.test, data.test
    for name, mask in (("training", train), ("test", test)):
        if set(data.labels[mask].tolist()) != {LESION, NO_LESION}:
            raise ValueError(f"the {name} half of the labelled phantoms needs both labels")
    probabilities: dict[str, np.ndarray] = {}
    test_labels = np.zeros(0, int)
    train_images = torch.from_numpy(data.images[train])
    for name, encoder in encoders.items():
        network = copy.deepcopy(encoder).to(device) if batchnorm_from_training else encoder.to(device)
        if batchnorm_from_training:
            precise_batchnorm(network, train_images, 64, torch.device(device))
        kwargs = {"device": device, "progress": progress}
        train_x, train_y = extract_features(network, _Images(data.images[train], data.labels[train]), **kwargs)
        test_x, test_y = extract_features(network, _Images(data.images[test], data.labels[test]), **kwargs)
        result = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
        positive = result.class_names.index(LESION)
        probabilities[name] = result.probabilities[:, positive]
        test_labels = (result.labels == positive).astype(int)
    (a, b) = probabilities.values()
    bootstrap = paired_bootstrap_auroc(test_labels, a, b, data.subjects[test], resamples=resamples, seed=seed)
    return Comparison(
        bootstrap=bootstrap,
        probabilities=probabilities,
        test_labels=test_labels,
        n_train=int(train.sum()),
        n_test=int(test.sum()),
        train_subjects=len(set(data.subjects[train].tolist())),
        test_subjects=len(set(data.subjects[test].tolist())),
    )


__all__ = [
    "DEFAULT_SPEC",
    "LESION",
    "NO_LESION",
    "BootstrapResult",
    "Comparison",
    "Interval",
    "LabelledPhantoms",
    "PhantomSetSpec",
    "compare_encoders",
    "paired_bootstrap_auroc",
    "phantom_images",
    "split_by_subject",
    "verdict",
]
