# Copyright (c) UPSNetRobust authors.
"""The robustness-accuracy trade-off: per defense row (an input transform, a robustly trained
checkpoint, or both) its clean metric against its worst case over every attack at each eps.

A defense that wins robustness by giving up clean accuracy shows as a point to the left and up;
one that is better on both moves up and right. The table and figure appear when the report has
more than one defense row."""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ._format import fmt_eps
from .breakdowns import worst_case_curve
from .cells import CellLike, as_cells, clean_scores, report_kind

__all__ = ["TRADEOFF_FILE", "plot_tradeoff", "tradeoff_markdown", "tradeoff_rows"]

TRADEOFF_FILE = "robustness_accuracy_tradeoff.png"


def tradeoff_rows(cells: Sequence[CellLike]) -> "OrderedDict[str, Dict]":
    """``{defense: {"clean": value or None, "worst": {eps: (value, attack label)}}}`` for every
    defense row with a clean or an attacked cell, in order of appearance."""
    from ._format import attack_label

    cells = as_cells(cells)
    clean = clean_scores(cells)
    curves = worst_case_curve(cells)
    out = OrderedDict()
    for d in list(clean) + [d for d in curves if d not in clean]:
        worst = OrderedDict((e, (c.score, attack_label(c))) for e, c in curves.get(d, []))
        out[d] = {"clean": clean.get(d), "worst": worst}
    return out


def tradeoff_markdown(cells: Sequence[CellLike]) -> List[str]:
    """The report's trade-off section (empty with fewer than two defense rows)."""
    rows = tradeoff_rows(cells)
    if len(rows) < 2:
        return []
    metric = report_kind(as_cells(cells)).metric
    eps_values = sorted({e for r in rows.values() for e in r["worst"]})
    lines = [
        "## Robustness-accuracy trade-off",
        "",
        f"Per defense row (input transforms, robustly trained checkpoints of "
        f"`ROBUSTNESS.COMPARE_WEIGHTS`, and their combinations): clean {metric} and the worst "
        f"{metric} over every attack at each eps (the attack that reached it in brackets). "
        f"Figure: `{TRADEOFF_FILE}`.",
        "",
        "| defense | clean | " + " | ".join(f"worst, eps {fmt_eps(e)}" for e in eps_values) + " |",
        "|---" * (2 + len(eps_values)) + "|",
    ]
    for d, r in rows.items():
        cells_text = [_value(r["clean"])]
        for e in eps_values:
            value = r["worst"].get(e)
            cells_text.append(f"{_value(value[0])} ({value[1]})" if value else "–")
        lines.append(f"| {d} | " + " | ".join(cells_text) + " |")
    return lines


def _value(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.1f}"


def plot_tradeoff(cells: Sequence[CellLike], path: str) -> str:
    """One point per (defense row, eps): clean metric (x) against the worst case (y), a line
    per eps across the defense rows, each point labelled with its defense."""
    from .plots import _colors, _new_figure, _save_figure

    rows = tradeoff_rows(cells)
    metric = report_kind(as_cells(cells)).metric
    fig, (ax,) = _new_figure()
    eps_values = sorted({e for r in rows.values() for e in r["worst"]})
    for color, e in zip(_colors(max(1, len(eps_values))), eps_values):
        points = [(r["clean"], r["worst"][e][0], d) for d, r in rows.items()
                  if r["clean"] is not None and e in r["worst"]]
        if not points:
            continue
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color,
                linewidth=1.2, label=f"eps {fmt_eps(e)}")
        for x, y, d in points:
            ax.annotate(d, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                        color=color)
    ax.set_xlabel(f"clean {metric} (%)")
    ax.set_ylabel(f"worst-case {metric} over attacks (%)")
    title = "Robustness-accuracy trade-off"
    ax.set_title(title if eps_values else title + ": no attacked cells")
    if eps_values:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    return path
