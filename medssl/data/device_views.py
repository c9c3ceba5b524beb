"""Multi-crop views made in batch on the training device (issue 16): the loader only reads and draws numbers.

A sample's views are fixed by numbers drawn on the host from its ``(seed, epoch, index)`` generator
(:func:`draw_view_params`: a few dozen floats per view, no pixel work); :func:`render_views` then makes the views of
a whole batch on whatever device the batch is on:

* geometry in one ``grid_sample`` per view size: the RandomResizedCrop box (``random_resized_crop_box``, as the
  per-sample path), the resize to ``size`` x ``size``, the horizontal flip and the rotation / zoom of the resized view
  about its centre (zero outside the view, as MONAI's ``RandAffine`` with ``padding_mode="zeros"``), all fused into
  one sampling grid, bilinear, sampling only the output pixels;
* intensity as tensor operations on the batch, in the per-sample path's order: gamma on each view's own min-max
  range (MONAI ``RandAdjustContrast``), scale and shift (``RandScaleIntensity``, ``RandShiftIntensity``), Gaussian
  blur with per-view sigmas (separable, truncated at 4 sigma, ``RandGaussianSmooth``), Gaussian noise whose standard
  deviation is drawn in ``[0, noise_std]`` (``RandGaussianNoise``). The noise comes from a counter-based hash of the
  view's seed and the pixel index, so it depends on the sample only, never on the batch or the device.

Images of different sizes share a batch padded at the bottom and right: ``extents`` gives each image's real height and
width, and the crop boxes lie inside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medssl.data.views import AugmentConfig, random_resized_crop_box

# per-view parameters, in the order draw_view_params writes them into one float64 row
PARAMS = (
    "top", "left", "height", "width",  # crop box in source pixels
    "flip",  # 1: horizontal flip
    "angle", "zoom_y", "zoom_x",  # rotation (radians) and per-axis zoom of the resized view (0, 1, 1: no affine)
    "gamma",  # 1: none
    "scale", "shift",  # intensity x * (1 + scale) + shift
    "sigma_y", "sigma_x",  # blur sigmas in output pixels (0: none)
    "noise_std",  # 0: none
    "noise_seed",  # integer below 2**31 for the noise hash
)  # fmt: skip
N_PARAMS = len(PARAMS)


def draw_view_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_views: int,
    scale: tuple[float, float] | list[float],
    ratio: tuple[float, float] | list[float],
    augment: AugmentConfig,
) -> np.ndarray:
    """``[n_views, N_PARAMS]`` float64: the random numbers of ``n_views`` views of one ``height`` x ``width`` image.

    Each augmentation is applied with its probability as in :func:`medssl.data.views.view_transform`; an augmentation
    that is not applied gets its neutral value. The crop box is drawn by ``random_resized_crop_box`` (torchvision's
    procedure, as the per-sample path). Every number comes from ``rng.random()`` (about 0.4 us a draw; a NumPy
    ``RandomState`` per view would cost 0.5 ms to create).
    """
    out = np.zeros((n_views, N_PARAMS), dtype=np.float64)
    rotate, zoom_range = math.radians(augment.rotate_degrees), augment.scale_range
    draws = _Draws(rng)
    uniform = draws.uniform
    for v in range(n_views):
        top, left, box_h, box_w = random_resized_crop_box(height, width, scale, ratio, draws)
        flip = float(rng.random() < augment.flip_prob)
        affine = rng.random() < augment.affine_prob
        angle = uniform(-rotate, rotate) if affine else 0.0
        zoom_y = 1.0 + uniform(-zoom_range, zoom_range) if affine else 1.0
        zoom_x = 1.0 + uniform(-zoom_range, zoom_range) if affine else 1.0
        gamma = uniform(*augment.gamma) if rng.random() < augment.gamma_prob else 1.0
        contrast = rng.random() < augment.contrast_prob
        scale_by = uniform(-augment.contrast_range, augment.contrast_range) if contrast else 0.0
        contrast = rng.random() < augment.contrast_prob
        half = augment.contrast_range / 2
        shift = uniform(-half, half) if contrast else 0.0
        blur = rng.random() < augment.blur_prob
        sigma_y = uniform(*augment.blur_sigma) if blur else 0.0
        sigma_x = uniform(*augment.blur_sigma) if blur else 0.0
        noise = uniform(0.0, augment.noise_std) if rng.random() < augment.noise_prob else 0.0
        seed = float(draws.randint(0, 2**31 - 1))
        out[v] = (top, left, box_h, box_w, flip, angle, zoom_y, zoom_x, gamma, scale_by, shift, sigma_y, sigma_x, noise,
                  seed)  # fmt: skip
    return out


class _Draws:
    """``uniform`` and ``randint`` (what ``random_resized_crop_box`` calls) from a ``Generator``'s ``random()``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(self.rng.random())

    def randint(self, low: int, high: int) -> int:
        """An integer in ``[low, high)``."""
        return low + min(int(self.rng.random() * (high - low)), high - low - 1)


@dataclass(frozen=True)
class ViewParams:
    """:func:`draw_view_params` rows of a batch as tensors ``[B, V]`` each (float32 except ``noise_seed``)."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor
    angle: Tensor
    zoom_y: Tensor
    zoom_x: Tensor
    gamma: Tensor
    scale: Tensor
    shift: Tensor
    sigma_y: Tensor
    sigma_x: Tensor
    noise_std: Tensor
    noise_seed: Tensor

    @classmethod
    def from_rows(cls, rows: Tensor | np.ndarray, device: torch.device | str | None = None) -> ViewParams:
        """``[B, V, N_PARAMS]`` rows (a collated batch of :func:`draw_view_params` outputs) -> tensors on ``device``."""
        table = torch.as_tensor(rows, dtype=torch.float64, device=device)
        if table.ndim != 3 or table.shape[-1] != N_PARAMS:
            raise ValueError(f"view parameters must be [B, V, {N_PARAMS}], got {tuple(table.shape)}")
        values: dict[str, Any] = {}
        for i, name in enumerate(PARAMS):
            column = table[..., i]
            values[name] = column.long() if name == "noise_seed" else column.float()
        return cls(**values)

    def select(self, views: slice) -> ViewParams:
        """The parameters of some of the views (e.g. the global ones)."""
        return ViewParams(**{f.name: getattr(self, f.name)[:, views] for f in fields(self)})


def render_views(images: Tensor, params: ViewParams, size: int) -> Tensor:
    """The views ``[B, V, C, size, size]`` of a padded batch ``images`` ``[B, C, H, W]``.

    Args:
        images: float images, each at the top left of its ``[H, W]`` plane; the padding is never sampled (the boxes
            were drawn inside each image's own height and width, and sampling is clamped to the box).
        params: ``[B, V]`` parameters from :func:`draw_view_params`.
        size: output side in pixels.
    """
    b, c = images.shape[:2]
    v = params.top.shape[1]
    geometry = _geometry(images, params, size)  # [B, V, C, size, size]
    return _intensity(geometry.reshape(b * v, c, size, size), params).reshape(b, v, c, size, size)


def _geometry(images: Tensor, params: ViewParams, size: int) -> Tensor:
    """Crop box + resize + flip + rotation/zoom about the view centre, one grid per view, zero outside the view."""
    b, c, h, w = images.shape
    v = params.top.shape[1]
    device, dtype = images.device, images.dtype
    # output pixel centres in the view frame, [-1, 1] (align_corners=False)
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    uy, ux = torch.meshgrid(axis, axis, indexing="ij")  # [S, S]
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)  # [B, V]
    # the affine maps an output pixel to the (flipped, resized) view it samples: rotate, then zoom per axis
    vx = params.zoom_x[..., None, None] * (cos[..., None, None] * ux - sin[..., None, None] * uy)
    vy = params.zoom_y[..., None, None] * (sin[..., None, None] * ux + cos[..., None, None] * uy)
    inside = (vx.abs() <= 1.0) & (vy.abs() <= 1.0)  # MONAI's RandAffine pads the view with zeros
    vx = torch.where(params.flip[..., None, None] > 0.5, -vx, vx)
    # view frame -> source pixel centres, clamped to the box (the crop-then-resize path reads nothing outside it),
    # then -> the padded tensor's normalised coordinates
    left, top = params.left[..., None, None], params.top[..., None, None]
    width, height = params.width[..., None, None], params.height[..., None, None]
    x = torch.minimum(torch.maximum(left + (vx + 1.0) * 0.5 * width - 0.5, left), left + width - 1.0)
    y = torch.minimum(torch.maximum(top + (vy + 1.0) * 0.5 * height - 0.5, top), top + height - 1.0)
    grid = torch.stack([(x + 0.5) * (2.0 / w) - 1.0, (y + 0.5) * (2.0 / h) - 1.0], dim=-1)  # [B, V, S, S, 2]
    # the V views of an image as one tall grid over the image itself (no copy of the image per view)
    grid = grid.reshape(b, v * size, size, 2).to(dtype)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [B, C, V*S, S]
    out = out.reshape(b, c, v, size, size).transpose(1, 2).reshape(b * v, c, size, size)
    return (out * inside.reshape(b * v, 1, size, size).to(dtype)).reshape(b, v, c, size, size)


def _intensity(views: Tensor, params: ViewParams) -> Tensor:
    """Gamma, scale, shift, blur, noise on ``[N, C, S, S]`` views (``N = B * V``, parameters flattened alike)."""
    n = views.shape[0]
    flat = {f.name: getattr(params, f.name).reshape(n) for f in fields(params)}
    shape = (n, 1, 1, 1)
    low = views.amin(dim=(1, 2, 3), keepdim=True)
    span = views.amax(dim=(1, 2, 3), keepdim=True) - low
    gamma = flat["gamma"].view(shape).to(views.dtype)
    adjusted = ((views - low) / (span + 1e-7)).clamp(min=0).pow(gamma) * span + low
    views = torch.where(gamma != 1.0, adjusted, views)
    views = views * (1.0 + flat["scale"].view(shape).to(views.dtype)) + flat["shift"].view(shape).to(views.dtype)
    views = _blur(views, flat["sigma_y"], flat["sigma_x"])
    noise = hashed_normal(flat["noise_seed"], views.shape[1:]).to(views.dtype)
    return views + noise * flat["noise_std"].view(shape).to(views.dtype)


def _blur(views: Tensor, sigma_y: Tensor, sigma_x: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per view and axis (0: unchanged), truncated at 4 sigma."""
    blurred = sigma_y > 0
    if not bool(blurred.any()):
        return views
    n, c, s, _ = views.shape
    radius = math.ceil(4.0 * float(torch.maximum(sigma_y, sigma_x).max()))
    radius = max(min(radius, s - 1), 1)
    offsets = torch.arange(-radius, radius + 1, device=views.device, dtype=torch.float32)

    def kernels(sigma: Tensor) -> Tensor:  # [N, K], a delta where sigma == 0
        safe = sigma.clamp(min=1e-6)[:, None]
        k = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
        k = torch.where((sigma > 0)[:, None], k, (offsets == 0).float()[None, :])
        return k / k.sum(dim=1, keepdim=True)

    ky = kernels(sigma_y).to(views.dtype).repeat_interleave(c, dim=0)  # [N*C, K]
    kx = kernels(sigma_x).to(views.dtype).repeat_interleave(c, dim=0)
    x = views.reshape(1, n * c, s, s)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), ky[:, None, :, None], groups=n * c)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kx[:, None, None, :], groups=n * c)
    return x.reshape(n, c, s, s)


def hashed_normal(seeds: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Standard normal noise ``[N, *shape]`` from a counter-based hash of each row's seed and the element index
    (Box-Muller on two hashed uniforms): the same seed gives the same noise on any device, in any batch."""
    count = int(np.prod(shape))
    index = torch.arange(count, device=seeds.device, dtype=torch.int64)
    key = seeds.to(torch.int64)[:, None] * 0x9E3779B1 + index[None, :] * 2

    def uniform(counter: Tensor) -> Tensor:  # a 31-bit integer mix (splitmix-like), then (0, 1)
        z = (counter ^ (counter >> 15)) * 0x2C1B3C6D & 0x7FFFFFFF
        z = (z ^ (z >> 12)) * 0x297A2D39 & 0x7FFFFFFF
        z = z ^ (z >> 15)
        return (z.float() + 0.5) / 2147483648.0

    u1, u2 = uniform(key), uniform(key + 1)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return normal.reshape(seeds.shape[0], *shape)
