# Copyright (c) UPSNetRobust authors.
"""The fast paths of the performance issue give the same answers as the plain paths: batched
objectives and attacks (padded batches, per-image eps-balls), defense worker processes, the
torch NL-means batch path, mixed precision and channels-last."""
import os
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_panoptic_input, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from upsnet_robust.attacks import FGSM, IFGSM, PGD
from upsnet_robust.attacks.objectives import (
    OBJECTIVE_REGISTRY,
    AutocastObjective,
    build_objective,
    frozen_norm_training_mode,
)
from upsnet_robust.data import build_panoptic_mapper
from upsnet_robust.defenses import apply_defense_to_tensor, build_defense
from upsnet_robust.defenses.workers import DefenseWorkers
from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import FAILED_KEY, AdversarialInference
from upsnet_robust.evaluation.adversarial_inference import pad_stack
from upsnet_robust.evaluation.sweep import amp_dtype

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
OBJECTIVES = ("train_losses", "semantic_ce", "panoptic", "least_likely", "pseudo_label")


@pytest.fixture(scope="module")
def model():
    """The shipped trained tiny model (real detections; the margins below were measured on it)."""
    cfg = tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "20")
    net = build_model(cfg)
    build_checkpointer(cfg, net).load(SHIPPED)
    return net.eval()


@pytest.fixture(scope="module")
def val_inputs(synthetic_cityscapes_names):
    cfg = tiny_cfg()
    mapper = build_panoptic_mapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(synthetic_cityscapes_names["val"])[:2]]


def _batch(inputs):
    return torch.stack([x["image"].float() for x in inputs])


# ----------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("name", OBJECTIVES)
def test_batched_objective_equals_image_by_image(model, val_inputs, name):
    x = _batch(val_inputs)
    plain = build_objective(name, model, val_inputs, seed=5)
    batched = build_objective(name, model, val_inputs, seed=5, batched=True)
    v_plain, v_batched = plain(x), batched(x)
    assert v_batched.shape == (2,)
    # Same iterate, other summation order. Measured on 40 val images x {1, 2} threads: relative
    # value difference <= 7.7e-7 for every objective (train_losses and panoptic included: no
    # top-k/NMS decision flipped); margin rtol 1e-4.
    torch.testing.assert_close(v_batched, v_plain, rtol=1e-4, atol=1e-5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(plain(xa).sum(), xa)
    (gb,) = torch.autograd.grad(batched(xb).sum(), xb)
    # The sign step is what the attacks use: it agrees wherever the gradient is not ~0. ReLUs,
    # max-pooling and ROIAlign's bilinear sampling make the gradient piecewise, so a few pixels
    # can still flip: measured on 20 val images, at most 6 of 73836 such pixels (8e-5); margin
    # 1e-3.
    big = ga.abs() > 1e-3 * ga.abs().max()
    assert (torch.sign(ga)[big] == torch.sign(gb)[big]).float().mean() > 0.999
    assert not model.training


def test_per_image_losses_match_forward_and_restore_rng(model, val_inputs):
    seeds = [11, 12]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with frozen_norm_training_mode(model):
        from detectron2.utils.events import EventStorage

        with EventStorage():
            batched = model.per_image_losses(val_inputs, seeds)
            assert torch.equal(torch.rand(3), expected_next)  # caller's RNG state untouched
            singles = []
            for x, s in zip(val_inputs, seeds):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    singles.append(model([x]))
    for b, s in zip(batched, singles):
        assert b.keys() == s.keys()
        for k in s:
            # measured on 20 val images: every loss within 1.5e-6 relative, 2.4e-7 absolute
            torch.testing.assert_close(b[k], s[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="seeds"):
        with frozen_norm_training_mode(model):
            model.per_image_losses(val_inputs, [1])


def test_padded_batch_objective_crops_each_image(model):
    # image ids: each image's seed (RPN/ROI sampling of train_losses) derives from its id, not
    # from its position in the batch
    small = dict(make_panoptic_input(64, 96, seed=1), image_id="a")
    large = dict(make_panoptic_input(96, 128, seed=2), image_id="b")
    batch = pad_stack([small["image"].float(), large["image"].float()])
    assert batch.shape == (2, 3, 96, 128) and batch[0, :, 64:].abs().sum() == 0
    for name in ("semantic_ce", "train_losses"):
        objective = build_objective(name, model, [small, large], seed=1, batched=True)
        xb = batch.clone().requires_grad_()
        value = objective(xb)
        (grad,) = torch.autograd.grad(value.sum(), xb)
        assert torch.isfinite(value).all()
        assert grad[0, :, 64:].abs().sum() == 0 and grad[0, :, :, 96:].abs().sum() == 0  # padding
        assert grad[0, :, :64, :96].abs().sum() > 0
        # the larger image has no padding: its value equals its own image-by-image value
        # (measured over 10 input seeds x {1, 2} threads: relative difference <= 1.4e-7)
        alone = build_objective(name, model, [large], seed=1)(large["image"].float()[None])
        torch.testing.assert_close(value[1], alone[0], rtol=1e-4, atol=1e-5)


def test_autocast_objective_returns_float32_close_to_full_precision(model, val_inputs):
    x = _batch(val_inputs)
    plain = build_objective("semantic_ce", model, val_inputs, batched=True)
    amp = AutocastObjective(plain, "cpu", torch.bfloat16)
    value, reference = amp(x), plain(x)
    assert value.dtype == torch.float32
    # bfloat16 keeps 8 mantissa bits: measured on 20 val images, the semantic CE differs from
    # float32 by 0.02-0.25 % (relative), the logits by <= 0.86 % of their largest magnitude.
    rel = (value - reference).abs() / reference.abs()
    assert rel.max() < 1e-2  # margin 4x over the measured 0.25 %
    assert rel.max() > 1e-5  # bfloat16 really ran (float32 alone gives the same value)
    logits, targets = amp.logits_and_targets(x)
    assert logits.dtype == torch.float32 and targets.shape == (2,) + x.shape[-2:]
    ref_logits, ref_targets = plain.logits_and_targets(x)
    assert torch.equal(targets, ref_targets)
    assert (logits - ref_logits).abs().max() < 0.03 * ref_logits.abs().max()  # margin 3.5x
    assert not hasattr(AutocastObjective(build_objective("train_losses", model, val_inputs), "cpu", torch.bfloat16), "logits_and_targets")
    assert amp_dtype("") is None and amp_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="ROBUSTNESS.AMP"):
        amp_dtype("fp8")


# ----------------------------------------------------------------------------- the hook
def _run_hook(model, inputs, **kwargs):
    seen = {}

    def on_image(x, clean, adv, defended, outputs):
        seen[x["image_id"]] = (clean, adv, defended)

    wrapper = AdversarialInference(model, on_image=on_image, **kwargs)
    with torch.no_grad():  # like inference_on_dataset
        outputs = wrapper(inputs)
    return wrapper, outputs, seen


@pytest.mark.parametrize("objective", ["semantic_ce", "panoptic", "train_losses"])
def test_batched_hook_takes_the_image_by_image_step(model, val_inputs, objective):
    """One FGSM step from the clean image (the same iterate for both batch sizes): the batched
    hook moves every pixel whose gradient is not ~0 exactly as the image-by-image gradient says.
    (Longer trajectories are not compared pixel by pixel: once a near-zero gradient's sign
    flips with the summation order, the iterates differ and so do later steps.)"""
    eps = 4.0
    common = dict(objective=objective, defenses=OrderedDict(none=None), seed=3)
    _, _, seen1 = _run_hook(model, val_inputs, attack=FGSM(eps), batch_size=1, **common)
    wrapper, _, seen2 = _run_hook(model, val_inputs, attack=FGSM(eps), batch_size=2, **common)
    assert [r["attack_batch_size"] for r in wrapper.records] == [2, 2]
    for x in val_inputs:
        clean = x["image"].float()
        xs = clean[None].clone().requires_grad_()
        (grad,) = torch.autograd.grad(build_objective(objective, model, [x], seed=3)(xs).sum(), xs)
        grad = grad[0]
        expected = (clean + eps * grad.sign()).clamp(0, 255)
        big = grad.abs() > 1e-3 * grad.abs().max()
        assert big.float().mean() > 0.3  # not a vacuous check: measured >= 0.47 on 20 images
        for seen in (seen1, seen2):
            adv = seen[x["image_id"]][1]
            assert (adv - clean).abs().max() <= eps + 1e-4 and adv.min() >= 0 and adv.max() <= 255
            # measured on 20 val images: at most 2 of ~9e4 such pixels differ (see above)
            assert (adv[big] == expected[big]).float().mean() > 0.999


@pytest.mark.parametrize("batch_size", [1, 2])
def test_records_carry_each_images_objective_at_its_adversarial_image(model, val_inputs,
                                                                     batch_size):
    """The hook records, per image, the objective's value at the image the attack returned
    (what the report's loss_rises_with_eps check reads): recomputed here image by image; an
    early-stopping attack (its returned point is not its highest loss) records none."""
    common = dict(objective="semantic_ce", defenses=OrderedDict(none=None), seed=3)
    wrapper, _, seen = _run_hook(model, val_inputs, attack=IFGSM(4.0), batch_size=batch_size,
                                 **common)  # fmt: skip
    losses = {r["image_id"]: r["attack_loss"] for r in wrapper.records}
    for x in val_inputs:
        adv = seen[x["image_id"]][1]
        with torch.no_grad():
            clean_value = build_objective("semantic_ce", model, [x], seed=3)(x["image"].float()[None])
            value = build_objective("semantic_ce", model, [x], seed=3)(adv[None])
        assert losses[x["image_id"]] == pytest.approx(float(value), rel=1e-4)
        assert losses[x["image_id"]] > float(clean_value)  # the attack climbed
    early = IFGSM(4.0)
    early.early_stop = True
    wrapper, _, _ = _run_hook(model, val_inputs, attack=early, batch_size=batch_size, **common)
    assert all("attack_loss" not in r for r in wrapper.records)


@pytest.mark.parametrize("objective", ["semantic_ce", "panoptic"])
def test_batched_ifgsm_reaches_the_image_by_image_objective(model, val_inputs, objective):
    """I-FGSM (eps 4, 5 steps) at batch size 2 stays in each image's eps-ball and raises each
    image's own objective as much as the image-by-image attack does."""
    eps = 4.0
    common = dict(objective=objective, defenses=OrderedDict(none=None), seed=3)
    _, _, seen1 = _run_hook(model, val_inputs, attack=IFGSM(eps), batch_size=1, **common)
    wrapper, _, seen2 = _run_hook(model, val_inputs, attack=IFGSM(eps), batch_size=2, **common)
    assert [r["attack_batch_size"] for r in wrapper.records] == [2, 2]
    for x in val_inputs:
        clean, a1, a2 = x["image"].float(), seen1[x["image_id"]][1], seen2[x["image_id"]][1]
        assert (a2 - clean).abs().max() <= eps + 1e-4 and a2.min() >= 0 and a2.max() <= 255
        assert (a2 != clean).float().mean() > 0.5  # measured >= 0.9997
        objective_fn = build_objective(objective, model, [x], seed=3)
        with torch.no_grad():
            v_clean, v1, v2 = (float(objective_fn(a[None])) for a in (clean, a1, a2))
        # Measured on 20 val images: the attack raises the objective by at least 46 % of its clean
        # value; batch sizes 1 and 2 end within 3.5e-4 of that gain of each other although up
        # to 22 % of their pixels differ. Margins: gain > 20 %, difference < 1 % of the gain.
        assert v2 > 1.2 * v_clean and v1 > 1.2 * v_clean, (v_clean, v1, v2)
        assert abs(v2 - v1) < 0.01 * (v1 - v_clean), (v_clean, v1, v2)


def test_padded_batch_hook_keeps_sizes_and_eps_balls(model):
    inputs = [
        dict(make_panoptic_input(64, 96, seed=1), image_id="a"),
        dict(make_panoptic_input(96, 128, seed=2), image_id="b"),
    ]
    wrapper, outputs, seen = _run_hook(
        model, inputs, attack=PGD(2.0, num_steps=2, random_start=True), objective="semantic_ce",
        batch_size=2,
    )
    for x, out in zip(inputs, outputs):
        clean, adv, _ = seen[x["image_id"]]
        assert adv.shape == x["image"].shape
        assert out["none"]["panoptic_seg"][0].shape == x["image"].shape[-2:]
        delta = (adv - clean).abs()
        assert delta.max() <= 2.0 + 1e-4 and delta.mean() > 0.5


def _nan_for_image_b():
    name = "pytest_nan_for_b"
    if name not in OBJECTIVE_REGISTRY:

        class NanForB:
            registered_name = name

            def __init__(self, model, batched_inputs, seed=0, batched=False):
                self.bad = torch.tensor([x["image_id"] == "b" for x in batched_inputs])

            def __call__(self, x):
                factor = torch.where(self.bad, float("nan"), 1.0)
                return x.flatten(1).mean(1) * factor

        OBJECTIVE_REGISTRY._do_register(name, NanForB)
    return name


def test_batch_failure_is_isolated_to_its_image(model):
    inputs = [dict(make_panoptic_input(seed=i), image_id=k) for i, k in enumerate("abc")]
    wrapper, outputs, _ = _run_hook(
        model, inputs, attack=IFGSM(2.0), objective=_nan_for_image_b(), batch_size=3
    )
    assert [FAILED_KEY in o for o in outputs] == [False, True, False]
    assert "non-finite gradient" in wrapper.records[1]["failure"]
    assert wrapper.records[0]["failure"] is None and wrapper.records[0]["attack_s"] > 0


def test_defense_workers_give_the_in_process_result(model, val_inputs):
    defenses = OrderedDict(none=None, nlmeans=build_defense("nlmeans", search_window=11), median=build_defense("median"))
    _, out_local, seen_local = _run_hook(model, val_inputs, attack=None, defenses=defenses, batch_size=2)
    with DefenseWorkers(2) as workers:
        assert DefenseWorkers.accepts(defenses["nlmeans"])
        assert not DefenseWorkers.accepts(build_defense("nlmeans", backend="torch"))
        wrapper, out_pool, seen_pool = _run_hook(
            model, val_inputs, attack=None, defenses=defenses, batch_size=2, defense_workers=workers
        )
    for x, o_local, o_pool in zip(val_inputs, out_local, out_pool):
        d_local, d_pool = seen_local[x["image_id"]][2], seen_pool[x["image_id"]][2]
        for name in ("nlmeans", "median"):
            assert torch.equal(d_local[name], d_pool[name]), name
            assert torch.equal(o_local[name]["panoptic_seg"][0], o_pool[name]["panoptic_seg"][0])
        expected = cv2.fastNlMeansDenoisingColored(
            x["image"].permute(1, 2, 0).numpy(), None, 10, 10, 7, 11
        )
        assert np.array_equal(d_pool["nlmeans"].permute(1, 2, 0).to(torch.uint8).numpy(), expected)
    assert all(r["defense_s"]["nlmeans"] > 0 for r in wrapper.records)
    with pytest.raises(ValueError, match="num_workers"):
        DefenseWorkers(0)


def test_torch_nlmeans_batch_path_equals_opencv_per_image():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 40, 56, generator=g) * 255).round()
    transform = build_defense("nlmeans", search_window=11, backend="torch")
    out = apply_defense_to_tensor(transform, images, "BGR")
    assert out.shape == images.shape and out.dtype == images.dtype
    for img, res in zip(images, out):
        hwc = img.permute(1, 2, 0).to(torch.uint8).numpy()
        expected = cv2.fastNlMeansDenoisingColored(hwc, None, 10, 10, 7, 11)
        assert np.array_equal(res.permute(1, 2, 0).to(torch.uint8).numpy(), expected)


def test_channels_last_model_predicts_the_same(val_inputs):
    cfg = tiny_cfg()
    net = build_model(cfg).eval()
    build_checkpointer(cfg, net).load(SHIPPED)
    with torch.no_grad():
        before = net.predict(val_inputs[:1], with_detector_masks=False)[0]["sem_logits"]
        net.to(memory_format=torch.channels_last)
        assert net.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        after = net.predict(val_inputs[:1], with_detector_masks=False)[0]["sem_logits"]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_panoptic_only_inference_gives_the_same_panoptic_result(model, val_inputs):
    common = dict(attack=None, defenses=OrderedDict(none=None), batch_size=2)
    _, full, _ = _run_hook(model, val_inputs, **common)
    _, lean, _ = _run_hook(model, val_inputs, panoptic_only=True, **common)
    things = 0
    for f, l in zip(full, lean):
        f, l = f["none"], l["none"]  # the hook's output: {defense: output}
        assert "instances" in f and set(l) == {"panoptic_seg"}
        things += sum(s["isthing"] for s in f["panoptic_seg"][1])
        assert torch.equal(f["panoptic_seg"][0], l["panoptic_seg"][0])
        assert f["panoptic_seg"][1] == l["panoptic_seg"][1]
    assert things > 0  # the paths differ in the things' branch: it must have been exercised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_amp_channels_last_attack_and_torch_nlmeans(val_inputs):
    cfg = tiny_cfg("MODEL.DEVICE", "cuda")
    net = build_model(cfg).eval()
    build_checkpointer(cfg, net).load(SHIPPED)
    net.to(memory_format=torch.channels_last)
    defenses = OrderedDict(none=None, nlmeans=build_defense("nlmeans", search_window=11, backend="torch"))
    wrapper, outputs, seen = _run_hook(
        net, val_inputs, attack=IFGSM(4.0), objective="train_losses", defenses=defenses,
        batch_size=2, amp_dtype=torch.bfloat16, panoptic_only=True,
    )
    for x in val_inputs:
        clean, adv, defended = seen[x["image_id"]]
        assert adv.is_cuda and (adv - clean).abs().max() <= 4.0 + 1e-3 and (adv != clean).any()
        hwc = adv.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        expected = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(hwc), None, 10, 10, 7, 11)
        assert np.array_equal(defended["nlmeans"].permute(1, 2, 0).to(torch.uint8).cpu().numpy(), expected)
    assert all(r["failure"] is None for r in wrapper.records)
