"""Where a pretrained 2D encoder comes from, read into one :class:`ExportedBackbone`: a finished run's folder
(``backbone.pt`` + ``backbone.json``), a training checkpoint (``step_*.pt``), an MLflow run id; and its I3D
inflation to 3D. MLflow model URIs and the choice between all of these: :mod:`medssl.export.sources`. Writing a
MONAI bundle from it: :mod:`medssl.export.bundle`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medssl.runtime.checkpoints import latest_checkpoint, load_checkpoint

CHECKPOINT_PREFIX = "model.encoder.backbone."  # where the encoder's weights sit in a training checkpoint
TRANSFORMER_PREFIX = "model.transformer."  # where the slice transformer's weights sit in a training checkpoint


@dataclass
class ExportedSliceTransformer:
    """The slice transformer a joint run trained (L_inter or L_mask): :class:`medssl.models.SliceTransformer`
    kwargs and its weights. Downstream 2.5D segmentation runs it over the encoder's per-slice features."""

    kwargs: dict[str, Any]
    weights: dict[str, torch.Tensor]


@dataclass
class ExportedBackbone:
    """A 2D encoder ready to write: MONAI ``ResNet`` kwargs, its weights, and what produced it."""

    network_kwargs: dict[str, Any]
    weights: dict[str, torch.Tensor]
    out_dim: int
    config: dict[str, Any]  # the run's resolved pretraining config
    run_id: str | None
    run_name: str
    spatial_dims: int = 2
    inflation: dict[str, Any] | None = None  # how a 3D network was inflated from the 2D encoder
    slice_transformer: ExportedSliceTransformer | None = None  # when the run trained one (joint: L_inter, L_mask)


def inflate_to_3d(
    exported: ExportedBackbone, depth_kernel: int | None = None, depth_stride: int = 1
) -> ExportedBackbone:
    """The same encoder as a 3D MONAI ResNet (I3D inflation, :mod:`medssl.export.inflate`)."""
    from medssl.export.inflate import inflate_state_dict, inflated_config

    config_3d = inflated_config(exported.network_kwargs, depth_kernel, depth_stride)
    weights = inflate_state_dict(exported.weights, config_3d)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config_3d.items()}
    return ExportedBackbone(
        network_kwargs=_plain_norm(kwargs),
        weights=weights,
        out_dim=exported.out_dim,
        config=exported.config,
        run_id=exported.run_id,
        run_name=exported.run_name,
        spatial_dims=3,
        slice_transformer=None,  # a 3D encoder sees whole volumes: no slice tokens to attend over
        inflation={
            "method": "I3D (Carreira & Zisserman, CVPR 2017): 2D kernels repeated along depth, divided by depth",
            "stem_kernel": kwargs["conv1_t_size"],
            "stem_stride": kwargs["conv1_t_stride"],
        },
    )


def _plain_norm(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    norm = kwargs.get("norm", "batch")
    kwargs["norm"] = list(norm) if isinstance(norm, tuple) else norm
    return kwargs


def backbone_from_checkpoint(path: Path) -> ExportedBackbone:
    """The encoder of a training checkpoint (``outputs/<run>/checkpoints/step_*.pt``)."""
    from medssl.models.joint import JointModel
    from medssl.train.config import pretrain_config

    state = load_checkpoint(path)
    if "objective" not in state or "config" not in state:
        raise ValueError(f"{path}: not a medssl pretraining checkpoint")
    config = pretrain_config(state["config"])
    encoder = JointModel(config.model).encoder
    weights = {k[len(CHECKPOINT_PREFIX) :]: v for k, v in state["objective"].items() if k.startswith(CHECKPOINT_PREFIX)}
    missing = set(encoder.backbone.state_dict()) - set(weights)
    if missing:
        raise ValueError(f"{path}: {len(missing)} encoder tensors missing (e.g. {sorted(missing)[0]})")
    return ExportedBackbone(
        network_kwargs=_plain_norm(encoder.backbone_config),
        weights=weights,
        out_dim=int(encoder.stage_channels[-1]),
        config=state["config"],
        run_id=state.get("mlflow_run_id"),
        run_name=str(state.get("run_name", path.parent.parent.name)),
        slice_transformer=slice_transformer_from_state(state, path),
    )


def trained_slice_transformer(config: dict[str, Any]) -> bool:
    """Whether a run's resolved config trained the slice transformer: the joint method with L_inter or L_mask on."""
    method = config.get("method", {})
    weights = method.get("objective", {}).get("weights", {}) or {}
    return method.get("name") == "joint" and any(float(weights.get(k, 0.0)) > 0 for k in ("inter", "mask"))


def slice_transformer_from_state(state: dict[str, Any], path: Path) -> ExportedSliceTransformer | None:
    """The slice transformer of a training checkpoint's state, or None when its run did not train one (SimCLR,
    2D SwAV, SepCLR, a joint run with L_inter and L_mask off) or its tokens are not the plain pooled last stage
    (``model.multiscale`` or ``model.embed_dim``: a U-Net's bottleneck cannot feed it)."""
    config = state["config"]
    model = config.get("model", {})
    if not trained_slice_transformer(config) or model.get("multiscale") or model.get("embed_dim"):
        return None
    from medssl.models.slice_transformer import SliceTransformer

    objective = state["objective"]
    weights = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in objective.items() if k.startswith(TRANSFORMER_PREFIX)}
    from medssl.train.config import pretrain_config

    architecture = pretrain_config(config).model  # the run's resolved model config, defaults included
    projection = weights.get("input_proj.weight")
    in_dim = int(projection.shape[1]) if projection is not None else architecture.transformer_dim  # Identity: equal
    kwargs = architecture.slice_transformer_kwargs(in_dim)
    with torch.random.fork_rng(devices=[]):  # building it to check the tensors must not move a seeded draw
        expected = SliceTransformer(**kwargs).state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{path}: the slice transformer's tensors do not match the run's model config")
    return ExportedSliceTransformer(kwargs, weights)


def backbone_from_run_dir(run_dir: Path) -> ExportedBackbone:
    """``backbone.pt`` + ``backbone.json`` of a finished run, else its latest checkpoint."""
    meta_path, weights_path = run_dir / "backbone.json", run_dir / "backbone.pt"
    if meta_path.is_file() and weights_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        checkpoint = latest_checkpoint(run_dir)
        state = load_checkpoint(checkpoint) if checkpoint is not None else None
        return ExportedBackbone(
            network_kwargs=_plain_norm(meta["kwargs"]),
            weights=load_checkpoint(weights_path),
            out_dim=int(meta["out_dim"]),
            config=state["config"] if state is not None else {},
            run_id=meta.get("run_id"),
            run_name=str(meta.get("run_name", run_dir.name)),
            slice_transformer=slice_transformer_from_state(state, checkpoint) if state is not None else None,
        )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no backbone.pt/backbone.json and no checkpoints/latest")
    return backbone_from_checkpoint(checkpoint)


def backbone_from_mlflow(run_id: str, tracking_uri: str) -> ExportedBackbone:
    """Download ``backbone/`` of an MLflow run and read it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise ValueError(f"{run_id}: no such MLflow run in {tracking_uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "backbone", tmp))
        if not (local / "backbone.pt").is_file():
            raise FileNotFoundError(f"MLflow run {run_id} has no backbone/backbone.pt (did the run finish?)")
        exported = backbone_from_run_dir(local)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_file = Path(client.download_artifacts(run_id, "config/pretrain.yaml", tmp))
        except Exception:  # an older run without its config: the metadata says less, the weights are the same
            config_file = None
        if config_file is not None:
            import yaml

            exported.config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    exported.run_id = run_id
    return exported
