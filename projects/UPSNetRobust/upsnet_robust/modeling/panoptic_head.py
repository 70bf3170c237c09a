# Copyright (c) UPSNetRobust authors.
"""UPSNet's parameter-free panoptic head, as differentiable tensor functions.

Panoptic logits of one image are the channels ``[stuff (N_st), instances (K), unknown (1)]``:
instance i is ``Y_i + M_i`` where ``Y_i`` is the semantic logit of its class inside its box and
``M_i`` its mask logit pasted into the box (both 0 outside the box), and the unknown channel is
``max(thing semantic logits) - max_i Y_i``. Box positions and the choice of instances are
discrete decisions; the logits stay differentiable w.r.t. the semantic and mask logits, so an
attack's gradient reaches the input image through every channel.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import nms

__all__ = [
    "integer_boxes",
    "paste_in_boxes",
    "panoptic_logits",
    "panoptic_targets",
    "panoptic_loss",
    "select_panoptic_candidates",
    "remove_overlapping_masks",
    "panoptic_segments",
]


def integer_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer boxes (x0, y0, x1, y1), x1/y1 exclusive, covering the float boxes, clipped to the
    image and at least one pixel wide (UPSNet truncates x0, y0 and rounds x1, y1 up)."""
    b = boxes.detach()
    x0 = b[:, 0].floor().clamp(0, width - 1)
    y0 = b[:, 1].floor().clamp(0, height - 1)
    x1 = torch.maximum(b[:, 2].ceil().clamp(max=width), x0 + 1)
    y1 = torch.maximum(b[:, 3].ceil().clamp(max=height), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def paste_in_boxes(
    values: torch.Tensor, boxes: torch.Tensor, height: int, width: int, resize: bool
) -> torch.Tensor:
    """Place per-box maps into full (K, height, width) maps, zero outside each box.

    Args:
        values: either (K, M, M) maps that are bilinearly resized into each box (``resize=True``,
            mask logits), or (K, height, width) full maps that are cropped to each box
            (``resize=False``, semantic logits).
        boxes: (K, 4) integer boxes from :func:`integer_boxes`.
    Differentiable w.r.t. ``values`` (zero padding instead of in-place writes).
    """
    out = []
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if resize:
            patch = F.interpolate(
                values[k][None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
            )[0, 0]
        else:
            patch = values[k, y0:y1, x0:x1]
        out.append(F.pad(patch, (x0, width - x1, y0, height - y1)))
    if not out:
        return values.new_zeros((0, height, width))
    return torch.stack(out)


def panoptic_logits(
    sem_logits: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    pasted_mask_logits: torch.Tensor,
    num_stuff: int,
) -> torch.Tensor:
    """Panoptic logits ``[stuff, Y_i + M_i for each instance, unknown]`` of one image.

    Args:
        sem_logits: (C, H, W) semantic logits; channels >= num_stuff are things.
        boxes: (K, 4) integer boxes in this resolution.
        classes: (K,) detector classes (thing channel = num_stuff + class).
        pasted_mask_logits: (K, H, W) each instance's own-class mask logits pasted into its box
            (:func:`paste_in_boxes` with ``resize=True``), 0 outside.
    Returns:
        (num_stuff + K + 1, H, W)
    """
    _, height, width = sem_logits.shape
    stuff = sem_logits[:num_stuff]
    things = sem_logits[num_stuff:]
    if len(boxes):
        y = paste_in_boxes(sem_logits[num_stuff + classes], boxes, height, width, resize=False)
        instance = y + pasted_mask_logits
        # max over instances of Y_i, where Y_i is 0 outside its box (as in UPSNet).
        y_max = y.max(dim=0).values
    else:
        instance = sem_logits.new_zeros((0, height, width))
        y_max = sem_logits.new_zeros((height, width))
    unknown = things.max(dim=0).values - y_max
    return torch.cat([stuff, instance, unknown[None]], dim=0)


def panoptic_targets(
    sem_gt: torch.Tensor,
    instance_masks: torch.Tensor,
    keep: torch.Tensor,
    num_stuff: int,
    ignore_value: int = 255,
) -> torch.Tensor:
    """Panoptic-head target of one image: stuff pixels keep their class, pixels of the i-th kept
    instance get ``num_stuff + i``, all other thing pixels (dropped instances) are ``unknown``
    (``num_stuff + #kept``), ignored pixels stay ``ignore_value``.

    Args:
        sem_gt: (H, W) semantic labels.
        instance_masks: (K, H, W) bool masks of all GT instances.
        keep: (K,) bool, which instances are given a channel.
    """
    target = torch.full_like(sem_gt, ignore_value)
    is_stuff = sem_gt < num_stuff
    target[is_stuff] = sem_gt[is_stuff]
    is_thing = (sem_gt >= num_stuff) & (sem_gt != ignore_value)
    target[is_thing] = num_stuff + int(keep.sum())
    for i, k in enumerate(torch.nonzero(keep).flatten().tolist()):
        target[instance_masks[k] & (sem_gt != ignore_value)] = num_stuff + i
    return target


def panoptic_loss(logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255):
    """Cross-entropy averaged over all pixels, ignored ones included in the denominator
    (UPSNet computes an unreduced loss and takes ``.mean()``)."""
    loss = F.cross_entropy(logits[None], target[None], ignore_index=ignore_value, reduction="sum")
    return loss / target.numel()


def select_panoptic_candidates(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    max_instances: int,
):
    """Panoptic instance candidates of one image: every (proposal, class) pair scoring above
    ``score_thresh``, one class-agnostic NMS, the top ``max_instances``.

    Args:
        boxes: (R, K*4) class-specific boxes; scores: (R, K+1) softmax, background last.
    Returns:
        boxes (M, 4), scores (M,), classes (M,), sorted by decreasing score.
    """
    num_classes = scores.shape[1] - 1
    boxes = boxes.detach().reshape(-1, num_classes, 4)
    scores = scores.detach()[:, :num_classes]
    height, width = image_size
    boxes = torch.stack(
        [
            boxes[..., 0].clamp(0, width),
            boxes[..., 1].clamp(0, height),
            boxes[..., 2].clamp(0, width),
            boxes[..., 3].clamp(0, height),
        ],
        dim=-1,
    )
    valid = scores > score_thresh
    rows, cls = valid.nonzero(as_tuple=True)
    boxes, scores = boxes[rows, cls], scores[rows, cls]
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, cls = boxes[nonempty], scores[nonempty], cls[nonempty]
    keep = nms(boxes, scores, nms_thresh)[:max_instances]  # sorted by score
    return boxes[keep], scores[keep], cls[keep]


def remove_overlapping_masks(
    instance_logits: torch.Tensor, classes: torch.Tensor, overlap_thresh: float
) -> List[int]:
    """Indices of instances to keep, given pasted mask logits (K, H, W) in decreasing score
    order: a mask (logit > 0) is dropped when empty, or when more than ``overlap_thresh`` of it
    is already claimed by kept masks of the same class."""
    masks = instance_logits.detach() > 0
    claimed = {}
    keep = []
    for i, c in enumerate(classes.tolist()):
        area = int(masks[i].sum())
        if area == 0:
            continue
        prev = claimed.get(c)
        if prev is not None and int((masks[i] & prev).sum()) > overlap_thresh * area:
            continue
        keep.append(i)
        claimed[c] = masks[i] if prev is None else (prev | masks[i])
    return keep


def panoptic_segments(
    panoptic_labels: torch.Tensor,
    semantic_labels: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    num_stuff: int,
    stuff_area_limit: int,
    relabel_fraction: float,
):
    """Turn the panoptic argmax into detectron2's ``(ids, segments_info)``.

    Follows UPSNet's post-processing: an instance whose region's semantic majority is another
    class becomes that stuff class if it holds at least ``relabel_fraction`` of the region; stuff
    segments smaller than ``stuff_area_limit`` pixels become void (id 0).

    Args:
        panoptic_labels: (H, W) argmax over ``[stuff, instances, unknown]`` channels.
        semantic_labels: (H, W) argmax of the semantic logits.
        classes, scores: (K,) detector class and score of each instance channel.
    Returns:
        ids (H, W) int32 with 0 = void, and a list of segment dicts with ``id``,
        ``category_id`` (contiguous semantic id: stuff id, or num_stuff + thing class),
        ``isthing``, ``area`` and, for things, ``score`` and ``instance_id``.
    """
    num_instances = len(classes)
    ids = torch.zeros_like(panoptic_labels, dtype=torch.int32)
    segments = []
    # Stuff areas, after instances have possibly been relabelled as stuff.
    stuff_map = torch.where(panoptic_labels < num_stuff, panoptic_labels, -1)
    instance_segments = []
    for i in range(num_instances):
        region = panoptic_labels == num_stuff + i
        area = int(region.sum())
        if area == 0:
            continue
        thing_channel = num_stuff + int(classes[i])
        sem = semantic_labels[region]
        counts = torch.bincount(sem, minlength=thing_channel + 1)
        majority = int(counts.argmax())
        if majority != thing_channel and majority < num_stuff:
            if counts[majority] >= relabel_fraction * area:
                stuff_map[region] = majority
                continue
        instance_segments.append((i, region, area, thing_channel))
    next_id = 1
    for c in torch.unique(stuff_map).tolist():
        if c < 0:
            continue
        region = stuff_map == c
        area = int(region.sum())
        if area < stuff_area_limit:
            continue
        ids[region] = next_id
        segments.append({"id": next_id, "category_id": c, "isthing": False, "area": area})
        next_id += 1
    for i, region, area, thing_channel in instance_segments:
        ids[region] = next_id
        segments.append(
            {
                "id": next_id,
                "category_id": thing_channel,
                "isthing": True,
                "area": area,
                "score": float(scores[i]),
                "instance_id": i,
            }
        )
        next_id += 1
    return ids, segments
