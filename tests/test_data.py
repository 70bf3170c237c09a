# Copyright (c) UPSNetRobust authors.
"""Tests of upsnet_robust.data: the synthetic Cityscapes generator, the data set registration and
the panoptic dataset mapper. Fixtures ``synthetic_cityscapes_root`` / ``_names`` are in
conftest.py (4 train / 2 val images of 64x128)."""

import glob
import json
import numpy as np
import os
import shutil

import cv2
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, name2label
from panopticapi.utils import rgb2id
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES

from upsnet_robust.config import add_upsnet_config
from upsnet_robust.data import (
    SYNTHETIC_STUFF_CLASSES,
    SYNTHETIC_THING_CLASSES,
    UPSNetPanopticDatasetMapper,
    build_panoptic_mapper,
    check_cityscapes_panoptic_files,
    generate_synthetic_cityscapes,
    label_ids_to_train_ids,
    register_synthetic_cityscapes_panoptic,
    render_synthetic_scene,
)

H, W = 64, 128
THING_LABEL_IDS = {name2label[n].id for n in SYNTHETIC_THING_CLASSES}
STUFF_LABEL_IDS = {name2label[n].id for n in SYNTHETIC_STUFF_CLASSES}
VOID_LABEL_IDS = {name2label["ego vehicle"].id}
THING_TRAIN_IDS = sorted(k["trainId"] for k in CITYSCAPES_CATEGORIES if k["isthing"])


def _files(root):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _read_unchanged(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def _gt_prefixes(root, split):
    files = sorted(glob.glob(os.path.join(root, "gtFine", split, "*", "*_gtFine_instanceIds.png")))
    return [f[: -len("instanceIds.png")] for f in files]


# ------------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------------
def test_generation_is_deterministic(tmp_path, synthetic_cityscapes_root):
    kwargs = dict(num_train=4, num_val=2, height=H, width=W, show_progress=False)
    same = generate_synthetic_cityscapes(str(tmp_path / "same"), seed=0, **kwargs)
    other = generate_synthetic_cityscapes(str(tmp_path / "other"), seed=1, **kwargs)
    reference = _files(synthetic_cityscapes_root)
    # 4 PNGs + polygons json + panoptic PNG per image, 2 panoptic jsons
    assert len(reference) == 6 * 6 + 2
    assert sum(k.endswith("_gtFine_polygons.json") for k in reference) == 6
    assert _files(same) == reference
    changed = _files(other)
    assert changed.keys() == reference.keys()
    for suffix in ("_leftImg8bit.png", "_gtFine_polygons.json"):
        assert all(changed[k] != reference[k] for k in reference if k.endswith(suffix)), suffix


def test_regeneration_replaces_tree_atomically(tmp_path):
    root = tmp_path / "synthetic_cityscapes"
    generate_synthetic_cityscapes(
        str(root), num_train=2, num_val=1, height=H, width=W, show_progress=False
    )
    generate_synthetic_cityscapes(
        str(root), num_train=1, num_val=1, height=H, width=W, show_progress=False
    )
    assert len(glob.glob(str(root / "leftImg8bit" / "train" / "*" / "*.png"))) == 1
    assert sorted(os.listdir(tmp_path)) == ["synthetic_cityscapes"]  # no temporary leftovers
    assert oct(os.stat(root).st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tree_layout_and_id_conventions(synthetic_cityscapes_root):
    root = synthetic_cityscapes_root
    seen_things = set()
    for split, count in (("train", 4), ("val", 2)):
        images = sorted(glob.glob(os.path.join(root, "leftImg8bit", split, "*", "*.png")))
        assert len(images) == count
        for image_file in images:
            city = os.path.basename(os.path.dirname(image_file))
            assert "_" not in city  # detectron2's image_id = first three "_" fields
            base = os.path.basename(image_file)[: -len("_leftImg8bit.png")]
            assert base.startswith(city + "_") and len(base.split("_")) == 3
            image = np.asarray(Image.open(image_file))
            assert Image.open(image_file).mode == "RGB" and image.shape == (H, W, 3)

            gt = os.path.join(root, "gtFine", split, city, base + "_gtFine_")
            label_ids = _read_unchanged(gt + "labelIds.png")
            instance_ids = _read_unchanged(gt + "instanceIds.png")
            train_ids = _read_unchanged(gt + "labelTrainIds.png")
            assert label_ids.dtype == np.uint8 and label_ids.shape == (H, W)
            assert instance_ids.dtype == np.uint16 and instance_ids.shape == (H, W)
            assert train_ids.dtype == np.uint8 and train_ids.shape == (H, W)

            assert set(np.unique(label_ids)) <= THING_LABEL_IDS | STUFF_LABEL_IDS | VOID_LABEL_IDS
            is_thing = instance_ids >= 1000
            assert np.array_equal(instance_ids[is_thing] // 1000, label_ids[is_thing])
            assert np.array_equal(instance_ids[~is_thing], label_ids[~is_thing])
            assert set(np.unique(label_ids[is_thing])) <= THING_LABEL_IDS
            assert set(np.unique(label_ids[~is_thing])) <= STUFF_LABEL_IDS | VOID_LABEL_IDS
            seen_things |= set(np.unique(label_ids[is_thing]).tolist())
            # Cityscapes numbering: label_id * 1000 + k, k = 0, 1, ... per class.
            for label_id in np.unique(label_ids[is_thing]):
                ks = np.unique(instance_ids[label_ids == label_id]) - 1000 * int(label_id)
                assert ks.tolist() == list(range(len(ks)))
            expected = np.array(
                [id2label[i].trainId if 0 <= id2label[i].trainId < 255 else 255 for i in range(34)],
                np.uint8,
            )[label_ids]
            assert np.array_equal(train_ids, expected)
            assert np.array_equal(train_ids, label_ids_to_train_ids(label_ids))
            assert (train_ids == 255).any()  # the ego-vehicle strip is void
    assert seen_things == THING_LABEL_IDS


def test_render_scene_occlusion_and_sizes():
    scene = render_synthetic_scene(np.random.default_rng(3), height=128, width=256)
    ids = scene["instance_ids"]
    assert scene["image"].dtype == np.uint8 and scene["image"].shape == (128, 256, 3)
    thing_ids = [i for i in np.unique(ids) if i >= 1000]
    assert len(thing_ids) >= 3
    for i in thing_ids:
        ys, xs = np.nonzero(ids == i)
        assert len(ys) >= 40  # tiny visible remainders are dropped
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 100


def test_panoptic_outputs_match_instance_ids(synthetic_cityscapes_root):
    root = synthetic_cityscapes_root
    for split in ("train", "val"):
        with open(os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}.json")) as f:
            info = json.load(f)
        prefixes = _gt_prefixes(root, split)
        assert len(info["annotations"]) == len(prefixes) == len(info["images"])
        assert {c["id"] for c in info["categories"] if c["isthing"]} >= THING_LABEL_IDS
        for ann, prefix in zip(sorted(info["annotations"], key=lambda a: a["image_id"]), prefixes):
            assert ann["image_id"] == os.path.basename(prefix)[: -len("_gtFine_")]
            pan = rgb2id(
                np.asarray(
                    Image.open(
                        os.path.join(
                            root, "gtFine", f"cityscapes_panoptic_{split}", ann["file_name"]
                        )
                    )
                )
            )
            instance_ids = _read_unchanged(prefix + "instanceIds.png").astype(np.int64)
            void = np.isin(instance_ids, list(VOID_LABEL_IDS))
            assert np.array_equal(pan[~void], instance_ids[~void])
            assert (pan[void] == 0).all()
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert set(segments) == set(np.unique(instance_ids[~void]).tolist())
            for seg_id, seg in segments.items():
                mask = instance_ids == seg_id
                assert seg["area"] == int(mask.sum())
                assert seg["category_id"] == (seg_id // 1000 if seg_id >= 1000 else seg_id)
                assert seg["iscrowd"] == 0


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_default_registration():
    for split in ("train", "val"):
        name = f"synthetic_cityscapes_fine_panoptic_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        root = os.path.normpath(
            os.path.join(
                os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                "synthetic_cityscapes",
            )
        )
        assert meta.image_root == os.path.join(root, "leftImg8bit", split)
        assert meta.evaluator_type == "cityscapes_panoptic_seg"


def test_registration_and_loading(synthetic_cityscapes_root, synthetic_cityscapes_names):
    reference = MetadataCatalog.get("cityscapes_fine_panoptic_train")
    for split, count in (("train", 4), ("val", 2)):
        name = synthetic_cityscapes_names[split]
        assert name == f"pytest_synthetic_cityscapes_fine_panoptic_{split}"
        meta = MetadataCatalog.get(name)
        root = synthetic_cityscapes_root
        assert meta.panoptic_root == os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}")
        assert meta.panoptic_json == meta.panoptic_root + ".json"
        assert meta.image_root == os.path.join(root, "leftImg8bit", split)
        assert meta.gt_dir == os.path.join(root, "gtFine", split)
        assert (meta.evaluator_type, meta.ignore_label, meta.label_divisor) == (
            "cityscapes_panoptic_seg",
            255,
            1000,
        )
        for key in (
            "thing_classes",
            "stuff_classes",
            "thing_colors",
            "stuff_colors",
            "thing_dataset_id_to_contiguous_id",
            "stuff_dataset_id_to_contiguous_id",
        ):
            assert meta.get(key) == reference.get(key), key
        assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(11, 19))

        dicts = DatasetCatalog.get(name)
        assert len(dicts) == count
        with open(meta.panoptic_json) as f:
            json_ids = {a["image_id"] for a in json.load(f)["annotations"]}
        assert {d["image_id"] for d in dicts} == json_ids  # what the panoptic evaluator matches
        for d in dicts:
            for key in ("file_name", "sem_seg_file_name", "pan_seg_file_name"):
                assert os.path.isfile(d[key]), d[key]
            assert d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png")
            cats = {s["category_id"] for s in d["segments_info"]}
            assert cats <= set(range(19))  # contiguous (train) ids


def test_register_again_replaces(tmp_path, synthetic_cityscapes_root):
    names = register_synthetic_cityscapes_panoptic(str(tmp_path / "nowhere"), "pytest_reregister")
    assert MetadataCatalog.get(names[0]).image_root.startswith(str(tmp_path))
    names = register_synthetic_cityscapes_panoptic(synthetic_cityscapes_root, "pytest_reregister")
    assert len(DatasetCatalog.get(names[0])) == 4


def test_missing_directory_error(tmp_path):
    root = str(tmp_path / "missing_root")
    name, _ = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_missing")
    with pytest.raises(FileNotFoundError) as excinfo:
        DatasetCatalog.get(name)
    message = str(excinfo.value)
    assert os.path.join(root, "leftImg8bit", "train") in message
    assert f"python tools/prepare_synthetic_cityscapes.py --output {root}" in message


def test_missing_json_and_labels_error(tmp_path, synthetic_cityscapes_root):
    root = str(tmp_path / "copy")
    shutil.copytree(synthetic_cityscapes_root, root)
    json_file = os.path.join(root, "gtFine", "cityscapes_panoptic_val.json")
    os.remove(json_file)
    _, name = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_missing_json")
    with pytest.raises(FileNotFoundError) as excinfo:
        DatasetCatalog.get(name)
    assert json_file in str(excinfo.value)
    assert "prepare_synthetic_cityscapes.py --output" in str(excinfo.value)

    # Real Cityscapes layout without labelTrainIds: point to cityscapesscripts.
    for f in glob.glob(os.path.join(root, "gtFine", "train", "*", "*_labelTrainIds.png")):
        os.remove(f)
    with pytest.raises(FileNotFoundError) as excinfo:
        check_cityscapes_panoptic_files(
            os.path.join(root, "leftImg8bit", "train"),
            os.path.join(root, "gtFine", "cityscapes_panoptic_train"),
            os.path.join(root, "gtFine", "cityscapes_panoptic_train.json"),
        )
    message = str(excinfo.value)
    assert "_labelTrainIds.png" in message and "createTrainIdLabelImgs" in message
    assert "createPanopticImgs" in message


# ------------------------------------------------------------------------------------------------
# Mapper
# ------------------------------------------------------------------------------------------------
def _cfg(train_name, *opts):
    cfg = get_cfg()
    add_upsnet_config(cfg)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = W
    cfg.INPUT.MIN_SIZE_TEST = H
    cfg.INPUT.MAX_SIZE_TEST = W
    cfg.merge_from_list(list(opts))
    return cfg


def _check_sample(out, d, image_shape):
    h, w = image_shape
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, h, w)
    assert (out["height"], out["width"]) == (H, W)
    assert out["file_name"] == d["file_name"] and out["image_id"] == d["image_id"]
    sem = out["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (h, w)
    assert set(torch.unique(sem).tolist()) <= set(range(19)) | {255}
    inst = out["instances"]
    assert inst.image_size == (h, w)
    assert inst.gt_classes.dtype == torch.int64
    assert inst.gt_masks.tensor.dtype == torch.bool and inst.gt_masks.tensor.shape[1:] == (h, w)
    assert len(inst) == len(inst.gt_boxes) == len(inst.gt_classes) > 0
    assert set(inst.gt_classes.tolist()) <= {0, 2, 7}  # person, car, bicycle = trainId - 11
    for box, mask, cls in zip(inst.gt_boxes.tensor, inst.gt_masks.tensor, inst.gt_classes):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 0
        # Tight XYXY box of the mask extent (right/bottom edges exclusive).
        assert box.tolist() == [
            xs.min().item(),
            ys.min().item(),
            xs.max().item() + 1,
            ys.max().item() + 1,
        ]
        # The semantic map labels the instance's pixels with its class's trainId.
        assert (sem[mask] == THING_TRAIN_IDS[cls]).all()
    # No thing pixel of the semantic map is left without an instance (no crowd here).
    thing_sem = (sem >= 11) & (sem <= 18)
    assert torch.equal(thing_sem, inst.gt_masks.tensor.any(dim=0))


def test_mapper_train(synthetic_cityscapes_names):
    name = synthetic_cityscapes_names["train"]
    cfg = _cfg(name)
    mapper = build_panoptic_mapper(cfg, is_train=True)
    assert isinstance(mapper, UPSNetPanopticDatasetMapper)
    for d in DatasetCatalog.get(name):
        out = mapper(d)
        _check_sample(out, d, (H, W))
        num_things = sum(1 for s in d["segments_info"] if s["category_id"] >= 11)
        assert len(out["instances"]) == num_things
        assert "pan_seg_file_name" in out and "segments_info" in out  # harmless passthrough


def test_mapper_image_format_and_classes(synthetic_cityscapes_names):
    name = synthetic_cityscapes_names["val"]
    d = DatasetCatalog.get(name)[0]
    rgb = np.asarray(Image.open(d["file_name"]))
    for fmt, expected in (("BGR", rgb[:, :, ::-1]), ("RGB", rgb)):
        out = build_panoptic_mapper(_cfg(name, "INPUT.FORMAT", fmt), is_train=False)(d)
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected)
    # gt_classes follow segments_info order: trainId - 11.
    things = [s for s in d["segments_info"] if s["category_id"] >= 11]
    assert out["instances"].gt_classes.tolist() == [s["category_id"] - 11 for s in things]


def test_mapper_flip_and_resize_consistency(synthetic_cityscapes_names):
    name = synthetic_cityscapes_names["train"]
    d = DatasetCatalog.get(name)[1]
    kwargs = dict(image_format="RGB", thing_ids=THING_TRAIN_IDS)
    plain = UPSNetPanopticDatasetMapper(True, augmentations=[], **kwargs)(d)
    aug = UPSNetPanopticDatasetMapper(
        True, augmentations=[T.ResizeShortestEdge(2 * H, 2 * W), T.RandomFlip(prob=1.0)], **kwargs
    )(d)
    _check_sample(aug, d, (2 * H, 2 * W))

    def resize_flip(t):  # nearest 2x upsampling, then horizontal flip
        return t.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1).flip(-1)

    expected_image = np.asarray(Image.open(d["file_name"]).resize((2 * W, 2 * H), Image.BILINEAR))[
        :, ::-1
    ]
    assert np.array_equal(aug["image"].permute(1, 2, 0).numpy(), expected_image)
    assert torch.equal(aug["sem_seg"], resize_flip(plain["sem_seg"]))
    assert torch.equal(aug["instances"].gt_classes, plain["instances"].gt_classes)
    assert torch.equal(
        aug["instances"].gt_masks.tensor, resize_flip(plain["instances"].gt_masks.tensor)
    )
    x0, y0, x1, y1 = plain["instances"].gt_boxes.tensor.unbind(1)
    expected_boxes = torch.stack([2 * W - 2 * x1, 2 * y0, 2 * W - 2 * x0, 2 * y1], dim=1)
    assert torch.equal(aug["instances"].gt_boxes.tensor, expected_boxes)


def test_mapper_test_mode_keeps_ground_truth(synthetic_cityscapes_names):
    name = synthetic_cityscapes_names["val"]
    mapper = build_panoptic_mapper(_cfg(synthetic_cityscapes_names["train"]), is_train=False)
    assert not any(isinstance(a, T.RandomFlip) for a in mapper.augmentations.augs)
    d = DatasetCatalog.get(name)[0]
    _check_sample(mapper(d), d, (H, W))

    no_gt = {k: d[k] for k in ("file_name", "image_id")}
    out = mapper(no_gt)
    assert set(out) == {"file_name", "image_id", "image", "height", "width"}


def test_mapper_skips_crowd_and_empty_segments(synthetic_cityscapes_names):
    name = synthetic_cityscapes_names["train"]
    mapper = build_panoptic_mapper(_cfg(name), is_train=False)
    d = DatasetCatalog.get(name)[0]
    full = len(mapper(d)["instances"])
    things = [s for s in d["segments_info"] if s["category_id"] >= 11]
    things[0]["iscrowd"] = 1
    things[1]["id"] = 999_999  # no pixel carries this id
    assert len(mapper(d)["instances"]) == full - 2


def test_build_panoptic_mapper_unknown_name(synthetic_cityscapes_names):
    cfg = _cfg(synthetic_cityscapes_names["train"], "INPUT.DATASET_MAPPER_NAME", "nope")
    with pytest.raises(ValueError, match="upsnet_panoptic"):
        build_panoptic_mapper(cfg, is_train=True)


def test_mapper_in_detectron2_loaders(synthetic_cityscapes_names):
    from detectron2.data import build_detection_test_loader, build_detection_train_loader

    cfg = _cfg(synthetic_cityscapes_names["train"], "SOLVER.IMS_PER_BATCH", 2)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATASETS.TEST = (synthetic_cityscapes_names["val"],)
    train_loader = build_detection_train_loader(cfg, mapper=build_panoptic_mapper(cfg, True))
    batch = next(iter(train_loader))
    assert len(batch) == 2 and all("instances" in x and "sem_seg" in x for x in batch)
    test_loader = build_detection_test_loader(
        cfg, cfg.DATASETS.TEST[0], mapper=build_panoptic_mapper(cfg, False)
    )
    assert sum(len(b) for b in test_loader) == 2


def test_ground_truth_scores_perfect_pq(tmp_path, synthetic_cityscapes_names):
    """The mapper's targets, turned back into a panoptic prediction, match the panoptic json
    exactly under detectron2's COCOPanopticEvaluator (also checks the image ids match)."""
    from detectron2.evaluation import COCOPanopticEvaluator

    name = synthetic_cityscapes_names["val"]
    mapper = build_panoptic_mapper(_cfg(synthetic_cityscapes_names["train"]), is_train=False)
    evaluator = COCOPanopticEvaluator(name, str(tmp_path))
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        x = mapper(d)
        sem, inst = x["sem_seg"], x["instances"]
        panoptic = torch.where(sem == 255, torch.full_like(sem, -1), sem * 1000)
        for i, (mask, cls) in enumerate(zip(inst.gt_masks.tensor, inst.gt_classes)):
            panoptic[mask] = THING_TRAIN_IDS[cls] * 1000 + i + 1
        evaluator.process([x], [{"panoptic_seg": (panoptic, None)}])
    results = evaluator.evaluate()["panoptic_seg"]
    assert results["PQ"] == pytest.approx(100.0)
    assert results["PQ_th"] == pytest.approx(100.0) and results["PQ_st"] == pytest.approx(100.0)
