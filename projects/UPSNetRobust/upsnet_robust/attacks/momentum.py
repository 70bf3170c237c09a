# Copyright (c) UPSNetRobust authors.
"""MI-FGSM (Dong et al., 2018): I-FGSM with a momentum of L1-normalised gradients."""

import math

import torch

from detectron2.config import configurable

from .iterative import PGD, _cfg_num_steps, _cfg_step_size

__all__ = ["MIFGSM"]


class MIFGSM(PGD):
    """g_0 = 0; g_{t+1} = mu g_t + grad J / ||grad J||_1 (per image);
    x_{t+1} = Clip_{x,eps}(x_t + alpha sign(g_{t+1})); alpha = eps / T by default.

    The accumulated direction stabilises the sign steps across iterations, which is what makes
    MI-FGSM transfer better than I-FGSM. Per-image L1 normalisation keeps one image's large
    gradient from dominating another's momentum. (torchattacks divides by the mean |grad|,
    the same up to a per-image constant, so the signs agree.)
    """

    name = "mifgsm"
    step_rule = "T = NUM_STEPS, else 10; alpha = STEP_SIZE, else eps / T"

    @configurable
    def __init__(
        self, eps, num_steps=10, decay=1.0, step_size=None, generator=None, early_stop=False
    ):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            num_steps (int or None): T; None -> 10 (Dong et al.).
            decay (float): the momentum mu >= 0 (mu = 0 is I-FGSM with alpha = eps / T).
            step_size (float or None): alpha; None -> eps / T.
            generator (torch.Generator, optional): unused (deterministic); kept for symmetry.
            early_stop (bool): see :class:`PGD`.
        """
        super().__init__(
            eps,
            step_size=step_size,
            num_steps=10 if num_steps is None else num_steps,
            random_start=False,
            restarts=1,
            generator=generator,
            early_stop=early_stop,
        )
        decay = float(decay)
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay must be a finite number >= 0, got {decay}")
        self.decay = decay

    @classmethod
    def from_config(cls, cfg, eps):
        return {
            "eps": eps,
            "num_steps": _cfg_num_steps(cfg, default=10),
            "decay": cfg.ROBUSTNESS.MOMENTUM,
            "step_size": _cfg_step_size(cfg),
            "early_stop": cfg.ROBUSTNESS.EARLY_STOP,
        }

    def describe(self) -> dict:
        return dict(super().describe(), decay=self.decay)

    def _init_state(self, x: torch.Tensor) -> dict:
        return {"momentum": torch.zeros_like(x)}

    def _direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        l1 = grad.abs().reshape(grad.shape[0], -1).sum(dim=1)
        # An all-zero gradient contributes nothing (0 / tiny = 0) instead of NaN.
        l1 = l1.clamp_min(torch.finfo(grad.dtype).tiny).view(-1, *([1] * (grad.dim() - 1)))
        state["momentum"] = self.decay * state["momentum"] + grad / l1
        return state["momentum"].sign()
