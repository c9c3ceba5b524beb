"""A cached entry that turns unreadable during training (issue 18): its samples are replaced, its key is reported,
and the run goes on; too many unreadable entries stop it with a clear error. Real cache files are damaged after the
cache was opened: a truncated ``.npy``, a deleted ``.npy``, a deleted or corrupt ``.json``, a file truncated under an
array already memory-mapped (reading it would kill the process with SIGBUS)."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medssl.data.cache import build_cache
from medssl.data.datasets import (
    CachedItem,
    MultiCropSliceDataset,
    SkippedEntries,
    StackConfig,
    TwoViewStackDataset,
    cached_items,
)
from medssl.data.errors import UnreadableCacheError
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.scan import ScanOptions, scan_folder
from medssl.data.views import MultiCropConfig
from medssl.train.loaders import ShardedBatchSampler, Stream, shuffled_batches

PATIENT = "DOE^JANE_123456"  # a folder named after a patient: never in a report
CONFIG = PreprocessConfig(percentiles=[0, 100], foreground_threshold=0.05)
VIEWS = MultiCropConfig(global_size=16, local_size=8, n_local=1)


def build_items(
    tmp_path: Path, images: int = 8, volumes: int = 3, size: tuple[int, int] = (24, 20)
) -> list[CachedItem]:
    """A scanned, cached archive of ``images`` PNGs of ``size`` and ``volumes`` 12x10x6 NIfTI volumes, all
    different."""
    data = tmp_path / "archive" / PATIENT
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(20, 255, size=size, dtype=np.uint8)).save(data / f"image{i}.png")
    for i in range(volumes):
        volume = rng.uniform(50, 100, size=(12, 10, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(data / f"volume{i}.nii.gz"))
    rows = scan_folder(tmp_path / "archive", ScanOptions(salt="t", progress=False, modality="MR")).rows
    write_manifest(tmp_path / "m.csv", rows, tmp_path / "archive")
    manifest = read_manifest(tmp_path / "m.csv")
    report = build_cache(manifest, tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert report.built == images + volumes and not report.errors
    return cached_items(manifest, tmp_path / "cache", CONFIG)


def entry_file(item: CachedItem, suffix: str) -> Path:
    return item.entry.directory / f"{item.entry.key}{suffix}"


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


def damage_two_images(items: list[CachedItem]) -> tuple[set[str], set[int]]:
    """Truncate the ``.npy`` of the first image and delete that of the second: their keys and item numbers."""
    images = [i for i, item in enumerate(items) if item.row.dims == 2][:2]
    truncate(entry_file(items[images[0]], ".npy"))
    entry_file(items[images[1]], ".npy").unlink()
    return {items[i].entry.key for i in images}, set(images)


def run_epoch(dataset: MultiCropSliceDataset, workers: int) -> list[dict]:
    batches = [list(range(start, min(start + 4, len(dataset)))) for start in range(0, len(dataset), 4)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=dataset.collate)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_npy_files_are_replaced_reported_and_the_epoch_goes_on(tmp_path, workers, caplog):
    items = build_items(tmp_path)
    dataset = MultiCropSliceDataset(items, views=VIEWS, seed=1)  # the cache is open: then the files are damaged
    bad_keys, bad_items = damage_two_images(items)
    with caplog.at_level(logging.WARNING, logger="medssl.data.datasets"):
        batches = run_epoch(dataset, workers)
    assert sum(len(b["index"]) for b in batches) == len(dataset), "every sample index gave a sample"
    assert all(b["pixels"].shape[0] == len(b["index"]) for b in batches), "batches keep their size"
    served = {int(dataset.item_index[i]) for b in batches for i in b["index"]}
    assert not served & bad_items, "no sample comes from a damaged entry"
    skipped = [key for b in batches for key in b["skipped"]]
    assert set(skipped) == bad_keys and len(skipped) == 2, "each damaged entry's one sample is reported by its key"
    counts = SkippedEntries()
    for b in batches:
        counts.add(b["skipped"])
    assert counts.total == {key: 1 for key in bad_keys}
    assert "2 samples of 2 unreadable cache entries replaced" in SkippedEntries.describe(counts.total)
    if workers == 0:  # worker processes log to their own stderr
        warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
        assert len(warned) == 2 and all(any(k in m for k in bad_keys) for m in warned)
        assert not any(PATIENT in m or str(tmp_path) in m for m in warned), "a key and a reason, never a path"
        assert set(dataset.unreadable.values()) == bad_keys


def test_replacements_are_the_same_with_and_without_workers(tmp_path):
    items = build_items(tmp_path)
    dataset = MultiCropSliceDataset(items, views=VIEWS, seed=1)
    damage_two_images(items)
    serial, parallel = run_epoch(dataset, 0), run_epoch(dataset, 2)
    for a, b in zip(serial, parallel, strict=True):
        assert a["index"].tolist() == b["index"].tolist() and a["skipped"] == b["skipped"]
        torch.testing.assert_close(a["params"], b["params"])
        torch.testing.assert_close(a["pixels"], b["pixels"])


def test_metadata_deleted_or_corrupt_leaves_out_the_volume(tmp_path, caplog):
    items = build_items(tmp_path)
    volumes = [i for i, item in enumerate(items) if item.row.dims == 3]
    entry_file(items[volumes[0]], ".json").unlink()
    entry_file(items[volumes[1]], ".json").write_text('{"foreground": [[0.5, ', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="medssl.data.datasets"):
        dataset = MultiCropSliceDataset(items, views=VIEWS, seed=0)
    assert set(dataset.item_index.tolist()) == set(range(len(items))) - set(volumes[:2])
    assert set(dataset.unreadable) == set(volumes[:2])
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 2
    assert all(b["skipped"] == [] for b in run_epoch(dataset, 0)), "the rest reads as before"


@pytest.mark.parametrize("workers", [0, 2])
def test_stacks_of_an_unreadable_volume_are_replaced(tmp_path, workers):
    items = build_items(tmp_path, images=1, volumes=4)
    dataset = TwoViewStackDataset(items, StackConfig(n_slices=4, size=8), seed=0)
    entry_file(dataset.items[0], ".json").unlink()
    truncate(entry_file(dataset.items[1], ".npy"), keep=0.1)
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=dataset.collate)
    batches = list(loader)
    assert [b["pixels"].shape[0] for b in batches] == [2, 2]
    assert not {int(i) for b in batches for i in b["index"]} & {0, 1}
    assert {k for b in batches for k in b["skipped"]} == {dataset.items[0].entry.key, dataset.items[1].entry.key}


def _read_after_truncation(directory: str, queue: multiprocessing.Queue) -> None:  # in a forked child
    items = cached_items(read_manifest(Path(directory) / "m.csv"), Path(directory) / "cache", CONFIG)
    dataset = MultiCropSliceDataset(items, views=VIEWS, seed=0)
    first = int(np.flatnonzero(dataset.axis_index == -1)[0])
    dataset[first]  # maps the entry's array
    truncate(entry_file(items[int(dataset.item_index[first])], ".npy"), keep=0.2)
    sample = dataset[first]  # the mapped pages past the new end would raise SIGBUS if read
    queue.put((sample["skipped"], int(sample["index"]) != first))


def test_a_file_truncated_under_a_mapped_array_is_replaced_not_a_crash(tmp_path):
    build_items(tmp_path, size=(64, 64))  # 8 KiB arrays: the truncated file ends before their second page
    context = multiprocessing.get_context("fork")  # a crash (SIGBUS) kills the child, not the test session
    queue = context.Queue()
    child = context.Process(target=_read_after_truncation, args=(str(tmp_path), queue))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0, f"the child died (exit code {child.exitcode})"
    skipped, replaced = queue.get(timeout=5)
    assert len(skipped) == 1 and replaced


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_unreadable_entries_stop_with_a_clear_error(tmp_path, workers):
    items = build_items(tmp_path, images=4, volumes=0)
    dataset = MultiCropSliceDataset(items, views=VIEWS, seed=0)
    for item in items[:3]:
        entry_file(item, ".npy").unlink()
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=dataset.collate)
    with pytest.raises(UnreadableCacheError, match=r"cache entries of this dataset cannot be read") as caught:
        list(loader)
    assert PATIENT not in str(caught.value) and "max_unreadable=0.5" in str(caught.value)


def test_the_stream_counts_what_its_workers_skipped(tmp_path):
    items = build_items(tmp_path)
    dataset = MultiCropSliceDataset(items, views=VIEWS, seed=1)
    bad_keys, _ = damage_two_images(items)
    size = len(dataset)
    sampler = ShardedBatchSampler(lambda epoch: shuffled_batches(size, 2, 0, epoch), accumulate=2)
    stream = Stream("images", dataset, sampler, num_workers=2)
    assert size % 2 == 0, "one epoch draws every sample"
    try:
        for _ in range(sampler.batches_per_epoch):  # one epoch: every damaged entry's sample is drawn once
            micro = stream.next_step()
            assert [len(m["index"]) for m in micro] == [1, 1]
    finally:
        stream.close()
    window = stream.skipped.take_window()
    assert set(window) == bad_keys and window == stream.skipped.total
    assert not stream.skipped.take_window(), "a new window starts empty"


def test_a_pretraining_run_goes_on_past_an_entry_that_turns_unreadable_and_reports_its_key(tmp_path, capsys):
    """Through the trainer: after step 1 one image's cache file is deleted; the run finishes, the console names the
    entry's key (never a path) in the window's warning and at the end, and MLflow holds the counts and a tag."""
    import json

    from mlflow.tracking import MlflowClient
    from training import tiny_overrides, write_training_data

    from medssl.train.config import compose_pretrain_config
    from medssl.train.trainer import Trainer

    manifest = write_training_data(tmp_path, volumes=2, images=8)
    damaged: list[str] = []

    def delete_one_image_entry(step: int, metrics: dict[str, float]) -> None:
        if step != 1:
            return
        for meta in sorted((tmp_path / "cache").glob("*/*.json")):
            if json.loads(meta.read_text(encoding="utf-8")).get("dims") == 2:
                meta.with_suffix(".npy").unlink()
                damaged.append(meta.stem)
                return

    overrides = tiny_overrides(manifest, tmp_path, "method=simclr", "trainer.max_steps=6", "run.name=damaged")
    result = Trainer(compose_pretrain_config(overrides), project_dir=tmp_path,
                     callbacks=[delete_one_image_entry]).fit()  # fmt: skip
    assert result.status == "finished" and result.step == 6 and damaged
    out = capsys.readouterr().out
    key = damaged[0]
    assert "damaged: warning: images stream: " in out and f"{key} x" in out
    assert "damaged: warning: images stream, this start: " in out and "medssl manifest preprocess" in out
    assert str(tmp_path / "data") not in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    skipped = int(run.data.tags["medssl.skipped_samples"])
    assert skipped >= 1
    logged = json.loads(Path(client.download_artifacts(result.run_id, "data/skipped_entries.json", str(tmp_path)))
                        .read_text(encoding="utf-8"))  # fmt: skip
    assert logged == {"images": {key: skipped}}
    history = client.get_metric_history(result.run_id, "data/skipped_samples_images")
    assert sum(m.value for m in history) == skipped
