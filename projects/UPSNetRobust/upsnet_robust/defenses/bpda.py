# Copyright (c) UPSNetRobust authors.
"""Adaptive (defense-aware) attacks: BPDA and EOT around the real defenses.

* :func:`defense_forward_bpda` is the defense as a differentiable torch op: the forward runs
  the REAL defense (:func:`~upsnet_robust.defenses.apply_defense_to_tensor`, float in and float
  out), the backward applies the vector-Jacobian product of a differentiable surrogate
  (:mod:`.surrogates`), evaluated at the real input of that stage (Athalye et al., 2018, BPDA).
  Chains apply one such op per stage, so their backward is the chain rule over the stages'
  surrogates, each at its own real input.
* Randomised defenses (TVM's random pixel dropping: every stage with ``sample_mask``) take an
  ``rng``: each call then draws a fresh mask per image and runs the real TVM with it. Without an
  ``rng`` the defense's own deterministic mask is used, i.e. exactly the real defense.
* :class:`DefenseAwareObjective` turns any attack objective into one on ``model o defense``:
  ``value(x) = 1/S sum_s objective(BPDA_s(x))``, S independent mask draws (EOT, Athalye et al.)
  for randomised defenses and S = 1 for deterministic ones. It keeps the objectives' call
  contract (per-image values (N,)), so every attack algorithm runs unchanged.
"""

import logging
import time
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .surrogates import AUTO, SurrogateSpec, defense_stages, resolve_surrogates
from .tensor import apply_defense_to_tensor

__all__ = [
    "DEFAULT_EOT_SAMPLES",
    "DefenseAwareObjective",
    "defense_forward_bpda",
    "eot_samples_for",
    "is_randomized",
    "describe_surrogates",
]

logger = logging.getLogger(__name__)

# EOT samples of randomised defenses when none is given (deterministic defenses always use 1).
DEFAULT_EOT_SAMPLES = 4

RngLike = Union[None, int, np.random.Generator]


def is_randomized(transform) -> bool:
    """Whether a (possibly chained) defense draws random masks (has a ``sample_mask`` stage)."""
    return any(callable(getattr(t, "sample_mask", None)) for t in defense_stages(transform))


def eot_samples_for(transform, requested: Optional[int] = None) -> int:
    """EOT samples for a defense: ``requested`` (default :data:`DEFAULT_EOT_SAMPLES`) for a
    randomised one, 1 for a deterministic one (identical samples would only cost time)."""
    if not is_randomized(transform):
        return 1
    return DEFAULT_EOT_SAMPLES if requested is None or int(requested) <= 0 else int(requested)


def describe_surrogates(transform, surrogate: SurrogateSpec = AUTO) -> str:
    """E.g. ``"soft_median(window=3,temperature=4)+identity"`` for "median+nlmeans"."""
    pairs = resolve_surrogates(transform, surrogate)
    return "+".join(s.describe() for _, s in pairs) if pairs else "identity"


class _MaskedStage:
    """``stage.apply_image`` with a fixed mask (a duck-typed transform for the tensor adapter)."""

    def __init__(self, stage, mask):
        self.stage, self.mask = stage, mask

    def apply_image(self, img):
        return self.stage.apply_image(img, mask=self.mask)


def _real_stage(stage, x: torch.Tensor, input_format: str, masks) -> torch.Tensor:
    """The real defense stage on (N, 3, H, W) float images, per image with its mask if given."""
    if masks is None:
        return apply_defense_to_tensor(stage, x, input_format)
    return torch.cat(
        [
            apply_defense_to_tensor(_MaskedStage(stage, m), x[i : i + 1], input_format)
            for i, m in enumerate(masks)
        ]
    )


class _BPDA(torch.autograd.Function):
    """Forward: the real defense stage. Backward: the surrogate's VJP at the stage's input."""

    @staticmethod
    def forward(ctx, x, stage, surrogate, input_format, masks):
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.input_format = surrogate, input_format
        return _real_stage(stage, x, input_format, masks)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.surrogate.vjp(x, grad, ctx.input_format), None, None, None, None


def _as_rng(rng: RngLike) -> Optional[np.random.Generator]:
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def defense_forward_bpda(
    transform,
    x: torch.Tensor,
    surrogate: SurrogateSpec = AUTO,
    input_format: str = "BGR",
    rng: RngLike = None,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """The defense as a differentiable op: real forward, surrogate backward (BPDA).

    Args:
        transform (Transform): a defense from :func:`build_defense` (single, chain or no-op).
        x (Tensor): (N, 3, H, W) float images, 0-255, in ``input_format``; any device.
        surrogate: per-stage surrogate choice, see :func:`.surrogates.resolve_surrogates`
            ("auto": each defense's default).
        input_format (str): "BGR" or "RGB".
        rng (np.random.Generator or int or None): for randomised stages (TVM), draw a fresh
            mask per image from it and use it; None keeps each defense's own deterministic mask
            (the real defense, exactly).
        stats (dict, optional): incremented in place: ``"defense_calls"`` (stage applications
            on a batch) and ``"defense_s"`` (seconds in the real defense).

    Returns:
        Tensor: the real defended images (same shape, dtype and device as ``x``), with the
        surrogates' VJPs as their gradient w.r.t. ``x``.
    """
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"defense_forward_bpda takes (N, 3, H, W) float images, got {getattr(x, 'shape', x)}"
        )
    rng = _as_rng(rng)
    y = x
    for stage, sur in resolve_surrogates(transform, surrogate):
        masks = None
        if rng is not None and callable(getattr(stage, "sample_mask", None)):
            masks = [stage.sample_mask(tuple(x.shape[-2:]), rng) for _ in range(x.shape[0])]
        start = time.perf_counter()
        y = _BPDA.apply(y, stage, sur, input_format, masks)
        if stats is not None:
            stats["defense_calls"] = stats.get("defense_calls", 0) + 1
            stats["defense_s"] = stats.get("defense_s", 0.0) + time.perf_counter() - start
    return y


class _SampleAverage(torch.autograd.Function):
    """Mean over samples of ``fn(x)`` (each with its own randomness), one sample's graph at a
    time: the forward computes every sample's value and input gradient and frees its graph, the
    backward scales the averaged gradient. Exact when value i depends on image i only (every
    objective here evaluates images independently) or when the value is a scalar."""

    @staticmethod
    def forward(ctx, x, fn, num_samples):
        total_v, total_g = None, None
        for _ in range(num_samples):
            with torch.enable_grad():
                xs = x.detach().requires_grad_(True)
                v = fn(xs)
                if not v.requires_grad:
                    raise RuntimeError(
                        "The objective does not depend differentiably on the images."
                    )
                (g,) = torch.autograd.grad(v.sum(), xs, allow_unused=True)
            g = torch.zeros_like(x) if g is None else g
            v = v.detach()
            total_v = v if total_v is None else total_v + v
            total_g = g if total_g is None else total_g + g
        ctx.save_for_backward(total_g / num_samples)
        return total_v / num_samples

    @staticmethod
    def backward(ctx, grad_v):
        (g,) = ctx.saved_tensors
        scale = grad_v.reshape(-1, *([1] * (g.dim() - 1))) if grad_v.dim() > 0 else grad_v
        return scale * g, None, None


class DefenseAwareObjective:
    """An attack objective on ``model o defense``, differentiable through the defense (BPDA, EOT).

    ``value(x) = 1/S sum_{s=1..S} objective(defense_forward_bpda(transform, x, surrogate, rng))``
    with S = ``eot_samples`` independent mask draws for a randomised defense (TVM) and S = 1 for
    a deterministic one (its real output, with the surrogate's VJP). With S > 1 and autograd on,
    samples are evaluated one after the other and only their input gradients are kept, so memory
    stays that of one forward-backward (cost: S forward-backward passes per call).

    Called like the objectives of :mod:`upsnet_robust.attacks.objectives` (images (N, 3, H, W),
    0-255, in ``input_format``; returns (N,) values to maximise), so any attack algorithm uses
    it unchanged. If the wrapped objective is dense (``logits_and_targets``, for SegPGD and
    CosPGD), so is this one: logits of the defended images, averaged over the S samples.

    Attributes:
        eot_samples (int): S actually used.
        surrogate (str): description of the per-stage surrogates.
        stats (dict): ``defense_calls`` and ``defense_s`` accumulated over calls (real defense
            applications inside the attack and their seconds).
    """

    def __init__(
        self,
        objective: Callable[[torch.Tensor], torch.Tensor],
        transform,
        input_format: str = "BGR",
        surrogate: SurrogateSpec = AUTO,
        eot_samples: Optional[int] = None,
        generator: RngLike = None,
    ):
        """
        Args:
            objective (callable): images -> (N,) values (or a scalar) to maximise.
            transform (Transform): the defense (single, chain or no-op).
            input_format (str): "BGR" or "RGB" (cfg.INPUT.FORMAT).
            surrogate: per-stage surrogates, see :func:`.surrogates.resolve_surrogates`.
            eot_samples (int or None): S for a randomised defense; None or <= 0 means
                :data:`DEFAULT_EOT_SAMPLES`. Deterministic defenses always use 1.
            generator (np.random.Generator or int or None): source of the EOT masks (an int
                seeds a new generator: reproducible); None draws OS entropy. Unused by
                deterministic defenses.
        """
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        self.objective = objective
        self.transform = transform
        self.input_format = input_format
        self._surrogates = resolve_surrogates(transform, surrogate)  # validates early
        self._spec = [s for _, s in self._surrogates] or AUTO
        self.surrogate = "+".join(s.describe() for _, s in self._surrogates) or "identity"
        self.randomized = is_randomized(transform)
        self.eot_samples = eot_samples_for(transform, eot_samples)
        self.rng = _as_rng(generator) if self.randomized else None
        if self.randomized and self.rng is None:
            self.rng = np.random.default_rng()
        self.stats = {"defense_calls": 0, "defense_s": 0.0}

    def defend(self, x: torch.Tensor) -> torch.Tensor:
        """One BPDA sample of the defense (a fresh mask per image for randomised defenses)."""
        return defense_forward_bpda(
            self.transform, x, self._spec, self.input_format, self.rng, self.stats
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def one(z):
            return self.objective(self.defend(z))

        if self.eot_samples == 1:
            return one(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SampleAverage.apply(x, one, self.eot_samples)
        # no input gradient wanted (e.g. scoring restarts under no_grad)
        return sum(one(x) for _ in range(self.eot_samples)) / self.eot_samples

    @property
    def logits_and_targets(self):
        """Present only if the wrapped objective is dense (SegPGD / CosPGD)."""
        inner = getattr(self.objective, "logits_and_targets", None)
        if not callable(inner):
            raise AttributeError("the wrapped objective has no logits_and_targets")

        def dense(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            logits, targets = inner(self.defend(x))
            for _ in range(self.eot_samples - 1):
                logits = logits + inner(self.defend(x))[0]
            return logits / self.eot_samples, targets

        return dense

    def describe(self) -> dict:
        """Settings for reports and cache keys."""
        return {"surrogate": self.surrogate, "eot_samples": self.eot_samples}
