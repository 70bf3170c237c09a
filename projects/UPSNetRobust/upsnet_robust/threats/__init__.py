# Copyright (c) UPSNetRobust authors.
"""Threat kinds: what perturbs the images a sweep scores (clean, per-image attacks, the sea
ensemble, ...), each one class in its own module registered with :func:`register_threat`
(see docs/EXTENDING.md, "A threat kind")."""
from .base import (
    ImageFailure,
    ImageStep,
    StepContext,
    StepResult,
    ThreatKind,
    ThreatProperties,
    ThreatSpec,
    canonical,
)
from .registry import (
    THREAT_REGISTRY,
    cell_properties,
    check_threats,
    expand_threats,
    kind_of,
    kinds,
    name_properties,
    register_threat,
    threat_kind,
)

# The built-in kinds, in expansion order (imported for their registration).
from . import clean  # noqa: F401  isort:skip
from . import attack  # noqa: F401  isort:skip
from . import sea  # noqa: F401  isort:skip
from . import corruption  # noqa: F401  isort:skip

__all__ = [
    "ImageFailure",
    "ImageStep",
    "StepContext",
    "StepResult",
    "THREAT_REGISTRY",
    "ThreatKind",
    "ThreatProperties",
    "ThreatSpec",
    "canonical",
    "cell_properties",
    "check_threats",
    "expand_threats",
    "kind_of",
    "kinds",
    "name_properties",
    "register_threat",
    "threat_kind",
]
