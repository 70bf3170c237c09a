# Copyright (c) UPSNetRobust authors.
"""Dataset mapper that turns panoptic annotations into UPSNet's training targets.

detectron2's panoptic loaders (e.g. ``load_cityscapes_panoptic``) give ``pan_seg_file_name`` and
``segments_info`` but no per-instance ``annotations``, so detectron2's default ``DatasetMapper``
produces no ``instances`` for them. :class:`UPSNetPanopticDatasetMapper` derives the thing
instances (boxes, masks, classes) from the panoptic PNG and reads the semantic map, applying the
same geometric augmentation to the image, the semantic map and the panoptic map.
"""

import copy
import logging
import numpy as np
from typing import Callable, Dict, List, Optional, Sequence

import torch
from panopticapi.utils import rgb2id

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = ["UPSNetPanopticDatasetMapper", "PANOPTIC_MAPPERS", "build_panoptic_mapper"]

logger = logging.getLogger(__name__)


def _mask_extents(masks: np.ndarray) -> torch.Tensor:
    """XYXY boxes of non-empty (N, H, W) bool masks, as :meth:`BitMasks.get_bounding_boxes`
    computes them (right and bottom edges exclusive), but several times faster on the CPU."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        xs = np.flatnonzero(mask.any(axis=0))
        ys = np.flatnonzero(mask.any(axis=1))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return torch.from_numpy(boxes)


class UPSNetPanopticDatasetMapper:
    """Map a panoptic dataset dict to the inputs of a panoptic model.

    Input: a dict with ``file_name`` and ``image_id`` and, where ground truth exists,
    ``sem_seg_file_name`` (semantic labels, ``ignore_label`` for void) and ``pan_seg_file_name``
    + ``segments_info`` (COCO panoptic format, contiguous ``category_id``), as produced by
    detectron2's ``load_cityscapes_panoptic``.

    Output: a dict with

    * "image": uint8 (C, H, W) tensor in ``image_format``, after augmentation;
    * "height", "width": the original image size (predictions are resized back to it);
    * "file_name", "image_id" and the other keys of the input (``segments_info`` keeps
      describing the original, un-augmented panoptic PNG);
    * "sem_seg": int64 (H, W) tensor of semantic labels, if ``sem_seg_file_name`` is given;
    * "instances": :class:`Instances` of the non-crowd thing segments that are not empty after
      augmentation, if ``pan_seg_file_name`` is given: ``gt_boxes`` (XYXY :class:`Boxes` of the
      mask extent), ``gt_classes`` (int64 detector class in ``[0, len(thing_ids))``) and
      ``gt_masks`` (:class:`BitMasks`).

    Unlike detectron2's ``DatasetMapper``, ground truth is kept in test mode too: adversarial
    attacks on the test set need it.

    From a config: test mode resizes with ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``;
    training adds ``MIN_SIZE_TRAIN`` sampling and ``RandomFlip`` (detectron2's
    ``build_augmentation``), preceded by ``RandomCrop`` if ``INPUT.CROP.ENABLED`` (off in UPSNet).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        thing_ids: Sequence[int],
    ):
        """
        Args:
            is_train (bool): whether the mapper is used for training (only logged: the
                behaviour is set by ``augmentations``).
            augmentations (list[Augmentation or Transform]): geometric augmentations, applied to
                the image, the semantic map and the panoptic map alike.
            image_format (str): an image format supported by
                :func:`detection_utils.read_image`, e.g. "BGR".
            thing_ids (Sequence[int]): contiguous category ids of the thing classes; the
                detector class of a segment is the index of its ``category_id`` in
                ``sorted(thing_ids)`` (trainId - 11 for Cityscapes).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.thing_ids = sorted(int(i) for i in thing_ids)
        self._thing_id_to_class = {cid: i for i, cid in enumerate(self.thing_ids)}
        mode = "training" if is_train else "inference"
        logger.info(f"[UPSNetPanopticDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        # Detector classes are a property of the training set: test sets use the same mapping.
        names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
        if not names:
            raise ValueError("UPSNetPanopticDatasetMapper needs a data set in cfg.DATASETS.TRAIN")
        meta = MetadataCatalog.get(names[0])
        thing_map = meta.get("thing_dataset_id_to_contiguous_id", None)
        if thing_map is None:
            raise ValueError(
                f"Metadata of data set {names[0]} has no thing_dataset_id_to_contiguous_id; "
                "is it a registered panoptic data set?"
            )
        augmentations = utils.build_augmentation(cfg, is_train)
        if is_train and cfg.INPUT.CROP.ENABLED:
            augmentations.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "thing_ids": list(thing_map.values()),
        }

    def _is_thing(self, segment: Dict) -> bool:
        if "isthing" in segment:
            return bool(segment["isthing"])
        return segment["category_id"] in self._thing_id_to_class

    def _instances(self, pan_ids: np.ndarray, segments_info: List[Dict]) -> Instances:
        height, width = pan_ids.shape
        masks, classes = [], []
        for segment in segments_info:
            if segment.get("iscrowd", 0) or not self._is_thing(segment):
                continue
            category_id = segment["category_id"]
            if category_id not in self._thing_id_to_class:
                raise ValueError(
                    f"Thing segment {segment['id']} has category_id {category_id}, which is not "
                    f"among the thing ids {self.thing_ids}"
                )
            mask = pan_ids == segment["id"]
            if not mask.any():  # e.g. cropped away
                continue
            masks.append(mask)
            classes.append(self._thing_id_to_class[category_id])
        masks = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(_mask_extents(masks))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = BitMasks(torch.from_numpy(masks))
        return instances

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict (dict): one image's metadata, in detectron2 dataset format.

        Returns:
            dict: the model input described in the class docstring.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)  # sets "height"/"width" if absent

        sem_seg = None
        if dataset_dict.get("sem_seg_file_name"):
            sem_seg = utils.read_image(dataset_dict["sem_seg_file_name"]).astype(np.uint8)
            if sem_seg.ndim == 3:
                sem_seg = sem_seg[:, :, 0]
            if sem_seg.shape != image.shape[:2]:
                raise ValueError(
                    f"Semantic map {dataset_dict['sem_seg_file_name']} has shape "
                    f"{sem_seg.shape}, image {dataset_dict['file_name']} {image.shape[:2]}"
                )
        pan_rgb = None
        if dataset_dict.get("pan_seg_file_name") and "segments_info" in dataset_dict:
            pan_rgb = utils.read_image(dataset_dict["pan_seg_file_name"], format="RGB")
            if pan_rgb.shape[:2] != image.shape[:2]:
                raise ValueError(
                    f"Panoptic map {dataset_dict['pan_seg_file_name']} has shape "
                    f"{pan_rgb.shape[:2]}, image {dataset_dict['file_name']} {image.shape[:2]}"
                )

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        if pan_rgb is not None:
            # Transform the uint8 RGB encoding of the ids: nearest-neighbour resizing keeps the
            # three channels of a pixel together, and PIL resizes uint8 (not int32) maps.
            pan_ids = rgb2id(transforms.apply_segmentation(pan_rgb))
            dataset_dict["instances"] = self._instances(pan_ids, dataset_dict["segments_info"])
        return dataset_dict


# INPUT.DATASET_MAPPER_NAME -> mapper class (constructed with ``cls(cfg, is_train)``).
PANOPTIC_MAPPERS: Dict[str, Callable] = {"upsnet_panoptic": UPSNetPanopticDatasetMapper}


def build_panoptic_mapper(cfg, is_train: bool = True) -> Callable[[Dict], Dict]:
    """Build the dataset mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``.

    Args:
        cfg (CfgNode): a config with ``INPUT.DATASET_MAPPER_NAME`` (see ``add_upsnet_config``).
        is_train (bool): training or test mapper.

    Returns:
        callable: the mapper, dataset dict -> model input dict.
    """
    name: Optional[str] = cfg.INPUT.get("DATASET_MAPPER_NAME", None)
    if name not in PANOPTIC_MAPPERS:
        raise ValueError(
            f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; known mappers: "
            f"{', '.join(sorted(PANOPTIC_MAPPERS))} (add_upsnet_config sets the key)"
        )
    return PANOPTIC_MAPPERS[name](cfg, is_train)
