#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Seconds per image of every registered defense, at 2048x1024 (Cityscapes) and 256x128 (demo).

Each defense is built with ``build_defense(name)`` (its defaults) and timed on a uint8 BGR
image: a synthetic-Cityscapes val image (``--image synthetic``, upscaled bicubically to full
size) or scikit-image's astronaut (``--image astronaut``, resized), in two versions: as is, and
with a +-8 random-sign perturbation (a stand-in for an eps = 8 L-inf attack; adaptive
NL-means only switches on for noisy images). Repetitions are interleaved over defenses and
images; medians are reported, fewer repetitions at full size. At demo size the hook's path
(:func:`apply_defense_to_tensor` on a float32 (1, 3, H, W) tensor) is timed as well, to show
the tensor <-> numpy conversion cost.

    python benchmarks/bench_defenses.py [--quick] [--image astronaut]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "defenses"
SIZES = {"full": (1024, 2048), "demo": (128, 256)}  # (H, W)
NOISE_EPS = 8


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--image", choices=("synthetic", "astronaut"), default="synthetic")
    parser.add_argument(
        "--reps-full", type=int, default=None, help="repetitions at 2048x1024 (2; 1 with --quick)"
    )
    parser.add_argument(
        "--reps-demo", type=int, default=None, help="repetitions at 256x128 (7; 3 with --quick)"
    )
    parser.add_argument(
        "--defenses", nargs="+", default=None, help="subset of the registered defenses"
    )
    return parser


def source_image(kind: str):
    """(H, W, 3) uint8 BGR source image."""
    import cv2

    if kind == "astronaut":
        from skimage import data

        return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    from detectron2.data import DatasetCatalog

    path = DatasetCatalog.get("synthetic_cityscapes_fine_panoptic_val")[0]["file_name"]
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(path)
    return image


def make_images(kind: str, seed: int = 0):
    """{(size, variant): uint8 HWC image} for sizes full/demo and variants clean/noisy."""
    import cv2
    import numpy as np

    src = source_image(kind)
    rng = np.random.default_rng(seed)
    images = {}
    for size, (h, w) in SIZES.items():
        interp = cv2.INTER_CUBIC if h > src.shape[0] else cv2.INTER_AREA
        clean = cv2.resize(src, (w, h), interpolation=interp)
        sign = rng.integers(0, 2, size=clean.shape, dtype=np.int16) * 2 - 1
        noisy = np.clip(clean.astype(np.int16) + NOISE_EPS * sign, 0, 255).astype(np.uint8)
        images[(size, "clean")] = clean
        images[(size, "noisy")] = noisy
    return images


def _tasks(transforms, images, device):
    """Timed calls: the full-size image per (defense, variant), and at demo size both the
    numpy path and the hook's tensor path per (defense, variant, path)."""
    import torch

    from upsnet_robust.defenses import apply_defense_to_tensor

    tasks_full, tasks_demo = {}, {}
    for n, t in transforms.items():
        for variant in ("clean", "noisy"):
            full_img, demo_img = images[("full", variant)], images[("demo", variant)]
            tasks_full[(n, variant)] = lambda t=t, img=full_img: t.apply_image(img)
            tasks_demo[(n, variant, "numpy")] = lambda t=t, img=demo_img: t.apply_image(img)
            tensor = torch.from_numpy(demo_img).permute(2, 0, 1)[None].float().to(device)
            tasks_demo[(n, variant, "hook")] = lambda t=t, x=tensor: apply_defense_to_tensor(
                t, x, "BGR"
            )
    return tasks_full, tasks_demo


def _rows(names, full, demo):
    """One row per (defense, image variant): medians and the hook / numpy ratio."""
    rows = []
    for n in names:
        for variant in ("clean", "noisy"):
            hook, numpy_path = demo.wall[(n, variant, "hook")], demo.wall[(n, variant, "numpy")]
            rows.append(
                {
                    "defense": n,
                    "image": variant,
                    "full_s": bu.median(full.wall[(n, variant)]),
                    "full_cpu_s": bu.median(full.cpu[(n, variant)]),
                    "demo_s": bu.median(numpy_path),
                    "demo_hook_s": bu.median(hook),
                    "hook_over_numpy": bu.median(bu.paired_ratios(hook, numpy_path)),
                }
            )
    return rows


def _headlines(rows):
    slowest = max((r for r in rows if r["image"] == "noisy"), key=lambda r: r["full_s"])
    return [
        bu.headline(
            f"{r['defense']} s/image 2048x1024",
            r["full_s"],
            "s",
            f"noisy image; 256x128: {bu.format_value(r['demo_s'])} s",
        )
        for r in rows
        if r["image"] == "noisy"
    ] + [
        bu.headline(
            "slowest defense",
            slowest["defense"],
            "",
            f"{bu.format_value(slowest['full_s'])} s at 2048x1024",
        )
    ]


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    device = bu.prepare_run(args)
    from upsnet_robust.defenses import adaptive_nlmeans_h, build_defense, registered_defense_names

    names = args.defenses or registered_defense_names()
    reps_full = args.reps_full or (1 if args.quick else 2)
    reps_demo = args.reps_demo or (3 if args.quick else 7)
    images = make_images(args.image, args.seed)
    transforms = {n: build_defense(n) for n in names}
    tasks_full, tasks_demo = _tasks(transforms, images, device)
    demo = bu.interleaved_timings(tasks_demo, reps=reps_demo, warmup=1, device=device)
    full = bu.interleaved_timings(tasks_full, reps=reps_full, warmup=0, device=device)
    rows = _rows(names, full, demo)
    adaptive_h = {}
    if "adaptive_nlmeans" in names:
        adaptive_h = {f"{s}/{v}": adaptive_nlmeans_h(img) for (s, v), img in images.items()}
    params = {
        n: {k: v for k, v in vars(t).items() if not k.startswith("_")}
        for n, t in transforms.items()
    }
    return {
        "hardware": bu.hardware_info(device),
        "device": f"{device} (defenses run on the CPU: numpy/OpenCV)",
        "image_sizes": {k: list(v) for k, v in SIZES.items()},
        "image_source": args.image,
        "noise": f"+-{NOISE_EPS} random sign, clipped (noisy variant)",
        "batch_size": 1,
        "dtype": "uint8 BGR (numpy path); float32 (1,3,H,W) tensor (hook path)",
        "repetitions": {"full": reps_full, "demo": reps_demo},
        "quick": bool(args.quick),
        "defense_parameters": params,
        "adaptive_nlmeans_h": adaptive_h,
        "results": rows,
        "raw_seconds": {
            "full": {f"{k[0]}/{k[1]}": v for k, v in full.wall.items()},
            "demo": {"/".join(k): v for k, v in demo.wall.items()},
        },
        "headline": _headlines(rows),
    }


def print_report(result: dict) -> None:
    """Print the hardware line and a short Markdown table of ``result``."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    r = result["repetitions"]
    print(
        f"Image source {result['image_source']} ({result['dtype']}), batch 1; medians of "
        f"{r['full']} (2048x1024) / {r['demo']} (256x128) interleaved reps; noisy = {result['noise']}"
    )
    rows = [
        [x["defense"], x["image"], x["full_s"], x["demo_s"], x["demo_hook_s"], x["hook_over_numpy"]]
        for x in result["results"]
    ]
    print(
        bu.format_table(
            ["defense", "image", "s 2048x1024", "s 256x128", "s 256x128 hook path", "hook / numpy"],
            rows,
        )
    )
    if result["adaptive_nlmeans_h"]:
        print(
            "adaptive_nlmeans h per image: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["adaptive_nlmeans_h"].items())
        )


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
