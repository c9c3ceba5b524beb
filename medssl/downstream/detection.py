"""``medssl finetune task=detection``: RetinaNet on the pretrained ResNet, 2D images or 3D volumes.

The network is MONAI's detection RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection", ICCV): the
pretrained encoder (2D, or its I3D inflation for 3D) is the bottom-up path of a feature pyramid network, with a
classification head (focal loss) and a box-regression head on every pyramid level. Anchors of fixed shapes
(``AnchorGeneratorWithAnchorShape``) are matched to ground-truth boxes by ATSS (Zhang et al. 2020, "Bridging the Gap
Between Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR), and a hard-negative
sampler picks the background anchors that train the classifier. Detection is MONAI's ``RetinaNetDetector``
(``monai.apps.detection``, adapted from torchvision and nnDetection, Baumgartner et al. 2021); evaluation is its
COCO-style mAP/mAR (``monai.apps.detection.metrics``).

Boxes live in the frame the network sees, :meth:`medssl.data.labelled.LabelledCase.display`: voxel indices of the
spatial axes of the display array (``[D, H, W]`` for volumes, ``[H, W]`` for images), in MONAI's corner mode
``xyzxyz`` / ``xyxy`` with ``x`` the first spatial axis and the maximum exclusive (a box of one voxel at index ``i``
is ``[i, i + 1]``). They come from ``<manifest stem>.boxes.json`` beside the manifest (or ``data.boxes``)::

    {"<row id>": {"boxes": [[d0, h0, w0, d1, h1, w1], ...], "labels": [0, ...]}, ...}

with labels the 0-based foreground class; without such a file they are derived from the label maps, one box per
connected component (full connectivity) of each class, label = class value - 1; the run says so.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from medssl.downstream.common import (
    FinetuneModelConfig,
    LabelledDataConfig,
    LoadedBackbone,
    TaskConfig,
    labelled_train_test,
    load_backbone,
    log_finetune_run,
)
from medssl.models.encoders import resnet_stage_features
from medssl.runtime.progress import progress as progress_of
from medssl.runtime.seeding import seed_everything

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class DetectionDataConfig(LabelledDataConfig):
    """:class:`LabelledDataConfig` plus where the boxes come from."""

    boxes: str | None = None  # a boxes JSON; default <manifest stem>.boxes.json beside it, else derived from masks
    flip: bool = True  # random flips of every spatial axis (boxes flipped with the image) during training


@dataclass
class DetectionConfig(TaskConfig):
    """``configs/finetune/detection.yaml`` (``medssl finetune task=detection key=value ...``)."""

    TASK: ClassVar[str] = "detection"
    task: str = "detection"
    spatial_dims: int = 3  # 2: images [C, H, W]; 3: volumes [C, D, H, W] (the inflated encoder)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    num_classes: int | None = None  # foreground classes; None: 1 + the largest box label of the data
    class_names: list[str] = field(default_factory=list)  # default class1, class2, ... (mask values)
    returned_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # ResNet stages feeding the FPN
    fpn_channels: int = 128  # channels of every pyramid level and of the heads
    anchor_shapes: list[list[float]] = field(default_factory=lambda: [[4.0], [8.0]])  # voxels at the finest level
    feature_map_scales: list[float] = field(default_factory=list)  # anchor scale per level; default 1, 2, 4, ...
    atss_candidates: int = 4  # ATSS: candidate anchors per level and box
    sampler_batch: int = 64  # hard-negative sampler: anchors per image for the classification loss
    sampler_positive_fraction: float = 0.3
    batch_size: int = 2  # whole cases per step (padded to size_divisible)
    steps: int = 200
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    score_threshold: float = 0.05  # box selector: minimal score kept
    nms_threshold: float = 0.22  # box selector: IoU above which NMS drops the lower-scored box
    detections_per_image: int = 100
    iou_thresholds: list[float] = field(default_factory=lambda: [0.1, 0.5])  # mAP/mAR reported at each IoU
    iou_range: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.05])  # start, stop, step of averaged mAP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes) or null, got {self.num_classes}")
        if self.num_classes is not None and self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names must name num_classes={self.num_classes} classes, got {self.class_names}")
        if not self.returned_layers or any(k not in (1, 2, 3, 4) for k in self.returned_layers):
            raise ValueError(f"returned_layers must be ResNet stages among 1..4, got {self.returned_layers}")
        if sorted(set(self.returned_layers)) != list(self.returned_layers):
            raise ValueError(f"returned_layers must be increasing without repeats, got {self.returned_layers}")
        if self.fpn_channels < 1:
            raise ValueError(f"fpn_channels must be >= 1, got {self.fpn_channels}")
        if not self.anchor_shapes or any(
            len(s) not in (1, self.spatial_dims) or min(s) <= 0 for s in self.anchor_shapes
        ):
            raise ValueError(
                f"anchor_shapes must be positive shapes of 1 (isotropic) or spatial_dims={self.spatial_dims} "
                f"values, got {self.anchor_shapes}"
            )
        levels = len(self.returned_layers) + 1
        if self.feature_map_scales and (len(self.feature_map_scales) != levels or min(self.feature_map_scales) <= 0):
            raise ValueError(
                f"feature_map_scales must give {levels} positive scales (returned_layers + 1 pyramid levels), "
                f"got {self.feature_map_scales}"
            )
        for key in ("atss_candidates", "sampler_batch", "batch_size", "steps", "detections_per_image"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.sampler_positive_fraction <= 1:
            raise ValueError(f"sampler_positive_fraction must be in (0, 1], got {self.sampler_positive_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )
        for key in ("score_threshold", "nms_threshold"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not self.iou_thresholds or any(not 0 < t <= 1 for t in self.iou_thresholds):
            raise ValueError(f"iou_thresholds must be in (0, 1], got {self.iou_thresholds}")
        start, stop, step = list(self.iou_range) if len(self.iou_range) == 3 else (0.0, 0.0, 0.0)
        if not 0 < start <= stop <= 1 or step <= 0:
            raise ValueError(f"iou_range must be [start, stop, step] with 0 < start <= stop <= 1, got {self.iou_range}")


# --------------------------------------------------------------------------------------------------------- boxes


@dataclass
class CaseBoxes:
    """Ground truth of one case: ``boxes`` float32 ``[N, 2 * dims]`` (corner mode, display frame), ``labels`` int64
    ``[N]`` (0-based foreground classes)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None  # predictions only: ``[N]`` in [0, 1]


def boxes_from_mask(mask: np.ndarray) -> CaseBoxes:
    """One box per connected component (full connectivity) of each class of a label map.

    Args:
        mask: int ``[D, H, W]`` or ``[H, W]``, 0 = background, class ``c >= 1``.
    Returns:
        boxes ``[N, 2 * mask.ndim]`` as ``[min_0, ..., min_k, max_0, ..., max_k]`` with exclusive maxima, labels
        ``c - 1``; ordered by class, then by component (scipy's raster order).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for cls in (int(c) for c in np.unique(mask) if c > 0):
        components, _ = ndimage.label(mask == cls, structure=structure)
        for slices in ndimage.find_objects(components):
            if slices is None:
                continue
            boxes.append([float(s.start) for s in slices] + [float(s.stop) for s in slices])
            labels.append(cls - 1)
    return CaseBoxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 2 * mask.ndim), np.asarray(labels, dtype=np.int64))


def validate_boxes(row_id: str, boxes: CaseBoxes, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` naming ``row_id`` unless every box lies inside ``shape`` with ``min < max`` and labels
    are non-negative integers, one per box."""
    dims = len(shape)
    if boxes.boxes.ndim != 2 or boxes.boxes.shape[1] != 2 * dims:
        raise ValueError(f"boxes of row {row_id}: expected [N, {2 * dims}] corner boxes, got {list(boxes.boxes.shape)}")
    if boxes.labels.shape != (len(boxes.boxes),):
        raise ValueError(f"boxes of row {row_id}: {len(boxes.labels)} labels for {len(boxes.boxes)} boxes")
    if np.any(boxes.labels < 0):
        raise ValueError(f"boxes of row {row_id}: labels must be 0-based foreground classes, got {boxes.labels}")
    for box in boxes.boxes:
        low, high = box[:dims], box[dims:]
        if not np.all(np.isfinite(box)) or np.any(low < 0) or np.any(high > np.asarray(shape)) or np.any(low >= high):
            raise ValueError(
                f"boxes of row {row_id}: box {box.tolist()} is not inside the image {list(shape)} with min < max "
                "(corner mode, display frame, exclusive max)"
            )


def read_boxes_file(path: Path, row_ids: Sequence[str]) -> dict[str, CaseBoxes]:
    """``{row_id: {"boxes": [[...]], "labels": [...]}}``; errors name the file and the row id (an id not in the
    manifest, a malformed entry)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"data.boxes: {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"data.boxes: {path}: expected an object keyed by manifest row id")
    known = set(row_ids)
    result: dict[str, CaseBoxes] = {}
    for row_id, entry in raw.items():
        if row_id not in known:
            raise ValueError(f"data.boxes: {path}: row id {row_id!r} is not in the manifest")
        if not isinstance(entry, dict) or "boxes" not in entry or "labels" not in entry:
            raise ValueError(f"data.boxes: {path}: row {row_id}: expected {{'boxes': [...], 'labels': [...]}}")
        try:
            boxes = np.asarray(entry["boxes"], dtype=np.float32)
            labels = np.asarray(entry["labels"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data.boxes: {path}: row {row_id}: {exc}") from None
        if labels.size and not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"data.boxes: {path}: row {row_id}: labels must be integers, got {entry['labels']}")
        result[row_id] = CaseBoxes(boxes.reshape(len(boxes), -1) if boxes.size else boxes, labels.astype(np.int64))
    return result


def boxes_source(data: DetectionDataConfig) -> Path | None:
    """The boxes JSON to use: ``data.boxes`` (must exist) or ``<manifest stem>.boxes.json`` if present."""
    if data.boxes:
        path = Path(data.boxes)
        if not path.is_file():
            raise ValueError(f"data.boxes: {path}: no such file")
        return path
    manifest = Path(data.manifest)
    beside = manifest.with_name(f"{manifest.stem}.boxes.json")
    return beside if beside.is_file() else None


# ------------------------------------------------------------------------------------------------------- network


class ResNetFPN(nn.Module):
    """The pretrained MONAI ResNet as the bottom-up path of a feature pyramid network.

    The ResNet runs as in pretraining (:func:`medssl.downstream.common.resnet_stages`): stem, the max pool only when
    the encoder had one (otherwise ``maxpool`` is replaced by ``nn.Identity``), then stages ``1..max(returned)``.
    The FPN (MONAI ``FeaturePyramidNetwork``, Lin et al. 2017) adds a top-down path and a last level by max
    pooling (``LastLevelMaxPool``).

    Input ``[B, C, *spatial]``; output an ordered dict of ``len(returned_layers) + 1`` maps
    ``[B, out_channels, *spatial_l]``, finest first, stride of level ``l`` = ``stem_stride * 2**(returned[l] - 1)``
    (times 2 with a max pool), the extra level twice the last.
    """

    def __init__(
        self, backbone: nn.Module, stage_channels: Sequence[int], returned_layers: Sequence[int], out_channels: int
    ) -> None:
        super().__init__()
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        spatial_dims = int(backbone.conv1.weight.ndim - 2)
        if backbone.no_max_pool:
            backbone.maxpool = nn.Identity()
        self.body = backbone
        self.returned_layers = [int(k) for k in returned_layers]
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=[int(stage_channels[k]) for k in self.returned_layers],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        stages = resnet_stage_features(self.body, x, max(self.returned_layers))
        return self.fpn(OrderedDict((str(k), stages[k]) for k in self.returned_layers))


def _stem_stride(kwargs: dict[str, Any], spatial_dims: int) -> list[int]:
    stride = kwargs.get("conv1_t_stride", 1)
    return [int(s) for s in stride] if isinstance(stride, (list, tuple)) else [int(stride)] * spatial_dims


def size_divisible(kwargs: dict[str, Any], spatial_dims: int, returned_layers: Sequence[int]) -> list[int]:
    """Per spatial axis, what the input size must divide by so every pyramid level (and the extra one) is exact."""
    pool = 1 if kwargs.get("no_max_pool", False) else 2
    return [s * pool * 2 ** (max(returned_layers) - 1) * 2 for s in _stem_stride(kwargs, spatial_dims)]


def build_detector(config: DetectionConfig, loaded: LoadedBackbone, num_classes: int) -> nn.Module:
    """MONAI ``RetinaNetDetector`` around ``RetinaNet(ResNetFPN(loaded.network))``, with shape anchors, the ATSS
    matcher, a hard-negative sampler, focal classification loss and the box selector of ``config``.

    Every backbone tensor is used when ``max(returned_layers) == 4`` (the default); all layers train.
    """
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.losses import FocalLoss

    from medssl.downstream.atss_detector import ATSSRetinaNetDetector

    dims = config.spatial_dims
    shapes = [[float(s[0])] * dims if len(s) == 1 else [float(v) for v in s] for s in config.anchor_shapes]
    levels = len(config.returned_layers) + 1
    scales = list(config.feature_map_scales) or [2**i for i in range(levels)]
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=shapes)
    extractor = ResNetFPN(loaded.network, loaded.stage_channels, config.returned_layers, config.fpn_channels)
    network = RetinaNet(
        spatial_dims=dims,
        num_classes=num_classes,
        num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=extractor,
        size_divisible=size_divisible(loaded.kwargs, dims, config.returned_layers),
    )
    detector = ATSSRetinaNetDetector(network=network, anchor_generator=anchors)
    detector.set_atss_matcher(num_candidates=config.atss_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=config.sampler_batch,
        positive_fraction=config.sampler_positive_fraction,
        pool_size=20,
        min_neg=16,
    )
    detector.set_cls_loss(FocalLoss(gamma=2.0, reduction="mean"))
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_box_selector_parameters(
        score_thresh=config.score_threshold,
        topk_candidates_per_level=1000,
        nms_thresh=config.nms_threshold,
        detections_per_img=config.detections_per_image,
    )
    return detector


def backbone_of(detector: nn.Module) -> nn.Module:
    """The ResNet inside a detector from :func:`build_detector`."""
    return detector.network.feature_extractor.body


# ------------------------------------------------------------------------------------------------------ training


@dataclass
class DetectionCase:
    """A case as the detector sees it: ``image`` float32 ``[C, *spatial]`` (display frame) and its boxes."""

    id: str
    subject: str
    image: np.ndarray
    target: CaseBoxes


def _flip(image: np.ndarray, target: CaseBoxes, rng: np.random.Generator) -> tuple[np.ndarray, CaseBoxes]:
    from monai.apps.detection.transforms.box_ops import flip_boxes

    spatial = image.shape[1:]
    axes = [a for a in range(len(spatial)) if rng.random() < 0.5]
    if not axes:
        return image, target
    image = np.ascontiguousarray(np.flip(image, axis=[a + 1 for a in axes]))
    boxes = flip_boxes(target.boxes.copy(), spatial, flip_axes=axes) if len(target.boxes) else target.boxes
    return image, CaseBoxes(np.asarray(boxes, dtype=np.float32), target.labels)


def train_detector(
    detector: nn.Module, cases: Sequence[DetectionCase], config: DetectionConfig, device: torch.device
) -> list[float]:
    """``config.steps`` steps on batches of ``config.batch_size`` whole cases (a seeded permutation, cycled; random
    flips when ``data.flip``); returns the loss (classification + box regression) of every step. ``progress``
    reports the steps and the last step's loss."""
    params = [p for p in detector.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    losses: list[float] = []
    detector.train()
    steps = progress_of(range(config.steps), desc="detection", unit="step", enabled=config.progress, leave=None)
    for _ in steps:
        batch = []
        while len(batch) < min(config.batch_size, len(cases)):
            if not order:
                order = list(rng.permutation(len(cases)))
            batch.append(cases[order.pop()])
        images, targets = [], []
        for case in batch:
            image, target = _flip(case.image, case.target, rng) if config.data.flip else (case.image, case.target)
            images.append(torch.from_numpy(image).to(device))
            targets.append(
                {
                    "boxes": torch.from_numpy(target.boxes).to(device),
                    "labels": torch.from_numpy(target.labels).to(device),
                }
            )
        result = detector(images, targets)
        loss = result["classification"] + result["box_regression"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"detection loss is not finite at step {len(losses)} ({float(loss)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        steps.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return losses


@torch.no_grad()
def predict(
    detector: nn.Module, cases: Sequence[DetectionCase], device: torch.device, progress: bool = True
) -> list[CaseBoxes]:
    """Detections per case (whole images, eval mode): boxes ``[N, 2 * dims]`` in the case's frame, labels ``[N]``,
    scores ``[N]``; ``progress`` reports the cases done."""
    detector.eval()
    results = []
    for case in progress_of(cases, desc="detection test", unit="case", enabled=progress, leave=None):
        (out,) = detector([torch.from_numpy(case.image).to(device)])
        results.append(
            CaseBoxes(
                out["boxes"].float().cpu().numpy(),
                out["labels"].long().cpu().numpy(),
                out["labels_scores"].float().cpu().numpy(),
            )
        )
    return results


# ---------------------------------------------------------------------------------------------------- evaluation


def _iou_key(value: float) -> str:
    return f"{value:.2f}"


def detection_metrics(
    predictions: Sequence[CaseBoxes],
    targets: Sequence[CaseBoxes],
    class_names: Sequence[str],
    iou_thresholds: Sequence[float] = (0.1, 0.5),
    iou_range: Sequence[float] = (0.1, 0.5, 0.05),
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO mAP and mAR (MONAI ``COCOMetric`` on ``matching_batch``) over cases.

    Args:
        predictions: per case, boxes ``[N, 2 * dims]``, labels ``[N]`` and scores ``[N]`` (1 when ``None``).
        targets: per case, ground-truth boxes ``[G, 2 * dims]`` and labels ``[G]``.
    Returns:
        ``map_iou_<t>`` / ``mar_iou_<t>`` for each threshold ``t`` (two decimals, mean over classes), ``map`` / ``mar``
        averaged over the IoU range (``iou_range`` start, stop, step).
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    metric = COCOMetric(
        classes=list(class_names),
        iou_list=list(iou_thresholds),
        iou_range=list(iou_range),
        max_detection=[max_detections],
        per_class=False,
        verbose=False,
    )
    matched = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[p.boxes for p in predictions],
        pred_classes=[p.labels for p in predictions],
        pred_scores=[p.scores if p.scores is not None else np.ones(len(p.boxes), np.float32) for p in predictions],
        gt_boxes=[t.boxes for t in targets],
        gt_classes=[t.labels for t in targets],
        max_detections=max_detections,
    )
    raw, _ = metric(matched)
    suffix = f"MaxDet_{max_detections}"
    range_key = f"IoU_{iou_range[0]:.2f}_{iou_range[1]:.2f}_{iou_range[2]:.2f}_{suffix}"
    metrics = {"map": float(raw[f"mAP_{range_key}"]), "mar": float(raw[f"mAR_{range_key}"])}
    for t in iou_thresholds:
        metrics[f"map_iou_{_iou_key(t)}"] = float(raw[f"AP_IoU_{t:.2f}_{suffix}"])
        metrics[f"mar_iou_{_iou_key(t)}"] = float(raw[f"AR_IoU_{t:.2f}_{suffix}"])
    return metrics


# ------------------------------------------------------------------------------------------------------- running


def _load_detection_cases(config: DetectionConfig) -> tuple[list[DetectionCase], list[DetectionCase], str]:
    data = config.data
    train, test, manifest = labelled_train_test(data, config.seed, config.progress)
    for case in (*train, *test):
        if case.dims != config.spatial_dims:
            raise ValueError(
                f"spatial_dims={config.spatial_dims}: row {case.id} is {case.dims}D (select rows of one kind)"
            )
    source = boxes_source(data)
    given = read_boxes_file(source, [r.id for r in manifest.rows]) if source is not None else None
    how = f"boxes from {source}" if source is not None else "boxes derived from masks (connected components)"
    result: list[list[DetectionCase]] = [[], []]
    for part, group in enumerate((train, test)):
        for case in group:
            image, mask = case.display()
            if given is not None:
                if case.id not in given:
                    raise ValueError(f"data.boxes: {source}: no entry for row {case.id}")
                target = given[case.id]
            else:
                target = boxes_from_mask(mask)
            validate_boxes(case.id, target, mask.shape)
            result[part].append(DetectionCase(case.id, case.subject, image.astype(np.float32), target))
    return result[0], result[1], how


def run_detection(config: DetectionConfig, project_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune RetinaNet on the training cases and evaluate COCO mAP/mAR on the test cases.

    Returns:
        the metrics plus ``train_cases``, ``test_cases``, ``loaded`` (what the backbone loaded), ``boxes`` (where the
        boxes came from), ``final_loss``, ``predictions`` (per test case id: detections kept) and ``run_id`` (MLflow,
        when ``mlflow``).
    """
    from medssl.runtime.devices import resolve_device

    seed_everything(config.seed)
    train, test, how = _load_detection_cases(config)
    print(f"medssl finetune: {how}")
    labels = np.concatenate([c.target.labels for c in train + test])
    num_classes = config.num_classes or (int(labels.max()) + 1 if labels.size else 1)
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"num_classes={num_classes}: the data has box label {int(labels.max())} (0-based)")
    names = list(config.class_names) or [f"class{k + 1}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names must name {num_classes} classes, got {names}")
    loaded = load_backbone(
        config.model.pretrained,
        config.model.encoder,
        spatial_dims=config.spatial_dims,
        tracking_uri=config.tracking_uri,
        depth_kernel=config.model.depth_kernel,
    )
    print(f"medssl finetune: {loaded.message}")
    channels = int(loaded.kwargs.get("n_input_channels", 1))
    for case in train + test:
        if case.image.shape[0] != channels:
            raise ValueError(f"row {case.id}: {case.image.shape[0]} image channels, the encoder takes {channels}")
    seed_everything(config.seed)
    detector = build_detector(config, loaded, num_classes)
    device = resolve_device(config.device)
    detector.to(device)
    started = time.perf_counter()
    losses = train_detector(detector, train, config, device)
    predictions = predict(detector, test, device, config.progress)
    metrics = detection_metrics(
        predictions,
        [c.target for c in test],
        names,
        config.iou_thresholds,
        config.iou_range,
        config.detections_per_image,
    )
    metrics["final_loss"] = float(np.mean(losses[-min(10, len(losses)) :]))
    metrics["train_cases"] = float(len(train))
    metrics["test_cases"] = float(len(test))
    shown = ", ".join(f"mAP@{_iou_key(t)} {metrics[f'map_iou_{_iou_key(t)}']:.4f}" for t in config.iou_thresholds)
    print(
        f"medssl finetune: detection ({config.spatial_dims}D, {num_classes} classes), {len(train)} training cases "
        f"({config.data.label_fraction:g}), {len(test)} test, {config.steps} steps "
        f"({time.perf_counter() - started:.0f} s, loss {metrics['final_loss']:.4f}): {shown}, "
        f"mAR@{_iou_key(config.iou_thresholds[0])} {metrics[f'mar_iou_{_iou_key(config.iou_thresholds[0])}']:.4f} "
        f"[{how}]"
    )
    per_case = {
        c.id: {"predictions": len(p.boxes), "ground_truth": len(c.target.boxes)}
        for c, p in zip(test, predictions, strict=True)
    }
    result: dict[str, Any] = {
        **metrics,
        "loaded": loaded.message,
        "boxes": how,
        "classes": names,
        "predictions": per_case,
    }
    if config.mlflow:
        result["run_id"] = log_finetune_run(
            config,
            metrics,
            loaded.message,
            run_name=f"detection-{config.spatial_dims}d",
            project_dir=project_dir,
            results={"boxes": how, "classes": names, "losses": losses, "cases": per_case},
        )
        _tag_boxes(config, project_dir, result["run_id"], how)
    return result


def _tag_boxes(config: DetectionConfig, project_dir: Path | None, run_id: str, how: str) -> None:
    from mlflow import MlflowClient

    from medssl.runtime.tracking import default_tracking_uri

    uri = config.tracking_uri or default_tracking_uri(project_dir or Path.cwd())
    MlflowClient(tracking_uri=uri).set_tag(run_id, "medssl.boxes", how)
