"""Classification on frozen features: feature extraction, linear and kNN probes, metrics.

* :class:`LabelledImageDataset`: one un-augmented ``[1, size, size]`` image per labelled cached item.
* :func:`extract_features`: run a frozen network over such a dataset (eval mode, no gradients).
* :func:`linear_probe`: standardised features, multinomial logistic regression fitted with L-BFGS.
* :func:`knn_probe`: cosine-similarity kNN with temperature-weighted votes (Wu et al., 2018; DINO).
* :func:`classification_metrics`: accuracy, balanced accuracy, AUROC, per-class recall.
* :func:`label_fraction_subset`, :func:`check_disjoint_subjects`: label-efficiency subsets and the
  patient-disjointness check of evaluation splits.

Class names are the sorted distinct training labels; class index ``i`` is ``class_names[i]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.data.datasets import CachedItem
from medssl.data.geometry import slice_to_display
from medssl.data.manifest import ManifestRow
from medssl.downstream.common import check_disjoint
from medssl.runtime.checks import at_least
from medssl.runtime.progress import progress as progress_of

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Grid of L2 penalties searched by :func:`linear_probe` (on standardised features)."""
DEFAULT_WEIGHT_DECAY = 1e-2
"""L2 penalty used when the training set is too small to carve a validation split."""


class LabelledImageDataset(Dataset):
    """Un-augmented 2D images of labelled cached items, resized to ``size x size``.

    * 2D rows: channel 0 of the cached ``[C, H, W]`` array.
    * 3D rows: channel 0, the middle axial slice (index ``Z // 2`` along axis 2 of ``[C, X, Y, Z]``), put in
      radiological display orientation with :func:`medssl.data.geometry.slice_to_display`.

    Intensities are the cache's, scaled to float32 in [0, 1] (``entry.scale``); the plane is resized with
    bilinear, anti-aliased interpolation. Rows with an empty ``label`` are skipped; their count is
    ``skipped_unlabelled``.

    ``__getitem__`` returns ``{"image": [1, size, size] float32, "label": str, "index": int}``.
    """

    def __init__(self, items: Sequence[CachedItem], size: int) -> None:
        at_least(1, size=size)
        self.size = int(size)
        self.items = [item for item in items if item.row.label]
        self.skipped_unlabelled = len(items) - len(self.items)
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[str]:
        return [item.row.label for item in self.items]

    @property
    def rows(self) -> list[ManifestRow]:
        return [item.row for item in self.items]

    def plane(self, index: int) -> np.ndarray:
        """The un-resized plane ``[H, W]`` float32 in [0, 1] (display orientation for volumes)."""
        item = self.items[index]
        array = self._arrays.get(index)
        if array is None:
            array = item.entry.array()
            self._arrays[index] = array
        if item.row.dims == 2:
            plane = np.asarray(array[0])
        else:
            plane = slice_to_display(np.asarray(array[0, :, :, array.shape[3] // 2]))
        return np.ascontiguousarray(plane, dtype=np.float32) * np.float32(item.entry.scale)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plane = torch.from_numpy(self.plane(index))[None, None]
        image = F.interpolate(plane, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return {"image": image[0], "label": self.items[index].row.label, "index": index}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


@torch.no_grad()
def extract_features(
    network: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of every sample of ``dataset``, in order.

    The network runs in eval mode without gradients; every submodule's train/eval flag is restored afterwards.
    Outputs with more than two dimensions are flattened.

    Args:
        network: maps images ``[B, C, H, W]`` to features ``[B, D]`` (e.g. an encoder or MONAI ``ResNet`` with
            ``feed_forward=False``). It must already be on ``device``.
        dataset: yields ``{"image": [C, H, W], "label": str}`` (e.g. :class:`LabelledImageDataset`).
        progress, desc: report the images done (:func:`medssl.runtime.progress.progress`) under this name.

    Returns:
        features ``[N, D]`` float32 and labels ``[N]`` (str).
    """
    modes = [(module, module.training) for module in network.modules()]
    network.eval()
    features: list[np.ndarray] = []
    labels: list[str] = []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        total = len(dataset) if isinstance(dataset, Sized) else None
        with progress_of(total=total, desc=desc, unit="image", enabled=progress, leave=None) as bar:
            for batch in loader:
                out = network(batch["image"].to(device))
                features.append(out.flatten(1).float().cpu().numpy())
                labels.extend(str(label) for label in batch["label"])
                bar.update(len(batch["label"]))
    finally:
        for module, mode in modes:
            module.training = mode
    if not features:
        raise ValueError("the dataset is empty: no features to extract")
    return np.concatenate(features), np.asarray(labels, dtype=str)


@dataclass
class ProbeResult:
    """Outcome of a probe on a test set.

    Attributes:
        probabilities: class probabilities ``[N_test, K]``.
        predictions: predicted class indices ``[N_test]``.
        labels: true class indices ``[N_test]``.
        class_names: the ``K`` sorted training class names.
        metrics: :func:`classification_metrics` of the test predictions.
        weight_decay: the linear probe's L2 penalty (``None`` for kNN).
        validation_losses: validation cross-entropy per searched penalty (empty when not searched).
    """

    probabilities: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    metrics: dict[str, Any]
    weight_decay: float | None = None
    validation_losses: dict[float, float] = field(default_factory=dict)

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], **extra: Any) -> ProbeResult:
        """The result of test probabilities ``[M, K]`` against true class indices ``[M]``: argmax predictions and
        :func:`classification_metrics`."""
        return cls(
            probabilities=probabilities,
            predictions=probabilities.argmax(axis=1),
            labels=labels,
            class_names=class_names,
            metrics=classification_metrics(probabilities, labels, class_names),
            **extra,
        )


def encode_labels(
    train_y: Sequence[str] | np.ndarray, test_y: Sequence[str] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted class names (from train) and integer labels of train ``[N]`` and test ``[M]``."""
    train_y = np.asarray(train_y, dtype=str)
    test_y = np.asarray(test_y, dtype=str)
    class_names = sorted(set(train_y.tolist()))
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 classes in the training labels, got {class_names}")
    unknown = sorted(set(test_y.tolist()) - set(class_names))
    if unknown:
        raise ValueError(f"test labels {unknown} do not occur in the training labels {class_names}")
    lookup = {name: i for i, name in enumerate(class_names)}
    return (
        class_names,
        np.asarray([lookup[y] for y in train_y], dtype=np.int64),
        np.asarray([lookup[y] for y in test_y], dtype=np.int64),
    )


def _check_features(x: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{name} features must be [N, D] with N = {len(y)} labels, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or infinite values")
    return x


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression: mean cross-entropy + ``weight_decay / 2 * ||W||^2`` (bias not penalised).

    ``x`` ``[N, D]`` float64, ``y`` ``[N]`` int64. Zero-initialised and full-batch L-BFGS: deterministic.
    """
    model = nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return model


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Seeded stratified split of indices into (fit, validation); ``None`` if some class has < 2 samples."""
    rng = np.random.default_rng([seed, 1])
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            return None
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[str] | np.ndarray,
    test_x: np.ndarray,
    test_y: Sequence[str] | np.ndarray,
    seed: int = 0,
    weight_decay: float | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    max_iter: int = 200,
) -> ProbeResult:
    """Linear probe: multinomial logistic regression on standardised frozen features.

    Features are standardised with the training mean and standard deviation (a constant feature gets
    std 1). The L2 penalty on the weights is ``weight_decay`` when given; otherwise it is chosen from
    ``weight_decays`` by the lowest cross-entropy on a validation split of ``val_fraction`` of the training
    set per class (stratified, drawn from ``seed``), ties to the larger penalty; the probe is then refitted
    on the whole training set. Training sets with a class of fewer than 2 samples use
    :data:`DEFAULT_WEIGHT_DECAY`. Fitting is full-batch L-BFGS in float64 from zeros, so the result depends
    only on the data and ``seed``.

    Args:
        train_x: ``[N, D]`` training features; train_y: ``[N]`` labels (str).
        test_x: ``[M, D]`` test features; test_y: ``[M]`` labels, all among the training labels.

    Returns:
        :class:`ProbeResult` with test probabilities ``[M, K]`` and metrics.
    """
    class_names, y_train, y_test = encode_labels(train_y, test_y)
    x_train = _check_features(train_x, y_train, "train")
    x_test = _check_features(test_x, y_test, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test feature dimensions differ: {x_train.shape[1]} vs {x_test.shape[1]}")
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    xt = torch.from_numpy((x_train - mean) / std)
    xs = torch.from_numpy((x_test - mean) / std)
    yt = torch.from_numpy(y_train)
    k = len(class_names)

    losses: dict[float, float] = {}
    if weight_decay is None:
        split = _stratified_holdout(y_train, val_fraction, seed) if len(weight_decays) > 1 else None
        if split is None:
            weight_decay = float(weight_decays[0]) if len(weight_decays) == 1 else DEFAULT_WEIGHT_DECAY
        else:
            fit, val = (torch.from_numpy(s) for s in split)
            for wd in sorted(float(w) for w in weight_decays):
                model = _fit_logistic(xt[fit], yt[fit], k, wd, max_iter)
                with torch.no_grad():
                    losses[wd] = float(F.cross_entropy(model(xt[val]), yt[val]))
            best = min(losses.values())
            weight_decay = max(wd for wd, loss in losses.items() if loss <= best + 1e-12)
    at_least(0, weight_decay=weight_decay)

    model = _fit_logistic(xt, yt, k, float(weight_decay), max_iter)
    with torch.no_grad():
        probabilities = torch.softmax(model(xs), dim=1).numpy()
    return ProbeResult.of(
        probabilities, y_test, class_names, weight_decay=float(weight_decay), validation_losses=losses
    )


def knn_probe(
    train_x: np.ndarray,
    train_y: Sequence[str] | np.ndarray,
    test_x: np.ndarray,
    test_y: Sequence[str] | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> ProbeResult:
    """Weighted kNN classifier on L2-normalised features (Wu et al., 2018; as in DINO).

    Each test sample's ``k`` most cosine-similar training samples (``min(k, N)``) vote for their class with
    weight ``exp(similarity / temperature)``; the class probabilities are the normalised votes.

    Args:
        train_x: ``[N, D]`` training features; train_y: ``[N]`` labels (str).
        test_x: ``[M, D]`` test features; test_y: ``[M]`` labels, all among the training labels.

    Returns:
        :class:`ProbeResult` with test probabilities ``[M, K]`` and metrics.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    class_names, y_train, y_test = encode_labels(train_y, test_y)
    train = F.normalize(torch.from_numpy(_check_features(train_x, y_train, "train")).double(), dim=1)
    test = F.normalize(torch.from_numpy(_check_features(test_x, y_test, "test")).double(), dim=1)
    n_classes = len(class_names)
    neighbours = min(k, len(train))
    targets = torch.from_numpy(y_train)
    chunks = []
    for start in range(0, len(test), chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # [m, N]
        top, index = similarity.topk(neighbours, dim=1)
        weights = torch.exp((top - top[:, :1]) / temperature)  # the common factor cancels on normalising
        votes = torch.zeros(len(top), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, targets[index], weights)
        chunks.append(votes / votes.sum(dim=1, keepdim=True))
    probabilities = torch.cat(chunks).numpy()
    return ProbeResult.of(probabilities, y_test, class_names)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUROC and per-class recall.

    Predictions are ``argmax`` of the probabilities. AUROC uses :func:`monai.metrics.compute_roc_auc`: for two
    classes it scores the probability of class index 1 (the second of the sorted class names, e.g.
    ``PNEUMONIA`` in ``["NORMAL", "PNEUMONIA"]``) as the positive class; for more classes it is the macro
    average of one-vs-rest AUROCs.

    Args:
        probabilities: ``[N, K]`` class probabilities (or scores).
        labels: ``[N]`` true class indices in ``[0, K)``.
        class_names: the ``K`` class names.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auroc", "recall": {class name: recall}}``.

    Raises:
        ValueError: on mismatched shapes, or when a class has no sample in ``labels`` (its recall and AUROC are
            undefined); the message names the missing classes.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    names = list(class_names)
    n_classes = len(names)
    if n_classes < 2 or probabilities.ndim != 2 or probabilities.shape != (len(labels), n_classes):
        raise ValueError(
            f"probabilities must be [N, K] with N = {len(labels)} labels and K = {n_classes} >= 2 classes, "
            f"got shape {probabilities.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or ((labels < 0) | (labels >= n_classes)).any():
        raise ValueError(f"labels must be [N] integer class indices in [0, {n_classes})")
    counts = np.bincount(labels, minlength=n_classes)
    missing = [names[c] for c in range(n_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"class(es) {missing} have no sample in the evaluation labels; recall and AUROC are undefined")
    predictions = probabilities.argmax(axis=1)
    recall = {names[c]: float((predictions[labels == c] == c).mean()) for c in range(n_classes)}
    if n_classes == 2:
        auroc = compute_roc_auc(torch.from_numpy(probabilities[:, 1]), torch.from_numpy(labels == 1).double())
    else:
        one_hot = torch.from_numpy(np.eye(n_classes)[labels])
        auroc = compute_roc_auc(torch.from_numpy(probabilities), one_hot, average="macro")
    return {
        "n": len(labels),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "auroc": float(auroc),
        "recall": recall,
    }


def label_fraction_subset(labels: Sequence[str] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified subset with ``fraction`` of each class (rounded, at least one per class).

    Deterministic for ``seed``; for one seed, smaller fractions give nested subsets (each class's samples are
    taken in the order of one seeded permutation). ``fraction == 1`` returns every index.

    Args:
        labels: ``[N]`` class labels (any hashable values, e.g. str).
        fraction: in ``(0, 1]``.

    Returns:
        sorted indices ``[n]`` int64.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    chosen = []
    for i, c in enumerate(np.unique(labels)):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, i]).permutation(members)
        chosen.append(order[: max(1, round(fraction * len(members)))])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def check_disjoint_subjects(train_rows: Iterable[ManifestRow], test_rows: Iterable[ManifestRow]) -> None:
    """Raise if a subject (patient) has rows on both sides: evaluation splits must be patient-disjoint.

    Rows with an empty ``subject`` are not compared.

    Raises:
        ValueError: naming how many subjects are shared (and a few of them).
    """
    check_disjoint([row.subject for row in train_rows], [row.subject for row in test_rows])
