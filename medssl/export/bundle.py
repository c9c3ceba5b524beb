"""``medssl export``: a pretrained encoder as a MONAI bundle that MONAI's own tools accept and run.

Layout (MONAI bundle specification)::

    <out>/configs/metadata.json   MONAI's fields, valid against MONAI's schema (meta_schema_20240725, a copy ships in
                                  medssl/export/schema/): versions, required packages, authors, copyright, licence,
                                  intended use (research, not diagnosis), network_data_format (channel_def: each CT
                                  window or the modality); and a ``medssl`` block with the adaptation metadata (axis
                                  order, spacing, intensity normalisation, crop size, key prefix, method, run id)
    <out>/configs/inference.json  ``network_def`` (the encoder as ``monai.networks.nets.ResNet``), medssl's
                                  preprocessing as MONAI transforms and a ``run`` writing the [N, D] embeddings of a
                                  folder or datalist (:mod:`medssl.export.inference`)
    <out>/models/model.pt         its state dict (MONAI keys, no prefix), read with weights_only=True
    <out>/models/model.ts         the same network as TorchScript (MONAI's convert_to_torchscript), PyTorch only
    <out>/models/slice_transformer.pt  a joint run's slice transformer (state dict; kwargs in metadata.json's
                                  ``medssl.slice_transformer``), only when the run trained one: 2.5D segmentation
                                  runs it over the encoder's per-slice features
    <out>/docs/README.md          how to run and load it

The source is a run folder (``outputs/<run>``, with ``backbone.pt`` and ``backbone.json``), a training
checkpoint (``step_*.pt``) or an MLflow run id.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from medssl.export.backbones import CHECKPOINT_PREFIX, ExportedBackbone, inflate_to_3d
from medssl.export.inference import inference_config as inference_config_of
from medssl.export.metadata import (
    SCHEMA_URL,
    BundleInfo,
    bundle_info,
    channel_definition,
    default_channels,
    default_modality,
    pretraining_modalities,
    required_packages,
)
from medssl.export.sources import resolve_source
from medssl.runtime.checkpoints import save_checkpoint
from medssl.runtime.files import atomic_write_text

BUNDLE_VERSION = "1.0.0"
SLICE_TRANSFORMER_FILE = "models/slice_transformer.pt"
AXIS_ORDER_3D = (
    "3D input [C, D, H, W]: D along the slice normal (the pretraining stacks' plane), each [H, W] in the 2D "
    "encoder's display orientation, from a volume reoriented to RAS+"
)
AXIS_ORDER = (
    "2D input [C, H, W]: one slice in radiological display orientation (superior/anterior at the top, the "
    "patient's right on the left), taken from a volume reoriented to RAS+ [X, Y, Z]; a 2D image as stored"
)


def network_definition(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The bundle's ``network_def``: plain MONAI for BatchNorm; medssl's builder for other norms (MONAI 1.6's
    ResNet applies ``norm`` to its stem only)."""
    if kwargs.get("norm", "batch") == "batch":
        return {"_target_": "monai.networks.nets.ResNet", **kwargs}
    return {"_target_": "medssl.models.encoders.monai_resnet", "backbone_config": kwargs}


def needs_medssl(kwargs: dict[str, Any]) -> bool:
    """Whether ``network_def`` is medssl's builder (norms other than batch), so that building it needs medssl."""
    return network_definition(kwargs)["_target_"] != "monai.networks.nets.ResNet"


@dataclass
class InferencePlan:
    """How ``configs/inference.json`` feeds the encoder unless told otherwise: the intensity normalisation
    (``modality``), the preprocessed channels it takes and the plane size."""

    modality: str
    channels: list[int]
    image_size: int | None
    modalities: dict[str, int]  # rows per modality of the pretraining manifest, when it was readable


def inference_plan(exported: ExportedBackbone) -> InferencePlan:
    """The defaults of :func:`medssl.export.inference.inference_config` for ``exported``: the most frequent
    pretraining modality, channel 0 (the first CT window) for a one-channel encoder, and 2D planes resized to the
    pretraining crop size (``medssl embed``'s ``data.size``; a 3D bundle takes volumes as preprocessed)."""
    preprocess = exported.config.get("data", {}).get("preprocess", {}) or {}
    windows = preprocess.get("ct_windows") or [[40.0, 400.0]]
    n_input = int(exported.network_kwargs.get("n_input_channels", 1))
    modalities = pretraining_modalities(exported.config)
    modality = default_modality(modalities, n_input, windows)
    crop = (exported.config.get("data", {}).get("views", {}) or {}).get("global_size")
    image_size = int(crop) if exported.spatial_dims == 2 and crop else None
    return InferencePlan(modality, default_channels(n_input, windows, modality), image_size, modalities)


def adaptation_metadata(exported: ExportedBackbone, plan: InferencePlan | None = None) -> dict[str, Any]:
    """What a downstream user needs to feed the encoder as it was pretrained."""
    plan = plan or inference_plan(exported)
    data = exported.config.get("data", {})
    preprocess = data.get("preprocess", {})
    method = exported.config.get("method", {})
    return {
        "run_id": exported.run_id,
        "run_name": exported.run_name,
        "method": method.get("name"),
        "loss_weights": method.get("objective", {}).get("weights"),
        "encoder": exported.config.get("model", {}).get("encoder"),
        "spatial_dims": exported.spatial_dims,
        "inflation": exported.inflation,
        "input_channels": exported.network_kwargs.get("n_input_channels", 1),
        "axis_order": AXIS_ORDER if exported.spatial_dims == 2 else AXIS_ORDER_3D,
        "spacing_mm": preprocess.get("spacing"),
        "max_side_2d": preprocess.get("max_side_2d"),
        "intensity": {
            "CT": {"hu_windows_level_width": preprocess.get("ct_windows"), "to": "[0, 1], one channel per window"},
            "MR": {"percentiles_of_nonzero_voxels": preprocess.get("percentiles"), "to": "[0, 1] (clipped)"},
            "other": {"percentiles": preprocess.get("percentiles"), "to": "[0, 1] (clipped)"},
        },
        "crop_size": data.get("views", {}).get("global_size"),
        "features": f"global average pool of the last stage: [B, {exported.out_dim}]",
        "encoder_key_prefix": {"bundle": "", "training_checkpoint": CHECKPOINT_PREFIX},
        "pretraining_modalities": plan.modalities,
        "inference": {
            "config": "configs/inference.json (python -m monai.bundle run ... --input_dir DIR or --datalist FILE)",
            "modality": plan.modality,
            "channels": plan.channels,
            "image_size": plan.image_size,
            "volumes": (
                "mean of the features of every axial slice"
                if exported.spatial_dims == 2
                else "features of the whole [C, D, H, W] volume"
            ),
            "torchscript": "models/model.ts",
        },
        "slice_transformer": None
        if exported.slice_transformer is None
        else {
            "file": SLICE_TRANSFORMER_FILE,
            "kwargs": exported.slice_transformer.kwargs,
            "tokens": f"per slice, the global average pool of the encoder's last stage: [B, N, {exported.out_dim}]",
            "positions": "slice positions along the stack in mm",
            "module": "medssl.models.slice_transformer.SliceTransformer",
        },
    }


def bundle_metadata(
    exported: ExportedBackbone, info: BundleInfo | None = None, plan: InferencePlan | None = None
) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's schema (:data:`medssl.export.metadata.SCHEMA_URL`, checked offline by
    :func:`medssl.export.metadata.verify_metadata_offline`), ``info``'s fields and the ``medssl`` block."""
    info = info or BundleInfo()
    plan = plan or inference_plan(exported)
    crop = (exported.config.get("data", {}).get("views", {}) or {}).get("global_size") or 96
    channels = int(exported.network_kwargs.get("n_input_channels", 1))
    windows = (exported.config.get("data", {}).get("preprocess", {}) or {}).get("ct_windows") or [[40.0, 400.0]]
    method = str(exported.config.get("method", {}).get("name", "?"))
    text = info.resolved(exported.run_name, method, exported.spatial_dims)
    return {
        "schema": SCHEMA_URL,
        "version": info.version,
        "changelog": {info.version: text["changelog"]},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required_packages(needs_medssl(exported.network_kwargs)),
        "name": text["name"],
        "task": f"Self-supervised pretrained {exported.spatial_dims}D encoder (feature extractor) for medical images",
        "description": text["description"],
        "authors": text["authors"],
        "copyright": text["copyright"],
        "license": text["license"],
        "intended_use": text["intended_use"],
        "data_source": text["data_source"],
        "data_type": "2D images (PNG, JPEG, BMP, TIFF: Pillow) and NIfTI volumes (nibabel)",
        "image_classes": f"{channels} channel(s) in [0, 1]: "
        + "; ".join(f"{k}: {v}" for k, v in channel_definition(channels, windows, plan.modality).items()),
        "pred_classes": f"{exported.out_dim} features (global average pool of the last stage)",
        "references": [
            "medssl: self-supervised pretraining for medical images (configs/metadata.json -> medssl)",
            *(
                ["Carreira & Zisserman, Quo Vadis, Action Recognition? (I3D inflation), CVPR 2017"]
                if exported.inflation
                else []
            ),
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": plan.modality,
                    "num_channels": channels,
                    "spatial_shape": [crop] * exported.spatial_dims,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": channel_definition(channels, windows, plan.modality),
                }
            },
            "outputs": {
                "pred": {
                    "type": "embedding",
                    "format": "features",
                    "num_channels": exported.out_dim,
                    "spatial_shape": [],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {},
                }
            },
        },
        "medssl": adaptation_metadata(exported, plan),
    }


def inference_config(exported: ExportedBackbone, plan: InferencePlan | None = None) -> dict[str, Any]:
    """``configs/inference.json`` (:mod:`medssl.export.inference`): ``network_def`` for MONAI's tools
    (``monai.bundle.load`` copies ``models/model.pt`` into it), ``load_weights`` (the same, strictly, for a parser
    whose ``bundle_root`` points at the bundle), medssl's preprocessing as MONAI transforms and a ``run`` that writes
    the ``[N, D]`` embeddings of a folder or a datalist."""
    plan = plan or inference_plan(exported)
    return inference_config_of(
        network_def=network_definition(exported.network_kwargs),
        spatial_dims=exported.spatial_dims,
        preprocess=dict(exported.config.get("data", {}).get("preprocess", {}) or {}),
        modality=plan.modality,
        channels=plan.channels,
        image_size=plan.image_size,
        torchscript_network=needs_medssl(exported.network_kwargs),
        output_metadata=_plain_values({
            "bundle": "medssl",
            "run_id": exported.run_id,
            "run_name": exported.run_name,
            "method": exported.config.get("method", {}).get("name"),
            "spatial_dims": exported.spatial_dims,
            "pooling": "mean over every axial slice" if exported.spatial_dims == 2 else "whole volume",
        }),
    )  # fmt: skip


def _plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """Values a ConfigParser leaves as they are: text starting with ``$``, ``@`` or ``%`` would be read as code, a
    reference or a macro, and ``::`` as an id separator."""
    safe = {}
    for key, value in values.items():
        if isinstance(value, str):
            value = value.replace("::", ": :")
            value = "_" + value if value[:1] in ("$", "@", "%") else value
        safe[key] = value
    return safe


def write_torchscript(exported: ExportedBackbone, path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> Path:
    """``models/model.ts``: the encoder with the bundle's weights, in eval mode, compiled by MONAI's
    ``convert_to_torchscript`` and saved by ``save_net_with_metadata`` with ``metadata.json`` and ``inference.json``
    as extra files (what ``monai.bundle ckpt_export`` writes; ``monai.data.load_net_with_metadata`` reads it). It
    maps ``[B, C, *spatial]`` to ``[B, D]`` with PyTorch alone (no MONAI, no medssl)."""
    from monai.data import save_net_with_metadata
    from monai.networks.utils import convert_to_torchscript

    from medssl.models.encoders import monai_resnet

    network = monai_resnet(exported.network_kwargs)
    network.load_state_dict(exported.weights, strict=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"inference.json": json.dumps(config).encode()}
    with warnings.catch_warnings():  # PyTorch 2.10+ deprecates TorchScript; MONAI's bundles still ship model.ts
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        scripted = convert_to_torchscript(network.eval())
        save_net_with_metadata(
            scripted, str(path), include_config_vals=False, append_timestamp=False, meta_values=metadata,
            more_extra_files=extra,
        )  # fmt: skip
    return path


README = """# {name}

A {dims}D ResNet encoder pretrained without labels by medssl (run `{run_name}`, method `{method}`): images
`[B, {channels}, {axes}]` in [0, 1] -> features `[B, {out_dim}]`.

{intended_use}

Authors: {authors}. Copyright: {copyright}. Licence: {license}.

## Embeddings of a folder (MONAI only)

From the bundle folder (MONAI's command line needs `fire`: `pip install fire`):

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --input_dir /path/to/images --output_file embeddings.pt          # or --datalist datalist.json
```

reads the PNG/JPEG/BMP/TIFF images and NIfTI volumes under the folder, preprocesses them as medssl did in
pretraining (MONAI transforms: reorientation to RAS, spacing, intensity normalisation by `--modality`
CT|MR|OT, default `{modality}`) and writes `embeddings.pt` (`torch.load(..., weights_only=True)`): `id` (the
datalist's ids, else salted hashes of the file names, never paths: set `--id_salt`), `level` (image or volume),
`embedding` `[N, {out_dim}]`. A datalist is MONAI's decathlon JSON: `{{"test": [{{"image": "a.nii.gz", "id":
"case-1"}}, ...]}}`.

## The network

```python
import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("configs/inference.json")
net = parser.get_parsed_content("network_def")
net.load_state_dict(torch.load("models/model.pt", weights_only=True), strict=True)
features = net.eval()(images)  # images [B, {channels}, {axes}] in [0, 1] -> [B, {out_dim}]

scripted = torch.jit.load("models/model.ts")  # the same network, PyTorch only
```

Check the metadata against MONAI's schema: `python -m monai.bundle verify_metadata --meta_file
configs/metadata.json` (downloads the schema; medssl ships a copy: `medssl.export.metadata.verify_metadata_offline`).
`configs/metadata.json` -> `medssl` says how the encoder was pretrained (axis order, spacing, intensity
normalisation per modality, crop size).
"""


def write_bundle(
    exported: ExportedBackbone, out: Path, info: BundleInfo | None = None, torchscript: bool = True
) -> Path:
    """Write the bundle folder (replaced as a whole: written beside it, then renamed).

    ``torchscript``: also ``models/model.ts`` (needed by the ``run`` of a bundle whose network needs medssl)."""
    out = Path(out)
    info = info or BundleInfo()
    plan = inference_plan(exported)
    metadata = bundle_metadata(exported, info, plan)
    config = inference_config(exported, plan)
    if not torchscript and needs_medssl(exported.network_kwargs):
        raise ValueError("a bundle whose network needs medssl (norm other than batch) runs from models/model.ts")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "docs").mkdir()
        atomic_write_text(tmp / "configs" / "metadata.json", json.dumps(metadata, indent=2))
        atomic_write_text(tmp / "configs" / "inference.json", json.dumps(config, indent=2))
        weights = {k: v.detach().cpu() for k, v in exported.weights.items()}
        save_checkpoint(tmp / "models" / "model.pt", weights, checksum=False)  # MONAI's layout; users replace it
        if torchscript:
            write_torchscript(exported, tmp / "models" / "model.ts", metadata, config)
        if exported.slice_transformer is not None:
            transformer = {k: v.detach().cpu() for k, v in exported.slice_transformer.weights.items()}
            save_checkpoint(tmp / SLICE_TRANSFORMER_FILE, transformer, checksum=False)
        channels = exported.network_kwargs.get("n_input_channels", 1)
        atomic_write_text(
            tmp / "docs" / "README.md",
            README.format(
                name=metadata["name"],
                dims=exported.spatial_dims,
                axes="H, W" if exported.spatial_dims == 2 else "D, H, W",
                run_name=exported.run_name,
                method=exported.config.get("method", {}).get("name", "?"),
                channels=channels,
                out_dim=exported.out_dim,
                intended_use=metadata["intended_use"],
                authors=metadata["authors"],
                copyright=metadata["copyright"],
                license=metadata["license"],
                modality=config["modality"],
            ),
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def export_bundle(
    source: str,
    out: str | Path,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
    spatial_dims: int = 2,
    depth_kernel: int | None = None,
    metadata: Sequence[str] | Mapping[str, str] | BundleInfo | None = None,
    torchscript: bool = True,
) -> Path:
    """``medssl export``: resolve ``source``, write the bundle to ``out`` (``spatial_dims=3``: the I3D-inflated 3D
    encoder), and log it to the run when there is one.

    ``metadata``: ``key=value`` strings (``--meta``), a mapping or a :class:`~medssl.export.metadata.BundleInfo`:
    version, changelog, authors, copyright, license, intended_use, name, description, data_source."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"--spatial-dims must be 2 or 3, got {spatial_dims}")
    info = bundle_info(metadata)  # before any work: a bad --meta stops here
    exported = resolve_source(source, tracking_uri)
    if spatial_dims == 3:
        exported = inflate_to_3d(exported, depth_kernel)
    path = write_bundle(exported, Path(out), info, torchscript=torchscript)
    if log_to_mlflow and exported.run_id:
        from medssl.runtime.tracking import Tracker, default_tracking_uri

        uri = tracking_uri or default_tracking_uri(Path.cwd())
        try:
            tracker = Tracker(uri, "medssl-pretrain", run_id=exported.run_id)
        except ValueError:
            return path  # the run lives in another store: the bundle is written, nothing to log to
        tracker.log_artifact(path, "bundle" if spatial_dims == 2 else "bundle_3d")
        tracker.finish("FINISHED")
    return path
