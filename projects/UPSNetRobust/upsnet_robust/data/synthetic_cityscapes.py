# Copyright (c) UPSNetRobust authors.
"""A small synthetic data set in the exact Cityscapes file format, for CPU-sized experiments.

The images are street-like scenes with Cityscapes classes (:mod:`.synthetic_scene` describes
them). The tree written by :func:`generate_synthetic_cityscapes` is what detectron2's Cityscapes
loaders (``cityscapes_fine_panoptic_*``, ``cityscapes_fine_sem_seg_*``) expect::

    <root>/leftImg8bit/{train,val}/<city>/<prefix>_leftImg8bit.png   prefix: <city>_<seq>_<frame>
    <root>/gtFine/{train,val}/<city>/<prefix>_gtFine_{labelIds,instanceIds,labelTrainIds}.png
    <root>/gtFine/{train,val}/<city>/<prefix>_gtFine_polygons.json
    <root>/gtFine/cityscapes_panoptic_{train,val}.json      (cityscapesscripts createPanopticImgs)
    <root>/gtFine/cityscapes_panoptic_{train,val}/*.png

The polygons json (read by detectron2's ``load_cityscapes_semantic`` and by cityscapesscripts)
holds polygons traced from the label maps that reproduce them exactly when filled in file order,
as cityscapesscripts' json2labelImg does (see :mod:`.cityscapes_polygons`). The same instance
maps also give the instance splits (``<prefix>_fine_instance_seg_*``), through the panoptic PNGs.

NOTE: city names contain no underscore: detectron2 builds ``image_id`` from the first three
``_``-separated fields of the file name, which must equal the panoptic json's image id.
"""

import contextlib
import io
import logging
import numpy as np
import os
import shutil
import tempfile
import time
from typing import Dict, List, Tuple

import cv2
from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic
from tqdm import tqdm

from .cityscapes_polygons import write_cityscapes_polygons_json
from .synthetic_scene import (
    _REF_HEIGHT,
    _REF_WIDTH,
    SYNTHETIC_STUFF_CLASSES,
    SYNTHETIC_THING_CLASSES,
    label_ids_to_train_ids,
    render_synthetic_scene,
)

__all__ = [
    "generate_synthetic_cityscapes",
    "render_synthetic_scene",
    "label_ids_to_train_ids",
    "SYNTHETIC_STUFF_CLASSES",
    "SYNTHETIC_THING_CLASSES",
    "SYNTHETIC_CITIES",
]

logger = logging.getLogger(__name__)

# Cities per split (disjoint, as in Cityscapes). No "_" in the names: see the module docstring.
SYNTHETIC_CITIES = {
    "train": ("synthalpha", "synthbravo", "synthcharlie"),
    "val": ("synthdelta",),
}
_SPLIT_SEED_CODES = {"train": 0, "val": 1}
_FRAME_ID = 19  # Cityscapes' annotated frame of every sequence is _000019


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array):
        raise OSError(f"Could not write {path}")


def _write_sample(root: str, split: str, city: str, prefix: str, scene: Dict[str, np.ndarray]):
    img_dir = os.path.join(root, "leftImg8bit", split, city)
    gt_dir = os.path.join(root, "gtFine", split, city)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    _write_png(os.path.join(img_dir, f"{prefix}_leftImg8bit.png"), scene["image"][:, :, ::-1])
    gt = os.path.join(gt_dir, f"{prefix}_gtFine_")
    _write_png(gt + "labelIds.png", scene["label_ids"])
    # 16-bit PNG, like Cityscapes' instanceIds (ids stay below 34000).
    _write_png(gt + "instanceIds.png", scene["instance_ids"].astype(np.uint16))
    _write_png(gt + "labelTrainIds.png", label_ids_to_train_ids(scene["label_ids"]))
    write_cityscapes_polygons_json(gt + "polygons.json", scene["instance_ids"])


def _sample_prefix(split: str, index: int) -> Tuple[str, str]:
    cities = SYNTHETIC_CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{_FRAME_ID:06d}"


def _write_tree(
    root: str, splits: List[Tuple[str, int]], seed: int, height: int, width: int, progress: bool
):
    """Images, label PNGs and polygons of every split, then cityscapesscripts' panoptic
    conversion (label ids as category ids, like real Cityscapes), into ``root``."""
    total = sum(n for _, n in splits)
    with tqdm(total=total, desc="Synthetic Cityscapes", unit="img", disable=not progress) as bar:
        for split, num in splits:
            for index in range(num):
                rng = np.random.default_rng([seed, _SPLIT_SEED_CODES[split], index])
                scene = render_synthetic_scene(rng, height, width)
                city, prefix = _sample_prefix(split, index)
                _write_sample(root, split, city, prefix, scene)
                bar.update(1)
    gt_fine = os.path.join(root, "gtFine")
    with contextlib.redirect_stdout(io.StringIO()):  # its console chatter: progress, tmp paths
        convert2panoptic(
            cityscapesPath=gt_fine,
            outputFolder=gt_fine,
            useTrainId=False,
            setNames=[split for split, _ in splits],
        )


def _replace_tree(tmp_root: str, output_dir: str) -> None:
    """Move the finished tree ``tmp_root`` to ``output_dir``, replacing what is there."""
    parent = os.path.dirname(output_dir)
    old = None
    if os.path.lexists(output_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
        os.rename(output_dir, os.path.join(old, "tree"))
    os.rename(tmp_root, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate_synthetic_cityscapes(
    output_dir: str,
    num_train: int = 400,
    num_val: int = 50,
    seed: int = 0,
    height: int = _REF_HEIGHT,
    width: int = _REF_WIDTH,
    show_progress: bool = True,
) -> str:
    """Write a synthetic Cityscapes-format data set (images, label PNGs, polygons json, panoptic
    json and PNGs) to ``output_dir``.

    The tree is built in a temporary sibling directory and moved into place at the end, so an
    interrupted run never leaves a partial tree; an existing ``output_dir`` is replaced. Every
    image is drawn from its own generator seeded by ``(seed, split, index)``: the same arguments
    give byte-identical files.

    Args:
        output_dir (str): root of the data set (``.../synthetic_cityscapes``).
        num_train, num_val (int): number of images of each split (a split with 0 is not written).
        seed (int): non-negative base seed.
        height, width (int): image size.
        show_progress (bool): show a tqdm progress bar.

    Returns:
        str: the absolute path of the data set.
    """
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(
            f"Need num_train, num_val >= 0 and at least one image, got "
            f"num_train={num_train}, num_val={num_val}"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        # mkdtemp creates the directory with mode 0700; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_root, 0o777 & ~umask)
        splits = [(s, n) for s, n in (("train", num_train), ("val", num_val)) if n > 0]
        _write_tree(tmp_root, splits, seed, height, width, show_progress)
        _replace_tree(tmp_root, output_dir)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    logger.info(
        f"Wrote synthetic Cityscapes ({num_train} train, {num_val} val, {height}x{width}, "
        f"seed {seed}) to {output_dir} in {elapsed:.1f}s "
        f"({1000 * elapsed / (num_train + num_val):.0f} ms/img)."
    )
    return output_dir
