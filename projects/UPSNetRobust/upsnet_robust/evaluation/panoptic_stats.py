# Copyright (c) UPSNetRobust authors.
"""Per-image panoptic statistics: the additive sums behind PQ, by category and segment size.

PQ over a set of images depends only on per-category sums of four numbers, the IoU of matched
pairs, TP, FP and FN (Kirillov et al. 2019), and those sums add over images. Keeping them per
image is what makes two things exact: a worst case over attacks chosen image by image against
the *dataset* PQ (the ``sea`` ensemble), and PQ merged over processes. The same sums split by
segment size give the size breakdown.

Matching follows panopticapi's ``pq_compute_single_core`` (tests compare the two): a ground
truth and a predicted segment of the same category match when their IoU, with the prediction's
pixels on void ground truth left out of the union, exceeds 0.5; unmatched non-crowd ground truth
is a FN; an unmatched prediction is a FP unless more than half of it lies on void or on a crowd
region of its category.

**Size buckets** are relative to the image area, so they mean the same at 128x256 and at
1024x2048: COCO's 32² and 96² pixel thresholds taken relative to COCO's typical 640x480 image,
i.e. a segment is *small* below 0.33 % of the image, *medium* below 3.0 %, *large* otherwise.
A TP or FN counts in the bucket of its ground-truth segment's area, a FP in that of its own.
"""
import io
import json
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

from ..utils.io import atomic_json, read_json_if_present

__all__ = [
    "SIZE_BUCKETS",
    "PanopticStats",
    "image_panoptic_stats",
    "load_image_stats",
    "load_panoptic_gt",
    "save_image_stats",
    "panoptic_ids_from_png",
    "size_bucket",
]

# name -> upper bound of a segment's area as a fraction of the image area (exclusive)
SIZE_BUCKETS = OrderedDict(
    [
        ("small", 32 * 32 / (640 * 480)),
        ("medium", 96 * 96 / (640 * 480)),
        ("large", float("inf")),
    ]
)
_ALL = "all"
_OFFSET = 256 * 256 * 256  # panoptic ids are < 2**24 (RGB-encoded)
_VOID = 0
# columns of a category's sums
_IOU, _TP, _FP, _FN = range(4)


def size_bucket(area: float, image_area: float) -> str:
    """The size bucket of a segment of ``area`` pixels in an image of ``image_area`` pixels."""
    fraction = area / float(image_area)
    for name, upper in SIZE_BUCKETS.items():
        if fraction < upper:
            return name
    return next(reversed(SIZE_BUCKETS))


class PanopticStats:
    """Per-category sums (IoU of matches, TP, FP, FN), overall and per size bucket; they add.

    ``sums[group][category_id]`` is a float64 array ``[iou, tp, fp, fn]``, ``group`` being
    "all" or a size bucket name.
    """

    def __init__(self, sums: Optional[Dict[str, Dict[int, np.ndarray]]] = None):
        self.sums = {g: {} for g in (_ALL, *SIZE_BUCKETS)}
        for group, cats in (sums or {}).items():
            for cat, values in cats.items():
                self.sums[group][int(cat)] = np.asarray(values, dtype=np.float64).copy()

    def add(self, group: str, category_id: int, column: int, value: float = 1.0):
        row = self.sums[group].setdefault(int(category_id), np.zeros(4, dtype=np.float64))
        row[column] += value

    def __iadd__(self, other: "PanopticStats") -> "PanopticStats":
        for group, cats in other.sums.items():
            for cat, values in cats.items():
                row = self.sums[group].setdefault(cat, np.zeros(4, dtype=np.float64))
                row += values
        return self

    def __add__(self, other: "PanopticStats") -> "PanopticStats":
        out = PanopticStats(self.sums)
        out += other
        return out

    @classmethod
    def total(cls, stats: Iterable["PanopticStats"]) -> "PanopticStats":
        out = cls()
        for s in stats:
            out += s
        return out

    def to_dict(self) -> Dict:
        """A JSON-able form (category ids as strings); :meth:`from_dict` reads it back."""
        return {g: {str(c): v.tolist() for c, v in cats.items()} for g, cats in self.sums.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PanopticStats":
        return cls(data)

    def per_class(self, categories: Mapping[int, Mapping], group: str = _ALL) -> Dict[int, Dict]:
        """``{category_id: {"PQ", "SQ", "RQ"}}`` (0-100) for categories with TP + FP + FN > 0."""
        out = OrderedDict()
        for cat in categories:
            iou, tp, fp, fn = self.sums[group].get(int(cat), np.zeros(4))
            if tp + fp + fn == 0:
                continue
            denom = tp + 0.5 * fp + 0.5 * fn
            out[int(cat)] = {
                "PQ": 100.0 * iou / denom,
                "SQ": 100.0 * (iou / tp if tp else 0.0),
                "RQ": 100.0 * tp / denom,
            }
        return out

    def metrics(
        self, categories: Mapping[int, Mapping], isthing: Optional[bool] = None, group: str = _ALL
    ) -> Dict:
        """PQ, SQ, RQ (0-100, None when no category counts) and ``n``, the number of categories
        averaged: panopticapi's ``pq_average`` over ``categories`` ({id: {"isthing": 0/1}})."""
        chosen = {
            c: info
            for c, info in categories.items()
            if isthing is None or bool(info.get("isthing", 0)) == isthing
        }
        per_class = self.per_class(chosen, group)
        n = len(per_class)
        if n == 0:
            return {"PQ": None, "SQ": None, "RQ": None, "n": 0}
        return {
            key: sum(v[key] for v in per_class.values()) / n for key in ("PQ", "SQ", "RQ")
        } | {"n": n}

    def summary(self, categories: Mapping[int, Mapping]) -> Dict:
        """The cell's view: PQ/SQ/RQ overall, of things and of stuff, and per size bucket."""
        out = {"PQ": self.metrics(categories)}
        out["things"] = self.metrics(categories, isthing=True)
        out["stuff"] = self.metrics(categories, isthing=False)
        for bucket in SIZE_BUCKETS:
            out[bucket] = self.metrics(categories, group=bucket)
        return out


def panoptic_ids_from_png(png: bytes) -> np.ndarray:
    """(H, W) panoptic ids of an RGB-encoded panoptic PNG, decoded by panopticapi's
    ``rgb2id`` as its evaluation does."""
    from panopticapi.utils import rgb2id
    from PIL import Image

    return rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def _areas(ids: np.ndarray) -> Dict[int, int]:
    labels, counts = np.unique(ids, return_counts=True)
    return {int(k): int(v) for k, v in zip(labels, counts)}


def image_panoptic_stats(
    gt_ids: np.ndarray,
    gt_segments: List[Mapping],
    pred_ids: np.ndarray,
    pred_segments: List[Mapping],
) -> PanopticStats:
    """The statistics of one image.

    Args:
        gt_ids, pred_ids: (H, W) panoptic ids; 0 is void.
        gt_segments: ``{"id", "category_id", "iscrowd", "area"}`` per ground-truth segment (as in
            a COCO panoptic JSON; ``area`` defaults to the segment's pixel count).
        pred_segments: ``{"id", "category_id"}`` per predicted segment, in the same category ids.

    Raises:
        ValueError: a predicted id without a segment, or a segment without pixels.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ")
    image_area = float(gt_ids.size)
    gt_area = _areas(gt_ids)
    gt = {int(s["id"]): dict(s) for s in gt_segments}
    for label, seg in gt.items():
        seg.setdefault("area", gt_area.get(label, 0))
    pred = {int(s["id"]): dict(s) for s in pred_segments}
    pred_area = _areas(pred_ids)
    for label in pred_area:
        if label != _VOID and label not in pred:
            raise ValueError(f"predicted id {label} is in the panoptic map but has no segment")
    for label, seg in pred.items():
        if label not in pred_area:
            raise ValueError(f"predicted segment {label} has no pixels in the panoptic map")
        seg["area"] = pred_area[label]
    pairs = _areas(gt_ids.astype(np.uint64) * _OFFSET + pred_ids.astype(np.uint64))
    inter = {(k // _OFFSET, k % _OFFSET): v for k, v in pairs.items()}

    stats = PanopticStats()

    def count(category, column, area, value=1.0):
        stats.add(_ALL, category, column, value)
        stats.add(size_bucket(area, image_area), category, column, value)

    matched_gt, matched_pred = set(), set()
    for (g, p), overlap in inter.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred[p]["area"] + gt[g]["area"] - overlap - inter.get((_VOID, p), 0)
        iou = overlap / union
        if iou > 0.5:
            count(gt[g]["category_id"], _TP, gt[g]["area"])
            count(gt[g]["category_id"], _IOU, gt[g]["area"], iou)
            matched_gt.add(g)
            matched_pred.add(p)
    crowd = {}
    for g, seg in gt.items():
        if g in matched_gt:
            continue
        if seg.get("iscrowd", 0):
            crowd[seg["category_id"]] = g
            continue
        count(seg["category_id"], _FN, seg["area"])
    for p, seg in pred.items():
        if p in matched_pred:
            continue
        ignored = inter.get((_VOID, p), 0)
        if seg["category_id"] in crowd:
            ignored += inter.get((crowd[seg["category_id"]], p), 0)
        if ignored / seg["area"] > 0.5:
            continue
        count(seg["category_id"], _FP, seg["area"])
    return stats


def load_panoptic_gt(panoptic_json: str) -> Dict:
    """``{"annotations": {image_id: annotation}, "categories": {id: category}}`` of a COCO
    panoptic JSON."""
    with open(panoptic_json) as f:
        data = json.load(f)
    return {
        "annotations": {a["image_id"]: a for a in data["annotations"]},
        "categories": {int(c["id"]): c for c in data["categories"]},
    }


IMAGE_STATS_FILE = "image_stats.json"


def save_image_stats(directory: str, per_defense: Mapping[str, Mapping]) -> str:
    """Write a pass's per-image statistics, ``{defense: {"images": {image_id: PanopticStats},
    "categories": {id: category}}}``, to ``<directory>/image_stats.json`` (atomically)."""

    data = {
        d: {
            "categories": {str(c): info for c, info in block["categories"].items()},
            "images": {str(i): st.to_dict() for i, st in block["images"].items()},
        }
        for d, block in per_defense.items()
    }
    return atomic_json(os.path.join(directory, IMAGE_STATS_FILE), data, indent=None)


def load_image_stats(directory: str) -> Optional[Dict[str, Dict]]:
    """What :func:`save_image_stats` wrote in ``directory`` (image ids as strings), or None."""
    data = read_json_if_present(os.path.join(directory, IMAGE_STATS_FILE))
    if data is None:
        return None
    return {
        d: {
            "categories": {int(c): info for c, info in block["categories"].items()},
            "images": {i: PanopticStats.from_dict(st) for i, st in block["images"].items()},
        }
        for d, block in data.items()
    }
