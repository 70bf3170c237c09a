# Copyright (c) UPSNetRobust authors.
"""Transfer entries against an independent recomputation, on trained models (random ones score
PQ 0 clean and attacked, so nothing could differ): a -> b equals target b run directly on a's
stored adversarial images and scored by detectron2's COCOPanopticEvaluator, and differs from b's
clean score. a is the shipped tiny PanopticFPN, b the shipped tiny UPSNet."""
import os

import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.modeling import build_model

from upsnet_robust.engine import build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation.transfer import TransferModel, TransferStudy, image_key

FPN = os.path.join(REPO_ROOT, "checkpoints", "panoptic_fpn_tiny_synthetic.pth")
UPSNET = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
OPTS = [
    "ROBUSTNESS.ATTACKS", "['fgsm']",
    "ROBUSTNESS.EPSILONS", "[8.0]",
    "ROBUSTNESS.DEFENSES", "['none']",
    "ROBUSTNESS.NUM_EXAMPLES", "0",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _model(cfg):
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _direct_pq(model, mapper, dataset_name, dicts, images, tmp_path):
    """PQ of ``model`` called directly on ``images`` ({image key: (3, h, w) tensor}), scored by
    detectron2's COCOPanopticEvaluator."""
    evaluator = COCOPanopticEvaluator(dataset_name, str(tmp_path))
    evaluator.reset()
    with torch.no_grad():
        for d in dicts:
            mapped = mapper(d)  # the original size the prediction is resized back to
            x = {"image": images[image_key(d)], "height": mapped["height"],
                 "width": mapped["width"]}  # fmt: skip
            evaluator.process([d], model([x]))
    return evaluator.evaluate()["panoptic_seg"]["PQ"]


@pytest.mark.skipif(not (os.path.isfile(FPN) and os.path.isfile(UPSNET)), reason="shipped weights")
def test_transfer_entry_is_the_target_on_the_stored_images(synthetic_cityscapes_names, tmp_path):
    names = synthetic_cityscapes_names
    common = ["DATASETS.TEST", f"('{names['val']}',)", *OPTS]
    cfg_a = get_upsnet_cfg()
    fpn_config = os.path.join(REPO_ROOT, "configs", "Synthetic", "panoptic_fpn_tiny.yaml")
    merge_with_hints(cfg_a, fpn_config, ["MODEL.WEIGHTS", FPN, *common])
    cfg_b = tiny_cfg("MODEL.WEIGHTS", UPSNET, *common)
    cfg_a.freeze(), cfg_b.freeze()
    model_b = _model(cfg_b)
    a, b = TransferModel("a", cfg_a, _model(cfg_a)), TransferModel("b", cfg_b, model_b)
    entries = TransferStudy([a, b], str(tmp_path / "transfer")).run()

    def entry(source, target):
        (e,) = [e for e in entries if (e["source"], e["target"]) == (source, target)]
        return e["PQ"]

    (folder,) = [r for r, _, fs in os.walk(tmp_path / "transfer" / "adversarial")
                 if any(f.endswith(".pt") for f in fs) and os.path.basename(os.path.dirname(r))
                 .startswith("a_")]  # fmt: skip
    dicts = DatasetCatalog.get(names["val"])
    stored = {
        image_key(d): torch.load(os.path.join(folder, image_key(d) + ".pt"), weights_only=True)
        for d in dicts
    }
    clean = {image_key(d): b.mapper(d)["image"] for d in dicts}
    assert all(stored[k].shape == clean[k].shape for k in clean)
    moved = max(float((stored[k] - clean[k].float()).abs().max()) for k in clean)
    assert moved == pytest.approx(8.0)
    transferred = _direct_pq(model_b, b.mapper, names["val"], dicts, stored, tmp_path / "e1")
    own_clean = _direct_pq(model_b, b.mapper, names["val"], dicts, clean, tmp_path / "e2")
    assert entry("a", "b") == pytest.approx(transferred, abs=1e-6)
    assert entry("clean", "b") == pytest.approx(own_clean, abs=1e-6)
    assert own_clean > 20.0  # a trained model: the clean score is not the floor
    assert abs(entry("a", "b") - entry("clean", "b")) > 0.5  # the stored images reached b


def _entry(source, target, value):
    return {"source": source, "target": target, "attack": "pgd", "eps": 4.0, "defense": "none",
            "metric": "PQ", "PQ": value}  # fmt: skip


@pytest.mark.parametrize("transfer,flagged", [(29.6, False), (29.4, True), (25.0, True)])
def test_gradient_masking_flag_at_the_tolerance(transfer, flagged):
    """The documented 0.5 PQ tolerance: a source 0.4 below the target's white-box 30.0 passes,
    0.6 below is flagged (the worst of several sources decides)."""
    from upsnet_robust.evaluation.transfer_report import transfer_checks

    entries = [_entry("a", "a", 30.0), _entry("b", "a", transfer), _entry("c", "a", 31.0)]
    (check,) = transfer_checks(entries)
    assert check["passed"] is (not flagged)
    assert ("gradient masking" in check["detail"]) is flagged
