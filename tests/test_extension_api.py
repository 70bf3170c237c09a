# Copyright (c) UPSNetRobust authors.
"""Extending the project through its public registration API only: the toy model adapter,
attack, objective, BPDA surrogate, defense and threat kind of ``tests/extension_toys.py`` (each declared once,
beside its class) run together in a small sweep (2 tiny val images), checked here against
float64 recomputations. The sweep runs in a fresh process, so that the toys' registrations do
not leak into the other tests' registries and configs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import REPO_ROOT
from detectron2.data import DatasetCatalog, DatasetMapper
from torch import nn

from upsnet_robust.attacks import register_attack
from upsnet_robust.attacks.objectives import image_seed
from upsnet_robust.data import register_synthetic_cityscapes_semantic
from upsnet_robust.defenses import (
    DefenseTransform,
    build_defense,
    register_defense,
    registered_defense_names,
)
from upsnet_robust.defenses.surrogates import register_surrogate, resolve_surrogates
from upsnet_robust.engine import get_upsnet_cfg

TOYS = os.path.join(REPO_ROOT, "tests", "extension_toys.py")
NUM_CLASSES = 19
EPS, SEED, LOW, HIGH, GAMMA = 8.0, 5, 60.0, 240.0, 0.5  # as in extension_toys.py


# ------------------------------------------------------------------------------ references
def _logits64(weight, bias, image):
    """The toy model's logits recomputed in float64: per pixel W x / 255 + b."""
    w, b = weight.double()[:, :, 0, 0], bias.double()
    return torch.einsum("kc,chw->khw", w, image.double() / 255.0) + b[:, None, None]


def _margin64(logits, target):
    """Mean over labelled pixels of max_{k != y} z_k - z_y, in float64."""
    valid = target != 255
    y = target.clamp(max=NUM_CLASSES - 1)
    z_y = logits.gather(0, y[None])[0]
    others = logits.clone()
    others.scatter_(0, y[None], float("-inf"))
    return (others.max(0).values - z_y)[valid].mean()


def _best_random_sign(res, x, defend=lambda z: z):
    """The toy attack's choice by hand: the image's own generator, float64 values."""
    clean = x["image"].float()
    g = torch.Generator().manual_seed(image_seed(SEED, x["image_id"]))  # as the hook seeds it
    candidates = []
    for _ in range(res["num_draws"]):
        signs = torch.randint(0, 2, clean.shape, generator=g)
        candidates.append((clean + EPS * (2.0 * signs - 1.0)).clamp(0, 255))
    values = [
        float(_margin64(_logits64(res["weight"], res["bias"], defend(c)), x["sem_seg"]))
        for c in candidates
    ]
    return candidates[int(np.argmax(values))]


def _fgsm_through_clamp(res, x):
    """Adaptive FGSM by hand: the margin's float64 gradient at the clamped image, through the
    clamp's exact Jacobian (the toy surrogate), one signed step."""
    clean = x["image"].double()
    z = clean.clamp(LOW, HIGH).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        _margin64(_logits64(res["weight"], res["bias"], z), x["sem_seg"]), z
    )
    grad = grad * ((clean >= LOW) & (clean <= HIGH))
    return (clean + EPS * grad.sign()).clamp(0, 255).float(), grad


def _miou(res, inputs, dicts, defend=lambda z: z):
    """mIoU (float64 confusion) of the toy model's predictions vs the labelTrainIds PNGs."""
    conv = nn.Conv2d(3, NUM_CLASSES, 1)
    with torch.no_grad():
        conv.weight.copy_(res["weight"])
        conv.bias.copy_(res["bias"])
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for x, d in zip(inputs, dicts):
        with torch.no_grad():
            pred = conv(defend(x["image"].float())[None] / 255.0)[0].argmax(0).numpy()
        gt = np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    tp, present = np.diag(conf), conf.sum(1) > 0
    return 100 * float(np.mean(tp[present] / (conf.sum(1) + conf.sum(0) - tp)[present]))


def _val_inputs(root):
    _, val = register_synthetic_cityscapes_semantic(root, "pytest_extension")
    cfg = get_upsnet_cfg()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"])
    dicts = DatasetCatalog.get(val)
    return [DatasetMapper(cfg, is_train=False)(d) for d in dicts], dicts


# ------------------------------------------------------------------------------ tests
def test_toy_extensions_run_in_a_sweep(synthetic_cityscapes_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, TOYS, synthetic_cityscapes_root, str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = torch.load(tmp_path / "extension.pt", weights_only=True)
    assert "toy_clamp" not in registered_defense_names()  # stayed in the sweep's process

    # the defense's node, generated from its class's keyword defaults, read back by the sweep
    assert res["config_node"] == {"LOW": LOW, "HIGH": HIGH}  # LOW set in the config (default 16)
    assert res["defense"] == {"class": "ToyClampDefense", "low": LOW}
    assert res["default_surrogate"] == "toy_clamp"

    cells = res["cells"]
    keys = [(c["attack"], c["defense"], c["adaptive"]) for c in cells]
    assert keys == [
        ("clean", "none", False), ("clean", "toy_clamp", False),
        ("random_sign", "none", False), ("random_sign", "toy_clamp", False),
        ("fgsm", "none", False), ("fgsm", "toy_clamp", False),
        ("random_sign", "toy_clamp", True), ("fgsm", "toy_clamp", True),
        ("gamma", "none", False), ("gamma", "toy_clamp", False),
    ]  # fmt: skip
    for c in cells:
        assert (c["model"], c["metric"], c["num_images"], c["num_failed"]) == (
            "ToyPixelClassifier", "mIoU", 2, 0)  # fmt: skip
        toy_kind = c["threat"]["kind"] == "gamma"
        assert c["objective"] == (None if c["attack"] == "clean" or toy_kind else "toy_margin")
    assert cells[-3]["surrogate"] == f"toy_clamp(low={LOW:g},high={HIGH:g})"
    # the toy threat kind: its own config key, its param in every cell, its images scored by
    # every defense (float64 mIoU of the gamma-curved images), its sentence in the report
    gamma = [c for c in cells if c["threat"]["kind"] == "gamma"]
    assert [c["gamma"] for c in gamma] == [GAMMA, GAMMA] and not gamma[0]["threat"]["iterative"]

    inputs, dicts = _val_inputs(synthetic_cityscapes_root)
    clean_miou = _miou(res, inputs, dicts)
    clamped_miou = _miou(res, inputs, dicts, lambda z: z.clamp(LOW, HIGH))
    assert cells[0]["mIoU"] == pytest.approx(clean_miou, abs=1e-9)
    assert cells[1]["mIoU"] == pytest.approx(clamped_miou, abs=1e-9)

    def curve(z):
        return (255.0 * (z.double() / 255.0) ** GAMMA).float()

    assert gamma[0]["mIoU"] != pytest.approx(clean_miou, abs=1e-3)  # not vacuous
    assert gamma[0]["mIoU"] == pytest.approx(_miou(res, inputs, dicts, curve), abs=1e-4)
    clamped_curve = _miou(res, inputs, dicts, lambda z: curve(z).clamp(LOW, HIGH))
    assert gamma[1]["mIoU"] == pytest.approx(clamped_curve, abs=1e-4)
    report = res["report"]
    assert "gamma cells score the test images under a fixed gamma curve" in report
    assert "## Attack: gamma" in report

    adv = {tuple(k.split("|")): v for k, v in res["examples"].items()}
    for x in inputs:
        clean, image_id = x["image"].float(), x["image_id"]
        # the toy attack with the toy objective, each image with its own seed
        assert torch.equal(adv[("random_sign", image_id)], _best_random_sign(res, x))
        assert torch.allclose(adv[("gamma", image_id)], curve(clean), atol=1e-3)
        # adaptive: the same draws, scored through the defense
        through = _best_random_sign(res, x, lambda z: z.clamp(LOW, HIGH))
        assert torch.equal(adv[("random_sign-adaptive-toy_clamp", image_id)], through)
        # adaptive FGSM differentiates through the defense's declared surrogate: pixels the
        # clamp clips get a zero gradient and stay put; the defense-unaware FGSM moves them
        adaptive = adv[("fgsm-adaptive-toy_clamp", image_id)]
        expected, grad = _fgsm_through_clamp(res, x)
        clipped = (clean < LOW) | (clean > HIGH)
        assert clipped.float().mean() > 0.05  # not vacuous
        assert torch.equal(adaptive[clipped], clean[clipped])
        # (measured 0.84: unlabelled pixels have no gradient, dark ones cannot go below 0)
        assert (adv[("fgsm", image_id)][clipped] != clean[clipped]).float().mean() > 0.5
        moved = grad.abs() > 1e-6 * grad.abs().max()
        assert (adaptive[moved] == expected[moved]).float().mean() > 0.999


def test_registration_declares_everything_or_fails_clearly():
    with pytest.raises(TypeError, match="surrogate"):
        register_defense("toy_without_surrogate")
    with pytest.raises(TypeError, match=r"\['strength'\] need defaults.*TOY_NO_DEFAULT"):

        @register_defense("toy_no_default", surrogate="identity")
        class NoDefault(DefenseTransform):
            def __init__(self, strength):
                super().__init__()

    class Clamp(DefenseTransform):
        def __init__(self, low=0.0):
            super().__init__()

    with pytest.raises(ValueError, match="NLMEANS belongs to 'nlmeans'"):
        register_defense("toy_clamp_again", surrogate="identity", config_node="NLMEANS")(Clamp)
    with pytest.raises(ValueError, match="lower case"):
        register_defense("Toy", surrogate="identity")
    with pytest.raises(TypeError, match="Attack"):
        register_attack("not_an_attack")(object)
    with pytest.raises(TypeError, match="Surrogate"):
        register_surrogate("not_a_surrogate")(object)
    assert not {"toy_no_default", "toy_clamp_again"} & set(registered_defense_names())

    class Unregistered(DefenseTransform):
        def apply_image(self, img):
            return img

    # no silent identity: a defense without a declared surrogate must be given one
    with pytest.raises(ValueError, match="declares no default BPDA surrogate"):
        resolve_surrogates(Unregistered())
    assert [s.name for _, s in resolve_surrogates(Unregistered(), "identity")] == ["identity"]
    assert [s.name for _, s in resolve_surrogates(build_defense("median"))] == ["soft_median"]
