"""``medssl embed``: embeddings of a manifest's images and volumes from a pretrained encoder, as a table.

Every row of the manifest (optionally of some splits) that its preprocessed cache holds (the cache is built if
missing, as for the probes) becomes one or more rows of the table:

* a 2D image: one row, ``level`` ``image``;
* a 3D volume: one row per axial slice, ``level`` ``slice`` with its index ``slice`` (``k`` of the cached
  ``[C, X, Y, Z]`` array: canonical RAS orientation, inferior to superior, on the cache's grid, which
  ``preprocess.spacing`` may have resampled), and one pooled row, ``level`` ``volume``: the mean of its slices'
  embeddings (every slice, equally weighted). The volume row comes first, then its slices in order.

Each plane goes through the probes' deterministic view (:class:`medssl.downstream.probes.LabelledImageDataset`):
channel 0 of the cached array (the first HU window for CT), slices in display orientation
(:func:`medssl.data.geometry.slice_to_display`), intensities of the cache in [0, 1], resized to ``size x size``
(bilinear, anti-aliased); no random crop, flip or jitter. The encoder runs in eval mode without gradients through
:func:`medssl.downstream.probes.extract_features`, batched, with its progress report; the embedding of a volume's
middle slice is therefore the probes' feature of that volume.

Rows are named by the manifest's ``id`` (a keyed pseudonym), never by a path or a DICOM attribute; the table also
carries the row's ``modality``, ``split`` and ``label`` (manifest columns). Written by suffix (atomically):

* ``.parquet`` (needs pyarrow): columns ``id``, ``level``, ``slice``, ``modality``, ``split``, ``label`` and
  ``embedding`` (a fixed-size list of float32); the run's settings in the schema metadata under ``medssl``;
* ``.pt``: a ``dict`` for ``torch.load(path, weights_only=True)``: ``id``, ``level``, ``modality``, ``split``,
  ``label`` (lists of str), ``slice`` (int64 ``[N]``), ``embedding`` (float32 ``[N, D]``) and ``metadata``;
* ``.csv``: a header ``id,level,slice,modality,split,label,e0,...,e{D-1}`` and one line per row (floats with 9
  significant digits: float32 round-trips exactly).

``slice`` is -1 on image and volume rows. :func:`read_embeddings` reads any of the three back.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from medssl.data.datasets import CachedItem
from medssl.data.errors import ManifestError
from medssl.data.geometry import slice_to_display
from medssl.data.preprocess import PreprocessConfig
from medssl.downstream.spaces import SPACES
from medssl.runtime.checks import at_least
from medssl.runtime.csv_lines import CsvLines

FORMATS = (".parquet", ".pt", ".csv")
LEVELS = ("image", "slice", "volume")
NO_SLICE = -1
"""``slice`` of image and volume rows."""
TABLE_VERSION = "medssl-embeddings v1"
CONFIG_FILE = "embed/default.yaml"
"""The shipped config (``medssl/configs/embed/default.yaml``)."""
_TEXT_COLUMNS = ("id", "level", "modality", "split", "label")


def parquet_available() -> bool:
    """Whether ``.parquet`` can be written and read (pyarrow is importable)."""
    return importlib.util.find_spec("pyarrow") is not None


def check_output(path: str | Path) -> Path:
    """``path`` if its suffix names a format this platform can write.

    Raises:
        ValueError: another suffix, or ``.parquet`` without pyarrow (the message names the other formats).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"out={path}: the suffix chooses the format: one of {', '.join(FORMATS)}, got {suffix!r}")
    if suffix == ".parquet" and not parquet_available():
        raise ValueError(
            f"out={path}: .parquet needs pyarrow, which is not installed (pip install pyarrow); "
            "or write .pt (torch.load) or .csv"
        )
    return path


# ---------------------------------------------------------------------------------------------------------- configs
@dataclass
class EmbedModelConfig:
    pretrained: str = "none"  # a bundle folder (medssl export), an MLflow run id (or what load_backbone takes), none
    encoder: str = "resnet18"  # random init (pretrained=none): an encoder name, or a bundle / run id to copy
    space: str = "backbone"  # backbone | common | salient (SepCLR heads; needs a run folder or checkpoint)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"model.space must be one of {SPACES}, got {self.space!r}")


@dataclass
class EmbedDataConfig:
    manifest: str = "data_manifests/archive.csv"
    root: str | None = None  # the archive root (default: the path map's)
    path_map: str | None = None  # the manifest's path map (default: the one it names)
    cache_dir: str = "cache"
    cache_workers: int = 2
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    size: int = 96  # planes resized to size x size, as the probes (data.size of medssl finetune)
    splits: list[str] | None = None  # only rows of these splits ("" = rows without one); null: every row

    def __post_init__(self) -> None:
        at_least(1, **{"data.size": self.size})


@dataclass
class EmbedConfig:
    """``configs/embed/default.yaml`` (``medssl embed key=value ...``)."""

    out: str | None = None  # .parquet | .pt | .csv (by suffix); null: nothing written (the Python API)
    slices: bool = True  # a row per slice of each volume besides its pooled row (false: pooled rows only)
    batch_size: int = 64  # planes per forward pass
    num_workers: int = 0  # loader processes reading the cache
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # the random initialisation of pretrained=none
    tracking_uri: str | None = None  # MLflow store of a run id (default: $MLFLOW_TRACKING_URI or ./mlruns)
    progress: bool = True
    model: EmbedModelConfig = field(default_factory=EmbedModelConfig)
    data: EmbedDataConfig = field(default_factory=EmbedDataConfig)

    def __post_init__(self) -> None:
        at_least(1, batch_size=self.batch_size)
        at_least(0, num_workers=self.num_workers)
        if self.out is not None:
            check_output(self.out)


def compose_embed_config(
    overrides: Sequence[str] | None = None,
    values: Mapping[str, Any] | None = None,
    directory: str | Path | None = None,
) -> EmbedConfig:
    """``embed/default.yaml`` (the user's ``directory``'s, or ``$MEDSSL_CONFIG_DIR``'s, when it has one; else the
    shipped one), then ``values`` (a nested mapping, e.g. from Python keyword arguments), then ``key=value``
    overrides, typed by :class:`EmbedConfig`.

    Raises:
        ValueError: an unknown key or a bad value, naming the key.
    """
    from medssl.runtime.configs import config_file, structured_config

    merged = OmegaConf.merge(OmegaConf.load(config_file(CONFIG_FILE, directory)), OmegaConf.create(dict(values or {})))
    return structured_config(EmbedConfig, merged, list(overrides or []))


# ---------------------------------------------------------------------------------------------------------- the table
@dataclass
class EmbeddingTable:
    """One row per image, per slice of a volume and per volume (pooled).

    Attributes:
        ids: ``[N]`` str, the manifest row id of each row (a volume's slices share its id).
        levels: ``[N]`` str, ``image``, ``slice`` or ``volume``.
        slices: ``[N]`` int64, the slice index of ``slice`` rows (axis Z of the cached ``[C, X, Y, Z]``), -1 else.
        modalities, splits, labels: ``[N]`` str, the manifest's columns of the row.
        embeddings: ``[N, D]`` float32.
        metadata: how they were made (model, view size, preprocessing); no paths of the archive.
    """

    ids: np.ndarray
    levels: np.ndarray
    slices: np.ndarray
    modalities: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("ids", "levels", "modalities", "splits", "labels"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=str).reshape(-1))
        self.slices = np.asarray(self.slices, dtype=np.int64).reshape(-1)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        n = len(self.ids)
        if self.embeddings.ndim != 2 or len(self.embeddings) != n:
            raise ValueError(f"embeddings must be [N, D] with N = {n} rows, got shape {self.embeddings.shape}")
        for name in ("levels", "slices", "modalities", "splits", "labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one value per row ({n}), got {len(getattr(self, name))}")
        unknown = sorted(set(self.levels.tolist()) - set(LEVELS))
        if unknown:
            raise ValueError(f"levels must be among {LEVELS}, got {unknown}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """``D``, the embedding size."""
        return int(self.embeddings.shape[1])

    def select(self, level: str) -> EmbeddingTable:
        """The rows of one ``level`` (``image``, ``slice`` or ``volume``), in order."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        keep = self.levels == level
        return EmbeddingTable(
            **{f.name: getattr(self, f.name)[keep] for f in fields(self) if f.name != "metadata"},
            metadata=dict(self.metadata),
        )

    def columns(self) -> dict[str, Any]:
        """The table by column name as in the files: ``id``, ``level``, ``slice``, ``modality``, ``split``,
        ``label`` (``[N]``) and ``embedding`` (``[N, D]``)."""
        return {
            "id": self.ids,
            "level": self.levels,
            "slice": self.slices,
            "modality": self.modalities,
            "split": self.splits,
            "label": self.labels,
            "embedding": self.embeddings,
        }

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` with the columns of :meth:`columns` (``embedding``: one ``[D]`` array per row, as
        ``pandas.read_parquet`` gives it). Needs pandas."""
        import pandas as pd

        frame = pd.DataFrame({k: v for k, v in self.columns().items() if k != "embedding"})
        frame["embedding"] = list(self.embeddings)
        return frame


def _table_from_columns(columns: Mapping[str, Any], metadata: dict[str, Any]) -> EmbeddingTable:
    return EmbeddingTable(
        ids=columns["id"],
        levels=columns["level"],
        slices=columns["slice"],
        modalities=columns["modality"],
        splits=columns["split"],
        labels=columns["label"],
        embeddings=columns["embedding"],
        metadata=metadata,
    )


def write_embeddings(table: EmbeddingTable, path: str | Path) -> Path:
    """Write ``table`` to ``path`` in the format of its suffix (``.parquet``, ``.pt``, ``.csv``), atomically: a
    reader sees the previous file or the whole new one (:mod:`medssl.runtime.files`)."""
    from medssl.runtime.files import atomic_write_with

    path = check_output(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        payload = {
            "format": TABLE_VERSION,
            **{k: v.tolist() for k, v in table.columns().items() if k in _TEXT_COLUMNS},
            "slice": torch.from_numpy(table.slices.copy()),
            "embedding": torch.from_numpy(np.ascontiguousarray(table.embeddings)),
            "metadata": json.loads(json.dumps(table.metadata)),  # plain types: loadable with weights_only=True
        }
        return atomic_write_with(path, lambda handle: torch.save(payload, handle))
    if suffix == ".csv":
        return atomic_write_with(path, lambda handle: _write_csv(table, handle))
    return atomic_write_with(path, lambda handle: _write_parquet(table, handle))


def _write_csv(table: EmbeddingTable, handle: Any) -> None:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    writer = CsvLines(text)  # a "\r" in a label is quoted, not read back as a line break
    writer.writerow(["id", "level", "slice", "modality", "split", "label", *(f"e{j}" for j in range(table.dim))])
    for i in range(len(table)):
        writer.writerow([table.ids[i], table.levels[i], int(table.slices[i]), table.modalities[i], table.splits[i],
                         table.labels[i], *(format(v, ".9g") for v in table.embeddings[i].tolist())])  # fmt: skip
    text.flush()
    text.detach()  # the handle stays open for the atomic rename


def _write_parquet(table: EmbeddingTable, handle: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {k: pa.array(v.tolist(), type=pa.string()) for k, v in table.columns().items() if k in _TEXT_COLUMNS}
    arrays["slice"] = pa.array(table.slices, type=pa.int64())
    flat = pa.array(np.ascontiguousarray(table.embeddings).reshape(-1), type=pa.float32())
    arrays["embedding"] = pa.FixedSizeListArray.from_arrays(flat, table.dim)
    order = ["id", "level", "slice", "modality", "split", "label", "embedding"]
    schema_metadata = {"medssl": json.dumps({"format": TABLE_VERSION, **table.metadata})}
    pq.write_table(pa.table({k: arrays[k] for k in order}, metadata=schema_metadata), handle)


def read_embeddings(path: str | Path) -> EmbeddingTable:
    """The table that :func:`write_embeddings` wrote to ``path`` (``.parquet``, ``.pt`` or ``.csv``; a CSV carries
    no metadata)."""
    path = check_output(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        columns = {**payload, "slice": payload["slice"].numpy(), "embedding": payload["embedding"].numpy()}
        return _table_from_columns(columns, dict(payload.get("metadata", {})))
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as text:
            reader = csv.reader(text)
            header = next(reader)
            records = list(reader)
        width = len(header) - 6
        columns = {name: [r[k] for r in records] for k, name in enumerate(header[:6])}
        columns["slice"] = [int(s) for s in columns["slice"]]
        embedding = np.asarray([r[6:] for r in records], dtype=np.float64).astype(np.float32)
        columns["embedding"] = embedding.reshape(len(records), width)
        return _table_from_columns(columns, {})
    import pyarrow.parquet as pq

    stored = pq.read_table(path)
    metadata = json.loads((stored.schema.metadata or {}).get(b"medssl", b"{}"))
    metadata.pop("format", None)
    embedding = stored.column("embedding").combine_chunks()
    columns = {name: stored.column(name).to_pylist() for name in ("id", "level", "slice", "modality", "split", "label")}
    columns["embedding"] = embedding.flatten().to_numpy().reshape(len(stored), embedding.type.list_size)
    return _table_from_columns(columns, metadata)


# ---------------------------------------------------------------------------------------------------------- planes
class PlaneDataset(Dataset):
    """Every plane to embed of cached items: a 2D image's own plane, each axial slice of a volume.

    The view is the probes' (:class:`medssl.downstream.probes.LabelledImageDataset`), for every slice instead of the
    middle one only: channel 0, volumes' slices ``k`` (axis Z of ``[C, X, Y, Z]``) in display orientation,
    intensities scaled to float32 in [0, 1] (``entry.scale``), resized to ``size x size`` (bilinear, anti-aliased).

    ``__getitem__(i)`` returns ``{"image": [1, size, size] float32, "label": str(i)}`` (the plane's index, the
    ``label`` that :func:`medssl.downstream.probes.extract_features` collects). ``item_of[i]`` and ``slice_of[i]``
    (``[P]`` int64) say whose plane ``i`` is (-1: an image).
    """

    def __init__(self, items: Sequence[CachedItem], depths: Sequence[int], size: int) -> None:
        at_least(1, size=size)
        self.items = list(items)
        self.size = int(size)
        counts = [1 if item.row.dims == 2 else int(depth) for item, depth in zip(self.items, depths, strict=True)]
        self.item_of = np.repeat(np.arange(len(self.items), dtype=np.int64), counts)
        planes = [[NO_SLICE] if item.row.dims == 2 else range(n) for item, n in zip(self.items, counts, strict=True)]
        self.slice_of = np.fromiter((k for ks in planes for k in ks), dtype=np.int64, count=len(self.item_of))
        self._open: tuple[int, np.ndarray] | None = None  # the last item's memory map (its planes come in a row)

    def __len__(self) -> int:
        return len(self.item_of)

    def plane(self, index: int) -> np.ndarray:
        """The un-resized plane ``[H, W]`` float32 in [0, 1] (display orientation for slices)."""
        position = int(self.item_of[index])
        item = self.items[position]
        if self._open is None or self._open[0] != position:
            self._open = (position, item.entry.array())
        array = self._open[1]
        if item.row.dims == 2:
            plane = np.asarray(array[0])
        else:
            plane = slice_to_display(np.asarray(array[0, :, :, int(self.slice_of[index])]))
        return np.ascontiguousarray(plane, dtype=np.float32) * np.float32(item.entry.scale)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plane = torch.from_numpy(self.plane(index))[None, None]
        image = F.interpolate(plane, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return {"image": image[0], "label": str(index)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = None
        return state


def volume_depths(items: Sequence[CachedItem]) -> tuple[list[CachedItem], list[int], list[str]]:
    """The items whose cache entry can be read, their depths (slices ``Z`` of a volume, 1 for an image) and the
    reasons of the others (``<row id>: entry <key> unreadable ...``: the cache's content key, never a path)."""
    kept: list[CachedItem] = []
    depths: list[int] = []
    problems: list[str] = []
    for item in items:
        try:
            shape = [int(n) for n in item.entry.read_meta()["shape"]]
            if len(shape) != item.row.dims + 1 or min(shape) < 1:
                raise ValueError(f"shape {shape}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{item.row.id}: cache entry {item.entry.key} unreadable ({type(exc).__name__})")
            continue
        kept.append(item)
        depths.append(shape[-1] if item.row.dims == 3 else 1)
    return kept, depths, problems


def embed_items(
    network: nn.Module,
    items: Sequence[CachedItem],
    size: int = 96,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    slices: bool = True,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> EmbeddingTable:
    """The embedding table of cached items (see the module's docstring for its rows).

    Args:
        network: maps planes ``[B, 1, size, size]`` to features ``[B, D]`` (outputs with more dimensions are
            flattened); already on ``device``. Run in eval mode without gradients (its modes are restored).
        items: cached items (:func:`medssl.data.datasets.cached_items`), in the table's order.
        slices: also a row per slice of each volume (the pooled row is the mean over all its slices either way).

    Returns:
        the :class:`EmbeddingTable`: ``[N, D]`` with ``N`` = images + volumes (+ their slices when ``slices``).

    Raises:
        ValueError: nothing to embed.
    """
    from medssl.downstream.probes import extract_features

    readable, depths, problems = volume_depths(items)
    for problem in problems:
        print(f"medssl embed: skipped {problem}; `medssl manifest preprocess` rebuilds it")
    if not readable:
        raise ValueError("no readable cached image or volume to embed")
    dataset = PlaneDataset(readable, depths, size)
    features, order = extract_features(network, dataset, batch_size=batch_size, device=device,
                                       num_workers=num_workers, progress=progress, desc="medssl embed")  # fmt: skip
    if order.tolist() != [str(i) for i in range(len(dataset))]:  # the loader keeps the order (no shuffling)
        raise RuntimeError("planes came back out of order")
    rows: list[tuple[int, str, int]] = []  # (item, level, slice)
    vectors: list[np.ndarray] = []
    start = 0
    for position, (item, depth) in enumerate(zip(readable, depths, strict=True)):
        block = features[start : start + depth]  # [depth, D]
        start += depth
        if item.row.dims == 2:
            rows.append((position, "image", NO_SLICE))
            vectors.append(block)
            continue
        rows.append((position, "volume", NO_SLICE))
        vectors.append(block.mean(axis=0, dtype=np.float64, keepdims=True).astype(np.float32))
        if slices:
            rows.extend((position, "slice", k) for k in range(depth))
            vectors.append(block)
    owners = [readable[position].row for position, _, _ in rows]
    return EmbeddingTable(
        ids=[row.id for row in owners],
        levels=[level for _, level, _ in rows],
        slices=[k for _, _, k in rows],
        modalities=[row.modality for row in owners],
        splits=[row.split for row in owners],
        labels=[row.label for row in owners],
        embeddings=np.concatenate(vectors),
        metadata=dict(metadata or {}),
    )


# ---------------------------------------------------------------------------------------------------------- running
def embed_data(data: EmbedDataConfig, progress: bool = True) -> tuple[list[CachedItem], int]:
    """The cached items of the manifest's rows (of ``data.splits``), the cache built first where entries are
    missing (its progress reported when ``progress``), and how many of those rows the cache lacks (failed to
    preprocess: listed, by file key, in the cache's errors CSV)."""
    from medssl.data.cache import build_cache
    from medssl.data.datasets import cached_items
    from medssl.data.manifest import read_manifest

    path = Path(data.manifest)
    if not path.is_file():
        raise ManifestError(f"data.manifest: {path}: no such manifest")
    manifest = read_manifest(path, data.root, data.path_map)
    report = build_cache(manifest, Path(data.cache_dir), data.preprocess, workers=data.cache_workers,
                         progress=progress)  # fmt: skip
    splits = None if data.splits is None else list(data.splits)
    items = cached_items(manifest, Path(data.cache_dir), data.preprocess, splits)
    wanted = sum(splits is None or row.split in splits for row in manifest.rows)
    if report.errors:
        print(f"medssl embed: {len(report.errors)} row(s) could not be preprocessed (by file key in "
              f"{report.errors_path}); they have no embedding")  # fmt: skip
    if not items:
        chosen = "" if splits is None else f" in splits {splits}"
        raise ManifestError(f"data.manifest: {path}: no row{chosen} with a cache entry to embed")
    return items, wanted - len(items)


def load_embedder(model: EmbedModelConfig, tracking_uri: str | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """The 2D feature extractor ``[B, 1, H, W] -> [B, D]``, what loaded (``matched N/N pretrained tensors ...``) and
    the bundle's ``medssl`` metadata (empty for random initialisation and the SepCLR spaces).

    The encoder comes from :func:`medssl.downstream.common.load_backbone` (a bundle folder, an MLflow run id,
    whatever it resolves, or ``none``); ``model.space=common|salient`` adds a SepCLR head
    (:func:`medssl.downstream.spaces.load_space_encoder`)."""
    from medssl.downstream.common import load_backbone
    from medssl.downstream.spaces import load_space_encoder

    if model.space != "backbone":
        network, message = load_space_encoder(model.pretrained, model.encoder, model.space)
        return network, message, {}
    loaded = load_backbone(model.pretrained, model.encoder, spatial_dims=2, tracking_uri=tracking_uri)
    return loaded.network, loaded.message, dict(loaded.metadata)


def run_embed(config: EmbedConfig) -> EmbeddingTable:
    """Embed the manifest's images and volumes as ``config`` says; write ``config.out`` when given.

    Prints what loaded, how many rows of each level and where the table went (no path of the archive)."""
    from medssl.runtime.devices import resolve_device
    from medssl.runtime.seeding import seed_everything

    if config.out is not None:
        check_output(config.out)  # before any work
    data = config.data
    items, missing = embed_data(data, config.progress)
    seed_everything(config.seed)  # before the network: a random initialisation is the seed's
    network, loaded, bundle = load_embedder(config.model, config.tracking_uri)
    print(f"medssl embed: {loaded}")
    crop = bundle.get("crop_size")
    if isinstance(crop, int) and crop != data.size:
        print(f"medssl embed: note: the encoder was pretrained on {crop} px crops; planes are {data.size} px "
              f"(data.size={crop} embeds at the pretraining size)")  # fmt: skip
    device = resolve_device(config.device)
    network.to(device)
    metadata = {
        "pretrained": config.model.pretrained,
        "run_id": bundle.get("run_id"),
        "method": bundle.get("method"),
        "encoder": config.model.encoder if config.model.pretrained in ("none", "", "null") else bundle.get("encoder"),
        "space": config.model.space,
        "loaded": "random initialisation" if config.model.pretrained in ("none", "", "null") else "pretrained",
        "seed": config.seed,
        "size": data.size,
        "channel": 0,
        "pooling": "mean over every slice",
        "slice_axis": "Z of the cached [C, X, Y, Z] (canonical RAS, inferior to superior)",
        "preprocess": data.preprocess.to_dict(),
    }
    table = embed_items(network, items, data.size, config.batch_size, device, config.num_workers, config.slices,
                        config.progress, metadata)  # fmt: skip
    counts = {level: int((table.levels == level).sum()) for level in LEVELS}
    what = f"{counts['image']} images, {counts['volume']} volumes"
    if config.slices:
        what += f" ({counts['slice']} slices)"
    print(f"medssl embed: {len(table)} rows of {table.dim} dimensions: {what}"
          + (f"; {missing} manifest row(s) without a cache entry skipped" if missing else ""))  # fmt: skip
    if config.out is not None:
        written = write_embeddings(table, config.out)
        print(f"medssl embed: wrote {written}")
    return table


def embed(
    pretrained: str | Path = "none",
    manifest: str | Path | None = None,
    out: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    size: int | None = None,
    splits: Sequence[str] | None = None,
    slices: bool | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
) -> EmbeddingTable:
    """Embeddings of a manifest's images and volumes (``medssl embed`` from Python); see the module's docstring.

    Keyword arguments left ``None`` keep the config file's values (``configs/embed/default.yaml``); ``overrides`` are
    ``key=value`` strings as on the command line (e.g. ``["model.space=common", "data.cache_workers=1"]``).

    Example::

        table = embed("bundles/ct-joint", "data_manifests/archive.csv", "embeddings.parquet")
        volumes = table.select("volume")   # volumes.ids [V], volumes.embeddings [V, D]

    Returns:
        the :class:`EmbeddingTable` (also written to ``out`` when given: ``.parquet``, ``.pt`` or ``.csv``).
    """
    values: dict[str, Any] = {"model": {"pretrained": str(pretrained)}, "data": {}}
    if manifest is not None:
        values["data"]["manifest"] = str(manifest)
    if cache_dir is not None:
        values["data"]["cache_dir"] = str(cache_dir)
    if size is not None:
        values["data"]["size"] = size
    if splits is not None:
        values["data"]["splits"] = list(splits)
    if out is not None:
        values["out"] = str(out)
    for key, value in (("slices", slices), ("batch_size", batch_size), ("device", device), ("progress", progress)):
        if value is not None:
            values[key] = value
    return run_embed(compose_embed_config(overrides, values, config_dir))
