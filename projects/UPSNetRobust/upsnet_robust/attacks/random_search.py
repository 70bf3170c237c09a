# Copyright (c) UPSNetRobust authors.
"""Random search: the gradient-free reference that tells gradient masking apart from robustness.

It draws ``num_steps`` points uniformly in the eps-ball (clipped to [0, 255]) and keeps, per
image, the one with the highest objective value: forward passes only, no gradient. A model that
is truly robust resists gradient attacks at least as well as this blind search; when random
search lowers the metric *more* than a white-box attack, the gradients mislead the attack
(gradient masking, Athalye et al., ICML 2018) and the white-box figures overstate robustness.
The report's ``white_box_vs_random`` check flags it.
"""
import torch

from detectron2.config import configurable

from .base import PIXEL_MAX, PIXEL_MIN, Attack
from .iterative import _cfg_generator, _check_num_steps

__all__ = ["RandomSearch"]


class RandomSearch(Attack):
    """Best of ``num_steps`` uniform draws in the eps-ball, per image, by the objective."""

    name = "random_search"
    needs_gradients = False
    step_rule = "T = NUM_STEPS, else 20 uniform draws in the eps-ball; the best per image is kept"

    @configurable
    def __init__(self, eps, num_steps=None, generator=None):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            num_steps (int or None): draws per image (None: 20).
            generator (torch.Generator or list[torch.Generator], optional): the draws' source.
        """
        super().__init__(eps, generator=generator)
        self.num_steps = _check_num_steps(num_steps) or 20
        self.step_size = 0.0  # no step: each draw is independent

    @classmethod
    def from_config(cls, cfg, eps):
        steps = int(cfg.ROBUSTNESS.NUM_STEPS)
        return {
            "eps": eps,
            "num_steps": steps if steps > 0 else None,
            "generator": _cfg_generator(cfg),
        }

    def perturb(self, images: torch.Tensor, objective) -> torch.Tensor:
        self._check_objective(objective)
        x = self._prepare(images)
        eps = self._eps_tensor(x).reshape(-1, *([1] * (x.dim() - 1)))
        self._begin_passes(x)
        best = x.clone()
        best_value = torch.full((x.shape[0],), -float("inf"), device=x.device)
        for _ in range(self.num_steps):
            candidate = (x + (2 * self._uniform(x) - 1) * eps).clamp(PIXEL_MIN, PIXEL_MAX)
            with torch.no_grad():
                value = objective(candidate).detach().reshape(-1).expand(x.shape[0]).float()
            self.num_forward += 1
            self._count_passes(torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
            better = value > best_value
            best[better] = candidate[better]
            best_value = torch.where(better, value, best_value)
        self._end_passes()
        return best
