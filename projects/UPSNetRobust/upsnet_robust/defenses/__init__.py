# Copyright (c) UPSNetRobust authors.
"""Test-time input-transformation defenses.

Each defense is a pure image function (:mod:`.functional`, :mod:`.tvm`) plus a thin detectron2
``Transform`` adapter (:mod:`.transforms`) registered in :data:`DEFENSE_REGISTRY` under a short
name with :func:`register_defense`, which also declares its config node and its default BPDA
surrogate (:mod:`.surrogates`, registered with :func:`register_surrogate`). Build them with :func:`build_defense` ("nlmeans", "median+nlmeans", "none") or
:func:`build_defense_from_cfg` (``cfg.DEFENSE.<NAME>`` nodes, see :func:`add_defense_config`),
and apply them to model-input tensors with :func:`apply_defense_to_tensor`.
"""

from .config import add_defense_config
from .functional import (
    adaptive_nlmeans_denoise,
    adaptive_nlmeans_h,
    adaptive_nlmeans_strength,
    estimate_noise_sigma,
    gaussian_blur,
    jpeg_compress,
    median_blur,
    nlmeans_denoise,
    reduce_bit_depth,
)
from .registry import (
    DEFENSE_REGISTRY,
    build_defense,
    build_defense_from_cfg,
    register_defense,
    registered_defense_names,
)
from .surrogates import SURROGATE_REGISTRY, register_surrogate
from .tensor import apply_defense_to_tensor
from .torch_nlmeans import nlmeans_torch

# Imported for its registration side effect (and the classes).
from .transforms import (  # isort:skip
    AdaptiveNLMeansTransform,
    BitDepthTransform,
    DefenseTransform,
    GaussianBlurTransform,
    JPEGTransform,
    MedianFilterTransform,
    NLMeansTransform,
    TVMTransform,
)
from .tvm import image_seed, sample_tvm_mask, tv_energy, tv_reconstruct, tvm_defense

__all__ = [
    "nlmeans_torch",
    "DEFENSE_REGISTRY",
    "register_defense",
    "SURROGATE_REGISTRY",
    "register_surrogate",
    "registered_defense_names",
    "build_defense",
    "build_defense_from_cfg",
    "add_defense_config",
    "apply_defense_to_tensor",
    # transforms
    "DefenseTransform",
    "NLMeansTransform",
    "JPEGTransform",
    "BitDepthTransform",
    "MedianFilterTransform",
    "GaussianBlurTransform",
    "TVMTransform",
    "AdaptiveNLMeansTransform",
    # pure functions
    "nlmeans_denoise",
    "jpeg_compress",
    "reduce_bit_depth",
    "median_blur",
    "gaussian_blur",
    "estimate_noise_sigma",
    "adaptive_nlmeans_strength",
    "adaptive_nlmeans_h",
    "adaptive_nlmeans_denoise",
    "sample_tvm_mask",
    "image_seed",
    "tv_energy",
    "tv_reconstruct",
    "tvm_defense",
]
