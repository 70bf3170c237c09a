#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Convert a checkpoint of the original UPSNet implementation to this project's UPSNet.

    python tools/convert_upsnet_weights.py upsnet_resnet_50_cityscapes_12000.pth converted.pth
    python tools/attack_net.py --config-file configs/Robustness/upsnet_R_50_cityscapes_study.yaml \
        MODEL.WEIGHTS converted.pth

The input is loaded with ``torch.load(weights_only=True)``; the output is ``{"model": state_dict}``,
what ``MODEL.WEIGHTS`` loads. The names and re-orderings are in
``upsnet_robust.modeling.convert``; docs/UPSNET_WEIGHTS.md has the whole procedure.
"""

import argparse
import os
import sys

from upsnet_robust.modeling.convert import convert_upsnet_state_dict, load_upsnet_checkpoint
from upsnet_robust.utils.torch_io import atomic_torch_save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="original UPSNet checkpoint (.pth, a state dict)")
    parser.add_argument("target", help="where to write {'model': converted state dict}")
    args = parser.parse_args(argv)
    try:
        converted = convert_upsnet_state_dict(load_upsnet_checkpoint(args.source))
    except (OSError, ValueError) as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 1
    atomic_torch_save(args.target, {"model": converted})
    num_things = converted["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    num_sem = converted["sem_seg_head.score.weight"].shape[0]
    agnostic = converted["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4
    print(
        f"wrote {args.target} ({len(converted)} tensors, "
        f"{os.path.getsize(args.target) / 2**20:.1f} MiB): {num_things} thing classes, "
        f"{num_sem} semantic classes{', class-agnostic boxes' if agnostic else ''}.\n"
        f"Use it with MODEL.ROI_HEADS.NUM_CLASSES {num_things}, "
        f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {num_sem}, INPUT.FORMAT BGR, caffe PIXEL_MEAN and "
        f"PIXEL_STD [1, 1, 1] (configs/Base-UPSNet.yaml sets all of them for Cityscapes)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
