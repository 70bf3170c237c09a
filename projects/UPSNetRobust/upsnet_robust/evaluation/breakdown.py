# Copyright (c) UPSNetRobust authors.
"""A result cell's breakdown: its headline metric split by segment size, things/stuff and class.

A single PQ or mIoU hides where an attack bites: small segments fall first (the size bias of
Halmosi et al., ECCV 2024), and a few classes can carry a whole drop. Every sweep cell therefore
carries a ``breakdown`` dict, built here from what the pass's evaluator already computed:

- panoptic cells, from the summed per-image PQ sums of the cell's defense
  (:mod:`.panoptic_stats`)::

      {"size": {"small" | "medium" | "large": {"PQ", "SQ", "RQ", "n"}},
       "things": {"PQ", "SQ", "RQ", "n"}, "stuff": {...},
       "per_class": {class name: {"PQ", "SQ", "RQ"}}}

  ``n`` is the number of categories averaged (those with a TP, FP or FN in that group); a
  group with none has None metrics. ``things``/``stuff`` are the cell's ``PQ_th``/``PQ_st``
  recomputed from the same sums; ``per_class`` lists the categories with a TP, FP or FN;
- semantic cells, from SemSegEvaluator's own per-class results (``IoU-<name>``,
  ``ACC-<name>``): ``{"per_class": {class name: {"IoU", "ACC"}}}`` (None where the class has
  no ground-truth pixels);
- instance cells, from COCOEvaluator's per-category AP (``AP-<name>`` of the mask results,
  else of the box results): ``{"per_class": {class name: {"AP"}}}``, or no breakdown when the
  evaluator gave none.

All values are on the 0-100 scale of the headline metrics.
"""
from collections import OrderedDict
from typing import Dict, Mapping, Optional

from ..utils.numbers import finite
from .panoptic_stats import SIZE_BUCKETS, PanopticStats

__all__ = ["cell_breakdown", "panoptic_breakdown", "per_class_results"]

# Per task: the evaluator's result block, and the per-class keys as (result prefix, name).
_PER_CLASS_KEYS = {
    "sem_seg": (("sem_seg",), (("IoU-", "IoU"), ("ACC-", "ACC"))),
    "instances": (("segm", "bbox"), (("AP-", "AP"),)),
}


def _class_names(categories: Mapping[int, Mapping]) -> Dict[int, str]:
    """A unique name per category id (a repeated name gets its id appended)."""
    names = [str(info.get("name", c)) for c, info in categories.items()]
    return {
        int(c): name if names.count(name) == 1 else f"{name} ({c})"
        for (c, _), name in zip(categories.items(), names)
    }


def panoptic_breakdown(block: Mapping) -> Dict:
    """The breakdown of one defense's panoptic results.

    Args:
        block: ``{"images": {image_id: PanopticStats}, "categories": {id: {"name",
            "isthing", ...}}}``, what the panoptic evaluator returns per defense.
    """
    categories = {int(c): info for c, info in block["categories"].items()}
    images = block["images"]
    # summed in image-id order: the same floats however many processes scored the images
    total = PanopticStats.total(images[i] for i in sorted(images, key=str))
    names = _class_names(categories)
    return {
        "size": OrderedDict(
            (bucket, total.metrics(categories, group=bucket)) for bucket in SIZE_BUCKETS
        ),
        "things": total.metrics(categories, isthing=True),
        "stuff": total.metrics(categories, isthing=False),
        "per_class": OrderedDict(
            (names[c], values) for c, values in total.per_class(categories).items()
        ),
    }


def per_class_results(task: str, results: Optional[Mapping]) -> Optional[Dict]:
    """``{class name: {value name: value}}`` of a semantic (IoU, ACC) or instance (AP)
    evaluator's results, or None when they hold no per-class values (or for another task).

    Reads the keys detectron2's evaluators write: ``IoU-<name>``/``ACC-<name>`` in
    SemSegEvaluator's ``"sem_seg"`` block, ``AP-<name>`` in COCOEvaluator's ``"segm"`` block
    (masks) or else its ``"bbox"`` block, in the evaluator's class order. NaN (a class without
    ground truth) becomes None.
    """
    if task not in _PER_CLASS_KEYS or not results:
        return None
    blocks, keys = _PER_CLASS_KEYS[task]
    res = next((results[b] for b in blocks if results.get(b)), None) or {}
    out = OrderedDict()
    for key, value in res.items():
        for prefix, name in keys:
            if isinstance(key, str) and key.startswith(prefix) and len(key) > len(prefix):
                out.setdefault(key[len(prefix):], OrderedDict())[name] = finite(value)
    return out or None


def cell_breakdown(
    task: str, results: Optional[Mapping], stats: Optional[Mapping] = None
) -> Optional[Dict]:
    """The ``breakdown`` of one sweep cell (see the module docstring), or None when its
    evaluator gave nothing to break down.

    Args:
        task: the cell's task ("panoptic_seg", "sem_seg" or "instances").
        results: the cell's defense's evaluator results (what ``headline_results`` reads).
        stats: for panoptic cells, the defense's per-image statistics block
            (:func:`panoptic_breakdown`); None when the pass kept none.
    """
    if task == "panoptic_seg":
        if not stats or not stats.get("images"):
            return None
        return panoptic_breakdown(stats)
    per_class = per_class_results(task, results)
    return {"per_class": per_class} if per_class else None
