# Copyright (c) UPSNetRobust authors.
"""Tests of the semantic and instance splits of the synthetic data set (upsnet_robust.data), with
detectron2's own DatasetMapper, SemSegEvaluator and COCOEvaluator, of the panoptic loader on
roots whose path contains a ".", and of check_dataset_registered. References: the generator's
labelTrainIds / instanceIds PNGs, cityscapesscripts' label table, detectron2's loaders and
float64 numpy recomputations."""

import json
import numpy as np
import os
import shutil

import cv2
import pycocotools.mask as mask_util
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic
from detectron2.structures import BoxMode, Boxes, Instances

from upsnet_robust.data import (
    DatasetNotRegisteredError,
    check_dataset_registered,
    cityscapes_gt_split_dir,
    get_cityscapes_panoptic_metadata,
    load_cityscapes_panoptic_checked,
    register_all_synthetic_cityscapes,
    register_synthetic_cityscapes_instance,
    register_synthetic_cityscapes_semantic,
)

H, W = 64, 128
TRAIN_ID_CLASSES = [
    l.name for l in sorted(CS_LABELS, key=lambda l: l.trainId) if 0 <= l.trainId < 255
]
# detectron2's Cityscapes instance classes: labels with instances that count in evaluation.
INSTANCE_LABELS = [l for l in CS_LABELS if l.hasInstances and not l.ignoreInEval]


@pytest.fixture(scope="module")
def names(synthetic_cityscapes_root):
    return register_all_synthetic_cityscapes(synthetic_cityscapes_root, "pytest_splits")


def _read(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def _gt_prefix(d):
    """``<root>/gtFine/<split>/<city>/<prefix>_gtFine_`` of a dataset dict's image."""
    image_file = d["file_name"]
    city_dir, base = os.path.split(image_file)
    gt_city = os.path.join(
        cityscapes_gt_split_dir(os.path.dirname(city_dir)), os.path.basename(city_dir)
    )
    return os.path.join(gt_city, base[: -len("leftImg8bit.png")] + "gtFine_")


def _mapper_cfg(*opts):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = W
    cfg.INPUT.MIN_SIZE_TEST = H
    cfg.INPUT.MAX_SIZE_TEST = W
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.merge_from_list(list(opts))
    return cfg


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_default_registration_has_all_tasks():
    root = os.path.normpath(
        os.path.join(
            os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "synthetic_cityscapes"
        )
    )
    for task, evaluator_type in (
        ("panoptic", "cityscapes_panoptic_seg"),
        ("sem_seg", "sem_seg"),
        ("instance_seg", "coco"),
    ):
        for split in ("train", "val"):
            name = f"synthetic_cityscapes_fine_{task}_{split}"
            assert name in DatasetCatalog.list(), name
            meta = MetadataCatalog.get(name)
            assert meta.evaluator_type == evaluator_type
            image_dir = meta.image_root if task == "panoptic" else meta.image_dir
            assert image_dir == os.path.join(root, "leftImg8bit", split)


def test_register_all_names(names, synthetic_cityscapes_root):
    assert names == {
        task: [f"pytest_splits_fine_{task}_{split}" for split in ("train", "val")]
        for task in ("panoptic", "sem_seg", "instance_seg")
    }
    # Registering again (another root) replaces the registration.
    other = register_synthetic_cityscapes_semantic("/nonexistent/root", "pytest_splits_again")
    assert MetadataCatalog.get(other[0]).image_dir == "/nonexistent/root/leftImg8bit/train"
    again = register_synthetic_cityscapes_semantic(synthetic_cityscapes_root, "pytest_splits_again")
    assert again == other and len(DatasetCatalog.get(again[0])) == 4


# ------------------------------------------------------------------------------------------------
# Semantic split
# ------------------------------------------------------------------------------------------------
def test_semantic_metadata(names):
    reference = MetadataCatalog.get("cityscapes_fine_sem_seg_val")  # detectron2's builtin
    for name in names["sem_seg"]:
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == TRAIN_ID_CLASSES == reference.stuff_classes
        assert meta.thing_classes == reference.thing_classes
        assert meta.stuff_colors == [
            list(l.color)
            for l in sorted(CS_LABELS, key=lambda l: l.trainId)
            if 0 <= l.trainId < 255
        ]
        assert (meta.ignore_label, meta.evaluator_type) == (255, "sem_seg")


def test_semantic_dicts(names, synthetic_cityscapes_root):
    for split, count, sem_name, pan_name in zip(
        ("train", "val"), (4, 2), names["sem_seg"], names["panoptic"]
    ):
        dicts = DatasetCatalog.get(sem_name)
        assert len(dicts) == count
        panoptic = {d["image_id"]: d for d in DatasetCatalog.get(pan_name)}
        assert {d["image_id"] for d in dicts} == set(panoptic)
        for d in dicts:
            assert (d["height"], d["width"]) == (H, W)
            assert d["file_name"] == panoptic[d["image_id"]]["file_name"]
            assert d["sem_seg_file_name"] == panoptic[d["image_id"]]["sem_seg_file_name"]
            assert d["sem_seg_file_name"] == _gt_prefix(d) + "labelTrainIds.png"


def test_semantic_split_lists_the_images_by_name_as_the_panoptic_split(names, monkeypatch):
    """detectron2's loader lists files in the file system's order; the split is sorted by file
    name whatever that order is, so its first MAX_IMAGES are the panoptic split's. The listing is
    reversed here to show it."""
    from detectron2.data.datasets import cityscapes

    listing = cityscapes.PathManager.ls
    monkeypatch.setattr(cityscapes.PathManager, "ls", lambda path: sorted(listing(path))[::-1])
    for sem_name, pan_name in zip(names["sem_seg"], names["panoptic"]):
        files = [d["file_name"] for d in DatasetCatalog.get(sem_name)]
        assert files == sorted(files)
        assert files == [d["file_name"] for d in DatasetCatalog.get(pan_name)]


def test_semantic_split_with_default_mapper(names):
    name = names["sem_seg"][1]
    for is_train in (True, False):  # the test-mode mapper keeps sem_seg too
        mapper = DatasetMapper(_mapper_cfg(), is_train=is_train)
        for d in DatasetCatalog.get(name):
            out = mapper(dict(d))
            expected = torch.from_numpy(_read(d["sem_seg_file_name"]).astype(np.int64))
            assert torch.equal(out["sem_seg"], expected)
            assert out["image"].shape == (3, H, W)


def _miou_float64(pairs, num_classes=19):
    """mIoU (%) as SemSegEvaluator defines it: mean over the classes in prediction or ground
    truth (ignore label 255 excluded)."""
    conf = np.zeros((num_classes, num_classes), np.float64)
    for pred, gt in pairs:
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1.0)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return 100.0 * np.mean(tp[union > 0] / union[union > 0])


def test_sem_seg_evaluator_perfect_and_shifted(names, tmp_path):
    from detectron2.evaluation import SemSegEvaluator

    name = names["sem_seg"][1]
    dicts = DatasetCatalog.get(name)
    results = {}
    for shift in (0, 6):
        evaluator = SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / str(shift)))
        evaluator.reset()
        pairs = []
        for d in dicts:
            gt = _read(d["sem_seg_file_name"]).astype(np.int64)
            pred = np.roll(gt, shift, axis=1)
            pred[pred == 255] = 0  # a model predicts some class on void pixels too
            logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 19).permute(2, 0, 1)
            evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": logits.float()}])
            pairs.append((pred, gt))
        results[shift] = evaluator.evaluate()["sem_seg"]
        assert results[shift]["mIoU"] == pytest.approx(_miou_float64(pairs), abs=1e-6)
    assert results[0]["mIoU"] == pytest.approx(100.0) and results[0]["pACC"] == pytest.approx(100.0)
    assert results[6]["mIoU"] < 90.0


def test_semantic_missing_polygons_error(tmp_path, synthetic_cityscapes_root):
    root = str(tmp_path / "no_polygons")
    shutil.copytree(synthetic_cityscapes_root, root)
    for dirpath, _, files in os.walk(os.path.join(root, "gtFine", "val")):
        for f in files:
            if f.endswith("_polygons.json"):
                os.remove(os.path.join(dirpath, f))
    _, val = register_synthetic_cityscapes_semantic(root, "pytest_no_polygons")
    with pytest.raises(FileNotFoundError) as excinfo:
        DatasetCatalog.get(val)
    message = str(excinfo.value)
    assert "_gtFine_polygons.json" in message and os.path.join(root, "gtFine", "val") in message
    assert f"python tools/prepare_synthetic_cityscapes.py --output {root}" in message
    _, val = register_synthetic_cityscapes_semantic(str(tmp_path / "nothing"), "pytest_no_root")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        DatasetCatalog.get(val)


# ------------------------------------------------------------------------------------------------
# Instance split
# ------------------------------------------------------------------------------------------------
def test_instance_metadata(names):
    for name in names["instance_seg"]:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == [l.name for l in INSTANCE_LABELS]
        assert (
            meta.thing_classes
            == MetadataCatalog.get("cityscapes_fine_instance_seg_val").thing_classes
        )
        assert meta.thing_dataset_id_to_contiguous_id == {
            l.id: i for i, l in enumerate(INSTANCE_LABELS)
        }
        assert meta.evaluator_type == "coco"


def test_instance_dicts_match_detectron2_png_loader(names, synthetic_cityscapes_root):
    """Same instances as detectron2's Cityscapes loader reading instanceIds PNGs."""
    for split, name in zip(("train", "val"), names["instance_seg"]):
        dicts = DatasetCatalog.get(name)
        reference = load_cityscapes_instances(
            os.path.join(synthetic_cityscapes_root, "leftImg8bit", split),
            os.path.join(synthetic_cityscapes_root, "gtFine", split),
            from_json=False,
            to_polygons=False,
        )
        reference = {r["file_name"]: r for r in reference}
        assert set(reference) == {d["file_name"] for d in dicts}
        for d in dicts:
            ref = reference[d["file_name"]]
            assert (d["height"], d["width"]) == (ref["height"], ref["width"]) == (H, W)
            assert d["image_id"] == os.path.basename(d["file_name"])[: -len("_leftImg8bit.png")]
            anns = d["annotations"]
            assert len(anns) == len(ref["annotations"]) > 0

            def key(mask, category):
                return (category, mask.tobytes())

            ours = sorted(key(mask_util.decode(a["segmentation"]), a["category_id"]) for a in anns)
            theirs = sorted(
                key(mask_util.decode(a["segmentation"]), a["category_id"])
                for a in ref["annotations"]
            )
            assert ours == theirs
            for a in anns:
                assert a["bbox_mode"] == BoxMode.XYXY_ABS and a["iscrowd"] == 0
                assert isinstance(a["segmentation"]["counts"], str)  # json-serialisable
                ys, xs = np.nonzero(mask_util.decode(a["segmentation"]))
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_instance_split_with_default_mapper(names):
    name = names["instance_seg"][0]
    mapper = DatasetMapper(
        _mapper_cfg("MODEL.MASK_ON", True, "INPUT.MASK_FORMAT", "bitmask"), is_train=True
    )
    for d in DatasetCatalog.get(name):
        out = mapper(dict(d))
        inst = out["instances"]
        masks = np.stack([mask_util.decode(a["segmentation"]) for a in d["annotations"]]).astype(
            bool
        )
        assert torch.equal(inst.gt_masks.tensor, torch.from_numpy(masks))
        assert inst.gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]
        assert torch.equal(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
    # The polygon format (detectron2's default) cannot hold RLE masks: a clear error.
    mapper = DatasetMapper(_mapper_cfg("MODEL.MASK_ON", True), is_train=True)
    with pytest.raises(ValueError, match="polygon"):
        mapper(dict(DatasetCatalog.get(name)[0]))


def test_instance_crowd_segments(tmp_path, synthetic_cityscapes_root):
    root = str(tmp_path / "crowd")
    shutil.copytree(synthetic_cityscapes_root, root)
    gt_json = os.path.join(root, "gtFine", "cityscapes_panoptic_val.json")
    with open(gt_json) as f:
        info = json.load(f)
    segments = info["annotations"][0]["segments_info"]
    crowd = next(s for s in segments if s["id"] >= 1000)
    crowd["iscrowd"] = 1
    with open(gt_json, "w") as f:
        json.dump(info, f)
    _, val = register_synthetic_cityscapes_instance(root, "pytest_crowd")
    d = next(
        d for d in DatasetCatalog.get(val) if d["image_id"] == info["annotations"][0]["image_id"]
    )
    flags = [a["iscrowd"] for a in d["annotations"]]
    assert flags.count(1) == 1 and len(flags) == sum(s["id"] >= 1000 for s in segments)
    mapper = DatasetMapper(
        _mapper_cfg("MODEL.MASK_ON", True, "INPUT.MASK_FORMAT", "bitmask"), is_train=True
    )
    assert len(mapper(dict(d))["instances"]) == len(flags) - 1  # crowd dropped for training


def _instances_from_annotations(d, shift=0):
    anns = d["annotations"]
    masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns])).bool()
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
    if shift:
        masks = torch.roll(masks, shift, dims=2)
        boxes = boxes + torch.tensor([shift, 0, shift, 0])
    return Instances(
        (d["height"], d["width"]),
        pred_boxes=Boxes(boxes),
        scores=torch.linspace(1.0, 0.5, len(anns)),
        pred_classes=torch.tensor([a["category_id"] for a in anns]),
        pred_masks=masks,
    )


@pytest.mark.parametrize("use_fast_impl", [True, False])
def test_coco_evaluator_perfect_and_shifted(names, tmp_path, use_fast_impl):
    from detectron2.evaluation import COCOEvaluator

    name = names["instance_seg"][1]
    dicts = DatasetCatalog.get(name)
    results = {}
    for shift in (0, 3):
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=use_fast_impl)
        evaluator.reset()
        for d in dicts:
            inputs = [{"image_id": d["image_id"], "file_name": d["file_name"]}]
            evaluator.process(inputs, [{"instances": _instances_from_annotations(d, shift)}])
        results[shift] = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[0][task]["AP"] == pytest.approx(100.0)
        assert results[0][task]["AP50"] == pytest.approx(100.0)
        assert results[3][task]["AP"] < 60.0
    # The COCO json it wrote holds the dataset ids (Cityscapes label ids) of the classes.
    with open(MetadataCatalog.get(name).json_file) as f:
        coco = json.load(f)
    assert {c["id"] for c in coco["categories"]} == {l.id for l in INSTANCE_LABELS}
    assert len(coco["annotations"]) == sum(len(d["annotations"]) for d in dicts)


# ------------------------------------------------------------------------------------------------
# Panoptic loader: same dicts as detectron2's, also on paths with a "."
# ------------------------------------------------------------------------------------------------
def _panoptic_args(root, split="val"):
    return (
        os.path.join(root, "leftImg8bit", split),
        os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}"),
        os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}.json"),
        get_cityscapes_panoptic_metadata(),
    )


def test_panoptic_loader_equals_detectron2(synthetic_cityscapes_root):
    for split in ("train", "val"):
        args = _panoptic_args(synthetic_cityscapes_root, split)
        assert load_cityscapes_panoptic_checked(*args) == load_cityscapes_panoptic(*args)


def test_dotted_root(tmp_path, synthetic_cityscapes_root):
    root = str(tmp_path / "data.v1" / "synthetic_cityscapes")
    shutil.copytree(synthetic_cityscapes_root, root)
    # detectron2's own loader cuts the path at the first "." (the pitfall guarded here).
    with pytest.raises(AssertionError, match="labelTrainIds"):
        load_cityscapes_panoptic(*_panoptic_args(root))
    reference = load_cityscapes_panoptic(*_panoptic_args(synthetic_cityscapes_root))
    relative = os.path.relpath(root)  # "../../tmp/..." when run from the repository
    for variant in (root, relative, root + "/"):
        registered = register_all_synthetic_cityscapes(variant, "pytest_dotted")
        dicts = DatasetCatalog.get(registered["panoptic"][1])
        assert len(dicts) == len(reference) == 2
        for d, ref in zip(dicts, reference):
            assert os.path.isfile(d["sem_seg_file_name"]), d["sem_seg_file_name"]
            assert os.path.samefile(d["sem_seg_file_name"], _gt_prefix(d) + "labelTrainIds.png")
            assert d["sem_seg_file_name"].endswith(
                os.path.relpath(ref["sem_seg_file_name"], synthetic_cityscapes_root)
            )
            assert d["segments_info"] == ref["segments_info"]
        assert len(DatasetCatalog.get(registered["sem_seg"][1])) == 2
        assert len(DatasetCatalog.get(registered["instance_seg"][1])) == 2


def test_cityscapes_gt_split_dir():
    assert (
        cityscapes_gt_split_dir("/d/leftImg8bit.v1/leftImg8bit/val")
        == "/d/leftImg8bit.v1/gtFine/val"
    )
    assert cityscapes_gt_split_dir("../x/leftImg8bit/train/") == "../x/gtFine/train"
    with pytest.raises(ValueError, match="no 'leftImg8bit'"):
        cityscapes_gt_split_dir("/d/images/val")


# ------------------------------------------------------------------------------------------------
# check_dataset_registered
# ------------------------------------------------------------------------------------------------
def test_check_dataset_registered(names):
    check_dataset_registered(names["sem_seg"][1])
    check_dataset_registered("coco_2017_val", key="DATASETS.TRAIN")
    typo = "pytest_splits_fine_sem_seg_vall"
    with pytest.raises(KeyError) as excinfo:
        check_dataset_registered(typo)
    assert isinstance(excinfo.value, DatasetNotRegisteredError)
    message = str(excinfo.value)
    assert message.startswith(f"DATASETS.TEST names data set '{typo}', which is not registered")
    listed = message.split("closest first): ")[1].split(", ")
    assert listed[0] == "pytest_splits_fine_sem_seg_val"  # the closest match first
    assert sorted(listed) == sorted(DatasetCatalog.list())  # and every registered name
    assert "Did you mean 'pytest_splits_fine_sem_seg_val'" in message

    with pytest.raises(KeyError, match="DATASETS.TRAIN names data set 'zzz_qqq'") as excinfo:
        check_dataset_registered("zzz_qqq", key="DATASETS.TRAIN")
    assert "Did you mean" not in str(excinfo.value)
    with pytest.raises(KeyError, match="must hold data set names"):
        check_dataset_registered(("a", "b"))
