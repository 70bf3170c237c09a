# Copyright (c) UPSNetRobust authors.
"""SegPGD (Gu et al., ECCV 2022): PGD that shifts weight from correct to wrong pixels."""

import torch

from .dense import DenseAttack, dense_cross_entropy, valid_pixel_count

__all__ = ["SegPGD", "segpgd_lambda", "segpgd_loss"]


def segpgd_lambda(t, num_steps):
    """lambda_t = (t - 1) / (2 T), t = 1..T: from 0 (only correct pixels) towards 1/2.

    Early steps attack pixels that are still correct (plain CE would be dominated by pixels
    already fooled); later steps balance both sets.
    """
    return (t - 1) / (2 * num_steps)


def segpgd_loss(logits: torch.Tensor, targets: torch.Tensor, lam) -> torch.Tensor:
    """L = (1 - lam) / |HW| sum_{correct} CE + lam / |HW| sum_{wrong} CE, per image.

    Ignored pixels (255) belong to neither set and are not counted in |HW|. Correctness is
    ``argmax(logits) == target`` at the current iterate, detached (a set, not a function).

    Args:
        logits (Tensor): (N, C, H, W).
        targets (Tensor): (N, H, W) long, 255 = ignore.
        lam (float or Tensor): lambda, or a (N,) tensor per image.

    Returns:
        Tensor: (N,) loss per image.
    """
    ce, valid = dense_cross_entropy(logits, targets)
    correct = (logits.detach().argmax(dim=1) == targets) & valid
    lam = torch.as_tensor(lam, dtype=ce.dtype, device=ce.device)
    lam = lam.reshape(-1, 1, 1) if lam.dim() > 0 else lam
    weight = torch.where(correct, 1 - lam, lam) * valid
    return (weight * ce).reshape(ce.shape[0], -1).sum(dim=1) / valid_pixel_count(valid)


class SegPGD(DenseAttack):
    """PGD (sign steps, L-inf projection) on the SegPGD loss with lambda_t = (t - 1) / (2T).

    Needs a dense objective (``logits_and_targets``). Arguments are :class:`PGD`'s; the default
    step is alpha = eps / T.
    """

    name = "segpgd"

    def dense_loss(self, logits, targets, t, steps):
        return segpgd_loss(logits, targets, segpgd_lambda(t, steps))
