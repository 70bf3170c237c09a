# Copyright (c) UPSNetRobust authors.
"""Panoptic-DeepLab's model adapter (``detectron2.projects.panoptic_deeplab``).

Panoptic-DeepLab predicts the data set's contiguous ids directly: its semantic head has one
channel per class (Cityscapes trainIds on Cityscapes-format data), instances come from the
class-agnostic centre / offset head, and its panoptic output is ``(ids, None)`` with
``ids = category * label_divisor + instance`` (-1 void), which detectron2's
``COCOPanopticEvaluator`` decodes with the data set's ``label_divisor`` and
``thing_dataset_id_to_contiguous_id``. So no label mapping is needed; the adapter adds the
training targets (semantic map, centre heatmap, offsets and their weights) at test time, so
that the training losses can be attacked, and the semantic head's dense logits.
"""
import logging
from typing import Dict, FrozenSet, List, Optional

import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.panoptic_deeplab import PanopticDeeplabDatasetMapper  # registers the model
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config
from detectron2.structures import ImageList

from ..config import register_config
from .base import (
    DENSE_LOGITS,
    LOSSES,
    ModelAdapter,
    eval_mode,
    register_adapter,
    strided_head_logits,
)

__all__ = ["PanopticDeepLabAdapter", "panoptic_deeplab_mapper"]

# Panoptic-DeepLab's (and DeepLab's) keys, so its YAML files load like any other model's.
register_config(add_panoptic_deeplab_config)

logger = logging.getLogger(__name__)

# What PanopticDeeplabDatasetMapper adds and the training forward reads.
_TARGET_KEYS = (
    "sem_seg", "sem_seg_weights", "center", "center_weights", "offset", "offset_weights"
)


def _check_panoptic_metadata(dataset_name: str) -> None:
    meta = MetadataCatalog.get(dataset_name)
    keys = ("thing_dataset_id_to_contiguous_id", "label_divisor", "ignore_label")
    missing = [k for k in keys if meta.get(k, None) is None]
    if missing:
        raise ValueError(
            f"PanopticDeepLab needs a panoptic data set whose metadata has "
            f"thing_dataset_id_to_contiguous_id, label_divisor and ignore_label; "
            f"{dataset_name!r} (DATASETS.TRAIN[0]) lacks {', '.join(missing)}"
        )


class _PanopticDeeplabMapper(PanopticDeeplabDatasetMapper):
    """detectron2's mapper, with a clear error for dicts without panoptic annotations."""

    def __call__(self, dataset_dict):
        missing = [k for k in ("pan_seg_file_name", "segments_info") if k not in dataset_dict]
        if missing:
            raise KeyError(
                f"PanopticDeepLab's targets come from panoptic annotations, but the data set dict "
                f"of {dataset_dict.get('file_name', '<unknown image>')} has no "
                f"{' / '.join(missing)}; use a panoptic data set (e.g. *_fine_panoptic_*)"
            )
        return super().__call__(dataset_dict)


def panoptic_deeplab_mapper(cfg, is_train: bool):
    """detectron2's ``PanopticDeeplabDatasetMapper`` built from ``cfg``: with its training
    augmentations (resize, crop, flip), or, for testing, with the test-time resize only, so
    that the targets it generates from the panoptic PNG align with the test image.

    The target generator reads the thing ids and ignore label of ``DATASETS.TRAIN[0]`` (as the
    model's post-processing does). The test mapper keeps ``file_name`` and ``image_id`` and
    sets ``height`` / ``width`` to the original image size (output resolution).
    """
    _check_panoptic_metadata(cfg.DATASETS.TRAIN[0])
    kwargs = PanopticDeeplabDatasetMapper.from_config(cfg)
    if not is_train:
        kwargs["augmentations"] = [
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        ]
    return _PanopticDeeplabMapper(**kwargs)


@register_adapter("PanopticDeepLab")
class PanopticDeepLabAdapter(ModelAdapter):
    """Training losses (semantic hard-pixel CE, centre MSE, offset L1) against the targets of
    :func:`panoptic_deeplab_mapper`, and the semantic head's logits (19 trainIds on Cityscapes)
    as dense logits. There are no panoptic logits: instances come from a non-differentiable
    centre grouping, so the ``panoptic`` objective is rejected at set-up."""

    task = "panoptic_seg"
    capabilities = frozenset({LOSSES, DENSE_LOGITS})
    loss_ground_truth = _TARGET_KEYS

    @property
    def ignore_value(self) -> int:
        return self.model.sem_seg_head.ignore_value

    def _size_divisibility(self) -> int:
        # as in PanopticDeepLab.forward
        model = self.model
        if model.size_divisibility > 0:
            return model.size_divisibility
        return model.backbone.size_divisibility

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        model = self.model
        head = model.sem_seg_head
        with eval_mode(model):
            normalized = [(x.to(model.device) - model.pixel_mean) / model.pixel_std for x in images]
            batch = ImageList.from_tensors(normalized, self._size_divisibility())
            features = model.backbone(batch.tensor)
            # PanopticDeepLabSemSegHead.forward in eval mode
            return strided_head_logits(head, features, batch.image_sizes)

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        model = self.model
        # instances are a by-product the panoptic and semantic evaluators never read
        predict_instances = model.predict_instances and (keys is None or "instances" in keys)
        # the model resizes its outputs to height x width; default: the input's own size
        inputs = [
            x if "height" in x and "width" in x
            else dict(x, height=x["image"].shape[-2], width=x["image"].shape[-1])
            for x in inputs
        ]
        previous = model.predict_instances
        model.predict_instances = predict_instances
        try:
            with eval_mode(model):
                return model(inputs)
        finally:
            model.predict_instances = previous

    @classmethod
    def test_mapper(cls, cfg):
        return panoptic_deeplab_mapper(cfg, is_train=False)

    @classmethod
    def train_mapper(cls, cfg):
        return panoptic_deeplab_mapper(cfg, is_train=True)
