# Copyright (c) UPSNetRobust authors.
"""The defense registry, its one registration decorator and its builders (by name, or from
``cfg.DEFENSE.<NODE>`` nodes)."""

import inspect
import logging
from collections.abc import Mapping

from detectron2.data.transforms import NoOpTransform, TransformList
from detectron2.utils.registry import Registry

from ..utils.registry import register_as

__all__ = [
    "DEFAULT_SURROGATES",
    "DEFENSE_REGISTRY",
    "defense_defaults",
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
``cfg.ROBUSTNESS.DEFENSES``. Register new ones with :func:`register_defense`, which also records
the defense's config node (``cfg.DEFENSE.<NODE>``, its keyword parameters and their defaults)
and its default BPDA surrogate. "none" (no defense) and chains "a+b" are handled by
:func:`build_defense` and are not registry entries.
"""

NONE = "none"
CHAIN_SEPARATOR = "+"


def register_defense(name, *, surrogate, config_node=None):
    """Class decorator: register a defense ``Transform`` with everything the project needs of it.

    Declared once, beside the class:

    * ``name``: the key in ``ROBUSTNESS.DEFENSES`` (lower case, no "+", not "none");
    * the defaults: the class's keyword parameters, which :func:`add_defense_config` turns into
      the node ``cfg.DEFENSE.<config_node>`` (one upper-case key per parameter, e.g. ``h_color``
      -> ``H_COLOR``), so every parameter needs a default;
    * ``surrogate``: the registered BPDA surrogate adaptive attacks differentiate through by
      default (:mod:`upsnet_robust.defenses.surrogates`; "identity" for a denoiser whose output
      is close to its input).

    They are stored as the class attributes ``defense_name``, ``config_node`` and
    ``default_surrogate``.

    Args:
        name (str): the defense's key.
        surrogate (str): name of its default BPDA surrogate.
        config_node (str, optional): the ``cfg.DEFENSE`` node; default ``name.upper()``.
    """
    if not isinstance(name, str) or name != name.lower() or CHAIN_SEPARATOR in name:
        raise ValueError(f"Invalid defense name {name!r}: lower case, no '+', not 'none'.")
    if name in ("", NONE):
        raise ValueError(f"Invalid defense name {name!r}: lower case, no '+', not 'none'.")
    if not isinstance(surrogate, str) or not surrogate.strip():
        raise ValueError(f"Defense '{name}': surrogate must be a surrogate name, not {surrogate!r}")
    node = config_node or name.upper()
    if node != node.upper():
        raise ValueError(f"Defense '{name}': config node {node!r} must be upper case.")

    def deco(cls):
        taken = {c.config_node: n for n, c in DEFENSE_REGISTRY}
        if node in taken:
            raise ValueError(f"Defense '{name}': cfg.DEFENSE.{node} belongs to '{taken[node]}'.")
        missing = [k for k, v in _keyword_parameters(cls).items() if v is inspect.Parameter.empty]
        if missing:
            raise TypeError(
                f"Defense '{name}' ({cls.__name__}): parameters {missing} need defaults, which "
                f"become the keys of cfg.DEFENSE.{node}."
            )
        cls.defense_name, cls.config_node, cls.default_surrogate = name, node, surrogate
        register_as(DEFENSE_REGISTRY, name, cls)
        return cls

    return deco


def registered_defense_names():
    """Sorted names in :data:`DEFENSE_REGISTRY` (without "none")."""
    return sorted(name for name, _ in DEFENSE_REGISTRY)


class _DefaultSurrogates(Mapping):
    """Read-only ``{defense name: default BPDA surrogate}``, as declared by
    :func:`register_defense` (a live view of the registry)."""

    def __getitem__(self, name):
        if name not in DEFENSE_REGISTRY:
            raise KeyError(name)
        return DEFENSE_REGISTRY.get(name).default_surrogate

    def __iter__(self):
        return iter(registered_defense_names())

    def __len__(self):
        return len(registered_defense_names())

    def __repr__(self):
        return repr(dict(self))


DEFAULT_SURROGATES = _DefaultSurrogates()


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


def _keyword_parameters(factory):
    sig = inspect.signature(factory)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def accepted_parameters(name):
    """Keyword parameters (with defaults) of the registered defense ``name``."""
    return _keyword_parameters(_lookup(name))


def defense_defaults(name):
    """``{config node: {KEY: default}}`` of the registered defense ``name`` (what
    :func:`add_defense_config` adds to ``cfg.DEFENSE``)."""
    cls = _lookup(name)
    return {cls.config_node: {k.upper(): v for k, v in accepted_parameters(name).items()}}


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
    """Keyword parameters of defense ``name`` from its ``cfg.DEFENSE`` node (keys lower-cased)."""
    node_name = _lookup(name).config_node
    node = cfg.DEFENSE.get(node_name) if "DEFENSE" in cfg else None
    if node is None:
        logger.warning(f"cfg.DEFENSE.{node_name} not found; defense '{name}' uses its defaults.")
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
            raise TypeError(f"cfg.DEFENSE.{_lookup(part).config_node}: {e}") from e
    return tfms[0] if len(tfms) == 1 else TransformList(tfms)
