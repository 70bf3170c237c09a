# Copyright (c) UPSNetRobust authors.
"""Registration of all splits of a synthetic Cityscapes-format data set, and of the default one.

Importing this module registers, for the root ``$DETECTRON2_DATASETS/synthetic_cityscapes``
(``DETECTRON2_DATASETS`` defaults to ``datasets``; the files are read when a split is loaded):

* ``synthetic_cityscapes_fine_panoptic_{train,val}`` (evaluator_type "cityscapes_panoptic_seg"),
* ``synthetic_cityscapes_fine_sem_seg_{train,val}`` (evaluator_type "sem_seg"),
* ``synthetic_cityscapes_fine_instance_seg_{train,val}`` (evaluator_type "coco"),

named like detectron2's builtin ``cityscapes_fine_{panoptic,sem_seg,instance_seg}_*``. Those
builtin panoptic splits get the checked loader (:func:`.use_checked_builtin_cityscapes_panoptic`).
"""

import os
from typing import Dict, List

from .cityscapes_splits import (
    register_synthetic_cityscapes_instance,
    register_synthetic_cityscapes_semantic,
)
from .datasets import (
    SYNTHETIC_CITYSCAPES_DIRNAME,
    register_synthetic_cityscapes_panoptic,
    use_checked_builtin_cityscapes_panoptic,
)

__all__ = ["register_all_synthetic_cityscapes", "default_synthetic_cityscapes_root"]


def default_synthetic_cityscapes_root() -> str:
    """``$DETECTRON2_DATASETS/synthetic_cityscapes`` (``DETECTRON2_DATASETS`` defaults to
    ``datasets``, relative to the working directory)."""
    datasets_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(datasets_root, SYNTHETIC_CITYSCAPES_DIRNAME)


def register_all_synthetic_cityscapes(
    root: str, name_prefix: str = "synthetic_cityscapes"
) -> Dict[str, List[str]]:
    """Register the panoptic, semantic and instance splits of the data set at ``root``.

    Args:
        root (str): data set root, as written by :func:`generate_synthetic_cityscapes`.
        name_prefix (str): prefix of the names, ``<name_prefix>_fine_<task>_{train,val}``.

    Returns:
        dict: task ("panoptic", "sem_seg", "instance_seg") -> registered names (train, val).
    """
    return {
        "panoptic": register_synthetic_cityscapes_panoptic(root, name_prefix),
        "sem_seg": register_synthetic_cityscapes_semantic(root, name_prefix),
        "instance_seg": register_synthetic_cityscapes_instance(root, name_prefix),
    }


register_all_synthetic_cityscapes(default_synthetic_cityscapes_root())
use_checked_builtin_cityscapes_panoptic()
