# Copyright (c) UPSNetRobust authors.
"""detectron2's GeneralizedRCNN (Mask R-CNN) through the robustness engine: adapter look-up
(UPSNet keeps its own), the test mapper that keeps the ground truth, seeded training losses,
sweeps scored with COCO AP (an oracle scores 100), resume and set-up rejections."""

import copy
import glob
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

import upsnet_robust  # noqa: F401
from upsnet_robust.adapters import (
    GeneralizedRCNNAdapter,
    UnsupportedModelError,
    adapter_class,
    build_adapter,
    frozen_norm_training_mode,
)
from upsnet_robust.attacks.objectives import MissingGroundTruthError, build_objective
from upsnet_robust.data import (
    get_cityscapes_instance_metadata,
    register_synthetic_cityscapes_instance,
)
from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import RobustnessSweep
from upsnet_robust.modeling import UPSNet, UPSNetAdapter

CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "mask_rcnn_tiny.yaml")
# the generated 64x128 images at half size (predictions are resized back for scoring)
SMALL_INPUT = {
    "INPUT.MIN_SIZE_TEST": 32,
    "INPUT.MAX_SIZE_TEST": 64,
    "DATALOADER.NUM_WORKERS": 0,
    "TEST.DETECTIONS_PER_IMAGE": 20,
}
AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LOSSES = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}


@pytest.fixture(scope="module")
def inst_names(synthetic_cityscapes_root):
    names = register_synthetic_cityscapes_instance(
        synthetic_cityscapes_root, name_prefix="pytest_rcnn"
    )
    return dict(zip(("train", "val"), names))


def _cfg(dataset, output_dir="", **overrides):
    """The tiny Mask R-CNN on ``dataset``; ``overrides`` with "__" for "." in the key names."""
    opts = {"DATASETS.TEST": f"('{dataset}',)", "OUTPUT_DIR": output_dir, **SMALL_INPUT}
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, CONFIG, [str(v) for kv in opts.items() for v in kv])
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_adapter_lookup_by_class_then_bases(inst_names):
    cfg = _cfg(inst_names["val"])
    model = _model(cfg)
    assert type(model) is GeneralizedRCNN
    adapter = build_adapter(cfg, model)
    assert type(adapter) is GeneralizedRCNNAdapter
    assert (adapter.task, adapter.headline_metric) == ("instances", "AP")
    assert adapter.capabilities == {"losses"}

    class MyRCNN(GeneralizedRCNN):  # a subclass without an adapter of its own
        pass

    assert adapter_class(MyRCNN(cfg)) is GeneralizedRCNNAdapter
    # UPSNet subclasses GeneralizedRCNN and keeps its own adapter
    upsnet = build_model(tiny_cfg())
    assert isinstance(upsnet, GeneralizedRCNN) and isinstance(upsnet, UPSNet)
    assert adapter_class(upsnet) is UPSNetAdapter
    assert adapter_class("UPSNet") is UPSNetAdapter
    assert adapter_class("GeneralizedRCNN") is GeneralizedRCNNAdapter


def _decoded_masks(d):
    masks = [mask_util.decode(a["segmentation"]) for a in d["annotations"] if not a["iscrowd"]]
    return np.stack(masks).astype(bool)


def test_test_mapper_keeps_instances_with_test_time_resize_only(inst_names):
    d = DatasetCatalog.get(inst_names["val"])[0]
    full = _cfg(inst_names["val"], INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=128)
    # detectron2's default test mapper drops them
    assert "instances" not in DatasetMapper(full, is_train=False)(d)
    x = GeneralizedRCNNAdapter.test_mapper(full)(d)
    assert x["image"].shape == (3, 64, 128) and (x["height"], x["width"]) == (64, 128)
    inst = x["instances"]
    np.testing.assert_array_equal(inst.gt_masks.tensor.numpy(), _decoded_masks(d))
    assert inst.gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [a["bbox"] for a in d["annotations"]])
    # the same image twice: no random augmentation (no flip, no crop)
    again = GeneralizedRCNNAdapter.test_mapper(full)(d)
    assert torch.equal(again["image"], x["image"])
    assert torch.equal(again["instances"].gt_masks.tensor, inst.gt_masks.tensor)

    # MIN_SIZE_TEST: image and masks resized, original size kept for the predictions
    half = GeneralizedRCNNAdapter.test_mapper(_cfg(inst_names["val"]))(d)
    assert half["image"].shape == (3, 32, 64) and (half["height"], half["width"]) == (64, 128)
    assert half["instances"].gt_masks.tensor.shape[1:] == (32, 64)
    # crowd regions are not training targets
    crowd = copy.deepcopy(d)
    crowd["annotations"][0]["iscrowd"] = 1
    assert len(GeneralizedRCNNAdapter.test_mapper(full)(crowd)["instances"]) == len(inst) - 1


def test_losses_seeded_per_image_with_frozen_norm(inst_names):
    cfg = _cfg(inst_names["val"])
    model = _model(cfg)
    adapter = build_adapter(cfg, model)
    x = GeneralizedRCNNAdapter.test_mapper(cfg)(DatasetCatalog.get(inst_names["val"])[0])
    image = x["image"].float().requires_grad_()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    state = torch.get_rng_state()
    one, again, other = (adapter.losses([dict(x, image=image)], [s])[0] for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state) and not model.training
    assert set(one) == LOSSES and all(torch.isfinite(v) for v in one.values())
    assert all(torch.equal(one[k], again[k]) for k in LOSSES)
    assert any(not torch.equal(one[k], other[k]) for k in LOSSES)  # proposal sampling
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    # the model's own training forward under the same seed, norm frozen: the same losses
    with frozen_norm_training_mode(model), torch.random.fork_rng(), EventStorage():
        torch.manual_seed(5)
        ref = model([dict(x, image=image)])
    assert all(torch.equal(one[k], ref[k]) for k in LOSSES)
    sum(one.values()).backward()
    assert image.grad.abs().sum() > 0
    no_gt = {k: v for k, v in x.items() if k != "instances"}
    with pytest.raises(MissingGroundTruthError, match="instances"):
        build_objective("train_losses", adapter, [no_gt])


def _backbone_calls(model):
    calls = []
    return calls, model.backbone.register_forward_hook(lambda *args: calls.append(1))


def test_sweep_cells_scored_with_ap_and_resumed(inst_names, tmp_path):
    attacks = ["fgsm", "ifgsm", "pgd"]
    cfg = _cfg(
        inst_names["val"],
        tmp_path,
        ROBUSTNESS__ATTACKS=attacks,
        ROBUSTNESS__EPSILONS=[2.0],
        ROBUSTNESS__NUM_STEPS=2,
        ROBUSTNESS__OBJECTIVE="train_losses",
        ROBUSTNESS__DEFENSES=["none"],
    )
    model = _model(cfg)
    cells = RobustnessSweep(cfg, model, "", str(tmp_path)).run()
    assert [c["attack"] for c in cells] == ["clean"] + attacks
    for c in cells:
        assert (c["model"], c["task"], c["metric"]) == ("GeneralizedRCNN", "instances", "AP")
        assert c["num_images"] == 2 and c["num_failed"] == 0
        assert c["objective"] == (None if c["attack"] == "clean" else "train_losses")
        assert set(AP_METRICS) <= set(c) and isinstance(c["AP"], float) and 0 <= c["AP"] <= 100, c
    calls, handle = _backbone_calls(model)
    try:
        again = RobustnessSweep(cfg, model, "", str(tmp_path)).run()
    finally:
        handle.remove()
    assert calls == [] and again == cells


class _OracleAdapter(GeneralizedRCNNAdapter):
    """Predicts the ground truth of its input (what a perfect detector would say)."""

    def inference(self, inputs, keys=None):
        outputs = []
        for x in inputs:
            gt = x["instances"]
            pred = Instances(gt.image_size)
            pred.pred_boxes = gt.gt_boxes.clone()
            pred.scores = torch.ones(len(gt))
            pred.pred_classes = gt.gt_classes.clone()
            pred.pred_masks = gt.gt_masks.tensor.clone()
            outputs.append({"instances": pred})
        return outputs


def test_ground_truth_predictions_score_100_ap(inst_names, tmp_path):
    """The sweep's COCO scoring of the instance split: the ground truth kept by the test mapper
    (at the original size), predicted as is, scores mask AP 100 (image ids, masks, classes)."""
    cfg = _cfg(
        inst_names["val"],
        tmp_path,
        INPUT__MIN_SIZE_TEST=64,
        INPUT__MAX_SIZE_TEST=128,
        ROBUSTNESS__ATTACKS=[],
        ROBUSTNESS__DEFENSES=["none"],
    )
    model = _model(cfg)
    sweep = RobustnessSweep(
        cfg, model, "", str(tmp_path), adapter=_OracleAdapter.from_config(cfg, model)
    )
    (cell,) = sweep.run()
    assert cell["AP"] == pytest.approx(100.0) and cell["AP50"] == pytest.approx(100.0)
    assert cell["num_images"] == 2


def _never_loaded_instance_split(name):
    def load():
        raise AssertionError("the data set was loaded before the set-up checks")

    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(evaluator_type="coco", **get_cityscapes_instance_metadata())
    return name


@pytest.mark.parametrize(
    "attack,objective",
    [
        ("segpgd", "train_losses"),
        ("cospgd", "semantic_ce"),
        ("illc", "train_losses"),
        ("pgd", "semantic_ce"),
        ("fgsm", "pseudo_label"),
        ("ifgsm", "least_likely"),
        ("pgd", "panoptic"),
    ],
)
def test_dense_attacks_and_objectives_rejected_at_set_up(attack, objective, tmp_path):
    cfg = _cfg(
        _never_loaded_instance_split("pytest_rcnn_never_loaded"),
        tmp_path,
        ROBUSTNESS__ATTACKS=[attack],
        ROBUSTNESS__OBJECTIVE=objective,
    )
    with pytest.raises(UnsupportedModelError) as e:
        RobustnessSweep(cfg, _model(cfg), "", str(tmp_path))
    message = str(e.value)
    used = "least_likely" if attack == "illc" else objective
    for part in ("GeneralizedRCNN", f"'{attack}'", f"'{used}'", "does not expose", "train_losses"):
        assert part in message, message
    if attack in ("segpgd", "cospgd", "illc"):  # no objective helps: other attacks are named
        offered = message.split("Use one of the attacks")[1].split("in ROBUSTNESS.ATTACKS")[0]
        offered = set(offered.replace(",", " ").split())
        assert "ifgsm" in offered and not {"segpgd", "cospgd", "illc"} & offered
    else:
        # (objectives registered by other tests may be listed too)
        offered = message.split("Set ROBUSTNESS.OBJECTIVE to one of")[1].replace(",", " ").split()
        assert "train_losses" in offered and objective not in offered
