# Copyright (c) UPSNetRobust authors.
"""detectron2 LazyConfig (``.py``) files for the robustness tools.

A LazyConfig run follows detectron2's ``tools/lazyconfig_train_net.py`` conventions: ``model``,
``dataloader.test`` (its ``dataset.names`` and ``mapper``), ``dataloader.evaluator``,
``train.init_checkpoint``, ``train.output_dir``, ``train.device``. The robustness settings live in
a ``robustness`` node whose keys are the lowercase ``ROBUSTNESS`` keys (``robustness.attacks``,
``robustness.epsilons``, ...; defaults filled in) and, under ``robustness.defense``, the
lowercase ``DEFENSE`` parameters. Command-line overrides use hydra syntax
(``robustness.epsilons=[1,4]``), applied by ``LazyConfig.apply_overrides``.

The sweep itself reads a yacs config: :func:`lazy_to_run_cfg` writes the LazyConfig's settings
into one (with the model node's text as ``MODEL.LAZY_CONFIG``, so the cache fingerprint follows
the model definition).
"""
import difflib
import os
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from detectron2.config import CfgNode, LazyConfig, instantiate

from ..config import add_robustness_config
from .setup import get_upsnet_cfg, merge_with_hints

__all__ = [
    "is_lazy_config",
    "load_lazy_config",
    "lazy_to_run_cfg",
    "build_lazy_model",
    "build_lazy_test_mapper",
    "model_from_yaml",
    "robustness_defaults",
]

ROBUSTNESS_NODE = "robustness"


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a LazyConfig (Python) file rather than a YAML one."""
    return str(path).endswith(".py")


def _lower(node: CfgNode) -> Dict:
    out = {}
    for key, value in node.items():
        out[key.lower()] = _lower(value) if isinstance(value, CfgNode) else value
    return out


def robustness_defaults() -> Dict:
    """The ``robustness`` node's defaults: every ROBUSTNESS key, lowercase, plus ``defense``
    (the lowercase DEFENSE parameters)."""
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    add_robustness_config(cfg)
    defaults = _lower(cfg.ROBUSTNESS)
    defaults["defense"] = _lower(cfg.DEFENSE)
    return defaults


def _check_keys(given, defaults: Dict, path: str, source: str) -> None:
    for key in given:
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(f'{path}.{c}' for c in close)}?" if close else ""
            raise KeyError(
                f"Unknown key {path}.{key} in {source}: the {ROBUSTNESS_NODE} node takes the "
                f"lowercase ROBUSTNESS keys (docs/CONFIG.md).{hint}"
            )
        if isinstance(defaults[key], dict) and isinstance(given[key], (dict, DictConfig)):
            _check_keys(given[key], defaults[key], f"{path}.{key}", source)


def load_lazy_config(path: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """Load a LazyConfig, fill in the ``robustness`` defaults, apply hydra-style overrides.

    Raises:
        KeyError: an unknown ``robustness`` key (with the closest known keys), or a missing
            node the robustness tools need (``model``, ``dataloader.test``, ``train``).
    """
    cfg = LazyConfig.load(path)
    defaults = robustness_defaults()
    given = cfg.get(ROBUSTNESS_NODE, None) or {}
    _check_keys(given, defaults, ROBUSTNESS_NODE, path)
    merged = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.create(_plain(given)))
    cfg[ROBUSTNESS_NODE] = merged
    overrides = list(overrides or [])
    if overrides:
        cfg = LazyConfig.apply_overrides(cfg, overrides)
        _check_keys(cfg[ROBUSTNESS_NODE], defaults, ROBUSTNESS_NODE, "command-line overrides")
    for node in ("model", "dataloader", "train"):
        if node not in cfg:
            raise KeyError(
                f"LazyConfig {path} has no '{node}' node; the robustness tools follow detectron2's "
                "lazyconfig_train_net conventions (model, dataloader.test, train.init_checkpoint, "
                "train.output_dir, train.device)"
            )
    if "test" not in cfg.dataloader:
        raise KeyError(f"LazyConfig {path} has no 'dataloader.test' node (the data to attack)")
    return cfg


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _dataset_names(cfg: DictConfig) -> List[str]:
    dataset = cfg.dataloader.test.get("dataset", None)
    names = dataset.get("names", None) if dataset is not None else None
    if names is None:
        raise KeyError(
            "dataloader.test.dataset.names is missing: the robustness sweep needs a registered "
            "data set name (e.g. L(get_detection_dataset_dicts)(names=...))"
        )
    return [names] if isinstance(names, str) else list(names)


def _opts(prefix: str, values: Dict) -> List:
    """``[KEY, value, ...]`` pairs for ``merge_from_list`` (yacs checks and coerces types)."""
    opts = []
    for key, value in values.items():
        if isinstance(value, dict):
            opts += _opts(f"{prefix}.{key.upper()}", value)
        else:
            opts += [f"{prefix}.{key.upper()}", value]
    return opts


def _coerce(values: Dict, defaults: Dict) -> Dict:
    """Python configs write ``h=5`` for a float key: ints become floats where the default is a
    float (yacs refuses int for float), recursively."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            value = _coerce(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def lazy_to_run_cfg(cfg: DictConfig, model=None) -> CfgNode:
    """The yacs config the sweep reads, filled from a loaded LazyConfig (and the instantiated
    ``model``, whose class names the meta-architecture)."""
    run = get_upsnet_cfg()
    robustness = _coerce(_plain(cfg[ROBUSTNESS_NODE]), robustness_defaults())
    defense = robustness.pop("defense", {})
    merge_with_hints(run, None, _opts("ROBUSTNESS", robustness) + _opts("DEFENSE", defense))
    train = cfg.get("train", {})
    run.DATASETS.TEST = tuple(_dataset_names(cfg))
    run.DATASETS.TRAIN = tuple(run.DATASETS.TEST)
    run.MODEL.WEIGHTS = str(train.get("init_checkpoint", "") or "")
    run.MODEL.DEVICE = str(train.get("device", "cpu") or "cpu")
    run.OUTPUT_DIR = str(train.get("output_dir", "./output") or "./output")
    run.INPUT.FORMAT = str(_input_format(cfg))
    run.DATALOADER.NUM_WORKERS = int(cfg.dataloader.test.get("num_workers", 0) or 0)
    if model is not None:  # the adapter is looked up by the instantiated model's class
        run.MODEL.META_ARCHITECTURE = type(model).__name__
    run.MODEL.LAZY_CONFIG = OmegaConf.to_yaml(cfg.model) + OmegaConf.to_yaml(cfg.dataloader.test)
    run.freeze()
    return run


def _input_format(cfg: DictConfig) -> str:
    for source in (cfg.model, cfg.dataloader.test.get("mapper", {}) or {}):
        for key in ("input_format", "image_format"):
            if key in source and source[key]:
                return source[key]
    return "BGR"


def build_lazy_model(cfg: DictConfig):
    """Instantiate ``cfg.model`` on ``train.device``, load ``train.init_checkpoint`` safely;
    returns the model (eval mode) and the run config (:func:`lazy_to_run_cfg`)."""
    from .trainer import build_checkpointer

    model = instantiate(cfg.model)
    run_cfg = lazy_to_run_cfg(cfg, model)
    model.to(run_cfg.MODEL.DEVICE)
    build_checkpointer(run_cfg, model, save_dir=run_cfg.OUTPUT_DIR).load(run_cfg.MODEL.WEIGHTS)
    return model.eval(), run_cfg


def build_lazy_test_mapper(cfg: DictConfig):
    """``dataloader.test.mapper`` instantiated, or None (the model adapter's default)."""
    mapper = cfg.dataloader.test.get("mapper", None)
    return instantiate(mapper) if mapper is not None else None


def model_from_yaml(config_file: str, opts: Optional[List[str]] = None):
    """A model built from one of the project's YAML configs: lets a LazyConfig reuse them
    (``model = L(model_from_yaml)(config_file=...)``). Relative paths are taken from the
    current directory, then from the repository root."""
    from detectron2.modeling import build_model

    if not os.path.isfile(config_file):
        # projects/UPSNetRobust/upsnet_robust/engine/lazy.py -> the repository root
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
        candidate = os.path.join(root, config_file)
        if os.path.isfile(candidate):
            config_file = candidate
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, config_file, list(opts or []))
    return build_model(cfg)
