# Copyright (c) UPSNetRobust authors.
"""Panoptic splits of Cityscapes-format data sets (the synthetic one in particular).

``<prefix>_fine_panoptic_{train,val}`` give the dicts of detectron2's
:func:`load_cityscapes_panoptic` (with the labelTrainIds path derived correctly for roots whose
path contains a ".") and the metadata of detectron2's ``cityscapes_fine_panoptic_*`` splits, so
everything written for real Cityscapes (evaluators, visualizer, mappers) works on them unchanged.
Missing files are reported, when the data set is first loaded, by a :class:`FileNotFoundError`
that names the path and the command creating it. The semantic and instance splits are in
:mod:`.cityscapes_splits`, the default registration in :mod:`.builtin`.

detectron2's builtin ``cityscapes_fine_panoptic_{train,val}`` keep detectron2's paths and
metadata; only their loader is replaced by the same checked one
(:func:`use_checked_builtin_cityscapes_panoptic`), so a ``DETECTRON2_DATASETS`` with a "." in its
path (``/data/city.scapes``) loads too.
"""

import copy
import functools
import json
import logging
import os
from typing import Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes_panoptic import get_cityscapes_panoptic_files
from detectron2.utils.file_io import PathManager

__all__ = [
    "SYNTHETIC_CITYSCAPES_DIRNAME",
    "REAL_CITYSCAPES_PREPARE_COMMAND",
    "get_cityscapes_panoptic_metadata",
    "check_cityscapes_panoptic_files",
    "cityscapes_gt_split_dir",
    "load_cityscapes_panoptic_checked",
    "register_or_replace",
    "register_synthetic_cityscapes_panoptic",
    "synthetic_cityscapes_prepare_command",
    "use_checked_builtin_cityscapes_panoptic",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CITYSCAPES_DIRNAME = "synthetic_cityscapes"
_IMAGE_SUFFIX = "_leftImg8bit.png"

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
    # The labelTrainIds PNGs lie in the gtFine twin of the image directory.
    sem_dir = cityscapes_gt_split_dir(image_dir)
    if not PathManager.isdir(sem_dir):
        raise _missing("Cityscapes gtFine directory", sem_dir, fix_command)
    for city in sorted(PathManager.ls(image_dir)):
        city_dir = os.path.join(image_dir, city)
        images = sorted(f for f in PathManager.ls(city_dir) if f.endswith(_IMAGE_SUFFIX))
        if images:
            sem_file = _sem_seg_file_name(image_dir, os.path.join(city_dir, images[0]))
            if not PathManager.isfile(sem_file):
                raise _missing("Cityscapes labelTrainIds image", sem_file, fix_command)
            return
    raise _missing("Cityscapes *_leftImg8bit.png images", image_dir, fix_command)


def cityscapes_gt_split_dir(image_dir: str) -> str:
    """The ``gtFine`` directory of a Cityscapes image directory (``.../leftImg8bit/train`` ->
    ``.../gtFine/train``): its last ``leftImg8bit`` component is replaced, nothing else."""
    parts = os.path.normpath(image_dir).split(os.sep)
    if "leftImg8bit" not in parts:
        raise ValueError(f"Not a Cityscapes image directory (no 'leftImg8bit' in it): {image_dir}")
    index = len(parts) - 1 - parts[::-1].index("leftImg8bit")
    parts[index] = "gtFine"
    return os.sep.join(parts)


def _sem_seg_file_name(image_dir: str, image_file: str) -> str:
    relative = os.path.relpath(image_file, image_dir)  # <city>/<prefix>_leftImg8bit.png
    return os.path.join(
        cityscapes_gt_split_dir(image_dir),
        relative[: -len(_IMAGE_SUFFIX)] + "_gtFine_labelTrainIds.png",
    )


def load_cityscapes_panoptic_checked(
    image_dir: str, gt_dir: str, gt_json: str, meta: Dict, fix_command: Optional[str] = None
) -> List[Dict]:
    """detectron2's :func:`load_cityscapes_panoptic`, after :func:`check_cityscapes_panoptic_files`,
    with the labelTrainIds path of every image derived correctly.

    detectron2 derives ``sem_seg_file_name`` as ``file_name.replace("leftImg8bit", "gtFine")
    .split(".")[0] + "_labelTrainIds.png"``, which cuts any path with a "." in a directory
    name (``../data``, ``~/.cache``, ``cityscapes.v1``) short. This function builds the same
    dicts (detectron2's own file discovery, the same fields and id mapping) with the path taken
    from :func:`cityscapes_gt_split_dir` instead.

    Args:
        image_dir, gt_dir, gt_json, fix_command: see :func:`check_cityscapes_panoptic_files`.
        meta (dict): with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``.

    Returns:
        list[dict]: detectron2 dataset dicts (``file_name``, ``image_id``, ``sem_seg_file_name``,
        ``pan_seg_file_name``, ``segments_info`` with contiguous ``category_id``).
    """
    check_cityscapes_panoptic_files(image_dir, gt_dir, gt_json, fix_command)
    with PathManager.open(gt_json) as f:
        json_info = json.load(f)
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    dicts = []
    for image_file, label_file, segments_info in get_cityscapes_panoptic_files(
        image_dir, gt_dir, json_info
    ):
        for segment in segments_info:
            category_id = segment["category_id"]
            segment["category_id"] = thing_map.get(category_id, stuff_map.get(category_id))
            if segment["category_id"] is None:
                raise ValueError(
                    f"{gt_json}: segment {segment.get('id')} of {label_file} has category_id "
                    f"{category_id}, which the metadata maps neither as thing nor as stuff"
                )
        image_name = os.path.splitext(os.path.basename(image_file))[0]
        dicts.append(
            {
                "file_name": image_file,
                "image_id": "_".join(image_name.split("_")[:3]),
                "sem_seg_file_name": _sem_seg_file_name(image_dir, image_file),
                "pan_seg_file_name": label_file,
                "segments_info": segments_info,
            }
        )
    return dicts


def register_or_replace(name: str, loader: Callable[[], List[Dict]], **metadata) -> None:
    """Register ``loader`` and ``metadata`` under ``name`` in detectron2's catalogs, replacing an
    earlier registration of that name (detectron2 refuses to register a name twice)."""
    if name in DatasetCatalog.list():
        logger.info(f"Re-registering data set {name}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


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
    root = os.path.normpath(root)
    meta = get_cityscapes_panoptic_metadata()
    fix_command = synthetic_cityscapes_prepare_command(root)
    names = []
    for split, (image_dir, gt_dir, gt_json) in _CITYSCAPES_PANOPTIC_SPLITS.items():
        name = f"{name_prefix}_fine_panoptic_{split}"
        image_dir = os.path.join(root, image_dir)
        gt_dir = os.path.join(root, gt_dir)
        gt_json = os.path.join(root, gt_json)
        loader = functools.partial(
            load_cityscapes_panoptic_checked, image_dir, gt_dir, gt_json, meta, fix_command
        )
        register_or_replace(
            name,
            loader,
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


BUILTIN_CITYSCAPES_PANOPTIC = ("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val")


def use_checked_builtin_cityscapes_panoptic(names=BUILTIN_CITYSCAPES_PANOPTIC) -> List[str]:
    """Load detectron2's builtin Cityscapes panoptic splits with
    :func:`load_cityscapes_panoptic_checked`, on the paths detectron2 registered in their metadata
    (``image_root``, ``panoptic_root``, ``panoptic_json`` under ``$DETECTRON2_DATASETS``): the
    same dicts, but a root with a "." in its path loads, and a missing file is named. Names not
    registered, or without those paths, are left alone.

    Returns:
        list[str]: the names whose loader was replaced.
    """
    replaced = []
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        paths = [meta.get(k, None) for k in ("image_root", "panoptic_root", "panoptic_json")]
        if None in paths:
            continue

        def load(name=name, paths=paths):
            return load_cityscapes_panoptic_checked(*paths, MetadataCatalog.get(name).as_dict())

        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
        replaced.append(name)
    return replaced
