# Copyright (c) UPSNetRobust authors.
"""A dataset-mapper wrapper that turns an unreadable image into a recorded failure, so a long
sweep goes on and its report counts the image instead of dying in a loader worker. It also adds,
on request, the panoptic ground-truth segments that segment-level objectives read."""
import copy
import logging
from typing import Callable, Dict

import numpy as np
import torch
from PIL import Image

__all__ = ["RobustMapper", "objective_needs_segments", "panoptic_segments"]

logger = logging.getLogger(__name__)


def objective_needs_segments(objective: str) -> bool:
    """Whether the registered objective reads ``pan_seg`` (e.g. ``segment``)."""
    from ..attacks.objectives import objective_class

    return "pan_seg" in tuple(getattr(objective_class(objective), "ground_truth", ()))


def panoptic_segments(dataset_dict: Dict, size) -> torch.Tensor:
    """The (h, w) int64 segment-id map of ``dataset_dict``'s panoptic PNG at the mapped image's
    ``size`` (h, w). Test mappers only resize, and detectron2 resizes segmentation maps with
    nearest-neighbour sampling, so the map is resized the same way (on the RGB encoding of the
    ids, as the panoptic mapper does)."""
    from detectron2.data import detection_utils as utils
    from detectron2.data.transforms import ResizeTransform
    from panopticapi.utils import rgb2id

    rgb = utils.read_image(dataset_dict["pan_seg_file_name"], format="RGB")
    h, w = int(size[0]), int(size[1])
    if rgb.shape[:2] != (h, w):
        resize = ResizeTransform(rgb.shape[0], rgb.shape[1], h, w, Image.NEAREST)
        rgb = resize.apply_segmentation(rgb)
    return torch.as_tensor(rgb2id(np.ascontiguousarray(rgb)).astype(np.int64))


class RobustMapper:
    """Calls ``mapper(dataset_dict)``; on an error reading or decoding the files returns
    ``{"file_name", "image_id", "error"}`` naming the file and the cause.

    With ``panoptic_segments``, a mapped dict whose data set dict has ``pan_seg_file_name`` and
    ``segments_info`` also gets ``pan_seg`` (:func:`panoptic_segments`, at the mapped image's
    size) and ``segments_info`` (the data set dict's); the ``segment`` objective reads them.
    """

    def __init__(self, mapper: Callable[[Dict], Dict], panoptic_segments: bool = False):
        self.mapper = mapper
        self.panoptic_segments = bool(panoptic_segments)

    def __call__(self, dataset_dict: Dict) -> Dict:
        try:
            x = self.mapper(dataset_dict)
            if self.panoptic_segments and "image" in x and "error" not in x:
                if dataset_dict.get("pan_seg_file_name") and "segments_info" in dataset_dict:
                    x["pan_seg"] = panoptic_segments(dataset_dict, x["image"].shape[-2:])
                    x["segments_info"] = copy.deepcopy(dataset_dict["segments_info"])
            return x
        except (OSError, ValueError, SyntaxError) as e:  # PIL / decoding errors of corrupt files
            file_name = dataset_dict.get("file_name", "<unknown>")
            message = f"cannot read {file_name}: {type(e).__name__}: {e}"
            logger.warning("Skipping image: %s", message)
            return {
                "file_name": file_name,
                "image_id": dataset_dict.get("image_id", file_name),
                "error": message,
            }
