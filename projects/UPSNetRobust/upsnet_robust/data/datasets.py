# Copyright (c) UPSNetRobust authors.
"""Registration of the synthetic Cityscapes-format panoptic data set.

``synthetic_cityscapes_fine_panoptic_{train,val}`` are registered on import, rooted at
``$DETECTRON2_DATASETS/synthetic_cityscapes`` (``DETECTRON2_DATASETS`` defaults to ``datasets``).
They use detectron2's own :func:`load_cityscapes_panoptic` and the metadata of detectron2's
``cityscapes_fine_panoptic_*`` splits, so everything written for real Cityscapes (evaluators,
visualizer, mappers) works on them unchanged. Missing files are reported, when the data set is
first loaded, by a :class:`FileNotFoundError` that names the path and the command creating it.

detectron2's builtin ``cityscapes_fine_panoptic_{train,val}`` stay as detectron2 registers them.
"""

import copy
import functools
import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic
from detectron2.utils.file_io import PathManager

__all__ = [
    "SYNTHETIC_CITYSCAPES_DIRNAME",
    "REAL_CITYSCAPES_PREPARE_COMMAND",
    "get_cityscapes_panoptic_metadata",
    "check_cityscapes_panoptic_files",
    "load_cityscapes_panoptic_checked",
    "register_synthetic_cityscapes_panoptic",
    "synthetic_cityscapes_prepare_command",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CITYSCAPES_DIRNAME = "synthetic_cityscapes"

# split -> (image dir, panoptic PNG dir, panoptic json), relative to the data set root.
_CITYSCAPES_PANOPTIC_SPLITS = {
    "train": (
        "leftImg8bit/train",
        "gtFine/cityscapes_panoptic_train",
        "gtFine/cityscapes_panoptic_train.json",
    ),
    "val": (
        "leftImg8bit/val",
        "gtFine/cityscapes_panoptic_val",
        "gtFine/cityscapes_panoptic_val.json",
    ),
}

# How real Cityscapes gets the files detectron2's panoptic loader needs (cityscapesscripts).
REAL_CITYSCAPES_PREPARE_COMMAND = (
    "CITYSCAPES_DATASET=<root>/cityscapes python -m "
    "cityscapesscripts.preparation.createTrainIdLabelImgs && "
    "CITYSCAPES_DATASET=<root>/cityscapes python -m "
    "cityscapesscripts.preparation.createPanopticImgs"
)


def synthetic_cityscapes_prepare_command(root: str) -> str:
    """The command that (re)creates the synthetic data set at ``root``."""
    return f"python tools/prepare_synthetic_cityscapes.py --output {root}"


@functools.lru_cache(maxsize=1)
def _cityscapes_panoptic_metadata() -> Dict:
    # Same construction as detectron2's register_all_cityscapes_panoptic: all 19 classes appear
    # as both thing_* and stuff_* (for the Visualizer); ids map Cityscapes label ids to trainIds.
    meta = {
        "thing_classes": [k["name"] for k in CITYSCAPES_CATEGORIES],
        "thing_colors": [k["color"] for k in CITYSCAPES_CATEGORIES],
        "stuff_classes": [k["name"] for k in CITYSCAPES_CATEGORIES],
        "stuff_colors": [k["color"] for k in CITYSCAPES_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            k["id"]: k["trainId"] for k in CITYSCAPES_CATEGORIES if k["isthing"] == 1
        },
        "stuff_dataset_id_to_contiguous_id": {
            k["id"]: k["trainId"] for k in CITYSCAPES_CATEGORIES if k["isthing"] != 1
        },
    }
    return meta


def get_cityscapes_panoptic_metadata() -> Dict:
    """The class metadata of detectron2's ``cityscapes_fine_panoptic_*`` data sets.

    Returns:
        dict: ``thing_classes``/``thing_colors`` and ``stuff_classes``/``stuff_colors`` (all 19
        Cityscapes classes in both), ``thing_dataset_id_to_contiguous_id`` (label id -> trainId
        11..18) and ``stuff_dataset_id_to_contiguous_id`` (label id -> trainId 0..10). A copy.
    """
    return copy.deepcopy(_cityscapes_panoptic_metadata())


def _missing(what: str, path: str, fix_command: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: {path}\nCreate it with: {fix_command}")


def check_cityscapes_panoptic_files(
    image_dir: str, gt_dir: str, gt_json: str, fix_command: Optional[str] = None
) -> None:
    """Check that a Cityscapes-format panoptic split has the files detectron2's loader reads.

    Args:
        image_dir (str): e.g. ``<root>/leftImg8bit/train``.
        gt_dir (str): panoptic PNG directory, e.g. ``<root>/gtFine/cityscapes_panoptic_train``.
        gt_json (str): panoptic json, e.g. ``<root>/gtFine/cityscapes_panoptic_train.json``.
        fix_command (str or None): the command that creates the files, quoted in the error;
            defaults to cityscapesscripts' createTrainIdLabelImgs + createPanopticImgs.

    Raises:
        FileNotFoundError: naming the first missing directory or file and ``fix_command``.
    """
    fix_command = fix_command or REAL_CITYSCAPES_PREPARE_COMMAND
    if not PathManager.isdir(image_dir):
        raise _missing("Cityscapes image directory", image_dir, fix_command)
    if not PathManager.isfile(gt_json):
        raise _missing("Cityscapes panoptic json", gt_json, fix_command)
    if not PathManager.isdir(gt_dir):
        raise _missing("Cityscapes panoptic PNG directory", gt_dir, fix_command)
    # detectron2 reads <gtFine path of the image>_labelTrainIds.png beside each image's labels.
    sem_dir = image_dir.replace("leftImg8bit", "gtFine")
    if not PathManager.isdir(sem_dir):
        raise _missing("Cityscapes gtFine directory", sem_dir, fix_command)
    for city in sorted(PathManager.ls(image_dir)):
        city_dir = os.path.join(image_dir, city)
        images = sorted(f for f in PathManager.ls(city_dir) if f.endswith("_leftImg8bit.png"))
        if images:
            first = os.path.join(city_dir, images[0])
            if "." in os.path.dirname(first):
                raise ValueError(
                    "detectron2's load_cityscapes_panoptic finds the labelTrainIds PNG with "
                    "`path.split('.')[0]`, so no directory of the data set path may contain a "
                    f"'.': {first}. Move or link the data set to a path without dots."
                )
            sem_file = first.replace("leftImg8bit", "gtFine")[: -len(".png")] + "_labelTrainIds.png"
            if not PathManager.isfile(sem_file):
                raise _missing("Cityscapes labelTrainIds image", sem_file, fix_command)
            return
    raise _missing("Cityscapes *_leftImg8bit.png images", image_dir, fix_command)


def load_cityscapes_panoptic_checked(
    image_dir: str, gt_dir: str, gt_json: str, meta: Dict, fix_command: Optional[str] = None
) -> List[Dict]:
    """detectron2's :func:`load_cityscapes_panoptic`, after :func:`check_cityscapes_panoptic_files`.

    Args:
        image_dir, gt_dir, gt_json, fix_command: see :func:`check_cityscapes_panoptic_files`.
        meta (dict): with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``.

    Returns:
        list[dict]: detectron2 dataset dicts (``file_name``, ``image_id``, ``sem_seg_file_name``,
        ``pan_seg_file_name``, ``segments_info`` with contiguous ``category_id``).
    """
    check_cityscapes_panoptic_files(image_dir, gt_dir, gt_json, fix_command)
    return load_cityscapes_panoptic(image_dir, gt_dir, gt_json, meta)


def register_synthetic_cityscapes_panoptic(
    root: str, name_prefix: str = "synthetic_cityscapes"
) -> List[str]:
    """Register ``<name_prefix>_fine_panoptic_{train,val}`` for the data set at ``root``.

    Registering a name again replaces the earlier registration (e.g. to point at another root).

    Args:
        root (str): data set root (with ``leftImg8bit/`` and ``gtFine/``), as written by
            :func:`generate_synthetic_cityscapes`.
        name_prefix (str): prefix of the data set names.

    Returns:
        list[str]: the registered data set names.
    """
    root = os.path.normpath(root)  # "./datasets/x" -> "datasets/x" (see the check above)
    meta = get_cityscapes_panoptic_metadata()
    fix_command = synthetic_cityscapes_prepare_command(root)
    names = []
    for split, (image_dir, gt_dir, gt_json) in _CITYSCAPES_PANOPTIC_SPLITS.items():
        name = f"{name_prefix}_fine_panoptic_{split}"
        image_dir = os.path.join(root, image_dir)
        gt_dir = os.path.join(root, gt_dir)
        gt_json = os.path.join(root, gt_json)
        if name in DatasetCatalog.list():
            logger.info(f"Re-registering data set {name} at {root}")
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name,
            lambda x=image_dir, y=gt_dir, z=gt_json: load_cityscapes_panoptic_checked(
                x, y, z, meta, fix_command
            ),
        )
        MetadataCatalog.get(name).set(
            panoptic_root=gt_dir,
            image_root=image_dir,
            panoptic_json=gt_json,
            gt_dir=gt_dir.replace("cityscapes_panoptic_", ""),
            evaluator_type="cityscapes_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **meta,
        )
        names.append(name)
    return names


def _default_root() -> str:
    datasets_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(datasets_root, SYNTHETIC_CITYSCAPES_DIRNAME)


register_synthetic_cityscapes_panoptic(_default_root())
