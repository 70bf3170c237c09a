# Copyright (c) UPSNetRobust authors.
"""Config nodes ``cfg.DEFENSE.<NODE>`` holding the parameters of each registered defense."""

from detectron2.config import CfgNode as CN

from .registry import DEFENSE_REGISTRY, defense_defaults

__all__ = ["add_defense_config"]


def add_defense_config(cfg):
    """Add one ``cfg.DEFENSE.<NODE>`` node per registered defense, holding its defaults.

    The nodes are generated from the registry (:func:`~.registry.register_defense`): a key per
    keyword parameter of the defense, in upper case, with the parameter's default (read back by
    :func:`~.registry.build_defense_from_cfg`). Nodes already present are kept as they are, so
    the call is idempotent and a defense registered later can be added by calling it again;
    ``cfg.DEFENSE`` is created if missing.
    """
    if "DEFENSE" not in cfg:
        cfg.DEFENSE = CN()
    for name, _ in DEFENSE_REGISTRY:
        for node, defaults in defense_defaults(name).items():
            if node not in cfg.DEFENSE:
                setattr(cfg.DEFENSE, node, CN(defaults))
