#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Adversarial training against its cost: robust and clean PQ of a standard and an adversarially
trained model, and what the training costs.

1. Cost ratio, measured in one process on the same model and batches: seconds of an adversarial
   training step (crafting included) over a standard one, interleaved (``--cost-steps`` each).
2. Training: ``tools/train_net.py`` on the adversarial config (default
   ``configs/Synthetic/upsnet_tiny_adv.yaml``, which fine-tunes the shipped standard model),
   wall-clock and CPU time; skipped when ``--robust-weights`` names a trained checkpoint.
3. Evaluation of both checkpoints on the generated val split, undefended, at each eps: clean,
   PGD / SegPGD / CosPGD (``--steps`` iterations, alpha 2, semantic CE, PGD from a random start)
   and ``sea``.

Goals checked at eps 8 (issue: adversarial training): robust PQ of the trained model >= the
standard model's + 10, against ``sea`` and against the worst of PGD / SegPGD / CosPGD; clean PQ
>= the standard model's - 5.

    python benchmarks/bench_adv_train.py [--quick] [--images 10] [--eps 4 8 16]
    python benchmarks/bench_adv_train.py \
        --train-config configs/Synthetic/panoptic_fpn_tiny_adv.yaml \
        --config-file configs/Synthetic/panoptic_fpn_tiny_robustness.yaml \
        --weights checkpoints/panoptic_fpn_tiny_synthetic.pth \
        [--robust-weights checkpoints/panoptic_fpn_tiny_synthetic_adv.pth]
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attack_strength as strength  # noqa: E402
import benchutils as bu  # noqa: E402

NAME = "adv_train"
TRAIN_CONFIG = os.path.join("configs", "Synthetic", "upsnet_tiny_adv.yaml")


def get_parser():
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="val images (10; 2 --quick)")
    parser.add_argument("--eps", type=float, nargs="+", default=None, help="eps (4 8 16)")
    parser.add_argument("--steps", type=int, default=None, help="fixed-step iterations (40)")
    parser.add_argument("--sea-steps", type=int, default=None, help="ROBUSTNESS.SEA.NUM_STEPS")
    parser.add_argument("--cost-steps", type=int, default=None, help="timed steps each (5)")
    parser.add_argument("--train-config", default=TRAIN_CONFIG, help="adversarial training config")
    parser.add_argument("--train-iters", type=int, default=None, help="SOLVER.MAX_ITER override")
    parser.add_argument("--robust-weights", default="", help="a trained robust checkpoint")
    parser.add_argument("--config-file", default=bu.ROBUSTNESS_CONFIG, help="sweep config")
    parser.add_argument("--weights", default=strength.WEIGHTS, help="the standard checkpoint")
    parser.add_argument(
        "--output-dir", default=os.path.join(bu.REPO_ROOT, "output", "bench_adv_train"),
        help="training output and sweep caches (kept: a rerun resumes)",
    )  # fmt: skip
    return parser


def _cost_ratio(args, device) -> dict:
    """Median seconds of interleaved standard and adversarial training steps on one model."""
    import torch
    from detectron2.utils.events import EventStorage

    from upsnet_robust.engine import Trainer
    from upsnet_robust.engine.adversarial_training import AdversarialExamples

    cfg = bu.load_cfg(os.path.join(bu.REPO_ROOT, args.train_config), [
        "MODEL.WEIGHTS", args.weights, "OUTPUT_DIR", os.path.join(args.output_dir, "cost"),
        "DATALOADER.NUM_WORKERS", "0"], device)  # fmt: skip
    loader = iter(Trainer.build_train_loader(cfg))
    model = bu.build_model_for_bench(cfg, args.weights, seed=args.seed).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # timing only: weights stay
    examples = AdversarialExamples(cfg)
    times = {"standard": [], "adversarial": []}
    with EventStorage():
        for i in range(args.cost_steps + 1):  # the first pair warms up
            batch = next(loader)
            for kind in ("standard", "adversarial"):
                bu.synchronize(device)
                start = time.perf_counter()
                data = examples(model, batch, 10**6) if kind == "adversarial" else batch
                losses = sum(model(data).values())
                optimizer.zero_grad()
                losses.backward()
                optimizer.step()
                bu.synchronize(device)
                if i:
                    times[kind].append(time.perf_counter() - start)
    ratios = bu.paired_ratios(times["adversarial"], times["standard"])
    return {
        "standard_s_per_step": bu.median(times["standard"]),
        "adversarial_s_per_step": bu.median(times["adversarial"]),
        "ratio": bu.median(ratios),
        "attack": examples.attack,
        "eps": examples.eps,
    }


def _train(args) -> dict:
    """Run the adversarial training command; its wall-clock and CPU seconds."""
    out = os.path.join(args.output_dir, "train")
    cmd = [sys.executable, os.path.join(bu.REPO_ROOT, "tools", "train_net.py"),
           "--config-file", args.train_config, "OUTPUT_DIR", out, "TEST.EVAL_PERIOD", "0"]
    if args.train_iters:
        cmd += ["SOLVER.MAX_ITER", str(args.train_iters)]
    print("+", " ".join(cmd), flush=True)
    start, before = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, cwd=bu.REPO_ROOT, capture_output=True, text=True)
    after = os.times()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return {"weights": os.path.join(out, "model_final.pth"), "command": " ".join(cmd[1:]),
            "wall_min": (time.perf_counter() - start) / 60, "cpu_min": cpu / 60}


def _evaluate(args, device, weights, label) -> list:
    """Rows (model, attack, eps, PQ) of one checkpoint: clean, the fixed-step attacks, sea."""
    run_args = argparse.Namespace(**vars(args))
    run_args.weights = weights
    run_args.output_dir = os.path.join(args.output_dir, f"sweep_{label}")
    run_args.sea_fast_steps = run_args.sea_fast_members = None
    cfg = strength._cfg(run_args, device, "fgsm", args.eps[0], [])
    model = bu.build_model_for_bench(cfg, weights, seed=args.seed)
    cfg.defrost()
    cfg.ROBUSTNESS.ATTACKS = []
    cells, _ = strength._sweep(cfg, model, run_args)
    rows = [dict(strength._row("clean", strength._attacked(cells, "clean")), model=label)]
    for eps in args.eps:
        for name, (attack, overrides) in strength.FIXED_STEP_ATTACKS.items():
            extra = ["ROBUSTNESS.NUM_STEPS", str(args.steps), "ROBUSTNESS.INCLUDE_CLEAN", "False"]
            cfg = strength._cfg(run_args, device, attack, eps, overrides + extra)
            cells, seconds = strength._sweep(cfg, model, run_args)
            row = strength._row(f"{name}-{args.steps}", strength._attacked(cells, attack), seconds)
            rows.append(dict(row, model=label))
        cfg = strength._cfg(run_args, device, "sea", eps, ["ROBUSTNESS.INCLUDE_CLEAN", "False"])
        cells, seconds = strength._sweep(cfg, model, run_args)
        rows.append(dict(strength._row("sea", strength._attacked(cells, "sea"), seconds),
                         model=label))
    return rows


def _goals(rows) -> dict:
    """Per eps: sea and worst fixed-step PQ of both models and the goal booleans (eps 8)."""
    def pq(model, pick, eps=None):
        values = [r["PQ"] for r in rows if r["model"] == model and pick(r)
                  and (eps is None or r["eps"] == eps)]
        return min(values) if values else None

    out = {}
    for eps in sorted({r["eps"] for r in rows if r["name"] != "clean"}):
        g = {}
        for model in ("standard", "robust"):
            g[f"{model}_sea"] = pq(model, lambda r: r["name"] == "sea", eps)
            g[f"{model}_worst_fixed"] = pq(
                model, lambda r: r["name"].split("-")[0] in strength.FIXED_STEP_ATTACKS, eps)
        if None not in g.values():
            g["sea_gain"] = g["robust_sea"] - g["standard_sea"]
            g["fixed_gain"] = g["robust_worst_fixed"] - g["standard_worst_fixed"]
        out[f"{eps:g}"] = g
    clean = {m: pq(m, lambda r: r["name"] == "clean") for m in ("standard", "robust")}
    goal8 = out.get("8", {})
    out["clean"] = clean
    out["goal_eps8"] = {
        "sea_gain_ge_10": goal8.get("sea_gain") is not None and goal8["sea_gain"] >= 10,
        "fixed_gain_ge_10": goal8.get("fixed_gain") is not None and goal8["fixed_gain"] >= 10,
        "clean_drop_le_5": None not in clean.values() and clean["robust"] >= clean["standard"] - 5,
    }
    return out


def run(args) -> dict:
    device = bu.prepare_run(args)
    args.images = args.images or (2 if args.quick else 10)
    args.steps = args.steps or (4 if args.quick else 40)
    args.cost_steps = args.cost_steps or (1 if args.quick else 5)
    args.eps = args.eps or ([8.0] if args.quick else [4.0, 8.0, 16.0])
    if args.quick:
        args.sea_steps = args.sea_steps or 4
        args.train_iters = args.train_iters or 2
    cost = _cost_ratio(args, device)
    training = None
    robust = args.robust_weights
    if not robust:
        training = _train(args)
        robust = training["weights"]
    rows = _evaluate(args, device, args.weights, "standard") + _evaluate(
        args, device, robust, "robust")
    goals = _goals(rows)
    return {
        "hardware": bu.hardware_info(device),
        "device": device,
        "images": args.images,
        "steps": args.steps,
        "train_config": args.train_config,
        "standard_weights": os.path.relpath(args.weights, bu.REPO_ROOT),
        "robust_weights": robust,
        "cost": cost,
        "training": training,
        "rows": rows,
        "goals": goals,
        "headline": [
            bu.headline("adversarial / standard step time", cost["ratio"], "x"),
            bu.headline("robust PQ gain under sea, eps 8",
                        goals.get("8", {}).get("sea_gain"), "PQ"),
        ],
    }


def print_report(result: dict) -> None:
    print(f"{result['images']} images, {bu.hardware_line(result['hardware'])}")
    c = result["cost"]
    print(f"step time: standard {c['standard_s_per_step']:.2f} s, adversarial "
          f"{c['adversarial_s_per_step']:.2f} s ({c['attack']} eps {c['eps']:g}): "
          f"x{c['ratio']:.2f}")
    if result["training"]:
        t = result["training"]
        print(f"adversarial training: {t['wall_min']:.1f} min wall, {t['cpu_min']:.1f} CPU-min")
    rows = [(r["model"], r["name"], r["eps"], r["PQ"]) for r in result["rows"]]
    print(bu.format_table(("model", "attack", "eps", "PQ"), rows))
    for key, goal in result["goals"].items():
        print(f"{key}: " + ", ".join(f"{k} {bu.format_value(v)}" for k, v in goal.items()))


def main(argv=None):
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
