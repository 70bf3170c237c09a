# Copyright (c) UPSNetRobust authors.
"""The report's figures: headline metric vs eps, its worst case over attacks vs eps, PQ by
segment size vs eps, and time per image vs eps.

Drawn on a matplotlib Agg canvas (no pyplot, so no global backend switch) and written
atomically.
"""

import io
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence

from ...utils.io import atomic_write
from ._format import attack_label, fmt_eps, unique
from .breakdowns import SIZE_BUCKETS, series_name, size_series, worst_case_curve
from .cells import UNDEFENDED, CellLike, ResultCell, as_cells, cell_order, clean_scores
from .cells import report_kind

__all__ = [
    "metric_vs_eps_figure",
    "plot_pq_by_size",
    "plot_pq_vs_eps",
    "plot_time_vs_eps",
    "plot_worst_case_vs_eps",
    "pq_by_size_figure",
    "worst_case_figure",
]

logger = logging.getLogger(__name__)

_DPI = 120
_MARKERS = "osD^vP*Xh<>"
_TASK_TITLES = {
    "panoptic_seg": "Panoptic quality",
    "sem_seg": "Semantic segmentation",
    "instances": "Instance segmentation",
}


def _new_figure(ncols: int = 1, width: float = 7.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 5.0), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save_figure(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    atomic_write(path, buf.getvalue(), mode="wb")


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _series(cells: Sequence[ResultCell], value_key: str, reduce=min):
    """Attacked cells grouped by (attack, objective, defense, adaptive), as sorted
    ``(eps, value)`` points with eps > 0; several cells at one eps are reduced with ``reduce``
    (min for a metric: the strongest setting; max for times: the most expensive one)."""
    groups = OrderedDict()
    for c in cell_order(cells):
        v = c.value(value_key)
        if c.is_clean or v is None:
            continue
        if c.eps_value <= 0:
            logger.warning(
                "Cell %s at eps %s cannot be drawn on a log axis; skipped", c.attack, c.eps
            )
            continue
        key = (c.attack, c.objective, c.defense_name, c.is_adaptive)
        groups.setdefault(key, OrderedDict()).setdefault(c.eps_value, []).append(v)
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
        ax.set_xticklabels([fmt_eps(e) for e in eps_values])
        ax.minorticks_off()
        lo, hi = min(eps_values), max(eps_values)
        ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("eps (L-inf budget, 0-255 pixel scale, log axis)")
    ax.grid(True, which="major", alpha=0.3)


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


def metric_vs_eps_figure(cells: Sequence[CellLike]):
    """The figure :func:`plot_pq_vs_eps` saves (a matplotlib ``Figure`` with one axes)."""
    cells = as_cells(cells)
    kind = report_kind(cells)
    fig, (ax,) = _new_figure()
    defenses = unique(c.defense_name for c in cell_order(cells))
    clean = clean_scores(cells)
    series = _series(cells, kind.metric, min)
    attacks = unique(k[0] for k in series)
    by_defense = len(attacks) <= 1  # one attack: colours tell the defenses apart
    colors = _colors(max(1, len(defenses) if by_defense else len(attacks)))
    greys = ["0.15", "0.45", "0.65", "0.3", "0.55", "0.75"]
    dashes = [(5, 3), (2, 2), (8, 3, 2, 3), (4, 1), (1, 3), (6, 2, 1, 2)]
    for i, d in enumerate(d for d in defenses if d in clean):
        ax.axhline(
            clean[d],
            color=colors[defenses.index(d)] if by_defense else greys[i % len(greys)],
            linestyle="--",
            dashes=dashes[i % len(dashes)],
            linewidth=1.0 if by_defense else 1.2,
            alpha=0.7 if by_defense else 1.0,
            label="clean" if d == UNDEFENDED else f"clean + {d}",
        )
    objectives = len({k[1] for k in series})
    for (attack, objective, defense, adaptive), pts in series.items():
        ax.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=colors[defenses.index(defense)] if by_defense else colors[attacks.index(attack)],
            marker=_MARKERS[defenses.index(defense) % len(_MARKERS)],
            linestyle=":" if adaptive else ("-" if defense == UNDEFENDED else "-."),
            linewidth=1.6,
            markersize=5,
            label=_label(attack, objective, defense, adaptive, objectives),
        )
    _style_log_eps(ax, sorted({e for pts in series.values() for e, _ in pts}))
    ax.set_ylabel(f"{kind.metric} (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{_TASK_TITLES[kind.task]} under attack ({kind.metric} vs eps)")
    _legend(ax)
    return fig


def plot_pq_vs_eps(cells: Sequence[CellLike], path: str) -> str:
    """The headline metric (PQ, mIoU or AP: the cells' ``metric``) against eps; the name and
    the file name ``pq_vs_eps.png`` date from the panoptic-only report and are kept.

    The clean score of each defense is a horizontal dashed line (eps is on a log axis, so the
    clean point cannot sit at eps 0). Each attack undefended is a solid line ("attacked"), each
    defense-unaware attack with each defense a dash-dot line ("defended"), each adaptive attack
    (BPDA/EOT through that defense) a dotted line in the same colour and marker as its
    defense-unaware counterpart. With several attacks: one colour per attack, one marker per
    defense, grey clean lines; with one attack: one colour per defense (its clean line too).
    Where one eps has several cells of a series (step counts, restarts) the lowest score is
    drawn. Many series put the legend beside the axes.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    _save_figure(metric_vs_eps_figure(cells), path)
    return path


def _plot_attack_times(ax, cells: Sequence[ResultCell]) -> int:
    """Attack seconds per image per (attack, objective); returns the number of objectives."""
    attack_series = OrderedDict()
    for (attack, objective, defense, adaptive), pts in _series(
        cells, "attack_s_per_image", max
    ).items():
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
        ax.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=colors[i],
            marker="o",
            linestyle=":" if adaptive else "-",
            label=label,
        )
    _style_log_eps(ax, sorted({e for pts in attack_series.values() for e, _ in pts}))
    ax.set_ylabel("attack time (s / image)")
    ax.set_ylim(bottom=0)
    ax.set_title("Attack cost per image")
    return objectives


def _plot_defense_times(ax, cells: Sequence[ResultCell], objectives: int) -> None:
    """Defense seconds per image per (attack, defense), clean costs as dashed lines."""
    defenses = [d for d in unique(c.defense_name for c in cell_order(cells)) if d != UNDEFENDED]
    colors = _colors(max(1, len(defenses)))
    series = _series([c for c in cells if c.defense_name != UNDEFENDED], "defense_s_per_image", max)
    attacks = unique(k[0] for k in series)
    for (attack, objective, defense, adaptive), pts in series.items():
        ax.plot(
            [e for e, _ in pts],
            [v for _, v in pts],
            color=colors[defenses.index(defense)],
            marker=_MARKERS[attacks.index(attack) % len(_MARKERS)],
            linestyle=":" if adaptive else "-",
            label=_label(attack, objective, defense, adaptive, objectives),
        )
    for c in cells:
        t = c.value("defense_s_per_image")
        if c.is_clean and c.defense_name in defenses and t is not None:
            ax.axhline(
                t,
                color=colors[defenses.index(c.defense_name)],
                linestyle="--",
                linewidth=1.0,
                label=f"clean + {c.defense_name}",
            )
    _style_log_eps(ax, sorted({e for pts in series.values() for e, _ in pts}))
    ax.set_ylabel("defense time (s / image)")
    ax.set_ylim(bottom=0)
    ax.set_title("Defense cost per image" + ("" if defenses else " (no defenses)"))


def plot_time_vs_eps(cells: Sequence[CellLike], path: str) -> str:
    """Attack and defense seconds per image against eps.

    Left: attack seconds per image per (attack, objective), and per attacked defense for the
    adaptive attacks (dotted; their cost includes the defense forwards and EOT samples). Right:
    defense seconds per image per (attack, defense), with each defense's cost on clean images as
    a dashed line.

    Args:
        cells (list[dict or ResultCell]): sweep cells.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    cells = as_cells(cells)
    fig, (ax_a, ax_d) = _new_figure(ncols=2)
    objectives = _plot_attack_times(ax_a, cells)
    _plot_defense_times(ax_d, cells, objectives)
    for ax in (ax_a, ax_d):
        _legend(ax, outside="below")
    fig.suptitle("Time per image vs eps")
    _save_figure(fig, path)
    return path


def _clean_lines(ax, clean: Dict[str, float], colors: Dict[str, object]) -> None:
    """Clean values as horizontal dashed lines (eps 0 cannot sit on the log axis)."""
    for name, value in clean.items():
        ax.axhline(value, color=colors[name], linestyle="--", linewidth=1.0, alpha=0.8,
                   label=f"clean{'' if name == UNDEFENDED else ' + ' + name} (eps 0)")


def worst_case_figure(cells: Sequence[CellLike]):
    """The figure :func:`plot_worst_case_vs_eps` saves."""
    cells = as_cells(cells)
    kind = report_kind(cells)
    fig, (ax,) = _new_figure()
    curves = worst_case_curve(cells)
    defenses = unique(c.defense_name for c in cell_order(cells))
    palette = _colors(max(1, len(defenses)))
    colors = {d: palette[i] for i, d in enumerate(defenses)}
    clean = clean_scores(cells)
    _clean_lines(ax, {d: v for d, v in clean.items() if d in curves}, colors)
    for i, (d, points) in enumerate(curves.items()):
        xs, ys = [e for e, _ in points], [c.score for _, c in points]
        ax.plot(xs, ys, color=colors[d], marker=_MARKERS[i % len(_MARKERS)], linewidth=1.8,
                label=f"worst case{'' if d == UNDEFENDED else ' + ' + d}")
        for x, y, (_, c) in zip(xs, ys, points):  # which attack is worst there
            ax.annotate(attack_label(c), (x, y), textcoords="offset points",
                        xytext=(4, 4 if i % 2 == 0 else -11),
                        fontsize=7, color=colors[d])
    _style_log_eps(ax, sorted({e for pts in curves.values() for e, _ in pts}))
    ax.set_ylabel(f"worst-case {kind.metric} (%)")
    ax.set_ylim(bottom=0)
    title = f"Worst case over attacks ({kind.metric} vs eps)"
    ax.set_title(title if curves else title + ": no attacked cells")
    _legend(ax)
    return fig


def plot_worst_case_vs_eps(cells: Sequence[CellLike], path: str) -> str:
    """The robustness curve of the strongest adversary: per defense, the headline metric's
    per-eps minimum over every attack, objective, step count and adaptive setting (an ensemble
    cell such as ``sea`` counts like any attack; :func:`~.breakdowns.worst_case_curve`), each
    point labelled with the attack that reached it; clean scores as dashed lines.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    _save_figure(worst_case_figure(cells), path)
    return path


def pq_by_size_figure(cells: Sequence[CellLike]):
    """The figure :func:`plot_pq_by_size` saves (one panel per size bucket)."""
    cells = as_cells(cells)
    fig, axes = _new_figure(ncols=len(SIZE_BUCKETS), width=5.0)
    data = size_series(cells)
    series = data["series"]
    objectives = len({k[1] for k in series})
    colors = _colors(max(1, len(series)))
    eps_values = sorted({e for pts in series.values() for e, _ in pts})
    top = [v for pts in series.values() for _, s in pts for v in s.values() if v is not None]
    top += [v for v in (data["clean"] or {}).values() if v is not None]
    for ax, bucket in zip(axes, SIZE_BUCKETS):
        clean = (data["clean"] or {}).get(bucket)
        if clean is not None:
            _clean_lines(ax, {UNDEFENDED: clean}, {UNDEFENDED: "0.3"})
        for i, ((attack, objective), pts) in enumerate(series.items()):
            pts = [(e, s[bucket]) for e, s in pts if s[bucket] is not None]
            ax.plot([e for e, _ in pts], [v for _, v in pts], color=colors[i],
                    marker=_MARKERS[i % len(_MARKERS)], linewidth=1.6, markersize=5,
                    label=series_name(attack, objective, objectives))
        _style_log_eps(ax, eps_values)
        ax.set_ylabel(f"PQ of {bucket} segments (%)")
        ax.set_ylim(0, max(top) * 1.05 + 1 if top else 100)
        ax.set_title(f"{bucket} segments")
        _legend(ax, outside="below")
    if not series and data["clean"] is None:
        fig.suptitle("PQ by segment size: n/a (no size breakdown in these cells)")
    else:
        fig.suptitle("PQ by segment size vs eps (undefended)")
    return fig


def plot_pq_by_size(cells: Sequence[CellLike], path: str) -> str:
    """PQ of small, medium and large segments against eps, one panel per size bucket, one line
    per attack, undefended (:func:`~.breakdowns.size_series`: the strongest cell at each eps);
    the clean PQ of the bucket is a dashed line (eps 0). Size bias shows as the small panel
    falling faster. Cells without a size breakdown (other tasks, sweeps from before breakdowns
    were recorded) are left out; with none at all the figure says n/a.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task.
        path (str): output PNG (written atomically).

    Returns:
        str: ``path``.
    """
    _save_figure(pq_by_size_figure(cells), path)
    return path
