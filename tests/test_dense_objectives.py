# Copyright (c) UPSNetRobust authors.
"""The dense attack losses (masked CE, class-balanced masked CE, Jensen-Shannon divergence,
masked spherical) against float64 hand computations written pixel by pixel, as objectives on a
toy adapter (every attack, SegPGD/CosPGD through ``logits_and_targets``), and through the
attack hook on the tiny UPSNet with APGD."""

import copy
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, as_adapter, register_adapter
from upsnet_robust.attacks import (
    APGD,
    ATTACK_REGISTRY,
    OBJECTIVE_REGISTRY,
    build_attack,
    build_objective,
)
from upsnet_robust.attacks.dense_objectives import (
    balanced_masked_ce,
    js_divergence,
    masked_ce,
    masked_spherical,
)
from upsnet_robust.attacks.objectives import DenseObjective, MissingGroundTruthError
from upsnet_robust.evaluation.checks import check_attack_objective

IGNORE = 255
NAMES = ("masked_ce", "balanced_masked_ce", "js_divergence", "masked_spherical")
FUNCTIONS = dict(zip(NAMES, (masked_ce, balanced_masked_ce, js_divergence, masked_spherical)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------
# Hand computations: plain loops over pixels, float64
# ------------------------------------------------------------------------------------------
def _pixels(logits, target):
    """(z, y) of every non-ignored pixel."""
    c, h, w = logits.shape
    return [(logits[:, i, j], int(target[i, j])) for i in range(h) for j in range(w)
            if target[i, j] != IGNORE]  # fmt: skip


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_masked_ce(logits, target):
    pixels = _pixels(logits, target)
    total = sum(-math.log(_softmax(z)[y]) for z, y in pixels if int(np.argmax(z)) == y)
    return total / max(1, len(pixels))


def hand_balanced_masked_ce(logits, target):
    pixels = _pixels(logits, target)
    classes = sorted({y for _, y in pixels})
    per_class = []
    for k in classes:
        of_k = [(z, y) for z, y in pixels if y == k]
        ce = sum(-math.log(_softmax(z)[y]) for z, y in of_k if int(np.argmax(z)) == y)
        per_class.append(ce / len(of_k))
    return sum(per_class) / max(1, len(classes))


def hand_js_divergence(logits, target):
    def kl(p, q):  # sum p log(p / q), 0 log 0 = 0
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

    pixels = _pixels(logits, target)
    total = 0.0
    for z, y in pixels:
        p = _softmax(z)
        q = np.eye(len(z))[y]
        m = (p + q) / 2
        total += 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return total / max(1, len(pixels))


def hand_masked_spherical(logits, target):
    pixels = _pixels(logits, target)
    total = sum(-z[y] / math.sqrt(sum(v * v for v in z)) for z, y in pixels
                if int(np.argmax(z)) == y)  # fmt: skip
    return total / max(1, len(pixels))


HAND = dict(zip(NAMES, (hand_masked_ce, hand_balanced_masked_ce, hand_js_divergence,
                        hand_masked_spherical)))  # fmt: skip


def tiny_case(seed, c=4, h=3, w=4, ignore=2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(c, h, w)) * 3
    target = rng.integers(0, c, size=(h, w))
    target[np.unravel_index(rng.choice(h * w, ignore, replace=False), (h, w))] = IGNORE
    # make some pixels correct for sure
    correct = np.argmax(logits, axis=0)
    target[0, :2] = correct[0, :2]
    return logits, target


def _value(name, logits, target):
    return float(FUNCTIONS[name](torch.from_numpy(logits), torch.from_numpy(target)))


# ------------------------------------------------------------------------------------------
# The losses
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_hand_computation(name, seed):
    logits, target = tiny_case(seed)
    correct = (np.argmax(logits, axis=0) == target) & (target != IGNORE)
    assert 0 < correct.sum() < (target != IGNORE).sum()  # a mix of right and wrong pixels
    assert _value(name, logits, target) == pytest.approx(HAND[name](logits, target), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_no_correct_pixel_and_all_ignored(name):
    logits, target = tiny_case(3)
    wrong = (np.argmax(logits, axis=0) + 1) % logits.shape[0]
    target = np.where(target == IGNORE, IGNORE, wrong)
    z = torch.from_numpy(logits).requires_grad_(True)
    value = FUNCTIONS[name](z, torch.from_numpy(target))
    (grad,) = torch.autograd.grad(value, z)
    if name == "js_divergence":  # not masked: every wrong pixel still counts
        assert float(value) == pytest.approx(hand_js_divergence(logits, target), rel=1e-12)
        assert float(value) > 0 and grad.abs().sum() > 0
    else:
        assert float(value) == 0.0 and torch.count_nonzero(grad) == 0
    none = np.full_like(target, IGNORE)
    z = torch.from_numpy(logits).requires_grad_(True)
    value = FUNCTIONS[name](z, torch.from_numpy(none))
    (grad,) = torch.autograd.grad(value, z)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    logits, target = tiny_case(4)
    z = torch.from_numpy(logits).requires_grad_(True)
    t = torch.from_numpy(target)
    # the correctness mask is constant near a point without ties, so the loss is smooth there
    assert torch.autograd.gradcheck(lambda v: FUNCTIONS[name](v, t), (z,), eps=1e-6, atol=1e-7)


def test_balanced_equals_masked_for_equal_class_sizes_and_weights_small_classes():
    logits, _ = tiny_case(5, c=3, h=2, w=3, ignore=0)
    target = np.array([[0, 0, 1], [1, 2, 2]])
    t = torch.from_numpy(target)
    z = torch.from_numpy(logits)
    assert float(balanced_masked_ce(z, t)) == pytest.approx(float(masked_ce(z, t)), rel=1e-12)
    # one pixel of class 2 among five of class 0: both correct; its weight is five times larger
    logits = np.zeros((3, 1, 6))
    logits[0, 0, :5] = [2.0, 2.5, 3.0, 3.5, 4.0]
    logits[2, 0, 5] = 1.0
    target = torch.tensor([[0, 0, 0, 0, 0, 2]])
    z = torch.from_numpy(logits).requires_grad_(True)
    (g,) = torch.autograd.grad(balanced_masked_ce(z, target), z)
    (g_plain,) = torch.autograd.grad(masked_ce(z, target), z)
    ratio = lambda grad: float(grad[:, 0, 5].abs().sum() / grad[:, 0, 0].abs().sum())  # noqa
    assert ratio(g) == pytest.approx(5.0 * ratio(g_plain), rel=1e-12)


def test_js_divergence_is_bounded_and_finite_when_the_softmax_underflows():
    logits = torch.zeros(3, 1, 2, dtype=torch.float32)
    logits[1, 0, 0] = 200.0  # true class 0 has probability exp(-200) = 0 in float32
    logits[0, 0, 1] = 200.0  # correct with probability 1
    z = logits.requires_grad_(True)
    value = js_divergence(z, torch.tensor([[0, 0]]))
    (grad,) = torch.autograd.grad(value, z)
    assert float(value) == pytest.approx(math.log(2.0) / 2, rel=1e-6)  # log 2 and 0, averaged
    assert torch.isfinite(grad).all()


def test_losses_reject_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="logits"):
        masked_ce(torch.zeros(3, 2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        js_divergence(torch.zeros(3, 2, 2), torch.full((2, 2), 7))


# ------------------------------------------------------------------------------------------
# As objectives, on a toy adapter: every attack
# ------------------------------------------------------------------------------------------
class ToyDenseNet(nn.Module):
    """Per-pixel 2-layer network with 3 classes and a 3x3 receptive field."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 1))

    def forward(self, inputs):
        return [{"sem_seg": self.body(x["image"].float()[None] / 255.0 - 0.5)[0]} for x in inputs]


@register_adapter("ToyDenseNet")
class ToyDenseNetAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        batch = torch.stack(images) if len({im.shape for im in images}) == 1 else None
        if batch is not None:
            return list(self.model.body(batch / 255.0 - 0.5))
        return [self.model.body(im[None] / 255.0 - 0.5)[0] for im in images]


def _toy_inputs(model, n=2, h=6, w=7):
    g = torch.Generator().manual_seed(1)
    inputs = []
    for i in range(n):
        image = torch.rand(3, h, w, generator=g) * 255
        with torch.no_grad():
            sem = model.body(image[None] / 255.0 - 0.5)[0].argmax(0)
        flip = torch.rand(h, w, generator=g) < 0.3  # some pixels wrong from the start
        sem[flip] = (sem[flip] + 1) % 3
        sem[0, :2] = IGNORE
        inputs.append({"image": image, "image_id": f"d{i}", "sem_seg": sem})
    return inputs


def hand_cross_entropy(logits, target):
    pixels = _pixels(logits, target)
    return sum(-math.log(_softmax(z)[y]) for z, y in pixels) / max(1, len(pixels))


@pytest.mark.parametrize("name", NAMES)
def test_objective_on_a_toy_adapter(name):
    model = ToyDenseNet()
    inputs = _toy_inputs(model)
    cls = OBJECTIVE_REGISTRY.get(name)
    assert issubclass(cls, DenseObjective) and cls.dense and cls.ground_truth == ("sem_seg",)
    objective = build_objective(name, model, inputs)
    batched = build_objective(name, model, inputs, batched=True)
    x = torch.stack([v["image"] for v in inputs]).requires_grad_(True)
    value = objective(x)
    assert value.shape == (2,)
    torch.testing.assert_close(batched(x), value, rtol=1e-5, atol=1e-6)
    model64 = copy.deepcopy(model).double()
    # value: the loss itself for JS, the plain cross-entropy for the masked losses (the
    # ranking attacks use); gradient: always the loss's
    hand_value = HAND[name] if name == "js_divergence" else hand_cross_entropy
    for i, v in enumerate(inputs):  # float64 recomputation from the model's logits
        with torch.no_grad():
            logits = model64.body(v["image"].double()[None] / 255.0 - 0.5)[0]
        expected = hand_value(logits.numpy(), v["sem_seg"].numpy())
        assert float(value[i]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    loss = sum(FUNCTIONS[name](model.body(x_ref[i : i + 1] / 255.0 - 0.5)[0], v["sem_seg"])
               for i, v in enumerate(inputs))  # fmt: skip
    (grad_ref,) = torch.autograd.grad(loss, x_ref)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6 * float(grad_ref.abs().max()))
    logits, targets = objective.logits_and_targets(x)  # what SegPGD / CosPGD read
    assert logits.shape == (2, 3, 6, 7) and torch.equal(
        targets, torch.stack([v["sem_seg"] for v in inputs])
    )
    with pytest.raises(MissingGroundTruthError, match="sem_seg"):
        build_objective(name, model, [{k: w for k, w in inputs[0].items() if k != "sem_seg"}])


@pytest.mark.parametrize("attack_name", sorted(n for n, _ in ATTACK_REGISTRY if n != "illc"))
def test_every_attack_runs_with_every_dense_loss(attack_name):
    from detectron2.config import get_cfg

    from upsnet_robust.config import add_robustness_config

    cfg = get_cfg()
    add_robustness_config(cfg)
    cfg.ROBUSTNESS.merge_from_list(["NUM_STEPS", 4, "STEP_SIZE", 0.0])
    model = ToyDenseNet()
    adapter = as_adapter(model)
    inputs = _toy_inputs(model)
    x = torch.stack([v["image"] for v in inputs])
    for name in NAMES:
        assert check_attack_objective(adapter, attack_name, name) == name
        objective = build_objective(name, adapter, inputs, batched=True)
        attack = build_attack(cfg, attack_name, 6.0)
        with torch.no_grad():
            adv = attack.perturb(x, objective)
        assert ((adv - x).abs() <= 6.0 + 1e-4).all() and torch.isfinite(adv).all()
        assert (adv >= 0).all() and (adv <= 255).all()
        if attack_name in ("apgd", "pgd", "ifgsm", "bim"):  # ascent on the objective itself
            assert (objective(adv) > objective(x)).all(), name


@pytest.mark.parametrize("name", ["masked_ce", "balanced_masked_ce", "masked_spherical"])
def test_apgd_with_a_masked_loss_lowers_accuracy(name):
    # Ranked by the masked loss's own value, APGD would keep the point just before pixels flip
    # (measured: accuracy 0.687 against 0.686 clean); ranked by the cross-entropy it fools them.
    model = ToyDenseNet()
    inputs = _toy_inputs(model, n=8, h=16, w=16)
    x = torch.stack([v["image"] for v in inputs])
    y = torch.stack([v["sem_seg"] for v in inputs])

    def accuracy(images):
        with torch.no_grad():
            right = (model.body(images / 255.0 - 0.5).argmax(1) == y) & (y != IGNORE)
        return float(right.sum()) / float((y != IGNORE).sum())

    adv = APGD(4.0, num_steps=30).perturb(x, build_objective(name, model, inputs, batched=True))
    assert accuracy(adv) < accuracy(x) - 0.015  # measured: 0.686 -> 0.659-0.661


# ------------------------------------------------------------------------------------------
# Through the attack hook on the tiny UPSNet
# ------------------------------------------------------------------------------------------
SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


@pytest.fixture(scope="module")
def upsnet_and_inputs(synthetic_cityscapes_names):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from upsnet_robust.data import build_panoptic_mapper

    torch.manual_seed(0)
    cfg = tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "20")
    model = build_model(cfg)
    if os.path.isfile(SHIPPED):
        from upsnet_robust.engine import build_checkpointer

        build_checkpointer(cfg, model).load(SHIPPED)
    mapper = build_panoptic_mapper(tiny_cfg(), is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_cityscapes_names["val"])[:2]]
    return model.eval(), inputs


@pytest.mark.parametrize("name", ("semantic_ce",) + NAMES)
def test_apgd_through_the_hook_on_upsnet(upsnet_and_inputs, name):
    from upsnet_robust.evaluation import AdversarialInference

    model, inputs = upsnet_and_inputs
    seen = {}

    def on_image(x, clean, adv, defended, outputs):
        seen[x["image_id"]] = (clean, adv)

    attack = APGD(8.0, num_steps=4)
    wrapper = AdversarialInference(
        model, attack=attack, objective=name, defenses=OrderedDict(none=None), seed=1,
        batch_size=2, on_image=on_image,
    )  # fmt: skip
    with torch.no_grad():  # like inference_on_dataset
        outputs = wrapper(inputs)
    # the hook returns {defense: output} per image
    assert len(outputs) == 2 and all("panoptic_seg" in o["none"] for o in outputs)
    assert attack.num_forward_backward == 4
    objective = build_objective(name, model, inputs)
    clean = torch.stack([seen[x["image_id"]][0] for x in inputs])
    adv = torch.stack([seen[x["image_id"]][1] for x in inputs])
    assert (adv - clean).abs().max() <= 8.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
    before, after = objective(clean), objective(adv)
    assert (after > before).all(), (name, before, after)
