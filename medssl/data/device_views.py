"""Augmented views made in batch on the training device: the loader only reads and draws numbers.

A sample's views are fixed by numbers drawn on the host from its ``(seed, epoch, index)`` generator
(:func:`draw_view_params`: a few dozen floats per view, no pixel work); :func:`render_views` then makes the views of
a whole batch on whatever device the batch is on:

* geometry in one bilinear sampling per view size: the RandomResizedCrop box (:func:`random_resized_crop_box`,
  torchvision's procedure), the resize to the view size, the horizontal flip and the rotation / zoom of the resized
  view about its centre (zero outside the view, as MONAI's ``RandAffine`` with ``padding_mode="zeros"``), all fused
  into one sampling grid, bilinear, sampling only the output pixels (gathered by integer index, so that a view does
  not depend on how large the padded batch is);
* intensity as tensor operations on the batch, in MONAI's order and with its definitions: gamma on each view's own
  min-max range (``RandAdjustContrast``), scale and shift (``RandScaleIntensity``, ``RandShiftIntensity``), Gaussian
  blur with per-view sigmas (separable, truncated at 4 sigma, ``RandGaussianSmooth``), Gaussian noise whose standard
  deviation is drawn in ``[0, noise_std]`` (``RandGaussianNoise``). The noise comes from a counter-based hash of the
  view's seed and the pixel index, so it depends on the sample only, never on the batch or the device.

Images of different sizes share a batch padded at the bottom and right (:func:`pad_planes`); each image's crop boxes
lie inside its own height and width, and sampling is clamped to the box, so the padding is never read. The
fine-tuning classifier's batch augmentation (crop, rotation, flip) renders through the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
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
    draws = UniformDraws(rng.random)
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


class UniformDraws:
    """``uniform`` and ``randint`` (what ``random_resized_crop_box`` calls) from any source of uniform floats in
    ``[0, 1)``: a NumPy ``Generator``'s ``random`` here, a ``torch.Generator`` in the fine-tuning classifier."""

    def __init__(self, random: Callable[[], float]) -> None:
        self.random = random

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(self.random())

    def randint(self, low: int, high: int) -> int:
        """An integer in ``[low, high)``."""
        return low + min(int(self.random() * (high - low)), high - low - 1)


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


def pad_planes(planes: Sequence[Tensor]) -> Tensor:
    """``[C, H_i, W_i]`` tensors -> ``[B, C, H, W]``, each at the top left of a zero plane of the largest height and
    width (storage dtype kept when all share one, else float32)."""
    if not planes:
        raise ValueError("pad_planes: no planes")
    height = max(int(p.shape[-2]) for p in planes)
    width = max(int(p.shape[-1]) for p in planes)
    dtypes = {p.dtype for p in planes}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    out = torch.zeros((len(planes), *planes[0].shape[:-2], height, width), dtype=dtype)
    for i, plane in enumerate(planes):
        out[i, ..., : plane.shape[-2], : plane.shape[-1]] = plane
    return out


def neutral_rows(n_images: int, n_views: int = 1) -> np.ndarray:
    """``[n_images, n_views, N_PARAMS]`` parameters that change nothing (box, flip and angle still to be set)."""
    rows = np.zeros((n_images, n_views, N_PARAMS), dtype=np.float64)
    for name in ("zoom_y", "zoom_x", "gamma"):
        rows[..., PARAMS.index(name)] = 1.0
    return rows


def render_views(images: Tensor, params: ViewParams, size: int | tuple[int, int]) -> Tensor:
    """The views ``[B, V, C, S_h, S_w]`` of a padded batch ``images`` ``[B, C, H, W]``.

    Args:
        images: float images, each at the top left of its ``[H, W]`` plane; the padding is never sampled (the boxes
            were drawn inside each image's own height and width, and sampling is clamped to the box).
        params: ``[B, V]`` parameters from :func:`draw_view_params`.
        size: output side in pixels, or ``(height, width)``.
    """
    b, c = images.shape[:2]
    v = params.top.shape[1]
    out_h, out_w = (size, size) if isinstance(size, int) else size
    geometry = _geometry(images, params, out_h, out_w)  # [B, V, C, S_h, S_w]
    return _intensity(geometry.reshape(b * v, c, out_h, out_w), params).reshape(b, v, c, out_h, out_w)


def _geometry(images: Tensor, params: ViewParams, out_h: int, out_w: int) -> Tensor:
    """Crop box + resize + flip + rotation/zoom about the view centre, one grid per view, zero outside the view."""
    b, c = images.shape[:2]
    v = params.top.shape[1]
    device, dtype = images.device, images.dtype
    # output pixel centres in the view frame, [-1, 1] (align_corners=False)
    axis_y = (torch.arange(out_h, device=device, dtype=torch.float32) + 0.5) * (2.0 / out_h) - 1.0
    axis_x = (torch.arange(out_w, device=device, dtype=torch.float32) + 0.5) * (2.0 / out_w) - 1.0
    uy, ux = torch.meshgrid(axis_y, axis_x, indexing="ij")  # [S_h, S_w]
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)  # [B, V]
    # the affine maps an output pixel to the (flipped, resized) view it samples: rotate, then zoom per axis
    vx = params.zoom_x[..., None, None] * (cos[..., None, None] * ux - sin[..., None, None] * uy)
    vy = params.zoom_y[..., None, None] * (sin[..., None, None] * ux + cos[..., None, None] * uy)
    # MONAI's RandAffine samples the resized view bilinearly with zero padding: at d view pixels beyond the last
    # pixel centre the value fades as (1 - d) per axis, which is the clamped value times this weight
    inside = ((0.5 + (1.0 - vx.abs()) * (out_w / 2.0)).clamp(0.0, 1.0)) * (
        (0.5 + (1.0 - vy.abs()) * (out_h / 2.0)).clamp(0.0, 1.0)
    )
    vx = torch.where(params.flip[..., None, None] > 0.5, -vx, vx)
    # view frame -> source pixel centres, clamped to the box (the crop-then-resize path reads nothing outside it)
    left, top = params.left[..., None, None], params.top[..., None, None]
    width, height = params.width[..., None, None], params.height[..., None, None]
    x = torch.minimum(torch.maximum(left + (vx + 1.0) * 0.5 * width - 0.5, left), left + width - 1.0)
    y = torch.minimum(torch.maximum(top + (vy + 1.0) * 0.5 * height - 0.5, top), top + height - 1.0)
    out = _bilinear(images, y.reshape(b, -1), x.reshape(b, -1))  # [B, C, V*Sh*Sw]
    out = out.reshape(b, c, v, out_h, out_w).transpose(1, 2)  # [B, V, C, Sh, Sw]
    return out * inside.reshape(b, v, 1, out_h, out_w).to(dtype)


def _bilinear(images: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` sampled bilinearly at pixel coordinates ``y``, ``x`` ``[B, P]`` (inside the image)
    -> ``[B, C, P]``.

    The four neighbours are gathered by integer index and weighted in pixel units, so a value depends only on the
    image's own pixels and the coordinates, never on the padded batch's height and width (``grid_sample``'s
    normalised coordinates round differently for different padded sizes).
    """
    b, c, h, w = images.shape
    y0f, x0f = torch.floor(y), torch.floor(x)
    wy, wx = (y - y0f).to(images.dtype)[:, None], (x - x0f).to(images.dtype)[:, None]
    y0, x0 = y0f.long().clamp(0, h - 1), x0f.long().clamp(0, w - 1)
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    flat = images.reshape(b, c, h * w)

    def at(row: Tensor, col: Tensor) -> Tensor:
        return flat.gather(2, (row * w + col)[:, None, :].expand(b, c, -1))

    top_row = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom_row = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top_row * (1 - wy) + bottom_row * wy


def _intensity(views: Tensor, params: ViewParams) -> Tensor:
    """Gamma, scale, shift, blur, noise on ``[N, C, S_h, S_w]`` views (``N = B * V``, parameters flattened alike)."""
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
    """Separable Gaussian blur with one sigma per view and axis (0: unchanged), truncated at ``int(4 sigma + 0.5)``
    pixels (scipy's and MONAI's ``GaussianFilter`` truncation), reflect at the borders.

    Each blurred view is ``K_y @ view @ K_x^T`` with its own ``[S, S]`` blur matrices (:func:`_blur_matrix`), which
    depend on its sigma and size only: a view's blur does not depend on the rest of the batch, to the last bit.
    """
    chosen = torch.nonzero(sigma_y > 0).flatten()
    if chosen.numel() == 0:
        return views
    _, _, s_h, s_w = views.shape
    ky = _blur_matrix(sigma_y[chosen], s_h).to(views.dtype)  # [M, S_h, S_h]
    kx = _blur_matrix(sigma_x[chosen], s_w).to(views.dtype)  # [M, S_w, S_w]
    blurred = ky[:, None] @ views[chosen] @ kx[:, None].transpose(-1, -2)
    return views.index_copy(0, chosen, blurred)


def _blur_matrix(sigma: Tensor, size: int) -> Tensor:
    """``[M, size, size]``: row ``i`` holds the truncated, normalised Gaussian taps around pixel ``i``, folded back
    into the image at the borders (reflect, without repeating the edge pixel); the identity where sigma is 0.

    Taps span the same offsets ``-(size - 1) .. size - 1`` for every sigma (zero beyond each view's own radius), so a
    view's matrix is the same whatever else is in the batch."""
    offsets = torch.arange(-(size - 1), size, device=sigma.device, dtype=torch.float32)  # [K]
    safe = sigma.float().clamp(min=1e-6)[:, None]
    radius = torch.floor(4.0 * safe + 0.5)
    taps = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2) * (offsets[None, :].abs() <= radius)
    taps = torch.where((sigma > 0)[:, None], taps, (offsets == 0).float()[None, :])
    taps = taps / taps.sum(dim=1, keepdim=True)  # [M, K]
    rows = torch.arange(size, device=sigma.device)
    columns = rows[:, None] + offsets.long()[None, :]  # [S, K] source pixel of each tap
    columns = columns.abs()  # reflect at 0
    columns = torch.where(columns > size - 1, 2 * (size - 1) - columns, columns).clamp(0, size - 1)  # and at S - 1
    m = sigma.shape[0]
    matrix = torch.zeros(m, size, size, device=sigma.device, dtype=torch.float32)
    return matrix.scatter_add_(2, columns[None].expand(m, -1, -1), taps[:, None, :].expand(-1, size, -1))


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
