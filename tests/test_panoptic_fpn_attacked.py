# Copyright (c) UPSNetRobust authors.
"""The PanopticFPN attacked evaluation (Trainer.test_with_attack) against a value computed
without the robustness engine: the shipped model called directly on the adversarial images the
attack produced, its panoptic output scored by detectron2's COCOPanopticEvaluator (which maps
the model's contiguous ids to the data set's through the metadata). A wrong label mapping in the
adapter or the attacked path scores other images or other classes and fails here."""
import os

import pytest
import torch
from conftest import REPO_ROOT
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.modeling import build_model

from upsnet_robust.attacks.fgsm import FGSM
from upsnet_robust.data import build_panoptic_mapper
from upsnet_robust.engine import Trainer, build_checkpointer, get_upsnet_cfg, merge_with_hints

CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "panoptic_fpn_tiny.yaml")
CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "panoptic_fpn_tiny_synthetic.pth")
# PanopticFPN's separated labels -> Cityscapes trainIds (stuff 0..10, things 11..18), by hand
THINGS = [11, 12, 13, 14, 15, 16, 17, 18]
STUFF = [None, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def _by_hand(output):
    seg, segments = output["panoptic_seg"]
    mapped = [dict(s, category_id=(THINGS if s["isthing"] else STUFF)[s["category_id"]])
              for s in segments]  # fmt: skip
    return {"panoptic_seg": (seg, mapped)}


def _direct_pq(model, cfg, images, tmp_path):
    """PQ of the model's own inference on ``images`` ({file name: (3, h, w)}), scored by
    detectron2's COCOPanopticEvaluator."""
    name = cfg.DATASETS.TEST[0]
    mapper = build_panoptic_mapper(cfg, is_train=False)
    evaluator = COCOPanopticEvaluator(name, str(tmp_path))
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        x = mapper(d)
        with torch.no_grad():
            out = model([{"image": images[d["file_name"]], "height": x["height"],
                          "width": x["width"]}])  # fmt: skip
        evaluator.process([d], [_by_hand(out[0])])
    return evaluator.evaluate()["panoptic_seg"]["PQ"]


@pytest.mark.skipif(not os.path.isfile(CHECKPOINT), reason=f"{CHECKPOINT} missing")
def test_attacked_evaluation_equals_the_model_on_the_attacked_images(
    synthetic_cityscapes_names, tmp_path, monkeypatch
):
    names = synthetic_cityscapes_names
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, CONFIG, [
        "DATASETS.TRAIN", f"('{names['train']}',)", "DATASETS.TEST", f"('{names['val']}',)",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[8.0]",
        "TEST.DETECTIONS_PER_IMAGE", "10",
    ])  # fmt: skip
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(CHECKPOINT)
    model.eval()
    attacked, perturb = {}, FGSM.perturb

    def recording(self, images, objective):
        adv = perturb(self, images, objective)
        for x, a in zip(objective.inputs, adv):
            attacked[x["file_name"]] = a.detach().clone()
        return adv

    monkeypatch.setattr(FGSM, "perturb", recording)
    results = Trainer.test_with_attack(cfg, model)
    assert len(attacked) == len(DatasetCatalog.get(names["val"])) == 2
    expected = _direct_pq(model, cfg, attacked, tmp_path / "attacked")
    assert results["panoptic_seg_fgsm_eps8"]["PQ"] == pytest.approx(expected, abs=1e-6)
    mapper = build_panoptic_mapper(cfg, is_train=False)
    clean = {d["file_name"]: mapper(d)["image"] for d in DatasetCatalog.get(names["val"])}
    clean_pq = _direct_pq(model, cfg, clean, tmp_path / "clean")
    assert clean_pq > 50.0 and expected < clean_pq - 1.0  # a trained model, really attacked
