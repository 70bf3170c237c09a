# Copyright (c) UPSNetRobust authors.
"""The ``sea`` worst case over an attack ensemble: greedy selection against brute force on
hand-made and random per-image statistics (panoptic PQ sums, semantic confusion matrices),
per-image confusion matrices against detectron2's SemSegEvaluator, set-up errors, and the
ensemble through a tiny sweep on the tiny UPSNet (member passes cached and shared, the sea cell
exact against the panoptic evaluator on the selected cached outputs)."""
import glob
import itertools
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, tiny_cfg

from upsnet_robust.evaluation.ensemble import greedy_worst_case, select_panoptic, select_semantic
from upsnet_robust.evaluation.panoptic_stats import PanopticStats
from upsnet_robust.evaluation.semantic_stats import sparse_confusion, sum_confusion

CATEGORIES = {1: {"isthing": 1}, 2: {"isthing": 0}, 3: {"isthing": 1}}


def _stats(rows):
    """PanopticStats of one image from ``{category: [iou, tp, fp, fn]}``."""
    return PanopticStats({"all": {c: v for c, v in rows.items()}})


def _pq(images):
    """Reference: PQ of a list of PanopticStats via PanopticStats.metrics (panopticapi's
    pq_average), independent of the selection's vectorised PQ."""
    value = PanopticStats.total(images).metrics(CATEGORIES)["PQ"]
    return np.inf if value is None else value


def _brute_force(members, score):
    """The lowest data-set score over every assignment of images to members."""
    ids = sorted(members[0])
    best = None
    for choice in itertools.product(range(len(members)), repeat=len(ids)):
        value = score([members[m][i] for m, i in zip(choice, ids)])
        best = value if best is None else min(best, value)
    return best


def _random_panoptic_member(rng, ids):
    out = {}
    for i in ids:
        rows = {}
        for c in CATEGORIES:
            tp, fp, fn = rng.integers(0, 4, size=3)
            iou = float(tp) * rng.uniform(0.5, 1.0)
            rows[c] = [iou, float(tp), float(fp), float(fn)]
        out[i] = _stats(rows)
    return out


def test_per_image_minimum_is_not_the_data_set_minimum():
    """One category. On image "a" member 0 misses the segment (per-image PQ 0) while member 1
    matches it but adds 18 false positives (per-image PQ 6); on "c" the roles swap; on "b"
    both are right. Keeping each image's per-image minimum (the misses) leaves the data set at
    PQ 45; the noisy predictions drag it to 10, below either member alone (13.04): the greedy
    selection has to switch an image to get there, and does, as brute force confirms."""
    miss = _stats({1: [0.0, 0.0, 0.0, 1.0]})
    noisy = _stats({1: [0.6, 1.0, 18.0, 0.0]})
    good = _stats({1: [0.9, 1.0, 0.0, 0.0]})
    members = [{"a": miss, "b": good, "c": noisy}, {"a": noisy, "b": good, "c": miss}]
    assert _pq([miss]) < _pq([noisy])
    per_image = [min(members, key=lambda m: _pq([m[i]]))[i] for i in ("a", "b", "c")]
    assert _pq(per_image) == pytest.approx(100 * 0.9 / 2.0)
    optimum = _brute_force(members, _pq)
    assert optimum == pytest.approx(100 * 2.1 / 21.0)
    sel = select_panoptic(members, CATEGORIES)
    assert sel.member_scores == pytest.approx([100 * 1.5 / 11.5] * 2)
    assert sel.switches >= 1 and sel.score < min(sel.member_scores)
    assert (sel.assignment["a"], sel.assignment["c"]) == (1, 0)
    assert sel.score == pytest.approx(optimum, abs=1e-9)


# Greedy selection is a local search, yet on these seeded cases it reaches the brute-force optimum
# exactly; seeds 8 and 9 (panoptic) and 9 (semantic) need two switching passes to get there.
@pytest.mark.parametrize("seed", range(12))
def test_greedy_panoptic_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    ids = ["img0", "img1", "img2", "img3"]
    members = [_random_panoptic_member(rng, ids) for _ in range(3)]
    sel = select_panoptic(members, CATEGORIES)
    chosen = [members[m][i] for i, m in sel.assignment.items()]
    assert sorted(sel.assignment) == ids
    assert sel.score == pytest.approx(_pq(chosen), abs=1e-9)  # the reported score is exact
    own = [_pq(list(m.values())) for m in members]
    assert sel.member_scores == pytest.approx(own)
    assert sel.start == int(np.argmin(own))
    assert sel.score <= min(own) + 1e-9  # never above any member
    optimum = _brute_force(members, _pq)
    assert sel.score == pytest.approx(optimum, abs=1e-9)  # float rounding only
    assert sel.passes >= 2  # the last pass switched nothing (it confirms the local optimum)


def _reference_miou(conf):
    """detectron2 SemSegEvaluator's mIoU, transcribed on a (K, K) float64 matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    pos_gt, pos_pred = conf.sum(axis=0), conf.sum(axis=1)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    return 100 * np.sum(tp[valid] / union[valid]) / np.sum(valid)


def _random_confusion(rng, k=4, pixels=60):
    """A sparse per-image confusion matrix; class k-1 never has ground truth."""
    gt = rng.integers(0, k - 1, size=pixels)
    pred = np.where(rng.random(pixels) < 0.5, gt, rng.integers(0, k, size=pixels))
    conf = np.bincount(k * pred + gt, minlength=k * k).reshape(k, k)
    return sparse_confusion(conf)


@pytest.mark.parametrize("seed", range(12))
def test_greedy_semantic_vs_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    ids = ["0", "1", "2", "3"]
    members = [{i: _random_confusion(rng) for i in ids} for _ in range(3)]

    def miou(images):
        return _reference_miou(sum_confusion(images, 4))

    sel = select_semantic(members, num_classes=4)
    chosen = [members[m][i] for i, m in sel.assignment.items()]
    assert sel.score == pytest.approx(miou(chosen), abs=1e-9)
    assert sel.score <= min(miou(list(m.values())) for m in members) + 1e-9
    optimum = _brute_force(members, miou)
    assert sel.score == pytest.approx(optimum, abs=1e-9)  # float rounding only


def test_greedy_needs_a_second_switching_pass():
    """One category, three images, two members (rows [iou, tp, fp, fn]). Member 0 alone: IoU
    1.1 over 2 TP + 0.5 FP + 0.5 FN, PQ 36.67 (member 1: 45.71), so every image starts at 0.
    Pass 1: switching "a" gives 52.5 and "b" 40 (no), "c" 27.5 (switched). Pass 2: now "b"
    gives 24.0 (switched); pass 3 switches nothing. Brute force: 24.0 is the optimum, which a
    search that stops after its first switching pass (27.5) misses."""
    members = [
        {"a": _stats({1: [0.0, 0, 0, 1]}), "b": _stats({1: [0.5, 1, 1, 0]}),
         "c": _stats({1: [0.6, 1, 0, 0]})},
        {"a": _stats({1: [1.0, 1, 1, 0]}), "b": _stats({1: [0.0, 0, 0, 0]}),
         "c": _stats({1: [0.6, 1, 1, 1]})},
    ]  # fmt: skip
    categories = {1: {"isthing": 1}}

    def pq(images):
        value = PanopticStats.total(images).metrics(categories)["PQ"]
        return np.inf if value is None else value

    assert pq(list(members[0].values())) == pytest.approx(100 * 1.1 / 3.0)
    optimum = _brute_force(members, pq)
    assert optimum == pytest.approx(100 * 0.6 / 2.5)
    sel = select_panoptic(members, categories)
    assert sel.start == 0 and sel.assignment == {"a": 0, "b": 1, "c": 1}
    assert sel.passes >= 3 and sel.switches == 2  # two switching passes, then a quiet one
    assert sel.score == pytest.approx(optimum, abs=1e-9)


def test_semantic_per_image_minimum_is_not_the_data_set_minimum():
    """mIoU, two classes. On image "a" member 0 gets both pixels wrong (per-image mIoU 0);
    member 1 gets one of 11 class-1 pixels right (4.2) but paints 10 of them class 0, which
    on the data set (with image "b", right in both) costs far more: 48.8 against 83.3."""
    k = 2

    def conf(entries):
        m = np.zeros((k, k), dtype=np.int64)
        for (p, g), n in entries.items():
            m[p, g] = n
        return sparse_confusion(m)

    members = [
        {"a": conf({(1, 0): 1, (0, 1): 1}), "b": conf({(0, 0): 10, (1, 1): 10})},
        {"a": conf({(1, 0): 1, (1, 1): 1, (0, 1): 10}), "b": conf({(0, 0): 10, (1, 1): 10})},
    ]

    def miou(images):
        return _reference_miou(sum_confusion(images, k))

    per_image = [min(members, key=lambda m: miou([m[i]]))[i] for i in ("a", "b")]
    optimum = _brute_force(members, miou)
    assert miou(per_image) > optimum + 1.0  # the per-image minimum is not the worst case
    sel = select_semantic(members, num_classes=k)
    assert sel.score == pytest.approx(optimum, abs=1e-9)


def test_greedy_edge_cases():
    # one member: nothing to switch; a member lacking an image still lets another supply it
    one = {"x": np.array([1.0]), "y": np.array([3.0])}
    sel = greedy_worst_case([one], lambda t: t[:, 0])
    assert sel.assignment == {"x": 0, "y": 0} and sel.switches == 0 and sel.score == 4.0
    partial = {"x": np.array([0.0])}
    sel = greedy_worst_case([one, partial], lambda t: t[:, 0])
    assert sel.assignment == {"x": 1, "y": 0} and sel.score == 3.0
    with pytest.raises(ValueError, match="at least one member"):
        greedy_worst_case([], lambda t: t[:, 0])


# ------------------------------------------------------------------------------------------
# Per-image confusion matrices against detectron2's SemSegEvaluator
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def semseg_dataset(tmp_path_factory):
    """Three 8x10 images with labels 0-2 and 255 (ignore) of a 4-class set: class 3 never has
    ground truth (the predictions use it: mIoU must leave it out)."""
    from PIL import Image

    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = tmp_path_factory.mktemp("semseg")
    rng = np.random.default_rng(0)
    dicts = []
    for n in range(3):
        gt = rng.integers(0, 3, size=(8, 10)).astype(np.uint8)
        gt[0, :3] = 255
        path = str(root / f"gt{n}.png")
        Image.fromarray(gt).save(path)
        dicts.append({"file_name": f"img{n}.jpg", "sem_seg_file_name": path, "image_id": n,
                      "height": 8, "width": 10})  # fmt: skip
    name = "pytest_sea_semseg"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(
            stuff_classes=["a", "b", "c", "d"], ignore_label=255, evaluator_type="sem_seg"
        )
    gts = {d["image_id"]: np.asarray(Image.open(d["sem_seg_file_name"])) for d in dicts}
    return name, dicts, gts


def _predictions(seed, gts):
    rng = np.random.default_rng(seed)
    out = {}
    for i, gt in gts.items():
        pred = np.where(rng.random(gt.shape) < 0.6, gt % 255, rng.integers(0, 4, size=gt.shape))
        out[i] = torch.from_numpy(pred.astype(np.int64) % 4)
    return out


def _evaluate(name, dicts, preds, per_image_stats=True):
    from upsnet_robust.evaluation.evaluators import build_task_evaluator

    evaluator = build_task_evaluator(name, "sem_seg", per_image_stats=per_image_stats)
    evaluator.reset()
    for d in dicts:
        evaluator.process([d], [{"sem_seg": preds[d["image_id"]]}])
    return evaluator.evaluate()


def test_per_image_confusion_sums_to_semsegevaluator(semseg_dataset):
    from detectron2.evaluation import SemSegEvaluator

    from upsnet_robust.evaluation.semantic_stats import semantic_metrics

    name, dicts, gts = semseg_dataset
    preds = _predictions(1, gts)
    results = _evaluate(name, dicts, preds)
    stats = results["sem_seg_stats"]
    assert stats["num_classes"] == 4 and sorted(stats["images"]) == [0, 1, 2]
    for i, gt in gts.items():  # each image's matrix, independently: rows pred, columns gt
        valid = gt != 255
        pred = preds[i].numpy()[valid]
        expected = np.bincount(4 * pred + gt[valid], minlength=16).reshape(4, 4)
        np.testing.assert_array_equal(sum_confusion([stats["images"][i]], 4), expected)
    # detectron2's own evaluator on (C, H, W) logits: the reference metrics
    reference = SemSegEvaluator(name, distributed=False)
    reference.reset()
    for d in dicts:
        logits = torch.nn.functional.one_hot(preds[d["image_id"]], 4).permute(2, 0, 1).float()
        reference.process([d], [{"sem_seg": logits}])
    expected = reference.evaluate()["sem_seg"]
    ours = semantic_metrics(sum_confusion(stats["images"].values(), 4))
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
        assert results["sem_seg"][key] == pytest.approx(expected[key], abs=1e-9), key
    assert "sem_seg_stats" not in _evaluate(name, dicts, preds, per_image_stats=False)


def test_semantic_selection_equals_evaluator_on_selected_predictions(semseg_dataset):
    """The selection's mIoU is what the evaluator gives on the selected predictions."""
    name, dicts, gts = semseg_dataset
    members = [_predictions(seed, gts) for seed in (2, 3, 4)]
    stats = [_evaluate(name, dicts, p)["sem_seg_stats"]["images"] for p in members]
    sel = select_semantic(stats, num_classes=4)
    chosen = {i: members[m][i] for i, m in sel.assignment.items()}
    results = _evaluate(name, dicts, chosen)["sem_seg"]
    assert sel.score == pytest.approx(results["mIoU"], abs=1e-9)
    assert sel.score <= min(_evaluate(name, dicts, p)["sem_seg"]["mIoU"] for p in members) + 1e-9


# ------------------------------------------------------------------------------------------
# Set-up checks
# ------------------------------------------------------------------------------------------
class _StubAdapter:
    """What the set-up checks read of an adapter."""

    def __init__(self, task="panoptic_seg", capabilities=("losses", "dense_logits")):
        self.task = task
        self.capabilities = frozenset(capabilities)
        self.meta_architecture = "StubNet"

    def has(self, capability):
        return capability in self.capabilities


@pytest.mark.parametrize(
    "members, error, words",
    [
        (["apgd"], ValueError, ["ROBUSTNESS.SEA.MEMBERS", "'apgd'", "attack:objective"]),
        (["nope:masked_ce"], ValueError, ["ROBUSTNESS.SEA.MEMBERS", "'nope:masked_ce'", "apgd"]),
        (["apgd:nope"], ValueError, ["ROBUSTNESS.SEA.MEMBERS", "'apgd:nope'", "masked_ce"]),
        (["illc:masked_ce"], ValueError, ["ROBUSTNESS.SEA.MEMBERS", "least_likely"]),
        ([], ValueError, ["ROBUSTNESS.SEA.MEMBERS", "empty"]),
    ],
)
def test_bad_members_are_rejected_naming_the_key(members, error, words):
    from upsnet_robust.evaluation.checks import check_ensembles

    cfg = tiny_cfg("ROBUSTNESS.ATTACKS", "['sea']")
    cfg.ROBUSTNESS.SEA.MEMBERS = members
    with pytest.raises(error) as info:
        check_ensembles(_StubAdapter(), cfg)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_ensembles_outside_the_sweep_are_rejected_clearly():
    from upsnet_robust.evaluation.checks import check_sweep_attacks

    with pytest.raises(ValueError, match="'sea' in ROBUSTNESS.ATTACKS is an ensemble"):
        check_sweep_attacks(_StubAdapter(), ["pgd", "sea"], "semantic_ce")


def test_members_the_model_cannot_serve_and_instance_models():
    from upsnet_robust.adapters.base import UnsupportedModelError
    from upsnet_robust.evaluation.checks import check_ensembles

    cfg = tiny_cfg("ROBUSTNESS.ATTACKS", "['sea_fast']", "ROBUSTNESS.SEA.FAST_NUM_STEPS", "0")
    with pytest.raises(ValueError, match="ROBUSTNESS.SEA.FAST_NUM_STEPS must be >= 1"):
        check_ensembles(_StubAdapter(), cfg)
    cfg.ROBUSTNESS.SEA.FAST_NUM_STEPS = 3
    check_ensembles(_StubAdapter(), cfg)  # the defaults are fine on a model with dense logits
    with pytest.raises(UnsupportedModelError) as info:
        check_ensembles(_StubAdapter(capabilities=("losses",)), cfg)
    message = str(info.value)
    entry = cfg.ROBUSTNESS.SEA.FAST_MEMBERS[0]  # the default preset's first member
    assert f"ROBUSTNESS.SEA.FAST_MEMBERS entry '{entry}'" in message and "dense" in message
    with pytest.raises(UnsupportedModelError, match="'sea_fast' in ROBUSTNESS.ATTACKS.*instances"):
        check_ensembles(_StubAdapter(task="instances"), cfg)


# ------------------------------------------------------------------------------------------
# Through a tiny sweep on the tiny UPSNet
# ------------------------------------------------------------------------------------------
SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
SEA_OPTS = [
    # sea: two members; sea_fast: one of them with the same settings (one shared pass); a plain
    # apgd pass equal to the other member (same key: one pass)
    "ROBUSTNESS.ATTACKS", "['sea', 'sea_fast', 'apgd']",
    "ROBUSTNESS.SEA.MEMBERS", "['apgd:masked_ce', 'apgd:js_divergence']",
    "ROBUSTNESS.SEA.NUM_STEPS", "2",
    "ROBUSTNESS.SEA.FAST_MEMBERS", "['apgd:js_divergence']",
    "ROBUSTNESS.SEA.FAST_NUM_STEPS", "2",
    "ROBUSTNESS.OBJECTIVE", "masked_ce",
    "ROBUSTNESS.NUM_STEPS", "2",
    "ROBUSTNESS.RANDOM_START", "True",
    "ROBUSTNESS.APGD_RADIUS_SCHEDULE", "True",
    "ROBUSTNESS.EARLY_STOP", "True",  # as the members (SEA.EARLY_STOP)
    "ROBUSTNESS.APGD_KEEP", "accuracy",  # as the members (SEA.KEEP)
    "ROBUSTNESS.EPSILONS", "[8.0]",
    "ROBUSTNESS.DEFENSES", "['none', 'bitdepth']",
    "ROBUSTNESS.INCLUDE_CLEAN", "False",
    "ROBUSTNESS.NUM_EXAMPLES", "0",
    "ROBUSTNESS.BATCH_SIZE", "2",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _sweep(names, output_dir, *opts):
    from detectron2.modeling import build_model

    from upsnet_robust.engine import build_checkpointer
    from upsnet_robust.evaluation import RobustnessSweep

    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names['val']}',)", "MODEL.WEIGHTS", SHIPPED,
        "OUTPUT_DIR", str(output_dir), *SEA_OPTS, *opts,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(SHIPPED)
    return RobustnessSweep(cfg, model.eval(), SHIPPED, cfg.OUTPUT_DIR)


def _selected_pq(names, cache_root, member_dirs, selection, defense, tmp_path):
    """PQ of the panoptic evaluator on the selected members' cached outputs."""
    from detectron2.data import DatasetCatalog

    from upsnet_robust.evaluation.evaluators import build_task_evaluator, headline_results
    from upsnet_robust.evaluation.image_cache import ImageCache

    evaluator = build_task_evaluator(names["val"], "panoptic_seg", str(tmp_path))
    evaluator.reset()
    dicts = {str(d["image_id"]): d for d in DatasetCatalog.get(names["val"])}
    for image_id, member in selection[defense].items():
        entry = ImageCache(member_dirs[member], ("panoptic_seg",)).load(dicts[image_id])
        evaluator.process([dicts[image_id]], [entry["outputs"][defense]])
    return headline_results("panoptic_seg", evaluator.evaluate())


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="needs the shipped tiny checkpoint")
def test_sea_through_a_tiny_sweep(synthetic_cityscapes_names, tmp_path, monkeypatch):
    names = synthetic_cityscapes_names
    sweep = _sweep(names, tmp_path / "out")
    cells = sweep.run()
    dirs = sorted(glob.glob(os.path.join(sweep.cache_root, "*")))
    members = [d for d in dirs if os.path.basename(d).startswith("apgd_eps8_")]
    assert len(members) == 2  # 2 + 1 members and a plain pass: two passes in all
    assert len(cells) == 2 * 2 + 2 * 2  # (2 member passes + sea + sea_fast) x 2 defenses
    member_cells = [c for c in cells if c["attack"] == "apgd"]
    assert {c["objective"] for c in member_cells} == {"masked_ce", "js_divergence"}
    for c in member_cells:
        expect = ["sea"] if c["objective"] == "masked_ce" else ["sea", "sea_fast"]
        assert c["member_of"] == expect and c["num_steps"] == 2 and c["random_start"]
    for name, steps in (("sea", 4), ("sea_fast", 2)):
        ens = [c for c in cells if c["attack"] == name]
        assert [c["defense"] for c in ens] == ["none", "bitdepth"]
        for c in ens:
            assert c["objective"] == "ensemble" and c["eps"] == 8.0 and c["num_steps"] == steps
            own = {m["objective"]: m for m in c["members"]}
            for m in member_cells:
                if m["defense"] == c["defense"] and m["objective"] in own:
                    assert own[m["objective"]]["PQ"] == m["PQ"]
                    assert c["PQ"] <= m["PQ"] + 1e-9  # never above a member
            assert sum(m["images"] for m in c["members"]) == c["num_images"] == 2
    sea_dir = next(d for d in dirs if os.path.basename(d).startswith("sea_eps8_"))
    with open(os.path.join(sea_dir, "selection.json")) as f:
        selection = json.load(f)
    # the member passes' directories in the order of ROBUSTNESS.SEA.MEMBERS
    member_dirs = sorted(members, key=lambda d: _cell_of(cells, d)["objective"] != "masked_ce")
    for c in [c for c in cells if c["attack"] == "sea"]:
        exact = _selected_pq(names, sweep.cache_root, member_dirs, selection, c["defense"],
                             tmp_path / "eval")  # fmt: skip
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
            assert c[key] == pytest.approx(exact[key], abs=1e-6), key

    # Re-run: every member pass is reused, none attacked again. One member's statistics are
    # gone (a cache from before they existed): it is re-scored from its cached images.
    from upsnet_robust.attacks.apgd import APGD

    def no_attack(*args, **kwargs):
        raise AssertionError("a cached member pass was attacked again")

    monkeypatch.setattr(APGD, "perturb", no_attack)
    os.remove(os.path.join(members[0], "image_stats.json"))
    again = _sweep(names, tmp_path / "out").run()
    assert os.path.isfile(os.path.join(members[0], "image_stats.json"))
    key = [(c["attack"], c["objective"], c["defense"]) for c in cells]
    assert [(c["attack"], c["objective"], c["defense"]) for c in again] == key
    for a, b in zip(cells, again):
        assert a["PQ"] == pytest.approx(b["PQ"], abs=1e-9)


def _cell_of(cells, pass_dir):
    """A member cell of the pass cached in ``pass_dir`` (matched through its cells.json)."""
    with open(os.path.join(pass_dir, "cells.json")) as f:
        return json.load(f)[0]


def test_sweep_rejects_bad_members_before_data(synthetic_cityscapes_names, tmp_path):
    with pytest.raises(ValueError, match=r"ROBUSTNESS.SEA.MEMBERS entry 'apgd:nope'"):
        _sweep(synthetic_cityscapes_names, tmp_path, "ROBUSTNESS.SEA.MEMBERS", "['apgd:nope']")


def test_sea_on_a_semantic_model(synthetic_cityscapes_root, tmp_path):
    """sem_seg: the member passes keep per-image confusion matrices; the sea cell's mIoU is
    the evaluator's on the selected cached outputs, and never above a member's."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from upsnet_robust.data import register_synthetic_cityscapes_semantic
    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints
    from upsnet_robust.evaluation import RobustnessSweep
    from upsnet_robust.evaluation.evaluators import build_task_evaluator, headline_results
    from upsnet_robust.evaluation.image_cache import ImageCache
    from upsnet_robust.evaluation.semantic_stats import load_confusion_stats

    name = register_synthetic_cityscapes_semantic(
        synthetic_cityscapes_root, name_prefix="pytest_sea_semantic"
    )[1]
    cfg = get_upsnet_cfg()
    merge_with_hints(
        cfg, os.path.join(REPO_ROOT, "configs", "Synthetic", "semantic_fpn_tiny.yaml"),
        ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path),
         "ROBUSTNESS.ATTACKS", "['sea']",
         "ROBUSTNESS.SEA.MEMBERS", "['apgd:masked_ce', 'apgd:js_divergence']",
         "ROBUSTNESS.SEA.NUM_STEPS", "2", "ROBUSTNESS.BATCH_SIZE", "2",
         "ROBUSTNESS.EPSILONS", "[8.0]",
         "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.INCLUDE_CLEAN", "False",
         "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0"],
    )  # fmt: skip
    torch.manual_seed(0)
    sweep = RobustnessSweep(cfg, build_model(cfg).eval(), "", str(tmp_path))
    cells = sweep.run()
    sea = next(c for c in cells if c["attack"] == "sea")
    members = [c for c in cells if c.get("member_of") == ["sea"]]
    assert len(members) == 2 and sea["metric"] == "mIoU" and sea["num_steps"] == 4
    assert all(sea["mIoU"] <= m["mIoU"] + 1e-9 for m in members)
    assert sum(m["images"] for m in sea["members"]) == sea["num_images"] == 2
    (sea_dir,) = glob.glob(os.path.join(sweep.cache_root, "sea_*"))
    with open(os.path.join(sea_dir, "selection.json")) as f:
        selection = json.load(f)["none"]
    member_dirs = sorted(
        glob.glob(os.path.join(sweep.cache_root, "apgd_*")),
        key=lambda d: _cell_of(cells, d)["objective"] != "masked_ce",
    )
    assert all(load_confusion_stats(d) is not None for d in member_dirs)
    evaluator = build_task_evaluator(name, "sem_seg")
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        member = selection[str(d["image_id"])]
        entry = ImageCache(member_dirs[member], ("sem_seg",)).load(d)
        evaluator.process([d], [entry["outputs"]["none"]])
    exact = headline_results("sem_seg", evaluator.evaluate())
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert sea[key] == pytest.approx(exact[key], abs=1e-9), key
