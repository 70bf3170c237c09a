#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Time the embedded default's training and score it: the figure behind the README's claim
"the tiny UPSNet reaches PQ >= 40 within 10 minutes on a 2-core CPU".

    python benchmarks/bench_train_tiny.py [--output-dir output/bench_train_tiny] [--keep]
    python benchmarks/bench_train_tiny.py --config-file configs/Synthetic/panoptic_fpn_tiny.yaml \
        --goal-pq 60 --output-dir output/bench_train_pfpn \
        --result benchmarks/results/train_pfpn.json

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=CONFIG, help="the training config (repo-relative)")
    parser.add_argument("--goal-pq", type=float, default=40.0, help="the claim: PQ within 10 min")
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
    match = re.findall(r"copypaste: ([\d.]+(?:,[\d.]+){8})", log)
    if not match:
        raise SystemExit("could not find the PQ line in the evaluation log")
    pq = dict(zip("PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st".split(), map(float, match[0].split(","))))
    import torch

    result = {
        "command": " ".join(["python"] + train_cmd[1:]),
        "train_minutes": round(train_s / 60, 2),
        "train_cpu_minutes": round(train_cpu_s / 60, 2),
        # other processes on the machine stretch the wall-clock time: state the load beside it
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "eval_seconds": round(eval_s, 1),
        "panoptic": pq,
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "goal": f"PQ >= {args.goal_pq:g} within 10 minutes of training",
        "goal_met": pq["PQ"] >= args.goal_pq and train_s <= 600,
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.result)), exist_ok=True)
    with open(os.path.join(ROOT, args.result), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
