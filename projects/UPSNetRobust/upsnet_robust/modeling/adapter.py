# Copyright (c) UPSNetRobust authors.
"""UPSNet's model adapter: training losses with the batched fast path, dense semantic logits and
the panoptic head's inference-path logits (the ``panoptic`` objective)."""
from typing import Dict, FrozenSet, List, Optional

import torch

from detectron2.utils.events import EventStorage

from ..adapters.base import (
    DENSE_LOGITS,
    LOSSES,
    PANOPTIC_LOGITS,
    ModelAdapter,
    eval_mode,
    frozen_norm_training_mode,
    register_adapter,
)

__all__ = ["UPSNetAdapter"]


@register_adapter("UPSNet")
class UPSNetAdapter(ModelAdapter):
    """UPSNet predicts Cityscapes-style contiguous ids itself (stuff channels first, things
    after), so no label mapping is needed."""

    task = "panoptic_seg"
    capabilities = frozenset({LOSSES, DENSE_LOGITS, PANOPTIC_LOGITS})
    loss_ground_truth = ("instances", "sem_seg")

    @property
    def ignore_value(self) -> int:
        return self.model.sem_seg_head.ignore_value

    def losses(self, inputs: List[Dict], seeds: Optional[List[int]] = None) -> List[Dict]:
        # backbone and semantic subnet once for the batch, sampling heads per image and seed
        if len(inputs) == 1:
            return super().losses(inputs, seeds)
        with frozen_norm_training_mode(self.model), EventStorage():
            return self.model.per_image_losses(inputs, seeds)

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        model = self.model
        with eval_mode(model):
            batch = model.preprocess_image([{"image": image} for image in images])
            features = model.backbone(batch.tensor)
            logits = model.sem_seg_head.upsample(model.sem_seg_head.layers(features))
        return [logits[i, :, :h, :w] for i, (h, w) in enumerate(batch.image_sizes)]

    def panoptic_predictions(self, inputs: List[Dict]) -> List[Dict]:
        with eval_mode(self.model):
            raws = self.model.predict(inputs, with_detector_masks=False)
        for raw in raws:
            raw["num_stuff"] = self.model.num_stuff
        return raws

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        # PQ alone needs no mask head on the final detections and no semantic resize
        panoptic_only = keys is not None and set(keys) <= {"panoptic_seg"}
        with eval_mode(self.model):
            return self.model.inference(inputs, panoptic_only=panoptic_only)

    @classmethod
    def test_mapper(cls, cfg):
        from ..data import build_panoptic_mapper

        return build_panoptic_mapper(cfg, is_train=False)

    @classmethod
    def train_mapper(cls, cfg):
        from ..data import build_panoptic_mapper

        return build_panoptic_mapper(cfg, is_train=True)
