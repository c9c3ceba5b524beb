"""L_mask: masked slice-embedding prediction (Nguyen et al., AAAI 2023; BERT/MAE-style).

The loss is the mean squared error between the decoded and the original slice embeddings over the masked positions
only (the released code averaged over all positions; see reference/methods.md §1.4). The head that masks and decodes
is :class:`medssl.models.masked.MaskedSliceHead`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.models.masked import MaskedPrediction


def masked_slice_loss(prediction: MaskedPrediction) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error over the masked slices (float32).

    Args:
        prediction: ``predictions`` and ``targets`` ``[B, N, D]``, ``masked`` and ``valid`` ``[B, N]``.
    Returns:
        ``(loss, metrics)``; metrics: ``masked_fraction`` (masked over real slices) and ``target_cosine`` (cosine
        between predictions and targets on the masked slices, a readable progress signal). With no masked slice the
        loss is a zero that keeps the graph.
    """
    masked = prediction.masked
    picked_pred, picked_target = prediction.predictions[masked].float(), prediction.targets[masked].float()
    if picked_pred.shape[0] == 0:
        loss = prediction.predictions.sum() * 0.0
        cosine = torch.zeros((), device=prediction.predictions.device)
    else:
        loss = F.mse_loss(picked_pred, picked_target)
        cosine = F.cosine_similarity(picked_pred.detach(), picked_target, dim=-1).mean()
    fraction = masked.sum() / prediction.valid.sum().clamp(min=1)
    return loss, {"masked_fraction": fraction.detach().float(), "target_cosine": cosine}
