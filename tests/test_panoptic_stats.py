# Copyright (c) UPSNetRobust authors.
"""Per-image panoptic statistics: against a hand-labelled image, against panopticapi's own
per-image computation, and summed over images against COCOPanopticEvaluator's PQ."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from upsnet_robust.evaluation.panoptic_stats import (
    SIZE_BUCKETS,
    PanopticStats,
    image_panoptic_stats,
    size_bucket,
)

# Categories of the hand-made images: 1 road (stuff), 2 car (thing), 3 person (thing).
CATS = {1: {"isthing": 0}, 2: {"isthing": 1}, 3: {"isthing": 1}}


def _hand_labelled():
    """A 100x100 image (small < 33 px, medium < 300 px, large otherwise):
    ground truth: road (segment 1, 9,000 px minus objects), car 10 (20x10 = 200 px, medium),
    person 11 (5x5 = 25 px, small), crowd of cars 12 (10x10), void strip (row 0).
    prediction: road 1 (everything not predicted otherwise), car 20 = the GT car shifted by
    2 rows (IoU 180 / 220), no person, a small false car 21 (4x4 on road), a car 22 (5x5)
    inside the crowd region (ignored)."""
    gt = np.ones((100, 100), np.uint32)
    gt[0, :] = 0
    gt[10:30, 10:20] = 10
    gt[50:55, 50:55] = 11
    gt[70:80, 70:80] = 12
    gt_segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 10, "category_id": 2, "iscrowd": 0},
        {"id": 11, "category_id": 3, "iscrowd": 0},
        {"id": 12, "category_id": 2, "iscrowd": 1},
    ]
    pred = np.ones((100, 100), np.uint32)
    pred[12:32, 10:20] = 20
    pred[40:44, 80:84] = 21
    pred[72:77, 72:77] = 22
    pred_segments = [
        {"id": 1, "category_id": 1},
        {"id": 20, "category_id": 2},
        {"id": 21, "category_id": 2},
        {"id": 22, "category_id": 2},
    ]
    return gt, gt_segments, pred, pred_segments


def test_size_buckets_are_relative_to_the_image_area():
    assert size_bucket(32, 100 * 100) == "small"  # 0.32 % < 0.333 %
    assert size_bucket(34, 100 * 100) == "medium"
    assert size_bucket(299, 100 * 100) == "medium"  # 2.99 % < 3 %
    assert size_bucket(301, 100 * 100) == "large"
    # the same fractions at Cityscapes' resolution
    assert size_bucket(0.0032 * 1024 * 2048, 1024 * 2048) == "small"
    assert size_bucket(0.031 * 1024 * 2048, 1024 * 2048) == "large"
    assert list(SIZE_BUCKETS) == ["small", "medium", "large"]


def test_hand_labelled_image():
    gt, gt_segments, pred, pred_segments = _hand_labelled()
    stats = image_panoptic_stats(gt, gt_segments, pred, pred_segments)
    road_gt = int((gt == 1).sum())
    road_pred = int((pred == 1).sum())
    road_inter = int(((gt == 1) & (pred == 1)).sum())
    road_void = int(((gt == 0) & (pred == 1)).sum())
    road_iou = road_inter / (road_gt + road_pred - road_inter - road_void)
    car_iou = 180 / (200 + 200 - 180)
    expected_all = {
        1: [road_iou, 1, 0, 0],
        2: [car_iou, 1, 1, 0],  # car matched; the 4x4 false car; the one in the crowd ignored
        3: [0, 0, 0, 1],  # the person missed
    }
    for cat, values in expected_all.items():
        np.testing.assert_allclose(stats.sums["all"][cat], values, rtol=1e-12)
    # by size: road large, car medium (its GT area), person small (FN), false car small (FP)
    np.testing.assert_allclose(stats.sums["large"][1], [road_iou, 1, 0, 0])
    np.testing.assert_allclose(stats.sums["medium"][2], [car_iou, 1, 0, 0])
    np.testing.assert_allclose(stats.sums["small"][2], [0, 0, 1, 0])
    np.testing.assert_allclose(stats.sums["small"][3], [0, 0, 0, 1])
    assert 1 not in stats.sums["small"] and 3 not in stats.sums["medium"]
    # PQ per group, by hand
    summary = stats.summary(CATS)
    pq_car = car_iou / (1 + 0.5)
    assert summary["PQ"]["PQ"] == pytest.approx(100 * (road_iou + pq_car + 0) / 3)
    assert summary["things"]["PQ"] == pytest.approx(100 * pq_car / 2)
    assert summary["stuff"]["PQ"] == pytest.approx(100 * road_iou)
    assert summary["small"]["PQ"] == pytest.approx(0.0) and summary["small"]["n"] == 2
    assert summary["medium"]["PQ"] == pytest.approx(100 * car_iou) and summary["medium"]["n"] == 1


def test_stats_add_and_round_trip():
    gt, gt_segments, pred, pred_segments = _hand_labelled()
    a = image_panoptic_stats(gt, gt_segments, pred, pred_segments)
    perfect = np.where(gt == 12, 0, gt)  # the ground truth without its crowd region
    b = image_panoptic_stats(gt, gt_segments, perfect, [s for s in gt_segments if s["id"] != 12])
    np.testing.assert_allclose(b.sums["all"][2], [1, 1, 0, 0])
    total = PanopticStats.total([a, b])
    for cat in CATS:
        np.testing.assert_allclose(
            total.sums["all"][cat], a.sums["all"][cat] + b.sums["all"].get(cat, 0)
        )
    again = PanopticStats.from_dict(json.loads(json.dumps(total.to_dict())))
    assert again.summary(CATS) == total.summary(CATS)


def test_bad_predictions_are_named():
    gt, gt_segments, pred, pred_segments = _hand_labelled()
    with pytest.raises(ValueError, match="predicted id 21"):
        image_panoptic_stats(gt, gt_segments, pred, [s for s in pred_segments if s["id"] != 21])
    with pytest.raises(ValueError, match="segment 99 has no pixels"):
        image_panoptic_stats(gt, gt_segments, pred, pred_segments + [{"id": 99, "category_id": 2}])


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _random_case(rng, height=48, width=64):
    """Rectangles of random categories over a stuff background, with crowd and void, and a
    prediction that moves, drops, merges and relabels some of them."""
    gt = np.full((height, width), 1, np.uint32)
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0}]
    pred = np.full((height, width), 1, np.uint32)
    pred_segments = [{"id": 1, "category_id": 1}]
    gt[: rng.integers(0, 4)] = 0
    for k in range(int(rng.integers(3, 9))):
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        h, w = rng.integers(2, 16), rng.integers(2, 16)
        sid = 100 + k
        cat = int(rng.integers(2, 4))
        gt[y : y + h, x : x + w] = sid
        segments.append({"id": sid, "category_id": cat, "iscrowd": int(rng.random() < 0.15)})
        if rng.random() < 0.8:
            dy, dx = rng.integers(-3, 4, size=2)
            pid = 200 + k
            y0, x0 = max(0, y + dy), max(0, x + dx)
            pred[y0 : y0 + h, x0 : x0 + w] = pid
            pcat = cat if rng.random() < 0.85 else 5 - cat
            pred_segments.append({"id": pid, "category_id": pcat})
    gt_ids = set(np.unique(gt).tolist())
    segments = [s for s in segments if s["id"] in gt_ids]
    for s in segments:
        s["area"] = int((gt == s["id"]).sum())
    pred_ids = set(np.unique(pred).tolist())
    pred_segments = [s for s in pred_segments if s["id"] in pred_ids]
    return gt, segments, pred, pred_segments


def test_matches_panopticapi_per_image(tmp_path):
    """Every category's sums equal panopticapi's pq_compute_single_core on each image."""
    from panopticapi.evaluation import pq_compute_single_core

    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    categories = {c: {"id": c, "isthing": v["isthing"]} for c, v in CATS.items()}
    nonzero = 0
    for i in range(25):
        gt, segments, pred, pred_segments = _random_case(rng)
        name = f"img{i}.png"
        Image.fromarray(_id2rgb(gt)).save(gt_dir / name)
        Image.fromarray(_id2rgb(pred)).save(pred_dir / name)
        reference = pq_compute_single_core(
            0,
            [({"image_id": i, "file_name": name, "segments_info": segments},
              {"image_id": i, "file_name": name, "segments_info": pred_segments})],
            str(gt_dir),
            str(pred_dir),
            categories,
        )
        ours = image_panoptic_stats(gt, segments, pred, pred_segments)
        for cat in CATS:
            ref = reference.pq_per_cat[cat]
            got = ours.sums["all"].get(cat, np.zeros(4))
            np.testing.assert_allclose(got, [ref.iou, ref.tp, ref.fp, ref.fn], rtol=1e-12)
            nonzero += ref.fp + ref.fn + ref.tp > 0
            # the size buckets partition the sums
            by_size = sum(ours.sums[b].get(cat, np.zeros(4)) for b in SIZE_BUCKETS)
            np.testing.assert_allclose(by_size, got, rtol=1e-12)
    assert nonzero > 40


def test_evaluator_per_image_stats_sum_to_its_pq(synthetic_cityscapes_names, tmp_path):
    """Predictions made from the ground truth (some segments dropped, some relabelled) go
    through COCOPanopticEvaluator; the summed per-image sums give its PQ, SQ, RQ, PQ_th, PQ_st."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from upsnet_robust.evaluation.evaluators import build_task_evaluator

    name = synthetic_cityscapes_names["val"]
    meta = MetadataCatalog.get(name)
    evaluator = build_task_evaluator(name, "panoptic_seg", str(tmp_path), per_image_stats=True)
    evaluator.reset()
    things = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    stuff = sorted(set(meta.stuff_dataset_id_to_contiguous_id.values()) - set(things))
    rng = np.random.default_rng(1)
    for d in DatasetCatalog.get(name):
        with open(d["pan_seg_file_name"], "rb") as f:
            rgb = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segments = []
        for s in d["segments_info"]:
            if rng.random() < 0.2:
                ids[ids == s["id"]] = 0  # dropped: void in the prediction
                continue
            category = s["category_id"]
            isthing = category in things
            if rng.random() < 0.2:
                category = int(rng.choice(things if isthing else stuff))
            segments.append({"id": s["id"], "category_id": category, "isthing": isthing})
        output = {"panoptic_seg": (torch.from_numpy(ids.astype(np.int32)), segments)}
        evaluator.process([{"image_id": d["image_id"], "file_name": d["file_name"]}], [output])
    results = evaluator.evaluate()
    stats = results["panoptic_stats"]
    assert set(stats["images"]) == {d["image_id"] for d in DatasetCatalog.get(name)}
    total = PanopticStats.total(stats["images"].values())
    summary = total.summary(stats["categories"])
    pq = results["panoptic_seg"]
    assert pq["PQ"] == pytest.approx(summary["PQ"]["PQ"], abs=1e-9)
    assert pq["SQ"] == pytest.approx(summary["PQ"]["SQ"], abs=1e-9)
    assert pq["RQ"] == pytest.approx(summary["PQ"]["RQ"], abs=1e-9)
    assert pq["PQ_th"] == pytest.approx(summary["things"]["PQ"], abs=1e-9)
    assert pq["PQ_st"] == pytest.approx(summary["stuff"]["PQ"], abs=1e-9)
    assert 0 < pq["PQ"] < 100  # the perturbations made it imperfect
