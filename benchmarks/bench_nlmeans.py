#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Seconds per image of OpenCV's colored NL-means vs the torch re-implementation, and how close
they are, at 128x256 and 1024x2048 (Cityscapes).

``cv2.fastNlMeansDenoisingColored(img, None, 10, 10, 7, 21)`` vs
:func:`upsnet_robust.defenses.torch_nlmeans.nlmeans_torch` (batch 1 and 4, no autograd) on
noisy photographs (scikit-image's astronaut resized, plus Gaussian noise sigma 8; a synthetic
image when scikit-image is missing). Accuracy: max / mean abs difference and PSNR of the torch
output (``quantize=True``, the default, and the smooth ``quantize=False`` relaxation at
128x256) to OpenCV's. Also timed: forward + backward of the torch version (the cost of one
adaptive-attack gradient) at 128x256, and at 1024x2048 on CUDA.

Threads: both libraries run with ``--threads`` threads, **1 by default** (``--threads 0``:
torch's and OpenCV's defaults). On a shared, busy CPU torch's OpenMP kernels degrade badly with
more than one thread (many short parallel regions, each waiting for a descheduled thread),
while OpenCV's row-parallel loop does not, so a single thread is the fair, stable comparison.
On CPU, repetitions are few (1 at 1024x2048) and batch 4 at 1024x2048 is skipped with
``--quick`` or when it would exceed ``--budget-s``; the CUDA timings synchronise and use more
repetitions.

    python benchmarks/bench_nlmeans.py [--quick] [--device cuda] [--output PATH]
"""

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "nlmeans"
SIZES = {"demo": (128, 256), "full": (1024, 2048)}  # (H, W)
PARAMS = dict(h=10.0, h_color=10.0, template_window=7, search_window=21)
NOISE_SIGMA = 8.0


def get_parser():
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(threads=1)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=110.0,
        help="skip the optional CPU runs (batch 4 at full size, gradients) that "
        "would push the total past this many seconds",
    )
    return parser


def source_image():
    """(H, W, 3) uint8 BGR photograph (or a synthetic stand-in)."""
    import cv2
    import numpy as np

    try:
        from skimage import data

        return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    except ImportError:  # pragma: no cover
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:512, 0:512]
        img = np.stack(
            [128 + 80 * np.sin(xx / (20 + 10 * c)) * np.cos(yy / 30) for c in range(3)], -1
        )
        img += cv2.GaussianBlur(rng.uniform(-60, 60, (512, 512, 3)), (0, 0), 6)
        return np.clip(img, 0, 255).astype(np.uint8)


def make_batch(size, n, seed=0):
    """n noisy BGR uint8 images of ``size`` (different noise draws)."""
    import cv2
    import numpy as np

    h, w = size
    base = cv2.resize(source_image(), (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    rng = np.random.default_rng(seed)
    return [
        np.clip(np.rint(base + rng.normal(0, NOISE_SIGMA, base.shape)), 0, 255).astype(np.uint8)
        for _ in range(n)
    ]


def accuracy(out, ref):
    """max / mean abs diff, PSNR (dB; None when identical) and identical flag."""
    import numpy as np

    d = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    mse = float((d**2).mean())
    return {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "psnr_db": None if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "identical": bool(mse == 0),
    }


class _Context:
    """Settings shared by the measurements: device, options and the benchmark's clock."""

    def __init__(self, args, device):
        self.args, self.device, self.cuda = args, device, device == "cuda"
        self.start = time.perf_counter()
        self.skipped = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def to_tensor(self, imgs):
        import numpy as np
        import torch

        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().to(self.device)


def _to_numpy(x):
    return x.detach().cpu().permute(0, 2, 3, 1).numpy()


def _time_batches(ctx, full, imgs, x1, x4):
    """Interleaved OpenCV / torch batch 1 (/ batch 4) timings; medians and first outputs."""
    import cv2
    import torch

    from upsnet_robust.defenses.torch_nlmeans import nlmeans_torch

    outputs = {}

    def keep(name, rep, value):
        if rep == 0:
            outputs[name] = value

    tasks = {
        "opencv_b1": lambda: cv2.fastNlMeansDenoisingColored(imgs[0], None, 10, 10, 7, 21),
        "torch_b1": lambda: nlmeans_torch(x1, **PARAMS),
    }
    if ctx.cuda or not full:
        tasks["torch_b4"] = lambda: nlmeans_torch(x4, **PARAMS)
    if ctx.cuda:
        reps, warmup = (3, 1) if ctx.args.quick else (10, 2)
    else:
        reps, warmup = (1 if (ctx.args.quick or full) else 3), (0 if full else 1)
    with torch.no_grad():
        timings = bu.interleaved_timings(
            tasks, reps=reps, warmup=warmup, device=ctx.device, on_result=keep
        )
    wall = {k: bu.median(v) for k, v in timings.wall.items()}
    cpu = {k: bu.median(v) for k, v in timings.cpu.items()}
    return wall, cpu, outputs, reps


def _full_size_batch4(ctx, size, x4, wall, cpu):
    """Batch 4 at full size on the CPU, once, only when it fits the time budget."""
    import torch

    from upsnet_robust.defenses.torch_nlmeans import nlmeans_torch

    estimate = 1.3 * 4 * wall["torch_b1"]
    if ctx.args.quick or ctx.elapsed() + estimate > ctx.args.budget_s:
        ctx.skipped.append(f"torch batch 4 at {size[1]}x{size[0]} (estimated {estimate:.0f} s)")
        return
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        nlmeans_torch(x4, **PARAMS)
    wall["torch_b4"], cpu["torch_b4"] = time.perf_counter() - t0, time.process_time() - c0


def _accuracies(entry, full, imgs, x1, outputs):
    """The torch outputs against OpenCV's (batch 1, batch 4, and the smooth relaxation)."""
    import cv2
    import torch

    from upsnet_robust.defenses.torch_nlmeans import nlmeans_torch

    ref = outputs["opencv_b1"]
    entry["accuracy_quantize"] = accuracy(_to_numpy(outputs["torch_b1"])[0], ref)
    if "torch_b4" in outputs and not full:
        b4 = _to_numpy(outputs["torch_b4"])
        refs = [cv2.fastNlMeansDenoisingColored(im, None, 10, 10, 7, 21) for im in imgs]
        entry["accuracy_quantize_b4_max_abs_diff"] = max(
            accuracy(b4[i], refs[i])["max_abs_diff"] for i in range(4)
        )
    if not full:
        with torch.no_grad():
            smooth = nlmeans_torch(x1, quantize=False, **PARAMS)
        entry["accuracy_smooth"] = accuracy(_to_numpy(smooth)[0], ref)


def _gradient_timing(ctx, entry, size, x1, wall):
    """Forward + backward (one attack gradient, quantize=True: straight-through)."""
    import torch

    from upsnet_robust.defenses.torch_nlmeans import nlmeans_torch

    est = 15 * wall["torch_b1"]
    if not (ctx.cuda or (not ctx.args.quick and ctx.elapsed() + est <= ctx.args.budget_s)):
        ctx.skipped.append(f"gradient timing at {size[1]}x{size[0]}")
        return
    xg = x1.clone().requires_grad_(True)
    gwall = []
    for _ in range(2 if ctx.cuda else 1):
        xg.grad = None
        bu.synchronize(ctx.device)
        t0 = time.perf_counter()
        out = nlmeans_torch(xg, **PARAMS)
        out.float().mean().backward()
        bu.synchronize(ctx.device)
        gwall.append(time.perf_counter() - t0)
    entry["grad_seconds_per_image"] = min(gwall)
    entry["grad_finite"] = bool(torch.isfinite(xg.grad).all())
    if ctx.cuda:
        entry["grad_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30


def _measure_size(ctx, key, size):
    """Everything measured at one size: the result entry and its table row."""
    full = key == "full"
    imgs = make_batch(size, 4, seed=ctx.args.seed)
    x1, x4 = ctx.to_tensor(imgs[:1]), ctx.to_tensor(imgs)
    wall, cpu, outputs, reps = _time_batches(ctx, full, imgs, x1, x4)
    if full and not ctx.cuda:
        _full_size_batch4(ctx, size, x4, wall, cpu)
    per_image = {
        "opencv_b1": wall["opencv_b1"],
        "torch_b1": wall["torch_b1"],
        "torch_b4": wall["torch_b4"] / 4 if "torch_b4" in wall else None,
    }
    entry = {
        "height": size[0],
        "width": size[1],
        "reps": reps,
        "seconds_per_image": per_image,
        "cpu_seconds_per_image": {
            "opencv_b1": cpu["opencv_b1"],
            "torch_b1": cpu["torch_b1"],
            "torch_b4": cpu["torch_b4"] / 4 if "torch_b4" in cpu else None,
        },
        "torch_over_opencv_b1": bu.ratio(per_image["torch_b1"], per_image["opencv_b1"]),
    }
    _accuracies(entry, full, imgs, x1, outputs)
    if (not full) or ctx.cuda:
        _gradient_timing(ctx, entry, size, x1, wall)
    acc = entry["accuracy_quantize"]
    row = [
        f"{size[1]}x{size[0]}",
        per_image["opencv_b1"],
        per_image["torch_b1"],
        per_image["torch_b4"],
        entry.get("grad_seconds_per_image"),
        acc["max_abs_diff"],
        acc["mean_abs_diff"],
        "inf" if acc["psnr_db"] is None else acc["psnr_db"],
    ]
    return entry, row


HEADERS = [
    "size (WxH)",
    "OpenCV s/img",
    "torch b1 s/img",
    "torch b4 s/img",
    "torch fwd+bwd s/img",
    "max abs diff",
    "mean abs diff",
    "PSNR dB",
]


def _headlines(results, device, threads):
    demo = results["sizes"]["256x128"]
    full_entry = results["sizes"]["2048x1024"]
    where = f"{device}, {threads} thread(s)"
    return [
        bu.headline(
            "torch/OpenCV s per image, 2048x1024, batch 1",
            full_entry["torch_over_opencv_b1"],
            "x",
            where,
        ),
        bu.headline(
            "torch/OpenCV s per image, 256x128, batch 1", demo["torch_over_opencv_b1"], "x", where
        ),
        bu.headline(
            "torch vs OpenCV max abs diff (2048x1024)",
            full_entry["accuracy_quantize"]["max_abs_diff"],
            "grey levels",
            "quantize=True",
        ),
        bu.headline(
            "smooth relaxation vs OpenCV PSNR (256x128)",
            demo["accuracy_smooth"]["psnr_db"],
            "dB",
            "quantize=False",
        ),
    ]


def main(argv=None):
    args = get_parser().parse_args(argv)
    import cv2

    device = bu.resolve_device(args.device)
    ctx = _Context(args, device)
    threads = bu.apply_threads(args.threads)
    if args.threads and args.threads > 0:
        cv2.setNumThreads(int(args.threads))
    info = bu.hardware_info(device)
    results = {"sizes": {}, "skipped": ctx.skipped}
    rows = []
    for key, size in SIZES.items():
        entry, row = _measure_size(ctx, key, size)
        results["sizes"][f"{size[1]}x{size[0]}"] = entry
        rows.append(row)
    table = bu.format_table(HEADERS, rows)
    payload = {
        "hardware": info,
        "threads": threads,
        "device": device,
        "quick": bool(args.quick),
        "params": PARAMS,
        "noise_sigma": NOISE_SIGMA,
        "results": results,
        "table": table,
        "runtime_s": ctx.elapsed(),
        "headline": _headlines(results, device, threads),
    }
    path = bu.write_result(NAME, payload, args.output)
    print(bu.hardware_line(info))
    print(table)
    s = results["sizes"]["256x128"]["accuracy_smooth"]
    print(
        f"smooth relaxation (quantize=False) at 256x128: max {s['max_abs_diff']:.2f}, "
        f"mean {s['mean_abs_diff']:.3f}, PSNR {s['psnr_db']:.1f} dB"
    )
    for item in results["skipped"]:
        print(f"skipped: {item}")
    print(f"total {ctx.elapsed():.0f} s; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
