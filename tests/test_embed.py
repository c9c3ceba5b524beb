"""`medssl embed`: one row per image, per slice and per volume, named by manifest ids, the probes' features, the same
numbers on every run, three file formats, and no identifier in any output."""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import PACS_TAGS, write_dicom_2d, write_dicom_series
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.data.datasets import CachedItem, cached_items
from medssl.data.errors import ManifestError
from medssl.data.manifest import read_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.downstream import embed as embed_module
from medssl.downstream.common import load_backbone
from medssl.downstream.embed import (
    EmbeddingTable,
    compose_embed_config,
    embed,
    parquet_available,
    read_embeddings,
    write_embeddings,
)
from medssl.downstream.probes import LabelledImageDataset, extract_features
from medssl.export.bundle import export_bundle
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer

SIZE = 32
FAST = ["data.cache_workers=1", "progress=false"]
FORMATS = [".pt", ".csv", *([".parquet"] if parquet_available() else [])]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two NIfTI volumes and four PNG images, and the bundle of a one-step pretraining on them."""
    folder = tmp_path_factory.mktemp("embed")
    manifest = write_training_data(folder, volumes=2, images=4)
    overrides = tiny_overrides(manifest, folder, "trainer.max_steps=1", "run.name=embed", "logging=none",
                               "method.objective.freeze_prototypes_steps=0")  # fmt: skip
    result = Trainer(compose_pretrain_config(overrides), project_dir=folder).fit()
    bundle = export_bundle(str(result.output_dir), folder / "bundle", log_to_mlflow=False)
    return manifest, bundle


@pytest.fixture(scope="module")
def reference(pretrained, tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddingTable, Path]:
    """The bundle's embeddings of the data (batches of 5 planes) and the cache they were read from."""
    manifest, bundle = pretrained
    cache = tmp_path_factory.mktemp("embed-cache")
    return embed(bundle, manifest, cache_dir=cache, size=SIZE, batch_size=5, overrides=FAST), cache


def test_rows_ids_and_the_probes_features(pretrained, reference):
    manifest_path, bundle = pretrained
    table, cache = reference
    manifest = read_manifest(manifest_path)
    items = cached_items(manifest, cache, PreprocessConfig())
    depth = {item.row.id: int(item.entry.array().shape[3]) for item in items if item.row.dims == 3}
    images = [r.id for r in manifest.rows if r.dims == 2]
    volumes = [r.id for r in manifest.rows if r.dims == 3]
    assert len(images) == 4 and len(volumes) == 2 and min(depth.values()) > 1

    # one row per image, one pooled row per volume and one per slice; ids are the manifest's row ids, in its order
    assert len(table) == len(images) + len(volumes) + sum(depth.values())
    assert table.embeddings.shape == (len(table), 512) and table.embeddings.dtype == np.float32 and table.dim == 512
    assert table.select("image").ids.tolist() == images and table.select("volume").ids.tolist() == volumes
    assert set(table.ids.tolist()) == {r.id for r in manifest.rows}
    expected_order = [(r.id, "image" if r.dims == 2 else "volume") for r in manifest.rows]
    assert [(i, v) for i, v in zip(table.ids, table.levels, strict=True) if v != "slice"] == expected_order
    assert (table.select("image").slices == -1).all() and (table.select("volume").slices == -1).all()
    for volume in volumes:
        rows = (table.ids == volume) & (table.levels == "slice")
        assert table.slices[rows].tolist() == list(range(depth[volume]))
        pooled = table.embeddings[(table.ids == volume) & (table.levels == "volume")]
        np.testing.assert_allclose(pooled[0], table.embeddings[rows].mean(axis=0), rtol=1e-5, atol=1e-7)
    assert np.isfinite(table.embeddings).all() and table.embeddings.std(axis=0).max() > 0
    assert table.metadata["size"] == SIZE and table.metadata["loaded"] == "pretrained"

    # the same numbers as the probes' feature extraction: images, and each volume's middle slice (what probes read)
    network = load_backbone(str(bundle), spatial_dims=2).network
    labelled = [CachedItem(dataclasses.replace(item.row, label="x"), item.entry) for item in items]
    dataset = LabelledImageDataset(labelled, SIZE)
    features, _ = extract_features(network, dataset, batch_size=64, progress=False)
    for k, row in enumerate(dataset.rows):
        middle = (table.levels == "image") if row.dims == 2 else (table.slices == depth[row.id] // 2)
        (index,) = np.flatnonzero((table.ids == row.id) & middle)
        np.testing.assert_allclose(table.embeddings[index], features[k], rtol=1e-4, atol=1e-5)

    # deterministic: a second run (the cache reused) gives the same numbers (other batch sizes: the same up to
    # rounding, as the probes' batches of 64 above)
    again = embed(bundle, manifest_path, cache_dir=cache, size=SIZE, batch_size=5, overrides=FAST)
    np.testing.assert_array_equal(again.embeddings, table.embeddings)
    assert again.ids.tolist() == table.ids.tolist() and again.slices.tolist() == table.slices.tolist()


@pytest.mark.parametrize("suffix", FORMATS)
def test_the_command_writes_a_table_that_reads_back(pretrained, reference, tmp_path, capsys, suffix):
    manifest, bundle = pretrained
    direct, cache = reference
    out = tmp_path / "out" / f"embeddings{suffix}"
    argv = ["embed", f"model.pretrained={bundle}", f"data.manifest={manifest}", f"data.cache_dir={cache}",
            f"data.size={SIZE}", "data.splits=['']", "batch_size=5", f"out={out}", *FAST]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "matched 75/75 pretrained tensors" in printed and f"wrote {out}" in printed
    assert re.search(r"4 images, 2 volumes \(\d+ slices\)", printed)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written atomically: no temporary file left

    table = read_embeddings(out)
    assert table.ids.tolist() == direct.ids.tolist() and table.levels.tolist() == direct.levels.tolist()
    assert table.slices.tolist() == direct.slices.tolist() and table.modalities.tolist() == direct.modalities.tolist()
    np.testing.assert_array_equal(table.embeddings, direct.embeddings)  # float32 round-trips in every format
    if suffix == ".pt":
        payload = torch.load(out, weights_only=True)
        assert payload["embedding"].shape == (len(table), 512) and payload["metadata"]["size"] == SIZE
    elif suffix == ".csv":
        with open(out, newline="", encoding="utf-8") as handle:
            header, *rows = list(csv.reader(handle))
        assert header[:6] == ["id", "level", "slice", "modality", "split", "label"] and header[-1] == "e511"
        assert len(rows) == len(table) and rows[0][:3] == [table.ids[0], table.levels[0], "-1"]
    else:
        import pyarrow.parquet as pq

        stored = pq.read_table(out)
        assert stored.column_names == ["id", "level", "slice", "modality", "split", "label", "embedding"]
        assert stored.schema.field("embedding").type.list_size == 512 and table.metadata["size"] == SIZE


def test_pooled_only_splits_and_bad_outputs(pretrained, tmp_path, capsys, monkeypatch):
    manifest, _ = pretrained
    options = {"cache_dir": tmp_path / "cache", "size": SIZE, "overrides": [*FAST, "model.encoder=resnet10"]}
    pooled = embed("none", manifest, slices=False, **options)
    assert pooled.levels.tolist().count("volume") == 2 and "slice" not in pooled.levels.tolist()
    full = embed("none", manifest, **options)  # random initialisation: the seed's, the same twice
    keep = full.levels != "slice"
    np.testing.assert_array_equal(pooled.embeddings, full.embeddings[keep])
    assert pooled.metadata["loaded"] == "random initialisation"
    with pytest.raises(ManifestError, match=r"no row in splits \['test'\]"):
        embed("none", manifest, splits=["test"], **options)

    # the format is the suffix's; parquet only where pyarrow is there, and the error names the others
    with pytest.raises(ValueError, match=r"one of \.parquet, \.pt, \.csv, got '\.npy'"):
        compose_embed_config([f"out={tmp_path / 'e.npy'}"])
    table = EmbeddingTable(["a"], ["image"], [-1], ["MR"], [""], [""], np.zeros((1, 3)))
    monkeypatch.setattr(embed_module, "parquet_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs pyarrow.*\.pt.*\.csv"):
        write_embeddings(table, tmp_path / "e.parquet")
    assert main(["embed", f"data.manifest={manifest}", f"out={tmp_path / 'e.parquet'}"]) == 2
    assert "needs pyarrow" in capsys.readouterr().err and not (tmp_path / "e.parquet").exists()
    assert main(["embed", f"data.manifest={manifest}"]) == 2
    assert "out=FILE is required" in capsys.readouterr().err
    assert main(["embed", "data.size=0"]) == 2
    assert "data.size must be >= 1" in capsys.readouterr().err


# A PACS export: identifying tags in the DICOM headers, the patient's name, ID and dates in folder and file names.
TAGS = PACS_TAGS
UID_ROOT = "1.2.999.77331"
WORDS = ("zyxwvut", "quorabelle", "zq-99173-px", "acc-77q31", "klinikum ostwind", "ostwind", UID_ROOT)
NUMBERS = ("99173", "19530612", "1953-06-12", "19890417", "1989-04-17")  # not inside a longer number (a CSV float)


def identifiers_in(blob: bytes) -> list[str]:
    text = blob.lower()
    found = [word for word in WORDS if word.encode() in text]
    return found + [n for n in NUMBERS if re.search(rb"(?<![0-9.])" + re.escape(n.encode()) + rb"(?![0-9])", text)]


def test_no_identifier_reaches_the_embeddings_or_the_console(pretrained, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    _, bundle = pretrained
    patient = tmp_path / "archive" / "ZYXWVUT^QUORABELLE_ZQ-99173-PX"
    rng = np.random.default_rng(0)
    volume = (rng.random((6, 24, 24)) * 800).astype(np.int16)
    write_dicom_series(patient / "19890417_CT_ZQ-99173-PX", volume, (1.0, 1.0, 2.0), modality="CT",
                       prefix="Zyxwvut_19530612_", series_uid=f"{UID_ROOT}.1", study_uid=f"{UID_ROOT}.2",
                       **TAGS)  # fmt: skip
    for k in range(2):
        write_dicom_2d(patient / "19890417_CR" / f"Quorabelle_ZQ-99173-PX_{k}.dcm",
                       (rng.random((40, 36)) * 4000).astype(np.uint16), series_uid=f"{UID_ROOT}.3.{k}",
                       study_uid=f"{UID_ROOT}.2", **TAGS)  # fmt: skip
    for path in patient.rglob("*.dcm"):  # the control: the search finds what the files hold
        assert {"zyxwvut", "quorabelle", "19530612", UID_ROOT} <= set(identifiers_in(path.read_bytes()))

    work = tmp_path / "work"
    manifest = work / "manifest.csv"
    assert main(["manifest", "scan", str(patient.parent), "--out", str(manifest), "--salt", "embed-test-salt",
                 "--no-progress", "--workers", "1"]) == 0  # fmt: skip
    capfd.readouterr()  # the scan's console is test_phi_end_to_end's
    console = []
    for suffix in FORMATS:
        argv = ["-v", "embed", f"model.pretrained={bundle}", f"data.manifest={manifest}", f"data.size={SIZE}",
                f"data.cache_dir={work / 'cache'}", "data.cache_workers=1", f"out={work / 'out' / ('e' + suffix)}",
                "progress=true"]  # fmt: skip
        assert main(argv) == 0
        console.append(capfd.readouterr())
    ids = {row.id for row in read_manifest(manifest).rows}
    assert len(ids) == 3
    for suffix in FORMATS:
        table = read_embeddings(work / "out" / f"e{suffix}")
        assert set(table.ids.tolist()) == ids and sorted(set(table.levels.tolist())) == ["image", "slice", "volume"]
    out, err = "".join(c.out for c in console), "".join(c.err for c in console)
    assert "medssl embed: 8/8 images" in err  # the progress report (2 images, 6 slices) is searched too

    leaks = {"console": identifiers_in((out + err).encode()), "log": identifiers_in(caplog.text.encode())}
    path_map = manifest.with_name("manifest.paths.csv")  # the private map: the one file that names the files
    for path in work.rglob("*"):
        relative = path.relative_to(work).as_posix()
        leaks[f"the name {relative}"] = identifiers_in(relative.encode())
        if path.is_file() and path != path_map:
            leaks[relative] = identifiers_in(path.read_bytes())
    leaks = {where: found for where, found in leaks.items() if found}
    assert not leaks, leaks
