# Copyright (c) UPSNetRobust authors.
"""Differentiable surrogates of the defenses, for BPDA (Athalye et al., ICML 2018).

BPDA runs the REAL defense ``g`` forward and, in the backward pass, replaces its (missing or
useless) Jacobian by the vector-Jacobian product of a differentiable surrogate ``s`` with
``s(x) ~ g(x)``. A surrogate is a torch function of (N, 3, H, W) float images on the 0-255
scale, in the model's ``INPUT.FORMAT``; :meth:`Surrogate.vjp` evaluates ``grad^T ds/dx`` at the
real input of the defense. Each defense declares its default beside its class
(``@register_defense(name, surrogate=...)``, read back through :data:`DEFAULT_SURROGATES`); each
surrogate's docstring says why it fits:

* :mod:`.base`: the registry, :func:`register_surrogate`, ``identity`` (NL-means, adaptive
  NL-means, TVM) and ``straight_through`` (bit-depth reduction);
* :mod:`.jpeg`: ``jpeg`` / ``jpeg_cubic``, a differentiable JPEG codec (JPEG);
* :mod:`.filters`: ``soft_median`` (median filter), ``gaussian`` (Gaussian blur, exact) and
  ``nlmeans_exact`` (opt-in for NL-means: ``BPDA_SURROGATE nlmeans:nlmeans_exact``);
* :mod:`.resolve`: chains ("median+nlmeans") get one surrogate per stage;
  :func:`resolve_surrogates` parses the choices ("auto", one name for every stage, or
  ``"stage:name,stage:name"``).
"""

from ..registry import DEFAULT_SURROGATES
from .base import (
    SURROGATE_REGISTRY,
    IdentitySurrogate,
    StraightThroughSurrogate,
    Surrogate,
    register_surrogate,
    surrogate_names,
)
from .filters import (
    SOFT_MEDIAN_TEMPERATURE,
    GaussianSurrogate,
    NLMeansExactSurrogate,
    SoftMedianSurrogate,
    gaussian_blur_torch,
    soft_median_filter,
)
from .jpeg import JPEGCubicSurrogate, JPEGSurrogate, differentiable_jpeg, jpeg_quant_tables
from .resolve import (
    AUTO,
    SurrogateSpec,
    build_surrogate,
    default_surrogate,
    defense_stages,
    resolve_surrogates,
)

__all__ = [
    "SURROGATE_REGISTRY",
    "DEFAULT_SURROGATES",
    "SOFT_MEDIAN_TEMPERATURE",
    "Surrogate",
    "IdentitySurrogate",
    "StraightThroughSurrogate",
    "JPEGSurrogate",
    "JPEGCubicSurrogate",
    "SoftMedianSurrogate",
    "GaussianSurrogate",
    "NLMeansExactSurrogate",
    "build_surrogate",
    "default_surrogate",
    "defense_stages",
    "differentiable_jpeg",
    "gaussian_blur_torch",
    "jpeg_quant_tables",
    "register_surrogate",
    "resolve_surrogates",
    "soft_median_filter",
    "surrogate_names",
]
