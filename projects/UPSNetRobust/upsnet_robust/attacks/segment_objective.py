# Copyright (c) UPSNetRobust authors.
"""The ``segment`` objective: a segment-level loss aimed at recognition quality (RQ).

PQ counts a ground-truth segment as recognised when a predicted segment of its class overlaps it
with IoU > 0.5. A pixel-level loss spends its effort where the pixels are (large stuff regions),
while every segment, however small, counts the same in RQ. This objective gives each
ground-truth segment equal weight and drops a segment once it can no longer be matched.

Segments. The ground-truth segments are the panoptic annotation's segments (``pan_seg``: the
(h, w) segment-id map at the model input's resolution, and ``segments_info``; the sweep's data
loader adds both, see :class:`~upsnet_robust.evaluation.RobustMapper`): every stuff region and
every thing instance, with crowd segments (``iscrowd``) and void pixels (ids without a segment)
left out. A segment's class c_s is its category mapped to the classes of the model's dense
logits by the adapter (``dense_targets``: e.g. PanopticFPN's single "things" class for every
thing segment); pixels the adapter maps to its ignore label are left out, and a segment left with
no pixel is dropped.

Loss. It is built on the dense per-pixel class logits z (every adapter with ``dense_logits``:
UPSNet, whose panoptic head builds its stuff and instance channels from the same semantic logits,
PanopticFPN and Panoptic-DeepLab). For segment s with pixel set P_s, let
correct_p = [argmax_c z_p == c_s] and r_s = 1/|P_s| sum_{p in P_s} correct_p, the fraction of
its pixels still labelled with its class (both detached, recomputed at every call). A segment
whose pixels have mostly lost their class (r_s <= 0.5) cannot be matched at IoU > 0.5 by a
segment of that class under the panoptic merge, so it is *broken*; the others are *still
matched*. With S the number of ground-truth segments,

    L = 1/S sum_{s : r_s > 0.5} 1/|P_s| sum_{p in P_s, correct_p} CE(z_p, c_s),

0 (with a zero gradient) when S = 0. Each segment weighs the same whatever its size; a broken
segment contributes nothing and no gradient, so the attack moves on to the segments still
matched; within a segment, pixels already wrong are masked out as in ``masked_ce``.

As for the masked losses of :mod:`.dense_objectives`, the objective's gradient is L's but its
value is the plain cross-entropy against the segments' classes (mean over their pixels): L falls
as segments break, so it would rank points (APGD's step control and best point, restarts)
backwards. SegPGD / CosPGD read the logits and the per-pixel targets (c_s on P_s, ignore
elsewhere) through ``logits_and_targets``.

Caveat: on PanopticFPN and Panoptic-DeepLab the thing instances come from a detector / centre
head the dense logits do not reach; there the loss breaks thing segments only through their
semantic class (PanopticFPN: "thing" against stuff), which is what the panoptic merge reads.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .objectives import DenseObjective, MissingGroundTruthError, register_objective

__all__ = ["SegmentObjective", "segment_loss", "segment_ratios", "segments_from_panoptic"]


def _check(logits: torch.Tensor, segments: torch.Tensor, classes: torch.Tensor) -> None:
    if logits.dim() != 3 or segments.dim() != 2 or tuple(logits.shape[1:]) != tuple(segments.shape):
        raise ValueError(
            f"Expected logits (C, h, w) and a segment map (h, w) of the same size, got "
            f"{tuple(logits.shape)} and {tuple(segments.shape)}"
        )
    if classes.dim() != 1 or (len(classes) and int(segments.max()) >= len(classes)):
        raise ValueError(
            f"segment map values must be -1 (no segment) or index the {len(classes)} classes"
        )
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= logits.shape[0]):
        raise ValueError(f"segment classes must lie in [0, {logits.shape[0]}), got {classes}")


def segment_ratios(
    logits: torch.Tensor, segments: torch.Tensor, classes: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per segment, the fraction r_s of its pixels whose argmax is its class.

    Args:
        logits (Tensor): (C, h, w) class logits of one image.
        segments (Tensor): (h, w) long, the segment index of each pixel in [0, S), -1 for none.
        classes (Tensor): (S,) long, each segment's class c_s.

    Returns:
        tuple[Tensor, Tensor, Tensor]: r (S,), the (h, w) bool mask of pixels in a segment and
        still labelled with its class, and the segments' pixel counts (S,) (all detached).
    """
    _check(logits, segments, classes)
    inside = segments >= 0
    if len(classes) == 0:
        return logits.new_zeros(0), torch.zeros_like(inside), logits.new_zeros(0)
    index = segments.clamp_min(0)
    correct = inside & (logits.detach().argmax(dim=0) == classes[index])
    counts = torch.bincount(segments[inside], minlength=len(classes)).to(logits.dtype)
    hits = torch.bincount(segments[correct], minlength=len(classes)).to(logits.dtype)
    return hits / counts.clamp_min(1), correct, counts


def segment_loss(
    logits: torch.Tensor, segments: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """L = 1/S sum_{s : r_s > 0.5} 1/|P_s| sum_{p in P_s, still correct} CE(z_p, c_s) (see the
    module docstring); 0 with a zero gradient when there is no segment.

    Args: as :func:`segment_ratios`.

    Returns:
        Tensor: 0-d, differentiable w.r.t. ``logits``.
    """
    ratios, correct, counts = segment_ratios(logits, segments, classes)
    if len(classes) == 0:
        return logits.sum() * 0.0
    index = segments.clamp_min(0)
    matched = (ratios > 0.5).to(logits.dtype)
    weight = correct.to(logits.dtype) * (matched / counts.clamp_min(1))[index]
    ce = F.cross_entropy(logits[None], classes[index][None], reduction="none")[0]
    return (weight * ce).sum() / len(classes)


def segments_from_panoptic(x: Dict, adapter, ignore_label: int = 255):
    """The ground-truth segments of input ``x`` in the classes of the adapter's dense logits.

    Args:
        x (dict): a model input with ``pan_seg`` ((h, w) segment ids) and ``segments_info``
            (COCO panoptic: ``id``, contiguous ``category_id``, optional ``iscrowd``).
        adapter: the model's adapter (its ``dense_targets`` maps the data set's ids).
        ignore_label (int): the data set's ignore label in semantic maps.

    Returns:
        tuple[Tensor, Tensor, Tensor]: the (h, w) segment index map (-1: void, crowd or ignored
        by the adapter), the (S,) classes, and the (h, w) per-pixel targets (c_s on each
        segment, the adapter's ignore value elsewhere).
    """
    pan = x["pan_seg"].long()
    semantic = torch.full_like(pan, ignore_label)
    kept = []
    for info in x["segments_info"]:
        if info.get("iscrowd", 0):
            continue
        mask = pan == int(info["id"])
        if bool(mask.any()):
            semantic[mask] = int(info["category_id"])
            kept.append(mask)
    targets = adapter.dense_targets(dict(x, sem_seg=semantic)).to(pan.device).long()
    valid = targets != adapter.ignore_value
    segments = torch.full_like(pan, -1)
    classes: List[int] = []
    for mask in kept:
        mask = mask & valid
        if bool(mask.any()):
            segments[mask] = len(classes)
            classes.append(int(targets[mask][0]))
    targets = torch.where(segments >= 0, targets, torch.full_like(targets, adapter.ignore_value))
    return segments, torch.tensor(classes, dtype=torch.long, device=pan.device), targets


@register_objective("segment")
class SegmentObjective(DenseObjective):
    """Gradient of :func:`segment_loss` on the ground-truth panoptic segments (stuff regions and
    thing instances, crowd and void left out); value: the plain cross-entropy against the
    segments' classes (see the module docstring)."""

    description = (
        "every ground-truth segment still matched (IoU > 0.5) pushed below 0.5, each "
        "segment weighted equally whatever its size (aimed at RQ)"
    )

    ground_truth = ("pan_seg", "segments_info")

    def __init__(self, model, batched_inputs, seed=0, batched=False):
        super().__init__(model, batched_inputs, seed, batched)
        meta = self.adapter.metadata
        ignore_label = int(meta.get("ignore_label", 255)) if meta is not None else 255
        self._segments, self._classes, self._targets = [], [], []
        for x in self.inputs:
            segments, classes, targets = segments_from_panoptic(x, self.adapter, ignore_label)
            self._segments.append(segments)
            self._classes.append(classes)
            self._targets.append(targets)

    def targets(self, i):
        return self._targets[i]

    def _check_ground_truth(self, batched_inputs):
        try:
            super()._check_ground_truth(batched_inputs)
        except MissingGroundTruthError as e:
            raise MissingGroundTruthError(
                f"{e}. The segment objective reads the panoptic annotation (pan_seg_file_name "
                "and segments_info of the data set dicts); the robustness sweep's loader adds "
                "pan_seg and segments_info (RobustMapper(..., panoptic_segments=True))"
            ) from None

    def pixel_loss(self, logits, i):
        value = segment_loss(logits, self._segments[i], self._classes[i])
        cross_entropy = super().pixel_loss(logits, i).detach()
        return cross_entropy + (value - value.detach())
