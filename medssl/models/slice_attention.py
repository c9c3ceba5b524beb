"""Attention over the slices of a volume: deformable (Nguyen et al., AAAI 2023) and full multi-head.

Tokens are slices: every module takes slice embeddings ``x: [B, N, D]``, an optional padding mask ``[B, N]``
(True = a real slice, False = padding; padding is always at the END of a volume's sequence) and optional physical
slice positions ``[B, N]`` in mm. The paper's released code ran the deformable attention over the *feature* axis by
mistake (``reference/methods.md`` §1.3); here it runs over slices, as the paper describes.

Both modules add a continuous relative position bias (SwinV2 CPB): an MLP on the signed-log distance
``sign(Δ) * log(1 + |Δ|)`` with ``Δ = position(query) - position(key)``, in mm when ``positions`` is given, else in
slice-index units.

Padded query rows are output as zeros; padded input rows (and padded positions) are never read, so they may hold any
value, NaN included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.runtime.checks import at_least

__all__ = ["ContinuousPositionBias", "DeformableSliceAttention", "FullSliceAttention", "signed_log"]


def signed_log(delta: Tensor) -> Tensor:
    """``sign(Δ) * log(1 + |Δ|)``, elementwise (same shape as ``delta``)."""
    return torch.sign(delta) * torch.log1p(delta.abs())


class ContinuousPositionBias(nn.Module):
    """SwinV2-style continuous relative position bias: ``Linear(1, hidden) -> ReLU -> Linear(hidden, heads)``.

    The MLP input is the signed-log distance :func:`signed_log` of ``Δ`` (query position minus key position).

    Args:
        heads: number of attention heads (one bias per head).
        hidden: width of the hidden layer.

    Attributes:
        mlp: the ``nn.Sequential`` above; ``mlp(signed_log(Δ)[..., None])`` is ``[..., heads]``.
    """

    def __init__(self, heads: int, hidden: int = 64) -> None:
        super().__init__()
        at_least(1, heads=heads)
        if hidden < 1:
            raise ValueError(f"bias_hidden must be >= 1, got {hidden}")
        self.heads = heads
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, heads))

    def forward(self, delta: Tensor) -> Tensor:
        """Bias of every head for a distance shared by all heads.

        Args:
            delta: distances ``[...]`` (query minus key).

        Returns:
            ``[..., heads]``.
        """
        return self.mlp(signed_log(delta).unsqueeze(-1))

    def per_head(self, delta: Tensor) -> Tensor:
        """Bias when every head has its own distances (deformable sampling differs per head).

        Args:
            delta: distances ``[B, H, N, M]``; ``delta[:, h]`` are head ``h``'s query-minus-key distances.

        Returns:
            ``[B, H, N, M]``: head ``h``'s MLP output evaluated on ``delta[:, h]`` (equal to
            ``self(delta)[:, h, ..., h]`` without computing the other heads' outputs).
        """
        hidden = self.mlp[1](self.mlp[0](signed_log(delta).unsqueeze(-1)))  # [B, H, N, M, hidden]
        last: nn.Linear = self.mlp[2]  # type: ignore[assignment]
        return torch.einsum("bhnmk,hk->bhnm", hidden, last.weight) + last.bias[None, :, None, None]


def _check_common(dim: int, heads: int, bias_hidden: int, dropout: float) -> None:
    at_least(1, dim=dim, heads=heads)
    if dim % heads != 0:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    at_least(1, bias_hidden=bias_hidden)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _prepare(
    x: Tensor, mask: Tensor | None, positions: Tensor | None, dim: int, *, prefix: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate inputs; return ``x`` with padded rows zeroed, the bool mask ``[B, N]`` and positions ``[B, N]``.

    Positions default to the slice index; padded positions are set to 0 so they are always finite. Positions are kept
    in at least float32 (sampling positions must stay exact under bf16/fp16 autocast).
    """
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [B, N, {dim}], got {tuple(x.shape)}")
    batch, n, _ = x.shape
    if n < 1:
        raise ValueError("x must hold at least one slice (N >= 1)")
    if mask is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=x.device)
    else:
        if mask.shape != (batch, n):
            raise ValueError(f"mask must be [B, N] = {(batch, n)}, got {tuple(mask.shape)}")
        valid = mask.to(device=x.device, dtype=torch.bool)
        if prefix:
            index = torch.arange(n, device=x.device)
            if not torch.equal(valid, index[None, :] < valid.sum(dim=1, keepdim=True)):
                raise ValueError("mask must mark real slices as a prefix of each sequence (padding at the end)")
    pos_dtype = torch.promote_types(x.dtype, torch.float32)
    if positions is None:
        pos = torch.arange(n, device=x.device, dtype=pos_dtype).expand(batch, n)
    else:
        if positions.shape != (batch, n):
            raise ValueError(f"positions must be [B, N] = {(batch, n)}, got {tuple(positions.shape)}")
        pos = positions.to(device=x.device, dtype=pos_dtype).masked_fill(~valid, 0.0)
    return x.masked_fill(~valid[..., None], 0.0), valid, pos


class DeformableSliceAttention(nn.Module):
    """Deformable multi-head attention along the slice axis.

    For a volume with ``L`` real slices (of ``N``, padding at the end):

    * queries for every slice: ``q = x W_q``, split into ``heads`` heads of ``dim_head = dim // heads``;
    * reference points every ``r = reference_stride`` slices: ``j * r`` for ``j = 0 .. ceil(N / r) - 1``; a
      reference point is a valid key iff ``j * r < L``;
    * offsets: the **projected queries** ``q`` (all heads, ``[.., dim]``) are mean-pooled over the window
      ``[j*r, j*r + r)`` using real slices only, then ``offset_mlp`` (``Linear(dim, dim) -> GELU ->
      Linear(dim, heads)``, last layer zero-initialised) gives one offset per head, ``tanh(raw) * max_offset``
      slices;
    * sampling position ``p = clamp(j*r + offset, 0, L - 1)``; keys and values are ``x W_k``, ``x W_v`` linearly
      interpolated between slices ``floor(p)`` and ``min(floor(p) + 1, L - 1)`` (gradients reach the offsets through
      the interpolation weight);
    * scores ``q_i . k_j / sqrt(dim_head) + CPB_h(pos_i - pos(p_j))`` where ``pos(p)`` is the positions linearly
      interpolated at ``p`` (mm if ``positions`` is given, else ``pos(p) = p``); invalid reference points get
      ``-inf``; softmax over reference points; ``Linear(dim, dim)`` output projection and dropout; padded query
      rows are zeros.

    With zero offsets and ``reference_stride=1`` this is exactly ordinary multi-head attention over the real slices
    with the relative position bias.

    Args:
        dim: token dimension ``D``.
        heads: number of heads; ``dim`` must be divisible by it.
        reference_stride: spacing ``r`` of the reference points, in slices (>= 1).
        max_offset: bound of the learned offsets, in slices (>= 0).
        bias_hidden: hidden width of the continuous position bias MLP.
        dropout: dropout after the output projection.

    Attributes:
        last_offsets: offsets of the last forward, ``[B, M, heads]`` in slices (``M = ceil(N / r)``), detached;
            entries of invalid reference points (``j * r >= L``) are meaningless. ``None`` before any forward.
        last_reference_valid: ``[B, M]`` bool, which reference points were valid in the last forward.
    """

    last_offsets: Tensor | None
    last_reference_valid: Tensor | None

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        reference_stride: int = 4,
        max_offset: float = 2.0,
        bias_hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_common(dim, heads, bias_hidden, dropout)
        at_least(1, reference_stride=reference_stride)
        if not (math.isfinite(max_offset) and max_offset >= 0.0):
            raise ValueError(f"max_offset must be finite and >= 0, got {max_offset}")
        self.dim = dim
        self.heads = heads
        self.dim_head = dim // heads
        self.reference_stride = reference_stride
        self.max_offset = float(max_offset)
        self.scale = self.dim_head**-0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.offset_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, heads))
        nn.init.zeros_(self.offset_mlp[-1].weight)
        nn.init.zeros_(self.offset_mlp[-1].bias)
        self.position_bias = ContinuousPositionBias(heads, bias_hidden)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.last_offsets = None
        self.last_reference_valid = None

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Attend from every slice to the deformed reference points.

        Args:
            x: slice tokens ``[B, N, D]``.
            mask: ``[B, N]`` bool, True for real slices, padding at the end; ``None`` = all real.
            positions: ``[B, N]`` physical slice positions (mm); ``None`` = slice index.

        Returns:
            ``[B, N, D]``; rows of padded slices are zero.

        Raises:
            ValueError: on wrong shapes or a mask that is not a prefix.
        """
        x, valid, pos = _prepare(x, mask, positions, self.dim, prefix=True)
        batch, n, dim = x.shape
        heads, dim_head, stride = self.heads, self.dim_head, self.reference_stride
        lengths = valid.sum(dim=1)  # [B]
        n_ref = -(-n // stride)

        q = self.to_q(x)  # [B, N, D]
        k = self.to_k(x).view(batch, n, heads, dim_head)
        v = self.to_v(x).view(batch, n, heads, dim_head)

        # Offsets from the projected queries, masked-mean pooled over each reference window.
        pad = n_ref * stride - n
        windows = F.pad(q, (0, 0, 0, pad)).view(batch, n_ref, stride, dim)
        weights = F.pad(valid.to(q.dtype), (0, pad)).view(batch, n_ref, stride, 1)
        pooled = (windows * weights).sum(dim=2) / weights.sum(dim=2).clamp(min=1.0)  # [B, M, D]
        offsets = torch.tanh(self.offset_mlp(pooled).to(pos.dtype)) * self.max_offset  # [B, M, H], >= float32

        reference = torch.arange(n_ref, device=x.device) * stride  # [M]
        # An empty volume (L = 0) keeps reference 0 as a dummy key so that softmax stays finite.
        key_valid = reference[None, :] < lengths.clamp(min=1)[:, None]  # [B, M]
        self.last_offsets = offsets.detach()
        self.last_reference_valid = reference[None, :] < lengths[:, None]

        last = (lengths - 1).clamp(min=0)[:, None, None]  # [B, 1, 1]
        p = (reference.to(offsets.dtype)[None, :, None] + offsets).clamp(min=0.0)  # [B, M, H]
        last_p = last.to(p.dtype)
        p = torch.where(p > last_p, last_p, p)
        lower = p.detach().floor().long()
        upper = torch.minimum(lower + 1, last)
        frac = p - lower.to(p.dtype)  # [B, M, H], carries the gradient to the offsets

        def gather(t: Tensor, index: Tensor) -> Tensor:  # t [B, N, H, dh], index [B, M, H] -> [B, M, H, dh]
            return t.gather(1, index[..., None].expand(-1, -1, -1, dim_head))

        w = frac[..., None].to(k.dtype)
        k_lo, v_lo = gather(k, lower), gather(v, lower)
        k_s = k_lo + w * (gather(k, upper) - k_lo)
        v_s = v_lo + w * (gather(v, upper) - v_lo)
        pos_lo = pos.gather(1, lower.flatten(1)).view_as(p)
        key_pos = pos_lo + frac * (pos.gather(1, upper.flatten(1)).view_as(p) - pos_lo)  # [B, M, H]

        delta = pos[:, None, :, None] - key_pos.permute(0, 2, 1)[:, :, None, :]  # [B, H, N, M]
        scores = torch.einsum("bnhd,bmhd->bhnm", q.view(batch, n, heads, dim_head), k_s) * self.scale
        scores = scores + self.position_bias.per_head(delta)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", attn, v_s).reshape(batch, n, dim)
        out = self.dropout(self.to_out(out))
        return out.masked_fill(~valid[..., None], 0.0)


class FullSliceAttention(nn.Module):
    """Ordinary multi-head attention over all real slices with the continuous relative position bias.

    The "plain attention instead of deformable" ablation: scores ``q_i . k_j / sqrt(dim_head) + CPB_h(pos_i -
    pos_j)``, padded keys masked with ``-inf``, output projection ``Linear(dim, dim)`` and dropout; padded query rows
    are zeros. Same parameter names as :class:`DeformableSliceAttention` (``to_q``, ``to_k``, ``to_v``, ``to_out``,
    ``position_bias``). The mask need not be a prefix here.

    Args:
        dim: token dimension ``D``.
        heads: number of heads; ``dim`` must be divisible by it.
        bias_hidden: hidden width of the continuous position bias MLP.
        dropout: dropout after the output projection.
    """

    def __init__(self, dim: int, heads: int = 8, bias_hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        _check_common(dim, heads, bias_hidden, dropout)
        self.dim = dim
        self.heads = heads
        self.dim_head = dim // heads
        self.scale = self.dim_head**-0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.position_bias = ContinuousPositionBias(heads, bias_hidden)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Attend from every slice to every real slice.

        Args:
            x: slice tokens ``[B, N, D]``.
            mask: ``[B, N]`` bool, True for real slices; ``None`` = all real.
            positions: ``[B, N]`` physical slice positions (mm); ``None`` = slice index.

        Returns:
            ``[B, N, D]``; rows of padded slices are zero.
        """
        x, valid, pos = _prepare(x, mask, positions, self.dim, prefix=False)
        batch, n, dim = x.shape
        shape = (batch, n, self.heads, self.dim_head)
        q, k, v = self.to_q(x).view(shape), self.to_k(x).view(shape), self.to_v(x).view(shape)
        delta = pos[:, :, None] - pos[:, None, :]  # [B, N(query), N(key)]
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * self.scale
        scores = scores + self.position_bias(delta).permute(0, 3, 1, 2)
        # A volume without real slices keeps all keys so that softmax stays finite (its rows are zeroed anyway).
        key_valid = valid | ~valid.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v).reshape(batch, n, dim)
        out = self.dropout(self.to_out(out))
        return out.masked_fill(~valid[..., None], 0.0)
