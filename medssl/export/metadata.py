"""A bundle's ``configs/metadata.json`` as MONAI's schema wants it, and its offline check.

* :data:`SCHEMA_URL`: the schema the metadata names (MONAI's ``meta_schema_20240725.json``); a verbatim copy ships in
  ``medssl/export/schema/`` (:func:`schema_path`, its source and licence in the README there), so
  :func:`verify_metadata_offline` runs MONAI's own ``verify_metadata`` without a network.
* :class:`BundleInfo`: the fields a person vouches for (version, changelog, authors, copyright, licence, intended
  use, name, description, data source), with defaults that say when they were not given; ``medssl export --meta
  key=value`` sets them (:func:`bundle_info`).
* :func:`required_packages`: what the bundle needs besides MONAI and PyTorch (Pillow and nibabel for its readers,
  medssl itself only when ``network_def`` is medssl's builder).
* :func:`channel_definition`: ``network_data_format`` ``channel_def`` of the image input (each CT window, else the
  modality).
"""

from __future__ import annotations

import csv
import importlib.metadata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medssl.runtime.csv_lines import at_record_start

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_FILE = "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
"""md5 of the shipped copy (what ``verify_metadata --hash_val`` checks before using it)."""

INTENDED_USE = (
    "Research use only: a self-supervised feature extractor for research on representations, retrieval and "
    "fine-tuning. Not a medical device; not for diagnosis, treatment or any other clinical decision."
)
UNSPECIFIED = "unspecified (medssl export --meta {key}=...)"
MODALITIES = ("CT", "MR", "OT")
"""Intensity normalisations of the bundle's preprocessing: CT windows, MR robust percentiles of non-zero voxels,
robust percentiles of all pixels for anything else (X-ray, ``OT``)."""


def schema_path() -> Path:
    """The shipped copy of MONAI's metadata schema (:data:`SCHEMA_FILE`)."""
    return Path(__file__).resolve().parent / "schema" / SCHEMA_FILE


@dataclass
class BundleInfo:
    """What ``medssl export --meta key=value`` sets in ``configs/metadata.json``; ``None``: a default made from the run
    (:meth:`resolved`)."""

    version: str = "1.0.0"
    changelog: str | None = None  # this version's entry; default: what was exported, from which run
    authors: str | None = None
    copyright: str | None = None
    license: str | None = None
    intended_use: str = INTENDED_USE
    name: str | None = None
    description: str | None = None
    data_source: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"--meta {f.name}: needs a non-empty text, got {value!r}")

    def resolved(self, run_name: str, method: str, spatial_dims: int) -> dict[str, str]:
        """Every field as text: the given ones, else defaults naming the run (``unspecified (...)`` for authors,
        copyright and licence, which only a person can state)."""
        values = {k: v for k, v in asdict(self).items() if v is not None}
        medssl_version = _version("medssl") or "?"
        defaults = {
            "changelog": f"exported by medssl {medssl_version} from pretraining run {run_name} (method {method})",
            "name": f"medssl {method} {spatial_dims}D encoder ({run_name})",
            "description": (
                f"A {spatial_dims}D ResNet encoder pretrained without labels by medssl (method {method}, run "
                f"{run_name}): [B, C, *spatial] images in [0, 1] -> [B, D] globally pooled features, the input of "
                "linear probes, retrieval and fine-tuning. configs/inference.json reproduces medssl's preprocessing "
                "with MONAI transforms and writes the embeddings of a folder or a datalist."
            ),
            "data_source": "the pretraining run's own data (not distributed with the bundle)",
        }
        for key in ("authors", "copyright", "license"):
            defaults[key] = UNSPECIFIED.format(key=key)
        return {**defaults, **values}


def bundle_info(options: Sequence[str] | Mapping[str, str] | BundleInfo | None) -> BundleInfo:
    """``key=value`` strings (``medssl export --meta``), a mapping or a :class:`BundleInfo`.

    Raises:
        ValueError: an unknown key (the message lists the known ones), a missing ``=`` or an empty value.
    """
    if options is None:
        return BundleInfo()
    if isinstance(options, BundleInfo):
        return options
    if isinstance(options, Mapping):
        pairs = list(options.items())
    else:
        pairs = []
        for option in options:
            key, equals, value = str(option).partition("=")
            if not equals:
                raise ValueError(f"--meta {option!r}: expected key=value (e.g. authors='A. Author')")
            pairs.append((key.strip(), value))
    known = [f.name for f in fields(BundleInfo)]
    for key, _ in pairs:
        if key not in known:
            raise ValueError(f"--meta {key}: unknown key; one of {', '.join(known)}")
    return BundleInfo(**dict(pairs))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def required_packages(needs_medssl: bool) -> dict[str, str]:
    """``required_packages_version``: packages the bundle needs beyond MONAI's base requirements (MONAI and PyTorch
    have their own fields, ``monai_version`` and ``pytorch_version``): nibabel (NIfTI) and Pillow (2D images) for
    the readers of ``configs/inference.json``, and medssl when ``network_def`` is medssl's builder (norms other
    than batch)."""
    packages = {"nibabel": _version("nibabel"), "pillow": _version("pillow")}
    if needs_medssl:
        packages["medssl"] = _version("medssl")
    return {name: version or "unknown" for name, version in packages.items()}


def window_name(level: float, width: float) -> str:
    """``CT window 40/400`` (level/width in HU)."""
    return f"CT window {level:g}/{width:g}"


def default_channels(n_input: int, ct_windows: Sequence[Sequence[float]], modality: str) -> list[int]:
    """The preprocessed channels the network gets (``channels`` in ``configs/inference.json``): all CT windows when
    the network takes one channel per window, else the first ones (channel 0 for a one-channel encoder: the first
    window, as medssl's probes and ``medssl embed`` use)."""
    available = len(ct_windows) if modality == "CT" else 1
    return list(range(n_input)) if n_input <= available else [0] * n_input


def channel_definition(n_input: int, ct_windows: Sequence[Sequence[float]], modality: str) -> dict[str, str]:
    """``channel_def`` of the image input: each CT window by name when the preprocessing has several windows (or
    the modality is CT), else the modality.

    With a one-channel encoder and several windows (pretraining gave each view one window drawn at random), the
    one channel is any of the windows, the first by default (``channels`` in ``configs/inference.json``)."""
    names = [window_name(float(level), float(width)) for level, width in ct_windows]
    if len(names) > 1 or modality == "CT":
        if n_input == len(names):
            return {str(i): name for i, name in enumerate(names)}
        if n_input == 1:
            if len(names) == 1:
                return {"0": names[0]}
            choices = "; ".join(f"{name} (channels=[{i}])" for i, name in enumerate(names))
            return {"0": f"one CT window: {choices}; default channels=[0]"}
    return {str(i): modality for i in range(n_input)}


def pretraining_modalities(config: Mapping[str, Any]) -> dict[str, int]:
    """Rows per modality of the pretraining manifest (``data.manifest`` of the run's config), when that file is
    readable from here; ``{}`` otherwise. Only the ``modality`` column is read."""
    manifest = (config.get("data") or {}).get("manifest")
    if not manifest or not Path(str(manifest)).is_file():
        return {}
    try:
        with open(str(manifest), newline="", encoding="utf-8") as handle:
            records = at_record_start(handle)
            lines: Iterable[str] = (line for start, line in records if not (start and line.startswith("#")))
            counts = Counter(str(record.get("modality") or "OT").upper() for record in csv.DictReader(lines))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return dict(counts.most_common())


def default_modality(modalities: Mapping[str, int], n_input: int, ct_windows: Sequence[Sequence[float]]) -> str:
    """The intensity normalisation ``configs/inference.json`` applies unless told otherwise (``modality``): the
    most frequent pretraining modality (anything but CT and MR is ``OT``: percentiles of all pixels); CT when the
    encoder takes one channel per CT window; else ``OT``."""
    for name, _ in sorted(modalities.items(), key=lambda item: -item[1]):
        return name if name in MODALITIES else "OT"
    return "CT" if n_input > 1 and n_input == len(ct_windows) else "OT"


def verify_metadata_offline(meta_file: str | Path) -> None:
    """MONAI's ``monai.bundle.verify_metadata`` on ``meta_file`` against the shipped schema (what ``python -m
    monai.bundle verify_metadata --meta_file ... --filepath <schema_path()> --hash_val <SCHEMA_MD5>`` runs): the local
    copy and its md5 are given, so MONAI skips the download (and refuses a changed copy). Needs ``jsonschema``.

    Raises:
        ValueError: the metadata does not validate (MONAI's message names the failing field).
    """
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(meta_file), filepath=str(schema_path()), hash_val=SCHEMA_MD5, hash_type="md5")
