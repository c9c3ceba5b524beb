"""Batched views on the device (medssl.data.device_views) against plain references: crop + resize, flip, rotation,
zero outside the rotated view, padded batches, gamma / scale / shift, blur, noise; a sample's views depend on its own
numbers only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from medssl.data.device_views import (
    N_PARAMS,
    PARAMS,
    ViewParams,
    draw_view_params,
    hashed_normal,
    render_views,
)
from medssl.data.views import AugmentConfig

NEUTRAL = {name: 0.0 for name in PARAMS} | {"zoom_y": 1.0, "zoom_x": 1.0, "gamma": 1.0}


def params(rows: list[list[dict[str, float]]]) -> ViewParams:
    """[B][V] dicts of parameters (missing ones neutral) -> ViewParams."""
    table = np.array([[[{**NEUTRAL, **view}[name] for name in PARAMS] for view in sample] for sample in rows])
    return ViewParams.from_rows(table)


def image(h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, h, w, generator=torch.Generator().manual_seed(seed)) + 0.5


def crop_resize(img: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    box = img[None, :, top : top + h, left : left + w]
    return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)[0]


BOX = {"top": 3, "left": 5, "height": 12, "width": 15}


def test_crop_and_resize_match_cropping_then_resizing():
    img = image()
    out = render_views(img[None], params([[BOX]]), size=16)
    torch.testing.assert_close(out[0, 0], crop_resize(img, 3, 5, 12, 15, 16), atol=1e-5, rtol=0)


def test_flip_and_a_half_turn_match_flipping_the_resized_view():
    img = image()
    reference = crop_resize(img, 3, 5, 12, 15, 16)
    out = render_views(img[None], params([[{**BOX, "flip": 1}, {**BOX, "angle": math.pi}]]), size=16)
    torch.testing.assert_close(out[0, 0], reference.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 1], reference.flip(-1).flip(-2), atol=1e-5, rtol=0)


def test_outside_the_rotated_or_zoomed_out_view_is_zero():
    img = image()
    out = render_views(img[None], params([[{**BOX, "zoom_y": 1.3, "zoom_x": 1.3}, {**BOX, "angle": math.pi / 4}]]), 16)
    for view in out[0]:
        assert view[0, 0, 0] == 0 and view[0, -1, -1] == 0  # corners sample outside the view
        assert (view[0, 6:10, 6:10] > 0).all()  # the centre samples the image


def test_rotation_and_zoom_match_monais_resampling_of_the_view_with_zero_padding():
    # box == output size (the resize is the identity): the fused grid must equal grid_sample of the cropped view with
    # zero padding, edges included (bilinear fade to zero over the last pixel, not a hard cut)
    img = image()
    box = {"top": 2, "left": 4, "height": 16, "width": 16}
    angle, zoom_y, zoom_x = math.pi / 7, 1.1, 0.9
    out = render_views(img[None], params([[{**box, "angle": angle, "zoom_y": zoom_y, "zoom_x": zoom_x}]]), 16)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[zoom_x * cos, -zoom_x * sin, 0.0], [zoom_y * sin, zoom_y * cos, 0.0]]])
    crop = img[None, :, 2:18, 4:20]
    grid = F.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
    reference = F.grid_sample(crop, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    assert (reference == 0).any() and ((reference > 0) & (reference < 0.4)).any()  # empty corners, faded edges
    torch.testing.assert_close(out[0, 0], reference, atol=1e-5, rtol=0)


def test_a_padded_batch_gives_each_image_its_own_views():
    small, large = image(10, 14, seed=1), image(20, 24, seed=2)
    batch = torch.zeros(2, 1, 20, 24)
    batch[0, :, :10, :14], batch[1] = small, large
    views = [{"top": 0, "left": 0, "height": 10, "width": 14}, {"top": 2, "left": 6, "height": 8, "width": 8}]
    together = render_views(batch, params([views, [BOX, BOX]]), size=12)
    alone = render_views(small[None], params([views]), size=12)
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=0)  # the padding is never read
    torch.testing.assert_close(together[0, 0, 0], crop_resize(small, 0, 0, 10, 14, 12)[0], atol=1e-5, rtol=0)


def test_intensity_gamma_scale_shift_match_plain_formulas():
    img = image()
    geometry = crop_resize(img, 3, 5, 12, 15, 16)
    out = render_views(img[None], params([[{**BOX, "gamma": 1.4, "scale": 0.1, "shift": -0.05}]]), 16)[0, 0]
    low, span = geometry.min(), geometry.max() - geometry.min()
    reference = ((geometry - low) / (span + 1e-7)) ** 1.4 * span + low  # MONAI AdjustContrast
    torch.testing.assert_close(out, reference * 1.1 - 0.05, atol=1e-5, rtol=0)


def test_blur_matches_scipy_per_axis():
    img = image()
    geometry = crop_resize(img, 3, 5, 12, 15, 16)
    out = render_views(img[None], params([[{**BOX, "sigma_y": 0.8, "sigma_x": 0.4}, BOX]]), 16)[0]
    reference = ndimage.gaussian_filter(geometry[0].double().numpy(), sigma=(0.8, 0.4), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(out[0, 0].double().numpy(), reference, atol=1e-5)
    torch.testing.assert_close(out[1], geometry, atol=1e-5, rtol=0)  # sigma 0 in the same batch: unchanged


def test_noise_is_a_function_of_the_seed_only():
    a = hashed_normal(torch.tensor([7, 8, 7]), (64, 64))
    torch.testing.assert_close(a[0], a[2], atol=0, rtol=0)
    assert not torch.equal(a[0], a[1])
    values = hashed_normal(torch.arange(50), (100, 100)).flatten()
    assert abs(float(values.mean())) < 0.01 and abs(float(values.std()) - 1.0) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([values[:-1], values[1:]]))[0, 1])) < 0.01
    img = image()
    view = {**BOX, "noise_std": 0.03, "noise_seed": 11}
    noisy = render_views(img[None], params([[view]]), 16)[0, 0]
    expected = crop_resize(img, 3, 5, 12, 15, 16) + 0.03 * hashed_normal(torch.tensor([11]), (1, 16, 16))[0]
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=0)


def test_a_sample_s_views_do_not_depend_on_the_rest_of_the_batch():
    augment = AugmentConfig(blur_prob=1.0, noise_prob=1.0, affine_prob=1.0)
    rows = [draw_view_params(np.random.default_rng(i), 20, 24, 3, (0.3, 1.0), (0.75, 4 / 3), augment) for i in range(3)]
    images = torch.stack([image(seed=i) for i in range(3)])
    batch = render_views(images, ViewParams.from_rows(np.stack(rows)), size=16)
    alone = render_views(images[1:2], ViewParams.from_rows(np.stack(rows[1:2])), size=16)
    torch.testing.assert_close(batch[1], alone[0], atol=0, rtol=0)  # to the last bit: DDP shares match one process


def test_drawn_parameters_follow_the_seed_and_the_probabilities():
    augment = AugmentConfig()
    first = draw_view_params(np.random.default_rng(5), 40, 30, 4, (0.14, 1.0), (0.75, 4 / 3), augment)
    again = draw_view_params(np.random.default_rng(5), 40, 30, 4, (0.14, 1.0), (0.75, 4 / 3), augment)
    assert first.shape == (4, N_PARAMS) and np.array_equal(first, again)
    column = {name: i for i, name in enumerate(PARAMS)}
    boxes = first[:, [column["top"], column["left"], column["height"], column["width"]]]
    assert (boxes[:, 0] + boxes[:, 2] <= 40).all() and (boxes[:, 1] + boxes[:, 3] <= 30).all()
    never = AugmentConfig(flip_prob=0, affine_prob=0, gamma_prob=0, contrast_prob=0, noise_prob=0, blur_prob=0)
    rows = draw_view_params(np.random.default_rng(0), 40, 30, 8, (0.14, 1.0), (0.75, 4 / 3), never)
    for name, neutral in NEUTRAL.items():
        if name not in ("top", "left", "height", "width", "noise_seed"):
            assert (rows[:, column[name]] == neutral).all(), name
    many = draw_view_params(np.random.default_rng(1), 64, 64, 2000, (0.14, 1.0), (0.75, 4 / 3), augment)
    assert many[:, column["flip"]].mean() == pytest.approx(augment.flip_prob, abs=0.04)
    assert (many[:, column["noise_std"]] > 0).mean() == pytest.approx(augment.noise_prob, abs=0.04)
    area = many[:, column["height"]] * many[:, column["width"]] / 64**2
    assert area.min() >= 0.13 and area.max() <= 1.0
