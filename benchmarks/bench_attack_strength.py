#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Attack strength against cost: PQ after each attack versus its forward+backward passes.

On the shipped tiny UPSNet (or ``--config-file`` / ``--weights``: any panoptic or semantic
model; a semantic model's rows hold mIoU) (undefended, float images) at each eps it runs: PGD (semantic CE,
alpha 2, random start), SegPGD and CosPGD with ``--steps`` iterations each; ``sea`` (APGD with
every dense loss, the members' per-image predictions combined into the worst dataset PQ), whose
member cells are APGD with each loss alone; and the ``sea_fast`` preset. Passes are the
attacks' own counts per image (early stopping makes them fewer than the steps). All runs share
one cache directory (``--output-dir``), so an interrupted run resumes and ``sea_fast`` reuses
the member passes it shares with ``sea``.

Goals checked (issue: the strongest evaluation): ``sea`` at least 2 PQ below the best of the
fixed-step attacks; ``sea_fast`` within 1 PQ of ``sea`` with at most 25 % of its passes.

    python benchmarks/bench_attack_strength.py [--quick] [--images 10] [--eps 8 16]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "attack_strength"
WEIGHTS = os.path.join(bu.REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
# name -> (ROBUSTNESS.ATTACKS entry, config overrides); steps filled in from --steps
FIXED_STEP_ATTACKS = {
    "pgd": ("pgd", ["ROBUSTNESS.OBJECTIVE", "semantic_ce", "ROBUSTNESS.STEP_SIZE", "2.0",
                    "ROBUSTNESS.RANDOM_START", "True"]),
    "segpgd": ("segpgd", ["ROBUSTNESS.OBJECTIVE", "semantic_ce", "ROBUSTNESS.STEP_SIZE", "2.0"]),
    "cospgd": ("cospgd", ["ROBUSTNESS.OBJECTIVE", "semantic_ce", "ROBUSTNESS.STEP_SIZE", "2.0"]),
}  # fmt: skip
ENSEMBLES = ("sea", "sea_fast")


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="val images (10; 2 --quick)")
    parser.add_argument(
        "--eps", type=float, nargs="+", default=None, help="eps values (8 16; 16 with --quick)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps of pgd/segpgd/cospgd (40; 4 --quick)"
    )
    parser.add_argument(
        "--sea-steps", type=int, default=None,
        help="ROBUSTNESS.SEA.NUM_STEPS (config default; 8 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--sea-fast-steps", type=int, default=None,
        help="ROBUSTNESS.SEA.FAST_NUM_STEPS (config default; 2 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--sea-fast-members", nargs="+", default=None,
        help="ROBUSTNESS.SEA.FAST_MEMBERS entries 'attack:objective' (config default)",
    )  # fmt: skip
    parser.add_argument(
        "--output-dir",
        default=os.path.join(bu.REPO_ROOT, "output", "bench_attack_strength"),
        help="sweep caches (kept: a rerun resumes)",
    )
    parser.add_argument("--config-file", default=bu.ROBUSTNESS_CONFIG, help="sweep config")
    parser.add_argument("--weights", default=WEIGHTS, help="checkpoint")
    return parser


def _cfg(args, device, attack, eps, overrides):
    opts = [
        "MODEL.WEIGHTS", args.weights,
        "OUTPUT_DIR", args.output_dir,
        "ROBUSTNESS.ATTACKS", f"['{attack}']",
        "ROBUSTNESS.EPSILONS", f"[{eps}]",
        "ROBUSTNESS.DEFENSES", "['none']",
        "ROBUSTNESS.MAX_IMAGES", str(args.images),
        "ROBUSTNESS.NUM_EXAMPLES", "0",
        "ROBUSTNESS.SEED", str(args.seed),
    ]  # fmt: skip
    if args.sea_steps:
        opts += ["ROBUSTNESS.SEA.NUM_STEPS", str(args.sea_steps)]
    if args.sea_fast_steps:
        opts += ["ROBUSTNESS.SEA.FAST_NUM_STEPS", str(args.sea_fast_steps)]
    if args.sea_fast_members:
        opts += ["ROBUSTNESS.SEA.FAST_MEMBERS", repr(list(args.sea_fast_members))]
    cfg = bu.load_cfg(args.config_file, opts + list(overrides), device)
    return cfg


def _sweep(cfg, model, args):
    from upsnet_robust.evaluation import RobustnessSweep

    start = time.perf_counter()
    cells = RobustnessSweep(cfg, model, args.weights, args.output_dir).run()
    return cells, time.perf_counter() - start


def _row(name, cell, seconds=None):
    passes = cell.get("attack_passes_per_image")
    metric = cell.get("metric") or "PQ"  # mIoU for a semantic model
    return {
        "name": name,
        "attack": cell["attack"],
        "objective": cell.get("objective"),
        "eps": cell["eps"],
        "metric": metric,
        metric: cell.get(metric),
        "passes_per_image": passes,
        "attack_s_per_image": cell.get("attack_s_per_image"),
        "members": cell.get("members"),
        "wall_s": seconds,
    }


def _runs_at(args, device, model, eps):
    """Rows of every attack at one eps (member cells of ``sea`` as APGD rows)."""
    rows = []
    for name, (attack, overrides) in FIXED_STEP_ATTACKS.items():
        cfg = _cfg(args, device, attack, eps, overrides + ["ROBUSTNESS.NUM_STEPS", str(args.steps),
                                                           "ROBUSTNESS.INCLUDE_CLEAN", "False"])
        cells, seconds = _sweep(cfg, model, args)
        rows.append(_row(f"{name}-{args.steps}", _attacked(cells, attack), seconds))
    for name in ENSEMBLES:
        cfg = _cfg(args, device, name, eps, ["ROBUSTNESS.INCLUDE_CLEAN", "False"])
        cells, seconds = _sweep(cfg, model, args)
        if name == "sea":
            for cell in cells:
                if "sea" in (cell.get("member_of") or []) and cell["defense"] == "none":
                    rows.append(_row(f"apgd:{cell.get('objective')}", cell))
        rows.append(_row(name, _attacked(cells, name), seconds))
    return rows


def _attacked(cells, attack):
    for cell in cells:
        if cell["attack"] == attack and cell["defense"] == "none" and not cell.get("member_of"):
            return cell
    raise RuntimeError(f"no {attack} cell among {[c['attack'] for c in cells]}")


def _score(row):
    return row[row.get("metric", "PQ")]


def _goals(rows):
    """The two goals per eps (None where a run is missing); in points of the rows' metric
    (PQ, or mIoU for a semantic model), the keys named for PQ."""
    out = {}
    for eps in sorted({r["eps"] for r in rows}):
        at = {r["name"]: r for r in rows if r["eps"] == eps}
        fixed = [_score(r) for n, r in at.items() if n.split("-")[0] in FIXED_STEP_ATTACKS]
        sea, fast = at.get("sea"), at.get("sea_fast")
        goal = {"best_fixed_step_PQ": min(fixed) if fixed else None}
        if sea and fixed:
            goal["sea_PQ"] = _score(sea)
            goal["sea_2_below_best_fixed"] = bool(_score(sea) <= min(fixed) - 2)
        if sea and fast:
            ratio = bu.ratio(fast["passes_per_image"], sea["passes_per_image"])
            goal["sea_fast_PQ"] = _score(fast)
            goal["sea_fast_pass_ratio"] = ratio
            goal["sea_fast_within_1_PQ_at_25pct"] = bool(
                _score(fast) <= _score(sea) + 1 and ratio <= 0.25
            )
        out[f"{eps:g}"] = goal
    return out


def _plot(rows, path, model="shipped tiny UPSNet"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next((_score(r) for r in rows if r["name"] == "clean"), None)
    metric = rows[0].get("metric", "PQ") if rows else "PQ"
    rows = [r for r in rows if r["name"] != "clean"]
    eps_values = sorted({r["eps"] for r in rows})
    fig, axes = plt.subplots(1, len(eps_values), figsize=(6 * len(eps_values), 4.5), squeeze=False)
    for ax, eps in zip(axes[0], eps_values):
        for r in (r for r in rows if r["eps"] == eps):
            marker = "*" if r["name"] in ENSEMBLES else "o"
            ax.scatter(max(r["passes_per_image"] or 1, 1), _score(r), marker=marker, s=80)
            ax.annotate(r["name"], (max(r["passes_per_image"] or 1, 1), _score(r)), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        if clean is not None:
            ax.axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
            ax.legend(loc="center right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("forward+backward passes per image")
        ax.set_ylabel(f"{metric} (undefended)")
        ax.set_title(f"eps {eps:g}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Attack strength vs cost ({model})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    device = bu.prepare_run(args)
    args.images = args.images or (2 if args.quick else 10)
    args.steps = args.steps or (4 if args.quick else 40)
    if args.quick:
        args.sea_steps = args.sea_steps or 8
        args.sea_fast_steps = args.sea_fast_steps or 2
    eps_values = args.eps or ([16.0] if args.quick else [8.0, 16.0])
    cfg = _cfg(args, device, "pgd", eps_values[0], [])
    model = bu.build_model_for_bench(cfg, args.weights, seed=args.seed)
    clean_cfg = _cfg(args, device, "fgsm", eps_values[0], [])
    clean_cfg.defrost()
    clean_cfg.ROBUSTNESS.ATTACKS = []
    clean_cells, _ = _sweep(clean_cfg, model, args)
    rows = [_row("clean", _attacked(clean_cells, "clean"))]
    for eps in eps_values:
        rows += _runs_at(args, device, model, eps)
    os.makedirs(bu.RESULTS_DIR, exist_ok=True)
    # the plot beside the result JSON (another model's run with --output keeps the default's)
    base = os.path.splitext(args.output)[0] if args.output else os.path.join(bu.RESULTS_DIR, NAME)
    plot = _plot(rows, base + ".png", os.path.basename(args.weights))
    goals = _goals([r for r in rows if r["name"] != "clean"])
    metric = rows[0]["metric"]
    return {
        "hardware": bu.hardware_info(device),
        "device": device,
        "images": args.images,
        "steps": args.steps,
        "sea_steps": cfg.ROBUSTNESS.SEA.NUM_STEPS,
        "sea_members": list(cfg.ROBUSTNESS.SEA.MEMBERS),
        "sea_fast_steps": cfg.ROBUSTNESS.SEA.FAST_NUM_STEPS,
        "sea_fast_members": list(cfg.ROBUSTNESS.SEA.FAST_MEMBERS),
        "rows": rows,
        "goals": goals,
        "plot": os.path.relpath(plot, bu.REPO_ROOT),
        "headline": [
            bu.headline(f"{metric} under sea, eps {e}", g.get("sea_PQ"), metric,
                        f"best fixed-step attack {bu.format_value(g.get('best_fixed_step_PQ'))}")
            for e, g in goals.items()
        ],
    }  # fmt: skip


def print_report(result: dict) -> None:
    print(f"{result['images']} images, {bu.hardware_line(result['hardware'])}")
    rows = [
        (r["name"], r["eps"], _score(r), r["passes_per_image"], r["attack_s_per_image"])
        for r in result["rows"]
    ]
    metric = result["rows"][0].get("metric", "PQ") if result["rows"] else "PQ"
    print(bu.format_table(("attack", "eps", metric, "passes/img", "s/img"), rows))
    for eps, goal in result["goals"].items():
        print(f"eps {eps}: " + ", ".join(f"{k} {bu.format_value(v)}" for k, v in goal.items()))
    print(f"Plot: {result['plot']}")


def main(argv=None):
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
