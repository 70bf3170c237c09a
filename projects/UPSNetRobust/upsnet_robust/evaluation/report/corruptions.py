# Copyright (c) UPSNetRobust authors.
"""The natural-corruption part of a report: mPC and rPC per defense, the per-family and
per-corruption means, and the metric-vs-severity figure.

A corruption cell is one that carries a ``corruption`` (and its ``severity``); adaptive cells
never do. mPC averages the headline metric over every corruption and severity that ran; rPC
divides it by the clean value of the same defense (docs/CORRUPTIONS.md).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ...corruptions import FAMILIES, FAMILY_NAMES, corruption_summary
from ._format import fmt, md_table, unique
from .cells import UNDEFENDED, CellLike, ResultCell, as_cells, clean_scores, report_kind

__all__ = [
    "METRIC_VS_SEVERITY_FILE",
    "corruption_cells",
    "corruption_markdown",
    "corruption_summaries",
    "metric_vs_severity_figure",
    "plot_metric_vs_severity",
]

METRIC_VS_SEVERITY_FILE = "metric_vs_severity.png"


def corruption_cells(cells: Sequence[CellLike]) -> List[ResultCell]:
    """The cells of corruption passes (those with a ``corruption``), in order."""
    return [c for c in as_cells(cells) if c.get("corruption") is not None]


def _values_by_defense(cells: Sequence[ResultCell]) -> "OrderedDict[str, Dict]":
    """defense -> {(corruption, severity): headline metric} (None where it has no score)."""
    out = OrderedDict()
    for c in cells:
        score = c.score
        out.setdefault(c.defense_name, {})[(c.get("corruption"), int(c.get("severity")))] = (
            float("nan") if score is None else score
        )
    return out


def corruption_summaries(cells: Sequence[CellLike]) -> Optional[Dict]:
    """``{"metric", "defenses": {defense: corruption_summary(...)}}`` of the corruption cells
    (None without any), each defense's rPC against that defense's clean cell."""
    cells = as_cells(cells)
    corrupted = corruption_cells(cells)
    if not corrupted:
        return None
    clean = clean_scores(cells)
    defenses = OrderedDict(
        (d, corruption_summary(values, clean.get(d)))
        for d, values in _values_by_defense(corrupted).items()
    )
    return {"metric": report_kind(cells).metric, "defenses": defenses}


def _threat_model(cells: Sequence[CellLike]) -> str:
    """The threat-model sentence of the kinds behind the corruption cells."""
    from ...threats import threat_kind

    names = unique((c.get("threat") or {}).get("kind") for c in corruption_cells(cells))
    texts = [threat_kind(n).threat_model for n in names if n]
    return "; ".join(texts) or "natural corruptions (imagecorruptions), no adversary"


def corruption_markdown(cells: Sequence[CellLike]) -> List[str]:
    """The report's "Natural corruptions" section (no lines without corruption cells)."""
    summary = corruption_summaries(cells)
    if summary is None:
        return []
    metric, defenses = summary["metric"], summary["defenses"]
    lines = [
        "## Natural corruptions",
        "",
        f"**Threat model:** {_threat_model(cells)}. mPC: mean {metric} over every corruption "
        f"and severity run; rPC = mPC / clean {metric} of the same defense (docs/CORRUPTIONS.md).",
        "",
        f"![{metric} vs severity]({METRIC_VS_SEVERITY_FILE})",
        "",
    ]
    rows = [[d, fmt(s["clean"]), fmt(s["mPC"]), fmt(s["rPC"], 3), str(s["num_cells"])]
            for d, s in defenses.items()]  # fmt: skip
    lines += md_table(["defense", f"clean {metric}", "mPC", "rPC", "cells"], rows) + [""]
    families = [f for f in FAMILY_NAMES if any(f in s["families"] for s in defenses.values())]
    rows = [[d] + [fmt(s["families"].get(f)) for f in families] for d, s in defenses.items()]
    lines += [f"Mean {metric} per family:", ""] + md_table(["defense"] + families, rows) + [""]
    for d, s in defenses.items():
        severities = sorted(s["severities"])
        values = {(c.get("corruption"), int(c.get("severity"))): c.score
                  for c in corruption_cells(cells) if c.defense_name == d}  # fmt: skip
        rows = [[name] + [fmt(values.get((name, sev))) for sev in severities] + [fmt(mean)]
                for name, mean in s["corruptions"].items()]  # fmt: skip
        header = ["corruption"] + [f"severity {sev}" for sev in severities] + ["mean"]
        lines += [f"{metric} per corruption and severity, defense `{d}`:", ""]
        lines += md_table(header, rows) + [""]
    failed = [c for c in corruption_cells(cells) if c.num_failed]
    if failed:
        lines += ["Images that could not be corrupted or scored (left out of their cells):", ""]
        lines += [f"- {c.get('corruption')} severity {c.get('severity')}, {c.defense_name}: "
                  + "; ".join(f"{f.get('image_id')}: {f.get('reason')}" for f in c.failures)
                  for c in failed] + [""]  # fmt: skip
    return lines


def _family_series(cells: Sequence[ResultCell], defense: str) -> "OrderedDict[str, List]":
    """family -> [(severity, mean metric over the family's corruptions)] for one defense."""
    points = OrderedDict()
    for c in cells:
        if c.defense_name != defense or c.score is None:
            continue
        family = next(f for f, names in FAMILIES.items() if c.get("corruption") in names)
        points.setdefault(family, {}).setdefault(int(c.get("severity")), []).append(c.score)
    ordered = OrderedDict()
    for family in FAMILY_NAMES:
        if family in points:
            ordered[family] = [(s, sum(v) / len(v)) for s, v in sorted(points[family].items())]
    return ordered


def metric_vs_severity_figure(cells: Sequence[CellLike]):
    """One panel per defense: the headline metric vs severity, one line per family (the mean
    over its corruptions), the clean value at severity 0."""
    from .plots import _MARKERS, _colors, _new_figure

    cells = as_cells(cells)
    metric = report_kind(cells).metric
    corrupted = corruption_cells(cells)
    defenses = unique(c.defense_name for c in corrupted)
    clean = clean_scores(cells)
    fig, axes = _new_figure(ncols=max(1, len(defenses)), width=5.5)
    colors = _colors(len(FAMILY_NAMES))
    for ax, defense in zip(axes, defenses):
        for family, pts in _family_series(corrupted, defense).items():
            i = FAMILY_NAMES.index(family)
            xs, ys = [s for s, _ in pts], [v for _, v in pts]
            if defense in clean:
                xs, ys = [0] + xs, [clean[defense]] + ys
            ax.plot(xs, ys, color=colors[i], marker=_MARKERS[i], linewidth=1.8, label=family)
        ax.set_xticks(range(6))
        ax.set_xticklabels(["clean"] + [str(s) for s in range(1, 6)])
        ax.set_xlabel("severity")
        ax.set_ylabel(metric)
        name = "undefended" if defense == UNDEFENDED else f"defense {defense}"
        ax.set_title(f"{metric} vs corruption severity ({name})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_metric_vs_severity(cells: Sequence[CellLike], path: str) -> Optional[str]:
    """Save :func:`metric_vs_severity_figure` to ``path``; None (nothing written) without
    corruption cells."""
    from .plots import _save_figure

    if not corruption_cells(cells):
        return None
    _save_figure(metric_vs_severity_figure(cells), path)
    return path
