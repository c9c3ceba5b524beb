"""Figures for the run's artifacts: training curves, embedding projections, prototype galleries.

Every function returns a ``matplotlib.figure.Figure`` built directly (with an Agg canvas), never
through ``pyplot``: no global figure state, no GUI backend, nothing written to disk (the
``Tracker`` logs the figures). Outputs are deterministic for fixed inputs.

``embedding_snapshot`` gathers the un-augmented samples, encoder features and prototype
assignments these pictures show; only modality and label strings travel with them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medssl.data.datasets import UnreadableEntryError
from medssl.runtime.checks import at_least

__all__ = [
    "MAX_CATEGORIES",
    "Snapshot",
    "curves_figure",
    "embedding_projection_figure",
    "embedding_snapshot",
    "pca_2d",
    "prototype_gallery_figure",
    "prototype_usage_figure",
    "snapshot_figures",
]

MAX_CATEGORIES = 20  # legend entries per colouring, "other" included
OTHER_COLOUR = (0.6, 0.6, 0.6, 1.0)
UNLABELLED = "unlabelled"
OTHER = "other"

# Panels of ``curves_figure`` for ``health/*`` keys, in order; a key goes to the first that matches.
_HEALTH_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("effective prototypes", lambda k: "effective_prototypes" in k),
    ("alignment / uniformity", lambda k: "alignment" in k or "uniformity" in k),
    ("embedding std", lambda k: "std" in k),
)


def _category_colours() -> list[tuple[float, ...]]:
    """19 distinct non-grey colours: tab20's saturated half first (tab10's hues), then its light half, then black."""
    tab20 = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [tuple(tab20(i)) for i in order if i not in (14, 15)] + [(0.0, 0.0, 0.0, 1.0)]


def _new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas and constrained layout, outside pyplot."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _message_figure(text: str, width: float, height: float) -> Figure:
    """A figure that only says ``text`` (nothing to draw yet)."""
    fig = _new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(n / cols), cols


def _finite_points(points: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the finite points, sorted by step."""
    if not points:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    steps = np.asarray([int(s) for s, _ in points], dtype=np.int64)
    values = np.asarray([float(v) for _, v in points], dtype=np.float64)
    keep = np.isfinite(values)
    order = np.argsort(steps[keep], kind="stable")
    return steps[keep][order], values[keep][order]


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Training curves, one panel per group of metrics.

    Args:
        history: metric name -> ``[(step, value), ...]``. ``loss/*`` keys share a panel (log
            scale when every value is positive; ``loss/total`` drawn thick and black);
            ``health/*`` keys are grouped into effective prototypes, alignment/uniformity,
            embedding std and the rest; ``lr`` (and ``lr/*``) gets its own panel. Other keys,
            empty series and non-finite values are left out.

    Returns:
        a figure with one axes per non-empty panel (one axes saying "no metrics yet" when
        there is nothing to draw).
    """
    series = {k: _finite_points(v) for k, v in sorted(history.items())}
    series = {k: sv for k, sv in series.items() if sv[0].size}
    panels: list[tuple[str, list[str]]] = []
    losses = [k for k in series if k.startswith("loss/")]
    if losses:
        panels.append(("loss", losses))
    health = [k for k in series if k.startswith("health/")]
    for title, match in _HEALTH_GROUPS:
        members = [k for k in health if match(k.removeprefix("health/"))]
        if members:
            panels.append((title, members))
        health = [k for k in health if k not in members]
    if health:
        panels.append(("health", health))
    lr = [k for k in series if k == "lr" or k.startswith("lr/")]
    if lr:
        panels.append(("learning rate", lr))

    if not panels:
        return _message_figure("no metrics yet", 4.0, 3.0)
    rows, cols = _grid(len(panels))
    fig = _new_figure(4.6 * cols, 3.4 * rows)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            steps, values = series[key]
            label = key.split("/", 1)[1] if "/" in key else key
            style: dict[str, Any] = {"linewidth": 1.2}
            if key == "loss/total":
                style = {"linewidth": 2.2, "color": "black", "zorder": 3}
            marker = "o" if steps.size == 1 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3, **style)
        every_value = np.concatenate([series[k][1] for k in keys])
        if title in ("loss", "learning rate") and np.all(every_value > 0):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    return fig


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project onto the first two principal components (numpy SVD, deterministic signs).

    Args:
        embeddings: ``[N, D]``, ``N >= 1``, ``D >= 1``.

    Returns:
        ``(coords [N, 2], explained_ratio [2])``; missing components (``D == 1``, ``N <= 2``,
        identical points) are zeros.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"embeddings must be [N, D] with N, D >= 1, got shape {x.shape}")
    x = np.where(np.isfinite(x), x, 0.0)
    centred = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    s = np.where(s > 1e-9 * s.max(initial=0.0), s, 0.0)  # rounding noise is no component
    # the sign of each component: its largest-magnitude loading positive (as sklearn's svd_flip)
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1.0
    k = min(2, s.size)
    coords = np.zeros((x.shape[0], 2), dtype=np.float64)
    coords[:, :k] = u[:, :k] * signs[:k] * s[:k]
    total = float((s**2).sum())
    ratio = np.zeros(2, dtype=np.float64)
    if total > 0:
        ratio[:k] = s[:k] ** 2 / total
    return coords, ratio


def _categories(values: Sequence[str], max_categories: int = MAX_CATEGORIES) -> tuple[list[str], list[str]]:
    """``(per-sample category, categories in legend order)``: most frequent first (ties by name);
    beyond ``max_categories`` the rarest are grouped as ``"other"``; ``""`` is ``"unlabelled"``."""
    names = [str(v) if str(v) else UNLABELLED for v in values]
    counts = Counter(names)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    if len(ranked) > max_categories:
        kept = set(ranked[: max_categories - 1])
        names = [n if n in kept else OTHER for n in names]
        ranked = [c for c in ranked[: max_categories - 1] if c != OTHER] + [OTHER]
    return names, ranked


def embedding_projection_figure(
    embeddings: np.ndarray, colour_by: Mapping[str, Sequence[str]], title: str = "embeddings"
) -> Figure:
    """Scatter plots of the embeddings' first two principal components.

    Args:
        embeddings: ``[N, D]`` features (``N >= 1``, ``D >= 1``).
        colour_by: colouring name -> one category string per sample (``[N]``), e.g.
            ``{"modality": [...], "label": [...]}``; one subplot each (one uncoloured subplot
            when empty). At most ``MAX_CATEGORIES`` legend entries, the rarest grouped as "other".
        title: the figure's title.

    Returns:
        a figure with ``max(1, len(colour_by))`` axes.
    """
    coords, ratio = pca_2d(embeddings)
    n = coords.shape[0]
    colourings = dict(colour_by) or {"all samples": ["all"] * n}
    for name, values in colourings.items():
        if len(values) != n:
            raise ValueError(f"colour_by[{name!r}] has {len(values)} values for {n} embeddings")
    rows, cols = _grid(len(colourings), max_cols=2)
    fig = _new_figure(6.2 * cols, 4.6 * rows)
    fig.suptitle(title)
    size = float(np.clip(3000.0 / max(n, 1), 4.0, 40.0))
    palette = _category_colours()
    for i, (name, values) in enumerate(colourings.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        per_sample, legend = _categories(values)
        labels = np.asarray(per_sample, dtype=object)
        handles = {}
        for j, category in sorted(enumerate(legend), key=lambda jc: jc[1] != OTHER):  # "other" drawn first
            mask = labels == category
            colour = OTHER_COLOUR if category == OTHER else palette[j % len(palette)]
            handles[category] = ax.scatter(
                coords[mask, 0], coords[mask, 1], s=size, color=colour, alpha=0.8, linewidths=0
            )
        ax.legend(
            [handles[c] for c in legend],
            [f"{c} ({int((labels == c).sum())})" for c in legend],
            title=name,
            fontsize="small",
            markerscale=max(1.0, 20.0 / size),
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
        ax.set_title(f"by {name}")
        ax.grid(True, alpha=0.2)
    return fig


def _check_assignments(assignments: np.ndarray, n_total: int | None = None) -> np.ndarray:
    a = np.asarray(assignments)
    if a.ndim != 1:
        raise ValueError(f"assignments must be [N], got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"assignments must be integers, got {a.dtype}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError("assignments must be >= 0")
    if n_total is not None and a.size and a.max() >= n_total:
        raise ValueError(f"assignment {int(a.max())} out of range for {n_total} prototypes")
    return a


def _most_used(assignments: np.ndarray, n: int) -> list[tuple[int, int]]:
    """``[(prototype, count), ...]`` of the ``n`` most used prototypes (ties: lower index first)."""
    counts = np.bincount(assignments) if assignments.size else np.zeros(0, dtype=np.int64)
    used = np.flatnonzero(counts)
    order = sorted(used.tolist(), key=lambda k: (-int(counts[k]), k))
    return [(int(k), int(counts[k])) for k in order[:n]]


def prototype_gallery_figure(
    images: np.ndarray, assignments: np.ndarray, n_prototypes: int = 8, per_prototype: int = 8
) -> Figure:
    """Example images of the most used prototypes, one row each.

    Args:
        images: ``[N, H, W]`` in ``[0, 1]`` (grey).
        assignments: ``[N]`` prototype index of every image.
        n_prototypes: rows: the most used prototypes (by count; ties by index), at most the
            number actually used.
        per_prototype: examples per row, spread evenly over that prototype's images.

    Returns:
        a figure with one axes per row, titled "prototype k (n=count)" (left), showing its
        examples side by side (one axes saying "no samples" when ``N == 0``).
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {imgs.shape}")
    a = _check_assignments(assignments)
    if a.shape[0] != imgs.shape[0]:
        raise ValueError(f"{a.shape[0]} assignments for {imgs.shape[0]} images")
    if n_prototypes < 1 or per_prototype < 1:
        raise ValueError("n_prototypes and per_prototype must be >= 1")
    rows = _most_used(a, n_prototypes)
    if not rows:
        return _message_figure("no samples", 4.0, 2.0)
    _, h, w = imgs.shape
    gap = max(1, w // 16)
    cmap = colormaps["gray"].with_extremes(bad="white")
    cell = 0.9  # inches per example image
    fig = _new_figure(cell * per_prototype + 0.4, len(rows) * (cell * h / w + 0.3) + 0.2)
    for r, (k, count) in enumerate(rows):
        members = np.flatnonzero(a == k)
        chosen = members[_spread_indices(min(per_prototype, members.size), members.size)]
        strip = np.full((h, per_prototype * (w + gap) - gap), np.nan, dtype=np.float32)
        for c, index in enumerate(chosen):
            strip[:, c * (w + gap) : c * (w + gap) + w] = np.clip(imgs[index], 0.0, 1.0)
        ax = fig.add_subplot(len(rows), 1, r + 1)
        ax.imshow(np.ma.masked_invalid(strip), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"prototype {k} (n={count})", loc="left", fontsize="small")
    return fig


def prototype_usage_figure(assignments: np.ndarray, n_prototypes_total: int) -> Figure:
    """Sorted prototype usage: how many samples each prototype takes, most used first.

    Args:
        assignments: ``[N]`` prototype index per sample, in ``[0, n_prototypes_total)``.
        n_prototypes_total: the number of prototypes ``K`` of the head.

    Returns:
        a one-axes figure; the title gives the used count and the effective number
        ``exp(entropy)`` of the usage distribution.
    """
    at_least(1, n_prototypes_total=n_prototypes_total)
    a = _check_assignments(assignments, n_prototypes_total)
    counts = np.bincount(a, minlength=n_prototypes_total).astype(np.float64)
    ranked = np.sort(counts)[::-1]
    total = counts.sum()
    used = int((counts > 0).sum())
    if total > 0:
        p = counts[counts > 0] / total
        effective = float(np.exp(-(p * np.log(p)).sum()))
    else:
        effective = 0.0
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(ranked, np.arange(n_prototypes_total + 1), fill=True, alpha=0.8)
    ax.set_xlim(0, n_prototypes_total)
    ax.set_xlabel("prototype rank (most used first)")
    ax.set_ylabel("samples")
    ax.set_title(f"{used} of {n_prototypes_total} prototypes used, effective {effective:.1f} (N={int(total)})")
    ax.grid(True, alpha=0.3, axis="y")
    return fig


@dataclass
class Snapshot:
    """Un-augmented samples and what the model makes of them.

    Attributes:
        features: ``[N, D]`` float32 encoder features (what is exported downstream).
        assignments: ``[N]`` int64 argmax of the first intra (2D) prototype head's scores.
        images: ``[N, size, size]`` float32 in ``[0, 1]``, the model's inputs.
        modality, label, dims: per sample, from the manifest (``""`` labels as ``"unlabelled"``).
        n_prototypes: the number of prototypes of that head (``K``).
    """

    features: np.ndarray
    assignments: np.ndarray
    images: np.ndarray
    modality: list[str]
    label: list[str]
    dims: list[int]
    n_prototypes: int = 0


def _fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[1, H, W] -> [1, size, size]``: resize the longer side to ``size`` (antialiased bilinear),
    keep the aspect ratio and pad the shorter side with zeros, centred."""
    _, h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size - nh) // 2, (size - nw) // 2
    out = torch.zeros((1, size, size), dtype=torch.float32)
    out[:, top : top + nh, left : left + nw] = resized
    return out.clamp_(0.0, 1.0)


def _spread_indices(n: int, length: int) -> np.ndarray:
    """``n`` distinct indices of ``range(length)`` spread evenly from 0 (``n <= length``)."""
    return (np.arange(n, dtype=np.int64) * length) // n


def balanced_indices(item_index: np.ndarray, n: int) -> np.ndarray:
    """``n`` sample indices that cover every item (image or volume) as evenly as possible.

    Slices of large volumes outnumber 2D images by far; drawing evenly over samples would leave the few X-rays
    out of the pictures. Items get one sample each in turn (while they have samples left), and each item's
    samples are taken spread over its slices. Returns sorted indices.
    """
    items, inverse = np.unique(np.asarray(item_index), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(items))]
    counts = np.zeros(len(items), dtype=np.int64)
    capacity = np.array([len(m) for m in members], dtype=np.int64)
    remaining = min(int(n), int(capacity.sum()))
    while remaining > 0:
        open_items = np.flatnonzero(counts < capacity)[:remaining]
        counts[open_items] += 1
        remaining -= len(open_items)
    chosen = [
        m[((np.arange(c) + 0.5) * len(m) / c).astype(np.int64)] for m, c in zip(members, counts, strict=True) if c
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def embedding_snapshot(
    model: torch.nn.Module,
    dataset: Any,
    n_samples: int,
    size: int,
    device: torch.device | str,
    generator_seed: int = 0,
    batch_size: int = 64,
) -> Snapshot:
    """Encode ``n_samples`` un-augmented samples of ``dataset``, every image and volume represented
    (:func:`balanced_indices`).

    Args:
        model: a ``JointModel`` (or a wrapper with ``.module``, e.g. DDP): ``encode`` gives the
            features ``[B, D]``, ``projector`` then ``intra_prototypes`` the assignment scores.
        dataset: a ``MultiCropSliceDataset``; ``dataset.image(i, rng)`` gives ``[1, H, W]``.
        n_samples: how many samples (fewer when the dataset is smaller); indices
            ``floor(j * len / n)``, so the same samples every time.
        size: each image is fitted into ``size x size`` (aspect kept, zero padded).
        device: where the model runs.
        generator_seed: seeds the per-sample channel choice (``default_rng([seed, index])``).
        batch_size: samples per forward pass.

    The model runs in eval mode without gradients; every submodule's train/eval flag is
    restored afterwards.
    """
    if n_samples < 1 or size < 1 or batch_size < 1:
        raise ValueError(f"n_samples, size and batch_size must be >= 1, got {n_samples}, {size}, {batch_size}")
    length = len(dataset)
    if length == 0:
        raise ValueError("the dataset is empty")
    core = model if hasattr(model, "encode") else getattr(model, "module", model)
    chosen = balanced_indices(np.asarray(dataset.item_index), min(int(n_samples), length))
    readable, pictures = [], []
    for i in chosen:  # a cache entry that turned unreadable during the run is left out of the picture
        try:
            pictures.append(
                _fit_square(dataset.image(int(i), np.random.default_rng([int(generator_seed), int(i)])), size)
            )
        except UnreadableEntryError:
            continue
        readable.append(i)
    if not pictures:
        raise ValueError("no sample of the embedding snapshot can be read from the cache")
    indices = np.asarray(readable, dtype=np.int64)
    images = torch.stack(pictures)  # [N, 1, size, size]
    rows = [dataset.items[int(dataset.item_index[int(i)])].row for i in indices]
    in_channels = int(getattr(getattr(core, "config", None), "in_channels", 1) or 1)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    features, assignments = [], []
    n_prototypes = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            if in_channels > 1:
                x = x.expand(-1, in_channels, -1, -1)
            f = core.encode([x])[0]
            scores = core.intra_prototypes(core.projector(f))[0]  # [B, K]
            n_prototypes = int(scores.shape[1])
            features.append(f.float().cpu())
            assignments.append(scores.argmax(dim=1).cpu())
    finally:
        for module, training in modes:
            module.training = training
    return Snapshot(
        features=torch.cat(features).numpy().astype(np.float32, copy=False),
        assignments=torch.cat(assignments).numpy().astype(np.int64, copy=False),
        images=images[:, 0].numpy().astype(np.float32, copy=False),
        modality=[str(r.modality) for r in rows],
        label=[str(r.label) if r.label else UNLABELLED for r in rows],
        dims=[int(r.dims) for r in rows],
        n_prototypes=n_prototypes,
    )


def snapshot_figures(snapshot: Snapshot, title: str = "embeddings") -> dict[str, Figure]:
    """The pictures of a snapshot, keyed by a suggested artifact file name:
    ``embeddings.png`` (by modality, label and 2D/3D source), ``prototype_gallery.png`` and
    ``prototype_usage.png``."""
    colour_by = {
        "modality": snapshot.modality,
        "label": snapshot.label,
        "source": [f"{d}D" for d in snapshot.dims],
    }
    figures = {
        "embeddings.png": embedding_projection_figure(snapshot.features, colour_by, title),
        "prototype_gallery.png": prototype_gallery_figure(snapshot.images, snapshot.assignments),
    }
    if snapshot.n_prototypes > 0:
        figures["prototype_usage.png"] = prototype_usage_figure(snapshot.assignments, snapshot.n_prototypes)
    return figures
