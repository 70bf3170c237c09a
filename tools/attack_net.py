#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""
UPSNetRobust's main job: a robustness sweep of a trained model (detectron2 style).

    python tools/attack_net.py --config-file configs/Synthetic/upsnet_tiny_robustness.yaml
    python tools/attack_net.py --config-file configs/Robustness/upsnet_R_50_cityscapes_study.yaml \
        --num-gpus 8 MODEL.WEIGHTS /path/to/model.pth
    python tools/attack_net.py --config-file configs/Synthetic/upsnet_tiny_lazy.py \
        robustness.epsilons=[1,4] train.output_dir=output/lazy
    python tools/attack_net.py --plugin my_attacks.py --config-file ... \
        ROBUSTNESS.ATTACKS "['two_step']"

``--config-file`` takes a YAML config of any meta-architecture with a model adapter (the
project's, detectron2's model-zoo files, ...; ``KEY VALUE`` opts) or a LazyConfig ``.py`` in
detectron2's lazyconfig_train_net conventions with a ``robustness`` node (hydra-style
``key=value`` overrides). For every attack in ROBUSTNESS.ATTACKS and eps in ROBUSTNESS.EPSILONS
(plus clean), each adversarial batch is computed once and scored undefended and under every
defense. Results go to OUTPUT_DIR: robustness.{json,csv,md}, pq_vs_eps.png, time_vs_eps.png,
examples/. Re-running the same command resumes: finished images and cells are not recomputed.
``--plugin MODULE_OR_FILE`` (repeatable) imports a user module (an attack, objective, defense,
threat kind, ...) before the config is built, so its config keys exist when the YAML is merged.
"""
import logging

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import upsnet_robust  # noqa: F401  registers UPSNet, datasets, adapters, attacks and defenses
from upsnet_robust.engine import (
    Trainer,
    add_plugin_argument,
    build_checkpointer,
    load_plugins,
    setup_cfg,
)
from upsnet_robust.engine.lazy import (
    build_lazy_model,
    build_lazy_test_mapper,
    is_lazy_config,
    load_lazy_config,
)
from upsnet_robust.evaluation import run_robustness_sweep

logger = logging.getLogger("upsnet_robust")


def main(args):
    load_plugins(args.plugin)  # in every process, before any config is built
    if is_lazy_config(args.config_file):
        lazy = load_lazy_config(args.config_file, args.opts)
        default_setup(lazy, args)
        model, cfg = build_lazy_model(lazy)
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="upsnet_robust")
        mapper = build_lazy_test_mapper(lazy)
    else:
        cfg = setup_cfg(args)
        model = Trainer.build_model(cfg)
        build_checkpointer(cfg, model, save_dir=cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS)
        model.eval()
        mapper = None
    result = run_robustness_sweep(cfg, model, config_file=args.config_file, mapper=mapper)
    if comm.is_main_process():
        return result


def invoke_main() -> None:
    args = add_plugin_argument(default_argument_parser()).parse_args()
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
