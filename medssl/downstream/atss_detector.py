"""MONAI's ``RetinaNetDetector`` with the ATSS matcher, through MONAI's documented extension point.

``RetinaNetDetector.compute_anchor_matched_idxs`` first asks whether the matcher is torchvision's ``Matcher``; without
torchvision (it does not import beside torch 2.13 here) that name is MONAI's failed-import stub, which raises on use.
MONAI's own message says to override ``compute_anchor_matched_idxs`` for another matcher: this subclass does, for
the ATSS matcher only, so no module attribute of MONAI is replaced and a MONAI upgrade cannot change it silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from torch import Tensor


class ATSSRetinaNetDetector(RetinaNetDetector):
    """``RetinaNetDetector`` whose anchors are matched by MONAI's ``ATSSMatcher`` (``set_atss_matcher``)."""

    def compute_anchor_matched_idxs(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], num_anchor_locs_per_level: Sequence[int]
    ) -> list[Tensor]:
        """Per image, the matched ground-truth index of every anchor (``[sum(HWA)]``, -1: unmatched), as MONAI's
        ATSS branch computes it."""
        if not isinstance(self.proposal_matcher, ATSSMatcher):
            raise TypeError(f"ATSSRetinaNetDetector needs set_atss_matcher(), got {type(self.proposal_matcher)}")
        matched: list[Tensor] = []
        for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
            boxes = targets_per_image[self.target_box_key]
            if boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=boxes.device))
                continue
            _, idxs = self.proposal_matcher(
                boxes.to(anchors_per_image.device),
                anchors_per_image,
                num_anchor_locs_per_level,
                self.num_anchors_per_loc,
            )
            if torch.max(idxs) < 0:
                warnings.warn(f"no anchor matched the ground-truth boxes {boxes.tolist()}", stacklevel=2)
            matched.append(idxs)
        return matched
