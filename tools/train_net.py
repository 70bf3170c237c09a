#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""
UPSNet training and evaluation script (detectron2 style).

    python tools/train_net.py --config-file configs/Synthetic/upsnet_tiny.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model.pth
    python tools/train_net.py --config-file ... --num-gpus 2   # gloo on a CPU-only machine
    python tools/train_net.py --plugin my_attacks.py --config-file ...  # a user module first
"""
import logging

from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import upsnet_robust  # noqa: F401  registers UPSNet, datasets, attacks and defenses
from upsnet_robust.engine import Trainer, add_plugin_argument, build_checkpointer, setup_cfg

logger = logging.getLogger("upsnet_robust")


def main(args):
    cfg = setup_cfg(args)  # imports the --plugin modules first (in every process)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        build_checkpointer(cfg, model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
