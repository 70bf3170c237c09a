# Copyright (c) UPSNetRobust authors.
"""The UPSNet meta-architecture: Mask R-CNN + a semantic head + a parameter-free panoptic head.

The forward pass is gradient-transparent: nothing between the input image and any loss or logit
is detached (detectron2's frozen stages set ``requires_grad=False`` on parameters, which does not
block input gradients). Only discrete decisions (proposals, box positions, which instances are
kept) carry no gradient, as in any detector.
"""
import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances

from .panoptic_head import (
    integer_boxes,
    panoptic_logits,
    panoptic_loss,
    panoptic_segments,
    panoptic_targets,
    paste_in_boxes,
    remove_overlapping_masks,
    select_panoptic_candidates,
)
from .semantic_head import UPSNetSemanticHead

__all__ = ["UPSNet"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class UPSNet(GeneralizedRCNN):
    """UPSNet (Xiong et al., CVPR 2019) on detectron2's ResNet-FPN, RPN and Mask R-CNN heads.

    Semantic channels ``[0, num_stuff)`` are stuff, ``[num_stuff, C)`` are things; detector class
    ``c`` is semantic channel ``num_stuff + c`` (Cityscapes trainIds satisfy this).
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: nn.Module,
        num_stuff: int,
        panoptic_loss_weight: float = 0.5,
        box_keep_fraction: float = 0.7,
        panoptic_score_thresh: float = 0.6,
        panoptic_nms_thresh: float = 0.5,
        panoptic_max_instances: int = 100,
        mask_overlap_thresh: float = 0.3,
        stuff_area_limit: int = 2048,
        stuff_relabel_fraction: float = 0.5,
        **kwargs,
    ):
        """
        Args:
            sem_seg_head: a :class:`UPSNetSemanticHead`.
            num_stuff (int): number of stuff classes (the first semantic channels).
            panoptic_loss_weight (float): weight of the panoptic-head loss.
            box_keep_fraction (float): fraction of GT instances given a panoptic channel in
                training; the others train the unknown channel.
            panoptic_score_thresh, panoptic_nms_thresh, panoptic_max_instances: selection of
                panoptic instance candidates (score threshold, class-agnostic NMS IoU, top-k).
            mask_overlap_thresh (float): a mask more covered than this by kept masks of its class
                is dropped.
            stuff_area_limit (int): stuff segments below this area (pixels) become void.
            stuff_relabel_fraction (float): share of an instance's region that a stuff class
                needs in the semantic argmax to take the region over.
            kwargs: the arguments of :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        if not isinstance(self.roi_heads, StandardROIHeads) or not self.roi_heads.mask_on:
            raise ValueError("UPSNet needs StandardROIHeads with MODEL.MASK_ON=True")
        self.sem_seg_head = sem_seg_head
        self.num_stuff = num_stuff
        self.panoptic_loss_weight = panoptic_loss_weight
        self.box_keep_fraction = box_keep_fraction
        self.panoptic_score_thresh = panoptic_score_thresh
        self.panoptic_nms_thresh = panoptic_nms_thresh
        self.panoptic_max_instances = panoptic_max_instances
        self.mask_overlap_thresh = mask_overlap_thresh
        self.stuff_area_limit = stuff_area_limit
        self.stuff_relabel_fraction = stuff_relabel_fraction

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        num_things = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if num_things > num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES ({num_things}) exceeds "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES ({num_classes}): things are semantic classes too"
            )
        u = cfg.MODEL.UPSNET
        ret.update(
            {
                "sem_seg_head": UPSNetSemanticHead(cfg, ret["backbone"].output_shape()),
                "num_stuff": num_classes - num_things,
                "panoptic_loss_weight": u.PANOPTIC_LOSS_WEIGHT,
                "box_keep_fraction": u.BOX_KEEP_FRACTION,
                "panoptic_score_thresh": u.PANOPTIC_SCORE_THRESH,
                "panoptic_nms_thresh": u.PANOPTIC_NMS_THRESH,
                "panoptic_max_instances": u.PANOPTIC_MAX_INSTANCES,
                "mask_overlap_thresh": u.MASK_OVERLAP_THRESH,
                "stuff_area_limit": u.STUFF_AREA_LIMIT,
                "stuff_relabel_fraction": u.STUFF_RELABEL_FRACTION,
            }
        )
        return ret

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Args:
            batched_inputs: a list of dicts from the dataset mapper, each with ``image``
                ((3, H, W) uint8 or float in 0-255, ``INPUT.FORMAT``), and in training
                ``instances`` (gt_boxes, gt_classes, gt_masks) and ``sem_seg`` ((H, W) labels).
                A float ``image`` with ``requires_grad`` receives gradients.
        Returns:
            training: dict of losses (RPN, box, mask, ``loss_sem_seg``, ``loss_panoptic``).
            inference: see :meth:`inference`.
        """
        if not self.training:
            return self.inference(batched_inputs)
        _check_training_inputs(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        sem_logits = self.sem_seg_head.layers(features)
        return self._losses(images, features, sem_logits, batched_inputs)

    def per_image_losses(
        self, batched_inputs: List[Dict[str, torch.Tensor]], seeds: Optional[List[int]] = None
    ) -> List[Dict[str, torch.Tensor]]:
        """Each image's training losses on its own, with the backbone and semantic subnet run
        once on the whole batch.

        The batched fast path of loss-based attacks: the dense, expensive part sees the batch;
        the sampling heads (RPN, ROI, panoptic instance subset) run per image, under
        ``torch.manual_seed(seeds[i])`` when seeds are given (the caller's RNG state is
        restored). For images of equal size the result equals ``forward([x])`` per image with
        the same seed, up to float summation order; smaller images of a mixed batch see extra
        zero padding at their bottom/right border, like in any detectron2 batch.

        Returns:
            list[dict]: per image, the loss dict :meth:`forward` returns in training.
        """
        assert self.training, "per_image_losses needs training mode (losses)"
        _check_training_inputs(batched_inputs)
        if seeds is not None and len(seeds) != len(batched_inputs):
            raise ValueError(f"{len(seeds)} seeds for {len(batched_inputs)} images")
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        sem_logits = self.sem_seg_head.layers(features)
        results = []
        for i, x in enumerate(batched_inputs):
            one = ImageList(images.tensor[i : i + 1], [images.image_sizes[i]])
            feats = {k: v[i : i + 1] for k, v in features.items()}
            with torch.random.fork_rng(devices=[]):
                if seeds is not None:
                    torch.manual_seed(int(seeds[i]))
                results.append(self._losses(one, feats, sem_logits[i : i + 1], [x]))
        return results

    def _losses(self, images: ImageList, features, sem_logits, batched_inputs) -> Dict:
        """Training losses given the batch's features and 1/4-resolution semantic logits."""
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        sem_targets = ImageList.from_tensors(
            [self._move_to_current_device(x["sem_seg"]) for x in batched_inputs],
            self.backbone.size_divisibility,
            pad_value=self.sem_seg_head.ignore_value,
            padding_constraints=self.backbone.padding_constraints,
        ).tensor
        # pad the labels to the image tensor (a batch padded wider than this image's own labels)
        pad_h = images.tensor.shape[-2] - sem_targets.shape[-2]
        pad_w = images.tensor.shape[-1] - sem_targets.shape[-1]
        if pad_h > 0 or pad_w > 0:
            sem_targets = F.pad(
                sem_targets, (0, pad_w, 0, pad_h), value=self.sem_seg_head.ignore_value
            )
        losses = self.sem_seg_head.losses(sem_logits, sem_targets)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses.update(proposal_losses)
        losses.update(detector_losses)
        losses["loss_panoptic"] = self.panoptic_loss_weight * self._panoptic_training_loss(
            features, sem_logits, sem_targets, gt_instances
        )
        return losses

    def _mask_logits(self, features, boxes: List[Boxes], classes: torch.Tensor) -> torch.Tensor:
        """Mask-head logits (K, M, M) of each box's own class, for boxes of all images."""
        rh = self.roi_heads
        pooled = rh.mask_pooler([features[f] for f in rh.mask_in_features], boxes)
        logits = rh.mask_head.layers(pooled)
        if logits.shape[1] == 1:  # class-agnostic mask head
            return logits[:, 0]
        return logits[torch.arange(len(classes), device=logits.device), classes]

    def _panoptic_training_loss(self, features, sem_logits, sem_targets, gt_instances):
        """UPSNet's panoptic-head loss at 1/4 resolution on a random subset of GT instances."""
        stride = self.sem_seg_head.common_stride
        height, width = sem_logits.shape[-2:]
        keeps, kept_boxes = [], []
        for inst in gt_instances:
            k = len(inst)
            keep = torch.zeros(k, dtype=torch.bool, device=self.device)
            if k:
                n = max(1, int(k * self.box_keep_fraction))
                keep[torch.randperm(k, device=self.device)[:n]] = True
            keeps.append(keep)
            kept_boxes.append(inst.gt_boxes[keep])
        kept_classes = torch.cat([inst.gt_classes[keep] for inst, keep in zip(gt_instances, keeps)])
        mask_logits = self._mask_logits(features, kept_boxes, kept_classes).split(
            [len(b) for b in kept_boxes]
        )
        losses = []
        for i, (inst, keep) in enumerate(zip(gt_instances, keeps)):
            boxes = integer_boxes(kept_boxes[i].tensor / stride, height, width)
            pasted = paste_in_boxes(mask_logits[i], boxes, height, width, resize=True)
            logits = panoptic_logits(
                sem_logits[i], boxes, inst.gt_classes[keep], pasted, self.num_stuff
            )
            sem_gt = sem_targets[i, ::stride, ::stride]
            masks = inst.gt_masks.tensor
            full_h, full_w = sem_targets.shape[-2:]
            masks = F.pad(masks, (0, full_w - masks.shape[-1], 0, full_h - masks.shape[-2]))
            masks = masks[:, ::stride, ::stride]
            target = panoptic_targets(
                sem_gt, masks, keep, self.num_stuff, self.sem_seg_head.ignore_value
            )
            losses.append(panoptic_loss(logits, target, self.sem_seg_head.ignore_value))
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ inference
    def predict(
        self, batched_inputs: List[Dict[str, torch.Tensor]], with_detector_masks: bool = True
    ) -> List[Dict]:
        """Differentiable raw predictions, before post-processing (used by inference and by
        inference-path attack objectives).

        ``with_detector_masks=False`` skips the mask head on the standard detections (the
        panoptic result does not use them): attacks and panoptic-only scoring save that work.

        Returns:
            per image a dict with ``sem_logits`` ((C, h, w) at input resolution, cropped to the
            image), ``panoptic_logits`` ((num_stuff + K + 1, h, w)), ``classes``, ``scores``,
            ``boxes`` of the K kept panoptic instances, ``detections`` (detectron2 Instances of
            the standard detector output) and ``image_size`` (h, w).
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        sem_full = self.sem_seg_head.upsample(self.sem_seg_head.layers(features))
        proposals, _ = self.proposal_generator(images, features, None)
        detections, candidates = self._detect(features, proposals, images.image_sizes)
        if with_detector_masks:
            detections = self.roi_heads.forward_with_given_boxes(features, detections)

        cand_boxes = [Boxes(c[0]) for c in candidates]
        cand_classes = torch.cat([c[2] for c in candidates])
        mask_logits = self._mask_logits(features, cand_boxes, cand_classes).split(
            [len(b) for b in cand_boxes]
        )
        outputs = []
        for i, (h, w) in enumerate(images.image_sizes):
            boxes, scores, classes = candidates[i]
            sem = sem_full[i, :, :h, :w]
            int_boxes = integer_boxes(boxes, h, w)
            pasted = paste_in_boxes(mask_logits[i], int_boxes, h, w, resize=True)
            keep = remove_overlapping_masks(pasted, classes, self.mask_overlap_thresh)
            keep = torch.as_tensor(keep, dtype=torch.long, device=self.device)
            outputs.append(
                {
                    "sem_logits": sem,
                    "panoptic_logits": panoptic_logits(
                        sem, int_boxes[keep], classes[keep], pasted[keep], self.num_stuff
                    ),
                    "classes": classes[keep],
                    "scores": scores[keep],
                    "boxes": boxes[keep],
                    "detections": detections[i],
                    "image_size": (h, w),
                }
            )
        return outputs

    def _detect(self, features, proposals: List[Instances], image_sizes):
        """Run the box head once; return detectron2's standard detections and UPSNet's panoptic
        candidates (a separate, stricter selection of the same box predictions)."""
        rh = self.roi_heads
        box_features = rh.box_pooler(
            [features[f] for f in rh.box_in_features], [p.proposal_boxes for p in proposals]
        )
        predictions = rh.box_predictor(rh.box_head(box_features))
        detections, _ = rh.box_predictor.inference(predictions, proposals)
        boxes = rh.box_predictor.predict_boxes(predictions, proposals)
        scores = rh.box_predictor.predict_probs(predictions, proposals)
        candidates = [
            select_panoptic_candidates(
                b,
                s,
                size,
                self.panoptic_score_thresh,
                self.panoptic_nms_thresh,
                self.panoptic_max_instances,
            )
            for b, s, size in zip(boxes, scores, image_sizes)
        ]
        return detections, candidates

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        do_postprocess: bool = True,
        panoptic_only: bool = False,
    ):
        """
        Args:
            panoptic_only (bool): return only ``panoptic_seg`` (skips the detector's masks and
                the semantic resize); what a PQ-only sweep needs.

        Returns:
            per image a dict with detectron2's standard keys: ``sem_seg`` ((C, H, W) logits),
            ``instances`` (detector output) and ``panoptic_seg`` = (ids (H, W) int32, 0 = void,
            segments_info). Segment ``category_id`` is the contiguous semantic id (for
            Cityscapes: the trainId), with ``isthing``, as ``COCOPanopticEvaluator`` and
            ``Visualizer.draw_panoptic_seg`` expect. Without post-processing, :meth:`predict`'s
            raw outputs.
        """
        assert not self.training
        raw = self.predict(batched_inputs, with_detector_masks=not panoptic_only)
        if not do_postprocess:
            return raw
        return [self.postprocess(r, x, panoptic_only) for r, x in zip(raw, batched_inputs)]

    def postprocess(self, raw: Dict, batched_input: Dict, panoptic_only: bool = False) -> Dict:
        """Resize one image's raw prediction to its original size and build the panoptic result."""
        h, w = raw["image_size"]
        height = batched_input.get("height", h)
        width = batched_input.get("width", w)
        sem_seg = sem_seg_postprocess(raw["sem_logits"], (h, w), height, width)
        pan_labels = raw["panoptic_logits"].argmax(dim=0)
        if (height, width) != (h, w):
            pan_labels = F.interpolate(
                pan_labels[None, None].float(), size=(height, width), mode="nearest"
            )[0, 0].long()
        ids, segments = panoptic_segments(
            pan_labels,
            sem_seg.argmax(dim=0),
            raw["classes"],
            raw["scores"],
            self.num_stuff,
            self.stuff_area_limit,
            self.stuff_relabel_fraction,
        )
        if panoptic_only:
            return {"panoptic_seg": (ids, segments)}
        return {
            "sem_seg": sem_seg,
            "instances": detector_postprocess(raw["detections"], height, width),
            "panoptic_seg": (ids, segments),
        }


def _check_training_inputs(batched_inputs: List[Dict]) -> None:
    for key in ("instances", "sem_seg"):
        for x in batched_inputs:
            if key not in x:
                raise KeyError(
                    f"UPSNet training needs '{key}' in every input dict (missing for "
                    f"{x.get('file_name', 'an input')}); use the 'upsnet_panoptic' dataset "
                    "mapper (INPUT.DATASET_MAPPER_NAME)"
                )
