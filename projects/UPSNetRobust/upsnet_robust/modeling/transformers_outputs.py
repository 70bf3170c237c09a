# Copyright (c) UPSNetRobust authors.
"""Training targets and detectron2 outputs of `transformers` segmentation models.

Mask-classification models (Mask2Former, MaskFormer) predict, per query q, class logits
(K + 1, the last "no object") and a mask logit map; semantic models (SegFormer, UperNet) predict
per-pixel class logits. Their training targets are built here from a detectron2 mapper's ground
truth, and their raw outputs turned into detectron2's ``sem_seg`` / ``panoptic_seg`` /
``instances`` with Mask2Former's own inference rules (Cheng et al., 2022; the official
``semantic_inference``, ``panoptic_inference`` and ``instance_inference``), in the data set's
contiguous ids (the model's class k *is* contiguous id k: the meta-architecture checks the class
lists agree at set-up).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks, Instances

__all__ = [
    "mask_targets",
    "semantic_targets",
    "semantic_probabilities",
    "normalized_log_scores",
    "panoptic_inference",
    "instance_inference",
]


def _pad(t: torch.Tensor, size: Tuple[int, int], value) -> torch.Tensor:
    """Pad the last two dims of ``t`` (bottom / right) to ``size``."""
    h, w = t.shape[-2:]
    return F.pad(t, (0, size[1] - w, 0, size[0] - h), value=value)


def _require(x: Dict, key: str, what: str) -> None:
    if key not in x:
        raise KeyError(
            f"{what} needs the ground truth {key!r} in the model input of "
            f"{x.get('file_name', 'an image')}; use the adapter's mapper (a panoptic data set "
            "gives 'sem_seg' and 'instances', a semantic one 'sem_seg')"
        )


def mask_targets(
    x: Dict,
    task: str,
    thing_ids: Sequence[int],
    num_classes: int,
    ignore_label: int,
    padded_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask_labels (N, H, W) float, class_labels (N,) int64)`` of one image, padded to the
    batch: one mask per ground-truth segment, as the official Mask2Former mappers build them.

    * panoptic: one mask per stuff class present in ``sem_seg`` and one per thing instance of
      ``instances`` (its detector class ``gt_classes`` is the rank among ``thing_ids``);
    * semantic: one mask per class present in ``sem_seg`` (``ignore_label`` left out);
    * instance: one mask per instance, ``gt_classes`` being the model's classes.
    """
    masks: List[torch.Tensor] = []
    classes: List[int] = []
    things = sorted(int(i) for i in thing_ids)
    if task in ("panoptic", "semantic"):
        _require(x, "sem_seg", f"The {task} training loss")
        sem = x["sem_seg"]
        for c in torch.unique(sem).tolist():
            if c == ignore_label or (task == "panoptic" and c in things):
                continue
            if not 0 <= c < num_classes:
                raise ValueError(
                    f"sem_seg of {x.get('file_name', 'an image')} has label {c}, outside the "
                    f"model's {num_classes} classes and not the ignore label {ignore_label}"
                )
            masks.append(sem == c)
            classes.append(int(c))
    if task in ("panoptic", "instance"):
        _require(x, "instances", f"The {task} training loss")
        inst = x["instances"]
        gt = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
        for mask, c in zip(gt, inst.gt_classes.tolist()):
            masks.append(mask.bool())
            classes.append(things[c] if task == "panoptic" else int(c))
    h, w = x["image"].shape[-2:]
    stacked = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    return _pad(stacked.float(), padded_size, 0.0), torch.tensor(classes, dtype=torch.int64)


def semantic_targets(
    x: Dict, ignore_label: int, model_ignore: int, padded_size: Tuple[int, int]
) -> torch.Tensor:
    """The (H, W) int64 label map of one image for a semantic model's own loss: the data set's
    ignore label becomes the model's ignore index, and so does the padding."""
    _require(x, "sem_seg", "The semantic training loss")
    sem = x["sem_seg"].long()
    sem = sem.masked_fill(sem == ignore_label, model_ignore)
    return _pad(sem, padded_size, model_ignore)


def semantic_probabilities(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's per-pixel class scores (K, H, W) from (Q, K+1) class and (Q, H, W) mask
    logits: ``einsum(softmax(classes)[:, :-1], sigmoid(masks))``. Probabilities per query, but
    their sum over classes at a pixel is not one (not logits)."""
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_logits.sigmoid())


def normalized_log_scores(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """log(s_c / sum_k s_k) per pixel of (K, H, W) non-negative scores: log-probabilities
    whose softmax is the normalised scores and whose argmax is the scores' argmax, so that
    cross-entropy-style objectives read the model's own semantic prediction."""
    scores = scores + eps
    return scores.log() - scores.sum(0, keepdim=True).log()


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Sequence[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Mask2Former's panoptic merge: queries kept when their best class (not "no object") has
    probability > ``object_mask_threshold``; each pixel goes to the kept query of highest
    score x mask probability; a query keeps its pixels whose own mask probability is >= 0.5
    unless they are < ``overlap_threshold`` of its mask; stuff queries of one class merge.

    Returns detectron2's ``(ids (H, W) int32, segments_info)``; ``category_id`` is the
    contiguous id, ``isthing`` from ``thing_ids``, and ``score`` the query's class probability.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    masks = mask_logits.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    h, w = masks.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    segments: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    owner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    things = set(int(i) for i in thing_ids)
    stuff_segment: Dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        isthing = cls in things
        mask_area = int((owner == k).sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = (owner == k) & (cur_masks[k] >= 0.5)
        if mask_area == 0 or original_area == 0 or int(mask.sum()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and cls in stuff_segment:
            panoptic[mask] = stuff_segment[cls]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_segment[cls] = segment_id
        panoptic[mask] = segment_id
        score = float(cur_scores[k])
        segments.append({"id": segment_id, "isthing": isthing, "category_id": cls, "score": score})
    return panoptic, segments


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    max_detections: int,
    thing_ids: Optional[Sequence[int]] = None,
) -> Instances:
    """Mask2Former's instance inference: the top ``max_detections`` (query, class) pairs by
    class probability (only classes in ``thing_ids`` when given), masks ``mask logit > 0``, score
    = class probability x mean mask probability inside the mask, boxes from the masks."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[-1] - 1
    probs = class_logits.softmax(-1)[:, :-1]
    if thing_ids is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=probs.device)
        allowed[list(thing_ids)] = True
        probs = probs.masked_fill(~allowed, 0.0)
    k = min(int(max_detections), num_queries * num_classes)
    scores, index = probs.flatten().topk(k, sorted=False)
    labels, query = index % num_classes, torch.div(index, num_classes, rounding_mode="floor")
    masks = mask_logits[query]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result = Instances(tuple(mask_logits.shape[-2:]))
    result.pred_masks = binary
    result.pred_boxes = BitMasks(binary).get_bounding_boxes()
    result.scores = scores * mask_scores
    result.pred_classes = labels
    return result
