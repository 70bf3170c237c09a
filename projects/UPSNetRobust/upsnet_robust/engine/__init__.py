# Copyright (c) UPSNetRobust authors.
from .plugins import add_plugin_argument, load_plugins
from .setup import get_upsnet_cfg, merge_with_hints, setup_cfg
from .trainer import Trainer, build_checkpointer

__all__ = [
    "Trainer",
    "add_plugin_argument",
    "build_checkpointer",
    "get_upsnet_cfg",
    "load_plugins",
    "merge_with_hints",
    "setup_cfg",
]
