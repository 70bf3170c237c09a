#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""What the fast paths buy: batched attacks, defense worker processes, mixed precision and
channels-last, each against the plain path in the same run (interleaved repetitions).

* batched attack: the hook's I-FGSM (``train_losses``, the study's objective) on N val images
  with ``batch_size`` 1 vs B (one model run per step for B images, per-image eps-balls);
  seconds per image and the speed-up, plus how many adversarial pixels agree with batch 1;
* defense workers: a clean pass with none + NL-means on N images (one batch), defenses in the
  main process vs in W spawned workers overlapping the model's inference; at the demo size and
  at Cityscapes size (the val images upsampled to 1024x2048);
* AMP (bfloat16 autocast) and channels-last for the batched attack: CUDA only (on the CPU they
  are not fast paths; the benchmark says "skipped").

    python benchmarks/bench_fast_paths.py [--quick] [--device cuda] [--batch-size 4]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "fast_paths"
SHIPPED = os.path.join(bu.REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, default=4.0, help="I-FGSM budget, 0-255 units")
    parser.add_argument("--batch-size", type=int, default=4, help="B of the batched attack")
    parser.add_argument("--num-images", type=int, default=None, help="N (default: 2 x B)")
    parser.add_argument("--workers", type=int, default=2, help="defense worker processes")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (5; 2 quick)")
    parser.add_argument(
        "--weights", default=SHIPPED, help="checkpoint (default: the shipped tiny model)"
    )
    return parser


def _hook(model, cfg, **kwargs):
    from collections import OrderedDict

    from upsnet_robust.evaluation import AdversarialInference

    kwargs.setdefault("defenses", OrderedDict(none=None))
    return AdversarialInference(  # as the sweep builds it (PQ-only inference)
        model, objective="train_losses", input_format=cfg.INPUT.FORMAT, seed=0,
        panoptic_only=True, **kwargs
    )


def _call(hook, inputs):
    import torch

    hook.records.clear()
    with torch.no_grad():  # inference_on_dataset's context
        hook(inputs)
    return [dict(r) for r in hook.records]


def _capture():
    store = {}

    def on_image(x, clean, adv, defended, outputs):
        store[x["image_id"]] = adv.detach().cpu()

    return store, on_image


def bench_batched_attack(model, cfg, inputs, args, reps, device) -> dict:
    """Batch 1 vs batch B (and, on CUDA, B with AMP / channels-last)."""
    import torch

    from upsnet_robust.attacks import build_attack

    b = args.batch_size
    variants = {"batch 1": dict(batch_size=1), f"batch {b}": dict(batch_size=b)}
    if device == "cuda":
        variants[f"batch {b} + AMP bf16"] = dict(batch_size=b, amp_dtype=torch.bfloat16)
    captured, hooks = {}, {}
    for name, kw in variants.items():
        store, on_image = _capture()
        captured[name] = store
        hooks[name] = _hook(model, cfg, attack=build_attack(cfg, "ifgsm", args.eps), on_image=on_image, **kw)
    tasks = {name: (lambda h=h: _call(h, inputs)) for name, h in hooks.items()}
    timings = bu.interleaved_timings(tasks, reps=reps, warmup=1, device=device)
    if device == "cuda":  # channels-last changes the model itself: timed after the others
        model.to(memory_format=torch.channels_last)
        name = f"batch {b} + channels-last"
        store, on_image = _capture()
        captured[name] = store
        h = _hook(model, cfg, attack=build_attack(cfg, "ifgsm", args.eps), batch_size=b, on_image=on_image)
        extra = bu.interleaved_timings({name: lambda: _call(h, inputs), "batch 1 (again)": tasks["batch 1"]},
                                       reps=reps, warmup=1, device=device)
        model.to(memory_format=torch.contiguous_format)
        timings.wall[name] = [
            w * base / again
            for w, base, again in zip(extra.wall[name], timings.wall["batch 1"], extra.wall["batch 1 (again)"])
        ]  # rescaled to the first block's batch-1 time (ratios stay per repetition)
    n = len(inputs)
    base = timings.wall["batch 1"]
    rows = []
    for name in captured:
        agree = [
            float((captured[name][k] == captured["batch 1"][k]).float().mean()) for k in captured["batch 1"]
        ]
        rows.append(
            {
                "variant": name,
                "s_per_image": bu.median(timings.wall[name]) / n,
                "speedup_vs_batch1": bu.median(bu.paired_ratios(base, timings.wall[name])),
                "pixels_equal_to_batch1": min(agree),
            }
        )
    return {"num_images": n, "eps": args.eps, "rows": rows, "raw_wall": timings.wall}


def _upsampled(inputs, height, width):
    import torch.nn.functional as F

    out = []
    for x in inputs:
        image = F.interpolate(x["image"][None].float(), size=(height, width), mode="bilinear", align_corners=False)
        out.append({"image": image[0].round().clamp(0, 255), "image_id": f"{x['image_id']}@{height}", "height": height, "width": width})
    return out


def bench_defense_workers(model, cfg, inputs, args, reps, device) -> dict:
    """Clean pass, none + nlmeans: defenses in the main process vs in worker processes."""
    from collections import OrderedDict

    from upsnet_robust.defenses import build_defense_from_cfg
    from upsnet_robust.defenses.workers import DefenseWorkers

    defenses = OrderedDict(none=None, nlmeans=build_defense_from_cfg(cfg, "nlmeans"))
    sizes = {"demo": None, "1024x2048": (1024, 2048)}
    results = []
    with DefenseWorkers(args.workers) as workers:
        for label, size in sizes.items():
            batch = inputs if size is None else _upsampled(inputs[:2], *size)
            local = _hook(model, cfg, attack=None, defenses=defenses, batch_size=len(batch))
            pooled = _hook(model, cfg, attack=None, defenses=defenses, batch_size=len(batch), defense_workers=workers)
            records = {}
            tasks = {"in-process": lambda: _call(local, batch), f"{args.workers} workers": lambda: _call(pooled, batch)}
            timings = bu.interleaved_timings(
                tasks, reps=reps, warmup=1, device=device,
                on_result=lambda name, rep, value: records.setdefault(name, value),
            )
            h, w = batch[0]["image"].shape[-2:]
            n = len(batch)
            results.append(
                {
                    "size": f"{int(h)}x{int(w)}",
                    "num_images": n,
                    "in_process_s_per_image": bu.median(timings.wall["in-process"]) / n,
                    "workers_s_per_image": bu.median(timings.wall[f"{args.workers} workers"]) / n,
                    "nlmeans_s_per_image": bu.median(r["defense_s"]["nlmeans"] for r in records["in-process"]),
                    "speedup": bu.median(bu.paired_ratios(timings.wall["in-process"], timings.wall[f"{args.workers} workers"])),
                }
            )
    return {"workers": args.workers, "rows": results}


def run(args) -> dict:
    """Run the benchmark; returns the JSON-serialisable result."""
    bu.ensure_synthetic_data()
    device = bu.resolve_device(args.device)
    import torch

    torch.set_flush_denormal(True)
    threads = bu.apply_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    weights = args.weights if args.weights and os.path.isfile(args.weights) else ""
    cfg = bu.load_cfg(bu.ROBUSTNESS_CONFIG, ["MODEL.WEIGHTS", weights], device)
    model = bu.build_model_for_bench(cfg, weights or None, seed=args.seed)
    n = args.num_images or 2 * args.batch_size
    inputs = bu.val_inputs(cfg, n)
    attack = bench_batched_attack(model, cfg, inputs, args, reps, device)
    defense = bench_defense_workers(model, cfg, inputs, args, reps, device)
    h, w = inputs[0]["image"].shape[-2:]
    batched = next(r for r in attack["rows"] if r["variant"] == f"batch {args.batch_size}")
    headline = [
        bu.headline(
            f"batched attack speed-up (B={args.batch_size})",
            batched["speedup_vs_batch1"],
            "x",
            f"I-FGSM eps {args.eps:g}, {n} images {int(h)}x{int(w)}; {batched['pixels_equal_to_batch1']:.3f} "
            "of adversarial pixels equal to batch 1",
        )
    ]
    for row in defense["rows"]:
        headline.append(
            bu.headline(
                f"defense workers speed-up ({row['size']})",
                row["speedup"],
                "x",
                f"clean pass none+nlmeans, {row['num_images']} images, {args.workers} workers; "
                f"NL-means {bu.format_value(row['nlmeans_s_per_image'])} s/img",
            )
        )
    return {
        "hardware": bu.hardware_info(device),
        "device": device,
        "threads": threads,
        "image_size": [int(h), int(w)],
        "weights": weights or f"untrained (torch.manual_seed({args.seed}))",
        "repetitions": reps,
        "batched_attack": attack,
        "defense_workers": defense,
        "amp_channels_last": "measured (rows of batched_attack)" if device == "cuda" else "skipped: GPU options",
        "headline": headline,
    }


def print_report(result: dict) -> None:
    """Print the hardware line and the two tables."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    a = result["batched_attack"]
    print(f"Batched I-FGSM eps {a['eps']:g} on {a['num_images']} images {result['image_size']} ({result['repetitions']} reps):")
    print(
        bu.format_table(
            ["variant", "s / image", "speed-up vs batch 1", "adv. pixels equal to batch 1"],
            [[r["variant"], r["s_per_image"], r["speedup_vs_batch1"], r["pixels_equal_to_batch1"]] for r in a["rows"]],
        )
    )
    d = result["defense_workers"]
    print(f"Clean pass none + NL-means, defenses in the main process vs {d['workers']} worker processes:")
    print(
        bu.format_table(
            ["size", "images", "in-process s / image", "workers s / image", "NL-means s / image", "speed-up"],
            [[r["size"], r["num_images"], r["in_process_s_per_image"], r["workers_s_per_image"], r["nlmeans_s_per_image"], r["speedup"]] for r in d["rows"]],
        )
    )
    print(f"AMP / channels-last: {result['amp_channels_last']}")


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
