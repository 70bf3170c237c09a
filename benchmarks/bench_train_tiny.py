#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Time the embedded default's training and score it: the figure behind the README's claim
"the tiny UPSNet reaches PQ >= 40 within 10 minutes on a 2-core CPU".

    python benchmarks/bench_train_tiny.py [--output-dir output/bench_train_tiny] [--keep]

Runs exactly the README command (tools/train_net.py on configs/Synthetic/upsnet_tiny.yaml, fresh
OUTPUT_DIR), measures its wall-clock time, then evaluates the final model; writes
benchmarks/results/train_tiny.json with PQ/SQ/RQ, minutes, hardware and the command.
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
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return proc.stdout + proc.stderr, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/bench_train_tiny")
    parser.add_argument("--result", default="benchmarks/results/train_tiny.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(ROOT, "datasets/synthetic_cityscapes/gtFine/cityscapes_panoptic_val.json")):
        run([sys.executable, "tools/prepare_synthetic_cityscapes.py"])
    out = args.output_dir
    if os.path.exists(os.path.join(ROOT, out)):
        raise SystemExit(f"{out} exists; remove it or pass another --output-dir (training must start fresh)")
    train_cmd = [sys.executable, "tools/train_net.py", "--config-file", CONFIG, "OUTPUT_DIR", out] + args.opts
    _, train_s = run(train_cmd)
    eval_cmd = [
        sys.executable, "tools/train_net.py", "--config-file", CONFIG, "--eval-only",
        "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out + "_eval",
    ] + args.opts
    log, eval_s = run(eval_cmd)
    match = re.findall(r"copypaste: ([\d.]+(?:,[\d.]+){8})", log)
    if not match:
        raise SystemExit("could not find the PQ line in the evaluation log")
    pq = dict(zip("PQ SQ RQ PQ_th SQ_th RQ_th PQ_st SQ_st RQ_st".split(), map(float, match[0].split(","))))
    import torch

    result = {
        "command": " ".join(["python"] + train_cmd[1:]),
        "train_minutes": round(train_s / 60, 2),
        "eval_seconds": round(eval_s, 1),
        "panoptic": pq,
        "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "goal": "PQ >= 40 within 10 minutes of training",
        "goal_met": pq["PQ"] >= 40 and train_s <= 600,
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.result)), exist_ok=True)
    with open(os.path.join(ROOT, args.result), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
