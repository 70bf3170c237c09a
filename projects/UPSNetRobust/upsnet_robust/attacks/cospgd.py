# Copyright (c) UPSNetRobust authors.
"""CosPGD (Agnihotri et al., 2023): PGD on a cross-entropy weighted by prediction-label cosine."""

import torch
import torch.nn.functional as F

from .dense import DenseAttack, dense_cross_entropy, valid_pixel_count

__all__ = ["CosPGD", "cospgd_loss"]


def cospgd_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L = 1/|HW| sum_pixels cos(softmax(logits), one_hot(target)) * CE, per image.

    The weight is large where the prediction still agrees with the label, so the attack keeps
    pushing on pixels that are not yet fooled instead of inflating the loss of fooled ones. It
    is detached (a weighting, not part of the ascent direction). Labels are one-hot encoded
    after replacing 255 by class 0, and ignored pixels get weight 0 and are not counted in |HW|.

    Args:
        logits (Tensor): (N, C, H, W).
        targets (Tensor): (N, H, W) long, 255 = ignore.

    Returns:
        Tensor: (N,) loss per image.
    """
    ce, valid = dense_cross_entropy(logits, targets)
    with torch.no_grad():
        labels = targets.long().masked_fill(~valid, 0)
        one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        weight = F.cosine_similarity(F.softmax(logits.detach(), dim=1), one_hot, dim=1) * valid
    return (weight * ce).reshape(ce.shape[0], -1).sum(dim=1) / valid_pixel_count(valid)


class CosPGD(DenseAttack):
    """PGD (sign steps, L-inf projection) on the CosPGD loss; needs a dense objective.

    Arguments are :class:`PGD`'s; the default step is alpha = eps / T.
    """

    name = "cospgd"

    def dense_loss(self, logits, targets, t, steps):
        return cospgd_loss(logits, targets)
