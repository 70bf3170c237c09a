# Copyright (c) UPSNetRobust authors.
"""Flat tables of the cells: the terminal table and robustness.csv."""

import csv
import io
from typing import List, Sequence

from ._format import attack_label, fmt, fmt_eps, jsonable
from .cells import (
    METRICS,
    TABLE_METRICS,
    TASK_METRICS,
    CellLike,
    as_cells,
    cell_order,
    metric_ratios,
    report_kind,
)

__all__ = ["CSV_COLUMNS", "csv_columns", "csv_text", "format_table"]

# Leading columns of robustness.csv, always present in this order (downstream scripts index by
# name or position). The panoptic metrics stay here, empty for other tasks.
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
# Appended after CSV_COLUMNS when some cell has them.
# (corruption, severity: the cells of a corruption threat kind)
_OPTIONAL_COLUMNS = ("task", "metric", "model", "corruption", "severity")


def _budget(cell) -> str:
    """The eps column: eps, or a corruption cell's severity ("sev 3")."""
    severity = cell.get("severity")
    return fmt_eps(cell.eps_value) if severity is None else f"sev {severity}"


def format_table(cells: Sequence[CellLike]) -> str:
    """A compact fixed-width table for the terminal.

    Columns: attack ("(adaptive)" appended for adaptive cells), eps (a corruption's severity),
    defense, the task's main metrics (:data:`~.cells.TABLE_METRICS`: PQ SQ RQ, mIoU fwIoU mACC
    pACC, or AP AP50 AP75) and s/img = attack + defense seconds per image ("n/a" when the attack
    time is missing).
    Rows are sorted like the report (clean first, then attacks in order of appearance, eps
    ascending).

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task.

    Returns:
        str: the table, lines joined by "\\n" (no trailing newline).
    """
    cells = as_cells(cells)
    metrics = TABLE_METRICS[report_kind(cells).task]
    header = ("attack", "eps", "defense", *metrics, "s/img")
    rows = []
    for c in cell_order(cells):
        t_a, t_d = c.value("attack_s_per_image"), c.value("defense_s_per_image")
        t = None if t_a is None else t_a + (t_d or 0.0)
        rows.append(
            (
                attack_label(c),
                "clean" if c.is_clean else _budget(c),
                c.defense_name,
                *(fmt(c.get(m), 1) for m in metrics),
                fmt(t, 3),
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


def csv_columns(cells: Sequence[CellLike]) -> List[str]:
    """:data:`CSV_COLUMNS`, then the other tasks' metric columns some cell has (with
    ``<metric>_ratio`` after them when the headline is not PQ), then ``task``, ``metric``,
    ``model``, ``corruption`` and ``severity`` when some cell has them. A panoptic sweep's
    cells without those keys give exactly :data:`CSV_COLUMNS`."""
    cells = as_cells(cells)
    headline = report_kind(cells).metric
    present = set()
    for c in cells:
        present.update(c.to_dict())
    columns = list(CSV_COLUMNS)
    panoptic = TASK_METRICS["panoptic_seg"]
    columns += [m for m in METRICS if m not in panoptic and (m in present or m == headline)]
    if headline != "PQ":
        columns.append(f"{headline}_ratio")
    columns += [k for k in _OPTIONAL_COLUMNS if k in present]
    return columns


def csv_text(cells: Sequence[CellLike]) -> str:
    """robustness.csv: one row per cell, in the given order; columns :func:`csv_columns`.
    ``<metric>_ratio`` is the headline metric over the clean one of the same defense (or of
    "none"), written under the headline's column (``PQ_ratio`` for a panoptic sweep)."""
    cells = as_cells(cells)
    headline = report_kind(cells).metric
    columns = csv_columns(cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for c, ratio in zip(cells, metric_ratios(cells)):
        row = {}
        for col in columns:
            if col == f"{headline}_ratio":
                value = ratio
            elif col == "defense":
                value = c.defense_name
            else:
                value = c.get(col)  # *_ratio of another metric: None
            value = jsonable(value)
            row[col] = "" if value is None else value
        writer.writerow(row)
    return buf.getvalue()
