#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Overhead of the project's attack path over the bare forward + backward floor.

The project's I-FGSM (T steps at ``--eps``, objective ``train_losses``) runs through
:class:`AdversarialInference`, exactly as the sweep calls it (under ``torch.no_grad()``, like
``inference_on_dataset``), with the robustness config's defense variants (none + nlmeans). It is
compared, in the same run with interleaved repetitions, with:

* the attack floor: a bare loop of T x (training-loss forward + input backward) of the same
  model on the same image, with the same per-image seed (so RPN/ROI sampling draws the same
  samples) and the same sign step and projection (a few elementwise ops) - nothing else;
* the inference floor: one bare ``model([...])`` under ``no_grad`` per defense variant, on the
  same adversarial image;
* the defense floor: the defense's ``apply_image`` on that image as uint8 (H, W, 3).

Also timed: inference with ``roi_heads.forward_with_given_boxes`` bypassed (no mask head on the
final detections, hence no full-size mask pasting), whose panoptic_seg must be identical: the
share of inference the sweep spends on detector outputs that PQ never reads.

Reported, nothing subtracted: attack-only time (the hook's own ``record["attack_s"]``) / attack
floor (goal <= 1.05), and the full hook call (attack + defenses + inferences + bookkeeping) /
(attack floor + inference floor x variants + defense floors). Ratios are medians of
per-repetition ratios; the floors' adversarial image is checked to equal the hook's.

    python benchmarks/bench_attack_overhead.py [--quick] [--device cuda] [--weights model.pth]
"""

import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "attack_overhead"
GOAL = 1.05
OBJECTIVE = "train_losses"


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--attack",
        default="ifgsm",
        choices=("ifgsm", "bim", "fgsm"),
        help="attack (deterministic ones, whose floor is the same computation)",
    )
    parser.add_argument("--eps", type=float, default=4.0, help="L-inf budget, 0-255 units")
    parser.add_argument("--weights", default="", help="checkpoint (default: untrained, seeded)")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions (11; 5 with --quick)"
    )
    parser.add_argument("--image-index", type=int, default=0, help="val image to attack")
    return parser


def bare_attack_loop(model, x, steps, alpha, eps, seed, device):
    """The floor: T x (training-loss forward + backward to the input) plus the sign step.

    Args:
        model: the UPSNet model (any mode; training-loss mode with frozen norms is entered once).
        x (dict): the mapper's input (image, instances, sem_seg, ...).
        steps (int): T.
        alpha (float): step size.
        eps (float): L-inf budget.
        seed (int): the torch seed set before every forward (the objective's per-image seed).
        device (str): the model's device.

    Returns:
        Tensor: the (3, H, W) float adversarial image.
    """
    import torch
    from detectron2.utils.events import EventStorage

    from upsnet_robust.attacks.objectives import frozen_norm_training_mode

    clean = x["image"].to(device).float()
    inputs = {k: v for k, v in x.items() if k != "image"}
    adv = clean
    with frozen_norm_training_mode(model), EventStorage(), torch.enable_grad():
        for _ in range(steps):
            torch.manual_seed(seed)
            xi = adv.detach().requires_grad_(True)
            loss = sum(model([dict(inputs, image=xi)]).values())
            (grad,) = torch.autograd.grad(loss, xi)
            adv = torch.min(torch.max(adv + alpha * grad.sign(), clean - eps), clean + eps).clamp(
                0, 255
            )
    return adv.detach()


def _setup(args, device):
    """Model, image, attack and defenses as the sweep would build them."""
    from upsnet_robust.attacks import build_attack
    from upsnet_robust.attacks.objectives import image_seed
    from upsnet_robust.defenses import build_defense_from_cfg

    cfg = bu.load_cfg(bu.ROBUSTNESS_CONFIG, ["MODEL.WEIGHTS", args.weights], device)
    model = bu.build_model_for_bench(cfg, args.weights or None, seed=args.seed)
    x = bu.val_inputs(cfg, args.image_index + 1)[args.image_index]
    attack = build_attack(cfg, args.attack, args.eps)
    desc = attack.describe()
    variants = list(dict.fromkeys(["none"] + list(cfg.ROBUSTNESS.DEFENSES)))
    return SimpleNamespace(
        cfg=cfg,
        model=model,
        x=x,
        attack=attack,
        desc=desc,
        steps=int(desc["num_steps"]),
        alpha=float(desc["step_size"]),
        sweep_seed=int(cfg.ROBUSTNESS.SEED),
        seed=image_seed(int(cfg.ROBUSTNESS.SEED), x.get("image_id", x.get("file_name", 0))),
        variants=variants,
        defenses={d: None if d == "none" else build_defense_from_cfg(cfg, d) for d in variants},
    )


def _instrumented_hook(s, device):
    """The hook, with CPU seconds of its attack call measured from outside (its wall seconds
    are its own record["attack_s"]), after one untimed call that gives the adversarial image
    the inference and defense floors use (the inference cost depends on the detections)."""
    import torch

    from upsnet_robust.evaluation import AdversarialInference

    captured = {}

    def on_image(inp, clean, adv, defended, outputs):
        captured["adv"] = adv

    hook = AdversarialInference(
        s.model, s.attack, s.defenses, objective=OBJECTIVE, input_format=s.cfg.INPUT.FORMAT,
        seed=s.sweep_seed, on_image=on_image,
    )  # fmt: skip
    s.attack.perturb = perturb_watch = bu.Stopwatch(s.attack.perturb, device)
    with torch.no_grad():
        hook([s.x])
    hook.records.clear()
    perturb_watch.wall.clear()
    perturb_watch.cpu.clear()
    return hook, perturb_watch, captured["adv"]


def _tasks(s, hook, adv, device):
    """The timed calls: the hook, the bare attack loop, inference (full and panoptic-only)
    and each defense's bare ``apply_image``."""
    import torch

    image_float = adv.clone()
    image_u8 = image_float.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image_u8 = image_u8.copy()
    model, x = s.model, s.x

    def run_hook():
        with torch.no_grad():  # inference_on_dataset's context
            hook([x])
        return hook.records[-1]

    def run_inference():
        with torch.no_grad():
            return model([dict(x, image=image_float)])

    def run_inference_panoptic_only():
        # What inference costs without the detector-output branch (mask head on the final
        # detections + pasting their masks at full size), which panoptic_seg does not use.
        model.roi_heads.forward_with_given_boxes = lambda features, instances: instances
        try:
            return run_inference()
        finally:
            del model.roi_heads.forward_with_given_boxes  # back to the class's method

    tasks = {
        "hook": run_hook,
        "attack_floor": lambda: bare_attack_loop(
            model, x, s.steps, s.alpha, s.eps, s.seed, device
        ),
        "inference_floor": run_inference,
        "inference_panoptic_only": run_inference_panoptic_only,
    }
    for d in s.defended:
        tasks[f"defense_floor:{d}"] = lambda t=s.defenses[d]: t.apply_image(image_u8)
    return tasks


def _measure(tasks, reps, device):
    """Interleaved timings, the hook's records, the floor's images and inference outputs."""
    records, floor_advs, inference_outputs = [], [], {}

    def on_result(name, rep, value):
        if name == "hook":
            records.append(dict(value))
        elif name == "attack_floor":
            floor_advs.append(value)
        elif name.startswith("inference"):
            inference_outputs[name] = value[0]

    timings = bu.interleaved_timings(tasks, reps=reps, warmup=1, device=device, on_result=on_result)
    return timings, records, floor_advs, inference_outputs


def _breakdown(clock, timings, s, attack_s, perturb_cpu, defense_s, reps):
    """Component table for one clock ("wall" or "cpu")."""
    t = getattr(timings, clock)
    n_var = len(s.variants)
    hook_attack = attack_s if clock == "wall" else perturb_cpu
    inference_floor = [n_var * v for v in t["inference_floor"]]
    defense_floors = [sum(t[f"defense_floor:{d}"][i] for d in s.defended) for i in range(reps)]
    floor_full = [
        t["attack_floor"][i] + inference_floor[i] + defense_floors[i] for i in range(reps)
    ]
    rows = [_row(f"attack ({s.attack_name}, T={s.steps})", hook_attack, t["attack_floor"])]
    if clock == "wall":  # the hook records wall seconds of its defense calls only
        for d in s.defended:
            name = f"defense {d} (hook incl. tensor<->numpy)"
            rows.append(_row(name, defense_s[d], t[f"defense_floor:{d}"]))
        hook_defenses = [sum(defense_s[d][i] for d in s.defended) for i in range(reps)]
        rest = [t["hook"][i] - attack_s[i] - hook_defenses[i] for i in range(reps)]
        rows.append(_row(f"inference x{n_var} + bookkeeping", rest, inference_floor))
    else:
        rest = [t["hook"][i] - perturb_cpu[i] for i in range(reps)]
        floor_rest = [floor_full[i] - t["attack_floor"][i] for i in range(reps)]
        rows.append(_row(f"defenses + inference x{n_var} + bookkeeping", rest, floor_rest))
    rows.append(_row("full hook call", t["hook"], floor_full))
    return rows


DEFINITIONS = {
    "ratio": "median over repetitions of the per-repetition ratio hook / floor",
    "attack hook time": "wall: the hook's record['attack_s']; cpu: process_time around "
    "attack.perturb",
    "attack_floor": "T x (torch.manual_seed(image seed); train-mode forward with frozen norms; "
    "autograd.grad to the image; sign step; L-inf/box clip), one EventStorage",
    "full hook floor": "attack floor + variants x bare no_grad inference + bare defense "
    "apply_image on the uint8 HWC image",
}


def _headlines(args, s, ratios, cpu_rows, lean_ratio, same_panoptic, num_detections, attack_s, hw):
    attack_ratio, hook_ratio = ratios
    height, width = s.x["image"].shape[-2:]
    return [
        bu.headline(
            "attack-only / floor",
            attack_ratio,
            "x",
            f"{args.attack} eps {args.eps:g} T={s.steps}, wall; goal <= {GOAL}; "
            f"cpu-time ratio {bu.format_value(cpu_rows[0]['ratio'])}",
        ),
        bu.headline(
            "full hook / floor",
            hook_ratio,
            "x",
            f"attack + {'+'.join(s.variants)} inference, wall; cpu-time ratio "
            f"{bu.format_value(cpu_rows[-1]['ratio'])}",
        ),
        bu.headline(
            "inference without detector masks / full",
            lean_ratio,
            "x",
            f"same panoptic_seg: {'yes' if same_panoptic else 'NO'}; "
            f"{num_detections} detections whose masks the sweep never uses",
        ),
        bu.headline(
            "attack s per image",
            bu.median(attack_s),
            "s",
            f"{int(height)}x{int(width)}, batch 1, {hw['torch_threads']} threads",
        ),
    ]


def _panoptic_only_check(timings, inference_outputs):
    """Full inference's outputs, whether the panoptic-only inference gives the same
    panoptic_seg, and its time ratio to the full one."""
    import torch

    full_out = inference_outputs["inference_floor"]
    lean_out = inference_outputs["inference_panoptic_only"]
    same_panoptic = bool(
        torch.equal(full_out["panoptic_seg"][0], lean_out["panoptic_seg"][0])
        and full_out["panoptic_seg"][1] == lean_out["panoptic_seg"][1]
    )
    lean_ratio = bu.median(
        bu.paired_ratios(timings.wall["inference_panoptic_only"], timings.wall["inference_floor"])
    )
    return full_out, same_panoptic, lean_ratio


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    device = bu.prepare_run(args)
    reps = args.reps or (5 if args.quick else 11)
    s = _setup(args, device)
    s.eps, s.attack_name = args.eps, args.attack
    s.defended = [d for d in s.variants if s.defenses[d] is not None]
    hook, perturb_watch, adv = _instrumented_hook(s, device)
    timings, records, floor_advs, inference_outputs = _measure(
        _tasks(s, hook, adv, device), reps, device
    )
    perturb_cpu = perturb_watch.cpu[-reps:]  # timed reps only (the warm-up call came first)
    # Same work? The floor's adversarial image must equal the hook's.
    max_diff = float((floor_advs[-1].cpu() - adv.cpu()).abs().max())
    full_out, same_panoptic, lean_ratio = _panoptic_only_check(timings, inference_outputs)
    attack_s = [r["attack_s"] for r in records]
    defense_s = {d: [r["defense_s"][d] for r in records] for d in s.defended}
    wall_rows, cpu_rows = (
        _breakdown(clock, timings, s, attack_s, perturb_cpu, defense_s, reps)
        for clock in ("wall", "cpu")
    )
    attack_ratio, hook_ratio = wall_rows[0]["ratio"], wall_rows[-1]["ratio"]
    hw = bu.hardware_info(device)
    height, width = s.x["image"].shape[-2:]
    return {
        "hardware": hw,
        "device": device,
        "image_size": [int(height), int(width)],
        "batch_size": 1,
        "weights": args.weights or f"untrained (torch.manual_seed({args.seed}))",
        "attack": s.desc,
        "objective": OBJECTIVE,
        "defense_variants": s.variants,
        "repetitions": reps,
        "warmup": 1,
        "quick": bool(args.quick),
        "goal_attack_ratio": GOAL,
        "attack_ratio": attack_ratio,
        "attack_ratio_meets_goal": bool(attack_ratio <= GOAL),
        "attack_ratio_cpu": cpu_rows[0]["ratio"],
        "full_hook_ratio": hook_ratio,
        "full_hook_ratio_cpu": cpu_rows[-1]["ratio"],
        "floor_vs_hook_max_abs_diff": max_diff,
        "inference_panoptic_only_ratio": lean_ratio,
        "inference_panoptic_only_same_panoptic_seg": same_panoptic,
        "num_detections": len(full_out["instances"]),
        "attack_s_per_step": bu.median(attack_s) / s.steps,
        "floor_s_per_step": bu.median(timings.wall["attack_floor"]) / s.steps,
        "components_wall": wall_rows,
        "components_cpu": cpu_rows,
        "raw_seconds": {
            "wall": timings.wall,
            "cpu": timings.cpu,
            "hook_attack_s": attack_s,
            "hook_attack_cpu_s": perturb_cpu,
            "hook_defense_s": defense_s,
        },
        "definitions": DEFINITIONS,
        "headline": _headlines(
            args, s, (attack_ratio, hook_ratio), cpu_rows, lean_ratio, same_panoptic,
            len(full_out["instances"]), attack_s, hw,
        ),  # fmt: skip
    }


def _row(component, hook_s, floor_s):
    """A component row: medians of both series and the median per-repetition ratio."""
    return {
        "component": component,
        "hook_s": bu.median(hook_s),
        "floor_s": bu.median(floor_s),
        "ratio": bu.median(bu.paired_ratios(hook_s, floor_s)),
    }


def print_report(result: dict) -> None:
    """Print the hardware line and a short Markdown table of ``result``."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    h, w = result["image_size"]
    print(
        f"Image {h}x{w}, batch {result['batch_size']}, {result['repetitions']} interleaved reps "
        f"(medians of per-rep ratios), weights: {result['weights']}"
    )
    for clock in ("wall", "cpu"):
        rows = [
            [c["component"], c["hook_s"], c["floor_s"], c["ratio"]]
            for c in result[f"components_{clock}"]
        ]
        print(f"{clock} clock:")
        print(bu.format_table(["component", "hook s", "floor s", "hook / floor"], rows))
    met = "met" if result["attack_ratio_meets_goal"] else "NOT met"
    print(
        f"attack-only ratio {bu.format_value(result['attack_ratio'])} (goal <= {result['goal_attack_ratio']}: "
        f"{met}); floor vs hook adversarial image max |diff| = {result['floor_vs_hook_max_abs_diff']}"
    )
    print(
        f"inference without the detector-output branch (mask head on {result['num_detections']} "
        f"detections + full-size mask pasting) / full inference: "
        f"{bu.format_value(result['inference_panoptic_only_ratio'])} (identical panoptic_seg: "
        f"{result['inference_panoptic_only_same_panoptic_seg']})"
    )


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
