# Copyright (c) UPSNetRobust authors.
"""The adapter of detectron2's ``SemanticSegmentor``: Semantic FPN (``SemSegFPNHead``) and
DeepLab v3 / v3+ (``DeepLabV3Head`` / ``DeepLabV3PlusHead`` of ``detectron2.projects.deeplab``,
same meta-architecture), scored with mIoU (detectron2's ``SemSegEvaluator``).

Its dense logits are the head's own eval-mode output (upsampled to the padded input by the
head, then cropped per image), so the dense objectives attack exactly the logits the model
predicts from; its training losses are the head's (cross-entropy or DeepLab's hard-pixel-mining
loss) against the ground-truth ``sem_seg``.
"""

import logging
from collections import OrderedDict
from typing import Dict, FrozenSet, List, Optional

import torch

import detectron2.projects.deeplab  # noqa: F401  registers DeepLab's heads and backbone
from detectron2.structures import ImageList

from .base import DENSE_LOGITS, LOSSES, ModelAdapter, eval_mode, register_adapter

__all__ = ["SemanticSegmentorAdapter", "semantic_num_classes"]

logger = logging.getLogger(__name__)


def semantic_num_classes(model) -> Optional[int]:
    """The number of classes the model's semantic head predicts (its predictor's output
    channels), or None for a head without a ``predictor`` conv."""
    predictor = getattr(model.sem_seg_head, "predictor", None)
    return getattr(predictor, "out_channels", None)


@register_adapter("SemanticSegmentor")
class SemanticSegmentorAdapter(ModelAdapter):
    """detectron2's semantic models predict the data set's contiguous ids (``stuff_classes``)
    directly, so no label mapping is needed; the head's class count is checked against the data
    set's at set-up.

    Raises:
        ValueError: (at construction, with data set metadata) the head predicts another number
            of classes than the data set has.
    """

    task = "sem_seg"
    capabilities = frozenset({LOSSES, DENSE_LOGITS})
    loss_ground_truth = ("sem_seg",)

    def __init__(self, model, metadata=None):
        super().__init__(model, metadata)
        classes = getattr(metadata, "stuff_classes", None) if metadata is not None else None
        num_classes = semantic_num_classes(self.model)
        if classes and num_classes is not None and num_classes != len(classes):
            raise ValueError(
                f"{self.meta_architecture} ({type(self.model.sem_seg_head).__name__}) predicts "
                f"{num_classes} classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES) but data set "
                f"{getattr(metadata, 'name', '?')!r} has {len(classes)} (stuff_classes); set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)} or use a data set with "
                f"{num_classes} classes (DATASETS.TEST)"
            )

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        # As SemanticSegmentor.forward: normalise, pad (size divisibility, padding constraints),
        # backbone, head. Images of one size run together, so each image's logits are those of
        # the model on that image alone (padding never depends on the other images of a batch).
        model = self.model
        out: List[Optional[torch.Tensor]] = [None] * len(images)
        groups: Dict[tuple, List[int]] = OrderedDict()
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        with eval_mode(model):
            for indices in groups.values():
                batch = self._preprocess([images[i] for i in indices])
                logits, _ = model.sem_seg_head(model.backbone(batch.tensor))
                for k, i in enumerate(indices):
                    h, w = batch.image_sizes[k]
                    out[i] = logits[k, :, :h, :w]
        return out

    def _preprocess(self, images: List[torch.Tensor]) -> ImageList:
        model = self.model
        device = model.device
        images = [(x.to(device) - model.pixel_mean) / model.pixel_std for x in images]
        return ImageList.from_tensors(
            images,
            model.backbone.size_divisibility,
            padding_constraints=getattr(model.backbone, "padding_constraints", None),
        )

    def dense_targets(self, x: Dict) -> torch.Tensor:
        target = x["sem_seg"]
        ignore = getattr(self.metadata, "ignore_label", self.ignore_value)
        if ignore != self.ignore_value:  # the data set's ignore label -> the objectives' one
            target = target.masked_fill(target == ignore, self.ignore_value)
        return target

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        # the model's own output: (C, H, W) logits resized to each input's height x width
        with eval_mode(self.model):
            return self.model(inputs)
