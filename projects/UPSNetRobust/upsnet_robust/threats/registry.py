# Copyright (c) UPSNetRobust authors.
"""``THREAT_REGISTRY``, :func:`register_threat` and the one expansion of passes from a config,
shared by the sweep, the Trainer's attacked evaluation and transfer."""
from typing import List, Mapping

from detectron2.utils.registry import Registry

from ..config import register_config
from ..utils.registry import subclass_decorator
from .base import ThreatKind, ThreatProperties, ThreatSpec

__all__ = [
    "THREAT_REGISTRY",
    "cell_properties",
    "check_threats",
    "expand_threats",
    "kind_of",
    "kinds",
    "name_properties",
    "register_threat",
    "threat_kind",
]

THREAT_REGISTRY = Registry("THREAT")
THREAT_REGISTRY.__doc__ = """
Registry of threat kinds: :class:`ThreatKind` subclasses ("clean", "attack", "sea", ...), each
saying how its passes expand from the config, what keys their caches and how it produces the
images that are scored. Registered with :func:`register_threat`; expanded in registration order.
"""


def register_threat(name: str):
    """Class decorator: register a :class:`ThreatKind` subclass under ``name`` (sets
    ``cls.name``). Kinds expand in registration order (clean, attacks, ensembles, ...). A kind
    that defines ``add_config(cfg)`` (a static or class method adding its own keys) gets it
    registered with :func:`upsnet_robust.config.register_config`."""
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"Invalid threat kind name {name!r}: a lower-case name, e.g. 'attack'")
    deco = subclass_decorator(THREAT_REGISTRY, ThreatKind, name, attribute="name")

    def register(cls):
        out = deco(cls)
        _ORDER.append(name)
        if "add_config" in vars(cls):
            register_config(cls.add_config)
        return out

    return register


_ORDER: List[str] = []


def threat_kind(name: str) -> type:
    """The registered kind ``name``; KeyError listing the kinds."""
    if name not in THREAT_REGISTRY:
        raise KeyError(f"Unknown threat kind {name!r}; registered kinds: {', '.join(_ORDER)}")
    return THREAT_REGISTRY.get(name)


def kinds() -> List[type]:
    """Every registered kind, in registration order."""
    return [THREAT_REGISTRY.get(n) for n in _ORDER]


def kind_of(name: str):
    """The kind that claims a cell or ``ROBUSTNESS.ATTACKS`` name (None: no kind does)."""
    for kind in kinds():
        if kind.claims(name):
            return kind
    return None


def expand_threats(cfg, include_clean: bool = True, include_adaptive: bool = True,
                   combining: bool = True) -> List[ThreatSpec]:
    """The passes of ``cfg``: every kind's :meth:`~ThreatKind.expand`, in kind order, passes
    equal to one listed earlier merged (their ``member_of`` joined).

    Args:
        include_clean: keep the reference (clean) pass, if configured.
        include_adaptive: keep adaptive passes (ROBUSTNESS.ADAPTIVE).
        combining: allow combining kinds (ensembles); False (Trainer, transfer) raises a
            ValueError naming the entry if the config lists one.
    """
    _check_names(cfg)
    out: List[ThreatSpec] = []
    for kind in kinds():
        specs = kind.expand(cfg, include_adaptive=include_adaptive)
        if not specs:
            continue
        if kind.properties.reference and not include_clean:
            continue
        if kind.sweep_only and not combining:
            raise sweep_only_error(kind, specs[-1].name)
        for spec in specs:
            same = next((i for i, p in enumerate(out) if p.same_pass(spec)), None)
            if same is None:
                out.append(spec)
            elif spec.member_of:
                joined = tuple(dict.fromkeys(out[same].member_of + spec.member_of))
                out[same] = out[same].replace(member_of=joined)
    return out


def sweep_only_error(kind, name: str) -> ValueError:
    """The error for a sweep-only pass (an ensemble) outside the sweep."""
    what = "an ensemble (ROBUSTNESS.SEA)" if kind.properties.ensemble else f"a {kind.name!r} pass"
    return ValueError(
        f"{name!r} in ROBUSTNESS.ATTACKS is {what} that only the robustness sweep "
        "(tools/attack_net.py) runs; list its members' attacks here instead (e.g. 'apgd' with "
        "ROBUSTNESS.OBJECTIVE 'masked_ce')"
    )


def _check_names(cfg) -> None:
    """Every ROBUSTNESS.ATTACKS entry is served by some kind."""
    for name in cfg.ROBUSTNESS.ATTACKS:
        if kind_of(name) is None:
            from ..attacks.registry import UnknownAttackError

            served = ", ".join(n for k in kinds() for n in k.names() if not k.properties.reference)
            raise UnknownAttackError(
                f"Unknown attack {name!r} in ROBUSTNESS.ATTACKS; registered attacks and "
                f"threats: {served}"
            )


def check_threats(cfg, adapter, specs) -> None:
    """Each kind's set-up check of its passes among ``specs`` (before any image is read); the
    members of a combining kind are checked by that kind, with its keys in the messages."""
    for kind in kinds():
        own = [s for s in specs if s.kind == kind.name]
        if own:
            kind.check(cfg, adapter, own)


def name_properties(name: str) -> ThreatProperties:
    """The properties of a cell name (older cells carry no ``threat`` record): those of the
    kind claiming it; an unknown name counts as an iterative L-inf attack. Not cached: an
    attack registered later is seen."""
    kind = kind_of(name)
    if kind is None:
        return ThreatProperties(iterative=True, eps_bounded=True, needs_gradients=True,
                                needs_objective=True)
    return kind.spec_properties(name)


def cell_properties(cell) -> ThreatProperties:
    """The properties of a cell (dict or ResultCell): its ``threat`` record, else those of its
    ``attack`` name (:func:`name_properties`)."""
    get = cell.get if isinstance(cell, Mapping) or hasattr(cell, "get") else None
    record = get("threat") if get else None
    if isinstance(record, Mapping):
        return ThreatProperties.from_dict(record)
    return name_properties(str(get("attack") if get else cell))
