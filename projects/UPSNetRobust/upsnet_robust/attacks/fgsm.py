# Copyright (c) UPSNetRobust authors.
"""FGSM (Goodfellow et al., 2015): one signed-gradient step of size eps."""

import torch

from detectron2.config import configurable

from .base import Attack, project_linf

__all__ = ["FGSM"]


class FGSM(Attack):
    """x' = clip_[0,255](x + eps * sign(grad_x J(x))).

    The single-step baseline of the study; one forward-backward per batch. Because the step is
    exactly eps per pixel, clipping to [0, 255] is the full L-inf projection.
    """

    name = "fgsm"
    single_step = True

    @configurable
    def __init__(self, eps, generator=None):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            generator (torch.Generator, optional): unused (FGSM is deterministic); accepted so
                every attack can be built the same way.
        """
        super().__init__(eps, generator=generator)

    @classmethod
    def from_config(cls, cfg, eps):
        # FGSM ignores ROBUSTNESS.STEP_SIZE and NUM_STEPS: its step is eps, once.
        return {"eps": eps}

    def perturb(self, images: torch.Tensor, objective) -> torch.Tensor:
        x = self._prepare(images)
        self._begin_passes(x)  # one pass per image; nothing to stop early
        self._count_passes(torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        _, grad = self._gradient(objective, x)
        self._end_passes()
        eps = self._eps_tensor(x).reshape(-1, *([1] * (x.dim() - 1)))
        return project_linf(x + eps * grad.sign(), x, self.eps)
