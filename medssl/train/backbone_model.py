"""The pretrained backbone logged as an MLflow model at the end of a finished run (``logging.log_model=true``).

:func:`log_backbone_model` logs the encoder with ``mlflow.pytorch.log_model`` as the model ``backbone_model`` of the
run, next to ``backbone/backbone.pt``: the plain MONAI ``ResNet`` of ``backbone.json`` with those weights, in eval
mode, serialised with ``torch.export`` ("pt2"), so ``mlflow.pytorch.load_model`` gives a module that needs torch only
(not medssl, not MONAI, no pickle) and maps ``[B, C, H, W]`` images in [0, 1] to ``[B, D]`` features.
``logging.register_as=NAME`` also registers it as a new version of ``NAME`` with the alias
``logging.register_alias``. Reading such a model back is :mod:`medssl.export.sources`.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from medssl.runtime.tracking import Tracker

MODEL_NAME = "backbone_model"
"""The name of the logged model in its run: ``runs:/<run id>/backbone_model``."""
EXAMPLE_BATCH = 2
"""Batch size of the input example. ``torch.export`` makes a dimension whose example size is 1 static, so a
``[1, C, H, W]`` example would give a model that accepts batches of one only; with 2 the batch (and H, W) stay
dynamic."""
_METADATA_KEY = "medssl"


def pip_requirements() -> list[str]:
    """``medssl``, ``torch`` and ``monai`` pinned to the installed versions (torch without a local label such as
    ``+cpu``, which only PyTorch's own index serves). Read from the installed packages, nothing is fetched."""
    import monai

    try:
        medssl_version = importlib.metadata.version("medssl")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        from medssl.version import __version__ as medssl_version
    return [
        f"medssl=={medssl_version}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__.split('+')[0]}",
    ]


def backbone_network(kwargs: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The MONAI ``ResNet`` of ``kwargs`` (:func:`medssl.models.encoders.monai_resnet`, as the bundle builds it) with
    ``weights`` loaded strictly, on the CPU, in eval mode (BatchNorm with its running statistics)."""
    from medssl.models.encoders import monai_resnet

    network = monai_resnet(kwargs)
    network.load_state_dict(weights, strict=True)
    return network.to("cpu", torch.float32).eval()


def _signature(channels: int, out_dim: int) -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Unnamed tensors: with a named one MLflow checks the serving example as a dict, which the PyTorch flavour refuses.
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_dim))]),
    )


def log_backbone_model(
    tracker: Tracker,
    meta: dict[str, Any],
    weights: dict[str, torch.Tensor],
    register_as: str | None = None,
    alias: str | None = None,
) -> str:
    """Log the backbone of ``backbone.json``'s ``meta`` and ``weights`` as the MLflow model ``backbone_model`` of the
    tracker's run and, with ``register_as``, register it (``alias`` on the new version). Returns a one-line
    description for the log; sets the run tags ``medssl.model_uri`` (and ``medssl.registered_model``,
    ``medssl.registered_alias``).

    The model: signature ``[-1, C, -1, -1]`` float32 -> ``[-1, D]``; input example zeros ``[2, C, crop, crop]``
    (:data:`EXAMPLE_BATCH`); ``pip_requirements()``; the metadata ``medssl`` = ``meta`` (network kwargs, out_dim,
    run, preprocessing, input), which :func:`backbone_from_model_uri` reads back.
    """
    meta = json.loads(json.dumps(meta))  # plain lists and dicts: MLflow writes the metadata as YAML
    network = backbone_network(meta["kwargs"], weights)
    channels = int(meta["kwargs"].get("n_input_channels", 1))
    crop = int(meta.get("input", {}).get("crop") or 96)
    out_dim = int(meta["out_dim"])
    example = np.zeros((EXAMPLE_BATCH, channels, crop, crop), dtype=np.float32)
    info = tracker.log_pytorch_model(
        network,
        MODEL_NAME,
        signature=_signature(channels, out_dim),
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata={_METADATA_KEY: meta},
    )
    if info is None:  # tracking disabled
        return "no MLflow model (tracking is off)"
    tags = {"medssl.model_uri": info.model_uri}
    note = f"backbone logged as the MLflow model runs:/{tracker.run_id}/{MODEL_NAME} ({info.model_uri})"
    if register_as:
        version = tracker.register_model(info.model_uri, register_as, alias)
        tags["medssl.registered_model"] = f"models:/{register_as}/{version}"
        note += f", registered as models:/{register_as}/{version}"
        if alias:
            tags["medssl.registered_alias"] = f"models:/{register_as}@{alias}"
            note += f" (models:/{register_as}@{alias})"
    tracker.set_tags(tags)
    return note
