"""Full fine-tuning of the pretrained encoder for image classification (``protocol=finetune``).

The encoder (a MONAI ``ResNet`` with ``feed_forward=False``, ``[B, C, H, W] -> [B, D]``) gets a linear head
``[B, D] -> [B, K]`` and both are trained with cross-entropy, AdamW, a linear warm-up then cosine decay, and the
encoder at a smaller learning rate than the new head (``encoder_lr_scale``), as in the fine-tuning protocols of
SimCLR (Chen et al., ICML 2020) and of the medical SSL literature (Azizi et al., ICCV 2021). Augmentation is batched
on the device: a random resized crop (scale ``crop_scale``, aspect ratio 3/4-4/3), a small rotation and an optional
horizontal flip, rendered by the pretraining views' ``render_views`` (one bilinear sampling per batch). After
training, BatchNorm statistics are recomputed on the un-augmented training images with the final weights
(:func:`precise_batchnorm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medssl.data.device_views import PARAMS, UniformDraws, ViewParams, neutral_rows, render_views
from medssl.data.views import DEFAULT_RATIO, random_resized_crop_box
from medssl.downstream.probes import ProbeResult, encode_labels
from medssl.runtime.progress import progress as progress_of


@dataclass
class FinetuneSchedule:
    """``finetune.*`` keys of ``configs/finetune/classification.yaml`` (used by ``protocol=finetune``)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3  # the head's peak learning rate
    encoder_lr_scale: float = 0.1  # the encoder's learning rate = lr * encoder_lr_scale (0 freezes it)
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    crop_scale: list[float] | None = field(default_factory=lambda: [0.6, 1.0])  # crop area range; null: no crop
    rotation_degrees: float = 10.0
    horizontal_flip: bool = False  # off by default: laterality matters in chest X-rays
    workers: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"finetune.steps and finetune.batch_size must be >= 1, got {self.steps} {self.batch_size}")
        if self.lr <= 0 or self.encoder_lr_scale < 0 or self.weight_decay < 0:
            raise ValueError("finetune.lr must be > 0, finetune.encoder_lr_scale and finetune.weight_decay >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"finetune.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.crop_scale is not None and not (
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ValueError(f"finetune.crop_scale must be [low, high], 0 < low <= high <= 1, got {self.crop_scale}")


def augment_batch(
    images: Tensor,
    generator: torch.Generator,
    crop_scale: tuple[float, float] | None = (0.6, 1.0),
    rotation_degrees: float = 10.0,
    horizontal_flip: bool = False,
) -> Tensor:
    """Random resized crop, rotation and flip of every image, rendered in one bilinear sampling per batch by the
    pretraining views' renderer (:func:`medssl.data.device_views.render_views`).

    Args:
        images: ``[B, C, H, W]``.
        generator: a CPU generator (the draws do not depend on the device).
    Returns:
        ``[B, C, H, W]``, bilinear, zero outside the rotated view.
    """
    b, _, height, width = images.shape
    rows = neutral_rows(b)
    draws = UniformDraws(lambda: float(torch.rand((), generator=generator)))
    for i in range(b):
        if crop_scale is not None:
            box = random_resized_crop_box(height, width, crop_scale, DEFAULT_RATIO, draws)
        else:
            box = (0, 0, height, width)
        rows[i, 0, [PARAMS.index(k) for k in ("top", "left", "height", "width")]] = box
        rows[i, 0, PARAMS.index("angle")] = draws.uniform(-1.0, 1.0) * math.radians(rotation_degrees)
        rows[i, 0, PARAMS.index("flip")] = float(horizontal_flip and draws.uniform(0.0, 1.0) < 0.5)
    params = ViewParams.from_rows(rows, images.device)
    return render_views(images, params, (height, width))[:, 0]


class Classifier(nn.Module):
    """Encoder ``[B, C, H, W] -> [B, D]`` followed by a linear head ``[B, D] -> [B, K]`` (logits)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def _images_and_labels(dataset: Dataset) -> tuple[Tensor, list[str]]:
    """All images ``[N, C, H, W]`` and labels of ``dataset``, in order."""
    images: list[Tensor] = []
    labels: list[str] = []
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        images.append(batch["image"])
        labels.extend(str(y) for y in batch["label"])
    return torch.cat(images), labels


@torch.no_grad()
def precise_batchnorm(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> int:
    """Recompute every BatchNorm layer's running mean/variance as the exact average over ``images`` ``[N, C, H, W]``
    with the final weights ("precise BN", Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

    The running statistics kept during a short fine-tuning average over weights that changed from step to step
    (and over augmented images); evaluation then mis-normalises, which leaves the ranking (AUROC) intact but
    shifts the decision threshold (accuracy). Returns the number of BatchNorm layers updated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches below
        m.train()
    try:
        for chunk in images.split(batch_size):
            if len(chunk) > 1:
                model(chunk.to(device))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(norms)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def finetune_classifier(
    encoder: nn.Module,
    train: Dataset,
    test: Dataset,
    schedule: FinetuneSchedule,
    seed: int = 0,
    device: str | torch.device = "cpu",
    train_indices: np.ndarray | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Fine-tune ``encoder`` + a linear head on ``train`` and evaluate on ``test``.

    Args:
        encoder: maps ``[B, C, H, W]`` to ``[B, D]``; trained in place (pass a copy to keep the original).
        train, test: yield ``{"image": [C, H, W], "label": str}`` (e.g.
            :class:`medssl.downstream.probes.LabelledImageDataset`); the images are held in memory.
        train_indices: the training samples to use (a label fraction), default all.
        progress: report the steps (:func:`medssl.runtime.progress.progress`, the last step's loss).

    Returns:
        :class:`ProbeResult` with test probabilities ``[M, K]`` and :func:`classification_metrics`.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, train_labels = _images_and_labels(train)
    x_test, test_labels = _images_and_labels(test)
    if train_indices is not None:
        x_train, train_labels = x_train[torch.as_tensor(train_indices)], [train_labels[i] for i in train_indices]
    class_names, train_index, test_index = encode_labels(train_labels, test_labels)
    y_train = torch.from_numpy(train_index)
    device = torch.device(device)
    encoder.to(device)
    with torch.no_grad():
        feature_dim = int(encoder.eval()(x_train[:1].to(device)).shape[1])
    model = Classifier(encoder, feature_dim, len(class_names)).to(device)
    groups = [{"params": model.head.parameters(), "lr": schedule.lr, "scale": 1.0}]
    if schedule.encoder_lr_scale > 0:
        lr = schedule.lr * schedule.encoder_lr_scale
        groups.append({"params": model.encoder.parameters(), "lr": lr, "scale": schedule.encoder_lr_scale})
    else:
        model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
    warmup = round(schedule.warmup_fraction * schedule.steps)
    crop = (schedule.crop_scale[0], schedule.crop_scale[1]) if schedule.crop_scale is not None else None
    n = len(y_train)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    model.train()
    if schedule.encoder_lr_scale == 0:
        model.encoder.eval()  # frozen: keep the pretrained BatchNorm statistics
    steps = progress_of(range(schedule.steps), desc="finetune", unit="step", enabled=progress, leave=None)
    for step in steps:
        if cursor + min(schedule.batch_size, n) > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + schedule.batch_size]
        cursor += len(index)
        images = augment_batch(
            x_train[index].to(device), generator, crop, schedule.rotation_degrees, schedule.horizontal_flip
        )
        factor = _lr_factor(step, schedule.steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr * group["scale"] * factor
        loss = F.cross_entropy(model(images), y_train[index].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    if schedule.encoder_lr_scale > 0:
        model.eval()
        precise_batchnorm(model, x_train, max(2, schedule.batch_size), device)
    model.eval()
    with torch.no_grad():
        probabilities = torch.cat(
            [torch.softmax(model(chunk.to(device)), dim=1).cpu() for chunk in x_test.split(256)]
        ).numpy()
    return ProbeResult.of(probabilities, test_index, class_names)
