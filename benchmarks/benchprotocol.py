# Copyright (c) UPSNetRobust authors.
"""Pure helpers of the benchmark suite about the sweep protocol: Kurakin's step rule restated,
the least work a sweep needs, and spans read from detectron2 logs (re-exported by
:mod:`benchutils`)."""

import datetime
import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["kurakin_steps", "parse_log_spans", "parse_log_times", "protocol_minimum"]


def kurakin_steps(eps: float) -> int:
    """T = max(1, ceil(min(eps + 4, 1.25 eps))) (docs/ATTACKS.md, I-FGSM, ceil rounding).

    An independent re-statement of the rule, so the sweep benchmark checks the package's step
    count instead of trusting it. Rounded to 9 decimals before ``ceil`` (float noise).
    """
    return max(1, math.ceil(round(min(eps + 4.0, 1.25 * eps), 9)))


def protocol_minimum(num_images: int, passes: Sequence[Dict], defenses: Sequence[str]) -> Dict:
    """The least work the sweep protocol needs.

    Per pass (clean, or one attack at one eps): every image is attacked with T forward +
    backward passes of the objective (T = 0 for clean, 1 for FGSM, Kurakin's T for
    I-FGSM/ILLC, ``num_steps`` otherwise), then inferred once per defense variant; each
    defended variant (every name but "none") calls its defense once per image. No
    forward-only objective evaluations are needed (no restarts); an attacked image's objective
    is evaluated once more, without a gradient, at its adversarial point (``loss_forward``: the
    cells' ``attack_loss``, which the attacks never compute after their last step).

    Args:
        num_images (int): images in the sweep.
        passes (list[dict]): each with ``attack`` ("clean" or a name) and ``eps``; an optional
            ``num_steps`` overrides the rule above.
        defenses (list[str]): the defense variants, e.g. ["none", "nlmeans"].

    Returns:
        dict: ``passes`` (per pass: ``attack``, ``eps``, ``T``, ``forward_backward``,
        ``forward_only``, ``loss_forward``, ``inference``, ``defense_calls`` {name: n}) and
        ``total`` (the same counts summed).
    """
    defended = [d for d in defenses if d != "none"]
    rows = []
    for spec in passes:
        attack = spec["attack"]
        if attack == "clean":
            steps = 0
        elif spec.get("num_steps"):
            steps = int(spec["num_steps"])
        elif attack == "fgsm":
            steps = 1
        elif attack in ("ifgsm", "bim", "illc"):
            steps = kurakin_steps(float(spec["eps"]))
        else:
            raise ValueError(f"give num_steps for attack '{attack}'")
        rows.append(
            {
                "attack": attack,
                "eps": float(spec.get("eps", 0.0)),
                "T": steps,
                "forward_backward": steps * num_images,
                "forward_only": 0,
                "loss_forward": num_images if steps else 0,
                "inference": num_images * len(defenses),
                "defense_calls": {d: num_images for d in defended},
            }
        )
    total = {
        "forward_backward": sum(r["forward_backward"] for r in rows),
        "forward_only": 0,
        "loss_forward": sum(r["loss_forward"] for r in rows),
        "inference": sum(r["inference"] for r in rows),
        "defense_calls": {d: sum(r["defense_calls"][d] for r in rows) for d in defended},
    }
    return {"passes": rows, "total": total}


_LOG_TIME = re.compile(r"^\[(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)")


def _log_seconds(line: str) -> Optional[int]:
    """Seconds (within the year) of a detectron2 log line ``[MM/DD HH:MM:SS ...]``, or None."""
    m = _LOG_TIME.match(line)
    if not m:
        return None
    month, day, hh, mm, ss = (int(g) for g in m.groups())
    # day-of-year is enough for spans within one year (a sweep crossing New Year is not)
    return ((datetime.date(2001, month, day).timetuple().tm_yday * 24 + hh) * 60 + mm) * 60 + ss


def parse_log_times(lines: Iterable[str], start_pattern: str, end_pattern: str) -> Optional[float]:
    """Seconds between the first log line matching ``start_pattern`` and the last matching
    ``end_pattern`` (detectron2 log timestamps ``[MM/DD HH:MM:SS ...]``, 1 s resolution).

    Returns:
        float or None: the span, or None when either line is missing.
    """
    start = end = None
    for line in lines:
        t = _log_seconds(line)
        if t is None:
            continue
        if start is None and re.search(start_pattern, line):
            start = t
        if re.search(end_pattern, line):
            end = t
    if start is None or end is None:
        return None
    return float(end - start)


def parse_log_spans(lines: Iterable[str], start_pattern: str, end_pattern: str) -> List[float]:
    """Seconds of every (``start_pattern`` line, next ``end_pattern`` line) pair of a
    detectron2 log (1 s resolution each), e.g. each PQ evaluation of a sweep."""
    spans, start = [], None
    for line in lines:
        t = _log_seconds(line)
        if t is None:
            continue
        if start is None and re.search(start_pattern, line):
            start = t
        elif start is not None and re.search(end_pattern, line):
            spans.append(float(t - start))
            start = None
    return spans
