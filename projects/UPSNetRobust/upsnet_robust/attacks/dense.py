# Copyright (c) UPSNetRobust authors.
"""Shared parts of the attacks that weight a per-pixel loss (SegPGD, CosPGD).

They need per-pixel logits and labels, not a scalar objective, so they consume a
:class:`~upsnet_robust.attacks.base.DenseObjective` and build the loss themselves.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

from .iterative import PGD

__all__ = ["IGNORE_LABEL", "DenseAttack", "dense_cross_entropy", "valid_pixel_count"]

IGNORE_LABEL = 255


def dense_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel cross-entropy with the ignore label masked out.

    Args:
        logits (Tensor): (N, C, H, W).
        targets (Tensor): (N, H, W) integer labels in [0, C) or 255 (ignore).

    Returns:
        tuple[Tensor, Tensor]: the cross-entropy (N, H, W), exactly 0 (and with zero gradient)
        on ignored pixels, and the bool mask (N, H, W) of valid pixels.
    """
    if logits.dim() != 4 or targets.dim() != 3:
        raise ValueError(
            f"Expected logits (N, C, H, W) and targets (N, H, W), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    n, c, h, w = logits.shape
    if tuple(targets.shape) != (n, h, w):
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}: "
            "resize the labels (nearest) or the logits first"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    targets = targets.long()
    valid = targets != IGNORE_LABEL
    labels = targets.masked_fill(~valid, 0)
    if valid.any() and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(
            f"targets must lie in [0, {c}) or be {IGNORE_LABEL} (ignore), got values in "
            f"[{int(targets[valid].min())}, {int(targets[valid].max())}]"
        )
    ce = F.cross_entropy(logits, labels, reduction="none")
    return torch.where(valid, ce, torch.zeros_like(ce)), valid


def valid_pixel_count(valid: torch.Tensor) -> torch.Tensor:
    """|HW| without ignored pixels, per image (N,); at least 1 so empty images give loss 0."""
    return valid.reshape(valid.shape[0], -1).sum(dim=1).clamp_min(1)


class DenseAttack(PGD):
    """PGD whose per-image objective is a weighted per-pixel cross-entropy.

    Subclasses implement :meth:`dense_loss`. Steps, projection, random start and restarts are
    PGD's; restarts are ranked by the loss with t = T + 1.
    """

    needs_dense_objective = True

    def dense_loss(self, logits, targets, t, steps) -> torch.Tensor:
        """
        Args:
            logits (Tensor): (N, C, H, W).
            targets (Tensor): (N, H, W), 255 = ignore.
            t (int or Tensor): the 1-based step (a (N,) tensor when scoring restarts).
            steps (Tensor): (N,) long, T per image.

        Returns:
            Tensor: (N,) loss per image, to maximise.
        """
        raise NotImplementedError

    def _check_objective(self, objective) -> None:
        if not callable(getattr(objective, "logits_and_targets", None)):
            raise TypeError(
                f"{type(self).__name__} needs a dense objective: an object with a method "
                "logits_and_targets(x) -> (logits (N, C, H, W), targets (N, H, W) long, "
                f"{IGNORE_LABEL} = ignore); got {type(objective).__name__}"
            )

    def _objective_at(self, objective, t, steps):
        def loss(x):
            logits, targets = objective.logits_and_targets(x)
            return self.dense_loss(logits, targets.to(logits.device), t, steps.to(logits.device))

        return loss
