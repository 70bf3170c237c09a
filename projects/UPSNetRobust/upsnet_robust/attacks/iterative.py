# Copyright (c) UPSNetRobust authors.
"""Iterative signed-gradient attacks: PGD (Madry et al.), I-FGSM/BIM and ILLC (Kurakin et al.).

They share one loop: x_{t+1} = Clip_{x,eps}(x_t + alpha * sign(grad J(x_t))). PGD adds a random
start and restarts; I-FGSM is PGD without them, with alpha = 1 and Kurakin's step count.
"""

import logging
import math
from typing import Optional

import torch

from detectron2.config import configurable

from .base import Attack, _per_image, check_eps, project_linf

__all__ = ["kurakin_num_steps", "PGD", "IFGSM", "BIM", "ILLC"]

logger = logging.getLogger(__name__)


def kurakin_num_steps(eps: float) -> int:
    """Kurakin et al.'s iteration count T = max(1, ceil(min(eps + 4, 1.25 eps))).

    The study rounds up, so every eps gets at least one full step:
    eps 0.25/0.5/1/2/4/8/16/32 -> 1/1/2/3/5/10/20/36 (floor would give 0 steps for eps < 1).
    The value is rounded to 9 decimals before ``ceil`` so float noise (1.25 * 0.8 ->
    1.0000000000000002) does not add a step.

    Args:
        eps (float): L-inf budget on the 0-255 scale.

    Returns:
        int: the number of iterations (>= 1).
    """
    eps = check_eps(eps)
    if torch.is_tensor(eps):
        raise ValueError("kurakin_num_steps takes one budget; call it per image")
    return max(1, math.ceil(round(min(eps + 4.0, 1.25 * eps), 9)))


def _check_restarts(restarts, random_start: bool, attack: str) -> int:
    """``restarts`` as an int >= 1; warns when restarts without a random start would repeat
    the same deterministic run."""
    if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    restarts = int(restarts)
    if restarts > 1 and not random_start:
        logger.warning(
            f"{attack}: restarts={restarts} without random_start repeats the same run unless "
            "the objective is stochastic."
        )
    return restarts


def _check_num_steps(num_steps, allow_none: bool = True) -> Optional[int]:
    if num_steps is None and allow_none:
        return None
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def _cfg_step_size(cfg, default=None):
    """ROBUSTNESS.STEP_SIZE, or ``default`` when it is <= 0 ("the algorithm's default")."""
    step = cfg.ROBUSTNESS.STEP_SIZE
    return float(step) if step > 0 else default


def _cfg_num_steps(cfg, default=None):
    """ROBUSTNESS.NUM_STEPS, or ``default`` when it is <= 0 (None = Kurakin's rule)."""
    steps = cfg.ROBUSTNESS.NUM_STEPS
    return int(steps) if steps > 0 else default


def _cfg_generator(cfg) -> torch.Generator:
    return torch.Generator().manual_seed(int(cfg.ROBUSTNESS.SEED))


class PGD(Attack):
    """Projected gradient ascent with L-inf sign steps (Madry et al., 2018).

    x_0 = x, or uniform in the eps-ball intersected with [0, 255] when ``random_start``;
    x_{t+1} = Clip_{x,eps}(x_t + alpha * sign(grad J(x_t))). With ``restarts > 1`` the whole run
    is repeated and, per image, the run with the highest final objective value is kept (the
    per-image worst case), which needs an objective with per-image values.

    The random start samples the box [max(0, x-eps), min(255, x+eps)] uniformly rather than
    clipping x + U(-eps, eps) (which piles mass on 0 and 255); it is one
    ``torch.rand(images.shape)`` from ``generator`` per restart (or one ``torch.rand`` of an
    image's shape from each per-image generator).

    With ``early_stop`` (see :class:`Attack`), an image that has stopped keeps the point where it
    stopped, is skipped by the remaining restarts and always wins the restart ranking.
    """

    name = "pgd"
    supports_early_stop = True
    step_rule = (
        "T = NUM_STEPS, else max(1, ceil(min(eps + 4, 1.25 eps))); alpha = STEP_SIZE, else eps / T"
    )

    @configurable
    def __init__(
        self,
        eps,
        step_size=None,
        num_steps=None,
        random_start: bool = False,
        restarts: int = 1,
        generator=None,
        early_stop: bool = False,
    ):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            step_size (float or None): alpha (0-255 scale); None -> eps / num_steps.
            num_steps (int or None): T; None -> :func:`kurakin_num_steps` (per image when eps
                is per image; finished images then stop moving).
            random_start (bool): start from a uniform point of the eps-ball.
            restarts (int): independent runs; the per-image best final objective is kept.
            generator (torch.Generator or list[torch.Generator], optional): randomness of the
                starts; a list holds one generator per image (see :meth:`Attack.manual_seed`).
            early_stop (bool): stop an image once none of its labelled pixels is correct (needs
                an untargeted dense objective; see :class:`Attack`).
        """
        super().__init__(eps, generator=generator)
        self.early_stop = bool(early_stop)
        self.step_size = None if step_size is None else check_eps(step_size, "step_size")
        self.num_steps = _check_num_steps(num_steps)
        self.random_start = bool(random_start)
        self.restarts = _check_restarts(restarts, self.random_start, type(self).__name__)

    @classmethod
    def from_config(cls, cfg, eps):
        return {
            "eps": eps,
            "step_size": _cfg_step_size(cfg),
            "num_steps": _cfg_num_steps(cfg),
            "random_start": cfg.ROBUSTNESS.RANDOM_START,
            "restarts": cfg.ROBUSTNESS.RESTARTS,
            "generator": _cfg_generator(cfg),
            "early_stop": cfg.ROBUSTNESS.EARLY_STOP,
        }

    # ----------------------------------------------------------------------------------------
    def perturb(self, images: torch.Tensor, objective) -> torch.Tensor:
        x = self._prepare(images)
        self._check_objective(objective)
        self._check_early_stop(objective)
        self._begin_passes(x)
        try:
            return self._restarts(x, objective)
        finally:
            self._end_passes()

    def _restarts(self, x: torch.Tensor, objective) -> torch.Tensor:
        """The runs; per image the best final value, or the point where it stopped early."""
        eps = self._eps_tensor(x)
        steps = self._steps_per_image(eps)
        alpha = self._step_sizes(eps, steps)
        best, best_value = None, None
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            if self.early_stop and bool(done.all()):
                break
            adv, now_done = self._run(x, objective, eps, steps, alpha, done)
            if self.restarts == 1:
                return adv
            stopped = now_done & ~done  # stopped in this run: its point is the result
            if self.early_stop and bool(now_done.all()):  # no ranking needed
                value = best_value if best is not None else torch.zeros_like(eps)
            else:
                value = self._final_value(objective, adv, steps)
            if best is None:
                best, best_value = adv, value
            else:
                better = ((value > best_value) & ~done) | stopped
                best = torch.where(better.view(-1, 1, 1, 1), adv, best)
                best_value = torch.where(better, value, best_value)
            done = now_done
        return best

    def describe(self) -> dict:
        eps = torch.as_tensor(self.eps, dtype=torch.float64).reshape(-1)
        steps = self._steps_per_image(eps)
        alpha = self._step_sizes(eps, steps)
        per_image = torch.is_tensor(self.eps)
        return {
            "name": self.name,
            "eps": self._eps_for_report(),
            "num_steps": steps.tolist() if per_image else int(steps[0]),
            "step_size": alpha.tolist() if per_image else float(alpha[0]),
            "random_start": self.random_start,
            "restarts": self.restarts,
            # only when on: passes without it keep their cache keys
            **({"early_stop": True} if self.early_stop else {}),
        }

    # ----------------------------------------------------------------------------------------
    def _objective_at(self, objective, t, steps: torch.Tensor):
        """The function whose gradient is taken at step t (1-based); SegPGD varies it."""
        return objective

    def _steps_per_image(self, eps: torch.Tensor) -> torch.Tensor:
        """T per image, (N,) long on eps's device."""
        if self.num_steps is not None:
            return torch.full(eps.shape, self.num_steps, dtype=torch.long, device=eps.device)
        steps = [kurakin_num_steps(float(e)) for e in eps.tolist()]
        return torch.tensor(steps, dtype=torch.long, device=eps.device)

    def _step_sizes(self, eps: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """alpha per image, (N,); the default eps / T keeps T steps able to reach the border."""
        if self.step_size is None:
            return eps / steps.to(eps.dtype)
        return _per_image(self.step_size, eps.reshape(-1, 1)).reshape(-1)

    def _start(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        e = eps.view(-1, *([1] * (x.dim() - 1)))
        lower = torch.clamp(x - e, min=0.0)
        upper = torch.clamp(x + e, max=255.0)
        return lower + self._uniform(x) * (upper - lower)

    def _init_state(self, x: torch.Tensor) -> dict:
        return {}

    def _direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """Ascent direction; PGD/I-FGSM take the sign of the gradient (L-inf steepest ascent)."""
        return grad.sign()

    def _run(self, x, objective, eps, steps, alpha, done=None):
        """One run from a (possibly random) start; images whose T is reached stop moving, as
        do (early stopping) the images of ``done`` and those with no correct pixel left.
        Returns the final points and the (N,) bool mask of stopped images."""
        view = (-1,) + (1,) * (x.dim() - 1)
        adv = self._start(x, eps)
        state = self._init_state(x)
        if done is None:
            done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for t in range(1, int(steps.max()) + 1):
            if self.early_stop and bool(done.all()):
                break  # nothing left to break in the batch: the saved passes
            active = (steps >= t) & ~done
            self._count_passes(active)
            value, grad = self._gradient(self._objective_at(objective, t, steps), adv)
            if t == 1:
                self._check_values(value, x)
            if self.early_stop:
                done = done | self._nothing_left(objective, x.shape[0])
                active = active & ~done
            step = (alpha * active.to(x.dtype)).view(view) * self._direction(grad, state)
            adv = project_linf(adv + step, x, eps)
        return adv, done

    def _check_values(self, value: torch.Tensor, x: torch.Tensor) -> None:
        if self.restarts > 1 and value.dim() == 0 and x.shape[0] > 1:
            raise ValueError(
                f"{type(self).__name__} with restarts={self.restarts} keeps the per-image best "
                f"run, so the objective must return one value per image (shape "
                f"({x.shape[0]},)); it returned a scalar for a batch of {x.shape[0]}."
            )

    def _final_value(self, objective, adv: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Per-image objective at the end of a run (forward only), to rank restarts."""
        self.num_forward += 1
        with torch.no_grad():
            value = self._objective_at(objective, steps + 1, steps)(adv)
        return value.detach().reshape(-1).expand(adv.shape[0]).to(adv.dtype)


class IFGSM(PGD):
    """I-FGSM / BIM (Kurakin et al., 2017): PGD from x itself, alpha = 1, T by Kurakin's rule.

    x_{t+1} = Clip_{x,eps}(x_t + alpha * sign(grad J(x_t))), T = :func:`kurakin_num_steps`.
    """

    name = "ifgsm"
    step_rule = "T = max(1, ceil(min(eps + 4, 1.25 eps))) unless NUM_STEPS > 0, alpha = 1"

    @configurable
    def __init__(self, eps, step_size=1.0, num_steps=None, generator=None, early_stop=False):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            step_size (float or None): alpha; None -> 1 (one grey level per step).
            num_steps (int or None): T; None -> Kurakin's rule.
            generator (torch.Generator, optional): unused (deterministic); kept for symmetry.
            early_stop (bool): see :class:`PGD`.
        """
        super().__init__(
            eps,
            step_size=1.0 if step_size is None else step_size,
            num_steps=num_steps,
            random_start=False,
            restarts=1,
            generator=generator,
            early_stop=early_stop,
        )

    @classmethod
    def from_config(cls, cfg, eps):
        return {
            "eps": eps,
            "step_size": _cfg_step_size(cfg, default=1.0),
            "num_steps": _cfg_num_steps(cfg),
            "early_stop": cfg.ROBUSTNESS.EARLY_STOP,
        }


class BIM(IFGSM):
    """Alias of :class:`IFGSM` under its other name ("basic iterative method")."""

    name = "bim"


class ILLC(IFGSM):
    """Iterative least-likely class (Kurakin et al., 2017): I-FGSM towards y_LL.

    Kurakin descends the cross-entropy to y_LL (the clean prediction's least-likely class). Here
    every attack ascends, so ILLC must be paired with the "least_likely" objective, whose value
    is already the NEGATIVE cross-entropy to y_LL; the algorithm itself is I-FGSM.
    """

    name = "illc"
    required_objective = "least_likely"

    def describe(self) -> dict:
        return dict(super().describe(), required_objective=self.required_objective)
