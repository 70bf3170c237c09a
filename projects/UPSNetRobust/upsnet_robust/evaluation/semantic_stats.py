# Copyright (c) UPSNetRobust authors.
"""Per-image semantic statistics: confusion matrices that add over images.

mIoU, fwIoU, mACC and pACC of a set of images depend only on the summed confusion matrix (in
fact on its diagonal and its row and column sums), so keeping one matrix per image makes a worst
case chosen image by image against the *data set's* mIoU exact (the ``sea`` ensemble). The
metrics are computed exactly as detectron2's ``SemSegEvaluator`` computes them: classes without
ground-truth pixels are left out of mIoU and mACC.

Matrices are (K, K) with rows the predicted and columns the ground-truth class, as in
``SemSegEvaluator`` (its extra row and column for the ignore label are dropped: the metrics do
not read them). Per image they are kept sparse, as an (n, 3) int64 array of ``[pred, gt,
count]`` entries (:func:`sparse_confusion`): an image holds few class pairs, and K may be 150.
"""
import json
import os
from typing import Dict, Mapping, Optional

import numpy as np

from ..utils.io import atomic_json, read_json_if_present

__all__ = [
    "SEM_SEG_STATS_FILE",
    "confusion_vectors",
    "load_confusion_stats",
    "miou_of_vectors",
    "save_confusion_stats",
    "semantic_metrics",
    "sparse_confusion",
    "sum_confusion",
    "vectors_of_sparse",
]

SEM_SEG_STATS_FILE = "sem_seg_stats.json"


def confusion_vectors(conf: np.ndarray) -> np.ndarray:
    """(3, K): true positives, ground-truth pixels and predicted pixels per class of a (K, K)
    confusion matrix (rows predictions, columns ground truth)."""
    conf = np.asarray(conf, dtype=np.float64)
    return np.stack([np.diagonal(conf), conf.sum(axis=0), conf.sum(axis=1)])


def sparse_confusion(conf: np.ndarray) -> np.ndarray:
    """(n, 3) int64 ``[pred, gt, count]`` of the non-zero entries of a (K, K) matrix."""
    conf = np.asarray(conf)
    rows, cols = np.nonzero(conf)
    return np.stack([rows, cols, conf[rows, cols]], axis=1).astype(np.int64).reshape(-1, 3)


def sum_confusion(sparse_matrices, num_classes: int) -> np.ndarray:
    """The (K, K) int64 sum of sparse per-image matrices."""
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for entries in sparse_matrices:
        entries = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
        np.add.at(total, (entries[:, 0], entries[:, 1]), entries[:, 2])
    return total


def vectors_of_sparse(entries: np.ndarray, num_classes: int) -> np.ndarray:
    """:func:`confusion_vectors` of one sparse matrix, without building it."""
    entries = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
    rows, cols, counts = entries[:, 0], entries[:, 1], entries[:, 2].astype(np.float64)
    diag = rows == cols
    return np.stack(
        [
            np.bincount(rows[diag], weights=counts[diag], minlength=num_classes),
            np.bincount(cols, weights=counts, minlength=num_classes),
            np.bincount(rows, weights=counts, minlength=num_classes),
        ]
    )[:, :num_classes]


def miou_of_vectors(vectors: np.ndarray) -> np.ndarray:
    """mIoU (0-100) of (..., 3, K) :func:`confusion_vectors`; NaN where no class has ground
    truth. Classes without ground-truth pixels are left out, as in SemSegEvaluator."""
    tp, pos_gt, pos_pred = np.moveaxis(np.asarray(vectors, dtype=np.float64), -2, 0)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    iou = np.where(valid, tp / np.where(valid, union, 1.0), 0.0)
    n = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * iou.sum(axis=-1) / np.maximum(n, 1), np.nan)


def semantic_metrics(conf: np.ndarray) -> Dict[str, Optional[float]]:
    """mIoU, fwIoU, mACC, pACC (0-100; None when no class has ground truth) of a (K, K)
    confusion matrix, as SemSegEvaluator computes them."""
    tp, pos_gt, pos_pred = confusion_vectors(conf)
    total = pos_gt.sum()
    if total == 0:
        return {"mIoU": None, "fwIoU": None, "mACC": None, "pACC": None}
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou = tp[iou_valid] / union[iou_valid]
    return {
        "mIoU": 100.0 * float(iou.sum() / iou_valid.sum()),
        "fwIoU": 100.0 * float((iou * pos_gt[iou_valid] / total).sum()),
        "mACC": 100.0 * float((tp[acc_valid] / pos_gt[acc_valid]).sum() / acc_valid.sum()),
        "pACC": 100.0 * float(tp.sum() / total),
    }


def save_confusion_stats(directory: str, per_defense: Mapping[str, Mapping]) -> str:
    """Write a pass's per-image confusion matrices, ``{defense: {"images": {image_id: sparse
    (n, 3)}, "num_classes": K}}``, to ``<directory>/sem_seg_stats.json`` (atomically)."""

    data = {
        d: {
            "num_classes": int(block["num_classes"]),
            "images": {
                str(i): np.asarray(c, dtype=np.int64).reshape(-1, 3).tolist()
                for i, c in block["images"].items()
            },
        }
        for d, block in per_defense.items()
    }
    return atomic_json(os.path.join(directory, SEM_SEG_STATS_FILE), data, indent=None)


def load_confusion_stats(directory: str) -> Optional[Dict[str, Dict]]:
    """What :func:`save_confusion_stats` wrote in ``directory`` (image ids as strings, sparse
    (n, 3) int64 matrices), or None."""
    data = read_json_if_present(os.path.join(directory, SEM_SEG_STATS_FILE))
    if data is None:
        return None
    return {
        d: {
            "num_classes": int(block["num_classes"]),
            "images": {
                i: np.asarray(e, dtype=np.int64).reshape(-1, 3) for i, e in block["images"].items()
            },
        }
        for d, block in data.items()
    }
