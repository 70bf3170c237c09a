# Copyright (c) UPSNetRobust authors.
"""detectron2's PanopticFPN: training losses and dense semantic logits, and the mapping between
its label convention and the data set's.

PanopticFPN uses detectron2's "separated" convention: its semantic head predicts the stuff
classes as 1..S plus ONE class 0 for all things, and its detector the thing classes 0..T-1; its
panoptic output gives stuff segments the semantic label and thing segments the detector class.
Data sets in the unified convention (Cityscapes-format data: stuff trainIds 0..10, things
11..18) hand out other ids, so ground truth is mapped to the model's labels (losses, dense
targets, the training mapper) and predictions back to the data set's contiguous ids (what
detectron2's evaluators read). Both maps derive from the data set's metadata
(``stuff_dataset_id_to_contiguous_id``, ``thing_dataset_id_to_contiguous_id``).
"""
import logging
from typing import Dict, FrozenSet, List, Optional

import torch

from .base import (
    DENSE_LOGITS,
    LOSSES,
    ModelAdapter,
    eval_mode,
    register_adapter,
    strided_head_logits,
)

__all__ = ["PanopticFPNAdapter", "SeparatedLabels", "SeparatedSemSegMapper"]

logger = logging.getLogger(__name__)

THINGS_LABEL = 0  # PanopticFPN's semantic label of every thing pixel


class SeparatedLabels:
    """A data set's contiguous ids <-> PanopticFPN's separated labels.

    Stuff contiguous id ``s`` is semantic label ``1 + rank of s`` among the stuff ids; every
    thing id is semantic label 0; thing contiguous id ``t`` is detector class ``rank of t``
    among the thing ids (as the project's panoptic mapper numbers ``gt_classes``).

    Args:
        stuff_ids, thing_ids: the data set's contiguous ids of stuff and thing classes
            (disjoint: the unified convention).
        ignore_label: the data set's ignore label in semantic maps.
        ignore_value: the model's (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``).
        name: the data set's name, for error messages.
    """

    def __init__(self, stuff_ids, thing_ids, ignore_label=255, ignore_value=255, name="data set"):
        self.stuff_ids = sorted(int(i) for i in stuff_ids)
        self.thing_ids = sorted(int(i) for i in thing_ids)
        self.name = name
        self.ignore_value = int(ignore_value)
        overlap = set(self.stuff_ids) & set(self.thing_ids)
        if overlap or int(ignore_label) in set(self.stuff_ids) | set(self.thing_ids):
            raise ValueError(
                f"PanopticFPN adapter: metadata of {name} must give stuff and thing classes "
                f"distinct contiguous ids and an ignore_label outside them (the unified "
                f"convention, e.g. Cityscapes trainIds); got stuff {self.stuff_ids}, things "
                f"{self.thing_ids}, ignore_label {ignore_label}"
            )
        size = max(self.stuff_ids + self.thing_ids + [int(ignore_label)]) + 1
        lut = torch.full((size,), THINGS_LABEL, dtype=torch.int64)  # stuff, ignore: below
        lut[self.stuff_ids] = torch.arange(1, len(self.stuff_ids) + 1)
        lut[int(ignore_label)] = self.ignore_value
        known = torch.zeros(size, dtype=torch.bool)
        known[self.stuff_ids + self.thing_ids + [int(ignore_label)]] = True
        self._semantic_lut, self._known = lut, known
        self._thing_lut = torch.tensor(self.thing_ids, dtype=torch.int64)

    @classmethod
    def from_metadata(cls, metadata, ignore_value: int = 255) -> "SeparatedLabels":
        """From a detectron2 ``Metadata`` of a panoptic data set."""
        name = getattr(metadata, "name", "the data set")
        maps = {}
        for key in ("stuff_dataset_id_to_contiguous_id", "thing_dataset_id_to_contiguous_id"):
            maps[key] = metadata.get(key, None)
            if not maps[key]:
                raise ValueError(
                    f"PanopticFPN adapter: metadata of {name} has no {key}; a panoptic data set "
                    "(e.g. synthetic_cityscapes_fine_panoptic_val) is needed to map the model's "
                    "separated labels to the data set's ids"
                )
        return cls(
            maps["stuff_dataset_id_to_contiguous_id"].values(),
            maps["thing_dataset_id_to_contiguous_id"].values(),
            ignore_label=metadata.get("ignore_label", 255),
            ignore_value=ignore_value,
            name=name,
        )

    @property
    def num_semantic_classes(self) -> int:
        return len(self.stuff_ids) + 1

    def check_sizes(self, num_semantic: int, num_things: int, where: str = "the model") -> None:
        """ValueError unless the model's heads have the classes this data set needs."""
        if (num_semantic, num_things) != (self.num_semantic_classes, len(self.thing_ids)):
            raise ValueError(
                f"PanopticFPN on {self.name} needs MODEL.SEM_SEG_HEAD.NUM_CLASSES = "
                f"{self.num_semantic_classes} ({len(self.stuff_ids)} stuff + 1 for all things) "
                f"and MODEL.ROI_HEADS.NUM_CLASSES = {len(self.thing_ids)}; {where} has "
                f"{num_semantic} and {num_things}"
            )

    def semantic_to_model(self, sem_seg: torch.Tensor) -> torch.Tensor:
        """(h, w) contiguous ids (ignore_label for void) -> separated labels (ignore_value)."""
        lut, known = self._semantic_lut.to(sem_seg.device), self._known.to(sem_seg.device)
        index = sem_seg.long().clamp(0, len(lut) - 1)
        bad = (sem_seg < 0) | (sem_seg >= len(lut)) | ~known[index]
        if bool(bad.any()):
            raise ValueError(
                f"PanopticFPN adapter: semantic labels {sorted(set(sem_seg[bad].tolist()))} are "
                f"neither stuff ({self.stuff_ids}) nor thing ({self.thing_ids}) ids of {self.name} "
                "nor its ignore_label"
            )
        return lut[index]

    def stuff_label_to_id(self, label: int) -> int:
        """A semantic label 1..S -> the stuff class's contiguous id."""
        if not 1 <= int(label) <= len(self.stuff_ids):
            raise ValueError(f"stuff label {label} outside 1..{len(self.stuff_ids)} ({self.name})")
        return self.stuff_ids[int(label) - 1]

    def thing_class_to_id(self, detector_class: int) -> int:
        """A detector class 0..T-1 -> the thing class's contiguous id."""
        if not 0 <= int(detector_class) < len(self.thing_ids):
            last = len(self.thing_ids) - 1
            raise ValueError(f"detector class {detector_class} outside 0..{last} ({self.name})")
        return self.thing_ids[int(detector_class)]

    def thing_classes_to_ids(self, classes: torch.Tensor) -> torch.Tensor:
        return self._thing_lut.to(classes.device)[classes]

    def segments_to_dataset(self, segments_info: List[Dict]) -> List[Dict]:
        """PanopticFPN's segments (category_id: semantic label or detector class) -> segments
        with the data set's contiguous category ids; ``isthing`` set."""
        out = []
        for segment in segments_info:
            segment = dict(segment)
            isthing = bool(segment["isthing"])
            convert = self.thing_class_to_id if isthing else self.stuff_label_to_id
            segment["category_id"] = convert(segment["category_id"])
            segment["isthing"] = isthing
            out.append(segment)
        return out


class SeparatedSemSegMapper:
    """A dataset mapper whose ``sem_seg`` is in PanopticFPN's separated labels (training)."""

    def __init__(self, mapper, labels: SeparatedLabels):
        self.mapper = mapper
        self.labels = labels

    def __call__(self, dataset_dict: Dict) -> Dict:
        x = self.mapper(dataset_dict)
        if "sem_seg" not in x:
            raise ValueError(
                f"PanopticFPN trains on semantic maps, but {dataset_dict.get('file_name')} of "
                f"{self.labels.name} has no sem_seg_file_name"
            )
        x["sem_seg"] = self.labels.semantic_to_model(x["sem_seg"])
        return x


@register_adapter("PanopticFPN")
class PanopticFPNAdapter(ModelAdapter):
    """PanopticFPN: training losses and the semantic head's dense logits (in its separated
    labels); no panoptic logits (its panoptic output is a non-differentiable merge)."""

    task = "panoptic_seg"
    capabilities = frozenset({LOSSES, DENSE_LOGITS})
    loss_ground_truth = ("instances", "sem_seg")
    sem_seg_in_dataset_classes = False

    def __init__(self, model, metadata=None):
        super().__init__(model, metadata)
        self._labels = None
        if metadata is not None:
            self._labels = SeparatedLabels.from_metadata(metadata, self.ignore_value)
            head = getattr(self.model.sem_seg_head, "predictor", None)
            num_things = getattr(self.model.roi_heads, "num_classes", None)
            if head is not None and num_things is not None:
                self._labels.check_sizes(head.out_channels, num_things)

    @property
    def ignore_value(self) -> int:
        return self.model.sem_seg_head.ignore_value

    @property
    def labels(self) -> SeparatedLabels:
        if self._labels is None:
            raise ValueError(
                "The PanopticFPN adapter needs the data set's metadata to map its separated "
                "labels to the data set's ids; build it with build_adapter(cfg, model) or "
                "PanopticFPNAdapter(model, MetadataCatalog.get(dataset_name))"
            )
        return self._labels

    def loss_input(self, x: Dict) -> Dict:
        return dict(x, sem_seg=self.labels.semantic_to_model(x["sem_seg"]))

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        model, head = self.model, self.model.sem_seg_head
        with eval_mode(model):
            batch = model.preprocess_image([{"image": image} for image in images])
            features = model.backbone(batch.tensor)
            return strided_head_logits(head, features, batch.image_sizes)

    def dense_targets(self, x: Dict) -> torch.Tensor:
        return self.labels.semantic_to_model(x["sem_seg"])

    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        labels = self.labels
        with eval_mode(self.model):
            outputs = self.model.inference(inputs)
        results = []
        for out in outputs:
            if keys is not None:
                out = {k: v for k, v in out.items() if k in keys}
            if "panoptic_seg" in out:
                ids, segments = out["panoptic_seg"]
                out["panoptic_seg"] = (ids, labels.segments_to_dataset(segments))
            if "instances" in out:
                out["instances"].pred_classes = labels.thing_classes_to_ids(
                    out["instances"].pred_classes
                )
            # "sem_seg" stays in the model's labels (sem_seg_in_dataset_classes = False)
            results.append(out)
        return results

    @classmethod
    def test_mapper(cls, cfg):
        from ..data import build_panoptic_mapper

        return build_panoptic_mapper(cfg, is_train=False)

    @classmethod
    def train_mapper(cls, cfg):
        from detectron2.data import MetadataCatalog

        from ..data import build_panoptic_mapper

        if not cfg.DATASETS.TRAIN:
            raise ValueError("PanopticFPN training needs a data set in cfg.DATASETS.TRAIN")
        labels = SeparatedLabels.from_metadata(
            MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        )
        labels.check_sizes(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "the config"
        )
        return SeparatedSemSegMapper(build_panoptic_mapper(cfg, is_train=True), labels)
