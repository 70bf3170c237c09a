#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Run the whole benchmark suite (``make bench``) and print one combined Markdown table.

Each benchmark runs in its own interpreter (a fresh process: no warm caches or thread pools
carried over), with ``--device`` and, unless ``--full``, ``--quick``; so by default the suite
uses the QUICK settings of every benchmark, which keep it under 15 minutes on a 2-core CPU.
``benchmarks/bench_nlmeans.py`` runs too when it exists. Missing data is generated first
(``tools/prepare_synthetic_cityscapes.py`` into the default root), so the suite works from a
fresh clone after ``make install``. Results: ``benchmarks/results/<name>.json`` per benchmark
and ``benchmarks/results/summary.json`` (all of them, the table, the total runtime).

    python benchmarks/run_all.py                  # quick settings, CPU
    python benchmarks/run_all.py --full --device cuda
    python benchmarks/run_all.py --only defenses pq_eval
"""

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Our benchmarks, in running order; bench_nlmeans.py (another owner) is added when present.
BENCHMARKS = [
    "attack_overhead",
    "sweep_economy",
    "defenses",
    "pq_eval",
    "scale",
    "fast_paths",
    "corruptions",
]
OPTIONAL = ["nlmeans"]
MAX_SCALAR_ROWS = 6


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--full", action="store_true", help="full settings (default: every benchmark's --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="passed to the benchmarks (0: torch's default)"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these (e.g. defenses scale)"
    )
    parser.add_argument("--skip", nargs="+", default=[], help="skip these")
    parser.add_argument("--results-dir", default=bu.RESULTS_DIR, help="where the JSON files go")
    return parser


def discover(only=None, skip=()) -> list:
    """Benchmark names to run: ours plus optional ones whose script exists."""
    names = BENCHMARKS + [
        n for n in OPTIONAL if os.path.isfile(os.path.join(BENCH_DIR, f"bench_{n}.py"))
    ]
    if only:
        names = [n for n in names if n in only]
    return [n for n in names if n not in set(skip)]


def flag_attempts(name: str, device: str, quick: bool, threads: int) -> list:
    """Argument lists to try in order; benchmarks not written for this suite may not accept
    every flag, so they are retried with fewer (on an argparse usage error only)."""
    full = (
        ["--device", device]
        + (["--quick"] if quick else [])
        + (["--threads", str(threads)] if threads else [])
    )
    if name in BENCHMARKS:
        return [full]
    attempts = [
        full,
        ["--device", device] + (["--quick"] if quick else []),
        ["--quick"] if quick else [],
        [],
    ]
    unique = []
    for a in attempts:
        if a not in unique:
            unique.append(a)
    return unique


def find_result(name: str, results_dir: str, since: float, claimed=()):
    """The JSON a benchmark wrote during this run: ``<name>.json`` or ``bench_<name>.json``,
    else the newest file written since ``since`` that no other benchmark claims."""
    for candidate in (f"{name}.json", f"bench_{name}.json"):
        path = os.path.join(results_dir, candidate)
        if os.path.isfile(path) and os.path.getmtime(path) >= since:
            return path
    fresh = [
        p
        for p in glob.glob(os.path.join(results_dir, "*.json"))
        if os.path.getmtime(p) >= since
        and os.path.basename(p) not in set(claimed) | {"summary.json"}
    ]
    return max(fresh, key=os.path.getmtime) if fresh else None


def headline_rows(name: str, result: dict) -> list:
    """Rows of the combined table for one result: its ``headline`` list, else its top-level
    scalar numbers (for benchmarks without one)."""
    rows = []
    for h in result.get("headline") or []:
        rows.append(
            [name, h.get("metric", ""), h.get("value"), h.get("unit", ""), h.get("note", "")]
        )
    if rows:
        return rows
    for key, value in result.items():
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and len(rows) < MAX_SCALAR_ROWS
        ):
            rows.append([name, key, value, "", ""])
    return rows or [[name, "(no scalar results)", None, "", ""]]


def combined_table(entries: dict) -> str:
    """The Markdown table of all benchmarks (failures shown as such)."""
    rows = []
    for name, entry in entries.items():
        if entry.get("result") is None:
            rows.append(
                [
                    name,
                    "FAILED" if entry["rc"] else "no result file",
                    None,
                    "",
                    (entry.get("error") or "")[-120:].replace("\n", " "),
                ]
            )
        else:
            rows.extend(headline_rows(name, entry["result"]))
        rows[-1][-1] = (rows[-1][-1] + f" [{entry['wall_s']:.0f} s]").strip()
    return bu.format_table(["benchmark", "metric", "value", "unit", "note"], rows)


def run_one(name: str, args, claimed) -> dict:
    """Run one benchmark script in a subprocess; returns its entry of ``summary.json``."""
    script = os.path.join(BENCH_DIR, f"bench_{name}.py")
    entry = {
        "script": os.path.relpath(script, bu.REPO_ROOT),
        "rc": None,
        "wall_s": 0.0,
        "result": None,
    }
    start_clock = time.time() - 1.0  # mtime granularity
    start = time.perf_counter()
    for flags in flag_attempts(name, args.device, not args.full, args.threads):
        cmd = [sys.executable, script] + flags
        if args.results_dir != bu.RESULTS_DIR and name in BENCHMARKS:
            cmd += ["--output", os.path.join(args.results_dir, f"{name}.json")]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=bu.REPO_ROOT, stderr=subprocess.PIPE, text=True)
        entry.update(rc=proc.returncode, flags=flags)
        if proc.returncode == 0:
            break
        usage_error = proc.returncode == 2 and "unrecognized arguments" in (proc.stderr or "")
        entry["error"] = (proc.stderr or "")[-3000:]
        print(entry["error"], file=sys.stderr)
        if not usage_error:
            break
    entry["wall_s"] = time.perf_counter() - start
    path = find_result(name, args.results_dir, start_clock, claimed) if entry["rc"] == 0 else None
    if path:
        with open(path) as f:
            entry["result"] = json.load(f)
        entry["result_file"] = os.path.relpath(path, bu.REPO_ROOT)
    return entry


def main(argv=None) -> dict:
    """Run every benchmark, write ``summary.json`` and print the combined table (exit 1 if any
    benchmark failed)."""
    args = get_parser().parse_args(argv)
    total_start = time.perf_counter()
    bu.ensure_synthetic_data()
    os.makedirs(args.results_dir, exist_ok=True)
    entries, claimed = {}, []
    for name in discover(args.only, args.skip):
        entries[name] = run_one(name, args, claimed)
        if entries[name].get("result_file"):
            claimed.append(os.path.basename(entries[name]["result_file"]))
    total_s = time.perf_counter() - total_start
    hardware = next(
        (
            e["result"]["hardware"]
            for e in entries.values()
            if e.get("result")
            and isinstance(e["result"].get("hardware"), dict)
            and "cpu_model" in e["result"]["hardware"]
        ),
        None,
    )
    table = combined_table(entries)
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "settings": "full" if args.full else "quick (every benchmark run with --quick)",
        "threads": args.threads or "torch default",
        "hardware": hardware,
        "total_s": total_s,
        "all_succeeded": all(
            e["rc"] == 0 and e.get("result") is not None for e in entries.values()
        ),
        "table_markdown": table,
        "benchmarks": entries,
    }
    path = bu.write_result("summary", summary, os.path.join(args.results_dir, "summary.json"))
    print("\n## Benchmark summary\n")
    if hardware:
        print(f"Hardware: {bu.hardware_line(hardware)}; settings: {summary['settings']}\n")
    print(table)
    print(f"\nTotal runtime {total_s / 60:.1f} min; wrote {path}")
    if not summary["all_succeeded"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
