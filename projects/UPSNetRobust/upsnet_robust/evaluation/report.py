# Copyright (c) UPSNetRobust authors.
"""Robustness report writers: pure functions of a sweep's cells (no model code).

A *cell* is one (attack, eps, defense, ...) result of a robustness sweep, a dict such as::

    {"attack": "ifgsm", "objective": "train_losses", "eps": 4.0, "num_steps": 5,
     "step_size": 1.0, "random_start": False, "restarts": 1, "defense": "nlmeans",
     "adaptive": False, "quantized": False, "PQ": 31.2, "SQ": 70.1, "RQ": 40.3,
     "PQ_th": 20.0, "PQ_st": 40.0, "attack_s_per_image": 1.23, "defense_s_per_image": 0.05,
     "num_images": 30, "num_failed": 0, "failures": [{"image_id": "x", "reason": "..."}]}

Clean cells have ``attack == "clean"`` and ``eps == 0``; ``defense == "none"`` marks undefended
cells. Adaptive cells (``"adaptive": true``: the attack differentiated through the defense, BPDA
and EOT) also carry ``surrogate``, ``eot_samples`` and ``attack_defense_s_per_image``. PQ-like
numbers are percentages (0-100). :func:`write_report` writes ``robustness.{json,csv,md}``,
``pq_vs_eps.png`` and ``time_vs_eps.png``, each atomically; :func:`defense_ranking` ranks the
defenses by their worst case.

Sanity checks (:func:`sanity_checks`, ATTACKS.md "an honest evaluation must report", item 5)
compare PQ values with an absolute tolerance of :data:`PQ_TOLERANCE` = 0.5 PQ points: a
stronger setting may score up to 0.5 points *above* a weaker one before it is flagged, which
absorbs evaluation noise on small image subsets (one segment flipping on 30 images moves PQ by
roughly that much) without hiding a real inversion. A violated check is always reported.
"""

import csv
import datetime
import io
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "CSV_COLUMNS",
    "PQ_TOLERANCE",
    "SINGLE_STEP_ATTACKS",
    "THREAT_MODEL",
    "defense_ranking",
    "format_table",
    "plot_pq_vs_eps",
    "plot_time_vs_eps",
    "pq_ratios",
    "sanity_checks",
    "write_report",
]

logger = logging.getLogger(__name__)

CLEAN = "clean"
UNDEFENDED = "none"

# Absolute tolerance, in PQ points (0-100 scale), of every sanity check.
PQ_TOLERANCE = 0.5

# Attacks that take one gradient step; every other non-clean attack counts as iterative.
SINGLE_STEP_ATTACKS = ("fgsm",)

# Column order of robustness.csv (stable: downstream scripts index by name or position).
CSV_COLUMNS = (
    "attack",
    "objective",
    "eps",
    "num_steps",
    "step_size",
    "defense",
    "adaptive",
    "PQ",
    "SQ",
    "RQ",
    "PQ_th",
    "PQ_st",
    "PQ_ratio",
    "attack_s_per_image",
    "defense_s_per_image",
    "num_images",
    "num_failed",
    "surrogate",
    "eot_samples",
)

THREAT_MODEL = (
    "attacks are white-box on the undefended model; defended cells score the same adversarial "
    "images after the defense (defense-unaware / gray-box) unless `adaptive` is true, in which "
    "case the attack ran against model o defense: the real defense forward, the VJP of a "
    "differentiable surrogate backward (BPDA, see `surrogate`), averaged over `eot_samples` "
    "random masks for randomised defenses (EOT)"
)

_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")

_FILES = OrderedDict(
    [
        ("json", "robustness.json"),
        ("csv", "robustness.csv"),
        ("md", "robustness.md"),
        ("pq_vs_eps", "pq_vs_eps.png"),
        ("time_vs_eps", "time_vs_eps.png"),
    ]
)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _num(value) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _is_clean(cell: Dict) -> bool:
    return cell.get("attack") == CLEAN


def _defense(cell: Dict) -> str:
    return str(cell.get("defense") or UNDEFENDED)


def _adaptive(cell: Dict) -> bool:
    return bool(cell.get("adaptive", False))


def _eps(cell: Dict) -> float:
    return float(cell.get("eps") or 0.0)


def _unique(values: Iterable) -> List:
    return list(OrderedDict.fromkeys(values))


def _fmt(value, digits: int = 2) -> str:
    v = _num(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_eps(eps: float) -> str:
    return f"{eps:g}"


def _jsonable(obj):
    """Plain JSON types: numpy scalars and arrays unwrapped, tuples listed, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _atomic_write(path: str, data, mode: str = "w") -> None:
    """Write ``data`` to a temp file in ``path``'s directory, then ``os.replace`` it in."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        kwargs = {"newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cell_order(cells: Sequence[Dict]) -> List[Dict]:
    """Clean cells first, then attacks in order of appearance; eps ascending; defenses and
    adaptive flags in order of appearance."""
    attacks = _unique(c.get("attack") for c in cells if not _is_clean(c))
    defenses = _unique(_defense(c) for c in cells)

    def key(c):
        a = -1 if _is_clean(c) else attacks.index(c.get("attack"))
        return (
            a,
            str(c.get("objective")),
            _adaptive(c),
            _eps(c),
            int(c.get("num_steps") or 0),
            int(c.get("restarts") or 1),
            defenses.index(_defense(c)),
        )

    return sorted(cells, key=key)


# ------------------------------------------------------------------------------------------------
# ratios to clean
# ------------------------------------------------------------------------------------------------
def _clean_pq_by_defense(cells: Sequence[Dict]) -> Dict[str, float]:
    """Clean PQ per defense (the first clean cell of each defense that has a PQ)."""
    out = {}
    for c in cells:
        pq = _num(c.get("PQ"))
        if _is_clean(c) and pq is not None and _defense(c) not in out:
            out[_defense(c)] = pq
    return out


def pq_ratios(cells: Sequence[Dict]) -> List[Optional[float]]:
    """PQ of each cell divided by the clean PQ of the same defense (falling back to the clean,
    undefended PQ when that defense has no clean cell); the analogue of the IoU ratio.

    Args:
        cells (list[dict]): sweep cells.

    Returns:
        list[float or None]: one ratio per cell, in order; None where the cell has no PQ or no
        usable (present, non-zero) clean reference exists.
    """
    clean = _clean_pq_by_defense(cells)
    ratios = []
    for c in cells:
        pq = _num(c.get("PQ"))
        ref = clean.get(_defense(c), clean.get(UNDEFENDED))
        ratios.append(None if pq is None or not ref else pq / ref)
    return ratios


# ------------------------------------------------------------------------------------------------
# sanity checks
# ------------------------------------------------------------------------------------------------
def _check(name: str, passed: bool, detail: str) -> Dict:
    return {"check": name, "passed": bool(passed), "detail": detail}


def _min_pq(cells: Iterable[Dict]) -> Optional[float]:
    values = [v for v in (_num(c.get("PQ")) for c in cells) if v is not None]
    return min(values) if values else None


def _series_label(*parts) -> str:
    return "/".join("-" if p is None else str(p) for p in parts)


def _ordered_not_weaker(points: List[Tuple[float, float]], tol: float) -> List[str]:
    """Points ``(strength, PQ)`` sorted by strength: each PQ must be <= the minimum PQ of every
    strictly weaker point + ``tol``. Returns a description of each violation."""
    bad = []
    best: Optional[Tuple[float, float]] = None  # (strength, PQ) of the lowest PQ so far
    i = 0
    while i < len(points):
        j = i
        while j < len(points) and points[j][0] == points[i][0]:
            j += 1
        group = points[i:j]
        if best is not None:
            for s, pq in group:
                if pq > best[1] + tol:
                    bad.append(f"{s:g}: PQ {pq:.2f} > {best[1]:.2f} at {best[0]:g} + {tol:g}")
        for s, pq in group:
            if best is None or pq < best[1]:
                best = (s, pq)
        i = j
    return bad


def sanity_checks(cells: Sequence[Dict], tol: float = PQ_TOLERANCE) -> List[Dict]:
    """Consistency checks an honest robustness evaluation reports (ATTACKS.md item 5).

    Every check compares PQ with an absolute tolerance ``tol`` in PQ points (default
    :data:`PQ_TOLERANCE` = 0.5): "A at least as strong as B" passes when
    ``PQ_A <= PQ_B + tol``. Cells without a finite PQ are left out of the comparisons and
    reported by the ``all_cells_scored`` check. Checks:

    - ``all_cells_scored``: every cell has a finite PQ (a missing PQ is a failed evaluation).
    - ``monotone_eps`` (a), one per (attack, objective, defense, adaptive) series: PQ is
      non-increasing in eps, with the clean cell of the same defense as eps 0. Each point is
      compared with the *lowest* PQ at any smaller eps (not only its neighbour), so a slow
      upward drift of less than ``tol`` per step is still caught. Where one eps has several
      cells (step counts, restarts) the lowest PQ stands for it; check (d) compares those.
    - ``iterative_vs_single_step`` (b), per (objective, eps, defense, adaptive) with both an
      "fgsm" cell and an iterative attack ("ifgsm", "pgd", "mifgsm", ...; every non-clean attack
      not in :data:`SINGLE_STEP_ATTACKS`): ``PQ_iterative <= PQ_fgsm + tol``. Keyed by
      objective, so ILLC (least-likely targets) is not held against FGSM on the training loss.
    - ``adaptive_vs_transfer`` (c), per (attack, objective, eps, defense) with both adaptive and
      non-adaptive cells: the strongest adaptive PQ <= the strongest non-adaptive PQ + ``tol``.
    - ``more_steps`` (d), per (attack, objective, eps, defense, adaptive) with several
      ``num_steps``: PQ at more steps <= the lowest PQ at fewer steps + ``tol``.
    - ``more_restarts``, the same over ``restarts`` at fixed ``num_steps`` (ATTACKS.md: "extra
      iterations or restarts change nothing").

    Args:
        cells (list[dict]): sweep cells.
        tol (float): tolerance in PQ points.

    Returns:
        list[dict]: ``{"check": name, "passed": bool, "detail": str}`` per check instance,
        violations included (never dropped). Kinds with no applicable cells produce no entry.
    """
    checks = []
    scored = [c for c in cells if _num(c.get("PQ")) is not None]
    missing = [c for c in cells if _num(c.get("PQ")) is None]
    checks.append(
        _check(
            "all_cells_scored",
            not missing,
            f"{len(scored)} of {len(cells)} cells have a finite PQ"
            + (
                "; missing: "
                + ", ".join(f"{c.get('attack')}@{_fmt_eps(_eps(c))}/{_defense(c)}" for c in missing)
                if missing
                else ""
            ),
        )
    )
    clean = {}
    for c in scored:
        if _is_clean(c):
            clean.setdefault(_defense(c), []).append(c)
    attacked = [c for c in scored if not _is_clean(c)]

    # (a) PQ non-increasing in eps.
    series = OrderedDict()
    for c in attacked:
        key = (c.get("attack"), c.get("objective"), _defense(c), _adaptive(c))
        series.setdefault(key, []).append(c)
    for (attack, objective, defense, adaptive), group in series.items():
        by_eps = OrderedDict()
        for c in sorted(group, key=_eps):
            by_eps.setdefault(_eps(c), []).append(c)
        points = [(e, _min_pq(cs)) for e, cs in by_eps.items()]
        if defense in clean:
            points.insert(0, (0.0, _min_pq(clean[defense])))
        bad = _ordered_not_weaker(points, tol)
        curve = ", ".join(
            f"{'clean' if (k == 0 and defense in clean) else _fmt_eps(e)}: {pq:.2f}"
            for k, (e, pq) in enumerate(points)
        )
        label = _series_label(attack, objective, defense) + (" (adaptive)" if adaptive else "")
        detail = f"PQ by eps [{curve}]"
        if bad:
            detail += "; increases beyond tolerance at eps " + "; ".join(bad)
        checks.append(_check(f"monotone_eps: {label}", not bad, detail))

    # (b) iterative at least as strong as single-step.
    by_setting = OrderedDict()
    for c in attacked:
        key = (c.get("objective"), _eps(c), _defense(c), _adaptive(c))
        by_setting.setdefault(key, []).append(c)
    for (objective, eps, defense, adaptive), group in by_setting.items():
        single = [c for c in group if c.get("attack") in SINGLE_STEP_ATTACKS]
        if not single:
            continue
        ref = _min_pq(single)
        for attack in _unique(c.get("attack") for c in group):
            if attack in SINGLE_STEP_ATTACKS:
                continue
            its = [c for c in group if c.get("attack") == attack]
            pq = _min_pq(its)
            steps = sorted({int(c.get("num_steps") or 0) for c in its})
            ok = pq <= ref + tol
            label = _series_label(attack, objective, defense) + (" (adaptive)" if adaptive else "")
            detail = (
                f"eps {_fmt_eps(eps)}: {attack} PQ {pq:.2f} (steps {steps}) vs fgsm PQ "
                f"{ref:.2f}; {'ok' if ok else 'iterative WEAKER than single-step'} (tol {tol:g})"
            )
            checks.append(
                _check(f"iterative_vs_single_step: {label} eps={_fmt_eps(eps)}", ok, detail)
            )

    # (c) adaptive at least as strong as non-adaptive.
    by_attack = OrderedDict()
    for c in attacked:
        key = (c.get("attack"), c.get("objective"), _eps(c), _defense(c))
        by_attack.setdefault(key, []).append(c)
    for (attack, objective, eps, defense), group in by_attack.items():
        ada = [c for c in group if _adaptive(c)]
        non = [c for c in group if not _adaptive(c)]
        if not ada or not non:
            continue
        pa, pn = _min_pq(ada), _min_pq(non)
        ok = pa <= pn + tol
        detail = (
            f"eps {_fmt_eps(eps)}: adaptive PQ {pa:.2f} vs non-adaptive PQ {pn:.2f}; "
            f"{'ok' if ok else 'adaptive WEAKER than transfer'} (tol {tol:g})"
        )
        label = _series_label(attack, objective, defense)
        checks.append(_check(f"adaptive_vs_transfer: {label} eps={_fmt_eps(eps)}", ok, detail))

    # (d) more steps not weaker; and more restarts not weaker at fixed steps.
    by_cfg = OrderedDict()
    for c in attacked:
        key = (c.get("attack"), c.get("objective"), _eps(c), _defense(c), _adaptive(c))
        by_cfg.setdefault(key, []).append(c)
    for (attack, objective, eps, defense, adaptive), group in by_cfg.items():
        label = _series_label(attack, objective, defense) + (" (adaptive)" if adaptive else "")
        steps = sorted({int(c.get("num_steps") or 0) for c in group})
        if len(steps) > 1:
            points = [
                (float(s), _min_pq(c for c in group if int(c.get("num_steps") or 0) == s))
                for s in steps
            ]
            bad = _ordered_not_weaker(points, tol)
            curve = ", ".join(f"{int(s)}: {pq:.2f}" for s, pq in points)
            detail = f"eps {_fmt_eps(eps)}: PQ by num_steps [{curve}]"
            if bad:
                detail += "; more steps WEAKER at steps " + "; ".join(bad)
            checks.append(_check(f"more_steps: {label} eps={_fmt_eps(eps)}", not bad, detail))
        for s in steps:
            same = [c for c in group if int(c.get("num_steps") or 0) == s]
            restarts = sorted({int(c.get("restarts") or 1) for c in same})
            if len(restarts) < 2:
                continue
            points = [
                (float(r), _min_pq(c for c in same if int(c.get("restarts") or 1) == r))
                for r in restarts
            ]
            bad = _ordered_not_weaker(points, tol)
            curve = ", ".join(f"{int(r)}: {pq:.2f}" for r, pq in points)
            detail = f"eps {_fmt_eps(eps)}, {s} steps: PQ by restarts [{curve}]"
            if bad:
                detail += "; more restarts WEAKER at restarts " + "; ".join(bad)
            checks.append(
                _check(f"more_restarts: {label} eps={_fmt_eps(eps)} steps={s}", not bad, detail)
            )
    return checks


# ------------------------------------------------------------------------------------------------
# defense ranking (ATTACKS.md, "an honest evaluation must report", items 2 and 3)
# ------------------------------------------------------------------------------------------------
def _first(cells: Iterable[Dict], key: str):
    return next((c.get(key) for c in cells if c.get(key) is not None), None)


def _mean_num(values) -> Optional[float]:
    values = [v for v in (_num(x) for x in values) if v is not None]
    return float(sum(values) / len(values)) if values else None


def defense_ranking(cells: Sequence[Dict]) -> List[Dict]:
    """Per defense: its clean cost, PQ under defense-unaware and adaptive attacks, its time, and
    its rank by the worst case.

    The worst case of a defense is the lowest PQ over all its attacked cells (every attack,
    objective, eps, and adaptive or not). Defenses are ranked by it (higher is better); ties go
    to the higher mean over eps of the per-eps worst case (the robustness curve, which still
    separates defenses when the largest eps drives all of them to 0), then to the higher clean
    PQ. "none" is ranked too, as the baseline (its attacks are white-box, i.e. already
    adaptive). A defense without adaptive cells is ``adaptively_evaluated: false``: its worst
    case is only an upper bound.

    Args:
        cells (list[dict]): sweep cells.

    Returns:
        list[dict]: one entry per defense, ranked ones first (``rank`` 1 = most robust; full
        ties share a rank), then defenses without attacked cells (``rank`` None). Keys: ``rank``, ``defense``,
        ``clean_PQ``, ``clean_PQ_cost`` (clean undefended PQ minus clean PQ with the defense),
        ``worst_PQ``, ``worst_setting`` (attack, objective, eps, adaptive of the worst cell),
        ``worst_PQ_unaware``, ``worst_PQ_adaptive``, ``mean_worst_PQ_over_eps``, ``per_eps``
        (list of ``{eps, unaware_PQ, adaptive_PQ, worst_PQ}``), ``adaptively_evaluated``,
        ``surrogate``, ``eot_samples``, ``defense_s_per_image`` (from its clean cell, else the
        mean over its cells) and ``adaptive_attack_s_per_image`` (mean over its adaptive cells).
    """
    clean = _clean_pq_by_defense(cells)
    ref = clean.get(UNDEFENDED)
    ordered = _cell_order(cells)
    attacked = [c for c in ordered if not _is_clean(c) and _num(c.get("PQ")) is not None]
    eps_values = sorted({_eps(c) for c in attacked})
    rows = []
    for d in _unique(_defense(c) for c in ordered):
        mine = [c for c in attacked if _defense(c) == d]
        unaware = [c for c in mine if not _adaptive(c)]
        adaptive = [c for c in mine if _adaptive(c)]
        per_eps = []
        for e in eps_values:
            u = _min_pq(c for c in unaware if _eps(c) == e)
            a = _min_pq(c for c in adaptive if _eps(c) == e)
            both = [v for v in (u, a) if v is not None]
            per_eps.append(
                {
                    "eps": e,
                    "unaware_PQ": u,
                    "adaptive_PQ": a,
                    "worst_PQ": min(both) if both else None,
                }
            )
        worst = min(mine, key=lambda c: _num(c.get("PQ"))) if mine else None
        curve = [p["worst_PQ"] for p in per_eps if p["worst_PQ"] is not None]
        clean_cell = next((c for c in ordered if _is_clean(c) and _defense(c) == d), None)
        if clean_cell is not None and _num(clean_cell.get("defense_s_per_image")) is not None:
            defense_s = _num(clean_cell.get("defense_s_per_image"))
        else:
            defense_s = _mean_num(c.get("defense_s_per_image") for c in mine)
        rows.append(
            {
                "rank": None,
                "defense": d,
                "clean_PQ": clean.get(d),
                "clean_PQ_cost": (ref - clean[d]) if ref is not None and d in clean else None,
                "worst_PQ": _num(worst.get("PQ")) if worst else None,
                "worst_setting": (
                    {
                        "attack": worst.get("attack"),
                        "objective": worst.get("objective"),
                        "eps": _eps(worst),
                        "adaptive": _adaptive(worst),
                    }
                    if worst
                    else None
                ),
                "worst_PQ_unaware": _min_pq(unaware),
                "worst_PQ_adaptive": _min_pq(adaptive),
                "mean_worst_PQ_over_eps": sum(curve) / len(curve) if curve else None,
                "per_eps": per_eps,
                "adaptively_evaluated": d == UNDEFENDED or bool(adaptive),
                "surrogate": _first(adaptive, "surrogate"),
                "eot_samples": _first(adaptive, "eot_samples"),
                "defense_s_per_image": 0.0 if d == UNDEFENDED else defense_s,
                "adaptive_attack_s_per_image": _mean_num(
                    c.get("attack_s_per_image") for c in adaptive
                ),
            }
        )
    def key(r):
        mean = r["mean_worst_PQ_over_eps"]
        return (
            -r["worst_PQ"],
            -(mean if mean is not None else -1.0),
            -(r["clean_PQ"] if r["clean_PQ"] is not None else -1.0),
        )

    ranked = sorted((r for r in rows if r["worst_PQ"] is not None), key=key)
    for i, r in enumerate(ranked):  # full ties share a rank ("1, 2, 2, 4")
        r["rank"] = ranked[i - 1]["rank"] if i and key(r) == key(ranked[i - 1]) else i + 1
    return ranked + [r for r in rows if r["worst_PQ"] is None]


def _ranking_markdown(ranking: Sequence[Dict], any_adaptive: bool) -> List[str]:
    md = ["", "## Defenses ranked by worst case", ""]
    if any_adaptive:
        md.append(
            "Worst case = lowest PQ over every attack, objective, eps and adaptive setting; rank 1 "
            "is the most robust (ties: mean of the per-eps worst case, then clean PQ). Cost = "
            "clean undefended PQ minus clean PQ with the defense. Per eps: PQ under the "
            "defense-unaware (transfer) attack / under the adaptive attack (BPDA surrogate, EOT "
            "samples in the last column). `none` is the baseline; its attacks are white-box."
        )
    else:
        md.append(
            "**No adaptive attack was run (ROBUSTNESS.ADAPTIVE False): defenses are not ranked.** "
            "The numbers below are under defense-unaware attacks only and overstate robustness "
            "against an adversary who knows the defense (Athalye et al., 2018)."
        )
    md.append("")
    eps_values = [p["eps"] for p in ranking[0]["per_eps"]] if ranking else []
    header = ["rank", "defense", "clean PQ", "cost"]
    header += [f"eps {_fmt_eps(e)} unaware / adaptive" for e in eps_values]
    header += ["worst PQ (setting)", "mean worst PQ", "defense s/img", "adaptive attack s/img"]
    header += ["surrogate (EOT)"]
    body = []
    for r in ranking:
        if any_adaptive and r["rank"] is not None:
            rank = str(r["rank"]) + ("" if r["adaptively_evaluated"] else " †")
        else:
            rank = "-"
        row = [rank, r["defense"], _fmt(r["clean_PQ"]), _fmt(r["clean_PQ_cost"])]
        for p in r["per_eps"]:
            u = _fmt(p["unaware_PQ"]).replace("n/a", "-")
            if r["defense"] == UNDEFENDED:
                row.append(f"{u} (white-box)")
            else:
                row.append(f"{u} / {_fmt(p['adaptive_PQ']).replace('n/a', '-')}")
        w = r["worst_setting"]
        setting = (
            f"{w['attack']}{' (adaptive)' if w['adaptive'] else ''} eps {_fmt_eps(w['eps'])}"
            if w
            else "-"
        )
        row += [f"{_fmt(r['worst_PQ'])} ({setting})", _fmt(r["mean_worst_PQ_over_eps"])]
        row += [_fmt(r["defense_s_per_image"], 3), _fmt(r["adaptive_attack_s_per_image"], 3)]
        sur = r["surrogate"] or "-"
        row.append(f"{sur} ({r['eot_samples']})" if r["eot_samples"] else sur)
        body.append(row)
    md += _md_table(header, body)
    if any_adaptive and any(not r["adaptively_evaluated"] and r["rank"] for r in ranking):
        md += ["", "† no adaptive attack on this defense: its worst case is an upper bound."]
    return md


# ------------------------------------------------------------------------------------------------
# terminal table
# ------------------------------------------------------------------------------------------------
def _attack_label(cell: Dict) -> str:
    return str(cell.get("attack")) + (" (adaptive)" if _adaptive(cell) else "")


def format_table(cells: Sequence[Dict]) -> str:
    """A compact fixed-width table for the terminal.

    Columns: attack ("(adaptive)" appended for adaptive cells), eps, defense, PQ, SQ, RQ and
    s/img = attack + defense seconds per image ("n/a" when the attack time is missing).
    Rows are sorted like the report (clean first, then attacks in order of appearance, eps
    ascending).

    Args:
        cells (list[dict]): sweep cells.

    Returns:
        str: the table, lines joined by "\\n" (no trailing newline).
    """
    header = ("attack", "eps", "defense", "PQ", "SQ", "RQ", "s/img")
    rows = []
    for c in _cell_order(cells):
        t_a, t_d = _num(c.get("attack_s_per_image")), _num(c.get("defense_s_per_image"))
        t = None if t_a is None else t_a + (t_d or 0.0)
        rows.append(
            (
                _attack_label(c),
                "clean" if _is_clean(c) else _fmt_eps(_eps(c)),
                _defense(c),
                _fmt(c.get("PQ"), 1),
                _fmt(c.get("SQ"), 1),
                _fmt(c.get("RQ"), 1),
                _fmt(t, 3),
            )
        )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    left = {0, 2}  # text columns left-aligned, numbers right-aligned

    def line(r):
        return "  ".join(
            r[i].ljust(widths[i]) if i in left else r[i].rjust(widths[i]) for i in range(len(r))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# CSV / JSON / Markdown
# ------------------------------------------------------------------------------------------------
def _csv_text(cells: Sequence[Dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for c, ratio in zip(cells, pq_ratios(cells)):
        row = {}
        for col in CSV_COLUMNS:
            value = ratio if col == "PQ_ratio" else c.get(col)
            if col == "defense":
                value = _defense(c)
            value = _jsonable(value)
            row[col] = "" if value is None else value
        writer.writerow(row)
    return buf.getvalue()


def _md_escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_escape(v) for v in r) + " |" for r in rows]
    return out


def _quantized_summary(cells: Sequence[Dict]) -> str:
    values = {bool(c.get("quantized", False)) for c in cells if not _is_clean(c)}
    if not values:
        return "n/a (no attacked cells)"
    if values == {True}:
        return "yes: adversarial images were rounded to uint8 before defense and model"
    if values == {False}:
        return "no: adversarial images stay float (eps < 1 is preserved)"
    return "mixed: see the `quantized` field of each cell in robustness.json"


def _markdown(cells: Sequence[Dict], metadata: Dict, checks: Sequence[Dict], tol: float) -> str:
    md = ["# UPSNet robustness report", ""]
    date = metadata.get("date") or datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"
    )
    md += [
        f"- **Date:** {date}",
        f"- **Hardware:** {metadata.get('hardware', 'not recorded')}",
        f"- **Config file:** {metadata.get('config_file', 'not recorded')}",
        f"- **Weights:** {metadata.get('weights', 'not recorded')}",
        f"- **Threat model:** {THREAT_MODEL}.",
        f"- **Adversarial images quantized to uint8:** {_quantized_summary(cells)}",
        "- **Units:** eps on the 0-255 pixel scale of the model's input format; PQ, SQ, RQ in %; "
        "times in seconds per image.",
    ]
    extra = [
        (k, v)
        for k, v in metadata.items()
        if k not in ("date", "hardware", "config_file", "weights")
    ]
    if extra:
        md += ["", "Other metadata:", ""]
        md += _md_table(
            ("key", "value"),
            [(k, v if isinstance(v, str) else json.dumps(_jsonable(v))) for k, v in extra],
        )
    n_fail = sum(1 for c in checks if not c["passed"])
    md += [
        "",
        f"Sanity checks: **{len(checks) - n_fail} of {len(checks)} passed**"
        + (f", **{n_fail} FAILED** (see below)." if n_fail else "."),
        "",
        "![PQ vs eps](pq_vs_eps.png)",
        "",
        "![time vs eps](time_vs_eps.png)",
    ]

    ratios = dict(zip(map(id, cells), pq_ratios(cells)))
    defenses = _unique(_defense(c) for c in _cell_order(cells))
    clean_cells = [c for c in cells if _is_clean(c)]

    # Clean PQ with each defense on: the defense's cost.
    md += ["", "## Clean", ""]
    if clean_cells:
        ref = _clean_pq_by_defense(cells).get(UNDEFENDED)
        body = []
        for c in _cell_order(clean_cells):
            pq = _num(c.get("PQ"))
            body.append(
                [_defense(c)]
                + [_fmt(c.get(m)) for m in _METRICS]
                + [_fmt(pq / ref if pq is not None and ref else None, 3)]
                + [_fmt(c.get("defense_s_per_image"), 3), str(c.get("num_images", "n/a"))]
            )
        header = ["defense", *_METRICS, "PQ / clean undefended", "defense s/img", "images"]
        md += _md_table(header, body)
    else:
        md += ["No clean cells: PQ ratios to clean are unavailable."]

    # Every defense side by side, ranked by its worst case (ATTACKS.md items 2 and 3).
    ranking = defense_ranking(cells)
    if any(r["defense"] != UNDEFENDED for r in ranking):
        md += _ranking_markdown(ranking, any(_adaptive(c) for c in cells if not _is_clean(c)))

    # One table per (attack, objective, adaptive): rows eps, metric columns per defense.
    attacked = [c for c in _cell_order(cells) if not _is_clean(c)]
    tables = OrderedDict()
    for c in attacked:
        tables.setdefault((c.get("attack"), c.get("objective"), _adaptive(c)), []).append(c)
    for (attack, objective, adaptive), group in tables.items():
        title = f"## Attack: {attack}" + (" (adaptive)" if adaptive else "")
        md += ["", title, ""]
        first = group[0]
        surrogates = _unique(
            f"{_defense(c)}: {c.get('surrogate') or 'n/a'}"
            + (f", EOT {c.get('eot_samples')}" if c.get("eot_samples") else "")
            for c in group
        )
        md.append(
            f"Objective: `{objective}`; "
            + (
                "adaptive (defense-aware) attack against model o defense, one pass per defense "
                "(BPDA surrogate, EOT samples: " + "; ".join(surrogates) + ")"
                if adaptive
                else "white-box on the undefended model"
            )
            + f"; random start: {bool(first.get('random_start', False))}."
        )
        md.append("")
        table_defs = [d for d in defenses if any(_defense(c) == d for c in group)]
        header = ["eps", "steps", "step size", "restarts"]
        for d in table_defs:
            header += [f"{d} {m}" for m in _METRICS] + [f"{d} PQ/clean"]
        header += ["attack s/img"] + [f"{d} defense s/img" for d in table_defs if d != UNDEFENDED]
        header += ["images", "failed"]
        rows = OrderedDict()
        # The clean row (eps 0) of each defense, for reference.
        clean_row = ["clean", "0", "-", "-"]
        for d in table_defs:
            cc = next((c for c in clean_cells if _defense(c) == d), None)
            clean_row += [_fmt(cc.get(m)) if cc else "-" for m in _METRICS]
            clean_row += [_fmt(ratios[id(cc)], 3) if cc else "-"]
        clean_row += ["-"] + [
            _fmt(
                next((c for c in clean_cells if _defense(c) == d), {}).get("defense_s_per_image"), 3
            )
            for d in table_defs
            if d != UNDEFENDED
        ]
        clean_row += ["-", "-"]
        for c in group:
            key = (
                _eps(c),
                int(c.get("num_steps") or 0),
                _num(c.get("step_size")),
                int(c.get("restarts") or 1),
            )
            rows.setdefault(key, []).append(c)
        body = [clean_row] if clean_cells else []
        for (eps, steps, step_size, restarts), rcells in rows.items():
            by_def = {_defense(c): c for c in rcells}
            row = [_fmt_eps(eps), str(steps), _fmt(step_size, 3), str(restarts)]
            for d in table_defs:
                c = by_def.get(d)
                row += [_fmt(c.get(m)) if c else "-" for m in _METRICS]
                row += [_fmt(ratios[id(c)], 3) if c else "-"]
            t_attack = [_num(c.get("attack_s_per_image")) for c in rcells]
            t_attack = [t for t in t_attack if t is not None]
            row += [_fmt(max(t_attack), 3) if t_attack else "n/a"]
            row += [
                _fmt(by_def[d].get("defense_s_per_image"), 3) if d in by_def else "-"
                for d in table_defs
                if d != UNDEFENDED
            ]
            row += [
                str(max(int(c.get("num_images") or 0) for c in rcells)),
                str(max(int(c.get("num_failed") or 0) for c in rcells)),
            ]
            body.append(row)
        md += _md_table(header, body)

    # Worst case over attacks per defense (ranking by the worst case, ATTACKS.md item 3).
    if attacked:
        md += ["", "## Worst case over attacks", ""]
        md.append("Lowest PQ over every attack, objective and adaptive setting at each eps.")
        md.append("")
        eps_values = sorted({_eps(c) for c in attacked})
        body = []
        for e in eps_values:
            row = [_fmt_eps(e)]
            for d in defenses:
                at = [
                    c
                    for c in attacked
                    if _eps(c) == e and _defense(c) == d and _num(c.get("PQ")) is not None
                ]
                if not at:
                    row.append("-")
                    continue
                worst = min(at, key=lambda c: _num(c.get("PQ")))
                row.append(f"{_fmt(worst.get('PQ'))} ({_attack_label(worst)})")
            body.append(row)
        md += _md_table(["eps"] + [f"{d} worst PQ (attack)" for d in defenses], body)

    # Sanity checks: every check, violations first and marked.
    md += ["", "## Sanity checks", ""]
    md.append(
        f"Tolerance: {tol:g} PQ points (a stronger setting may score at most {tol:g} points above "
        "a weaker one). Clean counts as eps 0 of each defense's series. Violations are listed "
        "first and are never dropped."
    )
    md.append("")
    for c in sorted(checks, key=lambda c: c["passed"]):
        mark = "PASS" if c["passed"] else "**FAIL**"
        md.append(f"- {mark} `{c['check']}`: {c['detail']}")
    kinds = {c["check"].split(":")[0] for c in checks}
    absent = [
        k
        for k in ("monotone_eps", "iterative_vs_single_step", "adaptive_vs_transfer", "more_steps")
        if k not in kinds
    ]
    if absent:
        md += [
            "",
            "No applicable cells (check not run): " + ", ".join(f"`{k}`" for k in absent) + ".",
        ]

    # Failures.
    md += ["", "## Failures", ""]
    failed = [c for c in _cell_order(cells) if c.get("failures") or int(c.get("num_failed") or 0)]
    if not failed:
        md.append("No image failed.")
    for c in failed:
        md.append(
            f"- {_attack_label(c)} eps={_fmt_eps(_eps(c))} defense={_defense(c)}: "
            f"{int(c.get('num_failed') or 0)} failed of "
            f"{int(c.get('num_images') or 0) + int(c.get('num_failed') or 0)} images"
        )
        for f in c.get("failures") or []:
            md.append(f"  - `{f.get('image_id')}`: {f.get('reason')}")
    md.append("")
    return "\n".join(md)


def write_report(
    cells: Sequence[Dict], output_dir: str, metadata: Optional[Dict] = None
) -> Dict[str, str]:
    """Write the robustness report of a sweep.

    Files (each written to a temp file and moved in with ``os.replace``):

    - ``robustness.json``: ``{"metadata": metadata, "cells": cells, "checks": checks}``
      (numpy values unwrapped, NaN/inf written as null), plus ``"defense_ranking"``
      (:func:`defense_ranking`) when the cells include adaptive attacks;
    - ``robustness.csv``: one row per cell, columns :data:`CSV_COLUMNS` (``PQ_ratio`` is PQ over
      the clean PQ of the same defense, or of "none");
    - ``robustness.md``: metadata header with the threat model, clean PQ per defense, the
      defenses side by side (clean cost, PQ under defense-unaware and adaptive attacks per eps,
      seconds per image; ranked by the worst case when adaptive attacks were run), one table
      per attack (rows eps; PQ/SQ/RQ/PQ_th/PQ_st and ratio per defense; seconds per image),
      worst case over attacks, sanity checks and failures;
    - ``pq_vs_eps.png`` (:func:`plot_pq_vs_eps`) and ``time_vs_eps.png``
      (:func:`plot_time_vs_eps`).

    Args:
        cells (list[dict]): sweep cells (see the module docstring).
        output_dir (str): directory (created if needed).
        metadata (dict): run description; ``date``, ``hardware``, ``config_file`` and
            ``weights`` head the Markdown report, other keys are listed below them.

    Returns:
        dict[str, str]: paths under keys "json", "csv", "md", "pq_vs_eps", "time_vs_eps".
    """
    cells = list(cells)
    metadata = dict(metadata or {})
    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, name) for k, name in _FILES.items()}
    checks = sanity_checks(cells)
    for c in checks:
        if not c["passed"]:
            logger.warning("Sanity check FAILED: %s: %s", c["check"], c["detail"])
    payload = {"metadata": metadata, "cells": cells, "checks": checks}
    if any(_adaptive(c) for c in cells if not _is_clean(c)):
        # A ranking without adaptive attacks would overstate robustness: only written with them.
        payload["defense_ranking"] = defense_ranking(cells)
    payload = _jsonable(payload)
    _atomic_write(paths["json"], json.dumps(payload, indent=2, allow_nan=False) + "\n")
    _atomic_write(paths["csv"], _csv_text(cells))
    _atomic_write(paths["md"], _markdown(cells, metadata, checks, PQ_TOLERANCE))
    plot_pq_vs_eps(cells, paths["pq_vs_eps"])
    plot_time_vs_eps(cells, paths["time_vs_eps"])
    logger.info("Robustness report written to %s", output_dir)
    return paths


# ------------------------------------------------------------------------------------------------
# plots (matplotlib Agg canvas; no pyplot, so no global backend switch)
# ------------------------------------------------------------------------------------------------
_DPI = 120


def _new_figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5 * ncols, 5.0), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save_figure(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    _atomic_write(path, buf.getvalue(), mode="wb")


def _series(cells: Sequence[Dict], value_key: str):
    """Attacked cells grouped by (attack, objective, defense, adaptive), as sorted
    ``(eps, value)`` points with eps > 0; several cells at one eps keep the lowest value for PQ
    (the strongest setting) and the highest for times (the most expensive one)."""
    reduce = min if value_key == "PQ" else max
    groups = OrderedDict()
    for c in _cell_order(cells):
        if _is_clean(c):
            continue
        v = _num(c.get(value_key))
        if v is None:
            continue
        if _eps(c) <= 0:
            logger.warning(
                "Cell %s at eps %s cannot be drawn on a log axis; skipped",
                c.get("attack"),
                c.get("eps"),
            )
            continue
        key = (c.get("attack"), c.get("objective"), _defense(c), _adaptive(c))
        groups.setdefault(key, OrderedDict()).setdefault(_eps(c), []).append(v)
    return OrderedDict(
        (k, [(e, reduce(vs)) for e, vs in sorted(pts.items())]) for k, pts in groups.items()
    )


def _label(attack, objective, defense, adaptive, objectives: int) -> str:
    name = str(attack) + (f" [{objective}]" if objectives > 1 else "")
    if defense == UNDEFENDED:
        return name + (" (adaptive)" if adaptive else " (attacked)")
    return f"{name} + {defense}" + (" (adaptive)" if adaptive else " (defended)")


def _style_log_eps(ax, eps_values: List[float]) -> None:
    if eps_values:
        ax.set_xscale("log")
        ax.set_xticks(eps_values)
        ax.set_xticklabels([_fmt_eps(e) for e in eps_values])
        ax.minorticks_off()
        lo, hi = min(eps_values), max(eps_values)
        ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("eps (L-inf budget, 0-255 pixel scale, log axis)")
    ax.grid(True, which="major", alpha=0.3)


def plot_pq_vs_eps(cells: Sequence[Dict], path: str) -> str:
    """PQ against eps (the study's Fig. 6).

    Clean PQ of each defense is a horizontal dashed line (eps is on a log axis, so the clean
    point cannot sit at eps 0). Each attack undefended is a solid line ("attacked"), each
    defense-unaware attack with each defense a dash-dot line ("defended"), each adaptive attack
    (BPDA/EOT through that defense) a dotted line in the same colour and marker as its
    defense-unaware counterpart. With several attacks: one colour per attack, one marker per
    defense, grey clean lines; with one attack: one colour per defense (its clean line too).
    Where one eps has several cells of a series (step counts, restarts) the lowest PQ is drawn.
    Many series put the legend beside the axes.

    Args:
        cells (list[dict]): sweep cells.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    fig, (ax,) = _new_figure()
    defenses = _unique(_defense(c) for c in _cell_order(cells))
    clean = _clean_pq_by_defense(cells)
    series = _series(cells, "PQ")
    attacks = _unique(k[0] for k in series)
    by_defense = len(attacks) <= 1  # one attack: colours tell the defenses apart
    colors = _colors(max(1, len(defenses) if by_defense else len(attacks)))
    greys = ["0.15", "0.45", "0.65", "0.3", "0.55", "0.75"]
    dashes = [(5, 3), (2, 2), (8, 3, 2, 3), (4, 1), (1, 3), (6, 2, 1, 2)]
    for i, d in enumerate(d for d in defenses if d in clean):
        label = "clean" if d == UNDEFENDED else f"clean + {d}"
        ax.axhline(
            clean[d],
            color=colors[defenses.index(d)] if by_defense else greys[i % len(greys)],
            linestyle="--",
            dashes=dashes[i % len(dashes)],
            linewidth=1.0 if by_defense else 1.2,
            alpha=0.7 if by_defense else 1.0,
            label=label,
        )
    markers = "osD^vP*Xh<>"
    objectives = len({k[1] for k in series})
    for (attack, objective, defense, adaptive), pts in series.items():
        linestyle = ":" if adaptive else ("-" if defense == UNDEFENDED else "-.")
        color = colors[defenses.index(defense)] if by_defense else colors[attacks.index(attack)]
        ax.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=color,
            marker=markers[defenses.index(defense) % len(markers)],
            linestyle=linestyle,
            linewidth=1.6,
            markersize=5,
            label=_label(attack, objective, defense, adaptive, objectives),
        )
    eps_values = sorted({e for pts in series.values() for e, _ in pts})
    _style_log_eps(ax, eps_values)
    ax.set_ylabel("PQ (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Panoptic quality under attack (PQ vs eps)")
    _legend(ax)
    _save_figure(fig, path)
    return path


def _legend(ax, max_inside: int = 8, outside: str = "right") -> None:
    """Legend inside the axes for a few entries; for many, beside them (``outside="right"``) or
    under them (``"below"``, for side-by-side panels)."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= max_inside:
        ax.legend(fontsize=8, loc="best")
    elif outside == "below":
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        ncol = 1 if len(handles) <= 24 else 2
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol)


def plot_time_vs_eps(cells: Sequence[Dict], path: str) -> str:
    """Attack and defense seconds per image against eps (the study's Fig. 7).

    Left: attack seconds per image per (attack, objective), and per attacked defense for the
    adaptive attacks (dotted; their cost includes the defense forwards and EOT samples). Right:
    defense seconds per image per (attack, defense), with each defense's cost on clean images as
    a dashed line.

    Args:
        cells (list[dict]): sweep cells.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    fig, (ax_a, ax_d) = _new_figure(ncols=2)
    attack_series = OrderedDict()
    for (attack, objective, defense, adaptive), pts in _series(cells, "attack_s_per_image").items():
        # A defense-unaware attack runs once per pass and every defense's cell repeats its
        # time: keep one curve. An adaptive pass attacks one defense: one curve per defense.
        key = (attack, objective, adaptive, defense if adaptive else None)
        if key not in attack_series or defense == UNDEFENDED:
            attack_series[key] = pts
    objectives = len({k[1] for k in attack_series})
    colors = _colors(max(1, len(attack_series)))
    for i, ((attack, objective, adaptive, defense), pts) in enumerate(attack_series.items()):
        label = _label(attack, objective, UNDEFENDED, False, objectives).replace(" (attacked)", "")
        if adaptive:
            label += f" vs {defense} (adaptive)"
        ax_a.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=colors[i],
            marker="o",
            linestyle=":" if adaptive else "-",
            label=label,
        )
    eps_a = sorted({e for pts in attack_series.values() for e, _ in pts})
    _style_log_eps(ax_a, eps_a)
    ax_a.set_ylabel("attack time (s / image)")
    ax_a.set_ylim(bottom=0)
    ax_a.set_title("Attack cost per image")

    defenses = [d for d in _unique(_defense(c) for c in _cell_order(cells)) if d != UNDEFENDED]
    dcolors = _colors(max(1, len(defenses)))
    dseries = _series([c for c in cells if _defense(c) != UNDEFENDED], "defense_s_per_image")
    attacks = _unique(k[0] for k in dseries)
    markers = "osD^vP*Xh<>"
    for (attack, objective, defense, adaptive), pts in dseries.items():
        ax_d.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=dcolors[defenses.index(defense)],
            marker=markers[attacks.index(attack) % len(markers)],
            linestyle=":" if adaptive else "-",
            label=_label(attack, objective, defense, adaptive, objectives),
        )
    for c in cells:
        t = _num(c.get("defense_s_per_image"))
        if _is_clean(c) and _defense(c) in defenses and t is not None:
            ax_d.axhline(
                t,
                color=dcolors[defenses.index(_defense(c))],
                linestyle="--",
                linewidth=1.0,
                label=f"clean + {_defense(c)}",
            )
    eps_d = sorted({e for pts in dseries.values() for e, _ in pts})
    _style_log_eps(ax_d, eps_d)
    ax_d.set_ylabel("defense time (s / image)")
    ax_d.set_ylim(bottom=0)
    ax_d.set_title("Defense cost per image" + ("" if defenses else " (no defenses)"))
    for ax in (ax_a, ax_d):
        _legend(ax, outside="below")
    fig.suptitle("Time per image vs eps")
    _save_figure(fig, path)
    return path


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
