"""What every fine-tuning task shares: typed configs, loading the pretrained encoder (2D or inflated 3D) with a
strict check that every tensor loaded, stage features of a MONAI ResNet, label-fraction subsets of cases,
patient-disjoint splits, and the MLflow record of a fine-tuning run.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.networks.nets import ResNet
from omegaconf import OmegaConf
from torch import Tensor

from medssl.data.preprocess import PreprocessConfig
from medssl.models.encoders import resnet_stage_features


@dataclass
class TaskConfig:
    """The keys every fine-tuning task's config shares (``configs/finetune/*.yaml``): the task it is for, the seed,
    the device and where the run is logged. A subclass names its task in ``TASK``."""

    TASK: ClassVar[str] = ""
    task: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    experiment: str = "medssl-finetune"
    mlflow: bool = True
    tracking_uri: str | None = None
    progress: bool = True  # progress reports: a bar on a terminal, lines in a log file (MEDSSL_PROGRESS_SECONDS)

    def __post_init__(self) -> None:
        if self.task != self.TASK:
            raise ValueError(f"task: this schema is for {self.TASK}, got {self.task!r}")


@dataclass
class FinetuneModelConfig:
    pretrained: str = "none"  # a bundle folder (medssl export), an MLflow run id, models:/NAME@ALIAS, none (random)
    encoder: str = "resnet18"  # random init: an encoder name, or a bundle / run id to copy the architecture of
    depth_kernel: int | None = None  # 3D tasks: stem kernel depth of the inflated encoder (odd; default 3)


@dataclass
class LabelledDataConfig:
    """A manifest whose rows carry a ``mask`` (segmentation, detection)."""

    manifest: str = "data_manifests/labelled.csv"
    root: str | None = None  # the archive root (default: the path map's)
    path_map: str | None = None  # the manifest's path map (default: the one it names)
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(spacing=None, max_side_2d=None))
    train_split: str = "train"
    test_split: str = "test"
    label_fraction: float = 1.0  # fraction of the training cases whose labels are used (nested across fractions)
    workers: int = 2  # threads reading files

    def __post_init__(self) -> None:
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")


BUNDLE_NETWORKS = ("monai.networks.nets.ResNet", "medssl.models.encoders.monai_resnet")
"""The ``network_def`` targets a bundle may name (what ``medssl export`` writes)."""


@dataclass
class LoadedBackbone:
    """A MONAI ``ResNet`` (``feed_forward=False``) and how it was obtained.

    ``kwargs`` rebuild it (:func:`medssl.models.encoders.monai_resnet`); ``stage_channels`` are the channels of
    the stem output and the four stages (:func:`resnet_stages`); ``message`` says what loaded
    (``matched N/N pretrained tensors ...`` or ``random initialisation``).
    """

    network: ResNet
    kwargs: dict[str, Any]
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return int(self.kwargs.get("spatial_dims", 3))

    @property
    def stage_channels(self) -> list[int]:
        expansion = 1 if self.kwargs.get("block", "basic") == "basic" else 4
        widths = list(self.kwargs.get("block_inplanes", [64, 128, 256, 512]))
        return [int(widths[0]), *(int(w) * expansion for w in widths)]


def _random_backbone(
    encoder: str, spatial_dims: int, depth_kernel: int | None, tracking_uri: str | None = None
) -> LoadedBackbone:
    """A freshly initialised encoder: the registered ``encoder`` (:func:`medssl.models.encoders.create_encoder`), or
    the architecture of a pretrained backbone (``encoder`` a bundle folder, an MLflow run id or a model URI: its
    stem, widths and norm, none of its weights), so that random init is the same network as the backbone it is the
    baseline of (for instance one pretrained with ``model.max_pool=true``).

    Reading another backbone's architecture leaves torch's random state as it was, so a seeded caller draws the
    same weights whichever way the architecture was named.

    Raises:
        ValueError: ``encoder`` is neither a registered encoder nor a source :func:`load_backbone` reads.
    """
    from medssl.export.inflate import inflated_config
    from medssl.export.sources import is_model_uri
    from medssl.models.encoders import available_encoders, create_encoder, monai_resnet

    if encoder in available_encoders():
        encoder_2d = create_encoder(encoder)
        kwargs = dict(encoder_2d.backbone_config)
        if spatial_dims == 3:
            kwargs = inflated_config(kwargs, depth_kernel=depth_kernel)
            return LoadedBackbone(monai_resnet(kwargs), kwargs, f"random initialisation ({encoder}, 3D)")
        return LoadedBackbone(encoder_2d.backbone, kwargs, f"random initialisation ({encoder}, 2D)")
    if not (Path(encoder).exists() or is_model_uri(encoder) or _RUN_ID.fullmatch(encoder)):  # else: a typo
        raise ValueError(
            f"encoder={encoder!r}: not a registered encoder ({', '.join(available_encoders())}) nor a bundle folder, "
            "MLflow run id or model URI whose architecture random initialisation would copy"
        )
    with torch.random.fork_rng(devices=[]):  # reading the source builds (and loads) a network: keep the seed's draw
        kwargs = dict(load_backbone(encoder, spatial_dims=spatial_dims, tracking_uri=tracking_uri,
                                    depth_kernel=depth_kernel).kwargs)  # fmt: skip
    return LoadedBackbone(
        monai_resnet(kwargs), kwargs, f"random initialisation (the architecture of {encoder}, {spatial_dims}D)"
    )


_RUN_ID = re.compile(r"[0-9a-f]{32}")
"""An MLflow run id (32 hex digits)."""


def load_backbone(
    pretrained: str,
    encoder: str = "resnet18",
    spatial_dims: int = 2,
    tracking_uri: str | None = None,
    depth_kernel: int | None = None,
) -> LoadedBackbone:
    """The encoder for a downstream task, from a bundle folder, an MLflow run id, an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/backbone_model``, resolved against
    ``tracking_uri``: :func:`medssl.export.sources.resolve_source`), or ``none`` (random init).

    A 2D bundle is inflated to 3D (I3D, :mod:`medssl.export.inflate`) when ``spatial_dims=3``. Every tensor of the
    bundle must match the network by name and shape; otherwise this raises instead of loading part of it.

    Raises:
        ValueError: partial or mismatched weights, a 3D bundle asked for a 2D task, a bad ``spatial_dims``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if pretrained in ("none", "", "null"):
        return _random_backbone(encoder, spatial_dims, depth_kernel, tracking_uri)
    bundle = Path(pretrained)
    if not bundle.is_dir():
        from medssl.export.bundle import export_bundle

        with tempfile.TemporaryDirectory() as tmp:  # a run id or a model URI: export its bundle first
            exported = export_bundle(pretrained, Path(tmp) / "bundle", tracking_uri=tracking_uri, log_to_mlflow=False)
            return load_backbone(str(exported), encoder, spatial_dims, depth_kernel=depth_kernel)
    from medssl.runtime.checkpoints import load_checkpoint

    inference = bundle / "configs" / "inference.json"
    if not inference.is_file():
        raise ValueError(f"model.pretrained={pretrained}: not a bundle folder (no configs/inference.json)")
    network, kwargs = bundle_network(inference, pretrained)
    weights = load_checkpoint(bundle / "models" / "model.pt")  # weights_only=True; its checksum when it has one
    expected = network.state_dict()
    matched = [k for k in expected if k in weights and weights[k].shape == expected[k].shape]
    if len(matched) != len(expected) or len(weights) != len(expected):
        missing = sorted(set(expected) - set(matched))[:3]
        unexpected = sorted(set(weights) - set(expected))[:3]
        raise ValueError(
            f"model.pretrained={pretrained}: matched {len(matched)}/{len(expected)} tensors "
            f"(missing or mis-shaped e.g. {missing}, unexpected e.g. {unexpected}); refusing a partial load"
        )
    network.load_state_dict(weights, strict=True)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8")).get("medssl", {})
    bundle_dims = int(kwargs.get("spatial_dims", 3))
    message = f"matched {len(matched)}/{len(expected)} pretrained tensors from {bundle} (run {metadata.get('run_id')})"
    if bundle_dims == spatial_dims:
        return LoadedBackbone(network, kwargs, message, metadata)
    if bundle_dims == 3:
        raise ValueError(f"model.pretrained={pretrained}: a 3D bundle cannot serve a 2D task (export it in 2D)")
    from medssl.export.inflate import inflate_resnet

    network_3d, kwargs_3d = inflate_resnet(network, kwargs, depth_kernel=depth_kernel)
    return LoadedBackbone(network_3d, kwargs_3d, f"{message}, inflated to 3D (I3D)", metadata)


def bundle_network(inference: Path, pretrained: str) -> tuple[ResNet, dict[str, Any]]:
    """The ResNet of a bundle's ``configs/inference.json`` -> ``network_def``, and its kwargs, built by medssl from
    the arguments written there.

    The config is read as JSON, never evaluated: to MONAI's ``ConfigParser`` a bundle config is code (``$``
    expressions and any ``_target_`` run when parsed), so only the networks :mod:`medssl.export.bundle` writes are
    accepted (:data:`BUNDLE_NETWORKS`).

    Raises:
        ValueError: no ``network_def``, or one that is not such a ResNet (the message names the file).
    """
    from medssl.models.encoders import monai_resnet

    try:
        network_def = json.loads(inference.read_text(encoding="utf-8"))["network_def"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model.pretrained={pretrained}: {inference}: no readable network_def ({exc})") from None
    target = network_def.get("_target_") if isinstance(network_def, dict) else network_def
    if target not in BUNDLE_NETWORKS:
        raise ValueError(
            f"model.pretrained={pretrained}: {inference}: network_def is {str(target)[:100]!r}, not one of the "
            f"networks medssl loads ({', '.join(BUNDLE_NETWORKS)}); a bundle's config expressions are never run"
        )
    kwargs = _bundle_kwargs(network_def)
    try:
        return monai_resnet(kwargs), kwargs
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"model.pretrained={pretrained}: {inference}: bad ResNet arguments ({exc})") from None


def _bundle_kwargs(network_def: dict[str, Any]) -> dict[str, Any]:
    if "backbone_config" in network_def:
        return dict(network_def["backbone_config"])
    return {k: v for k, v in network_def.items() if not k.startswith("_")}


def resnet_stages(network: ResNet, x: Tensor) -> list[Tensor]:
    """The stem output and the four stage outputs of a MONAI ``ResNet`` (as it runs in pretraining: the max pool
    only when the network has it on).

    Args:
        x: ``[B, C, *spatial]`` (2D or 3D as the network).
    Returns:
        five tensors ``[B, stage_channels[i], *spatial_i]``, strides ``s, s(*2), ...`` where ``s`` is the stem stride.
    """
    return resnet_stage_features(network, x)


def fraction_of_cases(subjects: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Indices of a ``fraction`` of the cases chosen by subject (all cases of a chosen subject), at least one
    subject; nested: for one seed, a smaller fraction's subjects are a subset of a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    distinct = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(distinct))
    keep_count = max(1, round(fraction * len(distinct)))
    kept = {distinct[i] for i in order[:keep_count]}
    return [i for i, s in enumerate(subjects) if s in kept]


def check_disjoint(train_subjects: Sequence[str], test_subjects: Sequence[str]) -> None:
    """Raise if a subject (patient) is on both sides: evaluation splits must be patient-disjoint. Empty subjects
    are not compared; the message names a few of the (pseudonymised) shared subjects."""
    shared = sorted(set(train_subjects) & set(test_subjects) - {""})
    if shared:
        raise ValueError(
            f"{len(shared)} subject(s) appear in both the training and the test rows (e.g. {shared[:5]}); "
            "evaluation splits must be patient-disjoint (fix the manifest's split column)"
        )


def labelled_train_test(data: LabelledDataConfig, seed: int, progress: bool = True) -> tuple[list[Any], list[Any], Any]:
    """The readable cases with a mask of the training split (``data.label_fraction`` of its subjects, drawn by
    ``seed``) and of the test split, checked subject-disjoint, and the manifest. Unreadable cases are printed and
    skipped (:func:`medssl.data.labelled.load_cases`, which reports its progress when ``progress``).

    Raises:
        ManifestError: no manifest, or a split without readable cases.
    """
    from medssl.data.errors import ManifestError
    from medssl.data.labelled import load_cases
    from medssl.data.manifest import read_manifest

    path = Path(data.manifest)
    if not path.is_file():
        raise ManifestError(f"data.manifest: {path}: no such manifest")
    manifest = read_manifest(path, data.root, data.path_map)
    splits = [data.train_split, data.test_split]
    cases, errors = load_cases(manifest, data.preprocess, splits, workers=data.workers, progress=progress)
    for error in errors:
        print(f"medssl finetune: skipped {error}")
    train = [c for c in cases if c.split == data.train_split]
    test = [c for c in cases if c.split == data.test_split]
    if not train or not test:
        raise ManifestError(
            f"data.manifest: {path}: needs readable rows with a mask in split {data.train_split!r} ({len(train)}) "
            f"and {data.test_split!r} ({len(test)})"
        )
    check_disjoint([c.subject for c in train], [c.subject for c in test])
    keep = fraction_of_cases([c.subject or c.id for c in train], data.label_fraction, seed)
    return [train[i] for i in keep], test, manifest


def log_finetune_run(
    config: Any,
    metrics: dict[str, float],
    loaded: str,
    run_name: str,
    project_dir: Path | None = None,
    results: dict[str, Any] | None = None,
    figures: dict[str, Any] | None = None,
) -> str:
    """One MLflow run in ``config.experiment``: flat params, ``medssl.pretrained_loaded`` and the provenance tags
    (:func:`medssl.runtime.tracking.provenance_tags`), metrics, ``results.json`` and figures (name -> matplotlib
    figure). Returns the run id."""
    from medssl.runtime.tracking import Tracker, default_tracking_uri, flatten_config, provenance_tags

    uri = config.tracking_uri or default_tracking_uri(project_dir or Path.cwd())
    tracker = Tracker(uri, config.experiment, run_name=run_name)
    try:
        tracker.log_params(flatten_config(OmegaConf.to_container(OmegaConf.structured(config))))  # type: ignore[arg-type]
        task = str(getattr(config, "task", ""))
        tracker.set_tags({"medssl.pretrained_loaded": loaded, "medssl.task": task, **provenance_tags()})
        tracker.log_metrics(metrics, step=0)
        tracker.log_dict({"metrics": metrics, **(results or {})}, "results.json")
        for name, figure in (figures or {}).items():
            tracker.log_figure(figure, name)
    finally:
        tracker.finish()
    return str(tracker.run_id)
