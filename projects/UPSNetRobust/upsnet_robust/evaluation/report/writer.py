# Copyright (c) UPSNetRobust authors.
"""write_report: every file of a sweep's report, each written atomically."""

import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Dict, Optional, Sequence

from ...utils.io import atomic_write
from ._format import jsonable
from .cells import CellLike, as_cells, report_kind
from .checks import METRIC_TOLERANCE, sanity_checks
from .corruptions import METRIC_VS_SEVERITY_FILE, corruption_markdown
from .corruptions import corruption_summaries, plot_metric_vs_severity
from .markdown import markdown_report
from .ranking import defense_ranking
from .tables import csv_text
from .tradeoff import TRADEOFF_FILE, plot_tradeoff, tradeoff_markdown, tradeoff_rows

__all__ = ["REPORT_FILES", "write_report"]

logger = logging.getLogger(__name__)

# Key in write_report's result -> file name in the output directory.
REPORT_FILES = OrderedDict(
    [
        ("json", "robustness.json"),
        ("csv", "robustness.csv"),
        ("md", "robustness.md"),
        ("pq_vs_eps", "pq_vs_eps.png"),
        ("time_vs_eps", "time_vs_eps.png"),
        ("worst_case_vs_eps", "worst_case_vs_eps.png"),
        ("pq_by_size", "pq_by_size.png"),
    ]
)


def _plotters():
    """``{report file key: plot function}`` as the package exports them, looked up at call
    time: replacing ``report.plot_pq_vs_eps`` (e.g. a fast stub in a test) changes what
    write_report draws."""
    package = sys.modules[__package__]
    return {
        "pq_vs_eps": package.plot_pq_vs_eps,
        "time_vs_eps": package.plot_time_vs_eps,
        "worst_case_vs_eps": package.plot_worst_case_vs_eps,
        "pq_by_size": package.plot_pq_by_size,
    }


def write_report(
    cells: Sequence[CellLike], output_dir: str, metadata: Optional[Dict] = None
) -> Dict[str, str]:
    """Write the robustness report of a sweep of one model on one task.

    The headline metric (the cells' ``metric``: PQ, mIoU or AP) is the one the checks, ratios,
    ranking and plots use. Cells that mix models or tasks raise ValueError: split them with
    :func:`~.cells.split_by_model_task` and write one report per group.

    Files (each written to a temp file and moved in with ``os.replace``):

    - ``robustness.json``: ``{"metadata": metadata, "cells": cells, "checks": checks}``
      (cells in their dict form, numpy values unwrapped, NaN/inf written as null), plus
      ``"defense_ranking"`` (:func:`~.ranking.defense_ranking`) when the cells include
      adaptive attacks (without them a ranking would overstate robustness);
    - ``robustness.csv``: one row per cell (:func:`~.tables.csv_text`);
    - ``robustness.md``: the readable report (:func:`~.markdown.markdown_report`);
    - ``pq_vs_eps.png`` (the headline metric vs eps, :func:`~.plots.plot_pq_vs_eps`),
      ``time_vs_eps.png`` (:func:`~.plots.plot_time_vs_eps`), ``worst_case_vs_eps.png`` (its
      per-eps minimum over attacks, :func:`~.plots.plot_worst_case_vs_eps`) and
      ``pq_by_size.png`` (PQ of small/medium/large segments, :func:`~.plots.plot_pq_by_size`;
      a figure saying n/a for cells without a size breakdown);
    - ``robustness_accuracy_tradeoff.png`` (key "tradeoff", with two or more defense rows:
      clean metric against the worst case per eps, :func:`~.tradeoff.plot_tradeoff`) and its
      Markdown section.

    Args:
        cells (list[dict or ResultCell]): sweep cells.
        output_dir (str): directory (created if needed).
        metadata (dict): run description; ``date``, ``hardware``, ``config_file`` and
            ``weights`` head the Markdown report, other keys are listed below them.

    Returns:
        dict[str, str]: paths under the keys of :data:`REPORT_FILES` ("json", "csv", "md",
        "pq_vs_eps", "time_vs_eps", "worst_case_vs_eps", "pq_by_size").
    """
    cells = as_cells(cells)
    kind = report_kind(cells)
    metadata = dict(metadata or {})
    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, name) for k, name in REPORT_FILES.items()}
    checks = sanity_checks(cells, METRIC_TOLERANCE)
    for c in checks:
        if not c["passed"]:
            logger.warning("Sanity check FAILED: %s: %s", c["check"], c["detail"])
    payload = {"metadata": metadata, "cells": [c.to_dict() for c in cells], "checks": checks}
    if any(c.is_adaptive for c in cells if not c.is_clean):
        payload["defense_ranking"] = defense_ranking(cells)
    corruptions = corruption_summaries(cells)
    if corruptions is not None:
        payload["corruptions"] = corruptions
    text = json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"
    atomic_write(paths["json"], text)
    atomic_write(paths["csv"], csv_text(cells))
    # the attack sections, ranking and eps figures cover the attacks' cells; corruption cells
    # (no eps, no adversary) have their own section and figure
    eps_cells = [c for c in cells if c.get("corruption") is None]
    md = markdown_report(eps_cells, kind, metadata, checks, METRIC_TOLERANCE)
    for section in (tradeoff_markdown(eps_cells), corruption_markdown(cells)):
        if section:
            md = md.rstrip("\n") + "\n\n" + "\n".join(section)
    atomic_write(paths["md"], md)
    for key, plot in _plotters().items():
        plot(eps_cells, paths[key])
    if len(tradeoff_rows(eps_cells)) > 1:  # several defense rows (transforms, checkpoints)
        paths["tradeoff"] = os.path.join(output_dir, TRADEOFF_FILE)
        plot_tradeoff(eps_cells, paths["tradeoff"])
    if corruptions is not None:
        paths["metric_vs_severity"] = os.path.join(output_dir, METRIC_VS_SEVERITY_FILE)
        plot_metric_vs_severity(cells, paths["metric_vs_severity"])
    logger.info("Robustness report (%s, %s) written to %s", kind.task, kind.metric, output_dir)
    return paths
