# Copyright (c) UPSNetRobust authors.
"""Adversarial evaluation: the attack hook, sweep, evaluators and report."""
from .adversarial_inference import FAILED_KEY, AdversarialInference
from .evaluators import MultiVariantEvaluator, PanopticSemSegEvaluator, PanopticSubsetEvaluator
from .hook_settings import AdaptiveSettings, HookSettings
from .image_cache import ImageCache
from .robust_mapper import RobustMapper
from .run import hardware_description, run_robustness_sweep
from .sweep import RobustnessSweep, fingerprint, sweep_passes

__all__ = [
    "AdaptiveSettings",
    "AdversarialInference",
    "FAILED_KEY",
    "HookSettings",
    "ImageCache",
    "MultiVariantEvaluator",
    "PanopticSemSegEvaluator",
    "PanopticSubsetEvaluator",
    "RobustMapper",
    "RobustnessSweep",
    "fingerprint",
    "hardware_description",
    "run_robustness_sweep",
    "sweep_passes",
]
