# Copyright (c) UPSNetRobust authors.
"""Breakdowns of real sweep cells: the shipped tiny UPSNet on 2 synthetic images (clean and
FGSM), and a tiny Semantic FPN. Panoptic breakdowns are checked against the pass's stored
per-image sums and against the cell's own PQ/PQ_th/PQ_st (panopticapi's); semantic per-class
IoU against a float64 confusion-matrix recomputation."""

import glob
import os

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from upsnet_robust.evaluation.panoptic_stats import SIZE_BUCKETS, PanopticStats, load_image_stats
from upsnet_robust.evaluation.report import ResultCell, write_report

CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


@pytest.fixture(scope="module")
def panoptic_sweep(synthetic_cityscapes_names, tmp_path_factory):
    if not os.path.isfile(CHECKPOINT):
        pytest.skip(f"{CHECKPOINT} missing (make demo trains it)")
    from detectron2.modeling import build_model

    from upsnet_robust.engine import build_checkpointer
    from upsnet_robust.evaluation import RobustnessSweep

    out = str(tmp_path_factory.mktemp("breakdown_sweep"))
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "MODEL.WEIGHTS", CHECKPOINT,
        "OUTPUT_DIR", out,
        "ROBUSTNESS.ATTACKS", "['fgsm']",
        "ROBUSTNESS.EPSILONS", "[4.0]",
        "ROBUSTNESS.DEFENSES", "['none']",
        "ROBUSTNESS.MAX_IMAGES", "2",
        "DATALOADER.NUM_WORKERS", "0",
    )  # fmt: skip
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(CHECKPOINT)
    cells = RobustnessSweep(cfg, model.eval(), CHECKPOINT, out).run()
    return out, cells


def _pass_dir(out, cell):
    (d,) = glob.glob(os.path.join(out, "robustness_cache", "*", f"{cell['attack']}_eps*"))
    return d


def test_panoptic_breakdown_agrees_with_the_stored_sums_and_the_cell(panoptic_sweep):
    out, cells = panoptic_sweep
    assert [c["attack"] for c in cells] == ["clean", "fgsm"]
    for cell in cells:
        b = cell["breakdown"]
        assert list(b) == ["size", "things", "stuff", "per_class"]
        assert list(b["size"]) == list(SIZE_BUCKETS)
        block = load_image_stats(_pass_dir(out, cell))["none"]
        assert len(block["images"]) == cell["num_images"] == 2
        total = PanopticStats.total(block["images"].values())
        cats = block["categories"]
        for bucket in SIZE_BUCKETS:
            # n: the categories with a TP, FP or FN among that bucket's segments
            counted = [c for c, v in total.sums[bucket].items() if v[1:].sum() > 0 and c in cats]
            assert b["size"][bucket]["n"] == len(counted)
            assert b["size"][bucket] == total.metrics(cats, group=bucket)
        assert sum(b["size"][k]["n"] > 0 for k in SIZE_BUCKETS) >= 2  # buckets really split
        for group, isthing, key in (("things", True, "PQ_th"), ("stuff", False, "PQ_st")):
            assert b[group] == total.metrics(cats, isthing=isthing)
            assert b[group]["n"] > 0
            # ... and the cell's own PQ_th / PQ_st, which panopticapi computed
            assert b[group]["PQ"] == pytest.approx(cell[key], abs=1e-9)
        # per class: the named categories panopticapi averaged into PQ
        names = {str(c["name"]) for c in cats.values()}
        assert set(b["per_class"]) <= names
        pq = [v["PQ"] for v in b["per_class"].values()]
        assert np.mean(pq) == pytest.approx(cell["PQ"], abs=1e-9)
        assert ResultCell.from_dict(cell).to_dict() == cell


def test_real_cells_make_a_report_with_breakdowns(panoptic_sweep, tmp_path):
    _, cells = panoptic_sweep
    paths = write_report(cells, str(tmp_path), {"date": "test"})
    md = open(paths["md"]).read()
    fgsm = cells[1]["breakdown"]["per_class"]
    worst = max(fgsm, key=lambda n: cells[0]["breakdown"]["per_class"].get(n, {}).get("PQ", 0)
                - fgsm[n]["PQ"])  # fmt: skip
    section = md[md.index("### fgsm at eps 4") :]
    first_row = [line for line in section.splitlines() if line.startswith("| ")][1]
    assert first_row.startswith(f"| {worst} |")
    assert os.path.getsize(paths["pq_by_size"]) > 0


@pytest.fixture(scope="module")
def sem_names(synthetic_cityscapes_root):
    from upsnet_robust.data import register_synthetic_cityscapes_semantic

    names = register_synthetic_cityscapes_semantic(
        synthetic_cityscapes_root, name_prefix="pytest_breakdown_semantic"
    )
    return dict(zip(("train", "val"), names))


def _iou_reference(cfg, model):
    """Per-class IoU (float64, %) of the model's clean predictions, None without ground truth."""
    from detectron2.data import DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    conf = np.zeros((19, 19), dtype=np.float64)  # [gt, pred]
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        x = mapper(d)
        with torch.no_grad():
            pred = model([x])[0]["sem_seg"].argmax(0).numpy()
        gt = np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    tp, gt_count, pred_count = np.diag(conf), conf.sum(1), conf.sum(0)
    return [
        100 * tp[i] / (gt_count[i] + pred_count[i] - tp[i]) if gt_count[i] > 0 else None
        for i in range(19)
    ]


def test_semantic_cells_carry_per_class_iou(sem_names, tmp_path):
    from detectron2.modeling import build_model

    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints
    from upsnet_robust.evaluation import RobustnessSweep

    config = os.path.join(REPO_ROOT, "configs", "Synthetic", "semantic_fpn_tiny.yaml")
    opts = {
        "DATASETS.TEST": f"('{sem_names['val']}',)",
        "INPUT.MIN_SIZE_TEST": 32,
        "INPUT.MAX_SIZE_TEST": 64,
        "DATALOADER.NUM_WORKERS": 0,
        "ROBUSTNESS.ATTACKS": ["fgsm"],
        "ROBUSTNESS.EPSILONS": [2.0],
        "ROBUSTNESS.DEFENSES": ["none"],
    }
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, config, [str(v) for kv in opts.items() for v in kv])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    clean, attacked = RobustnessSweep(cfg, model, "", str(tmp_path)).run()
    names = MetadataCatalog.get(sem_names["val"]).stuff_classes
    for cell in (clean, attacked):
        per_class = cell["breakdown"]["per_class"]
        assert list(per_class) == list(names)
        iou = [v["IoU"] for v in per_class.values() if v["IoU"] is not None]
        assert np.mean(iou) == pytest.approx(cell["mIoU"], abs=1e-9)
    reference = _iou_reference(cfg, model)
    for name, ref in zip(names, reference):
        got = clean["breakdown"]["per_class"][name]["IoU"]
        assert (got is None) == (ref is None), name
        if ref is not None:
            assert got == pytest.approx(ref, abs=1e-6), name


# COCO's small / medium thresholds (32² and 96² px) relative to a 640x480 image, as documented
_SMALL, _MEDIUM = 32 * 32 / (640 * 480), 96 * 96 / (640 * 480)


def _bucket(area, image_area):
    fraction = area / image_area
    return "small" if fraction < _SMALL else "medium" if fraction < _MEDIUM else "large"


def _write_png(folder, name, ids):
    from panopticapi.utils import id2rgb

    Image.fromarray(id2rgb(ids)).save(os.path.join(folder, name))


def _bucket_stats(gt_ann, gt_ids, pred_ann, pred_ids, bucket, categories, folder):
    """panopticapi's PQStat of one image restricted to ``bucket``, from two runs of
    pq_compute_single_core: TP, IoU and FN count in the bucket of the ground-truth segment, so
    run 1 turns the ground truth of other buckets into a crowd region of its category (neither
    matched nor a FN); FP counts in the bucket of the predicted segment, so run 2 voids the
    predictions of other buckets (a prediction's match, hence being a FP, depends only on its own
    pixels, the ground truth and void)."""
    from panopticapi.evaluation import pq_compute_single_core

    area = float(gt_ids.size)
    bucket_ids = gt_ids.copy()
    segments, crowd = [], {}
    for s in gt_ann["segments_info"]:
        if s.get("iscrowd", 0) or _bucket(s["area"], area) != bucket:
            c = s["category_id"]
            crowd.setdefault(c, dict(s, iscrowd=1, area=0))
            bucket_ids[gt_ids == s["id"]] = crowd[c]["id"]
            crowd[c]["area"] += s["area"]
        else:
            segments.append(s)
    kept, voided = [], pred_ids.copy()
    for s in pred_ann["segments_info"]:
        if _bucket(int((pred_ids == s["id"]).sum()), area) == bucket:
            kept.append(s)
        else:
            voided[pred_ids == s["id"]] = 0
    for file_name, ids in (("gt.png", gt_ids), ("gt_bucket.png", bucket_ids),
                           ("pred.png", pred_ids), ("pred_bucket.png", voided)):
        _write_png(folder, file_name, ids)
    run1 = pq_compute_single_core(
        0, [(dict(gt_ann, file_name="gt_bucket.png", segments_info=segments + list(crowd.values())),
             dict(pred_ann, file_name="pred.png"))], folder, folder, categories,
    )  # fmt: skip
    run2 = pq_compute_single_core(
        0, [(dict(gt_ann, file_name="gt.png"),
             dict(pred_ann, file_name="pred_bucket.png", segments_info=kept))],
        folder, folder, categories,
    )  # fmt: skip
    for c in categories:
        run1.pq_per_cat[c].fp = run2.pq_per_cat[c].fp
    return run1


def test_size_breakdown_against_panopticapi_per_bucket(
    panoptic_sweep, synthetic_cityscapes_names, tmp_path
):
    """Each size bucket's PQ, SQ, RQ and n against panopticapi's pq_compute_single_core on the
    segments of that bucket, from the pass's cached predictions (not the stored sums)."""
    import io
    import json

    from detectron2.evaluation import COCOPanopticEvaluator
    from panopticapi.evaluation import PQStat
    from panopticapi.utils import rgb2id

    from upsnet_robust.evaluation.image_cache import ImageCache

    out, cells = panoptic_sweep
    name = synthetic_cityscapes_names["val"]
    meta = MetadataCatalog.get(name)
    with open(meta.panoptic_json) as f:
        gt_json = json.load(f)
    categories = {c["id"]: c for c in gt_json["categories"]}
    gt_anns = {a["image_id"]: a for a in gt_json["annotations"]}
    dicts = DatasetCatalog.get(name)[:2]
    seen = set()
    for cell in cells:
        evaluator = COCOPanopticEvaluator(name, str(tmp_path / "eval"))
        evaluator.reset()
        cache = ImageCache(_pass_dir(out, cell), ("panoptic_seg",))
        for d in dicts:
            evaluator.process([d], [cache.load(d)["outputs"]["none"]])
        for bucket in ("small", "medium", "large"):
            total = PQStat()
            for pred in evaluator._predictions:
                gt_ann = gt_anns[pred["image_id"]]
                gt_png = Image.open(os.path.join(meta.panoptic_root, gt_ann["file_name"]))
                gt_ids = rgb2id(np.asarray(gt_png, dtype=np.uint32))
                png = Image.open(io.BytesIO(pred["png_string"]))
                pred_ids = rgb2id(np.asarray(png, dtype=np.uint32))
                total += _bucket_stats(
                    gt_ann, gt_ids, pred, pred_ids, bucket, categories, str(tmp_path)
                )
            expected, _ = total.pq_average(categories, isthing=None)
            got = cell["breakdown"]["size"][bucket]
            assert got["n"] == expected["n"], (cell["attack"], bucket)
            if expected["n"]:
                seen.add(bucket)
                for key in ("pq", "sq", "rq"):
                    value = 100 * expected[key]
                    assert got[key.upper()] == pytest.approx(value, abs=1e-9), (bucket, key)
    assert len(seen) >= 2  # the buckets really split the segments
