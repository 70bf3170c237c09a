# Copyright (c) UPSNetRobust authors.
"""Data: the synthetic Cityscapes-format data set (generator and registration) and the panoptic
dataset mapper.

Importing this package registers ``synthetic_cityscapes_fine_panoptic_{train,val}`` in
detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.
"""

from .datasets import (
    REAL_CITYSCAPES_PREPARE_COMMAND,
    SYNTHETIC_CITYSCAPES_DIRNAME,
    check_cityscapes_panoptic_files,
    get_cityscapes_panoptic_metadata,
    load_cityscapes_panoptic_checked,
    register_synthetic_cityscapes_panoptic,
    synthetic_cityscapes_prepare_command,
)
from .panoptic_mapper import PANOPTIC_MAPPERS, UPSNetPanopticDatasetMapper, build_panoptic_mapper
from .synthetic_cityscapes import (
    SYNTHETIC_CITIES,
    SYNTHETIC_STUFF_CLASSES,
    SYNTHETIC_THING_CLASSES,
    generate_synthetic_cityscapes,
    label_ids_to_train_ids,
    render_synthetic_scene,
)

__all__ = [
    "REAL_CITYSCAPES_PREPARE_COMMAND",
    "SYNTHETIC_CITYSCAPES_DIRNAME",
    "check_cityscapes_panoptic_files",
    "get_cityscapes_panoptic_metadata",
    "load_cityscapes_panoptic_checked",
    "register_synthetic_cityscapes_panoptic",
    "synthetic_cityscapes_prepare_command",
    "PANOPTIC_MAPPERS",
    "UPSNetPanopticDatasetMapper",
    "build_panoptic_mapper",
    "SYNTHETIC_CITIES",
    "SYNTHETIC_STUFF_CLASSES",
    "SYNTHETIC_THING_CLASSES",
    "generate_synthetic_cityscapes",
    "label_ids_to_train_ids",
    "render_synthetic_scene",
]
