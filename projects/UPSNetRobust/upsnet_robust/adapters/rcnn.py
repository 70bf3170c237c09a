# Copyright (c) UPSNetRobust authors.
"""The adapter of detectron2's ``GeneralizedRCNN`` (Faster / Mask / Keypoint R-CNN), scored
with COCO box and mask AP (detectron2's ``COCOEvaluator``).

These models have no per-pixel class logits, so only ``train_losses`` (RPN, box, mask losses
against the ground-truth instances) can attack them; the dense objectives and attacks are
rejected at set-up. Subclasses with their own adapter (UPSNet) keep theirs: adapters are looked
up by the model's class before its bases.
"""

from typing import Dict, FrozenSet, List, Optional

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

from .base import LOSSES, ModelAdapter, eval_mode, register_adapter

__all__ = ["GeneralizedRCNNAdapter", "build_instance_test_mapper"]


def build_instance_test_mapper(cfg) -> DatasetMapper:
    """detectron2's ``DatasetMapper`` with the test-time resize only (``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST``; no crop, no flip) that keeps the annotations as ``instances`` (masks in
    ``INPUT.MASK_FORMAT`` when ``MODEL.MASK_ON``) for the training losses. Crowd annotations are
    dropped from ``instances`` as in training; ``height``/``width`` stay, so predictions are
    resized back to the original image for COCO evaluation."""
    return DatasetMapper(
        is_train=True,  # keeps the annotations; the augmentations are the test-time ones
        augmentations=utils.build_augmentation(cfg, is_train=False),
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=cfg.MODEL.MASK_ON,
        instance_mask_format=cfg.INPUT.MASK_FORMAT,
        use_keypoint=cfg.MODEL.KEYPOINT_ON,
        precomputed_proposal_topk=(
            cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST if cfg.MODEL.LOAD_PROPOSALS else None
        ),
        recompute_boxes=False,
    )


@register_adapter("GeneralizedRCNN")
class GeneralizedRCNNAdapter(ModelAdapter):
    """Detectors predict the data set's contiguous thing ids, so no label mapping is needed."""

    task = "instances"
    capabilities = frozenset({LOSSES})
    loss_ground_truth = ("instances",)

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        # the model's own output: instances resized to each input's height x width
        with eval_mode(self.model):
            return self.model(inputs)

    @classmethod
    def test_mapper(cls, cfg):
        return build_instance_test_mapper(cfg)
