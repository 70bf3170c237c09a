#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Time the embedded default's training and score it: the figure behind the README's claim
"the tiny UPSNet reaches PQ >= 40 within 10 minutes on a 2-core CPU".

    python benchmarks/bench_train_tiny.py [--output-dir output/bench_train_tiny] [--keep]
    python benchmarks/bench_train_tiny.py --config-file configs/Synthetic/panoptic_fpn_tiny.yaml \
        --goal-pq 60 --output-dir output/bench_train_pfpn \
        --result benchmarks/results/train_pfpn.json
    python benchmarks/bench_train_tiny.py --config-file configs/Synthetic/segformer_tiny.yaml \
        --goal-miou 80 --minutes 20 --output-dir output/bench_train_segformer \
        --result benchmarks/results/train_segformer.json

Runs exactly the README command (tools/train_net.py on the config, default
configs/Synthetic/upsnet_tiny.yaml, fresh OUTPUT_DIR), measures its wall-clock and CPU time and
the machine's load, then evaluates the final model; writes the result JSON (default
benchmarks/results/train_tiny.json) with PQ/SQ/RQ, minutes, hardware and the command.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/Synthetic/upsnet_tiny.yaml"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    start, before = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed, after = time.perf_counter() - start, os.times()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    cpu_s = after.children_user - before.children_user + after.children_system - before.children_system
    return proc.stdout + proc.stderr, elapsed, cpu_s


def _scores(log: str) -> dict:
    """detectron2's copypaste lines of an evaluation log: ``panoptic`` (PQ, SQ, RQ and their
    things / stuff splits) and ``semantic`` (mIoU, fwIoU, mACC, pACC), those present."""
    out = {}
    pq = re.findall(r"copypaste: ([\d.]+(?:,[\d.]+){8})$", log, re.M)
    if pq:
        names = "PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st".split()
        out["panoptic"] = dict(zip(names, map(float, pq[0].split(","))))
    sem = re.findall(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*?copypaste: ([\d.]+(?:,[\d.]+){3})$",
                     log, re.M)  # fmt: skip
    if sem:
        out["semantic"] = dict(zip(("mIoU", "fwIoU", "mACC", "pACC"), map(float, sem[0].split(","))))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=CONFIG, help="the training config (repo-relative)")
    parser.add_argument("--goal-pq", type=float, default=40.0, help="the claim: PQ within 10 min")
    parser.add_argument("--goal-miou", type=float, default=None,
                        help="a semantic model's claim instead: mIoU within --minutes")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=10.0, help="the claim's training time")
    parser.add_argument("--output-dir", default="output/bench_train_tiny")
    parser.add_argument("--result", default="benchmarks/results/train_tiny.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(ROOT, "datasets/synthetic_cityscapes/gtFine/cityscapes_panoptic_val.json")):
        run([sys.executable, "tools/prepare_synthetic_cityscapes.py"])
    out = args.output_dir
    if os.path.exists(os.path.join(ROOT, out)):
        raise SystemExit(f"{out} exists; remove it or pass another --output-dir (training must start fresh)")
    load_before = os.getloadavg()
    train_cmd = [sys.executable, "tools/train_net.py", "--config-file", args.config_file]
    train_cmd += ["OUTPUT_DIR", out] + args.opts
    _, train_s, train_cpu_s = run(train_cmd)
    load_after = os.getloadavg()
    eval_cmd = [
        sys.executable, "tools/train_net.py", "--config-file", args.config_file, "--eval-only",
        "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out + "_eval",
    ] + args.opts
    log, eval_s, _ = run(eval_cmd)
    scores = _scores(log)
    metric, goal = ("mIoU", args.goal_miou) if args.goal_miou is not None else ("PQ", args.goal_pq)
    section = "semantic" if metric == "mIoU" else "panoptic"
    if section not in scores:
        raise SystemExit(f"could not find the {metric} line in the evaluation log")
    import torch

    result = {
        "command": " ".join(["python"] + train_cmd[1:]),
        "train_minutes": round(train_s / 60, 2),
        "train_cpu_minutes": round(train_cpu_s / 60, 2),
        # other processes on the machine stretch the wall-clock time: state the load beside it
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "eval_seconds": round(eval_s, 1),
        **scores,
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "goal": f"{metric} >= {goal:g} within {args.minutes:g} minutes of training",
        "goal_met": scores[section][metric] >= goal and train_s <= 60 * args.minutes,
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.result)), exist_ok=True)
    with open(os.path.join(ROOT, args.result), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
