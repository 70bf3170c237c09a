# Copyright (c) UPSNetRobust authors.
"""Compact, safely loadable forms of model outputs for the per-image cache.

The cache keeps only what the task's evaluators read, as plain tensors, lists and numbers (so
``torch.load(weights_only=True)`` reads it back): ``panoptic_seg`` as (ids, segments_info);
``sem_seg`` as its (H, W) label map (the argmax of the logits, all that mIoU needs);
``instances`` as boxes, scores, classes and RLE-encoded masks.
"""
from typing import Dict, Iterable

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.structures import Boxes, Instances

from ..tasks import TASK_OUTPUT_KEYS  # the output key each task's evaluators read

__all__ = ["TASK_OUTPUT_KEYS", "compact_outputs", "expand_outputs", "semantic_labels"]


def semantic_labels(sem_seg: torch.Tensor) -> torch.Tensor:
    """(H, W) labels from (C, H, W) logits, or a label map unchanged."""
    return sem_seg.argmax(dim=0) if sem_seg.dim() == 3 else sem_seg


def _compact_instances(instances: Instances) -> Dict:
    instances = instances.to("cpu")
    out = {"image_size": list(instances.image_size)}
    if instances.has("pred_boxes"):
        out["pred_boxes"] = instances.pred_boxes.tensor
    for key in ("scores", "pred_classes"):
        if instances.has(key):
            out[key] = getattr(instances, key)
    if instances.has("pred_masks"):
        masks = np.asfortranarray(instances.pred_masks.numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_util.encode(masks) if len(instances) else []
        out["pred_masks_rle"] = [{"size": list(r["size"]), "counts": r["counts"].decode()} for r in rles]
    return out


def _expand_instances(data: Dict) -> Instances:
    inst = Instances(tuple(data["image_size"]))
    if "pred_boxes" in data:
        inst.pred_boxes = Boxes(data["pred_boxes"])
    for key in ("scores", "pred_classes"):
        if key in data:
            inst.set(key, data[key])
    if "pred_masks_rle" in data:
        h, w = data["image_size"]
        rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in data["pred_masks_rle"]]
        masks = mask_util.decode(rles) if rles else np.zeros((h, w, 0), dtype=np.uint8)
        inst.pred_masks = torch.from_numpy(masks.transpose(2, 0, 1).astype(bool))
    return inst


def compact_outputs(output: Dict, keys: Iterable[str]) -> Dict:
    """The outputs ``keys`` of one image, on the CPU, in their cacheable form."""
    out = {}
    for key in keys:
        value = output[key]
        if key == "panoptic_seg":
            ids, segments = value
            out[key] = (ids.cpu(), segments)
        elif key == "sem_seg":
            labels = semantic_labels(value).cpu()
            out[key] = labels.to(torch.int16 if labels.max() < 2**15 else torch.int32)
        elif key == "instances":
            out[key] = _compact_instances(value)
        else:
            raise KeyError(f"No cacheable form for model output {key!r}")
    return out


def expand_outputs(entry: Dict) -> Dict:
    """Inverse of :func:`compact_outputs` (label maps stay label maps)."""
    out = dict(entry)
    if isinstance(out.get("instances"), dict):
        out["instances"] = _expand_instances(out["instances"])
    if "sem_seg" in out:
        out["sem_seg"] = out["sem_seg"].long()
    return out
