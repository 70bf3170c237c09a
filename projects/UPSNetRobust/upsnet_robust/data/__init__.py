# Copyright (c) UPSNetRobust authors.
"""Data: the synthetic Cityscapes-format data set (generator and registration), set-up checks of
data set names, and the panoptic dataset mapper.

Importing this package registers ``synthetic_cityscapes_fine_{panoptic,sem_seg,instance_seg}_
{train,val}`` in detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` (see :mod:`.builtin`).
"""

from .builtin import default_synthetic_cityscapes_root, register_all_synthetic_cityscapes
from .catalog import DatasetNotRegisteredError, check_dataset_registered
from .cityscapes_polygons import trace_cityscapes_polygons, write_cityscapes_polygons_json
from .cityscapes_splits import (
    get_cityscapes_instance_metadata,
    get_cityscapes_semantic_metadata,
    load_cityscapes_instances_from_panoptic,
    load_cityscapes_semantic_checked,
    register_synthetic_cityscapes_instance,
    register_synthetic_cityscapes_semantic,
)
from .datasets import (
    REAL_CITYSCAPES_PREPARE_COMMAND,
    SYNTHETIC_CITYSCAPES_DIRNAME,
    check_cityscapes_panoptic_files,
    cityscapes_gt_split_dir,
    get_cityscapes_panoptic_metadata,
    load_cityscapes_panoptic_checked,
    register_or_replace,
    register_synthetic_cityscapes_panoptic,
    synthetic_cityscapes_prepare_command,
    use_checked_builtin_cityscapes_panoptic,
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
    "default_synthetic_cityscapes_root",
    "register_all_synthetic_cityscapes",
    "DatasetNotRegisteredError",
    "check_dataset_registered",
    "trace_cityscapes_polygons",
    "write_cityscapes_polygons_json",
    "get_cityscapes_instance_metadata",
    "get_cityscapes_semantic_metadata",
    "load_cityscapes_instances_from_panoptic",
    "load_cityscapes_semantic_checked",
    "register_synthetic_cityscapes_instance",
    "register_synthetic_cityscapes_semantic",
    "REAL_CITYSCAPES_PREPARE_COMMAND",
    "SYNTHETIC_CITYSCAPES_DIRNAME",
    "check_cityscapes_panoptic_files",
    "cityscapes_gt_split_dir",
    "get_cityscapes_panoptic_metadata",
    "load_cityscapes_panoptic_checked",
    "register_or_replace",
    "register_synthetic_cityscapes_panoptic",
    "synthetic_cityscapes_prepare_command",
    "use_checked_builtin_cityscapes_panoptic",
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
