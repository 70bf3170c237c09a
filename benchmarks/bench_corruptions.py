#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Seconds per image of each of the 15 benchmark corruptions (``imagecorruptions``, through
:func:`upsnet_robust.corruptions.corrupt_image`) at 1024x2048 (Cityscapes) and at the generated
data set's 128x256, and the projected corruption time of the full protocol (15 corruptions x 5
severities) on the 500 Cityscapes val images.

The projection counts corrupting the images only: the model's inference, the defenses and the
scoring of the 75 corrupted copies of each image come on top. One repetition per (corruption,
severity) at 1024x2048 (the run takes about a minute); ``--repeats`` at the small size. A
corruption whose mean time over the severities is more than 10x the median corruption's is
flagged, with its documented reason (``SLOW_REASONS``) or "undocumented". glass_blur's first
call in a process compiles its numba kernel; that one-off cost is timed separately and kept out
of the per-image figures.

    python benchmarks/bench_corruptions.py [--quick] [--output PATH]
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "corruptions"
SIZES = {"cityscapes": (1024, 2048), "generated": (128, 256)}  # (H, W)
CITYSCAPES_VAL_IMAGES = 500
SLOW_FACTOR = 10.0
# Why a corruption may legitimately cost > SLOW_FACTOR x the median (docs/CORRUPTIONS.md).
SLOW_REASONS = {
    "glass_blur": "a sequential pixel-swapping loop over the whole image (1-2 passes), two "
    "Gaussian blurs; numba-compiled in imagecorruptions-imaug, pure Python in 1.1.2",
    "zoom_blur": "averages 11-16 zoomed copies of the whole image (scipy.ndimage.zoom, "
    "linear), one per zoom factor of the severity",
}


def get_parser():
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="repetitions per cell at the generated size"
    )
    parser.add_argument(
        "--full-repeats", type=int, default=1, help="repetitions per cell at 1024x2048"
    )
    return parser


def source_image(size):
    """(H, W, 3) uint8 BGR photograph (scikit-image's astronaut) resized to ``size``."""
    import cv2
    from skimage import data

    h, w = size
    return cv2.resize(data.astronaut()[..., ::-1], (w, h), interpolation=cv2.INTER_CUBIC)


def numba_compile_seconds() -> float:
    """The one-off cost of glass_blur's first call in a process (its numba kernel compiles)."""
    import numpy as np

    from upsnet_robust.corruptions import corrupt_image

    t0 = time.perf_counter()
    corrupt_image(np.zeros((32, 32, 3), np.uint8), "glass_blur", 1, 0)
    return time.perf_counter() - t0


def time_cells(size, severities, repeats):
    """{corruption: {severity: median seconds per image}} on one image of ``size``."""
    from upsnet_robust.corruptions import CORRUPTIONS, corrupt_image, corruption_seed

    image = source_image(size)
    times = {}
    for name in CORRUPTIONS:
        times[name] = {}
        for severity in severities:
            runs = []
            for rep in range(repeats):
                seed = corruption_seed(0, f"bench_{rep}", name, severity)
                t0 = time.perf_counter()
                corrupt_image(image, name, severity, seed, "BGR")
                runs.append(time.perf_counter() - t0)
            times[name][severity] = bu.median(runs)
    return times


def summarise(times, num_images=CITYSCAPES_VAL_IMAGES):
    """Per corruption: mean seconds over severities, x median, flag; the protocol projection
    (sum over every cell, times ``num_images``)."""
    mean = {n: statistics.fmean(per.values()) for n, per in times.items()}
    med = statistics.median(mean.values())
    rows = {}
    for name, seconds in mean.items():
        factor = seconds / med if med > 0 else float("nan")
        slow = factor > SLOW_FACTOR
        rows[name] = {
            "seconds_per_image": seconds,
            "per_severity": {str(s): t for s, t in times[name].items()},
            "x_median": factor,
            "flagged": slow,
            "reason": (SLOW_REASONS.get(name, "undocumented") if slow else None),
        }
    per_image = sum(sum(per.values()) for per in times.values())
    return {
        "rows": rows,
        "median_seconds": med,
        "cells_per_image": sum(len(per) for per in times.values()),
        "seconds_per_image_all_cells": per_image,
        "projected_hours": per_image * num_images / 3600.0,
    }


def run(args):
    """Time every corruption at both sizes; returns the JSON result."""
    bu.setup_environment()
    bu.apply_threads(args.threads)
    compile_s = numba_compile_seconds()
    full_severities = (3,) if args.quick else (1, 2, 3, 4, 5)
    result = {"hardware": bu.hardware_info("cpu"), "numba_compile_seconds": compile_s}
    for key, size in SIZES.items():
        full = key == "cityscapes"
        severities = full_severities if full else (1, 2, 3, 4, 5)
        repeats = args.full_repeats if full else (1 if args.quick else args.repeats)
        times = time_cells(size, severities, repeats)
        result[key] = dict(summarise(times), size=list(size), severities=list(severities),
                           repeats=repeats)  # fmt: skip
    full = result["cityscapes"]
    note = "severity 3 only x 5" if args.quick else "all 75 cells"
    full["projection"] = note
    if args.quick:  # the five severities projected from severity 3
        full["projected_hours"] *= 5
    flagged = [n for n, r in full["rows"].items() if r["flagged"]]
    result["headline"] = [
        bu.headline("15 x 5 protocol, 500 val images, 1024x2048", full["projected_hours"], "h",
                    f"corruption time only ({note})"),  # fmt: skip
        bu.headline("median corruption, 1024x2048", full["median_seconds"], "s/image"),
        bu.headline("corruptions > 10x median", ", ".join(flagged) or "none", ""),
    ]
    return result


def print_report(result):
    print(f"# Corruptions: seconds per image ({bu.hardware_line(result['hardware'])})")
    print(f"numba compile (first glass_blur call per process): "
          f"{result['numba_compile_seconds']:.2f} s")  # fmt: skip
    full, small = result["cityscapes"], result["generated"]
    rows = []
    for name, r in full["rows"].items():
        s = small["rows"][name]
        rows.append([name, r["seconds_per_image"], r["x_median"], s["seconds_per_image"],
                     s["x_median"], r["reason"] or ""])  # fmt: skip
    headers = ["corruption", "s 1024x2048", "x median", "s 128x256", "x median", "flag"]
    print(bu.format_table(headers, rows))
    for key in ("cityscapes", "generated"):
        r = result[key]
        print(f"{key} {r['size'][1]}x{r['size'][0]}: {r['seconds_per_image_all_cells']:.2f} s "
              f"per image for the {r['cells_per_image']} cells timed; "
              f"15 x 5 protocol on 500 images: {r['projected_hours']:.2f} h "
              f"({r.get('projection', 'all 75 cells')}; corruption time only)")  # fmt: skip


def main(argv=None) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
