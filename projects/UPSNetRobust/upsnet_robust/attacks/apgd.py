# Copyright (c) UPSNetRobust authors.
"""APGD (Auto-PGD; Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020), L-inf version.

PGD's answer depends on its step size; APGD removes that knob. It starts with a large step
(2 eps), adds momentum, and at checkpoints halves the step of each image whose objective stopped
rising, restarting that image from the best point found so far. Every decision is per image, so
a batch behaves like its images run one by one.
"""

import math
from typing import Dict, List, Tuple

import torch

from detectron2.config import configurable

from .base import Attack, project_linf
from .iterative import _cfg_generator, _cfg_num_steps, _check_num_steps, _check_restarts

__all__ = ["APGD", "apgd_checkpoints", "radius_stages"]


#: AutoAttack's "standard" APGD iteration count, used when ``num_steps`` is not given.
DEFAULT_NUM_STEPS = 100
# What each image returns: its highest-value point, or its point of fewest correct pixels.
KEEP_RULES = ("loss", "accuracy")


def apgd_checkpoints(num_steps: int) -> List[int]:
    """The iterations after which APGD decides whether to halve its step size.

    w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22 and p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06):
    the first check after 22 % of the run, then ever shorter intervals (3 % of N shorter each
    time, at least 6 %). The p_j are whole hundredths, so the arithmetic is done exactly in
    integers (accumulated in floats, p_3 comes out as 0.5700000000000001, and ceil(100 p_3) as
    58 instead of 57). A checkpoint at or after the last iteration would decide nothing and is
    left out; for small N two p_j can round to the same iteration, which is then one checkpoint.

    Args:
        num_steps (int): N, the iterations of the run.

    Returns:
        list[int]: increasing iterations in [1, N - 1] (N = 100: 22, 41, 57, 70, 80, 87, 93, 99).
    """
    num_steps = _check_num_steps(num_steps, allow_none=False)
    points: List[int] = []
    p_prev, p = 0, 22  # hundredths
    while p <= 100:
        w = -(-p * num_steps // 100)  # ceil(p N / 100) in integers
        if w < num_steps and (not points or w > points[-1]):
            points.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return points


def radius_stages(num_steps: int, schedule: bool) -> List[Tuple[float, int]]:
    """(radius as a multiple of eps, iterations) of each stage of a run.

    Without a schedule: one stage of N iterations at eps. With the progressive radius reduction
    of Croce, Singh & Hein (SEA, ECCV 2024): 30 %, 30 % and the remaining 40 % of the iterations
    at 2 eps, 1.5 eps and eps, each stage warm-started from the previous stage's best point
    projected onto its smaller ball. Stages that get no iteration (N < 4) are dropped; the last
    stage, at eps, always has one.
    """
    if not schedule:
        return [(1.0, num_steps)]
    first = 3 * num_steps // 10
    stages = [(2.0, first), (1.5, first), (1.0, num_steps - 2 * first)]
    return [(factor, n) for factor, n in stages if n > 0]


def _check_fraction(value, name: str, low_open: bool) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok or not math.isfinite(value):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


class APGD(Attack):
    """APGD, L-inf (Croce & Hein, 2020): momentum and a per-image adaptive step size.

    Per image, with P the projection onto the eps-ball around x intersected with [0, 255]:

    - x_0 = x (or a uniform point of the ball with ``random_start``), eta = 2 eps;
      x_1 = P(x_0 + eta sign grad f(x_0)) (no momentum on the first step);
    - z_{k+1} = P(x_k + eta sign grad f(x_k)),
      x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1})), alpha = 0.75;
    - at each checkpoint w_j (:func:`apgd_checkpoints`) the step is halved if (1) fewer than
      rho (w_j - w_{j-1}) of the steps since the previous checkpoint raised f above the value of
      the point they started from (rho = 0.75), or (2) the step was not halved at the previous
      checkpoint and the best value has not improved since it. On halving, the image restarts
      from its best point (with the gradient stored there; x_{k-1} stays the previous iterate).

    The result is, per image, the point with the highest objective value seen (x_0 included).
    N iterations cost N forward-backward passes plus one forward pass for the last iterate.
    Two readings are fixed where the paper's pseudo-code and the authors' code differ: the
    comparison in (1) is strict as in the paper (the code uses <=), and at the first checkpoint
    (2) compares with the starting value, as the paper's eta(w_0) = eta(w_1) implies (the code
    skips (2) there). After a restart, a step counts as a success if it beats the best value it
    restarted from.

    With ``radius_schedule`` the run is split into stages at 2, 1.5 and 1 eps
    (:func:`radius_stages`), each a full APGD run with its own checkpoints and initial step
    2 x its radius; only the last stage's points, all within eps, are candidates for the result.
    With ``restarts`` > 1 the whole run is repeated (new random starts) and, per image, the run
    with the highest best value is kept (no extra model call: the values are known).

    With ``early_stop`` (see :class:`Attack`), the criterion is checked in the last stage only
    (the one at eps, whose points are candidates): an image with no labelled pixel still correct
    at the current iterate stops there, and that point, not the best by objective value, is its
    result (by the criterion nothing can beat it); it is skipped by the remaining restarts.

    ``trace`` holds, after :meth:`perturb`, one dict per restart and stage: ``radius`` (N,),
    ``checkpoints``, ``step_size`` (iterations, N), the step used at each iteration, and
    ``halved`` (checkpoints, N) bool, the decisions.
    """

    name = "apgd"
    step_rule = "T = NUM_STEPS, else 100; the step starts at 2 eps and halves at checkpoints"
    baseline = "pgd"  # its step-size control exists to beat fixed-step PGD at equal passes
    keeps_accuracy = True
    supports_early_stop = True

    @configurable
    def __init__(
        self,
        eps,
        num_steps=None,
        rho: float = 0.75,
        momentum: float = 0.75,
        initial_step: float = 2.0,
        radius_schedule: bool = False,
        random_start: bool = False,
        restarts: int = 1,
        generator=None,
        early_stop: bool = False,
        keep: str = "loss",
    ):
        """
        Args:
            eps (float or Tensor): L-inf budget (0-255 scale), or a (N,) tensor per image.
            num_steps (int or None): iterations N; None -> 100 (AutoAttack's standard).
            rho (float): halve when fewer than this fraction of the steps since the last
                checkpoint raised the objective; in [0, 1].
            momentum (float): alpha, the weight of the new step (1 - alpha on the previous
                move); in (0, 1], 1 = no momentum.
            initial_step (float): eta_0 as a multiple of the radius (2 in the paper).
            radius_schedule (bool): progressive radius reduction 2 -> 1.5 -> 1 eps.
            random_start (bool): start from a uniform point of the ball (of the first stage).
            restarts (int): independent runs; the per-image best is kept.
            generator (torch.Generator or list[torch.Generator], optional): randomness of the
                starts; a list holds one generator per image (see :meth:`Attack.manual_seed`).
            early_stop (bool): stop an image once none of its labelled pixels is correct (needs
                an untargeted dense objective).
            keep (str): which point of the (last-stage) iterates each image returns: "loss",
                the highest objective value; "accuracy", the fewest labelled pixels still
                correct, ties to the higher value (SEA's rule; needs an untargeted dense
                objective). The step control follows the objective value either way.
        """
        super().__init__(eps, generator=generator)
        self.early_stop = bool(early_stop)
        if keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
        self.keep = keep
        self.num_steps = DEFAULT_NUM_STEPS if num_steps is None else _check_num_steps(num_steps)
        self.rho = _check_fraction(rho, "rho", low_open=False)
        self.momentum = _check_fraction(momentum, "momentum", low_open=True)
        initial_step = float(initial_step)
        if not math.isfinite(initial_step) or initial_step <= 0:
            raise ValueError(f"initial_step must be a positive finite number, got {initial_step}")
        self.initial_step = initial_step
        self.radius_schedule = bool(radius_schedule)
        self.random_start = bool(random_start)
        self.restarts = _check_restarts(restarts, self.random_start, "APGD")
        self.trace: List[Dict] = []

    @classmethod
    def from_config(cls, cfg, eps):
        """NUM_STEPS (<= 0: 100), APGD_RHO, APGD_MOMENTUM, APGD_RADIUS_SCHEDULE, RANDOM_START,
        RESTARTS and SEED; STEP_SIZE is not used (APGD sets and adapts its own step)."""
        r = cfg.ROBUSTNESS
        return {
            "eps": eps,
            "num_steps": _cfg_num_steps(cfg, default=DEFAULT_NUM_STEPS),
            "rho": r.APGD_RHO,
            "momentum": r.APGD_MOMENTUM,
            "radius_schedule": r.APGD_RADIUS_SCHEDULE,
            "random_start": r.RANDOM_START,
            "restarts": r.RESTARTS,
            "generator": _cfg_generator(cfg),
            "early_stop": r.EARLY_STOP,
            "keep": r.APGD_KEEP,
        }

    def describe(self) -> dict:
        eps = self._eps_for_report()
        step = [self.initial_step * e for e in eps] if isinstance(eps, list) else None
        return {
            "name": self.name,
            "eps": eps,
            "num_steps": self.num_steps,
            "step_size": step if step is not None else self.initial_step * eps,  # initial
            "random_start": self.random_start,
            "restarts": self.restarts,
            "rho": self.rho,
            "momentum": self.momentum,
            "radius_schedule": self.radius_schedule,
            # only when on: passes without it keep their cache keys
            **({"early_stop": True} if self.early_stop else {}),
            **({"keep": self.keep} if self.keep != "loss" else {}),
        }

    # ----------------------------------------------------------------------------------------
    def perturb(self, images: torch.Tensor, objective) -> torch.Tensor:
        x = self._prepare(images)
        self._check_objective(objective)
        self._check_early_stop(objective)
        if self.keep == "accuracy" and not getattr(objective, "supports_early_stop", False):
            name = getattr(objective, "name", None) or type(objective).__name__
            raise ValueError(
                f"APGD keeping the point of fewest correct pixels (ROBUSTNESS.APGD_KEEP "
                f"'accuracy') needs an untargeted dense objective, which records them; objective "
                f"{name!r} does not. Use APGD_KEEP 'loss' or a dense objective (masked_ce, ...)."
            )
        self._begin_passes(x)
        try:
            return self._restarts(x, objective)
        finally:
            self._end_passes()

    def _restarts(self, x: torch.Tensor, objective) -> torch.Tensor:
        eps = self._eps_tensor(x)
        view = (-1,) + (1,) * (x.dim() - 1)
        self.trace = []
        best, best_value, best_correct = None, None, None
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            if self.early_stop and bool(done.all()):
                break
            adv, value, now_done, correct = self._run(x, objective, eps, done)
            if best is None:
                best, best_value, best_correct = adv, value, correct
            else:
                better = _better(value, correct, best_value, best_correct)
                better = (better & ~done) | (now_done & ~done)
                best = torch.where(better.view(view), adv, best)
                best_value = torch.where(better, value, best_value)
                if correct is not None:
                    best_correct = torch.where(better, correct, best_correct)
            done = now_done
        return best

    # ----------------------------------------------------------------------------------------
    def _run(self, x, objective, eps, done):
        """One run (all stages) from a fresh start; returns the kept point, its value, the (N,)
        bool mask of stopped images (``done``: stopped before, they do not move) and, when
        keeping by accuracy, its correct-pixel counts (else None)."""
        stages = radius_stages(self.num_steps, self.radius_schedule)
        point = self._start(x, eps * stages[0][0])
        value = None
        for j, (factor, num_steps) in enumerate(stages):
            radius = eps * factor
            start = project_linf(point, x, radius)
            last = j == len(stages) - 1
            point, value, stopped, correct = self._stage(
                x, objective, radius, num_steps, start, done, last
            )
        return point, value, stopped, correct

    def _start(self, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        r = radius.view(-1, *([1] * (x.dim() - 1)))
        lower = torch.clamp(x - r, min=0.0)
        upper = torch.clamp(x + r, max=255.0)
        return lower + self._uniform(x) * (upper - lower)

    def _values(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The objective's value as (N,): APGD's decisions are per image."""
        if value.dim() == 0:
            if x.shape[0] > 1:
                raise ValueError(
                    f"APGD adapts its step and keeps its best point per image, so the objective "
                    f"must return one value per image (shape ({x.shape[0]},)); it returned a "
                    f"scalar for a batch of {x.shape[0]}."
                )
            value = value.reshape(1)
        return value.detach()

    def _value_and_gradient(self, objective, point):
        value, grad = self._gradient(objective, point)
        return self._values(value, point), grad

    def _value_only(self, objective, point) -> torch.Tensor:
        self.num_forward += 1
        with torch.no_grad():
            value = objective(point)
        return self._values(value, point)

    def _stage(self, x, objective, radius, num_steps, start, done, last):
        """One APGD run of ``num_steps`` iterations in the ball of ``radius`` (N,). Images of
        ``done`` do not move; in the ``last`` stage, with early stopping, an image with nothing
        left to break stops at that point, which becomes its best. Returns the kept points (by
        value, or in the last stage by accuracy if so configured), their values, the (N,) bool
        mask of stopped images and the kept points' correct-pixel counts (or None)."""
        check = self.early_stop and last
        track = self.keep == "accuracy" and last
        view = (-1,) + (1,) * (x.dim() - 1)
        checkpoints = apgd_checkpoints(num_steps)
        alpha = self.momentum
        eta = self.initial_step * radius
        cur = prev = start
        self._count_passes(~done)
        value, grad = self._value_and_gradient(objective, cur)
        if check:
            done = done | self._nothing_left(objective, x.shape[0])
        best, best_value, best_grad = cur, value, grad
        kept = (cur, value, self._correct(objective, x.shape[0])) if track else None
        last_value = value  # f at the point the next step starts from
        successes = torch.zeros_like(value, dtype=torch.long)
        checked_best = best_value  # best value at the previous checkpoint (or the start)
        halved_before = torch.zeros_like(value, dtype=torch.bool)
        last_check = 0
        record = {"radius": radius.detach().cpu(), "checkpoints": checkpoints}
        steps, decisions = [], []
        for k in range(1, num_steps + 1):
            if self.early_stop and bool(done.all()):
                break  # nothing left to break in the batch: the saved passes
            steps.append(eta)
            z = project_linf(cur + eta.view(view) * grad.sign(), x, radius)
            if k > 1:
                z = project_linf(cur + alpha * (z - cur) + (1 - alpha) * (cur - prev), x, radius)
            if self.early_stop:
                z = torch.where(done.view(view), cur, z)  # stopped images stay where they are
            prev, cur = cur, z
            if k < num_steps:
                self._count_passes(~done)
                value, grad = self._value_and_gradient(objective, cur)
            else:
                value = self._value_only(objective, cur)
            successes += value > last_value
            last_value = value
            better = value > best_value
            if self.early_stop:
                better = better & ~done
                if check:
                    stopped = self._nothing_left(objective, x.shape[0]) & ~done
                    better, done = better | stopped, done | stopped
            best = torch.where(better.view(view), cur, best)
            best_value = torch.where(better, value, best_value)
            if track:
                kept = _keep_fewest_correct(kept, cur, value, self._correct(objective, x.shape[0]))
            if k < num_steps:
                best_grad = torch.where(better.view(view), grad, best_grad)
            if len(decisions) < len(checkpoints) and k == checkpoints[len(decisions)]:
                too_few = successes.to(torch.float64) < self.rho * (k - last_check)
                stalled = ~halved_before & (best_value <= checked_best)
                halve = too_few | stalled
                decisions.append(halve)
                eta = torch.where(halve, eta / 2, eta)
                cur = torch.where(halve.view(view), best, cur)
                grad = torch.where(halve.view(view), best_grad, grad)
                last_value = torch.where(halve, best_value, last_value)
                halved_before, checked_best, last_check = halve, best_value, k
                successes = torch.zeros_like(successes)
        n = x.shape[0]
        record["step_size"] = torch.stack(steps).cpu() if steps else torch.zeros(0, n)
        record["halved"] = (
            torch.stack(decisions).cpu() if decisions else torch.zeros(0, n, dtype=torch.bool)
        )
        self.trace.append(record)
        if track:
            return kept[0], kept[1], done, kept[2]
        return best, best_value, done, None

    def _correct(self, objective, n: int) -> torch.Tensor:
        """(N,) labelled pixels still correct at the objective's last evaluation."""
        counts = objective.correct_pixels
        if counts is None or counts.numel() != n:
            raise RuntimeError(
                f"APGD: the objective recorded no correct-pixel counts for the batch of {n}"
            )
        return counts.reshape(-1).to(torch.float64)


def _better(value, correct, best_value, best_correct) -> torch.Tensor:
    """(N,) bool: a point beats the kept one (fewer correct pixels, ties to the higher value;
    by value alone when ``correct`` is None)."""
    if correct is None:
        return value > best_value
    return (correct < best_correct) | ((correct == best_correct) & (value > best_value))


def _keep_fewest_correct(kept, point, value, correct):
    """The (point, value, correct) triple per image after seeing a new iterate."""
    old_point, old_value, old_correct = kept
    take = _better(value, correct, old_value, old_correct)
    view = (-1,) + (1,) * (point.dim() - 1)
    return (
        torch.where(take.view(view), point, old_point),
        torch.where(take, value, old_value),
        torch.where(take, correct, old_correct),
    )
