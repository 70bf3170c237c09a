#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""
Transfer attacks between models (detectron2 style).

    python tools/transfer_net.py \
        --config-file configs/Synthetic/upsnet_tiny_robustness.yaml \
        --config-file configs/Synthetic/panoptic_fpn_tiny_robustness.yaml \
        --output-dir output/transfer ROBUSTNESS.EPSILONS "[4.0]"

Each ``--config-file`` (YAML, or a LazyConfig ``.py``) names one model with its weights, test
data and robustness settings. Adversarial images are crafted white-box once per source model
(its ROBUSTNESS.ATTACKS x EPSILONS, OBJECTIVE, SEED, QUANTIZE) and scored on every target model
under the target's own ROBUSTNESS.DEFENSES. The opts at the end apply to every config (``KEY
VALUE`` pairs for YAML configs, ``key=value`` for LazyConfigs). Writes transfer.json,
transfer.md and transfer.png into --output-dir; re-running resumes. ``--plugin MODULE_OR_FILE``
(repeatable) imports a user module before the configs are built.
"""
import argparse
import datetime
import logging
import os

from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import upsnet_robust  # noqa: F401  registers UPSNet, datasets, adapters, attacks and defenses
from upsnet_robust.engine import (
    Trainer,
    add_plugin_argument,
    build_checkpointer,
    get_upsnet_cfg,
    load_plugins,
    merge_with_hints,
)
from upsnet_robust.engine.lazy import (
    build_lazy_model,
    build_lazy_test_mapper,
    is_lazy_config,
    load_lazy_config,
)
from upsnet_robust.evaluation.run import hardware_description
from upsnet_robust.evaluation.transfer import TransferModel, TransferStudy
from upsnet_robust.evaluation.transfer_report import write_transfer_report

logger = logging.getLogger("upsnet_robust")


def _name(path: str, taken) -> str:
    base = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("_robustness", "_lazy"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def load_model(path: str, opts, name: str) -> TransferModel:
    """A TransferModel from a YAML or LazyConfig file, with the shared opts applied."""
    if is_lazy_config(path):
        lazy = load_lazy_config(path, opts)
        model, cfg = build_lazy_model(lazy)
        return TransferModel(name, cfg, model, mapper=build_lazy_test_mapper(lazy))
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, path, opts)
    cfg.freeze()
    model = Trainer.build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return TransferModel(name, cfg, model.eval())


def main(args):
    load_plugins(args.plugin)  # in every process, before any config is built
    setup_logger(output=args.output_dir, distributed_rank=comm.get_rank(), name="upsnet_robust")
    setup_logger(distributed_rank=comm.get_rank(), name="detectron2")
    names = []
    for path in args.config_file:
        names.append(_name(path, names))
    # every model loads and is checked (adapter, attack/objective pairs, data) before any work
    models = [load_model(p, args.opts, n) for p, n in zip(args.config_file, names)]
    entries = TransferStudy(models, args.output_dir).run()
    if comm.is_main_process():
        metadata = {
            "configs": ", ".join(f"{n}={p}" for n, p in zip(names, args.config_file)),
            "opts": " ".join(args.opts) or "-",
            "hardware": hardware_description(models[0].cfg.MODEL.DEVICE),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        paths = write_transfer_report(entries, args.output_dir, metadata)
        logger.info("Transfer report written: %s", ", ".join(sorted(paths.values())))
        return entries


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", action="append", required=True, metavar="FILE",
                        help="a model's config (repeat: two or more)")  # fmt: skip
    parser.add_argument("--output-dir", required=True, help="where the study's files go")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    port = 2**15 + 2**14 + hash(os.getuid() if hasattr(os, "getuid") else 1) % 2**14
    parser.add_argument("--dist-url", default=f"tcp://127.0.0.1:{port}")
    add_plugin_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="applied to every config")
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
