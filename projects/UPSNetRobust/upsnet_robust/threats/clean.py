# Copyright (c) UPSNetRobust authors.
"""The clean kind: the test images as they are (``ROBUSTNESS.INCLUDE_CLEAN``), scored under
every defense; the reference of every ratio and sanity check."""
from typing import List

from .base import ThreatKind, ThreatProperties, ThreatSpec
from .registry import register_threat

__all__ = ["CLEAN", "CleanKind"]

CLEAN = "clean"  # the cells' ``attack`` of a clean pass


@register_threat("clean")
class CleanKind(ThreatKind):
    """One pass, no perturbation (eps 0)."""

    properties = ThreatProperties(reference=True)
    threat_model = "clean cells score the unmodified test images (the reference)"

    @classmethod
    def names(cls) -> List[str]:
        return [CLEAN]

    @classmethod
    def claims(cls, name: str) -> bool:
        return name == CLEAN

    @classmethod
    def expand(cls, cfg, include_adaptive: bool = True) -> List[ThreatSpec]:
        return [ThreatSpec(cls.name, CLEAN)] if cfg.ROBUSTNESS.INCLUDE_CLEAN else []

    @classmethod
    def cache_key(cls, cfg, spec: ThreatSpec):
        return {"attack": CLEAN}  # the images themselves: nothing else shapes them
