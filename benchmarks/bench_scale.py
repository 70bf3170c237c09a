#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Sweep throughput with 1 versus 2 processes (``tools/attack_net.py --num-gpus N``).

Each run is a subprocess of the real tool, in a fresh OUTPUT_DIR, on a small sweep (clean +
I-FGSM at one eps, defenses none + nlmeans, ``--images`` val images, an untrained tiny UPSNet
checkpoint unless ``--weights``). On the CPU the N processes talk over gloo (detectron2's
``launch``). So that N processes do not oversubscribe the cores, each gets
``OMP_NUM_THREADS = MKL_NUM_THREADS = OPENCV_FOR_THREADS_NUM = max(1, cores // N)`` (torch and
OpenCV thread pools); the data loader runs in the main process (``DATALOADER.NUM_WORKERS 0``).
Runs alternate between N = 1 and N = 2; medians are reported.

Also from the log: the summed PQ evaluations (panopticapi's ``pq_compute`` runs a process pool;
inside ``launch``'s spawned ranks that pool uses the "spawn" start method, so every call
re-imports the tool in fresh interpreters). Two figures per N: end-to-end (subprocess wall clock, including interpreter start, imports,
model build and report writing) and the sweep phase (from the first pass's "running" line to
"Report written" in OUTPUT_DIR/log.txt, 1 s timestamp resolution). The two runs' cells must
agree (sharding must not change results).

    python benchmarks/bench_scale.py [--quick] [--device cuda] [--images 8]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "scale"
ATTACK_NET = os.path.join(bu.REPO_ROOT, "tools", "attack_net.py")


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="val images (8; 4 with --quick)")
    parser.add_argument("--eps", type=float, default=2.0, help="I-FGSM eps (T by Kurakin's rule)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts")
    parser.add_argument(
        "--reps", type=int, default=None, help="runs per process count (2; 1 with --quick)"
    )
    parser.add_argument("--weights", default="", help="checkpoint (default: untrained, seeded)")
    return parser


def thread_env(processes: int, cores: int = None) -> dict:
    """Thread-pool variables giving each of ``processes`` processes its share of the cores."""
    cores = cores or os.cpu_count() or 1
    n = str(max(1, cores // processes))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENCV_FOR_THREADS_NUM": n}


def log_timings(log_path: str) -> dict:
    """From OUTPUT_DIR/log.txt (rank 0): the sweep phase (first pass "running" to "Report
    written") and the summed PQ evaluations ("Writing all panoptic predictions" to "Panoptic
    Evaluation Results", once per defense per pass); 1 s resolution, None if missing."""
    if not os.path.isfile(log_path):
        return {"sweep_phase_s": None, "pq_eval_s": None}
    with open(log_path, errors="replace") as f:
        lines = f.readlines()
    spans = bu.parse_log_spans(
        lines, r"Writing all panoptic predictions", r"Panoptic Evaluation Results"
    )
    return {
        "sweep_phase_s": bu.parse_log_times(lines, r"\[1/\d+\] .*: running", r"Report written"),
        "pq_eval_s": sum(spans) if spans else None,
        "pq_eval_calls": len(spans),
    }


def run_sweep(
    processes: int, weights: str, opts, device: str, python: str = sys.executable
) -> dict:
    """One ``tools/attack_net.py`` run in a fresh OUTPUT_DIR; returns timings and cells."""
    out_dir = tempfile.mkdtemp(prefix=f"bench_scale_n{processes}_")
    env = dict(os.environ, **thread_env(processes))
    cmd = [
        python,
        ATTACK_NET,
        "--config-file",
        bu.ROBUSTNESS_CONFIG,
        "--num-gpus",
        str(processes),
        "--dist-url",
        "auto",
        "MODEL.WEIGHTS",
        weights,
        "MODEL.DEVICE",
        device,
        *opts,
        "OUTPUT_DIR",
        out_dir,
    ]
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=bu.REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(
                f"attack_net.py --num-gpus {processes} failed ({proc.returncode}):\n"
                + proc.stdout[-2000:]
                + proc.stderr[-3000:]
            )
        with open(os.path.join(out_dir, "robustness.json")) as f:
            cells = json.load(f)["cells"]
        logged = log_timings(os.path.join(out_dir, "log.txt"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    scores = sorted((c["attack"], c["eps"], c["defense"], c["PQ"], c["num_images"]) for c in cells)
    return {
        "processes": processes,
        "wall_s": wall,
        **logged,
        "scores": scores,
        "env": thread_env(processes),
    }


def _sweep_opts(args, images: int) -> list:
    return [
        "ROBUSTNESS.ATTACKS", "['ifgsm']",
        "ROBUSTNESS.EPSILONS", f"[{args.eps}]",
        "ROBUSTNESS.DEFENSES", "['none', 'nlmeans']",
        "ROBUSTNESS.MAX_IMAGES", str(images),
        "ROBUSTNESS.NUM_EXAMPLES", "0",
        "ROBUSTNESS.SEED", str(args.seed),
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip


def _process_counts(args, device):
    """The process counts that can run here (on CUDA one GPU per process) and those skipped."""
    import torch

    counts = list(args.processes)
    skipped = []
    if device == "cuda":
        skipped = [n for n in counts if n > torch.cuda.device_count()]
        counts = [n for n in counts if n not in skipped]
        for n in skipped:
            print(f"  skipping {n} processes: only {torch.cuda.device_count()} GPU(s)")
    if not counts:
        raise SystemExit("no process count can run on this machine")
    return counts, skipped


def _run_all(args, device, counts, images):
    """Every (repetition, process count) sweep, alternating the order; and the image size."""
    import torch

    tmp = tempfile.mkdtemp(prefix="bench_scale_weights_")
    try:
        weights = args.weights
        cfg = bu.load_cfg(bu.ROBUSTNESS_CONFIG, ["MODEL.WEIGHTS", ""], "cpu")
        from detectron2.data import DatasetCatalog
        from PIL import Image

        with Image.open(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]) as im:
            image_size = [im.height, im.width]
        if not weights:
            model = bu.build_model_for_bench(cfg, None, seed=args.seed)
            weights = os.path.join(tmp, "untrained.pth")
            torch.save({"model": model.state_dict()}, weights)
        runs = []
        for r in range(args.reps or (1 if args.quick else 2)):
            for n in counts if r % 2 == 0 else list(reversed(counts)):
                runs.append(run_sweep(n, weights, _sweep_opts(args, images), device))
                print(f"  {n} process(es): {runs[-1]['wall_s']:.1f} s end-to-end", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs, image_size


def _rows(counts, runs, images):
    """Medians per process count, and speedups against the first count."""
    rows = []
    for n in counts:
        mine = [x for x in runs if x["processes"] == n]
        wall = bu.median([x["wall_s"] for x in mine])
        phases = [x["sweep_phase_s"] for x in mine if x["sweep_phase_s"] is not None]
        phase = bu.median(phases) if phases else None
        evals = [x["pq_eval_s"] for x in mine if x.get("pq_eval_s") is not None]
        rows.append(
            {
                "processes": n,
                "threads_per_process": int(mine[0]["env"]["OMP_NUM_THREADS"]),
                "wall_s": wall,
                "images_per_s": images / wall,
                "sweep_phase_s": phase,
                "images_per_s_sweep_phase": images / phase if phase else None,
                "pq_eval_s": bu.median(evals) if evals else None,
                "pq_eval_calls": mine[0].get("pq_eval_calls"),
            }
        )
    base = rows[0]
    for row in rows:
        row["speedup"] = bu.ratio(base["wall_s"], row["wall_s"])
        row["speedup_sweep_phase"] = (
            bu.ratio(base["sweep_phase_s"], row["sweep_phase_s"])
            if base["sweep_phase_s"] and row["sweep_phase_s"]
            else None
        )
    return rows


def _headlines(rows, images, passes, cells_equal):
    base, last = rows[0], rows[-1]
    return [
        bu.headline(
            f"sweep speedup {last['processes']} vs {base['processes']} processes",
            last["speedup"],
            "x",
            f"end-to-end; sweep phase {bu.format_value(last['speedup_sweep_phase'])}x; "
            f"OMP_NUM_THREADS {last['threads_per_process']}/process",
        ),
        bu.headline(
            f"sweep images/s ({base['processes']} process)",
            base["images_per_s"],
            "img/s",
            f"{images} images x {passes} passes, end-to-end",
        ),
        bu.headline(
            f"PQ evaluation s per sweep ({base['processes']} vs {last['processes']} processes)",
            f"{bu.format_value(base['pq_eval_s'])} vs {bu.format_value(last['pq_eval_s'])}",
            "s",
            f"{base['pq_eval_calls']} evaluate() calls, from log timestamps (1 s resolution)",
        ),
        bu.headline("cells equal across process counts", cells_equal, "", ""),
    ]


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    bu.ensure_synthetic_data()
    device = bu.resolve_device(args.device)
    images = args.images or (4 if args.quick else 8)
    counts, skipped = _process_counts(args, device)
    runs, image_size = _run_all(args, device, counts, images)
    passes = 2  # clean + ifgsm
    rows = _rows(counts, runs, images)
    cells_equal = all(x["scores"] == runs[0]["scores"] for x in runs)
    return {
        "hardware": bu.hardware_info(device),
        "device": device,
        "image_size": image_size,
        "batch_size": 1,
        "images": images,
        "passes": passes,
        "sweep": f"clean + ifgsm eps {args.eps:g}, defenses none+nlmeans, objective train_losses",
        "weights": args.weights or f"untrained (torch.manual_seed({args.seed}))",
        "repetitions": args.reps or (1 if args.quick else 2),
        "quick": bool(args.quick),
        "thread_env": {str(n): thread_env(n) for n in counts},
        "skipped_process_counts": skipped,
        "dataloader_workers": 0,
        "results": rows,
        "cells_equal_across_process_counts": cells_equal,
        "runs": runs,
        "headline": _headlines(rows, images, passes, cells_equal),
    }


def print_report(result: dict) -> None:
    """Print the hardware line and a short Markdown table of ``result``."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    h, w = result["image_size"]
    print(
        f"Sweep: {result['sweep']}, {result['images']} images {h}x{w}, batch 1, weights "
        f"{result['weights']}; median of {result['repetitions']} run(s) per process count; "
        f"thread env per process count: {result['thread_env']}"
    )
    rows = [
        [
            r["processes"],
            r["threads_per_process"],
            r["wall_s"],
            r["images_per_s"],
            r["speedup"],
            r["sweep_phase_s"],
            r["images_per_s_sweep_phase"],
            r["speedup_sweep_phase"],
            r["pq_eval_s"],
        ]
        for r in result["results"]
    ]
    print(
        bu.format_table(
            [
                "processes",
                "threads/proc",
                "end-to-end s",
                "img/s",
                "speedup",
                "sweep phase s",
                "img/s (phase)",
                "speedup (phase)",
                "PQ eval s (log)",
            ],
            rows,
        )
    )
    print(f"cells equal across process counts: {result['cells_equal_across_process_counts']}")


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
