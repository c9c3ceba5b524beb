"""Datasets over the cache: multi-crop slices, two-view stacks, seeding across workers, orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medssl.data.cache import build_cache
from medssl.data.datasets import (
    MultiCropSliceDataset,
    SliceConfig,
    StackConfig,
    TwoViewStackDataset,
    cached_items,
)
from medssl.data.geometry import slice_to_display
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.scan import ScanOptions, scan_folder
from medssl.data.views import AugmentConfig, MultiCropConfig

NO_AUGMENT = AugmentConfig(flip_prob=0, affine_prob=0, gamma_prob=0, contrast_prob=0, noise_prob=0, blur_prob=0)


def build(
    tmp_path: Path,
    volumes: dict[str, tuple[np.ndarray, np.ndarray]],
    images: int = 0,
    groups=None,
    storage: str = "float16",
):
    data = tmp_path / "data"
    data.mkdir()
    for name, (array, affine) in volumes.items():
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(data / f"{name}.nii.gz"))
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, size=(64, 48), dtype=np.uint8)).save(data / f"img{i}.png")
    rows = scan_folder(data, ScanOptions(salt="t", progress=False, modality="MR")).rows
    if groups:
        rows = [type(r)(**{**r.__dict__, "group": groups(r)}) for r in rows]
    write_manifest(tmp_path / "m.csv", rows, data)
    manifest = read_manifest(tmp_path / "m.csv")
    config = PreprocessConfig(percentiles=[0, 100], foreground_threshold=0.05, storage_dtype=storage)
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    return cached_items(manifest, tmp_path / "cache", config)


def padded_volume(shape=(20, 24, 12), empty_low=3, empty_high=2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = np.zeros(shape, np.float32)
    depth = shape[2] - empty_low - empty_high
    array[:, :, empty_low : empty_low + depth] = rng.uniform(50, 100, size=(*shape[:2], depth))
    return array


def test_multicrop_views_and_slice_filtering(tmp_path):
    items = build(tmp_path, {"a": (padded_volume(), np.eye(4))}, images=2)
    views = MultiCropConfig(global_size=32, local_size=16, n_local=3)
    dataset = MultiCropSliceDataset(items, views=views, slices=SliceConfig(min_foreground=0.5))
    # 2 images + the 12 - 3 - 2 = 7 non-empty axial slices
    assert len(dataset) == 2 + 7
    volume_slices = sorted(dataset.slice_index[dataset.axis_index == 2].tolist())
    assert volume_slices == list(range(3, 10))
    sample = dataset[0]
    storage = getattr(torch, dataset.items[int(dataset.item_index[0])].entry.meta["dtype"])
    assert sample["pixels"].dtype == storage, "the loader returns the cached plane at storage precision"
    assert sample["params"].shape[0] == 2 + 3
    views = dataset.sample_views(0)
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    three_planes = MultiCropSliceDataset(
        items, views=views, slices=SliceConfig(planes=["axial", "coronal", "sagittal"])
    )
    assert len(three_planes) == 2 + 7 + 24 + 20


def test_samples_depend_on_seed_epoch_and_index_only(tmp_path):
    items = build(tmp_path, {"a": (padded_volume(), np.eye(4))}, images=3)
    dataset = MultiCropSliceDataset(items, views=MultiCropConfig(global_size=32, local_size=16, n_local=2), seed=7)
    first = dataset.sample_views(4)
    again = dataset.sample_views(4)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    dataset.set_epoch(1)
    second_epoch = dataset.sample_views(4)[0]
    assert not torch.equal(second_epoch, first[0])
    dataset.set_epoch(0)
    tagged = dataset.sample_views((1, 4))  # the epoch carried by the index, as the trainer's samplers do it
    torch.testing.assert_close(tagged[0], second_epoch)
    assert dataset[(1, 4)]["index"] == 4

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=False, collate_fn=dataset.collate)
        return [dataset.views(batch)[0] for batch in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a, b)
    # workers do not repeat each other's randomness: distinct samples get distinct crops
    flat = torch.cat(parallel).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]


def test_slices_come_out_in_display_orientation(tmp_path):
    array = np.full((16, 16, 8), 10.0, np.float32)
    array[-1, -1, :] = 100.0  # far Right (+X) and far Anterior (+Y) in RAS
    items = build(tmp_path, {"marker": (array, np.eye(4))})
    dataset = MultiCropSliceDataset(items, slices=SliceConfig(min_foreground=0.0))
    image = dataset.image(0, np.random.default_rng(0))[0].numpy()
    # radiological display: anterior at the top row, patient's right on the left column
    assert np.unravel_index(image.argmax(), image.shape) == (0, 0)
    np.testing.assert_array_equal(slice_to_display(np.arange(6).reshape(2, 3)), [[5, 2], [4, 1], [3, 0]])


def test_stack_views_share_slices_and_report_positions(tmp_path):
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[2, 3] = -40.0
    items = build(tmp_path, {"a": (padded_volume(shape=(20, 24, 30), empty_low=0, empty_high=0), affine)})
    config = StackConfig(n_slices=8, size=20, scale=[1.0, 1.0], augment=NO_AUGMENT, min_foreground=0.0)
    dataset = TwoViewStackDataset(items, config)
    sample = dataset[0]
    view1, view2 = dataset.sample_views(0)
    assert view1.shape == view2.shape == (8, 1, 20, 20)
    torch.testing.assert_close(view1, view2)  # no augmentation: the two views are the same slices
    positions = sample["positions"].numpy()
    np.testing.assert_allclose(np.diff(positions), 2.5)
    assert positions[0] >= -40.0 and (positions[0] + 40.0) % 2.5 == pytest.approx(0.0)
    assert sample["mask"].all()


def test_short_volume_is_padded_with_a_mask(tmp_path):
    items = build(tmp_path, {"short": (padded_volume(shape=(16, 16, 5), empty_low=0, empty_high=0), np.eye(4))})
    config = StackConfig(n_slices=8, size=16, augment=AugmentConfig(noise_prob=1.0, contrast_prob=1.0))
    dataset = TwoViewStackDataset(items, config)
    sample = dataset[0]
    assert sample["mask"].tolist() == [True] * 5 + [False] * 3
    for view in dataset.sample_views(0):
        assert view[5:].abs().max() == 0.0, "padded slices stay zero after intensity augmentation"
        assert view[:5].abs().max() > 0.0
    assert sample["positions"][5:].abs().max() == 0.0


def test_stacks_stay_inside_the_foreground(tmp_path):
    items = build(tmp_path, {"a": (padded_volume(shape=(16, 16, 40), empty_low=10, empty_high=10), np.eye(4))})
    dataset = TwoViewStackDataset(items, StackConfig(n_slices=6, size=16, min_foreground=0.5))
    for epoch in range(20):
        dataset.set_epoch(epoch)
        indices, valid = dataset.slice_indices(0, dataset.rng(0))
        assert valid.all() and indices.min() >= 10 and indices.max() <= 29


def test_only_volumes_make_stacks_and_batches_collate(tmp_path):
    items = build(tmp_path, {"a": (padded_volume(), np.eye(4)), "b": (padded_volume(seed=1), np.eye(4))}, images=2)
    dataset = TwoViewStackDataset(items, StackConfig(n_slices=4, size=16))
    assert len(dataset) == 2
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=dataset.collate)))
    assert dataset.views(batch)[0].shape == (2, 4, 1, 16, 16)
    assert batch["mask"].shape == batch["positions"].shape == (2, 4)


@pytest.mark.parametrize("storage", ["float16", "uint8"])
def test_images_of_different_sizes_share_a_padded_batch(tmp_path, storage):
    # 64 x 48 PNGs and 20 x 24 volume slices in one batch: each sample's views are those it has on its own
    items = build(tmp_path, {"a": (padded_volume(), np.eye(4))}, images=2, storage=storage)
    dataset = MultiCropSliceDataset(items, views=MultiCropConfig(global_size=24, local_size=12, n_local=2), seed=3)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len({tuple(s["pixels"].shape) for s in samples}) == 2
    assert all(s["pixels"].dtype == getattr(torch, storage) for s in samples)
    plain = dataset.image(0, dataset.rng(0))  # float32 in [0, 1]: 8-bit storage is scaled on the device
    torch.testing.assert_close(dataset.float_pixels(dataset.collate(samples[:1]), "cpu")[0], plain)
    batch = dataset.collate(samples)
    assert batch["pixels"].shape == (len(dataset), 1, 64, 48)
    together = dataset.views(batch)
    for i in range(len(dataset)):
        for view, alone in zip(together, dataset.sample_views(i), strict=True):
            torch.testing.assert_close(view[i], alone, atol=0, rtol=0)


def test_stacks_of_different_sizes_share_a_padded_batch(tmp_path):
    volumes = {"a": (padded_volume(), np.eye(4)), "b": (padded_volume(shape=(14, 30, 12), seed=2), np.eye(4))}
    dataset = TwoViewStackDataset(build(tmp_path, volumes), StackConfig(n_slices=4, size=16), seed=5)
    batch = dataset.collate([dataset[0], dataset[1]])
    together = dataset.views(batch)
    for i in range(2):
        for view, alone in zip(together, dataset.sample_views(i), strict=True):
            torch.testing.assert_close(view[i], alone, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SliceConfig(planes=["oblique"]), "slices.planes"),
        (lambda: StackConfig(plane="diagonal"), "stacks.plane"),
        (lambda: StackConfig(n_slices=0), "stacks.n_slices"),
        (lambda: MultiCropConfig(global_scale=[0.5, 0.1]), "views.global_scale"),
        (lambda: AugmentConfig(flip_prob=2.0), "augment.flip_prob"),
    ],
)
def test_bad_view_settings_name_the_key(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_open_arrays_are_bounded_and_metadata_is_not_kept(tmp_path, monkeypatch):
    # an epoch over 100,000 files kept every memory map (a file descriptor each) and every volume's metadata
    import medssl.data.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_OPEN_ARRAYS", 3)
    items = build(tmp_path, {"a": (padded_volume(), np.eye(4)), "b": (padded_volume(seed=1), np.eye(4))}, images=4)
    dataset = MultiCropSliceDataset(items, views=MultiCropConfig(global_size=16, local_size=8, n_local=1))
    stacks = TwoViewStackDataset(items, StackConfig(n_slices=4, size=16))
    assert all(item.entry._meta is None for item in items), "the index reads each volume's metadata, keeps none"
    for i in range(len(dataset)):
        dataset[i]
        assert len(dataset._arrays) <= 3
    used = [int(item) for item in dataset.item_index]
    assert set(dataset._arrays) == set(list(dict.fromkeys(reversed(used)))[:3]), "the three used last stay open"
    for i in range(len(stacks)):
        stacks[i]
    assert all(item.entry._meta is None for item in items), "stacks keep five numbers a volume, not its metadata"
