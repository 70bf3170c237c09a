# Copyright (c) UPSNetRobust authors.
"""Config set-up shared by the tools: detectron2's order with UPSNetRobust's keys and hints."""
import difflib

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import (
    add_adv_train_config,
    add_registered_config,
    add_robustness_config,
    add_upsnet_config,
)
from .plugins import load_plugins

__all__ = ["get_upsnet_cfg", "merge_with_hints", "setup_cfg"]


def get_upsnet_cfg() -> CfgNode:
    """detectron2's defaults plus every UPSNetRobust key and the keys that model adapters and
    plug-ins registered (:func:`upsnet_robust.config.register_config`; e.g. Panoptic-DeepLab's,
    so its YAML files load like any other model's)."""
    cfg = get_cfg()
    add_upsnet_config(cfg)
    add_robustness_config(cfg)
    add_adv_train_config(cfg)
    add_registered_config(cfg)
    return cfg


def _known_keys(cfg: CfgNode, prefix: str = ""):
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, CfgNode):
            yield from _known_keys(v, name + ".")
        else:
            yield name


def _check_flags_before_pairs(opts) -> None:
    """A flag after the ``KEY VALUE`` pairs (``... KEY VALUE --num-gpus 2``) lands in the opts
    (argparse's REMAINDER takes everything after the first pair): say so, not "Non-existent key"."""
    opts = list(opts or [])
    for i in range(0, len(opts), 2):
        if str(opts[i]).startswith("-"):
            raise ValueError(
                f"{opts[i]!r} is a command-line flag written after the KEY VALUE pairs "
                f"({' '.join(map(str, opts[:i])) or 'none'}); flags go before the pairs, e.g. "
                f"--config-file X.yaml {' '.join(map(str, opts[i:i + 2]))} KEY VALUE ..."
            )


def merge_with_hints(cfg: CfgNode, config_file: str = None, opts=None) -> CfgNode:
    """``merge_from_file`` / ``merge_from_list`` whose unknown-key errors name the source and
    suggest the closest known keys; a flag among the ``KEY VALUE`` pairs is named as such."""
    _check_flags_before_pairs(opts)
    for source, merge in (
        (config_file, lambda: cfg.merge_from_file(config_file)),
        ("command-line opts", lambda: cfg.merge_from_list(list(opts or []))),
    ):
        if source is None:
            continue
        try:
            merge()
        except (KeyError, AssertionError) as e:  # yacs: KeyError (file), AssertionError (list)
            if "Non-existent" not in str(e):
                raise
            key = str(e).split(":")[-1].strip(" '\"")
            close = difflib.get_close_matches(key, list(_known_keys(cfg)), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(
                f"{e} (in {source}). UPSNetRobust keys exist only after add_upsnet_config / "
                f"add_robustness_config (tools/ scripts call them).{hint}"
            ) from e
    return cfg


def setup_cfg(args, freeze: bool = True) -> CfgNode:
    """detectron2's set-up order: plug-ins (``--plugin``), defaults, project keys, file, opts,
    freeze, default_setup."""
    load_plugins(getattr(args, "plugin", None))  # before the config: their keys must exist
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, args.config_file or None, args.opts)
    if freeze:
        cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="upsnet_robust")
    return cfg

