# Copyright (c) UPSNetRobust authors.
"""The defense registry and its builders (by name, or from ``cfg.DEFENSE.<NAME>`` nodes)."""

import inspect
import logging

from detectron2.data.transforms import NoOpTransform, TransformList
from detectron2.utils.registry import Registry

__all__ = [
    "DEFENSE_REGISTRY",
    "register_defense",
    "registered_defense_names",
    "accepted_parameters",
    "build_defense",
    "build_defense_from_cfg",
    "parse_defense_name",
]

logger = logging.getLogger(__name__)

DEFENSE_REGISTRY = Registry("DEFENSE")
DEFENSE_REGISTRY.__doc__ = """
Registry for test-time input-transformation defenses, i.e. classes of
:class:`detectron2.data.transforms.Transform` that change pixel values only (no geometry).

Registered names are short lower-case keys ("nlmeans", "jpeg", ...), used in
``cfg.ROBUSTNESS.DEFENSES`` and as ``cfg.DEFENSE.<NAME.upper()>`` config nodes. The registered
object is called with keyword parameters and must return a ``Transform``. Register new ones with
:func:`register_defense`. "none" (no defense) and chains "a+b" are handled by
:func:`build_defense` and are not registry entries.
"""

NONE = "none"
CHAIN_SEPARATOR = "+"


def register_defense(name):
    """Class decorator: register a defense ``Transform`` under the short ``name``.

    fvcore's ``Registry.register`` always keys by ``__name__`` (the class name); defenses are
    keyed by short config-friendly names instead, so this calls the registry's ``_do_register``,
    which is what ``register`` does after picking the name (it keeps the duplicate-name check).
    The name is also stored as the class attribute ``defense_name``.

    Args:
        name (str): lower-case key, without "+"; "none" is reserved.
    """
    if name != name.lower() or CHAIN_SEPARATOR in name or name in ("", NONE):
        raise ValueError(f"Invalid defense name '{name}': lower case, no '+', not 'none'.")

    def deco(cls):
        DEFENSE_REGISTRY._do_register(name, cls)
        cls.defense_name = name
        return cls

    return deco


def registered_defense_names():
    """Sorted names in :data:`DEFENSE_REGISTRY` (without "none")."""
    return sorted(name for name, _ in DEFENSE_REGISTRY)


def parse_defense_name(name):
    """Split a (possibly chained) defense name into its lower-case components.

    Args:
        name (str): e.g. "nlmeans", "median+nlmeans", "none".

    Returns:
        list[str]: the components in application order.
    """
    if not isinstance(name, str):
        raise TypeError(f"A defense name must be a string, got {type(name).__name__}: {name!r}.")
    parts = [p.strip().lower() for p in name.split(CHAIN_SEPARATOR)]
    if any(not p for p in parts):
        raise ValueError(f"Empty component in defense name '{name}'.")
    return parts


def accepted_parameters(name):
    """Keyword parameters (with defaults) of the registered defense ``name``."""
    factory = _lookup(name)
    sig = inspect.signature(factory)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _lookup(name):
    if name not in DEFENSE_REGISTRY:
        raise KeyError(
            f"Unknown defense '{name}'. Registered defenses: "
            f"{', '.join(registered_defense_names())}; plus '{NONE}' (no defense). Chain them "
            f"with '{CHAIN_SEPARATOR}', e.g. 'median{CHAIN_SEPARATOR}nlmeans'."
        )
    return DEFENSE_REGISTRY.get(name)


def _build_single(name, params):
    if name == NONE:
        if params:
            raise TypeError(f"Defense '{NONE}' takes no parameters, got {sorted(params)}.")
        return NoOpTransform()
    factory = _lookup(name)
    accepted = accepted_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"Unknown parameter(s) {unknown} for defense '{name}'; accepted: {sorted(accepted)}."
        )
    return factory(**params)


def build_defense(name, **params):
    """Build a defense ``Transform`` by name.

    Args:
        name (str): a registered name, "none" (returns a ``NoOpTransform``) or a chain
            "a+b+..." (returns a ``TransformList`` applying a, then b, ...). Case-insensitive.
        params: for a single defense, its keyword parameters (e.g. ``h=5.0``). For a chain,
            one dict per component keyed by its name (e.g. ``median={"window": 5}``); omitted
            components use their defaults.

    Returns:
        Transform

    Raises:
        KeyError: unknown defense name (the message lists the registered names).
        TypeError: unknown parameter (the message names it and the accepted ones).
    """
    parts = parse_defense_name(name)
    if len(parts) == 1:
        return _build_single(parts[0], params)
    unknown = sorted(set(params) - set(parts))
    if unknown:
        raise TypeError(
            f"Unknown keyword(s) {unknown} for the chain '{name}': pass one dict of parameters "
            f"per component, keyed by its name ({', '.join(parts)})."
        )
    for key, value in params.items():
        if not isinstance(value, dict):
            raise TypeError(f"Parameters of '{key}' in the chain '{name}' must be a dict.")
    return TransformList([_build_single(p, dict(params.get(p, {}))) for p in parts])


def _cfg_params(cfg, name):
    """Keyword parameters of defense ``name`` from ``cfg.DEFENSE.<NAME>`` (keys lower-cased)."""
    node = None
    if "DEFENSE" in cfg:
        node = cfg.DEFENSE.get(name.upper())
    if node is None:
        logger.warning(f"cfg.DEFENSE.{name.upper()} not found; defense '{name}' uses its defaults.")
        return {}
    return {key.lower(): value for key, value in node.items()}


def build_defense_from_cfg(cfg, name):
    """Build a (possibly chained) defense with parameters from ``cfg.DEFENSE.<NAME>`` nodes.

    Every key of the node is a parameter of the defense in upper case, e.g.
    ``cfg.DEFENSE.NLMEANS.H_COLOR`` -> ``h_color``. A missing node means the defaults (with a
    warning); see :func:`upsnet_robust.defenses.add_defense_config` for the nodes.

    Args:
        cfg (CfgNode): the config.
        name (str): as in :func:`build_defense`, e.g. "median+nlmeans".

    Returns:
        Transform
    """
    parts = parse_defense_name(name)
    tfms = []
    for part in parts:
        if part == NONE:
            tfms.append(NoOpTransform())
            continue
        try:
            tfms.append(_build_single(part, _cfg_params(cfg, part)))
        except TypeError as e:
            raise TypeError(f"cfg.DEFENSE.{part.upper()}: {e}") from e
    return tfms[0] if len(tfms) == 1 else TransformList(tfms)
