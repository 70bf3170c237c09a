# Copyright (c) UPSNetRobust authors.
"""Plug-ins: user modules (an attack, objective, defense, threat kind, model adapter, ...)
imported by the tools before the config is built, so their registrations and config keys exist
when the YAML file is merged. No copy of a tool, no edit of the package.

    python tools/attack_net.py --plugin my_attacks.py --plugin mypackage.threats \\
        --config-file my.yaml ROBUSTNESS.ATTACKS "['two_step']"

A plug-in is a module name (importable) or a ``.py`` file path. A module that defines
``add_config(cfg)`` gets it registered with :func:`upsnet_robust.config.register_config`. The
environment variable ``UPSNET_PLUGINS`` (paths or names separated by ``os.pathsep``) adds
plug-ins without a flag (read before the config, so it works for any tool and every process).
"""
import argparse
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Iterable, List, Optional

from ..config import register_config

__all__ = ["ENV_VAR", "add_plugin_argument", "load_plugin", "load_plugins"]

ENV_VAR = "UPSNET_PLUGINS"


def load_plugin(name: str):
    """Import one plug-in (a module name or a ``.py`` path) and register its ``add_config``.

    Raises:
        ImportError: naming the plug-in and what was expected.
    """
    name = str(name).strip()
    if name.endswith(".py") or os.sep in name:
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(path):
            raise ImportError(f"Plug-in {name!r}: no such file ({path}); expected a .py file or "
                              "an importable module name")  # fmt: skip
        stem = os.path.splitext(os.path.basename(path))[0]
        mod_name = f"upsnet_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ImportError(f"Plug-in {name!r}: {e}; give an importable module name or the "
                              "path of a .py file") from e  # fmt: skip
    add_config = getattr(module, "add_config", None)
    if callable(add_config):
        register_config(add_config)
    return module


def load_plugins(names: Optional[Iterable[str]] = None) -> List:
    """Import the plug-ins of ``UPSNET_PLUGINS`` and then ``names`` (each once per process)."""
    env = [n for n in os.environ.get(ENV_VAR, "").split(os.pathsep) if n.strip()]
    return [load_plugin(n) for n in dict.fromkeys(env + list(names or []))]


def add_plugin_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--plugin MODULE_OR_FILE`` (repeatable) to a tool's argument parser."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import this module or .py file before the config is built (its registrations "
        "and add_config(cfg) keys then exist); repeatable. Also: env " + ENV_VAR,
    )
    return parser
