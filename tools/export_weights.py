#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Strip a training checkpoint to its model weights (what the demo ships and loads).

    python tools/export_weights.py output/upsnet_tiny/model_final.pth checkpoints/upsnet_tiny_synthetic.pth
"""
import argparse
import os

import torch

from upsnet_robust.utils.torch_io import atomic_torch_save


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a checkpoint written by the trainer")
    parser.add_argument("target", help="where to write {'model': state_dict}")
    args = parser.parse_args()
    state = torch.load(args.source, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    if not isinstance(model, dict) or not all(torch.is_tensor(v) for v in model.values()):
        raise SystemExit(f"{args.source}: expected a state dict of tensors under 'model'")
    atomic_torch_save(args.target, {"model": model})
    print(f"wrote {args.target} ({os.path.getsize(args.target) / 2**20:.1f} MiB, {len(model)} tensors)")


if __name__ == "__main__":
    main()
