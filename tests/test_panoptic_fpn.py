# Copyright (c) UPSNetRobust authors.
"""detectron2's PanopticFPN through the robustness engine: the mapping between its separated
labels and the data set's ids, its adapter (losses, dense logits, inference), set-up checks, a
sweep with every attack family, and the shipped tiny model."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model

from upsnet_robust.adapters import UnsupportedModelError, build_adapter
from upsnet_robust.adapters.panoptic_fpn import PanopticFPNAdapter, SeparatedLabels
from upsnet_robust.data import (
    build_panoptic_mapper,
    generate_synthetic_cityscapes,
    register_synthetic_cityscapes_panoptic,
)
from upsnet_robust.engine import Trainer, build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import RobustnessSweep
from upsnet_robust.evaluation.checks import check_attack_objective

CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "panoptic_fpn_tiny.yaml")
CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "panoptic_fpn_tiny_synthetic.pth")
needs_checkpoint = pytest.mark.skipif(
    not os.path.isfile(CHECKPOINT), reason=f"{CHECKPOINT} missing (see the config's header)"
)

# Cityscapes trainIds, written out by hand: stuff 0..10, things 11..18.
CITYSCAPES_STUFF = list(range(11))
CITYSCAPES_THINGS = list(range(11, 19))
# PQ points an attack must take off beyond chance. On the slow test's 2 images (clean PQ 77.9),
# random +-eps sign noise (eps 4 and 16, 5 seeds each) moved the shipped model's PQ by at most
# 0.92, while I-FGSM took off 4.4 (eps 4) and 21.9 (eps 16); on 4 images: 0.85 vs 5.0 and 21.5.
MARGIN = 1.0


def pfpn_cfg(*opts):
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, CONFIG, list(opts))
    return cfg


def _small_cfg(names, tmp_path, *opts):
    """The tiny PanopticFPN on the 64x128 fixture data (random init unless opts say else)."""
    return pfpn_cfg(
        "DATASETS.TRAIN", f"('{names['train']}',)",
        "DATASETS.TEST", f"('{names['val']}',)",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path),
        *opts,
    )


def _random_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _val_inputs(cfg):
    mapper = build_panoptic_mapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])]


# ------------------------------------------------------------------ label mapping
def _hand_made_metadata(**extra):
    meta = dict(
        name="pytest_pfpn_hand_made",
        stuff_dataset_id_to_contiguous_id={7: 4, 8: 0, 11: 9},  # stuff ids 0, 4, 9 -> 1, 2, 3
        thing_dataset_id_to_contiguous_id={26: 7, 24: 2},  # thing ids 2, 7 -> classes 0, 1
        ignore_label=255,
    )
    meta.update(extra)
    return Metadata(**meta)


def test_label_mapping_both_ways_hand_made_ids():
    labels = SeparatedLabels.from_metadata(_hand_made_metadata())
    sem = torch.tensor([[4, 0, 9], [2, 7, 255]])
    assert labels.semantic_to_model(sem).tolist() == [[2, 1, 3], [0, 0, 255]]
    segments = [
        {"id": 1, "isthing": False, "category_id": 3, "area": 5},
        {"id": 2, "isthing": True, "category_id": 1, "score": 0.9},
        {"id": 3, "isthing": True, "category_id": 0, "score": 0.8},
        {"id": 4, "isthing": False, "category_id": 1, "area": 7},
    ]
    mapped = labels.segments_to_dataset(segments)
    assert [(s["category_id"], s["isthing"]) for s in mapped] == [
        (9, False), (7, True), (2, True), (0, False)
    ]
    assert [s["id"] for s in mapped] == [1, 2, 3, 4] and segments[0]["category_id"] == 3  # a copy
    assert labels.thing_classes_to_ids(torch.tensor([1, 0, 1])).tolist() == [7, 2, 7]
    # another ignore value of the model
    assert SeparatedLabels.from_metadata(_hand_made_metadata(), ignore_value=-1).semantic_to_model(
        torch.tensor([255, 9])
    ).tolist() == [-1, 3]


def test_label_mapping_errors_name_the_problem():
    labels = SeparatedLabels.from_metadata(_hand_made_metadata())
    with pytest.raises(ValueError, match=r"\[3, 5\].*pytest_pfpn_hand_made"):
        labels.semantic_to_model(torch.tensor([0, 3, 5, 4]))
    with pytest.raises(ValueError, match="stuff label 0"):
        labels.segments_to_dataset([{"id": 1, "isthing": False, "category_id": 0}])
    with pytest.raises(ValueError, match="detector class 2"):
        labels.segments_to_dataset([{"id": 1, "isthing": True, "category_id": 2}])
    with pytest.raises(ValueError, match="distinct contiguous ids"):
        SeparatedLabels.from_metadata(
            _hand_made_metadata(thing_dataset_id_to_contiguous_id={24: 4})
        )
    with pytest.raises(ValueError, match="thing_dataset_id_to_contiguous_id"):
        SeparatedLabels.from_metadata(Metadata(name="x", stuff_dataset_id_to_contiguous_id={1: 0}))


def test_label_mapping_on_cityscapes_metadata(synthetic_cityscapes_names):
    meta = MetadataCatalog.get(synthetic_cityscapes_names["val"])
    labels = SeparatedLabels.from_metadata(meta)
    assert labels.num_semantic_classes == 12
    ids = torch.tensor(CITYSCAPES_STUFF + CITYSCAPES_THINGS + [255])
    expected = [t + 1 for t in CITYSCAPES_STUFF] + [0] * len(CITYSCAPES_THINGS) + [255]
    assert labels.semantic_to_model(ids).tolist() == expected
    for t in CITYSCAPES_STUFF:
        assert labels.stuff_label_to_id(t + 1) == t
    for c, t in enumerate(CITYSCAPES_THINGS):
        assert labels.thing_class_to_id(c) == t


def test_mappers_classes_agree_with_the_adapter(synthetic_cityscapes_names, tmp_path):
    """The panoptic mapper's gt_classes are detector classes (thing trainId - 11), its sem_seg
    trainIds; the training mapper gives the same map in separated labels."""
    cfg = _small_cfg(
        synthetic_cityscapes_names, tmp_path,
        "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
    )
    labels = SeparatedLabels.from_metadata(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]))
    train_mapper = PanopticFPNAdapter.train_mapper(cfg)
    test_mapper = PanopticFPNAdapter.test_mapper(cfg)
    seen = 0
    for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]):
        x, y = test_mapper(d), train_mapper(d)
        sem = x["sem_seg"]
        for mask, c in zip(x["instances"].gt_masks.tensor, x["instances"].gt_classes.tolist()):
            assert 0 <= c < 8 and set(sem[mask].tolist()) == {CITYSCAPES_THINGS[c]}
            seen += 1
        assert torch.equal(y["sem_seg"], labels.semantic_to_model(sem))
        assert torch.equal(y["sem_seg"] == 0, (sem >= 11) & (sem != 255))
        assert torch.equal(y["instances"].gt_classes, x["instances"].gt_classes)
    assert seen > 0


# ------------------------------------------------------------------ adapter and checks
def test_dense_logits_losses_and_targets(synthetic_cityscapes_names, tmp_path):
    cfg = _small_cfg(synthetic_cityscapes_names, tmp_path)
    model = _random_model(cfg)
    adapter = build_adapter(cfg, model)
    assert isinstance(adapter, PanopticFPNAdapter) and adapter.meta_architecture == "PanopticFPN"
    x = _val_inputs(cfg)[0]
    image = x["image"].float().requires_grad_(True)
    (logits,) = adapter.dense_logits([image])
    assert logits.shape == (12,) + tuple(image.shape[-2:])
    # the model's own semantic output (detectron2's inference path) is the same map
    with torch.no_grad():
        reference = model.inference([dict(x, image=image.detach())])[0]["sem_seg"]
    assert torch.allclose(logits.detach(), reference, atol=1e-4)
    grad = torch.autograd.grad(logits.logsumexp(0).sum(), image)[0]
    assert grad.abs().sum() > 0
    targets = adapter.dense_targets(x)
    sem = x["sem_seg"]  # trainIds; by hand: stuff t -> t + 1, things -> 0, 255 stays
    by_hand = torch.where((sem >= 11) & (sem != 255), 0, torch.where(sem == 255, 255, sem + 1))
    assert torch.equal(targets, by_hand)
    # the semantic training loss is computed against the mapped ground truth: float64 check
    (losses,) = adapter.losses([dict(x, image=image)], seeds=[3])
    assert {"loss_sem_seg", "loss_rpn_cls", "loss_cls", "loss_mask"} <= set(losses)
    expected = F.cross_entropy(logits.detach().double()[None], targets[None], ignore_index=255)
    weight = cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT
    assert losses["loss_sem_seg"].item() == pytest.approx(weight * expected.item(), rel=1e-4)
    (again,) = adapter.losses([dict(x, image=image)], seeds=[3])
    assert all(torch.equal(losses[k], again[k]) for k in losses)
    assert not model.training


def test_checks_reject_panoptic_objective_and_bad_configs(synthetic_cityscapes_names, tmp_path):
    cfg = _small_cfg(synthetic_cityscapes_names, tmp_path, "ROBUSTNESS.OBJECTIVE", "panoptic")
    model = _random_model(cfg)
    adapter = build_adapter(cfg, model)
    assert check_attack_objective(adapter, "fgsm", "train_losses") == "train_losses"
    assert check_attack_objective(adapter, "segpgd", "semantic_ce") == "semantic_ce"
    assert check_attack_objective(adapter, "illc", "train_losses") == "least_likely"
    for attack in ("pgd", "ifgsm"):
        match = r"PanopticFPN.*'panoptic'.*panoptic logits"
        with pytest.raises(UnsupportedModelError, match=match):
            check_attack_objective(adapter, attack, "panoptic")
    with pytest.raises(UnsupportedModelError, match="PanopticFPN"):
        RobustnessSweep(cfg, model, "", str(tmp_path))  # at set-up, before any data is read
    with pytest.raises(ValueError, match="metadata"):
        PanopticFPNAdapter(model).dense_targets(_val_inputs(cfg)[0])
    bad = _small_cfg(synthetic_cityscapes_names, tmp_path, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19")
    with pytest.raises(ValueError, match=r"SEM_SEG_HEAD.NUM_CLASSES = 12.*has 19"):
        build_adapter(bad, build_model(bad))
    with pytest.raises(ValueError, match=r"SEM_SEG_HEAD.NUM_CLASSES = 12.*config has 19"):
        PanopticFPNAdapter.train_mapper(bad)


def test_trainer_attacked_evaluation_maps_ids(synthetic_cityscapes_names, tmp_path):
    """Trainer.test_with_attack builds the adapter with the test set's label convention."""
    cfg = _small_cfg(
        synthetic_cityscapes_names, tmp_path,
        "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[2.0]",
        "TEST.DETECTIONS_PER_IMAGE", "10",
    )
    results = Trainer.test_with_attack(cfg, _random_model(cfg))
    assert 0 <= results["panoptic_seg_fgsm_eps2"]["PQ"] <= 100


# ------------------------------------------------------------------ sweep machinery
SWEEPS = (
    # (objective, attacks): each attack under the objective that applies to it
    ("train_losses", ["fgsm", "ifgsm", "pgd", "illc"]),
    ("semantic_ce", ["segpgd", "cospgd"]),
)


@pytest.mark.slow
def test_sweep_every_attack_family_stays_in_the_ball(synthetic_cityscapes_names, tmp_path):
    eps = 2.0
    for objective, attacks in SWEEPS:
        cfg = _small_cfg(
            synthetic_cityscapes_names, tmp_path / objective,
            "ROBUSTNESS.ATTACKS", str(attacks),
            "ROBUSTNESS.EPSILONS", f"[{eps}]",
            "ROBUSTNESS.OBJECTIVE", objective,
            "ROBUSTNESS.DEFENSES", "['none']",
            "ROBUSTNESS.NUM_EXAMPLES", "2",
            "ROBUSTNESS.RANDOM_START", "True",
            "ROBUSTNESS.NUM_STEPS", "2",  # the machinery, not the strength
            "TEST.DETECTIONS_PER_IMAGE", "10",
        )
        seen = []

        def on_example(spec, x, clean, adv, defended, outputs):
            seen.append((spec["attack"], clean, adv))

        sweep = RobustnessSweep(cfg, _random_model(cfg), "random-init", cfg.OUTPUT_DIR, on_example)
        cells = sweep.run()
        assert [c["attack"] for c in cells] == ["clean"] + attacks
        expected = {"clean": None, "illc": "least_likely"}
        for c in cells:
            assert c["model"] == "PanopticFPN" and c["metric"] == "PQ"
            assert c["num_images"] == 2 and c["num_failed"] == 0, c["failures"]
            assert c["objective"] == expected.get(c["attack"], objective)
            assert 0 <= c["PQ"] <= 100
        assert sorted(a for a, _, _ in seen) == sorted(attacks * 2)
        for attack, clean, adv in seen:
            delta = (adv - clean).abs()
            assert delta.max() <= eps + 1e-4 and adv.min() >= 0 and adv.max() <= 255, attack
            assert (delta > 0).float().mean() > 0.5, f"{attack}: no gradient reached the image"


# ------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def fresh_val(tmp_path_factory):
    """Fresh scenes at the training resolution (seed 1: not the training images)."""
    root = str(tmp_path_factory.mktemp("pfpn_trained") / "synthetic_cityscapes")
    generate_synthetic_cityscapes(root, num_train=1, num_val=12, seed=1, show_progress=False)
    names = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_pfpn_trained")
    return dict(zip(("train", "val"), names))


def _trained(fresh_val, tmp_path, *opts):
    cfg = pfpn_cfg(
        "DATASETS.TEST", f"('{fresh_val['val']}',)",
        "MODEL.WEIGHTS", CHECKPOINT,
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path),
        *opts,
    )
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(CHECKPOINT)
    return cfg, model.eval()


@needs_checkpoint
def test_shipped_model_pq_and_inference_ids(fresh_val, tmp_path):
    cfg, model = _trained(fresh_val, tmp_path)
    results = Trainer.test(cfg, model)
    assert results["panoptic_seg"]["PQ"] >= 60, results["panoptic_seg"]
    assert not model.training  # evaluation leaves the model's mode as it found it
    # the adapter's outputs are the model's, with Cityscapes trainIds (hand-written above)
    x = _val_inputs(cfg)[0]
    adapter = build_adapter(cfg, model)
    with torch.no_grad():
        (raw,) = model.inference([x])
        (out,) = adapter.inference([x])
    assert torch.equal(out["panoptic_seg"][0], raw["panoptic_seg"][0])
    raw_segments, segments = raw["panoptic_seg"][1], out["panoptic_seg"][1]
    assert any(s["isthing"] for s in segments) and any(not s["isthing"] for s in segments)
    for r, s in zip(raw_segments, segments):
        table = CITYSCAPES_THINGS if r["isthing"] else [None] + CITYSCAPES_STUFF
        assert s["category_id"] == table[r["category_id"]] and s["isthing"] == r["isthing"]
    raw_classes = raw["instances"].pred_classes.tolist()
    assert out["instances"].pred_classes.tolist() == [CITYSCAPES_THINGS[c] for c in raw_classes]
    assert torch.equal(out["sem_seg"], raw["sem_seg"])  # the model's 12 classes
    (only,) = adapter.inference([x], keys=frozenset({"panoptic_seg"}))
    assert set(only) == {"panoptic_seg"}


@needs_checkpoint
@pytest.mark.slow
def test_shipped_model_attacked_pq_below_clean(fresh_val, tmp_path):
    cfg, model = _trained(
        fresh_val, tmp_path,
        "ROBUSTNESS.ATTACKS", "['ifgsm']",
        "ROBUSTNESS.EPSILONS", "[4.0, 16.0]",
        "ROBUSTNESS.OBJECTIVE", "train_losses",
        "ROBUSTNESS.DEFENSES", "['none']",
        "ROBUSTNESS.MAX_IMAGES", "2",
    )
    cells = RobustnessSweep(cfg, model, CHECKPOINT, cfg.OUTPUT_DIR).run()
    pq = {(c["attack"], c["eps"]): c["PQ"] for c in cells}
    clean = pq[("clean", 0.0)]
    assert pq[("ifgsm", 4.0)] <= clean - MARGIN, pq
    assert pq[("ifgsm", 16.0)] <= pq[("ifgsm", 4.0)] - MARGIN, pq
