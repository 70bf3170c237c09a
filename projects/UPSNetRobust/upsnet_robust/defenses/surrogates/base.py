# Copyright (c) UPSNetRobust authors.
"""The surrogate registry, :func:`register_surrogate`, the :class:`Surrogate` base class and the
two surrogates that need no model of the defense (identity, straight-through quantiser)."""

from typing import Dict, List, Optional

import torch
from fvcore.transforms.transform import Transform

from detectron2.utils.registry import Registry

from ...utils.registry import subclass_decorator

__all__ = [
    "SURROGATE_REGISTRY",
    "IdentitySurrogate",
    "StraightThroughSurrogate",
    "Surrogate",
    "register_surrogate",
    "surrogate_names",
]

SURROGATE_REGISTRY = Registry("BPDA_SURROGATE")
SURROGATE_REGISTRY.__doc__ = """
Differentiable BPDA surrogates. A registered class is built as ``cls(transform, **params)`` from
one (non-chained) defense transform and is a :class:`Surrogate`. Register with
:func:`register_surrogate`; a defense names its default with ``@register_defense(...,
surrogate=...)``.
"""


def register_surrogate(name: str):
    """Class decorator: register a :class:`Surrogate` subclass under ``name`` (the key of
    ``ROBUSTNESS.BPDA_SURROGATE`` and of ``@register_defense(..., surrogate=name)``); sets
    ``cls.name``."""
    if not isinstance(name, str) or name != name.strip().lower() or not name or name == "auto":
        raise ValueError(f"Invalid surrogate name {name!r}: lower case, not 'auto'.")
    return subclass_decorator(SURROGATE_REGISTRY, Surrogate, name, attribute="name")


def surrogate_names() -> List[str]:
    """Sorted names in :data:`SURROGATE_REGISTRY`."""
    return sorted(name for name, _ in SURROGATE_REGISTRY)


def to_rgb(x: torch.Tensor, input_format: str) -> torch.Tensor:
    """(N, 3, H, W) images in ``input_format`` as RGB (the flip is its own inverse)."""
    if input_format not in ("BGR", "RGB"):
        raise ValueError(f"Surrogates support INPUT.FORMAT 'BGR' or 'RGB', got '{input_format}'.")
    return x.flip(1) if input_format == "BGR" else x


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """round(u) forward (half to even, like ``np.rint``), identity backward."""
    return u + (torch.round(u) - u).detach()


class Surrogate:
    """A differentiable stand-in ``s`` for one defense ``g``, used only for its VJP.

    Subclasses implement :meth:`__call__`; :meth:`vjp` differentiates it at the given point.

    Attributes:
        name (str): registered name.
    """

    name = "surrogate"

    def __init__(self, transform: Optional[Transform] = None):
        self.defense = getattr(transform, "defense_name", None) or type(transform).__name__

    def __call__(self, x: torch.Tensor, input_format: str = "BGR") -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, 3, H, W) float images, 0-255, in ``input_format``.
            input_format (str): "BGR" or "RGB".

        Returns:
            Tensor: the surrogate's output, same shape, differentiable w.r.t. ``x``.
        """
        raise NotImplementedError

    def vjp(self, x: torch.Tensor, grad: torch.Tensor, input_format: str = "BGR") -> torch.Tensor:
        """``grad^T (d s / d x)`` evaluated at ``x`` (the real defense's input).

        Args:
            x (Tensor): (N, 3, H, W) point of evaluation.
            grad (Tensor): gradient w.r.t. the defense's output, same shape.
            input_format (str): channel order.

        Returns:
            Tensor: gradient w.r.t. ``x``.
        """
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            y = self(xs, input_format)
            (g,) = torch.autograd.grad(y, xs, grad, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    def defense_param(self, transform, name: str, value=None, default=None):
        """``value`` if given, else the defense's parameter ``name``, else ``default``.

        Raises:
            ValueError: neither is set: the surrogate does not fit this defense.
        """
        if value is None:
            value = getattr(transform, name, None)
        if value is None:
            value = default
        if value is None:
            raise ValueError(
                f"Surrogate '{self.name}' needs the defense parameter '{name}', which "
                f"{type(transform).__name__} does not have; pick another surrogate (e.g. identity)."
            )
        return value

    def params(self) -> Dict:
        """Parameters that change the VJP (for reports and cache keys)."""
        return {}

    def describe(self) -> str:
        """E.g. ``"soft_median(temperature=4)"``."""
        p = self.params()
        args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.defense}]: {self.describe()}"


@register_surrogate("identity")
class IdentitySurrogate(Surrogate):
    """``s(x) = x``: the VJP is the incoming gradient (BPDA with the identity).

    The default of denoisers with ``g(x) ~ x`` on clean images (NL-means, adaptive NL-means),
    the case Athalye et al. name, and of TVM, which they broke this way (with EOT over its
    random masks). A differentiable TV solver (unrolled primal-dual) would be a tighter TVM
    surrogate; it is not implemented.
    """

    def __call__(self, x, input_format="BGR"):
        return x

    def vjp(self, x, grad, input_format="BGR"):
        return grad


@register_surrogate("straight_through")
class StraightThroughSurrogate(Surrogate):
    """The bit-depth quantiser with a straight-through rounding (Bengio et al., 2013).

    ``round(x (2^b - 1) / 255) 255 / (2^b - 1)`` on ``clip(x, 0, 255)`` with ``d round(u) / du
    := 1``: the forward equals the real defense, the VJP is the gradient of the clip, i.e. the
    incoming gradient where ``0 <= x <= 255`` and 0 elsewhere (attack iterates always lie
    inside, so: identity).
    """

    def __init__(self, transform=None, bits=None):
        super().__init__(transform)
        self.bits = int(self.defense_param(transform, "bits", bits))
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in [1, 8], got {self.bits}.")

    def __call__(self, x, input_format="BGR"):
        levels = float(2**self.bits - 1)
        xc = x.clamp(0.0, 255.0)
        q = torch.round(xc * (levels / 255.0)) * (255.0 / levels)
        return xc + (q - xc).detach()  # forward q, gradient exactly that of the clip

    def params(self):
        return {"bits": self.bits}
