# Copyright (c) UPSNetRobust authors.
"""A data root with a "." in its path (``DETECTRON2_DATASETS=/data/city.scapes``): detectron2's
builtin ``cityscapes_fine_panoptic_*`` loader cuts the labelTrainIds path at the first "." and
fails although the files exist; with upsnet_robust.data imported, the builtin names load the
same dicts as detectron2's loader gives on an undotted copy of the data."""
import os
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.cityscapes_panoptic import (
    load_cityscapes_panoptic,
    register_all_cityscapes_panoptic,
)

from upsnet_robust.data import use_checked_builtin_cityscapes_panoptic

NAMES = ("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val")
PATH_KEYS = ("file_name", "sem_seg_file_name", "pan_seg_file_name")


@pytest.fixture
def builtin_names_restored():
    """Put detectron2's builtin registrations (loaders and metadata) back afterwards."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n)) for n in NAMES}
    yield
    for name, (loader, meta) in saved.items():
        for catalog in (DatasetCatalog, MetadataCatalog):
            if name in catalog.list():
                catalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.data[name] = meta


def test_builtin_cityscapes_panoptic_under_a_dotted_root(
    synthetic_cityscapes_root, tmp_path, builtin_names_restored
):
    datasets = tmp_path / "city.scapes"  # what DETECTRON2_DATASETS would be
    shutil.copytree(synthetic_cityscapes_root, datasets / "cityscapes")
    for name in NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_all_cityscapes_panoptic(str(datasets))  # as detectron2 does at import
    with pytest.raises(AssertionError, match="labelTrainIds"):
        DatasetCatalog.get("cityscapes_fine_panoptic_val")  # detectron2's loader: the cause

    assert use_checked_builtin_cityscapes_panoptic() == list(NAMES)
    for name in NAMES:
        meta = MetadataCatalog.get(name)
        assert meta.image_root.startswith(str(datasets))  # detectron2's paths, kept
        dicts = DatasetCatalog.get(name)
        # reference: detectron2's own loader on the undotted original
        undotted = [meta.image_root, meta.panoptic_root, meta.panoptic_json]
        copy = str(datasets / "cityscapes")
        undotted = [p.replace(copy, synthetic_cityscapes_root) for p in undotted]
        reference = load_cityscapes_panoptic(*undotted, meta.as_dict())
        assert len(dicts) == len(reference) > 0
        for d, ref in zip(dicts, reference):
            for key in PATH_KEYS:
                assert os.path.isfile(d[key]) and str(datasets) in d[key]
                ref[key] = ref[key].replace(synthetic_cityscapes_root, str(datasets / "cityscapes"))
            assert d == ref


def test_importing_the_package_replaces_the_builtin_loaders():
    import upsnet_robust.data  # noqa: F401  (registers at import)

    for name in NAMES:
        assert DatasetCatalog[name].__module__ == "upsnet_robust.data.datasets", name
