# Copyright (c) UPSNetRobust authors.
"""The worst case over an ensemble of attacks, chosen image by image against the data set's
metric (SEA, Croce, Singh & Hein, ECCV 2024, extended to panoptic PQ).

PQ and mIoU are not averages of per-image scores: they are functions of per-category sums over
the images. Keeping, per image, the member with the lowest *per-image* score is therefore not the
data set's worst case (tests show a case). SEA's answer for mIoU, used here for both: start every
image at the best single member (the one with the lowest data-set metric), then pass over the
images in a fixed order and switch an image to another member's prediction whenever that lowers
the data-set metric, until a pass switches nothing. Each switch strictly lowers the metric, so
the result is never above the starting member, hence never above any member that scored every
image. The sums are exact (integers and IoU sums), so the selected metric equals what the task's
evaluator gives on the selected predictions.

Pure functions on per-image statistics; no model or data set needed.
"""
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .panoptic_stats import PanopticStats
from .semantic_stats import miou_of_vectors, vectors_of_sparse

__all__ = [
    "Selection",
    "greedy_worst_case",
    "panoptic_pq_many",
    "select_panoptic",
    "select_semantic",
]

#: A switch must lower the metric by more than this (float noise of the running sums).
TOLERANCE = 1e-9
#: Passes over the images at most (SEA's cap); each pass without a switch ends the search.
MAX_PASSES = 1000


class Selection(NamedTuple):
    """Result of a selection.

    Attributes:
        assignment: image_id -> index of the member whose prediction is kept.
        score: the data set's metric of the selection (0-100).
        member_scores: each member's own metric over the images it scored (None if undefined).
        start: the member every image started from (where it scored the image).
        passes: passes over the images made (the last one switched nothing, unless capped).
        switches: images switched in all.
    """

    assignment: Dict[str, int]
    score: float
    member_scores: List[Optional[float]]
    start: int
    passes: int
    switches: int


def _finite_or_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.inf)


def greedy_worst_case(
    member_stats: Sequence[Mapping[str, np.ndarray]],
    score_many: Callable[[np.ndarray], np.ndarray],
    max_passes: int = MAX_PASSES,
    order: Optional[Sequence[str]] = None,
) -> Selection:
    """The greedy selection over additive per-image statistics.

    Args:
        member_stats: per member, ``{image_id: array}``; arrays of one shape, summed over images
            to give the data set's statistics. A member may lack images (it failed on them).
        score_many: ``(K, *shape) -> (K,)`` metric of K summed statistics, lower = stronger
            attack; NaN (undefined) counts as +inf.
        max_passes: cap on the passes over the images.
        order: the images' order in each pass (default: sorted ids).

    Returns:
        Selection: over every image some member scored.
    """
    if not member_stats:
        raise ValueError("An ensemble needs at least one member")
    ids = list(order) if order is not None else sorted({i for m in member_stats for i in m})
    shape = next((a.shape for m in member_stats for a in m.values()), (0,))
    stats = np.zeros((len(member_stats), len(ids)) + tuple(shape), dtype=np.float64)
    available = np.zeros((len(member_stats), len(ids)), dtype=bool)
    for m, images in enumerate(member_stats):
        for n, image_id in enumerate(ids):
            if image_id in images:
                stats[m, n] = images[image_id]
                available[m, n] = True
    mask = available.reshape(available.shape + (1,) * len(shape))
    own = _finite_or_inf(score_many((stats * mask).sum(axis=1)))
    member_scores = [float(s) if np.isfinite(s) else None for s in own]
    start = int(np.argmin(own))
    assign = np.where(available[start], start, np.argmax(available, axis=0))
    total = stats[assign, np.arange(len(ids))].sum(axis=0)
    current = float(_finite_or_inf(score_many(total[None]))[0])
    passes = switches = 0
    while passes < max_passes:
        passes += 1
        switched = False
        for n in range(len(ids)):
            candidates = np.flatnonzero(available[:, n])
            candidates = candidates[candidates != assign[n]]
            if candidates.size == 0:
                continue
            totals = total[None] - stats[assign[n], n][None] + stats[candidates, n]
            scores = _finite_or_inf(score_many(totals))
            best = int(np.argmin(scores))
            if scores[best] < current - TOLERANCE:
                assign[n] = candidates[best]
                total, current = totals[best], float(scores[best])
                switched, switches = True, switches + 1
        if not switched:
            break
    total = stats[assign, np.arange(len(ids))].sum(axis=0)  # exact, without running drift
    score = float(_finite_or_inf(score_many(total[None]))[0])
    return Selection(
        {image_id: int(m) for image_id, m in zip(ids, assign)},
        score,
        member_scores,
        start,
        passes,
        switches,
    )


# ------------------------------------------------------------------ panoptic
def panoptic_pq_many(totals: np.ndarray) -> np.ndarray:
    """PQ (0-100) of (K, C, 4) per-category sums ``[iou, tp, fp, fn]``: the mean over the
    categories with TP + FP + FN > 0 (panopticapi's ``pq_average``); NaN if none counts."""
    iou, tp, fp, fn = np.moveaxis(totals, -1, 0)
    counted = (tp + fp + fn) > 0
    denom = np.where(counted, tp + 0.5 * fp + 0.5 * fn, 1.0)
    per_class = np.where(counted, iou / denom, 0.0)
    n = counted.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * per_class.sum(axis=-1) / np.maximum(n, 1), np.nan)


def _panoptic_array(stats: PanopticStats, categories: Sequence[int]) -> np.ndarray:
    sums = stats.sums["all"]
    return np.stack([sums.get(int(c), np.zeros(4)) for c in categories]) if categories else (
        np.zeros((0, 4))
    )


def select_panoptic(
    members: Sequence[Mapping[str, PanopticStats]], categories: Mapping[int, Mapping], **kwargs
) -> Selection:
    """:func:`greedy_worst_case` on the data set's PQ over ``categories`` ({id: category})."""
    cats = sorted(int(c) for c in categories)
    arrays = [{i: _panoptic_array(s, cats) for i, s in images.items()} for images in members]
    return greedy_worst_case(arrays, panoptic_pq_many, **kwargs)


# ------------------------------------------------------------------ semantic
def select_semantic(
    members: Sequence[Mapping[str, np.ndarray]], num_classes: int, **kwargs
) -> Selection:
    """:func:`greedy_worst_case` on the data set's mIoU, from per-image sparse confusion
    matrices (:mod:`.semantic_stats`); only their TP, GT and predicted pixel counts per class
    matter for mIoU, so those are what is summed."""
    arrays = [
        {i: vectors_of_sparse(c, num_classes) for i, c in images.items()} for images in members
    ]
    return greedy_worst_case(arrays, miou_of_vectors, **kwargs)
