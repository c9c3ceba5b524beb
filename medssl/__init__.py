"""medssl: self-supervised pretraining of 2D/3D medical imaging backbones.

The Python API takes the configs the command line takes (Hydra-style ``key=value`` override lists, keyword
arguments for the same keys) and returns what the commands produce::

    import medssl

    result = medssl.pretrain(["data.manifest=data_manifests/mine.csv", "method=simclr"], trainer={"max_steps": 200})
    bundle = medssl.export(result, "bundles/mine")                   # the MONAI bundle's folder
    metrics = medssl.finetune(task="classification", protocol="linear", model={"pretrained": str(bundle)})
    table = medssl.embed(bundle, "data_manifests/mine.csv", "embeddings.parquet")

``import medssl`` stays light: torch, MONAI and MLflow are imported by the first call that needs them.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medssl import export as _export_package  # the sub-package (a docstring; light), made callable below
from medssl.version import __version__

if TYPE_CHECKING:
    from medssl.downstream.embed import EmbeddingTable
    from medssl.train.trainer import TrainResult

__all__ = ["__version__", "embed", "export", "finetune", "pretrain"]

_PLAIN = re.compile(r"[\w./:@%+~*?|$-]+")  # a string Hydra's override grammar reads as itself, unquoted
_NOT_STRINGS = re.compile(r"(?i)(null|true|false|[-+]?(\d[\d_]*)?(\.\d*)?(e[-+]?\d+)?|[-+]?(inf|nan))")


def _value(value: Any) -> str:
    """``value`` in Hydra's override grammar (also valid YAML for the dotlists of ``finetune``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(_value(item) for item in value) + "]"
    text = str(value)  # str, Path
    if _PLAIN.fullmatch(text) and not _NOT_STRINGS.fullmatch(text) and "${" not in text:
        return text
    # quoted: backslashes are escaped only where they precede a quote or end the string (Hydra's rule)
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def as_overrides(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keyword arguments as ``key=value`` overrides: a mapping is a section of keys (``trainer={"max_steps": 2}``
    is ``trainer.max_steps=2``), anything else one value (``method="simclr"`` picks the group option as
    ``method=simclr`` does; lists become ``[a,b]``, ``None`` ``null``)."""
    overrides = []
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            overrides += as_overrides(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={_value(value)}")
    return overrides


def pretrain(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "pretrain",
    config_dir: str | Path | None = None,
    **settings: Any,
) -> TrainResult:
    """Pretrain as ``medssl pretrain`` does (the Hydra application of :mod:`medssl.train.app`), in this process.

    Args:
        overrides: Hydra overrides as on the command line (``["method=simclr", "trainer.max_steps=200"]``).
        config_name: the top-level config (``pretrain``, ``demo`` or one of ``config_dir``).
        config_dir: a folder of your own configs added to the shipped ones (default: ``$MEDSSL_CONFIG_DIR``).
        settings: more overrides as keyword arguments, after ``overrides`` (``seed=1``, ``method="simclr"``,
            ``trainer={"max_steps": 2}``; see :func:`as_overrides`).

    Returns:
        the run's ``TrainResult`` (``status``, ``step``, ``run_name``, ``output_dir``, ``run_id``, ``backbone``,
        ``metrics``). The run folder (``output_dir``) holds ``.hydra/`` as after ``medssl pretrain``.

    Raises:
        ValueError: a bad override (naming the key), or data the run cannot use.
    """
    from medssl.train.app import run_pretrain

    everything = [*overrides, *as_overrides(settings)]
    (result,) = run_pretrain(everything, config_name=config_name, config_dir=config_dir, configure_logging=False)
    return result


def _export(
    source: str | Path | TrainResult,
    out: str | Path,
    *,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
    spatial_dims: int = 2,
    depth_kernel: int | None = None,
    **options: Any,
) -> Path:
    """Write a pretrained encoder as a MONAI bundle, as ``medssl export`` does; returns the bundle's folder.

    Args:
        source: a run folder (``outputs/<run>``), a checkpoint file, an MLflow run id, or the result of
            :func:`medssl.pretrain`.
        out: the bundle folder to write (replaced if it exists).
        tracking_uri: the MLflow store of a run id (default: ``$MLFLOW_TRACKING_URI`` or ``./mlruns``).
        log_to_mlflow: also log the bundle to the pretraining run.
        spatial_dims: 3 for the encoder inflated to a 3D ResNet (I3D).
        depth_kernel: the 3D stem kernel depth (odd; default 3).
        options: the other keyword arguments of :func:`medssl.export.bundle.export_bundle` (``metadata``: the
            bundle's version, authors, license...; ``torchscript``).
    """
    from medssl.export.bundle import export_bundle

    if not isinstance(source, str | Path):
        source = source.output_dir
    return export_bundle(
        str(source),
        Path(out),
        tracking_uri=tracking_uri,
        log_to_mlflow=log_to_mlflow,
        spatial_dims=spatial_dims,
        depth_kernel=depth_kernel,
        **options,
    )


class _CallablePackage(types.ModuleType):
    """``medssl.export`` is both the sub-package (``medssl.export.bundle``...) and the API function
    ``medssl.export(source, out, ...)``; a module attribute named ``export`` would be replaced by the sub-package
    the first time it is imported."""

    __call__ = staticmethod(_export)  # called on the module: no self


_export_package.__class__ = _CallablePackage
export = _export_package


def finetune(overrides: Sequence[str] = (), *, config_dir: str | Path | None = None, **settings: Any) -> Any:
    """Fine-tune or probe as ``medssl finetune`` does: ``finetune/<task>.yaml`` plus overrides.

    Args:
        overrides: ``key=value`` overrides as on the command line (``["task=segmentation", "mode=3d"]``).
        config_dir: a folder of your own configs (default: ``$MEDSSL_CONFIG_DIR``): ``<dir>/finetune/<task>.yaml``
            or ``<dir>/<task>.yaml`` replaces the shipped task file.
        settings: more overrides as keyword arguments (``task="classification"``, ``protocol="knn"``,
            ``model={"pretrained": "bundles/mine"}``, ``data={"label_fraction": 0.1}``).

    Returns:
        the task's result: a dict of its metrics (and what the task adds, e.g. ``loaded`` for classification).
    """
    from medssl.downstream.finetune import compose_finetune_config, run_finetune

    config = compose_finetune_config([*overrides, *as_overrides(settings)], directory=config_dir)
    return run_finetune(config)


def embed(
    pretrained: str | Path = "none",
    manifest: str | Path | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> EmbeddingTable:
    """Embeddings of a manifest's images and volumes from a pretrained encoder, as ``medssl embed`` does
    (:func:`medssl.downstream.embed.embed`, which documents ``options``: ``cache_dir``, ``size``, ``splits``,
    ``slices``, ``batch_size``, ``device``, ``progress``, ``overrides``, ``config_dir``).

    Returns:
        the ``EmbeddingTable`` (also written to ``out`` when given: ``.parquet``, ``.pt`` or ``.csv``).
    """
    from medssl.downstream.embed import embed as embed_manifest

    return embed_manifest(pretrained, manifest, out, **options)
