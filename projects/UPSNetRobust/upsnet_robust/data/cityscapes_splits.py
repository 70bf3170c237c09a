# Copyright (c) UPSNetRobust authors.
"""Semantic and instance splits of Cityscapes-format data sets, for models scored with
detectron2's :class:`SemSegEvaluator` (mIoU) and :class:`COCOEvaluator` (box and mask AP).

* ``<prefix>_fine_sem_seg_{train,val}``: detectron2's :func:`load_cityscapes_semantic` (the
  loader of the builtin ``cityscapes_fine_sem_seg_*``; it reads the labelTrainIds PNGs and the
  image size from each ``*_gtFine_polygons.json``), 19 trainId classes, ignore label 255.
* ``<prefix>_fine_instance_seg_{train,val}``: one annotation per thing segment of the panoptic
  ground truth (its PNG and ``segments_info``), with an exact COCO RLE mask, the mask's box and
  the 8 Cityscapes thing classes as contiguous ids 0..7 (the order of detectron2's Cityscapes
  instance metadata). Use ``INPUT.MASK_FORMAT bitmask`` with detectron2's ``DatasetMapper``.
  :class:`COCOEvaluator` converts these dicts to a COCO json itself (it needs an ``output_dir``
  for that; it then stores the json's path in the metadata as ``json_file``).
"""

import functools
import numpy as np
import os
from typing import Dict, List, Optional

import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes import load_cityscapes_semantic
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .datasets import (
    _CITYSCAPES_PANOPTIC_SPLITS,
    _IMAGE_SUFFIX,
    _missing,
    cityscapes_gt_split_dir,
    get_cityscapes_panoptic_metadata,
    load_cityscapes_panoptic_checked,
    register_or_replace,
    synthetic_cityscapes_prepare_command,
)

__all__ = [
    "get_cityscapes_semantic_metadata",
    "get_cityscapes_instance_metadata",
    "load_cityscapes_semantic_checked",
    "load_cityscapes_instances_from_panoptic",
    "register_synthetic_cityscapes_semantic",
    "register_synthetic_cityscapes_instance",
]

_THINGS = [k for k in CITYSCAPES_CATEGORIES if k["isthing"] == 1]


def get_cityscapes_semantic_metadata() -> Dict:
    """Class metadata of the semantic splits: ``stuff_classes``/``stuff_colors`` of the 19
    trainId classes (contiguous id = trainId) and the 8 ``thing_classes``, as detectron2's
    builtin ``cityscapes_fine_sem_seg_*`` (plus the colours). A copy."""
    return {
        "stuff_classes": [k["name"] for k in CITYSCAPES_CATEGORIES],
        "stuff_colors": [list(k["color"]) for k in CITYSCAPES_CATEGORIES],
        "thing_classes": [k["name"] for k in _THINGS],
    }


def get_cityscapes_instance_metadata() -> Dict:
    """Class metadata of the instance splits: the 8 Cityscapes thing classes in detectron2's
    Cityscapes instance order, with ``thing_dataset_id_to_contiguous_id`` mapping Cityscapes
    label ids (24, 25, 26, 27, 28, 31, 32, 33) to 0..7. A copy."""
    return {
        "thing_classes": [k["name"] for k in _THINGS],
        "thing_colors": [list(k["color"]) for k in _THINGS],
        "thing_dataset_id_to_contiguous_id": {k["id"]: i for i, k in enumerate(_THINGS)},
    }


def load_cityscapes_semantic_checked(
    image_dir: str, gt_dir: str, fix_command: Optional[str] = None
) -> List[Dict]:
    """detectron2's :func:`load_cityscapes_semantic`, after checking the files it reads, sorted by
    file name, with ``image_id`` added (``<city>_<seq>_<frame>``, as in the panoptic splits).

    Args:
        image_dir (str): e.g. ``<root>/leftImg8bit/val``.
        gt_dir (str): e.g. ``<root>/gtFine/val``.
        fix_command (str or None): the command that creates missing files, quoted in errors.

    Returns:
        list[dict]: ``file_name``, ``image_id``, ``sem_seg_file_name`` (labelTrainIds PNG),
        ``height``, ``width``.

    Raises:
        FileNotFoundError: naming the first missing directory or file (e.g. the polygons json of
            a data set generated before they were written) and ``fix_command``.
    """
    fix_command = fix_command or (
        "download gtFine from cityscapes-dataset.com and run "
        "`python -m cityscapesscripts.preparation.createTrainIdLabelImgs`"
    )
    for what, path in (("image directory", image_dir), ("gtFine directory", gt_dir)):
        if not PathManager.isdir(path):
            raise _missing(f"Cityscapes {what}", path, fix_command)
    for city in sorted(PathManager.ls(image_dir)):
        city_dir = os.path.join(image_dir, city)
        images = sorted(f for f in PathManager.ls(city_dir) if f.endswith(_IMAGE_SUFFIX))
        if images:
            # The files detectron2's loader opens for every image.
            gt = os.path.join(gt_dir, city, images[0][: -len(_IMAGE_SUFFIX)] + "_gtFine_")
            for suffix in ("labelIds.png", "instanceIds.png", "labelTrainIds.png", "polygons.json"):
                if not PathManager.isfile(gt + suffix):
                    raise _missing(f"Cityscapes {suffix}", gt + suffix, fix_command)
            break
    else:
        raise _missing("Cityscapes *_leftImg8bit.png images", image_dir, fix_command)
    # detectron2 lists the files in the file system's order; sorted, the split's order (and so
    # ROBUSTNESS.MAX_IMAGES's subset) is the same on every machine and matches the panoptic
    # split's, whose json lists the images by name
    dicts = sorted(load_cityscapes_semantic(image_dir, gt_dir), key=lambda d: d["file_name"])
    for d in dicts:
        name = os.path.basename(d["file_name"])[: -len(_IMAGE_SUFFIX)]
        d["image_id"] = "_".join(name.split("_")[:3])
    return dicts


def _instance_annotations(panoptic: np.ndarray, segments_info: List[Dict], to_contiguous: Dict):
    annotations = []
    for segment in segments_info:
        category_id = to_contiguous.get(segment["category_id"])
        if category_id is None:  # stuff
            continue
        mask = panoptic == segment["id"]
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")  # json-serialisable, as COCO files hold it
        annotations.append(
            {
                # Tight box of the mask, right/bottom edges exclusive (as BitMasks and COCO's
                # mask-to-box conversion give it).
                "bbox": [
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() + 1),
                    float(ys.max() + 1),
                ],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category_id,
                "segmentation": rle,
                "iscrowd": int(segment.get("iscrowd", 0)),
            }
        )
    return annotations


def load_cityscapes_instances_from_panoptic(
    image_dir: str, gt_dir: str, gt_json: str, fix_command: Optional[str] = None
) -> List[Dict]:
    """Instance-segmentation dicts of a Cityscapes-format split, from its panoptic ground truth.

    Args:
        image_dir, gt_dir, gt_json, fix_command: the panoptic split, as for
            :func:`load_cityscapes_panoptic_checked`.

    Returns:
        list[dict]: ``file_name``, ``image_id`` (as in the panoptic split), ``height``,
        ``width`` and ``annotations``: per thing segment with pixels, ``bbox`` (XYXY_ABS),
        ``bbox_mode``, ``category_id`` (0..7, see :func:`get_cityscapes_instance_metadata`),
        ``segmentation`` (COCO RLE dict) and ``iscrowd`` (that of the segment; crowd regions are
        ignored by COCO evaluation and dropped by detectron2's mapper in training).
    """
    panoptic_dicts = load_cityscapes_panoptic_checked(
        image_dir, gt_dir, gt_json, get_cityscapes_panoptic_metadata(), fix_command
    )
    # The panoptic dicts carry trainIds (things 11..18); the instance splits count things 0..7.
    to_contiguous = {k["trainId"]: i for i, k in enumerate(_THINGS)}
    dicts = []
    for d in panoptic_dicts:
        with PathManager.open(d["pan_seg_file_name"], "rb") as f:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.int64)
        panoptic = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # panopticapi rgb2id
        dicts.append(
            {
                "file_name": d["file_name"],
                "image_id": d["image_id"],
                "height": panoptic.shape[0],
                "width": panoptic.shape[1],
                "annotations": _instance_annotations(panoptic, d["segments_info"], to_contiguous),
            }
        )
    return dicts


def _split_dirs(root: str, split: str):
    return tuple(os.path.join(root, p) for p in _CITYSCAPES_PANOPTIC_SPLITS[split])


def register_synthetic_cityscapes_semantic(
    root: str, name_prefix: str = "synthetic_cityscapes"
) -> List[str]:
    """Register ``<name_prefix>_fine_sem_seg_{train,val}`` for the data set at ``root``.

    Registering a name again replaces the earlier registration.

    Args:
        root (str): data set root (with ``leftImg8bit/`` and ``gtFine/``).
        name_prefix (str): prefix of the data set names.

    Returns:
        list[str]: the registered names (train, val).
    """
    root = os.path.normpath(root)
    fix_command = synthetic_cityscapes_prepare_command(root)
    names = []
    for split in _CITYSCAPES_PANOPTIC_SPLITS:
        name = f"{name_prefix}_fine_sem_seg_{split}"
        image_dir = _split_dirs(root, split)[0]
        gt_dir = cityscapes_gt_split_dir(image_dir)
        register_or_replace(
            name,
            functools.partial(load_cityscapes_semantic_checked, image_dir, gt_dir, fix_command),
            image_dir=image_dir,
            gt_dir=gt_dir,
            # detectron2's builtin cityscapes_fine_sem_seg_* say "cityscapes_sem_seg", whose
            # CityscapesSemSegEvaluator imports a module missing from public detectron2 builds;
            # "sem_seg" selects SemSegEvaluator, which computes the same mIoU from these dicts.
            evaluator_type="sem_seg",
            ignore_label=255,
            **get_cityscapes_semantic_metadata(),
        )
        names.append(name)
    return names


def register_synthetic_cityscapes_instance(
    root: str, name_prefix: str = "synthetic_cityscapes"
) -> List[str]:
    """Register ``<name_prefix>_fine_instance_seg_{train,val}`` for the data set at ``root``
    (dicts of :func:`load_cityscapes_instances_from_panoptic`, ``evaluator_type`` "coco").

    Registering a name again replaces the earlier registration (and drops a ``json_file`` that
    :class:`COCOEvaluator` cached in the old metadata).

    Args:
        root (str): data set root (with ``leftImg8bit/`` and ``gtFine/``).
        name_prefix (str): prefix of the data set names.

    Returns:
        list[str]: the registered names (train, val).
    """
    root = os.path.normpath(root)
    fix_command = synthetic_cityscapes_prepare_command(root)
    names = []
    for split in _CITYSCAPES_PANOPTIC_SPLITS:
        name = f"{name_prefix}_fine_instance_seg_{split}"
        image_dir, gt_dir, gt_json = _split_dirs(root, split)
        register_or_replace(
            name,
            functools.partial(
                load_cityscapes_instances_from_panoptic, image_dir, gt_dir, gt_json, fix_command
            ),
            image_root=image_dir,
            image_dir=image_dir,
            gt_dir=cityscapes_gt_split_dir(image_dir),
            evaluator_type="coco",
            **get_cityscapes_instance_metadata(),
        )
        names.append(name)
    return names
