# Copyright (c) UPSNetRobust authors.
"""detectron2's SemanticSegmentor (Semantic FPN and DeepLab v3+) through the robustness engine:
the adapter's dense logits and losses against the model's own outputs, sweeps scored with mIoU
(checked against a recomputation), resume, 1-vs-2 processes, set-up rejections, a model-zoo
config."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from detectron2 import model_zoo
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

import upsnet_robust  # noqa: F401
from upsnet_robust.adapters import (
    SemanticSegmentorAdapter,
    UnsupportedModelError,
    adapter_class,
    build_adapter,
)
from upsnet_robust.attacks.objectives import MissingGroundTruthError, build_objective
from upsnet_robust.data import (
    get_cityscapes_semantic_metadata,
    register_synthetic_cityscapes_semantic,
)
from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import RobustnessSweep

CONFIGS = {
    "fpn": os.path.join(REPO_ROOT, "configs", "Synthetic", "semantic_fpn_tiny.yaml"),
    "deeplab": os.path.join(REPO_ROOT, "configs", "Synthetic", "deeplab_v3plus_tiny.yaml"),
}
HEADS = {"fpn": "SemSegFPNHead", "deeplab": "DeepLabV3PlusHead"}
# the generated 64x128 images at half size: predictions are resized back for scoring
SMALL_INPUT = {"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 64, "DATALOADER.NUM_WORKERS": 0}
SEM_METRICS = ("mIoU", "fwIoU", "mACC", "pACC")


def _opts(overrides):
    return [str(v) for kv in overrides.items() for v in kv]


@pytest.fixture(scope="module")
def sem_names(synthetic_cityscapes_root):
    names = register_synthetic_cityscapes_semantic(
        synthetic_cityscapes_root, name_prefix="pytest_semantic"
    )
    return dict(zip(("train", "val"), names))


def _cfg(config, dataset, output_dir="", **overrides):
    """A tiny config on ``dataset``; ``overrides`` with "__" for "." in the key names."""
    opts = {"DATASETS.TEST": f"('{dataset}',)", "OUTPUT_DIR": output_dir, **SMALL_INPUT}
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, CONFIGS.get(config, config), _opts(opts))
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _inputs(cfg):
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])]


@pytest.mark.parametrize("kind", ["fpn", "deeplab"])
def test_dense_logits_are_the_models_own_eval_logits(kind, sem_names):
    cfg = _cfg(kind, sem_names["val"])
    model = _model(cfg)
    assert type(model.sem_seg_head).__name__ == HEADS[kind]
    adapter = build_adapter(cfg, model)
    assert isinstance(adapter, SemanticSegmentorAdapter) and adapter.task == "sem_seg"
    xs = _inputs(cfg)
    assert all("sem_seg" in x for x in xs)  # detectron2's test-mode DatasetMapper keeps it
    a, b = (x["image"].float() for x in xs)
    odd = a[:, 3:30, 2:53].clone()  # not a multiple of the stride: padded, then cropped
    model.train()  # dense_logits runs in eval mode (DeepLab's ASPP dropout would differ)
    logits = adapter.dense_logits([a, odd, b])
    assert model.training
    model.eval()
    with torch.no_grad():
        pair = model([{"image": a}, {"image": b}])  # no height/width: cropped, not resized
        alone = model([{"image": odd}])[0]["sem_seg"]
    assert logits[1].shape == (19, 27, 51)
    for mine, ref in zip(logits, (pair[0]["sem_seg"], alone, pair[1]["sem_seg"])):
        torch.testing.assert_close(mine.detach(), ref, rtol=1e-5, atol=1e-5)
    # the logits keep the graph to the image
    image = odd.clone().requires_grad_()
    adapter.dense_logits([image])[0].logsumexp(0).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # inference: the model's output at the input's height x width, in the data set's classes
    with torch.no_grad():
        out = adapter.inference([dict(xs[0], height=80, width=160)])[0]["sem_seg"]
    assert out.shape == (19, 80, 160)


@pytest.mark.parametrize("kind", ["fpn", "deeplab"])
def test_losses_are_the_heads_cross_entropy_with_frozen_norm(kind, sem_names):
    # plain cross-entropy, no dropout: the training loss is the CE of the eval logits
    cfg = _cfg(
        kind,
        sem_names["val"],
        MODEL__SEM_SEG_HEAD__LOSS_TYPE="cross_entropy",
        MODEL__SEM_SEG_HEAD__ASPP_DROPOUT=0.0,
    )
    model = _model(cfg)
    adapter = build_adapter(cfg, model)
    x = _inputs(cfg)[0]
    image = x["image"].float().requires_grad_()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    (losses,) = adapter.losses([dict(x, image=image)], [3])
    assert set(losses) == {"loss_sem_seg"} and not model.training
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    with torch.no_grad():
        logits = adapter.dense_logits([x["image"].float()])[0].double()
    ref = F.cross_entropy(logits[None], x["sem_seg"][None], ignore_index=255)
    assert abs(float(losses["loss_sem_seg"]) - float(ref)) < 1e-4 * max(1.0, float(ref))
    losses["loss_sem_seg"].backward()
    assert image.grad.abs().sum() > 0
    # semantic_ce through the adapter: the same value
    value = build_objective("semantic_ce", adapter, [x])(x["image"].float()[None])
    assert abs(float(value) - float(ref)) < 1e-4 * max(1.0, float(ref))
    no_gt = {k: v for k, v in x.items() if k != "sem_seg"}
    with pytest.raises(MissingGroundTruthError, match="sem_seg"):
        build_objective("train_losses", adapter, [no_gt])


def test_deeplab_training_losses_are_seeded_per_image(sem_names):
    """DeepLab's ASPP dropout and hard-pixel mining: the seed decides, the caller's RNG is kept."""
    cfg = _cfg("deeplab", sem_names["val"])
    adapter = build_adapter(cfg, _model(cfg))
    x = _inputs(cfg)[0]
    state = torch.get_rng_state()
    one, again, other = (adapter.losses([x], [s])[0]["loss_sem_seg"] for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(one, again) and not torch.equal(one, other)


def test_class_count_checked_and_ignore_label_mapped(sem_names):
    cfg = _cfg("fpn", sem_names["val"], MODEL__SEM_SEG_HEAD__NUM_CLASSES=7)
    with pytest.raises(ValueError, match=r"7 classes.*MODEL.SEM_SEG_HEAD.NUM_CLASSES.*19"):
        build_adapter(cfg, _model(cfg))
    # a data set whose ignore label is not the objectives' 255
    meta = SimpleNamespace(name="other", ignore_label=19, stuff_classes=[str(i) for i in range(7)])
    adapter = SemanticSegmentorAdapter(_model(cfg), meta)
    target = torch.tensor([[0, 19, 6], [19, 3, 255]])
    assert adapter.dense_targets({"sem_seg": target}).tolist() == [[0, 255, 6], [255, 3, 255]]


def _miou_reference(cfg, model):
    """mIoU, pixel accuracy in float64 from the model's clean predictions and the labelTrainIds
    PNGs: IoU per class with ground-truth pixels, ignore (255) pixels left out."""
    conf = np.zeros((19, 19), dtype=np.float64)  # [gt, pred]
    for x, d in zip(_inputs(cfg), DatasetCatalog.get(cfg.DATASETS.TEST[0])):
        with torch.no_grad():
            pred = model([x])[0]["sem_seg"].argmax(0).numpy()
        gt = np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    tp, gt_count, pred_count = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt_count > 0
    iou = tp[present] / (gt_count + pred_count - tp)[present]
    return 100 * iou.mean(), 100 * tp.sum() / conf.sum()


SWEEPS = {
    # one sweep per model: every attack that applies, under the objectives that apply
    "fpn": ("semantic_ce", ["fgsm", "ifgsm", "pgd", "segpgd", "cospgd", "illc"]),
    "deeplab": ("train_losses", ["pgd", "illc"]),
}


@pytest.mark.parametrize("kind", ["fpn", "deeplab"])
def test_sweep_cells_scored_with_miou_and_resumed(kind, sem_names, tmp_path):
    objective, attacks = SWEEPS[kind]
    cfg = _cfg(
        kind,
        sem_names["val"],
        tmp_path,
        ROBUSTNESS__ATTACKS=attacks,
        ROBUSTNESS__EPSILONS=[2.0],
        ROBUSTNESS__NUM_STEPS=2,
        ROBUSTNESS__OBJECTIVE=objective,
        ROBUSTNESS__DEFENSES=["none"],
    )
    model = _model(cfg)
    cells = RobustnessSweep(cfg, model, "", str(tmp_path)).run()
    assert [c["attack"] for c in cells] == ["clean"] + attacks
    for c in cells:
        assert (c["model"], c["task"], c["metric"]) == ("SemanticSegmentor", "sem_seg", "mIoU")
        assert c["num_images"] == 2 and c["num_failed"] == 0
        assert all(isinstance(c[k], float) and 0 <= c[k] <= 100 for k in SEM_METRICS), c
        used = {"clean": None, "illc": "least_likely"}.get(c["attack"], objective)
        assert c["objective"] == used
    assert next(c for c in cells if c["attack"] == "pgd")["num_steps"] == 2
    miou, pacc = _miou_reference(cfg, model)
    assert abs(cells[0]["mIoU"] - miou) < 1e-6 and abs(cells[0]["pACC"] - pacc) < 1e-6

    # A second run recomputes nothing; lost images are recomputed, and only they.
    (lost,) = glob.glob(os.path.join(tmp_path, "robustness_cache", "*", f"{attacks[0]}_*"))
    calls = []

    def forget(n):
        os.remove(os.path.join(lost, "cells.json"))
        for path in sorted(glob.glob(os.path.join(lost, "*.pt")))[:n]:
            os.remove(path)
        calls.clear()
        return RobustnessSweep(cfg, model, "", str(tmp_path)).run()

    handle = model.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = RobustnessSweep(cfg, model, "", str(tmp_path)).run()
        assert calls == [] and again == cells
        forget(2)
        both = len(calls)
        resumed = forget(1)
        one = len(calls)
    finally:
        handle.remove()
    assert both == 2 * one > 0
    assert not model.training
    assert [{k: c[k] for k in SEM_METRICS} for c in resumed] == [
        {k: c[k] for k in SEM_METRICS} for c in cells
    ]


def _never_loaded_semantic_split(name="pytest_semantic_never_loaded"):
    def load():
        raise AssertionError("the data set was loaded before the set-up checks")

    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, load)
        meta = get_cityscapes_semantic_metadata()
        MetadataCatalog.get(name).set(evaluator_type="sem_seg", ignore_label=255, **meta)
    return name


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "segpgd"])
def test_panoptic_objective_rejected_at_set_up(attack, tmp_path):
    cfg = _cfg(
        "fpn",
        _never_loaded_semantic_split(),
        tmp_path,
        ROBUSTNESS__ATTACKS=[attack],
        ROBUSTNESS__OBJECTIVE="panoptic",
    )
    with pytest.raises(UnsupportedModelError) as e:
        RobustnessSweep(cfg, _model(cfg), "", str(tmp_path))
    message = str(e.value)
    for part in ("SemanticSegmentor", f"'{attack}'", "'panoptic'", "panoptic logits"):
        assert part in message, message
    instead = message.split("Set ROBUSTNESS.OBJECTIVE to one of")[1]
    assert "semantic_ce" in instead and "panoptic" not in instead
    # a dense attack is offered the untargeted dense objectives only
    assert ("train_losses" in instead) == (attack != "segpgd")


def test_dense_attack_with_non_dense_objective_rejected(tmp_path):
    cfg = _cfg(
        "deeplab",
        _never_loaded_semantic_split(),
        tmp_path,
        ROBUSTNESS__ATTACKS=["cospgd"],
        ROBUSTNESS__OBJECTIVE="train_losses",
    )
    with pytest.raises(UnsupportedModelError, match=r"'cospgd'.*'train_losses'.*semantic_ce"):
        RobustnessSweep(cfg, _model(cfg), "", str(tmp_path))


def test_semantic_segmentor_adapter_is_registered():
    assert adapter_class("SemanticSegmentor") is SemanticSegmentorAdapter


def test_model_zoo_semantic_fpn_config_runs_a_sweep(sem_names, tmp_path):
    """detectron2's own Semantic FPN R-50 YAML, untouched, with command-line overrides only."""
    opts = {
        "MODEL.WEIGHTS": "",
        "MODEL.DEVICE": "cpu",
        "DATASETS.TEST": f"('{sem_names['val']}',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,  # COCO stuff's 54 in the file
        **SMALL_INPUT,
        "ROBUSTNESS.MAX_IMAGES": 1,
        "ROBUSTNESS.ATTACKS": ["fgsm"],
        "ROBUSTNESS.EPSILONS": [4.0],
        "ROBUSTNESS.DEFENSES": ["none"],
        "ROBUSTNESS.INCLUDE_CLEAN": False,
    }
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, model_zoo.get_config_file("Misc/semantic_R_50_FPN_1x.yaml"), _opts(opts))
    (cell,) = RobustnessSweep(cfg, _model(cfg), "", str(tmp_path)).run()
    assert (cell["task"], cell["attack"], cell["eps"]) == ("sem_seg", "fgsm", 4.0)
    assert cell["num_images"] == 1 and all(isinstance(cell[k], float) for k in SEM_METRICS)


def _attack_net(args, env, cwd):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "attack_net.py")] + args
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_one_vs_two_processes_equal(synthetic_cityscapes_root, tmp_path):
    """tools/attack_net.py on the semantic FPN config: 1 and 2 processes (gloo on CPU) give the
    same cells and the same per-image label maps."""
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=os.path.dirname(synthetic_cityscapes_root),
        OMP_NUM_THREADS="1",
    )
    weights = str(tmp_path / "model.pth")  # one untrained model for every rank and run
    model = _model(_cfg("fpn", "synthetic_cityscapes_fine_sem_seg_val"))
    torch.save({"model": model.state_dict()}, weights)
    opts = {
        "MODEL.WEIGHTS": weights,
        **SMALL_INPUT,
        "ROBUSTNESS.ATTACKS": ["segpgd"],
        "ROBUSTNESS.EPSILONS": [2.0],
        "ROBUSTNESS.NUM_STEPS": 2,
        "ROBUSTNESS.DEFENSES": ["none"],
        "ROBUSTNESS.NUM_EXAMPLES": 0,
    }
    outs = []
    for n in (1, 2):
        out = str(tmp_path / f"n{n}")
        args = ["--config-file", CONFIGS["fpn"], "--num-gpus", str(n), "--dist-url", "auto"]
        _attack_net(args + _opts(opts) + ["OUTPUT_DIR", out], env, tmp_path)
        outs.append(out)
    keys = ("attack", "eps", "defense", "objective", "num_images", "num_failed", *SEM_METRICS)
    cells = []
    for out in outs:
        with open(os.path.join(out, "robustness.json")) as f:
            cells.append([{k: c[k] for k in keys} for c in json.load(f)["cells"]])
    assert cells[0] == cells[1] and len(cells[0]) == 2 and cells[0][0]["num_images"] == 2
    files = [sorted(glob.glob(os.path.join(o, "robustness_cache", "*", "*", "*.pt"))) for o in outs]
    assert len(files[0]) == len(files[1]) == 2 * 2
    for a, b in zip(*files):
        ea, eb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert torch.equal(ea["outputs"]["none"]["sem_seg"], eb["outputs"]["none"]["sem_seg"])
