# Copyright (c) UPSNetRobust authors.
"""What the report reads from the cells' breakdowns, and the worst case over attacks.

- :func:`worst_case_curve`: per defense and eps, the attacked cell with the lowest headline
  metric over every attack, objective and adaptive setting (an ensemble cell such as ``sea``
  counts like any attack); the robustness curve of the strongest adversary.
- :func:`size_series`: the headline metric of small / medium / large segments per attack and
  eps, undefended (panoptic breakdowns).
- :func:`per_class_drops`: per attack at its largest eps, undefended, each class's clean value,
  attacked value and drop.

Cells without a ``breakdown`` (sweeps from before breakdowns were recorded, tasks whose
evaluator gives none) are reported as n/a, never dropped silently. Markdown sections for the
last two are here too (:func:`size_section`, :func:`per_class_section`).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ._format import fmt, fmt_eps, md_table, unique
from .cells import UNDEFENDED, ReportKind, ResultCell, cell_order, finite

__all__ = [
    "PER_CLASS_METRIC",
    "SIZE_BUCKETS",
    "cell_per_class",
    "cell_size",
    "per_class_drops",
    "per_class_section",
    "series_name",
    "size_section",
    "size_series",
    "worst_case_curve",
]

# The per-class value each task's breakdown carries and the drop table compares.
PER_CLASS_METRIC = {"panoptic_seg": "PQ", "sem_seg": "IoU", "instances": "AP"}
# The size buckets of a panoptic breakdown, in order (see evaluation.panoptic_stats).
SIZE_BUCKETS = ("small", "medium", "large")


def _strongest(cells: Sequence[ResultCell]) -> Optional[ResultCell]:
    """The cell with the lowest headline score (the strongest setting), else the first."""
    scored = [c for c in cells if c.score is not None]
    if scored:
        return min(scored, key=lambda c: c.score)
    return cells[0] if cells else None


def _clean_undefended(cells: Sequence[ResultCell]) -> Optional[ResultCell]:
    return next((c for c in cells if c.is_clean and c.defense_name == UNDEFENDED), None)


def _undefended_attacks(cells: Sequence[ResultCell]) -> "OrderedDict":
    """Undefended, non-adaptive attacked cells by (attack, objective), then by eps."""
    out = OrderedDict()
    for c in cell_order(cells):
        if c.is_clean or c.is_adaptive or c.defense_name != UNDEFENDED:
            continue
        out.setdefault((c.attack, c.objective), OrderedDict()).setdefault(c.eps_value, []).append(c)
    return out


def series_name(attack, objective, objectives: int) -> str:
    """An attack's name, with its objective when the cells use several."""
    return str(attack) + (f" [{objective}]" if objectives > 1 else "")


# -- worst case -----------------------------------------------------------------------------------
def worst_case_curve(cells: Sequence[ResultCell]) -> "OrderedDict":
    """``{defense: [(eps, worst cell)]}``: at each eps (ascending) the scored attacked cell of
    that defense with the lowest headline metric, over every attack, objective, step count and
    adaptive setting. Defenses in order of appearance; eps where a defense has no scored cell
    are left out of its curve."""
    attacked = [c for c in cell_order(cells) if c.is_adversarial and c.score is not None]
    out = OrderedDict()
    for d in unique(c.defense_name for c in cell_order(cells)):
        mine = [c for c in attacked if c.defense_name == d]
        points = []
        for e in sorted({c.eps_value for c in mine}):
            points.append((e, min((c for c in mine if c.eps_value == e), key=lambda c: c.score)))
        if points:
            out[d] = points
    return out


# -- size -----------------------------------------------------------------------------------------
def cell_size(cell: Optional[ResultCell], metric: str = "PQ") -> Optional[Dict[str, float]]:
    """``{bucket: value}`` of a cell's size breakdown (None where a bucket has no value), or
    None when the cell has no size breakdown."""
    size = (cell.breakdown or {}).get("size") if cell is not None else None
    if not isinstance(size, dict):
        return None
    return {b: finite((size.get(b) or {}).get(metric)) for b in SIZE_BUCKETS}


def size_series(cells: Sequence[ResultCell], metric: str = "PQ") -> Dict:
    """The size breakdown of undefended cells: ``{"clean": {bucket: value} or None, "series":
    {(attack, objective): [(eps, {bucket: value})]}}``. At an eps with several cells (step
    counts, restarts) the strongest one (lowest headline metric) stands for it; points whose
    cell has no size breakdown are left out."""
    series = OrderedDict()
    for key, by_eps in _undefended_attacks(cells).items():
        points = []
        for e, group in by_eps.items():
            size = cell_size(_strongest(group), metric)
            if size is not None:
                points.append((e, size))
        if points:
            series[key] = points
    return {"clean": cell_size(_clean_undefended(cells), metric), "series": series}


def size_section(cells: Sequence[ResultCell], kind: ReportKind) -> List[str]:
    """Markdown: PQ, things and stuff PQ and PQ per size bucket, undefended (panoptic only)."""
    if kind.task != "panoptic_seg":
        return []
    md = ["", "## PQ by segment size, things and stuff", ""]
    md.append(
        "Undefended; each attack's strongest cell per eps. Size buckets by segment area relative "
        "to the image: small < 0.33 %, medium < 3 %, large otherwise (a TP or FN counts in its "
        "ground-truth segment's bucket, a FP in its own); `n` = categories averaged. "
        "n/a: the cell has no breakdown (a sweep from before breakdowns were recorded)."
    )
    md += ["", "![PQ by segment size](pq_by_size.png)", ""]
    rows = []
    clean = _clean_undefended(cells)
    if clean is not None:
        rows.append(_size_row("clean", "-", clean))
    objectives = len({k[1] for k in _undefended_attacks(cells)})
    for (attack, objective), by_eps in _undefended_attacks(cells).items():
        for e, group in by_eps.items():
            name = series_name(attack, objective, objectives)
            rows.append(_size_row(name, fmt_eps(e), _strongest(group)))
    header = ["attack", "eps", "PQ", "PQ things", "PQ stuff"]
    header += [f"PQ {b} (n)" for b in SIZE_BUCKETS]
    return md + md_table(header, rows)


def _size_row(name: str, eps: str, cell: ResultCell) -> List[str]:
    b = cell.breakdown or {}
    row = [name, eps, fmt(cell.get("PQ"))]
    row += [fmt((b.get(g) or {}).get("PQ")) for g in ("things", "stuff")]
    for bucket in SIZE_BUCKETS:
        entry = (b.get("size") or {}).get(bucket) or {}
        n = entry.get("n")
        row.append(fmt(entry.get("PQ")) + ("" if n is None else f" ({n})"))
    return row


# -- per class ------------------------------------------------------------------------------------
def cell_per_class(cell: Optional[ResultCell], value: str) -> Optional[Dict[str, float]]:
    """``{class name: value}`` of a cell's per-class breakdown, or None without one."""
    per_class = (cell.breakdown or {}).get("per_class") if cell is not None else None
    if not isinstance(per_class, dict):
        return None
    return {str(k): finite((v or {}).get(value)) for k, v in per_class.items()}


def _drop_rows(clean: Optional[Dict], attacked: Optional[Dict]) -> List[Dict]:
    names = unique(list(clean or {}) + list(attacked or {}))
    rows = []
    for name in names:
        c = (clean or {}).get(name)
        a = (attacked or {}).get(name)
        drop = c - a if c is not None and a is not None else None
        rows.append({"class": name, "clean": c, "attacked": a, "drop": drop})
    # largest drop first; rows without a drop at the end, in class order
    return sorted(rows, key=lambda r: (r["drop"] is None, -(r["drop"] or 0.0)))


def per_class_drops(cells: Sequence[ResultCell], task: str) -> List[Dict]:
    """Per (attack, objective), undefended and not adaptive, at the attack's largest eps:
    ``{"attack", "objective", "eps", "cell": the strongest cell there, "value": the per-class
    value compared (PQ, IoU or AP), "clean_available", "attacked_available", "rows": [{"class",
    "clean", "attacked", "drop"}]}``. ``drop`` = clean - attacked (None where either is
    missing); rows sorted by drop, largest first."""
    value = PER_CLASS_METRIC[task]
    clean = cell_per_class(_clean_undefended(cells), value)
    tables = []
    for (attack, objective), by_eps in _undefended_attacks(cells).items():
        eps = max(by_eps)
        cell = _strongest(by_eps[eps])
        attacked = cell_per_class(cell, value)
        tables.append(
            {
                "attack": attack,
                "objective": objective,
                "eps": eps,
                "cell": cell,
                "value": value,
                "clean_available": clean is not None,
                "attacked_available": attacked is not None,
                "rows": _drop_rows(clean, attacked),
            }
        )
    return tables


def per_class_section(cells: Sequence[ResultCell], kind: ReportKind) -> List[str]:
    """Markdown: one per-class drop table per attack (:func:`per_class_drops`)."""
    tables = per_class_drops(cells, kind.task)
    if not tables:
        return []
    v = PER_CLASS_METRIC[kind.task]
    md = ["", f"## Per-class {v} drop at the largest eps", ""]
    md.append(
        f"Undefended, per attack at its largest eps (its strongest cell there): each class's "
        f"clean {v}, attacked {v} and drop (clean - attacked), largest drop first. n/a: the "
        "cell has no per-class breakdown (a sweep from before breakdowns were recorded, or an "
        "evaluator without per-class results) or the class is absent from it."
    )
    objectives = len({t["objective"] for t in tables})
    for t in tables:
        name = series_name(t["attack"], t["objective"], objectives)
        md += ["", f"### {name} at eps {fmt_eps(t['eps'])}", ""]
        if not t["rows"]:
            md.append(f"n/a: neither the clean nor the attacked cell has per-class {v}.")
            continue
        missing = [w for w, ok in (("clean", t["clean_available"]),
                                   ("attacked", t["attacked_available"])) if not ok]
        if missing:
            md += [f"n/a: the {' and '.join(missing)} cell has no per-class breakdown.", ""]
        header = ["class", f"clean {v}", f"{name} {v}", "drop"]
        body = [[r["class"], fmt(r["clean"]), fmt(r["attacked"]), fmt(r["drop"])]
                for r in t["rows"]]
        md += md_table(header, body)
    return md
