# Copyright (c) UPSNetRobust authors.
"""The adapter of ``TransformersSegmentor`` (`transformers` Mask2Former, MaskFormer, SegFormer,
UperNet, ...): the model's own training losses and dense per-pixel class scores, so every
attack, objective, ``sea``, defense, adaptive attack and transfer runs on these models.

What the objectives read (docs/MODELS.md):

* ``train_losses``: the model's own losses against the data set's ground truth: for
  mask-classification models the Hungarian-matched class cross-entropy, mask BCE and dice terms
  of every decoder layer (targets: one mask per stuff class and per thing instance, built by the
  meta-architecture); for semantic models their pixel cross-entropy.
* dense objectives (``semantic_ce``, ``masked_ce``, the SEA losses, SegPGD, CosPGD, ILLC,
  ``segment``): semantic models' logits as they are. A mask-classification model has no
  per-pixel logits: its semantic output is s_c = sum_q softmax(class_q)_c sigmoid(mask_q), which
  need not sum to one over c. Its dense "logits" are log(s_c / sum_k s_k), the log of the
  normalised scores: the softmax of them is the model's per-pixel class distribution, its
  argmax the model's semantic prediction, and cross-entropy on them the negative log of the
  true class's share of the pixel's score. Raw log s_c would make the loss go up by shrinking
  every mask at once (lower s everywhere) without changing any decision.
* ``segment`` reads the same dense scores: for a panoptic Mask2Former a ground-truth segment
  whose pixels lose their class in the semantic scores is one whose pixels the panoptic merge
  no longer gives to a query of that class (the merge and the semantic scores both weigh each
  query by class probability x mask probability).
* ``panoptic`` (UPSNet's panoptic-head logits) is not offered: the mask-classification merge has
  no per-segment logits of that layout; the set-up check rejects it with this adapter's name.
"""
from typing import Dict, FrozenSet, List, Optional

import torch

from ..modeling.transformers_segmentor import (
    TransformersSegmentor,
    check_class_names,
    dataset_class_names,
)
from .base import DENSE_LOGITS, LOSSES, ModelAdapter, eval_mode, register_adapter

__all__ = ["TransformersAdapter"]

# MODEL.TRANSFORMERS.TASK -> the adapter's task (detectron2's output key) and ground truth
_TASK_KEYS = {"panoptic": "panoptic_seg", "semantic": "sem_seg", "instance": "instances"}
_GROUND_TRUTH = {
    "panoptic": ("sem_seg", "instances"),
    "semantic": ("sem_seg",),
    "instance": ("instances",),
}


@register_adapter("TransformersSegmentor")
class TransformersAdapter(ModelAdapter):
    """Losses and dense logits of a :class:`TransformersSegmentor`; task from the model.

    Raises:
        ValueError: (at construction, with data set metadata) the model's classes are not the
            data set's, in number or order.
    """

    capabilities = frozenset({LOSSES, DENSE_LOGITS})

    def __init__(self, model, metadata=None):
        super().__init__(model, metadata)
        net: TransformersSegmentor = self.model
        self.task = _TASK_KEYS[net.task]
        self.loss_ground_truth = _GROUND_TRUTH[net.task]
        if net.task == "instance":  # no semantic map to score dense objectives against
            self.capabilities = frozenset({LOSSES})
        names = dataset_class_names(metadata, net.task)
        if names:
            source = f"{type(net.network).__name__} (MODEL.TRANSFORMERS)"
            check_class_names(net.network.config, names, getattr(metadata, "name", "?"), source)

    @classmethod
    def task_for(cls, cfg) -> str:
        return _TASK_KEYS[cfg.MODEL.TRANSFORMERS.TASK]

    @property
    def meta_architecture(self) -> str:
        return f"TransformersSegmentor/{type(self.model.network).__name__}"

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        self.require(DENSE_LOGITS, "A dense objective")
        with eval_mode(self.model):
            return self.model.dense_logits(images)

    def dense_targets(self, x: Dict) -> torch.Tensor:
        # the model's classes are the data set's contiguous ids; only the ignore label moves
        target = x["sem_seg"]
        ignore = self.model.ignore_label
        if ignore != self.ignore_value:
            target = target.masked_fill(target == ignore, self.ignore_value)
        return target

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        with eval_mode(self.model):
            return self.model.inference(inputs, keys)

    @classmethod
    def _mapper(cls, cfg, is_train: bool):
        from detectron2.data import DatasetMapper, MetadataCatalog
        from detectron2.data import detection_utils as utils

        from ..data import build_panoptic_mapper

        task = cfg.MODEL.TRANSFORMERS.TASK
        names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
        panoptic_data = bool(
            names and MetadataCatalog.get(names[0]).get("thing_dataset_id_to_contiguous_id", None)
            and MetadataCatalog.get(names[0]).get("panoptic_root", None)
        )
        if task == "panoptic" or (task == "semantic" and panoptic_data):
            return build_panoptic_mapper(cfg, is_train=is_train)
        if task == "instance":  # masks as bitmasks (the targets), annotations kept at test time
            return DatasetMapper(
                cfg,
                True,
                augmentations=utils.build_augmentation(cfg, is_train),
                use_instance_mask=True,
                instance_mask_format="bitmask",
                recompute_boxes=False,
            )
        return None  # detectron2's DatasetMapper: it reads sem_seg_file_name

    @classmethod
    def test_mapper(cls, cfg):
        return cls._mapper(cfg, is_train=False)

    @classmethod
    def train_mapper(cls, cfg):
        return cls._mapper(cfg, is_train=True)
