#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Generate the synthetic Cityscapes-format panoptic data set.

Writes ``leftImg8bit/``, ``gtFine/`` (labelIds, instanceIds and labelTrainIds PNGs, polygons
json) and the panoptic json + PNGs of cityscapesscripts' createPanopticImgs. An existing tree at
``--output`` is replaced; the new one is built beside it and moved into place when complete.
The same arguments give byte-identical files.

Example::

    python tools/prepare_synthetic_cityscapes.py                     # datasets/synthetic_cityscapes
    python tools/prepare_synthetic_cityscapes.py --output /data/synthetic_cityscapes --num-train 50
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from upsnet_robust.data import (
    SYNTHETIC_CITYSCAPES_DIRNAME,
    default_synthetic_cityscapes_root,
    generate_synthetic_cityscapes,
)

logger = logging.getLogger("upsnet_robust.prepare_synthetic_cityscapes")

_NAMES = "synthetic_cityscapes_fine_{panoptic,sem_seg,instance_seg}_{train,val}"


def default_output_dir() -> str:
    """``$DETECTRON2_DATASETS/synthetic_cityscapes``, where the registered data sets look."""
    return default_synthetic_cityscapes_root()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", default=default_output_dir(), help="data set root")
    parser.add_argument("--num-train", type=int, default=400, help="training images")
    parser.add_argument("--num-val", type=int, default=50, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--height", type=int, default=128, help="image height")
    parser.add_argument("--width", type=int, default=256, help="image width")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    setup_logger(name="upsnet_robust", abbrev_name="upsnet")
    root = generate_synthetic_cityscapes(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        height=args.height,
        width=args.width,
        show_progress=not args.no_progress,
    )
    if os.path.abspath(root) == os.path.abspath(default_output_dir()):
        usage = (
            f"It is registered as {_NAMES}, e.g. "
            "`python tools/train_net.py --config-file configs/Synthetic/upsnet_tiny.yaml`."
        )
    elif os.path.basename(root) == SYNTHETIC_CITYSCAPES_DIRNAME:
        usage = f"Use it as {_NAMES} with DETECTRON2_DATASETS={os.path.dirname(root)}."
    else:
        usage = (
            "Register it with upsnet_robust.data.register_all_synthetic_cityscapes("
            f"{root!r}, name_prefix=...), or name the directory {SYNTHETIC_CITYSCAPES_DIRNAME} "
            "and point DETECTRON2_DATASETS at its parent."
        )
    logger.info(f"Synthetic Cityscapes data set written to {root}. {usage}")
    return root


if __name__ == "__main__":
    main(sys.argv[1:])
