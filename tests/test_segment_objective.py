# Copyright (c) UPSNetRobust authors.
"""The ``segment`` objective: the loss against a float64 hand computation, equal weight per
segment, broken segments dropping out, crowd / void excluded, the panoptic ground truth the
sweep's loader adds, and sweeps with PGD on the tiny UPSNet and PanopticFPN."""
import math
import os

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, build_adapter, register_adapter
from upsnet_robust.attacks import (
    OBJECTIVE_REGISTRY,
    DenseObjective,
    MissingGroundTruthError,
    build_objective,
    segment_loss,
    segment_ratios,
    segments_from_panoptic,
)
from upsnet_robust.data import build_panoptic_mapper
from upsnet_robust.engine import build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import RobustMapper, RobustnessSweep

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_segment_loss(logits, segments, classes):
    """Loops in float64 over numpy arrays: the module docstring's formula, term by term."""
    num_segments = len(classes)
    if num_segments == 0:
        return 0.0
    total = 0.0
    for s, c in enumerate(classes):
        pixels = list(zip(*np.nonzero(segments == s)))
        correct = [(i, j) for i, j in pixels if int(np.argmax(logits[:, i, j])) == c]
        if len(correct) / len(pixels) <= 0.5:
            continue  # broken
        for i, j in correct:
            z = logits[:, i, j]
            top = z.max()
            log_sum = top + math.log(sum(math.exp(v - top) for v in z))
            total += (log_sum - z[c]) / len(pixels)
    return total / num_segments


def _case(seed, c=4, h=6, w=8):
    """Random float64 logits; four segments of different sizes, some pixels in none; each
    segment's class is the argmax of most of its pixels, or of few (broken)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, h, w, generator=g, dtype=torch.float64) * 2
    segments = torch.full((h, w), -1, dtype=torch.long)
    segments[:3, :5] = 0
    segments[3:, :2] = 1
    segments[3:, 2:7] = 2
    segments[0, 7] = 3
    argmax = logits.argmax(0)
    classes = []
    for s in range(4):
        values, counts = argmax[segments == s].unique(return_counts=True)
        majority = int(values[counts.argmax()])
        classes.append(majority if s != 2 else (majority + 1) % c)  # 2: mostly wrong
    return logits, segments, torch.tensor(classes)


@pytest.mark.parametrize("seed", range(4))
def test_loss_matches_hand_computation(seed):
    logits, segments, classes = _case(seed)
    expected = hand_segment_loss(logits.numpy(), segments.numpy(), classes.tolist())
    assert expected > 0
    assert float(segment_loss(logits, segments, classes)) == pytest.approx(expected, rel=1e-12)
    ratios, correct, counts = segment_ratios(logits, segments, classes)
    assert counts.tolist() == [15.0, 6.0, 15.0, 1.0]
    assert float(ratios[3]) == 1.0 and float(ratios[2]) <= 0.5
    assert torch.equal(correct, (logits.argmax(0) == classes[segments.clamp_min(0)]) & (segments >= 0))


def _uniform_case(sizes, num_classes=3, width=30):
    """Every pixel has the same logits (class 0 wins); segment s covers sizes[s] pixels."""
    logits = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64).view(num_classes, 1, 1)
    logits = logits.expand(num_classes, 1, width).clone().requires_grad_(True)
    segments = torch.full((1, width), -1, dtype=torch.long)
    start = 0
    for s, n in enumerate(sizes):
        segments[0, start : start + n] = s
        start += n
    return logits, segments, torch.zeros(len(sizes), dtype=torch.long)


def test_segments_of_very_different_sizes_weigh_the_same():
    logits, segments, classes = _uniform_case([1, 20])
    loss = segment_loss(logits, segments, classes)
    (grad,) = torch.autograd.grad(loss, logits)
    ce = float(torch.log_softmax(logits[:, 0, 0].detach(), 0)[0].neg())
    assert float(loss) == pytest.approx((ce + ce) / 2, rel=1e-12)  # mean over segments of CE
    small = grad[:, 0, segments[0] == 0].abs().sum()
    large = grad[:, 0, segments[0] == 1].abs().sum()
    assert float(small) == pytest.approx(float(large), rel=1e-12)  # not 1 : 20
    assert grad[:, 0, segments[0] == -1].abs().sum() == 0


def test_a_broken_segment_contributes_nothing_and_no_gradient():
    logits, segments, classes = _uniform_case([4, 4, 4])
    with torch.no_grad():
        logits[1, 0, :2] = 5.0  # segment 0: 2 of 4 pixels wrong, r = 0.5: broken
        logits[1, 0, 4] = 5.0  # segment 1: 1 of 4 wrong, r = 0.75: still matched
    loss = segment_loss(logits, segments, classes)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[:, 0, :4].abs().sum() == 0  # its still-correct pixels get nothing either
    assert grad[:, 0, 4].abs().sum() == 0  # a wrong pixel of a matched segment: masked
    assert (grad[:, 0, 5:12].abs().sum(0) > 0).all() and grad[:, 0, 12:].abs().sum() == 0
    ce = float(torch.log_softmax(logits[:, 0, 5].detach(), 0)[0].neg())
    assert float(loss) == pytest.approx((3 / 4 * ce + ce) / 3, rel=1e-12)  # S = 3, not 2
    everything_broken = segment_loss(logits.detach() * 0 + torch.tensor([0.0, 1, 0]).view(3, 1, 1),
                                     segments, classes)  # fmt: skip
    assert float(everything_broken) == 0.0


def test_no_segment_gives_zero_with_zero_gradient_and_bad_input_is_rejected():
    logits = torch.randn(3, 2, 2, requires_grad=True)
    none = torch.full((2, 2), -1, dtype=torch.long)
    loss = segment_loss(logits, none, torch.zeros(0, dtype=torch.long))
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == 0 and grad.abs().sum() == 0
    with pytest.raises(ValueError, match="same size"):
        segment_loss(logits, torch.zeros(3, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        segment_loss(logits, torch.zeros(2, 2, dtype=torch.long), torch.tensor([3]))


# ------------------------------------------------------------------ ground truth, toy adapter
class ToySegNet(nn.Module):
    """Per-pixel 1x1 network with 4 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 4, 1))


@register_adapter("ToySegNet")
class ToySegNetAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        return [self.model.body(im[None] / 255.0 - 0.5)[0] for im in images]


def _toy_input(seed=0, h=6, w=8):
    g = torch.Generator().manual_seed(seed)
    pan = torch.zeros(h, w, dtype=torch.long)  # 0: void (no segment)
    pan[:3, :] = 7  # stuff, class 1
    pan[3:, :3] = 9  # thing, class 2
    pan[3:, 3:5] = 12  # crowd, class 2
    pan[4:, 6:] = 20  # thing, class 3
    info = [
        {"id": 7, "category_id": 1, "iscrowd": 0},
        {"id": 9, "category_id": 2, "iscrowd": 0},
        {"id": 12, "category_id": 2, "iscrowd": 1},
        {"id": 20, "category_id": 3},
        {"id": 33, "category_id": 0, "iscrowd": 0},  # no pixel
    ]
    image = torch.rand(3, h, w, generator=g) * 255
    return {"image": image, "image_id": f"t{seed}", "pan_seg": pan, "segments_info": info}


def test_segments_exclude_crowd_and_void_and_the_objective_follows_the_loss():
    model = ToySegNet()
    x = _toy_input()
    segments, classes, targets = segments_from_panoptic(x, ToySegNetAdapter(model))
    assert classes.tolist() == [1, 2, 3]
    pan = x["pan_seg"]
    for s, seg_id in enumerate((7, 9, 20)):
        assert torch.equal(segments == s, pan == seg_id)
    assert (segments[(pan == 0) | (pan == 12)] == -1).all()  # void and crowd: no segment
    assert torch.equal(targets == IGNORE, segments == -1)
    assert torch.equal(targets[segments >= 0], classes[segments[segments >= 0]])

    cls = OBJECTIVE_REGISTRY.get("segment")
    assert issubclass(cls, DenseObjective) and cls.supports_early_stop
    inputs = [x, _toy_input(1)]
    objective = build_objective("segment", model, inputs)
    batched = build_objective("segment", model, inputs, batched=True)
    images = torch.stack([v["image"] for v in inputs]).requires_grad_(True)
    value = objective(images)
    torch.testing.assert_close(batched(images), value)
    (grad,) = torch.autograd.grad(value.sum(), images)
    ref = images.detach().clone().requires_grad_(True)
    loss = sum(segment_loss(model.body(ref[i : i + 1] / 255.0 - 0.5)[0], segments, classes)
               for i in range(2))  # fmt: skip
    (grad_ref,) = torch.autograd.grad(loss, ref)
    # every segment of the random toy net is already broken, so both are 0 here (plain CE's would
    # not be); the gradient on still-matched segments: test_segment_gradient.py
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
    # the value is the plain cross-entropy against the segments' classes (float64 check)
    with torch.no_grad():
        logits = model.double().body(images.detach().double()[:1] / 255.0 - 0.5)[0]
    valid = targets != IGNORE
    ce = -torch.log_softmax(logits, 0).gather(0, targets.clamp(max=3)[None])[0][valid].mean()
    assert float(value[0]) == pytest.approx(float(ce), rel=1e-4)
    with pytest.raises(MissingGroundTruthError, match="pan_seg.*RobustMapper"):
        build_objective("segment", model, [{"image": x["image"], "sem_seg": targets}])


def test_robust_mapper_adds_the_panoptic_segments_resized_like_the_mapper(
    synthetic_cityscapes_names,
):
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)",
        "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64",  # half size: resized
    )  # fmt: skip
    mapper = build_panoptic_mapper(cfg, is_train=False)
    meta = MetadataCatalog.get(synthetic_cityscapes_names["val"])
    thing_ids = set(meta.thing_dataset_id_to_contiguous_id.values())
    for d in DatasetCatalog.get(synthetic_cityscapes_names["val"]):
        plain = RobustMapper(mapper)(d)
        assert "pan_seg" not in plain
        x = RobustMapper(mapper, panoptic_segments=True)(d)
        assert tuple(x["pan_seg"].shape) == tuple(x["image"].shape[-2:]) == (32, 64)
        info = x["segments_info"]
        things = [s for s in info if s["category_id"] in thing_ids and not s.get("iscrowd", 0)]
        masks = [x["pan_seg"] == s["id"] for s in things]
        masks = torch.stack([m for m in masks if m.any()])
        # the mapper's instances come from its own resize of the panoptic PNG
        assert torch.equal(masks, x["instances"].gt_masks.tensor)


# ------------------------------------------------------------------ sweeps on the tiny models
CONFIGS = {
    name: os.path.join(REPO_ROOT, "configs", "Synthetic", f"{name}_tiny.yaml")
    for name in ("panoptic_fpn", "panoptic_deeplab")
}
# trained weights: a random model labels no segment's majority right, so L is 0 and flat there
SHIPPED = {
    "upsnet": os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth"),
    "panoptic_fpn": os.path.join(REPO_ROOT, "checkpoints", "panoptic_fpn_tiny_synthetic.pth"),
    "panoptic_deeplab": os.path.join(
        REPO_ROOT, "checkpoints", "panoptic_deeplab_tiny_synthetic.pth"
    ),
}


def _sweep_cfg(model_name, names, tmp_path):
    opts = [
        "DATASETS.TRAIN", f"('{names['train']}',)",
        "DATASETS.TEST", f"('{names['val']}',)",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['pgd']", "ROBUSTNESS.EPSILONS", "[4.0]",
        "ROBUSTNESS.OBJECTIVE", "segment", "ROBUSTNESS.DEFENSES", "['none']",
        "ROBUSTNESS.NUM_EXAMPLES", "2", "ROBUSTNESS.NUM_STEPS", "2",
        "ROBUSTNESS.STEP_SIZE", "2.0", "ROBUSTNESS.INCLUDE_CLEAN", "False",
        "TEST.DETECTIONS_PER_IMAGE", "10",
    ]  # fmt: skip
    if model_name == "upsnet":
        return tiny_cfg(*opts)
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, CONFIGS[model_name], opts)
    return cfg


@pytest.mark.parametrize("model_name", ["upsnet", "panoptic_fpn", "panoptic_deeplab"])
def test_pgd_sweep_with_the_segment_objective(model_name, synthetic_cityscapes_names, tmp_path):
    if not os.path.isfile(SHIPPED[model_name]):
        pytest.skip(f"{SHIPPED[model_name]} missing")
    cfg = _sweep_cfg(model_name, synthetic_cityscapes_names, tmp_path)
    model = build_model(cfg).eval()
    build_checkpointer(cfg, model).load(SHIPPED[model_name])
    seen = []

    def on_example(spec, x, clean, adv, defended, outputs):
        seen.append((x, clean, adv))

    (cell,) = RobustnessSweep(cfg, model, SHIPPED[model_name], cfg.OUTPUT_DIR, on_example).run()
    assert cell["objective"] == "segment" and cell["num_images"] == 2, cell
    assert cell["num_failed"] == 0, cell["failures"]
    assert len(seen) == 2
    adapter = build_adapter(cfg, model)
    for x, clean, adv in seen:
        assert "pan_seg" in x and "segments_info" in x  # added by the sweep's loader
        delta = (adv - clean).abs()
        assert delta.max() <= 4.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
        assert (delta > 0).float().mean() > 0.5
        objective = build_objective("segment", adapter, [dict(x, image=clean)])
        with torch.no_grad():
            before, after = objective(clean[None].float()), objective(adv[None].float())
        assert float(after) > float(before), (model_name, before, after)
