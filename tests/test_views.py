"""Crop boxes of the 2D multi-crop and stack views follow torchvision's RandomResizedCrop.get_params."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medssl.data.config import data_config
from medssl.data.datasets import CachedItem, MultiCropSliceDataset, StackConfig, TwoViewStackDataset
from medssl.data.device_views import draw_view_params
from medssl.data.views import (
    DEFAULT_RATIO,
    AugmentConfig,
    MultiCropConfig,
    random_resized_crop_box,
)

NO_AUGMENT = AugmentConfig(flip_prob=0, affine_prob=0, gamma_prob=0, contrast_prob=0, noise_prob=0, blur_prob=0)
LOG_RATIO = (math.log(DEFAULT_RATIO[0]), math.log(DEFAULT_RATIO[1]))

Box = tuple[int, int, int, int]


def draw_boxes(height: int, width: int, scale: Sequence[float], n: int, seed: int = 0, **kwargs) -> np.ndarray:
    """``n`` boxes ``[n, 4]`` as ``(top, left, box_height, box_width)`` from one seeded RandomState."""
    state = np.random.RandomState(seed)
    return np.array([random_resized_crop_box(height, width, scale, state=state, **kwargs) for _ in range(n)])


def ks_distance_to_uniform(values: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov statistic ``sup |F_n - F|`` of ``values`` against U(low, high)."""
    x = np.sort((np.asarray(values, dtype=np.float64) - low) / (high - low))
    n = len(x)
    cdf = np.clip(x, 0.0, 1.0)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def area_compatible(boxes: np.ndarray, area: float, low: float, high: float) -> np.ndarray:
    """Whether sides within 0.5 px of each box (before rounding) can cover a fraction in [low, high]."""
    h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    return ((h - 0.5) * (w - 0.5) / area <= high) & ((h + 0.5) * (w + 0.5) / area >= low)


def ratio_compatible(boxes: np.ndarray, low: float, high: float) -> np.ndarray:
    """Whether sides within 0.5 px of each box (before rounding) can have width / height in [low, high]."""
    h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    return ((w - 0.5) / (h + 0.5) <= high) & ((w + 0.5) / (h - 0.5) >= low)


def assert_inside(boxes: np.ndarray, height: int, width: int) -> None:
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()


# --- distributions ---------------------------------------------------------------------------------------------


def test_area_fraction_is_uniform_over_the_scale_range():
    # a 900 x 1200 image (not square): every box with area <= 0.5 and ratio in [3/4, 4/3] fits, so no try
    # is rejected and the area fraction of the whole image must be U(0.05, 0.5) up to the rounding of the sides
    height, width, scale, n = 900, 1200, (0.05, 0.5), 6000
    boxes = draw_boxes(height, width, scale, n)
    fraction = boxes[:, 2] * boxes[:, 3] / (height * width)
    assert area_compatible(boxes, height * width, *scale).all()
    assert ks_distance_to_uniform(fraction, *scale) < 1.63 / math.sqrt(n)  # KS critical value at alpha = 0.01
    # spread: every tenth of the range gets its share (600 expected each)
    counts = np.histogram(fraction, bins=10, range=scale)[0]
    assert counts.min() > 480 and counts.max() < 720


def test_log_aspect_ratio_is_uniform_over_the_ratio_range():
    height, width, scale, n = 900, 1200, (0.05, 0.5), 6000
    boxes = draw_boxes(height, width, scale, n, seed=1)
    log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
    assert ratio_compatible(boxes, *DEFAULT_RATIO).all()
    assert ks_distance_to_uniform(log_aspect, *LOG_RATIO) < 1.63 / math.sqrt(n)
    counts = np.histogram(log_aspect, bins=10, range=LOG_RATIO)[0]
    assert counts.min() > 480 and counts.max() < 720
    # both orientations occur about equally (portrait boxes on a landscape image too)
    assert 0.45 < np.mean(boxes[:, 3] > boxes[:, 2]) < 0.55


def test_default_global_range_on_a_non_square_image():
    # 384 x 512: boxes of more than 9/16 of the area fit only for some ratios, so tries are rejected and
    # redrawn (as in torchvision) and the accepted fractions thin out towards 1; below 9/16 every try fits,
    # so there the fraction must stay uniform
    height, width, scale, n = 384, 512, (0.14, 1.0), 6000
    boxes = draw_boxes(height, width, scale, n, seed=2)
    fraction = boxes[:, 2] * boxes[:, 3] / (height * width)
    assert area_compatible(boxes, height * width, *scale).all()
    assert ratio_compatible(boxes, *DEFAULT_RATIO).all()
    low = fraction[fraction < 0.55]
    assert len(low) > 0.6 * n
    assert ks_distance_to_uniform(low, 0.14, 0.55) < 1.63 / math.sqrt(len(low))
    assert np.mean(fraction > 0.9) > 0.005  # the top of the range is reached too
    log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
    assert log_aspect.min() < LOG_RATIO[0] + 0.02 and log_aspect.max() > LOG_RATIO[1] - 0.02


def test_local_range_with_a_wider_ratio_on_a_non_square_image():
    height, width, scale, ratio, n = 300, 512, (0.05, 0.14), (0.5, 2.0), 6000
    boxes = draw_boxes(height, width, scale, n, seed=3, ratio=ratio)
    fraction = boxes[:, 2] * boxes[:, 3] / (height * width)
    assert area_compatible(boxes, height * width, *scale).all()
    assert ratio_compatible(boxes, *ratio).all()
    assert ks_distance_to_uniform(fraction, *scale) < 1.63 / math.sqrt(n)
    log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
    assert ks_distance_to_uniform(log_aspect, math.log(ratio[0]), math.log(ratio[1])) < 1.63 / math.sqrt(n)


@pytest.mark.parametrize(
    ("height", "width"), [(37, 500), (500, 37), (64, 48), (48, 64), (300, 301), (7, 5), (1, 200), (200, 1), (1, 1)]
)
@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14), (0.3, 1.0)])
def test_boxes_lie_inside_non_square_images(height, width, scale):
    boxes = draw_boxes(height, width, scale, 300, seed=height * 1000 + width)
    assert_inside(boxes, height, width)


# --- fallback ----------------------------------------------------------------------------------------------------


class CountingState(np.random.RandomState):
    """A RandomState that counts the draws made through it."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.uniform_calls = 0
        self.randint_calls = 0

    def uniform(self, *args, **kwargs):  # type: ignore[override]
        self.uniform_calls += 1
        return super().uniform(*args, **kwargs)

    def randint(self, *args, **kwargs):  # type: ignore[override]
        self.randint_calls += 1
        return super().randint(*args, **kwargs)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        # a 4-pixel-high strip: every box of >= 14% of the area with ratio <= 4/3 is > 4 px high
        (4, 1000, (0, (1000 - 5) // 2, 4, 5)),  # full height, width = round(4 * 4/3)
        (1000, 4, ((1000 - 5) // 2, 0, 5, 4)),  # full width, height = round(4 / (3/4))
        (1, 5000, (0, 2499, 1, 1)),
    ],
)
def test_impossible_request_falls_back_to_torchvisions_central_crop(height, width, expected):
    state = CountingState(0)
    box = random_resized_crop_box(height, width, (0.14, 1.0), DEFAULT_RATIO, state)
    assert box == expected
    assert state.uniform_calls == 20 and state.randint_calls == 0  # 10 tries of (area, ratio), no placement


def test_fallback_takes_the_whole_image_when_its_ratio_is_in_range():
    # no tries at all: the central crop is the whole image when width / height is in the ratio range
    assert random_resized_crop_box(90, 100, (0.1, 0.2), DEFAULT_RATIO, np.random.RandomState(0), attempts=0) == (
        0,
        0,
        90,
        100,
    )
    # and the largest box with the nearest bound otherwise (landscape: full height)
    assert random_resized_crop_box(50, 100, (0.1, 0.2), DEFAULT_RATIO, np.random.RandomState(0), attempts=0) == (
        0,
        (100 - 67) // 2,
        50,
        67,
    )


def test_a_box_that_fits_is_accepted_on_a_later_try():
    # on a 20 x 400 strip with the local range most tries are too high; the ones that fit must be kept
    boxes = draw_boxes(20, 400, (0.05, 0.14), 500, ratio=(0.25, 4.0))
    assert_inside(boxes, 20, 400)
    fell_back = (boxes[:, 2] == 20) & (boxes[:, 3] == 80)
    assert (~fell_back).sum() > 100
    assert ratio_compatible(boxes[~fell_back], 0.25, 4.0).all()


# --- reference --------------------------------------------------------------------------------------------------


def torchvision_get_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    uniform: Callable[[float, float], float],
    randint: Callable[[int, int], int],
) -> Box:
    """torchvision.transforms.RandomResizedCrop.get_params, line by line, with the torch draws replaced by
    ``uniform(low, high)`` (``torch.empty(1).uniform_``) and ``randint(low, high)`` (``torch.randint``)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = randint(0, height - h + 1)
            j = randint(0, width - w + 1)
            return i, j, h, w
    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [
        (224, 224, (0.08, 1.0), (3 / 4, 4 / 3)),
        (300, 512, (0.14, 1.0), (0.75, 1.3333333)),
        (512, 300, (0.05, 0.14), (0.75, 1.3333333)),
        (20, 400, (0.05, 0.14), (0.25, 4.0)),
        (4, 1000, (0.14, 1.0), (3 / 4, 4 / 3)),
        (1000, 4, (0.3, 1.0), (3 / 4, 4 / 3)),
        (33, 35, (0.9, 1.0), (0.5, 0.6)),
    ],
)
def test_matches_a_plain_reimplementation_of_torchvision_fed_the_same_numbers(height, width, scale, ratio):
    ours, reference = np.random.RandomState(7), np.random.RandomState(7)
    for _ in range(500):
        box = random_resized_crop_box(height, width, scale, ratio, ours)
        expected = torchvision_get_params(
            height,
            width,
            scale,
            ratio,
            lambda low, high: float(reference.uniform(low, high)),
            lambda low, high: int(reference.randint(low, high)),
        )
        assert box == expected
    assert ours.uniform() == reference.uniform()  # and both consumed the same numbers


# --- the views' numbers, determinism -------------------------------------------------------------------------------


def fake_item(array: np.ndarray, dims: int) -> CachedItem:
    """A cached item over an in-memory ``[C, ...]`` array (no cache on disk): what the datasets read of an entry."""
    meta = {
        "shape": list(array.shape),
        "foreground": [[1.0] * n for n in array.shape[1:]],
        "affine": [],
        "spacing": [1.0] * (array.ndim - 1),
        "dtype": str(array.dtype),
    }
    entry = SimpleNamespace(array=lambda: array, scale=1.0, meta=meta)
    return CachedItem(SimpleNamespace(dims=dims, group="", label="", id="fake"), entry)  # type: ignore[arg-type]


def boxes_of(params: np.ndarray) -> np.ndarray:
    """``[n, 4]`` integer boxes ``(top, left, box_height, box_width)`` of ``draw_view_params`` rows."""
    return np.asarray(params)[:, :4].astype(int)


@pytest.mark.parametrize(("size", "scale"), [(96, (0.14, 1.0)), (48, (0.05, 0.14)), (96, (0.3, 1.0))])
def test_view_crops_never_have_aspect_ratios_outside_three_quarters_to_four_thirds(size, scale):
    # fails with independent height and width draws (MONAI's RandScaleCrop(random_size=True)), whose
    # side fractions sqrt(0.14)..1 give aspect ratios up to 2.7
    for height, width in ((256, 256), (200, 320)):
        rng = np.random.default_rng(size)
        boxes = boxes_of(draw_view_params(rng, height, width, 2000, scale, DEFAULT_RATIO, AugmentConfig()))
        assert_inside(boxes, height, width)
        assert ratio_compatible(boxes, 3 / 4, 4 / 3).all()
        assert area_compatible(boxes, height * width, *scale).all()


def test_multicrop_uses_the_configured_ratio_and_scales():
    config = MultiCropConfig(global_size=16, local_size=8, ratio=[0.5, 2.0], augment=NO_AUGMENT)
    dataset = MultiCropSliceDataset([fake_item(np.zeros((1, 300, 200), np.float32), 2)], views=config)
    params = np.stack([dataset[(epoch, 0)]["params"].numpy() for epoch in range(1000)])  # [1000, 6, N_PARAMS]
    for views, scale in ((slice(0, 2), config.global_scale), (slice(2, None), config.local_scale)):
        boxes = boxes_of(params[:, views].reshape(-1, params.shape[-1]))
        assert_inside(boxes, 300, 200)
        assert area_compatible(boxes, 300 * 200, *scale).all()
        assert ratio_compatible(boxes, 0.5, 2.0).all()
        assert np.log(boxes[:, 3] / boxes[:, 2]).min() < math.log(0.6)
        assert np.log(boxes[:, 3] / boxes[:, 2]).max() > math.log(1.6)
    views = dataset.sample_views(0)
    assert [tuple(v.shape) for v in views] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 4


def test_stack_views_crop_every_slice_with_one_box_of_the_stack_scale():
    config = StackConfig(size=16, n_slices=8, augment=NO_AUGMENT, min_foreground=0.0)
    volume = np.broadcast_to(np.arange(8, dtype=np.float32), (1, 90, 40, 8)).copy()  # slice k == k (axial)
    dataset = TwoViewStackDataset([fake_item(volume, 3)], config)
    sample = dataset[0]
    assert sample["pixels"].shape == (8, 40, 90)  # display orientation: [N, H, W]
    for view in dataset.sample_views(0):
        assert view.shape == (8, 1, 16, 16)
        torch.testing.assert_close(view, torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 1, 16, 16))
    params = np.stack([dataset[(epoch, 0)]["params"].numpy() for epoch in range(500)])  # [500, 2, N_PARAMS]
    boxes = boxes_of(params.reshape(-1, params.shape[-1]))
    assert_inside(boxes, 40, 90)
    assert area_compatible(boxes, 40 * 90, *config.scale).all()
    assert ratio_compatible(boxes, *DEFAULT_RATIO).all()


def test_views_depend_on_seed_epoch_and_index_only():
    config = MultiCropConfig(global_size=16, local_size=8, n_local=2)
    image = np.random.default_rng(0).random((1, 70, 50), dtype=np.float32)
    worker_a = MultiCropSliceDataset([fake_item(image, 2)] * 8, views=config, seed=0)
    worker_b = copy.deepcopy(worker_a)  # a loader worker's copy (fresh state, as after pickling)
    worker_a.sample_views(7)  # worker a has produced another sample before
    first, again = worker_a.sample_views(5), worker_b.sample_views(5)
    for x, y in zip(first, again, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other_seed = MultiCropSliceDataset([fake_item(image, 2)] * 8, views=config, seed=1)
    for other in (worker_a.sample_views(6), worker_a.sample_views((1, 5)), other_seed.sample_views(5)):
        assert any(not torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_same_state_same_boxes():
    a = draw_boxes(123, 77, (0.14, 1.0), 200, seed=11)
    b = draw_boxes(123, 77, (0.14, 1.0), 200, seed=11)
    c = draw_boxes(123, 77, (0.14, 1.0), 200, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [[1.5, 1.0], [0.0, 1.0], [-1.0, 1.0], [1.0], [0.5, 1.0, 2.0], [0.5, float("inf")]])
def test_bad_ratio_names_the_key(ratio):
    with pytest.raises(ValueError, match=r"views\.ratio"):
        MultiCropConfig(ratio=ratio)


def test_ratio_is_a_data_config_key():
    assert data_config().views.ratio == [0.75, 1.3333333]
    assert data_config(overrides=["views.ratio=[0.5,2.0]"]).views.ratio == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"views\.ratio"):
        data_config(overrides=["views.ratio=[2.0,0.5]"])


def test_stack_ratio_is_a_data_config_key_and_reaches_the_stack_views():
    assert data_config().stacks.ratio == [0.75, 1.3333333]
    assert data_config(overrides=["stacks.ratio=[0.5,2.0]"]).stacks.ratio == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"stacks\.ratio"):
        data_config(overrides=["stacks.ratio=[2.0,0.5]"])
    dataset = TwoViewStackDataset([fake_item(np.zeros((1, 300, 200, 4), np.float32), 3)], StackConfig(ratio=[0.5, 2.0]))
    params = np.stack([dataset[(epoch, 0)]["params"].numpy() for epoch in range(500)])
    boxes = boxes_of(params.reshape(-1, params.shape[-1]))
    assert ratio_compatible(boxes, 0.5, 2.0).all()
    assert np.log(boxes[:, 3] / boxes[:, 2]).min() < math.log(0.6)
    assert np.log(boxes[:, 3] / boxes[:, 2]).max() > math.log(1.6)
