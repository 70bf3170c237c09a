# Copyright (c) UPSNetRobust authors.
from .setup import get_upsnet_cfg, merge_with_hints, setup_cfg
from .trainer import Trainer, build_checkpointer

__all__ = ["Trainer", "build_checkpointer", "get_upsnet_cfg", "merge_with_hints", "setup_cfg"]
