# Copyright (c) UPSNetRobust authors.
"""Robustness report of a sweep: pure functions of its result cells (no model code).

A *cell* is one (attack, eps, defense, ...) result of a sweep, a dict such as::

    {"attack": "ifgsm", "objective": "train_losses", "eps": 4.0, "num_steps": 5,
     "step_size": 1.0, "random_start": False, "restarts": 1, "defense": "nlmeans",
     "adaptive": False, "quantized": False, "task": "panoptic_seg", "metric": "PQ",
     "model": "UPSNet", "PQ": 31.2, "SQ": 70.1, "RQ": 40.3, "PQ_th": 20.0, "PQ_st": 40.0,
     "attack_s_per_image": 1.23, "defense_s_per_image": 0.05, "num_images": 30,
     "num_failed": 0, "failures": [{"image_id": "x", "reason": "..."}]}

or its typed view :class:`ResultCell`. Semantic cells carry mIoU/fwIoU/mACC/pACC and instance
cells AP/AP50/AP75/APs/APm/APl instead of the panoptic metrics; ``metric`` names the headline
metric that every comparison uses. One report covers one model on one task.

Modules, one concern each:

- :mod:`.cells`: the cell type, tasks and metrics, ordering, ratios to clean;
- :mod:`.checks`: the sanity checks, one function per kind;
- :mod:`.ranking`: defenses ranked by their worst case;
- :mod:`.tables`: the terminal table and robustness.csv;
- :mod:`.markdown`: robustness.md;
- :mod:`.breakdowns`: the worst case over attacks per eps, and what the report reads from the
  cells' breakdowns (PQ by segment size, per-class drops);
- :mod:`.plots`: pq_vs_eps.png (the headline metric), worst_case_vs_eps.png, pq_by_size.png
  and time_vs_eps.png;
- :mod:`.writer`: :func:`write_report`, which writes them all.
"""

from .cells import (
    CLEAN,
    HEADLINE_METRICS,
    METRICS,
    TABLE_METRICS,
    TASK_METRICS,
    TASKS,
    UNDEFENDED,
    ReportKind,
    ResultCell,
    as_cells,
    metric_ratios,
    report_kind,
    split_by_model_task,
)
from .checks import CHECKS, METRIC_TOLERANCE, PQ_TOLERANCE, sanity_checks
from .breakdowns import per_class_drops, size_series, worst_case_curve
from .markdown import THREAT_MODEL, markdown_report
from .plots import (
    metric_vs_eps_figure,
    plot_pq_by_size,
    plot_pq_vs_eps,
    plot_time_vs_eps,
    plot_worst_case_vs_eps,
)
from .ranking import defense_ranking
from .tables import CSV_COLUMNS, csv_columns, csv_text, format_table
from .writer import REPORT_FILES, write_report

# The name from the panoptic-only report: the ratio is of the headline metric (PQ there).
pq_ratios = metric_ratios

__all__ = [
    "CHECKS",
    "CLEAN",
    "CSV_COLUMNS",
    "HEADLINE_METRICS",
    "METRICS",
    "METRIC_TOLERANCE",
    "PQ_TOLERANCE",
    "REPORT_FILES",
    "TABLE_METRICS",
    "TASKS",
    "TASK_METRICS",
    "THREAT_MODEL",
    "UNDEFENDED",
    "ReportKind",
    "ResultCell",
    "as_cells",
    "csv_columns",
    "csv_text",
    "defense_ranking",
    "format_table",
    "markdown_report",
    "metric_ratios",
    "metric_vs_eps_figure",
    "per_class_drops",
    "plot_pq_by_size",
    "plot_pq_vs_eps",
    "plot_time_vs_eps",
    "plot_worst_case_vs_eps",
    "pq_ratios",
    "report_kind",
    "sanity_checks",
    "size_series",
    "split_by_model_task",
    "worst_case_curve",
    "write_report",
]
