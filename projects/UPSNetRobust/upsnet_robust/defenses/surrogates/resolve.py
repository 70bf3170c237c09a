# Copyright (c) UPSNetRobust authors.
"""Pairing each stage of a (possibly chained) defense with its BPDA surrogate: "auto" (each
defense's declared default), one name for every stage, or ``"stage:name,stage:name"``."""

from typing import Dict, List, Optional, Sequence, Tuple, Union

from fvcore.transforms.transform import NoOpTransform, Transform, TransformList

from ..registry import registered_defense_names
from .base import SURROGATE_REGISTRY, Surrogate, surrogate_names

__all__ = [
    "AUTO",
    "SurrogateSpec",
    "build_surrogate",
    "default_surrogate",
    "defense_stages",
    "resolve_surrogates",
]

AUTO = "auto"


def defense_stages(transform: Transform) -> List[Transform]:
    """The stages of a (possibly chained) defense, in application order, without no-ops."""
    if transform is None:
        return []
    stages = transform.transforms if isinstance(transform, TransformList) else [transform]
    return [t for t in stages if not isinstance(t, NoOpTransform)]


def default_surrogate(transform: Transform) -> str:
    """The default surrogate name of one defense stage, as its class declared it with
    ``@register_defense(name, surrogate=...)``.

    Raises:
        ValueError: the transform declares none (not a registered defense class).
    """
    name = getattr(transform, "default_surrogate", None)
    if not name:
        raise ValueError(
            f"Defense {type(transform).__name__} declares no default BPDA surrogate: register "
            "its class with @register_defense(name, surrogate=...), or choose a surrogate "
            f"(ROBUSTNESS.BPDA_SURROGATE, e.g. 'identity'; registered: "
            f"{', '.join(surrogate_names())})"
        )
    return name


def build_surrogate(name: str, transform: Optional[Transform] = None, **params) -> Surrogate:
    """Build surrogate ``name`` ("auto": the default of ``transform``) for one defense stage.

    Raises:
        KeyError: unknown surrogate name (the message lists the registered ones).
        ValueError: the surrogate needs a parameter the defense does not have.
    """
    key = str(name).strip().lower()
    origin = ""
    if key == AUTO:
        key = default_surrogate(transform)
        origin = f" (the declared default of {type(transform).__name__})"
    if key not in SURROGATE_REGISTRY:
        raise KeyError(
            f"Unknown BPDA surrogate {key!r}{origin}; registered: {', '.join(surrogate_names())} "
            f"(or '{AUTO}' for each defense's default)."
        )
    return SURROGATE_REGISTRY.get(key)(transform, **params)


SurrogateSpec = Union[str, Surrogate, Sequence, Dict[str, Union[str, Surrogate]]]


def _parse_spec(spec: str) -> Union[str, Dict[str, str]]:
    """ "auto" / "name" stay strings; "median:soft_median,nlmeans:identity" becomes a dict."""
    spec = str(spec).strip()
    if ":" not in spec:
        return spec
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if ":" not in item:
            raise ValueError(
                f"Bad surrogate spec {spec!r}: use 'auto', one surrogate name, or "
                "'defense:surrogate,defense:surrogate'."
            )
        stage, name = (s.strip().lower() for s in item.split(":", 1))
        out[stage] = name
    return out


def resolve_surrogates(
    transform: Transform, surrogate: SurrogateSpec = AUTO
) -> List[Tuple[Transform, Surrogate]]:
    """Pair each stage of a (possibly chained) defense with its surrogate.

    Args:
        transform (Transform): a defense (single, chain ``TransformList`` or no-op).
        surrogate: "auto" (each stage's default); one registered name for every stage; a spec
            string "defense:surrogate,..." or a dict {defense name: surrogate} (stages not
            named get their default; named defenses that are not stages are ignored, unknown
            defense names raise); a list with one entry per stage; or a :class:`Surrogate`
            (single-stage defenses).

    Returns:
        list[tuple[Transform, Surrogate]]: in application order (empty for a no-op).
    """
    stages = defense_stages(transform)
    if isinstance(surrogate, str):
        surrogate = _parse_spec(surrogate)
    if isinstance(surrogate, Surrogate):
        if len(stages) != 1:
            raise ValueError(
                f"A Surrogate instance fits a single-stage defense, not {len(stages)} stages."
            )
        return [(stages[0], surrogate)]
    if isinstance(surrogate, dict):
        # Keys must be registered defenses (typos fail); ones absent from this chain are ignored,
        # so one spec serves every defense of a sweep.
        unknown = sorted(set(surrogate) - set(registered_defense_names()))
        if unknown:
            raise ValueError(
                f"Surrogates given for {unknown}, which are not registered defenses "
                f"({', '.join(registered_defense_names())})."
            )
        choices = [surrogate.get(getattr(t, "defense_name", None), AUTO) for t in stages]
    elif isinstance(surrogate, (list, tuple)):
        if len(surrogate) != len(stages):
            raise ValueError(f"{len(surrogate)} surrogates for {len(stages)} defense stages.")
        choices = list(surrogate)
    else:
        choices = [surrogate] * len(stages)
    return [
        (t, s if isinstance(s, Surrogate) else build_surrogate(s, t))
        for t, s in zip(stages, choices)
    ]
