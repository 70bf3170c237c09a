# Copyright (c) UPSNetRobust authors.
"""Shared helpers of the benchmark suite (``make bench`` runs ``benchmarks/run_all.py``).

Pure helpers (statistics, tables, the protocol-minimum calculator, log parsing) import nothing
heavy and are covered by ``tests/test_benchmarks_smoke.py``. Helpers that need the project
(config, model, data) import ``upsnet_robust`` lazily, after :func:`setup_environment` has
pointed detectron2 at the repository's data set root, so every benchmark works from any
working directory.

Timing rules of the suite (docs/PERFORMANCE.md): every figure states the
hardware, torch threads, image size, batch size and device; speed is reported as RATIOS of
quantities measured in the same run with interleaved repetitions (medians), because the
absolute seconds on a shared machine move with its load; CUDA work is synchronised before a
clock is read.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

from benchprotocol import kurakin_steps, parse_log_spans, parse_log_times, protocol_minimum

__all__ = [
    "bench_main",
    "REPO_ROOT",
    "RESULTS_DIR",
    "TINY_CONFIG",
    "ROBUSTNESS_CONFIG",
    "setup_environment",
    "data_root",
    "ensure_synthetic_data",
    "cpu_model",
    "hardware_info",
    "hardware_line",
    "resolve_device",
    "base_parser",
    "median",
    "ratio",
    "paired_ratios",
    "Timings",
    "interleaved_timings",
    "Stopwatch",
    "apply_threads",
    "synchronize",
    "format_table",
    "format_value",
    "headline",
    "write_result",
    "kurakin_steps",
    "protocol_minimum",
    "parse_log_times",
    "parse_log_spans",
    "load_cfg",
    "build_model_for_bench",
    "val_inputs",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny.yaml")
ROBUSTNESS_CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny_robustness.yaml")
DATA_DIRNAME = "synthetic_cityscapes"  # upsnet_robust.data.SYNTHETIC_CITYSCAPES_DIRNAME


# ------------------------------------------------------------------------------ environment
def setup_environment() -> str:
    """Point detectron2's data sets at the repository's ``datasets/`` unless the user chose.

    Must run before ``upsnet_robust`` is imported: the package registers the synthetic data
    set at ``$DETECTRON2_DATASETS/synthetic_cityscapes`` (default ``datasets/`` relative to the
    working directory) on import.

    Returns:
        str: the synthetic data set root the benchmarks use.
    """
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO_ROOT, "datasets"))
    return data_root()


def data_root() -> str:
    """``$DETECTRON2_DATASETS/synthetic_cityscapes`` (the repository's ``datasets/`` if unset)."""
    base = os.path.expanduser(
        os.environ.get("DETECTRON2_DATASETS", os.path.join(REPO_ROOT, "datasets"))
    )
    if not os.path.isabs(base):
        base = os.path.join(REPO_ROOT, base)
    return os.path.join(base, DATA_DIRNAME)


def ensure_synthetic_data(python: str = sys.executable, log: Callable[[str], None] = print) -> str:
    """Generate the synthetic data set at the default root if it is missing.

    A fresh clone after ``make install`` has no data; this runs
    ``tools/prepare_synthetic_cityscapes.py --output <root>`` (the generator's defaults) once.

    Args:
        python (str): the interpreter to run the generator with.
        log (callable): where to report that the data set is being generated.

    Returns:
        str: the data set root.

    Raises:
        subprocess.CalledProcessError: if the generator fails.
    """
    root = setup_environment()
    marker = os.path.join(root, "gtFine", "cityscapes_panoptic_val.json")
    if not os.path.isfile(marker):
        log(
            f"Synthetic data set missing at {root}; generating it (tools/prepare_synthetic_cityscapes.py)."
        )
        cmd = [
            python,
            os.path.join(REPO_ROOT, "tools", "prepare_synthetic_cityscapes.py"),
            "--output",
            root,
            "--no-progress",
        ]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return root


# ------------------------------------------------------------------------------ hardware
def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` as a fallback)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_info(device: str = "cpu") -> Dict:
    """What every timing is stated with: CPU model, cores, threads, library versions, GPU.

    Args:
        device (str): the device the benchmark ran on ("cpu" or "cuda").

    Returns:
        dict: ``cpu_model``, ``logical_cpus``, ``torch_threads``, ``opencv_threads``,
        ``omp_num_threads`` (environment), ``torch``, ``python``, ``device`` and, on CUDA,
        ``gpu``.
    """
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    try:
        import cv2

        info["opencv_threads"] = cv2.getNumThreads()
    except ImportError:  # pragma: no cover
        info["opencv_threads"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def hardware_line(info: Dict) -> str:
    """One line for the printed table header."""
    gpu = f"{info['gpu']} + " if info.get("gpu") else ""
    return (
        f"{gpu}{info['cpu_model']} ({info['logical_cpus']} logical CPUs), torch {info['torch']}, "
        f"torch threads {info['torch_threads']}, OpenCV threads {info.get('opencv_threads')}, "
        f"device {info['device']}"
    )


def resolve_device(requested: str) -> str:
    """``requested`` ("cpu" or "cuda"), or "cpu" with a warning when CUDA is unavailable."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        print("WARNING: --device cuda requested but CUDA is not available; running on the CPU.")
        return "cpu"
    return requested


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark accepts: ``--device``, ``--quick``, ``--output``, ``--seed``,
    ``--threads``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="MODEL.DEVICE (cuda only when available)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions / smaller workload")
    parser.add_argument(
        "--output", default=None, help="result JSON (default benchmarks/results/<name>.json)"
    )
    parser.add_argument("--seed", type=int, default=0, help="model-init and sweep seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (0: torch's default, all cores)",
    )
    return parser


# ------------------------------------------------------------------------------ statistics
def median(values: Iterable[float]) -> float:
    """The median of a non-empty sequence (NaN for an empty one)."""
    values = [float(v) for v in values]
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when the denominator is 0 or not finite."""
    if not denominator or not math.isfinite(denominator):
        return float("nan")
    return float(numerator) / float(denominator)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> List[float]:
    """Per-repetition ratios of two interleaved series (robust to slow drifts of the load)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"series differ in length: {len(numerators)} vs {len(denominators)}")
    return [ratio(a, b) for a, b in zip(numerators, denominators)]


def synchronize(device: str) -> None:
    """``torch.cuda.synchronize()`` on CUDA, nothing on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Timings(NamedTuple):
    """Per-task lists of seconds: ``wall`` (``perf_counter``) and ``cpu`` (``process_time``,
    all threads of this process; unaffected by waiting for a busy CPU, but it counts OpenMP
    threads spinning at barriers)."""

    wall: Dict[str, List[float]]
    cpu: Dict[str, List[float]]


def interleaved_timings(
    tasks: Dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    device: str = "cpu",
    on_result: Optional[Callable[[str, int, object], None]] = None,
) -> Timings:
    """Time several tasks in interleaved repetitions.

    Each repetition runs every task once; the order rotates from one repetition to the next,
    so a change of the machine's load spreads over all tasks instead of biasing one. Warm-up
    repetitions run the same way and are not timed.

    Args:
        tasks (dict): name -> zero-argument callable.
        reps (int): timed repetitions.
        warmup (int): untimed repetitions first.
        device (str): synchronised before each clock read when CUDA.
        on_result (callable): ``(name, rep, value)`` for each timed call's return value
            (``rep`` counts from 0 over timed repetitions).

    Returns:
        Timings: wall-clock and process-CPU seconds, name -> list of ``reps`` values.
    """
    names = list(tasks)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            value = tasks[name]()
            synchronize(device)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if r >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                if on_result is not None:
                    on_result(name, r - warmup, value)
    return Timings(wall, cpu)


class Stopwatch:
    """Wraps a callable and records the wall and process-CPU seconds of every call
    (instrumentation from outside, e.g. around ``attack.perturb``)."""

    def __init__(self, fn: Callable, device: str = "cpu"):
        self.fn = fn
        self.device = device
        self.wall: List[float] = []
        self.cpu: List[float] = []

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.wall.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - start_cpu)


def prepare_run(args, data: bool = True) -> str:
    """The common start of a benchmark's ``run``: the generated data set (if ``data``), the
    device (``--device``) and torch's threads (``--threads``); returns the device."""
    if data:
        ensure_synthetic_data()
    device = resolve_device(args.device)
    apply_threads(args.threads)
    return device


def apply_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)`` when ``threads`` > 0; returns the threads in use."""
    import torch

    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ------------------------------------------------------------------------------ reporting
def format_value(value) -> str:
    """Numbers with 3-4 significant digits, booleans as yes/no, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if abs(value) >= 0.01:
            return f"{value:.4g}"
        return f"{value:.3g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table (cells via :func:`format_value`, '|' escaped)."""

    def cell(v):
        return format_value(v).replace("|", "\\|")

    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def headline(metric: str, value, unit: str = "", note: str = "") -> Dict:
    """One row of the combined table printed by ``run_all.py``."""
    return {"metric": metric, "value": value, "unit": unit, "note": note}


def write_result(name: str, payload: Dict, path: Optional[str] = None) -> str:
    """Write a benchmark's JSON (``benchmarks/results/<name>.json`` by default).

    Adds ``benchmark``, ``date`` and ``argv``; NaN/inf become null so the file is strict JSON.

    Returns:
        str: the path written.
    """
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    payload = dict(payload)
    payload.setdefault("benchmark", name)
    payload.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
    payload.setdefault("argv", sys.argv[1:])
    from upsnet_robust.utils.io import atomic_write  # lazily: see setup_environment

    atomic_write(path, json.dumps(_strict(payload), indent=2, default=str))
    return path


def bench_main(name: str, get_parser: Callable, run: Callable, print_report: Callable, argv=None) -> Dict:
    """A benchmark's ``main``: parse ``argv``, run, write ``results/<name>.json``, print."""
    args = get_parser().parse_args(argv)
    result = run(args)
    path = write_result(name, result, args.output)
    print_report(result)
    print(f"Wrote {path}")
    return result


def _strict(obj):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ project glue
def load_cfg(config_file: str = ROBUSTNESS_CONFIG, opts: Sequence = (), device: str = "cpu"):
    """The project's config (``get_upsnet_cfg`` + file + opts) with ``MODEL.DEVICE``."""
    setup_environment()
    import upsnet_robust  # noqa: F401  registers the model, data sets, attacks, defenses
    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints

    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, config_file, list(opts) + ["MODEL.DEVICE", device])
    return cfg


def build_model_for_bench(cfg, weights: Optional[str] = None, seed: int = 0):
    """The config's model in eval mode: untrained (seeded) unless ``weights`` is given.

    Timing ratios and pass counts do not depend on the weights, so no trained model is needed.
    """
    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    if weights:
        from upsnet_robust.engine import build_checkpointer

        build_checkpointer(cfg, model).load(weights)
    return model.eval()


def val_inputs(cfg, num_images: int) -> List[Dict]:
    """The first ``num_images`` test-set images through the panoptic mapper (with GT)."""
    from detectron2.data import DatasetCatalog

    from upsnet_robust.data import build_panoptic_mapper

    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    mapper = build_panoptic_mapper(cfg, is_train=False)
    return [mapper(d) for d in dicts]
