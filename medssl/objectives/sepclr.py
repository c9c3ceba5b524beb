"""SepCLR: separating common from salient patterns (Louiset et al., "SepCLR: Separating common from salient
patterns with Contrastive Representation Learning", ICLR 2024).

Contrastive analysis setting: a *background* group (e.g. healthy controls) and a *target* group (e.g. patients).
Two spaces are learned:

* the **common** space ``c`` (on the unit sphere) holds the factors shared by both groups;
* the **salient** space ``s`` (Euclidean, not normalised) holds the factors present only in the target group;
  background samples are pulled onto the information-less vector ``s' = 0``.

The loss terms follow the authors' ``losses.py`` and training scripts (see reference/methods.md §3.3). With the
default ``tau = 0.5`` the kernels are ``exp(-‖a - b‖²)`` (Wang & Isola's uniformity with ``t = 1``) and the
alignment is the plain mean squared distance. All pairwise kernels are computed in float32 (autocast disabled) and
in the log domain (``logsumexp``), so they stay finite when salient vectors are far apart.

Example:
    >>> heads = SepCLRHeads(in_dim=512)  # medssl.models.heads
    >>> criterion = SepCLRLoss()
    >>> c1, s1 = heads(encoder(view1))
    >>> c2, s2 = heads(encoder(view2))
    >>> loss, metrics = criterion(c1, c2, s1, s2, is_target=labels == 1)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medssl.runtime.checks import at_least

__all__ = ["SepCLRLoss", "align_loss", "joint_entropy_loss", "uniform_loss"]


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _pairwise_sq_dists(x: Tensor) -> Tensor:
    """``[N, D] -> [N, N]`` squared Euclidean distances in float32, exact zeros on the diagonal.

    Uses the Gram form ``‖a‖² + ‖b‖² - 2 a·b`` (O(N²) memory instead of O(N²D)); its gradient in ``a`` is
    ``2 (a - b)`` as for the direct form. Tiny negative values from rounding are clamped to 0.
    """
    x = x.float()
    sq = x.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0)


def align_loss(x: Tensor, y: Tensor, alpha: float = 2.0, tau: float = 0.5) -> Tensor:
    """Alignment of positive pairs: ``mean_i ‖x_i - y_i‖^alpha / (2 tau)`` (SepCLR ``losses.py``; Wang & Isola 2020).

    With the defaults this is the mean squared distance between paired rows.

    Args:
        x: ``[N, D]``.
        y: ``[N, D]``, paired row by row with ``x``.
        alpha: exponent of the distance (> 0).
        tau: temperature; the distance term is divided by ``2 tau``.
    Returns:
        scalar tensor (float32).
    """
    _check_tau(tau)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must both be [N, D] with the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        sq = (x.float() - y.float()).pow(2).sum(dim=1)
        # alpha == 2 avoids the sqrt, whose gradient is undefined at a zero distance.
        dist_alpha = sq if alpha == 2 else sq.sqrt().pow(alpha)
        return dist_alpha.mean() / (2.0 * tau)


def uniform_loss(x: Tensor, tau: float = 0.5) -> Tensor:
    """Uniformity: ``log mean_{i<j} exp(-‖x_i - x_j‖² / (2 tau))`` (SepCLR ``losses.py``; Wang & Isola 2020, t=1/(2τ)).

    Lower is more spread out; it is 0 when all rows are equal.

    Args:
        x: ``[N, D]`` with ``N >= 2``.
        tau: temperature (> 0).
    Returns:
        scalar tensor (float32), ``<= 0``.
    """
    _check_tau(tau)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be [N, D] with N >= 2, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        n = x.shape[0]
        d2 = _pairwise_sq_dists(x)
        iu = torch.triu_indices(n, n, offset=1, device=x.device)
        log_kernel = -d2[iu[0], iu[1]] / (2.0 * tau)
        return torch.logsumexp(log_kernel, dim=0) - math.log(log_kernel.numel())


def joint_entropy_loss(c: Tensor, s: Tensor, tau: float = 0.5) -> Tensor:
    """k-JEM: negative kernel estimate of the joint entropy ``H(c, s)`` (Louiset et al., ICLR 2024).

    ``mean_i log[(1/N) Σ_j exp(-‖s_i - s_j‖² / (2τ)) · exp(-‖c_i - c_j‖² / (2τ))]``, where ``j`` runs over the whole
    batch including ``i``. This is ``-Ĥ(c, s)`` for a product Gaussian kernel density estimate, so minimising it
    maximises the joint entropy and discourages information shared between ``c`` and ``s``. Computed in float32.

    Args:
        c: ``[N, Dc]`` common vectors (normally L2-normalised).
        s: ``[N, Ds]`` salient vectors (SepCLR passes ``s'``: background rows set to 0).
        tau: kernel temperature (> 0).
    Returns:
        scalar tensor (float32), in ``[-log N, 0]``.
    """
    _check_tau(tau)
    if c.dim() != 2 or s.dim() != 2 or c.shape[0] != s.shape[0] or c.shape[0] < 1:
        raise ValueError(
            f"c and s must be [N, Dc] and [N, Ds] with the same N >= 1, got {tuple(c.shape)}, {tuple(s.shape)}"
        )
    with torch.autocast(device_type=c.device.type, enabled=False):
        log_kernel = -(_pairwise_sq_dists(s) + _pairwise_sq_dists(c)) / (2.0 * tau)
        return (torch.logsumexp(log_kernel, dim=1) - math.log(c.shape[0])).mean()


class SepCLRLoss(nn.Module):
    """SepCLR with the k-JEM leakage term (Louiset et al., ICLR 2024; reference/methods.md §3.3).

    With ``s'ᵛ`` = ``sᵛ`` whose background rows are replaced by the constant null vector (no gradient)::

        L_common   = align(c¹, c²) + w · ½[unif(c¹) + unif(c²)]
        L_salient  = align(s¹[target], s²[target]) + w · ½[unif(s'¹) + unif(s'²)]
        L_infoless = ½[align(s¹[bg], 0) + align(s²[bg], 0)]          (= ½[mean‖s¹_bg‖² + mean‖s²_bg‖²] at τ=0.5)
        L_kJEM     = ½[JEM(c¹, s'¹) + JEM(c², s'²)]
        L = L_common + beta_salient · L_salient + beta_infoless · L_infoless + lambda_jem · L_kJEM

    The salient uniformity runs over the whole batch with background rows at 0, so target salient vectors are pushed
    apart and away from ``s'``; background salient rows get gradient only from ``L_infoless``. The authors' scripts
    use ``tau = 0.5`` for every term; ``tau`` here is applied to all of them (align, uniformity, k-JEM).

    Every batch must contain at least one background row and at least two target rows in total (use a balanced
    sampler, e.g. ``medssl.data.samplers.BalancedGroupBatchSampler``).

    Args:
        beta_salient: weight β_s of ``L_salient`` (paper: 1 for ImageNet-initialised encoders, 1000 from scratch).
        beta_infoless: weight β_reg of ``L_infoless`` (paper: 10–100 pretrained, 1000 from scratch).
        lambda_jem: weight λ of ``L_kJEM`` (paper: 10).
        tau: kernel temperature of all terms (paper: 0.5).
        uniformity_weight: weight ``w`` of the uniformity inside ``L_common`` and ``L_salient`` (paper: 2).
    """

    def __init__(
        self,
        beta_salient: float = 1.0,
        beta_infoless: float = 10.0,
        lambda_jem: float = 10.0,
        tau: float = 0.5,
        uniformity_weight: float = 2.0,
    ) -> None:
        super().__init__()
        at_least(
            0,
            beta_salient=beta_salient,
            beta_infoless=beta_infoless,
            lambda_jem=lambda_jem,
            uniformity_weight=uniformity_weight,
        )
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta_salient = float(beta_salient)
        self.beta_infoless = float(beta_infoless)
        self.lambda_jem = float(lambda_jem)
        self.tau = float(tau)
        self.uniformity_weight = float(uniformity_weight)

    def forward(
        self, c1: Tensor, c2: Tensor, s1: Tensor, s2: Tensor, is_target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the SepCLR loss on two views of a mixed background/target batch.

        Args:
            c1, c2: ``[B, Dc]`` common vectors of view 1 and view 2 (L2-normalised by the heads; not renormalised).
            s1, s2: ``[B, Ds]`` salient vectors of view 1 and view 2 (unnormalised).
            is_target: ``[B]`` bool, True for target (e.g. patient) rows, False for background (e.g. healthy) rows.
        Returns:
            ``(loss, metrics)``: scalar float32 loss; metrics (detached scalars): ``common``, ``salient``,
            ``infoless``, ``kjem`` (the four unweighted terms), ``salient_norm_background`` and
            ``salient_norm_target`` (mean ‖s‖ over both views).
        Raises:
            ValueError: on shape mismatches, or when the batch has no background row or fewer than two target rows.
        """
        if c1.dim() != 2 or c1.shape != c2.shape:
            raise ValueError(f"c1 and c2 must be [B, Dc] of equal shape, got {tuple(c1.shape)} and {tuple(c2.shape)}")
        if s1.dim() != 2 or s1.shape != s2.shape or s1.shape[0] != c1.shape[0]:
            raise ValueError(
                f"s1 and s2 must be [B, Ds] of equal shape with B = {c1.shape[0]}, got {tuple(s1.shape)} and "
                f"{tuple(s2.shape)}"
            )
        is_target = is_target.to(device=s1.device).bool().reshape(-1)
        if is_target.shape[0] != c1.shape[0]:
            raise ValueError(f"is_target must be [B] with B = {c1.shape[0]}, got {tuple(is_target.shape)}")
        n_target = int(is_target.sum())
        n_background = is_target.shape[0] - n_target
        if n_background < 1:
            raise ValueError("SepCLR batch has no background rows (is_target is all True); use a balanced sampler")
        if n_target < 2:
            raise ValueError(
                f"SepCLR batch needs at least 2 target rows, got {n_target} (is_target mostly False); "
                "use a balanced sampler"
            )
        tau, w = self.tau, self.uniformity_weight
        is_bg = ~is_target
        # s' (methods.md §3.3 step 3): background rows become the constant null vector; target rows keep their grad.
        s1_null = s1.masked_fill(is_bg[:, None], 0.0)
        s2_null = s2.masked_fill(is_bg[:, None], 0.0)

        common = align_loss(c1, c2, tau=tau) + w * 0.5 * (uniform_loss(c1, tau) + uniform_loss(c2, tau))
        salient = align_loss(s1[is_target], s2[is_target], tau=tau) + w * 0.5 * (
            uniform_loss(s1_null, tau) + uniform_loss(s2_null, tau)
        )
        s1_bg, s2_bg = s1[is_bg], s2[is_bg]
        infoless = 0.5 * (
            align_loss(s1_bg, torch.zeros_like(s1_bg), tau=tau) + align_loss(s2_bg, torch.zeros_like(s2_bg), tau=tau)
        )
        kjem = 0.5 * (joint_entropy_loss(c1, s1_null, tau) + joint_entropy_loss(c2, s2_null, tau))
        loss = common + self.beta_salient * salient + self.beta_infoless * infoless + self.lambda_jem * kjem

        with torch.no_grad():
            norms = torch.cat([s1.detach().float().norm(dim=1)[:, None], s2.detach().float().norm(dim=1)[:, None]], 1)
            metrics = {
                "common": common.detach(),
                "salient": salient.detach(),
                "infoless": infoless.detach(),
                "kjem": kjem.detach(),
                "salient_norm_background": norms[is_bg].mean(),
                "salient_norm_target": norms[is_target].mean(),
            }
        return loss, metrics
