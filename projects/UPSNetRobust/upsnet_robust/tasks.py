# Copyright (c) UPSNetRobust authors.
"""The tasks a model is scored on, in one place: each task's metrics under detectron2's names
(0-100 scale), its headline metric, the terminal table's columns and the model output its
evaluators read. Adapters, evaluators, sweep cells and the report all read these tables."""
from collections import OrderedDict

__all__ = ["HEADLINE_METRICS", "TABLE_METRICS", "TASKS", "TASK_METRICS", "TASK_OUTPUT_KEYS"]

# Metric keys of each task, as detectron2's evaluators name them.
TASK_METRICS = OrderedDict(
    [
        ("panoptic_seg", ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")),
        ("sem_seg", ("mIoU", "fwIoU", "mACC", "pACC")),
        ("instances", ("AP", "AP50", "AP75", "APs", "APm", "APl")),
    ]
)
TASKS = tuple(TASK_METRICS)
# The metric a task is judged by (checks, ratios, ranking, plots).
HEADLINE_METRICS = {"panoptic_seg": "PQ", "sem_seg": "mIoU", "instances": "AP"}
# The columns of the compact terminal table.
TABLE_METRICS = {
    "panoptic_seg": ("PQ", "SQ", "RQ"),
    "sem_seg": ("mIoU", "fwIoU", "mACC", "pACC"),
    "instances": ("AP", "AP50", "AP75"),
}
# The output key each task's evaluators read.
TASK_OUTPUT_KEYS = {task: task for task in TASKS}
