"""Where ``medssl export`` and fine-tuning get a backbone: :func:`resolve_source` picks between a run folder, a
checkpoint, an MLflow run id (:mod:`medssl.export.backbones`) and an MLflow model URI (here).

The pretrained backbone as an MLflow model, and MLflow model URIs as a source of a backbone.

A finished pretraining run (``logging.log_model=true``) logs its encoder with ``mlflow.pytorch.log_model`` as the
model ``backbone_model`` of the run (:func:`log_backbone_model`), next to ``backbone/backbone.pt``: the plain MONAI
``ResNet`` of ``backbone.json`` with those weights, in eval mode, serialised with ``torch.export`` ("pt2"), so
``mlflow.pytorch.load_model`` gives a module that needs torch only (not medssl, not MONAI, no pickle) and maps
``[B, C, H, W]`` images in [0, 1] to ``[B, D]`` features. ``logging.register_as=NAME`` also registers it as a new
version of ``NAME`` in the model registry, with the alias ``logging.register_alias``.

:func:`backbone_from_model_uri` reads such a model back, by MLflow's own resolution against a tracking URI:
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/<model id>`` and
``runs:/RUN_ID/backbone_model`` (what :func:`resolve_source` accepts besides run folders,
checkpoints and run ids).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from medssl.export.backbones import (
    ExportedBackbone,
    backbone_from_checkpoint,
    backbone_from_mlflow,
    backbone_from_run_dir,
)
from medssl.train.backbone_model import _METADATA_KEY, EXAMPLE_BATCH, MODEL_NAME, backbone_network, pip_requirements

__all__ = [
    "EXAMPLE_BATCH",
    "MODEL_NAME",
    "backbone_from_model_uri",
    "backbone_network",
    "is_model_uri",
    "pip_requirements",
    "resolve_source",
]

logger = logging.getLogger(__name__)

MODEL_URI_PREFIXES = ("models:/", "runs:/")


def is_model_uri(source: str) -> bool:
    """Whether ``source`` is an MLflow model URI (``models:/...`` or ``runs:/...``)."""
    return str(source).startswith(MODEL_URI_PREFIXES)


def _where(tracking_uri: str) -> str:
    """The store (and the registry, when another) that a URI was resolved against, for messages."""
    import mlflow

    registry = mlflow.get_registry_uri()
    return f"the MLflow store {tracking_uri}" + (f" (model registry {registry})" if registry != tracking_uri else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _run_config(tracking_uri: str, run_id: str | None) -> dict[str, Any]:
    """The pretraining config a run logged (``config/pretrain.yaml``); ``{}`` when there is none."""
    if not run_id:
        return {}
    import yaml
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, "config/pretrain.yaml", tmp)
            return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except Exception:  # the run is gone or has no config: the metadata says less, the weights are the same
            logger.debug("no config/pretrain.yaml for run %s", run_id, exc_info=True)
            return {}


def backbone_from_model_uri(uri: str, tracking_uri: str) -> ExportedBackbone:
    """The backbone of a medssl MLflow model, from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/<model id>`` or ``runs:/RUN_ID/backbone_model``, resolved by MLflow against ``tracking_uri``.

    The weights are the logged network's own (loaded with ``mlflow.pytorch.load_model``, which refuses pickled
    payloads); the network arguments come from the model's ``medssl`` metadata and the pretraining config from its
    source run (``config/pretrain.yaml``).

    Raises:
        ValueError: the URI does not resolve (the message names it and the store), or it is not a medssl backbone.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from medssl.models.encoders import monai_resnet
    from medssl.runtime.tracking import use_tracking_uri

    with use_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as error:
            raise ValueError(
                f"{uri}: not found in {_where(tracking_uri)} ({_first_line(error)}); a run's backbone model is "
                f"runs:/<run id>/{MODEL_NAME}, a registered one models:/<name>@<alias> or models:/<name>/<version> "
                "(set the store with the tracking URI option or MLFLOW_TRACKING_URI)"
            ) from None
        if not (local / "MLmodel").is_file():
            raise ValueError(f"{uri}: not an MLflow model (no MLmodel file) in {_where(tracking_uri)}")
        model = Model.load(str(local))
        meta = (model.metadata or {}).get(_METADATA_KEY)
        if not isinstance(meta, dict) or "kwargs" not in meta or "out_dim" not in meta:
            raise ValueError(f"{uri}: an MLflow model, but not a medssl backbone (no medssl metadata in its MLmodel)")
        try:
            network = mlflow.pytorch.load_model(str(local))
        except MlflowException as error:
            raise ValueError(f"{uri}: the MLflow model does not load ({_first_line(error)})") from None
        weights = {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}
    kwargs = dict(meta["kwargs"])
    with torch.device("meta"):
        expected = monai_resnet(kwargs).state_dict()
    mismatched = sorted(k for k in set(expected) | set(weights) if k not in expected or k not in weights
                        or expected[k].shape != weights[k].shape)  # fmt: skip
    if mismatched:
        raise ValueError(
            f"{uri}: the model's weights do not match the network of its metadata ({len(mismatched)} tensors, e.g. "
            f"{mismatched[:3]})"
        )
    run_id = model.run_id or meta.get("run_id")
    return ExportedBackbone(
        network_kwargs=kwargs,
        weights=weights,
        out_dim=int(meta["out_dim"]),
        config=_run_config(tracking_uri, run_id),
        run_id=run_id,
        run_name=str(meta.get("run_name") or uri),
    )


def resolve_source(source: str, tracking_uri: str | None = None) -> ExportedBackbone:
    """A run folder, a checkpoint file, an MLflow run id (32 hex digits), or an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/backbone_model``:
    :func:`backbone_from_model_uri`)."""
    if is_model_uri(source):
        from medssl.runtime.tracking import default_tracking_uri

        return backbone_from_model_uri(source, tracking_uri or default_tracking_uri(Path.cwd()))
    path = Path(source)
    if path.is_dir():
        return backbone_from_run_dir(path)
    if path.is_file():
        return backbone_from_checkpoint(path)
    if len(source) == 32 and all(c in "0123456789abcdef" for c in source):
        from medssl.runtime.tracking import default_tracking_uri

        return backbone_from_mlflow(source, tracking_uri or default_tracking_uri(Path.cwd()))
    raise FileNotFoundError(
        f"{source}: not a run folder, a checkpoint file or an MLflow run id (nor an MLflow model URI: "
        "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/backbone_model)"
    )
