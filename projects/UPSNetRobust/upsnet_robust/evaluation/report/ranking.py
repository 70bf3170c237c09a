# Copyright (c) UPSNetRobust authors.
"""Defenses ranked by their worst case under every attack that was run against them.

An honest defense evaluation reports each defense's cost on clean images, its score under
defense-unaware and under adaptive attacks, its time, and ranks defenses by their worst case:
an adversary picks the strongest attack, so the best average says little.
"""

from typing import Dict, Iterable, List, Optional, Sequence

from ._format import min_score, unique
from .cells import UNDEFENDED, CellLike, ResultCell, as_cells, cell_order, clean_scores
from .cells import finite, report_kind

__all__ = ["defense_ranking"]


def _first(cells: Iterable[ResultCell], key: str):
    return next((c.get(key) for c in cells if c.get(key) is not None), None)


def _mean(values) -> Optional[float]:
    values = [v for v in (finite(x) for x in values) if v is not None]
    return float(sum(values) / len(values)) if values else None


def _per_eps(unaware, adaptive, eps_values, m: str) -> List[Dict]:
    rows = []
    for e in eps_values:
        u = min_score(c for c in unaware if c.eps_value == e)
        a = min_score(c for c in adaptive if c.eps_value == e)
        both = [v for v in (u, a) if v is not None]
        rows.append(
            {
                "eps": e,
                f"unaware_{m}": u,
                f"adaptive_{m}": a,
                f"worst_{m}": min(both) if both else None,
            }
        )
    return rows


def _defense_row(d: str, ordered, attacked, clean, eps_values, m: str) -> Dict:
    mine = [c for c in attacked if c.defense_name == d]
    unaware = [c for c in mine if not c.is_adaptive]
    adaptive = [c for c in mine if c.is_adaptive]
    per_eps = _per_eps(unaware, adaptive, eps_values, m)
    worst = min(mine, key=lambda c: c.score) if mine else None
    curve = [p[f"worst_{m}"] for p in per_eps if p[f"worst_{m}"] is not None]
    clean_cell = next((c for c in ordered if c.is_clean and c.defense_name == d), None)
    if clean_cell is not None and clean_cell.value("defense_s_per_image") is not None:
        defense_s = clean_cell.value("defense_s_per_image")
    else:
        defense_s = _mean(c.defense_s_per_image for c in mine)
    ref = clean.get(UNDEFENDED)
    return {
        "rank": None,
        "defense": d,
        "metric": m,
        f"clean_{m}": clean.get(d),
        f"clean_{m}_cost": (ref - clean[d]) if ref is not None and d in clean else None,
        f"worst_{m}": worst.score if worst else None,
        "worst_setting": (
            {
                "attack": worst.attack,
                "objective": worst.objective,
                "eps": worst.eps_value,
                "adaptive": worst.is_adaptive,
            }
            if worst
            else None
        ),
        f"worst_{m}_unaware": min_score(unaware),
        f"worst_{m}_adaptive": min_score(adaptive),
        f"mean_worst_{m}_over_eps": sum(curve) / len(curve) if curve else None,
        "per_eps": per_eps,
        "adaptively_evaluated": d == UNDEFENDED or bool(adaptive),
        "surrogate": _first(adaptive, "surrogate"),
        "eot_samples": _first(adaptive, "eot_samples"),
        "defense_s_per_image": 0.0 if d == UNDEFENDED else defense_s,
        "adaptive_attack_s_per_image": _mean(c.attack_s_per_image for c in adaptive),
    }


def defense_ranking(cells: Sequence[CellLike]) -> List[Dict]:
    """Per defense: its clean cost, its score under defense-unaware and adaptive attacks, its
    time, and its rank by the worst case. Scores are the cells' headline metric ``M`` (PQ,
    mIoU or AP), which names the keys below.

    The worst case of a defense is the lowest score over all its attacked cells (every attack,
    objective, eps, and adaptive or not). Defenses are ranked by it (higher is better); ties go
    to the higher mean over eps of the per-eps worst case (the robustness curve, which still
    separates defenses when the largest eps drives all of them to 0), then to the higher clean
    score. "none" is ranked too, as the baseline (its attacks are white-box, i.e. already
    adaptive). A defense without adaptive cells is ``adaptively_evaluated: false``: its worst
    case is only an upper bound.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task.

    Returns:
        list[dict]: one entry per defense, ranked ones first (``rank`` 1 = most robust; full
        ties share a rank), then defenses without attacked cells (``rank`` None). Keys:
        ``rank``, ``defense``, ``metric`` (= M), ``clean_M``, ``clean_M_cost`` (clean
        undefended score minus clean score with the defense), ``worst_M``, ``worst_setting``
        (attack, objective, eps, adaptive of the worst cell), ``worst_M_unaware``,
        ``worst_M_adaptive``, ``mean_worst_M_over_eps``, ``per_eps`` (list of ``{eps,
        unaware_M, adaptive_M, worst_M}``), ``adaptively_evaluated``, ``surrogate``,
        ``eot_samples``, ``defense_s_per_image`` (from its clean cell, else the mean over its
        cells) and ``adaptive_attack_s_per_image`` (mean over its adaptive cells). For a
        panoptic sweep M is PQ: ``worst_PQ``, ``clean_PQ``, ...
    """
    cells = as_cells(cells)
    m = report_kind(cells).metric
    clean = clean_scores(cells)
    ordered = cell_order(cells)
    attacked = [c for c in ordered if c.is_adversarial and c.score is not None]
    eps_values = sorted({c.eps_value for c in attacked})
    rows = [
        _defense_row(d, ordered, attacked, clean, eps_values, m)
        for d in unique(c.defense_name for c in ordered)
    ]

    def key(r):
        mean, clean_value = r[f"mean_worst_{m}_over_eps"], r[f"clean_{m}"]
        return (
            -r[f"worst_{m}"],
            -(mean if mean is not None else -1.0),
            -(clean_value if clean_value is not None else -1.0),
        )

    ranked = sorted((r for r in rows if r[f"worst_{m}"] is not None), key=key)
    for i, r in enumerate(ranked):  # full ties share a rank ("1, 2, 2, 4")
        r["rank"] = ranked[i - 1]["rank"] if i and key(r) == key(ranked[i - 1]) else i + 1
    return ranked + [r for r in rows if r[f"worst_{m}"] is None]
