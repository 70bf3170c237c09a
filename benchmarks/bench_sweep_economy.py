#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Work done by a small full robustness sweep versus the protocol's minimum.

Runs :class:`RobustnessSweep` (clean + fgsm and ifgsm at two eps, defenses none + nlmeans, two
images, fresh output directory) on an untrained tiny UPSNet and counts, from OUTSIDE the
package:

* training-loss forwards (``model.forward`` called in training mode) and input backwards (a
  gradient hook on every input image that requires grad);
* inference forwards (``model.forward`` in eval mode) and ``model.predict`` calls;
* defense calls (``apply_image`` of each defense transform, through a counting proxy);
* the attacks' own counters (``num_forward_backward``, ``num_forward``).

The minimum (:func:`benchutils.protocol_minimum`): per image, clean inference once per defense
variant; per attack pass T forward + backward (T = 1 for FGSM, Kurakin's ceil rule for I-FGSM)
plus one inference per variant; one defense call per image per defended variant per pass.
A second ``run()`` on the same directory (resume) must do no work at all.

    python benchmarks/bench_sweep_economy.py [--quick] [--device cuda]
"""

import os
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402
from benchcount import (  # noqa: E402
    CountingTransform,
    count_attacks,
    count_passes,
    instrument_model,
)

NAME = "sweep_economy"
COUNTED = ("forward_backward", "input_backward", "forward_only", "loss_forward", "inference",
           "predict")


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="images in the sweep")
    parser.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=None,
        help="eps values (default 1 4; 1 2 with --quick)",
    )
    parser.add_argument("--attacks", nargs="+", default=["fgsm", "ifgsm"], help="attacks")
    parser.add_argument(
        "--defenses", nargs="+", default=["none", "nlmeans"], help="defense variants"
    )
    parser.add_argument(
        "--dataset",
        default="",
        help="a registered detectron2 data set to sweep (default: the config's synthetic "
        "validation split, generated if missing)",
    )
    return parser


def compare(measured: dict, minimum: dict) -> dict:
    """Per count: measured, minimum and whether they are equal.

    Args:
        measured (dict): ``forward_backward``, ``input_backward``, ``forward_only``,
            ``loss_forward``, ``inference`` and ``defense_calls`` {name: n} (other keys are
            ignored).
        minimum (dict): the same keys from :func:`benchutils.protocol_minimum` (its
            ``input_backward`` is its ``forward_backward``).

    Returns:
        dict: key -> {"measured", "minimum", "equal"}, plus "equal" overall and
        "zero_counters" (keys measured 0 where the minimum is > 0: a counter that does not see
        the path doing the work).
    """
    want = {
        "forward_backward": minimum["forward_backward"],
        "input_backward": minimum["forward_backward"],
        "forward_only": minimum["forward_only"],
        "loss_forward": minimum["loss_forward"],
        "inference": minimum["inference"],
    }
    for d, n in minimum["defense_calls"].items():
        want[f"defense:{d}"] = n
    got = {
        k: measured.get(k, 0)
        for k in ("forward_backward", "input_backward", "forward_only", "loss_forward",
                  "inference")
    }
    for d in minimum["defense_calls"]:
        got[f"defense:{d}"] = measured.get("defense_calls", {}).get(d, 0)
    extra = sorted(set(measured.get("defense_calls", {})) - set(minimum["defense_calls"]))
    for d in extra:
        want[f"defense:{d}"] = 0
        got[f"defense:{d}"] = measured["defense_calls"][d]
    out = {k: {"measured": got[k], "minimum": want[k], "equal": got[k] == want[k]} for k in want}
    out["equal"] = all(v["equal"] for v in out.values())
    # A count of 0 where the protocol does work means the instrumentation missed a code path
    # (not that the sweep is economical): named separately so the report says so.
    out["zero_counters"] = sorted(k for k in want if want[k] > 0 and got[k] == 0)
    return out


def _sweep_cfg(args, eps, out_dir, device):
    opts = [
        "MODEL.WEIGHTS", "",
        "ROBUSTNESS.ATTACKS", str(list(args.attacks)),
        "ROBUSTNESS.EPSILONS", str([float(e) for e in eps]),
        "ROBUSTNESS.DEFENSES", str(list(args.defenses)),
        "ROBUSTNESS.MAX_IMAGES", str(args.images),
        "ROBUSTNESS.NUM_EXAMPLES", "0",
        "ROBUSTNESS.SEED", str(args.seed),
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", out_dir,
    ]  # fmt: skip
    if args.dataset:
        opts += ["DATASETS.TEST", f"('{args.dataset}',)"]
    return bu.load_cfg(bu.ROBUSTNESS_CONFIG, opts, device)


def _run_twice(sweep, counter: Counter):
    """The sweep, then again on the same directory (a resume must load everything and
    compute nothing): first-run seconds and counts, resume seconds and any work it did."""
    start = time.perf_counter()
    sweep.run()
    first_run_s = time.perf_counter() - start
    total_first = Counter(counter)
    before = Counter(counter)
    start = time.perf_counter()
    sweep.run()
    resume_s = time.perf_counter() - start
    resume = Counter(counter)
    resume.subtract(before)
    resume_work = {k: v for k, v in resume.items() if v and not k.startswith("seconds:")}
    return first_run_s, total_first, resume_s, resume_work


def _measured_total(total_first: Counter, per_pass) -> dict:
    return {
        "forward_backward": total_first["forward_train"],
        "input_backward": total_first["input_backward"],
        "forward_only": sum(p["forward_only"] for p in per_pass),
        "loss_forward": total_first["forward_loss"],
        "inference": total_first["inference"],
        "predict": total_first["predict"],
        "attack_counter_forward_backward": sum(
            p["attack_counter_forward_backward"] for p in per_pass
        ),
        "defense_calls": {
            k.split(":", 1)[1]: v for k, v in total_first.items() if k.startswith("defense:")
        },
    }


def _verdicts(measured_total, minimum, per_pass, resume_work):
    """The total and per-pass comparisons with the minimum, the overall verdict and the
    counters that read 0 where work was done."""
    verdict = compare(measured_total, minimum["total"])
    pass_verdicts = []
    for got, want in zip(per_pass, minimum["passes"]):
        v = compare(got, want)
        v["T_measured"], v["T_protocol"] = got["T"], want["T"]
        v["equal"] = (
            v["equal"]
            and got["T"] == want["T"]
            and got["attack_counter_forward_backward"] == want["forward_backward"]
        )
        pass_verdicts.append(v)
    equal = verdict["equal"] and all(v["equal"] for v in pass_verdicts) and not resume_work
    equal = equal and len(per_pass) == len(minimum["passes"])
    zero_counters = [f"total {k}" for k in verdict["zero_counters"]] + [
        f"{p['attack']} eps {p['eps']:g} {k}"
        for p, v in zip(per_pass, pass_verdicts)
        for k in v["zero_counters"]
    ]
    return verdict, pass_verdicts, bool(equal), zero_counters


def _headlines(equal, measured_total, want, resume_work):
    calls = sum(measured_total["defense_calls"].values())
    return [
        bu.headline(
            "sweep work == protocol minimum",
            equal,
            "",
            f"fwd+bwd {measured_total['forward_backward']}/{want['forward_backward']}, "
            f"inference {measured_total['inference']}/{want['inference']}, defense calls "
            f"{calls}/{sum(want['defense_calls'].values())}",
        ),
        bu.headline(
            "resume recomputes",
            sum(resume_work.values()),
            "calls",
            "second run() on the same OUTPUT_DIR",
        ),
    ]


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    device = bu.prepare_run(args, data=not args.dataset)
    from upsnet_robust.evaluation import RobustnessSweep, sweep_passes

    eps = args.eps or ([1.0, 2.0] if args.quick else [1.0, 4.0])
    out_dir = tempfile.mkdtemp(prefix="bench_sweep_economy_")
    cfg = _sweep_cfg(args, eps, out_dir, device)
    model = bu.build_model_for_bench(cfg, None, seed=args.seed)
    counter = Counter()
    instrument_model(model, counter)
    sweep = RobustnessSweep(cfg, model, weights=f"untrained-seed{args.seed}", output_dir=out_dir)
    for name, transform in list(sweep.defenses.items()):
        if transform is not None:
            sweep.defenses[name] = CountingTransform(transform, counter, f"defense:{name}")
    count_attacks(sweep, counter)
    per_pass = count_passes(sweep, counter)
    first_run_s, total_first, resume_s, resume_work = _run_twice(sweep, counter)

    passes = [{"attack": p["attack"], "eps": p["eps"]} for p in sweep_passes(cfg)]
    minimum = bu.protocol_minimum(args.images, passes, sweep.defense_names)
    measured_total = _measured_total(total_first, per_pass)
    verdict, pass_verdicts, equal, zero_counters = _verdicts(
        measured_total, minimum, per_pass, resume_work
    )
    sample = bu.val_inputs(cfg, 1)[0]["image"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "hardware": bu.hardware_info(device),
        "device": device,
        "image_size": [int(sample.shape[-2]), int(sample.shape[-1])],
        "batch_size": 1,
        "quick": bool(args.quick),
        "sweep": {
            "images": args.images,
            "attacks": list(args.attacks),
            "eps": eps,
            "defenses": sweep.defense_names,
            "objective": cfg.ROBUSTNESS.OBJECTIVE,
            "output_dir": f"{out_dir} (temporary, removed)",
        },
        "equal_to_minimum": equal,
        "zero_counters": zero_counters,
        "total": verdict,
        "measured_total": measured_total,
        "minimum_total": minimum["total"],
        "per_pass": per_pass,
        "per_pass_minimum": minimum["passes"],
        "per_pass_verdict": pass_verdicts,
        "resume_work": resume_work,
        "first_run_s": first_run_s,
        "seconds_breakdown": {
            k: sum(p[f"seconds_{k}"] for p in per_pass)
            for k in ("attack", "defense", "inference", "other")
        },
        "resume_s": resume_s,
        "headline": _headlines(equal, measured_total, minimum["total"], resume_work),
    }


def _report_rows(result: dict) -> list:
    """The report table's rows: measured / minimum per pass, then the totals."""
    rows = []
    for got, want, v in zip(
        result["per_pass"], result["per_pass_minimum"], result["per_pass_verdict"]
    ):
        dm = ", ".join(f"{k} {n}" for k, n in sorted(got["defense_calls"].items())) or "-"
        dw = ", ".join(f"{k} {n}" for k, n in sorted(want["defense_calls"].items())) or "-"
        rows.append(
            [
                f"{got['attack']} eps {got['eps']:g}",
                f"{got['T']}/{want['T']}",
                f"{got['forward_backward']}/{want['forward_backward']}",
                f"{got['input_backward']}/{want['forward_backward']}",
                f"{got['attack_counter_forward_backward']}/{want['forward_backward']}",
                f"{got['forward_only']}/{want['forward_only']}",
                f"{got['loss_forward']}/{want['loss_forward']}",
                f"{got['inference']}/{want['inference']}",
                f"{dm} / {dw}",
                v["equal"],
                got["seconds"],
            ]
        )
    t, m = result["measured_total"], result["minimum_total"]
    rows.append(
        [
            "TOTAL",
            "",
            f"{t['forward_backward']}/{m['forward_backward']}",
            f"{t['input_backward']}/{m['forward_backward']}",
            f"{t['attack_counter_forward_backward']}/{m['forward_backward']}",
            f"{t['forward_only']}/{m['forward_only']}",
            f"{t['loss_forward']}/{m['loss_forward']}",
            f"{t['inference']}/{m['inference']}",
            ", ".join(f"{k} {n}" for k, n in sorted(t["defense_calls"].items()))
            + " / "
            + ", ".join(f"{k} {n}" for k, n in sorted(m["defense_calls"].items())),
            result["total"]["equal"],
            result["first_run_s"],
        ]
    )
    return rows


def print_report(result: dict) -> None:
    """Print the hardware line and a short Markdown table of ``result``."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    s = result["sweep"]
    h, w = result["image_size"]
    print(
        f"Sweep: {s['images']} images {h}x{w}, batch 1, attacks {s['attacks']} at eps {s['eps']}, "
        f"defenses {s['defenses']}, objective {s['objective']}"
    )
    rows = _report_rows(result)
    print("measured / minimum:")
    print(
        bu.format_table(
            [
                "pass",
                "T",
                "train fwd",
                "input bwd",
                "attack counter fb",
                "fwd only",
                "loss fwd",
                "inference",
                "defense calls",
                "equal",
                "s",
            ],
            rows,
        )
    )
    b = result["seconds_breakdown"]
    print(
        "time in passes: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in b.items())
        + " (other = data loading, caching, PQ evaluation, bookkeeping)"
    )
    print(
        f"resume (second run): work {result['resume_work'] or 'none'} in {result['resume_s']:.2f} s"
    )
    if result["zero_counters"]:
        print(
            "COUNTERS READ 0 where the protocol does work (the instrumentation misses that code "
            "path): " + "; ".join(result["zero_counters"])
        )
    print(
        f"VERDICT: {'EQUAL to' if result['equal_to_minimum'] else 'NOT EQUAL to'} the protocol minimum"
    )


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
