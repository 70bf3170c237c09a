#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""
Put finished sweeps of several models side by side.

    python tools/compare_runs.py --output-dir output/demo \
        output/upsnet_tiny_robustness output/panoptic_fpn_tiny_robustness

Reads each folder's robustness.json; writes comparison.md and comparison.png (each model's
headline metric against eps, undefended and defended) and prints the table.
"""
import argparse

from upsnet_robust.evaluation.compare import write_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="output folders of tools/attack_net.py runs")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    paths = write_comparison(args.folders, args.output_dir)
    print(open(paths["md"]).read())
    print("Written:", paths["md"], paths["png"])


if __name__ == "__main__":
    main()  # pragma: no cover
