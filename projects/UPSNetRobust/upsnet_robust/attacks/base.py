# Copyright (c) UPSNetRobust authors.
"""Shared machinery of the attack algorithms: epsilon checks, the L-inf projection, gradients.

Every attack works on float images on the 0-255 pixel scale, *after* resizing and *before*
mean subtraction (docs/ATTACKS.md), and maximises an objective. Nothing here knows about
UPSNet: an objective is any callable ``x -> value`` where value is a scalar or one value per
image, so the same code drives train-loss, inference-path and toy objectives.
"""

import logging
import math
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

__all__ = [
    "Attack",
    "DenseObjective",
    "NonFiniteGradientError",
    "check_eps",
    "objective_gradient",
    "project_linf",
]

logger = logging.getLogger(__name__)

PIXEL_MIN = 0.0
PIXEL_MAX = 255.0

EpsLike = Union[float, torch.Tensor]
GeneratorLike = Union[None, torch.Generator, List[torch.Generator]]


class NonFiniteGradientError(RuntimeError):
    """The gradient of the objective contains NaN or inf.

    Raised instead of silently stepping with ``sign(nan) = nan``, which would poison the
    adversarial images. ``per_image_mask`` (bool tensor (N,), on CPU) says which images had a
    non-finite gradient, so a caller can drop or re-run only those.
    """

    def __init__(self, per_image_mask: torch.Tensor, message: Optional[str] = None):
        self.per_image_mask = per_image_mask.detach().to("cpu", torch.bool)
        if message is None:
            bad = self.per_image_mask.nonzero().flatten().tolist()
            message = (
                f"Non-finite (NaN/inf) gradient of the attack objective for image(s) {bad} "
                f"of a batch of {self.per_image_mask.numel()}."
            )
        super().__init__(message)


@runtime_checkable
class DenseObjective(Protocol):
    """An objective that exposes per-pixel logits and labels (needed by SegPGD and CosPGD).

    Those attacks weight the per-pixel cross-entropy by per-pixel correctness, so a scalar
    objective is not enough.
    """

    def logits_and_targets(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, 3, H, W) images on the 0-255 scale.

        Returns:
            tuple[Tensor, Tensor]: logits (N, C, H', W') differentiable w.r.t. ``x``, and
            targets (N, H', W') long, where 255 marks pixels to ignore.
        """
        ...


def _is_bool(value) -> bool:
    return isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool)


def check_eps(eps: EpsLike, name: str = "eps") -> EpsLike:
    """Validate an L-inf budget (0-255 units).

    Args:
        eps (float or Tensor): a positive finite number, or a 0-d / 1-d (N,) tensor of them
            (one budget per image).
        name (str): used in the error message.

    Returns:
        float or Tensor: a Python float, or a detached 1-d float64 CPU tensor.

    Raises:
        ValueError: if any budget is <= 0, NaN or inf, or the tensor is not 0-d/1-d.
    """
    if _is_bool(eps):
        raise ValueError(f"{name} must be a positive finite number, got {eps!r}")
    if torch.is_tensor(eps):
        if eps.dim() > 1:
            raise ValueError(
                f"{name} must be a number or a 1-d (N,) tensor, got shape {tuple(eps.shape)}"
            )
        t = eps.detach().to("cpu", torch.float64)
        if t.dim() == 0:
            return check_eps(float(t), name)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be an empty tensor")
        bad = ~(torch.isfinite(t) & (t > 0))
        if bad.any():
            raise ValueError(
                f"{name} must be positive and finite for every image, got {t.tolist()} "
                f"(bad at indices {bad.nonzero().flatten().tolist()})"
            )
        return t
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {eps!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _per_image(value: EpsLike, x: torch.Tensor) -> torch.Tensor:
    """``value`` as a (N, 1, ..., 1) tensor broadcastable against ``x`` (N, ...)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if torch.is_tensor(value) and value.dim() > 0:
        if value.numel() != x.shape[0]:
            raise ValueError(
                f"Per-image value has {value.numel()} entries but the batch has {x.shape[0]} "
                "images"
            )
        return value.to(device=x.device, dtype=x.dtype).reshape(shape)
    return torch.full(shape, float(value), device=x.device, dtype=x.dtype)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: EpsLike) -> torch.Tensor:
    """Clip_{x,eps}(z) = min(255, x + eps, max(0, x - eps, z)), elementwise.

    The projection onto the L-inf ball of radius ``eps`` around ``x`` intersected with the
    valid pixel box [0, 255]; applied after every step so the result is always a valid image.

    Args:
        x_adv (Tensor): (N, ...) candidate images.
        x (Tensor): (N, ...) clean images, same shape.
        eps (float or Tensor): budget, or a (N,) tensor of per-image budgets (padded batches
            mixing budgets).

    Returns:
        Tensor: the projected images (a new tensor; inputs untouched).
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv {tuple(x_adv.shape)} and x {tuple(x.shape)} differ in shape")
    e = _per_image(eps, x)
    lower = torch.clamp(x - e, min=PIXEL_MIN)
    upper = torch.clamp(x + e, max=PIXEL_MAX)
    return torch.min(upper, torch.max(lower, x_adv))


def objective_gradient(
    objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Value and input gradient of an objective, safe to call under ``torch.no_grad()``.

    detectron2 runs inference inside ``torch.no_grad()``, where a white-box attack would fail
    with "element 0 of tensors does not require grad"; we re-enable autograd locally. The
    gradient is taken of ``objective(x).sum()``, so per-image objectives give per-image
    gradients.

    Args:
        objective (callable): maps (N, ...) images to a scalar or a (N,) tensor to maximise.
        x (Tensor): (N, ...) images. Never modified; need not require grad.

    Returns:
        tuple[Tensor, Tensor]: the detached objective value (0-d or (N,)) and the gradient
        (same shape and dtype as ``x``).

    Raises:
        NonFiniteGradientError: if the gradient has NaN/inf entries.
        ValueError: if the objective's shape is neither () nor (N,).
        RuntimeError: if the objective does not depend differentiably on ``x``.
    """
    x_in = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = objective(x_in)
        if not torch.is_tensor(value):
            raise TypeError(f"The objective must return a tensor, got {type(value).__name__}")
        if value.dim() != 0 and tuple(value.shape) != (x.shape[0],):
            raise ValueError(
                f"The objective must return a scalar or one value per image (shape "
                f"({x.shape[0]},)), got shape {tuple(value.shape)}"
            )
        if not value.requires_grad:
            raise RuntimeError(
                "The objective's value does not depend differentiably on the input images "
                "(it does not require grad); an attack needs d objective / d x."
            )
        (grad,) = torch.autograd.grad(value.sum(), x_in, allow_unused=True)
    if grad is None:
        raise RuntimeError("The objective's value does not depend on the input images.")
    bad = ~torch.isfinite(grad).reshape(grad.shape[0], -1).all(dim=1)
    if bad.any():
        raise NonFiniteGradientError(bad)
    return value.detach(), grad.detach()


class Attack:
    """Base class: an L-inf attack that maximises an objective around a batch of images.

    Subclasses implement :meth:`perturb`. Counters ``num_forward_backward`` (objective plus
    gradient evaluations) and ``num_forward`` (objective-only evaluations, e.g. scoring
    restarts) accumulate over calls so benchmarks can report cost per image and per iteration;
    :meth:`reset_counters` zeroes them. Those count batch passes; ``image_passes`` ((N,) long,
    of the last :meth:`perturb`) counts, per image, the forward-backward passes the image still
    needed (it was not finished: steps left, not early-stopped), i.e. what it would have cost
    attacked alone, and ``num_image_passes`` accumulates their sum over calls.

    Early stopping (``early_stop``, ``ROBUSTNESS.EARLY_STOP``; attacks with
    ``supports_early_stop``): an image stops once none of its labelled pixels is classified
    correctly at the current point, read from the forward pass the attack makes anyway (the
    objective's ``correct_pixels``, recorded by untargeted dense objectives). Its steps are then
    masked and the point where it stopped is its result; when every image of the batch has
    stopped the loop ends, which is what saves passes.

    Attributes:
        name (str): the name in ``ATTACK_REGISTRY`` (reported by :meth:`describe`).
        required_objective (str or None): the objective an attack only makes sense with
            (e.g. ILLC needs "least_likely"); None if any objective works.
    """

    name = "attack"
    required_objective: Optional[str] = None
    #: True for attacks that build their own per-pixel loss from the objective's
    #: ``logits_and_targets`` (SegPGD, CosPGD): they need an untargeted dense objective.
    needs_dense_objective: bool = False
    #: True for attacks that implement early stopping (iterative attacks).
    supports_early_stop: bool = False
    #: One gradient step (FGSM); the sanity checks hold every iterative attack against it.
    single_step: bool = False
    #: False for attacks that only evaluate the objective (random search, ...).
    needs_gradients: bool = True
    #: A registered attack this one must be at least as strong as at an equal budget of
    #: forward-backward passes (APGD: "pgd"), read by the report's sanity checks.
    baseline: Optional[str] = None
    #: How the attack picks its steps and step size when the config leaves them to it (the
    #: report's metadata states it); "" when it has no such rule.
    step_rule: str = ""
    #: True for attacks that read ROBUSTNESS.APGD_KEEP "accuracy" (the point of fewest correct
    #: pixels), which needs an untargeted dense objective.
    keeps_accuracy: bool = False

    def __init__(self, eps: EpsLike, generator: GeneratorLike = None):
        """
        Args:
            eps (float or Tensor): L-inf budget on the 0-255 scale, or a (N,) tensor of
                per-image budgets.
            generator (torch.Generator or list[torch.Generator], optional): source of
                randomness (random starts), for reproducible runs. A list holds one generator
                per image, so an image's random start does not depend on its batch (see
                :meth:`manual_seed`). CPU generators give the same draws on any device.
        """
        self.eps = check_eps(eps)
        self.generator = generator
        self.num_forward_backward = 0
        self.num_forward = 0
        self.num_image_passes = 0
        self.image_passes: Optional[torch.Tensor] = None
        self.early_stop = False

    @classmethod
    def from_config(cls, cfg, eps) -> dict:
        """Constructor arguments from ``cfg.ROBUSTNESS`` (used by ``build_attack``). This
        default passes ``eps`` only; attacks with steps, restarts or seeds read their keys."""
        return {"eps": eps}

    # ----------------------------------------------------------------------------------------
    def perturb(self, images: torch.Tensor, objective) -> torch.Tensor:
        """
        Args:
            images (Tensor): (N, 3, H, W) float images on the 0-255 scale (not modified).
            objective (callable): ``objective(x)`` -> scalar or (N,) tensor to maximise.

        Returns:
            Tensor: (N, 3, H, W) float adversarial images, within ``eps`` of ``images`` in
            L-inf and inside [0, 255]. Never rounded to uint8 here.
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """Hyper-parameters for the report (an honest report states alpha, T, restarts, ...).

        This default reads the attack's own ``num_steps`` / ``step_size`` attributes (set them
        in ``__init__``); without them a single-step attack reports 1 step of size eps and any
        other attack 0 steps of size 0 ("not stated"), never a made-up count."""
        eps = self._eps_for_report()
        steps = getattr(self, "num_steps", None)
        size = getattr(self, "step_size", None)
        if steps is None:
            steps, size = (1, eps) if self.single_step else (0, 0.0)
        if torch.is_tensor(size):
            size = size.tolist()
        return {
            "name": self.name,
            "eps": eps,
            "num_steps": steps,
            "step_size": eps if size is None else size,
            "random_start": bool(getattr(self, "random_start", False)),
            "restarts": int(getattr(self, "restarts", 1) or 1),
        }

    def manual_seed(self, seed: Union[int, Sequence[int]]) -> "Attack":
        """Replace the generator by fresh CPU generator(s) with the given seed(s).

        Args:
            seed (int or list[int]): one seed for the batch, or one per image (e.g. derived
                from ``image_id``), which makes random starts independent of batching.

        Returns:
            Attack: self, for chaining.
        """
        if isinstance(seed, (list, tuple)):
            self.generator = [torch.Generator().manual_seed(int(s)) for s in seed]
        else:
            self.generator = torch.Generator().manual_seed(int(seed))
        return self

    def reset_counters(self) -> None:
        self.num_forward_backward = 0
        self.num_forward = 0
        self.num_image_passes = 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------------------------------
    def _eps_for_report(self):
        return self.eps.tolist() if torch.is_tensor(self.eps) else self.eps

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Validate the batch; return it detached, as float (never modified in place)."""
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a (N, 3, H, W) tensor, got {shape}")
        if torch.is_tensor(self.eps) and self.eps.numel() != images.shape[0]:
            raise ValueError(
                f"{type(self).__name__} has {self.eps.numel()} per-image budgets but the batch "
                f"has {images.shape[0]} images"
            )
        x = images.detach()
        if not x.is_floating_point():
            x = x.float()  # uint8 images from a DatasetMapper: work in float, never round back
        return x

    def _eps_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image budgets as a (N,) tensor on ``x``'s device and dtype."""
        return _per_image(self.eps, x).reshape(-1)

    def _gradient(self, objective, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.num_forward_backward += 1
        return objective_gradient(objective, x)

    # ---------------------------------------------------------------- pass counts, early stop
    def _begin_passes(self, x: torch.Tensor) -> None:
        self.image_passes = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def _count_passes(self, active: torch.Tensor) -> None:
        """One forward-backward pass for the images of the (N,) bool mask ``active``."""
        self.image_passes += active.to(torch.long)

    def _end_passes(self) -> None:
        self.num_image_passes += int(self.image_passes.sum())

    def _check_objective(self, objective) -> None:
        """What :meth:`perturb` needs of its objective; dense attacks ask for more."""
        if not callable(objective):
            raise TypeError(f"The objective must be callable, got {type(objective).__name__}")

    def _check_early_stop(self, objective) -> None:
        """With ``early_stop``, the objective must record ``correct_pixels``."""
        if self.early_stop and not getattr(objective, "supports_early_stop", False):
            name = getattr(objective, "name", None) or type(objective).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.name}) with early stopping (ROBUSTNESS.EARLY_STOP) "
                f"needs an untargeted dense objective, which records the labelled pixels still "
                f"classified correctly (semantic_ce, masked_ce, ..., segment); objective "
                f"{name!r} does not. Set ROBUSTNESS.EARLY_STOP False or change the objective."
            )

    def _nothing_left(self, objective, n: int) -> torch.Tensor:
        """(N,) bool: images none of whose labelled pixels was correct at the last evaluation."""
        counts = objective.correct_pixels
        if counts is None or counts.numel() != n:
            raise RuntimeError(
                f"{type(self).__name__}: the objective recorded no correct-pixel counts for the "
                f"batch of {n} (early stopping reads them from its last evaluation)"
            )
        return counts.reshape(-1).to(self.image_passes.device) == 0

    def _uniform(self, x: torch.Tensor) -> torch.Tensor:
        """U[0, 1) noise shaped like ``x``, drawn on the generator's device then moved.

        One ``torch.rand(x.shape)`` from a single generator, or one ``torch.rand(x.shape[1:])``
        per image from a list of per-image generators.
        """
        gen = self.generator
        if isinstance(gen, (list, tuple)):
            if len(gen) != x.shape[0]:
                raise ValueError(
                    f"{type(self).__name__} has {len(gen)} per-image generators but the batch "
                    f"has {x.shape[0]} images"
                )
            u = [torch.rand(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in gen]
            return torch.stack([ui.to(x.device) for ui in u])
        device = gen.device if gen is not None else x.device
        return torch.rand(x.shape, generator=gen, device=device, dtype=x.dtype).to(x.device)
