# Copyright (c) UPSNetRobust authors.
"""Extending the project through its public registration API only: a toy model adapter, attack,
objective, defense (with its config node and default BPDA surrogate) and surrogate, each
declared once beside its class, run together in a small sweep (2 tiny val images) and checked
against float64 recomputations."""
import numpy as np
import pytest
import torch
from PIL import Image
from detectron2.data import DatasetCatalog, DatasetMapper
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, as_adapter, register_adapter
from upsnet_robust.attacks import Attack, project_linf, register_attack
from upsnet_robust.attacks.objectives import image_seed, register_objective
from upsnet_robust.data import register_synthetic_cityscapes_semantic
from upsnet_robust.defenses import DefenseTransform, build_defense, register_defense
from upsnet_robust.defenses.surrogates import (
    DEFAULT_SURROGATES,
    Surrogate,
    register_surrogate,
    resolve_surrogates,
)
from upsnet_robust.engine import get_upsnet_cfg
from upsnet_robust.evaluation import RobustnessSweep

NUM_CLASSES = 19  # the Cityscapes trainIds of the synthetic semantic split
EPS, SEED, LOW, HIGH = 8.0, 5, 60.0, 240.0


# ------------------------------------------------------------------------------ the extensions
class ToyPixelClassifier(nn.Module):
    """A 1x1-conv semantic 'segmenter': per-pixel logits ``W x / 255 + b``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 3)
            self.conv.bias.copy_(torch.randn(NUM_CLASSES, generator=g))

    def logits(self, image):
        return self.conv(image.float()[None] / 255.0)[0]

    def forward(self, inputs):
        return [{"sem_seg": self.logits(x["image"].to(self.conv.weight.device))} for x in inputs]


@register_adapter("ToyPixelClassifier")
class ToyPixelClassifierAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        return [self.model.logits(im) for im in images]


def margin(logits, target):
    """Mean over labelled pixels of ``max_{k != y} z_k - z_y`` (Carlini-Wagner's margin)."""
    valid = target != 255
    y = target.clamp(max=logits.shape[0] - 1)
    z_y = logits.gather(0, y[None])[0]
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[0]).permute(2, 0, 1) > 0, -1e9)
    return (other.max(0).values - z_y)[valid].mean()


@register_objective("toy_margin")
class ToyMarginObjective:
    """Per-image :func:`margin` of the model's dense logits (to maximise)."""

    requires = DENSE_LOGITS

    def __init__(self, model, batched_inputs, seed=0, batched=False):
        self.adapter = as_adapter(model)
        self.targets = [self.adapter.dense_targets(x) for x in batched_inputs]
        self.sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]

    def __call__(self, x):
        images = [x[i, :, :h, :w] for i, (h, w) in enumerate(self.sizes)]
        logits = self.adapter.dense_logits(images)
        return torch.stack([margin(z, t.to(z.device)) for z, t in zip(logits, self.targets)])


@register_attack("random_sign")
class RandomSignAttack(Attack):
    """The best, by the objective, of ``num_draws`` random corners ``x + eps * s`` of the
    eps-ball (s in {-1, 1}^n per image, from the image's generator): no gradient needed."""

    num_draws = 3

    def perturb(self, images, objective):
        x = images.detach().float()
        gens = self.generator if isinstance(self.generator, list) else [self.generator] * len(x)
        best, best_value = x, None
        for _ in range(self.num_draws):
            signs = torch.stack([torch.randint(0, 2, x.shape[1:], generator=g) for g in gens])
            candidate = project_linf(x + self.eps * (2.0 * signs - 1.0), x, self.eps)
            with torch.no_grad():
                value = objective(candidate)
            self.num_forward += 1
            if best_value is None:
                best, best_value = candidate, value
            else:
                better = value > best_value
                best = torch.where(better[:, None, None, None], candidate, best)
                best_value = torch.maximum(value, best_value)
        return best

    def describe(self):
        return dict(super().describe(), num_draws=self.num_draws)


@register_surrogate("toy_clamp")
class ToyClampSurrogate(Surrogate):
    """The clamp itself in torch: its exact gradient, zero where the defense clips."""

    def __init__(self, transform=None, low=None, high=None):
        super().__init__(transform)
        self.low = float(self.defense_param(transform, "low", low))
        self.high = float(self.defense_param(transform, "high", high))

    def __call__(self, x, input_format="BGR"):
        return x.clamp(self.low, self.high)

    def params(self):
        return {"low": self.low, "high": self.high}


@register_defense("toy_clamp", surrogate="toy_clamp")
class ToyClampDefense(DefenseTransform):
    """Clips pixel values into [low, high]."""

    def __init__(self, low=16.0, high=HIGH):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.clip(img, self.low, self.high).astype(img.dtype)


# ------------------------------------------------------------------------------ references
def _cfg(val_name, output_dir):
    cfg = get_upsnet_cfg()  # after the toy defense registered: its node is generated
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "ToyPixelClassifier", "MODEL.DEVICE", "cpu",
        "DATASETS.TEST", f"('{val_name}',)", "OUTPUT_DIR", str(output_dir),
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0",
        "ROBUSTNESS.ATTACKS", "['random_sign', 'fgsm']", "ROBUSTNESS.EPSILONS", f"[{EPS}]",
        "ROBUSTNESS.OBJECTIVE", "toy_margin", "ROBUSTNESS.DEFENSES", "['none', 'toy_clamp']",
        "ROBUSTNESS.ADAPTIVE", "True", "ROBUSTNESS.SEED", str(SEED),
        "ROBUSTNESS.NUM_EXAMPLES", "2", "DEFENSE.TOY_CLAMP.LOW", str(LOW),
    ])  # fmt: skip
    return cfg


def _logits64(model, image):
    """The toy model's logits recomputed in float64: per pixel W x / 255 + b."""
    w = model.conv.weight.detach().double()[:, :, 0, 0]
    b = model.conv.bias.detach().double()
    return torch.einsum("kc,chw->khw", w, image.double() / 255.0) + b[:, None, None]


def _margin64(model, image, target):
    return float(margin(_logits64(model, image), target))


def _best_random_sign(model, x, defend=lambda z: z):
    """RandomSignAttack's choice by hand: the image's own generator, float64 values."""
    clean = x["image"].float()
    g = torch.Generator().manual_seed(image_seed(SEED, x["image_id"]))  # as the hook seeds it
    candidates = []
    for _ in range(RandomSignAttack.num_draws):
        signs = torch.randint(0, 2, clean.shape, generator=g)
        candidates.append((clean + EPS * (2.0 * signs - 1.0)).clamp(0, 255))
    values = [_margin64(model, defend(c), x["sem_seg"]) for c in candidates]
    return candidates[int(np.argmax(values))]


def _fgsm_through_clamp(model, x):
    """Adaptive FGSM by hand: the margin's float64 gradient at the clamped image, through the
    clamp's exact Jacobian (the toy surrogate), one signed step."""
    clean = x["image"].double()
    z = clean.clamp(LOW, HIGH).requires_grad_(True)
    (grad,) = torch.autograd.grad(margin(_logits64(model, z), x["sem_seg"]), z)
    grad = grad * ((clean >= LOW) & (clean <= HIGH))
    return (clean + EPS * grad.sign()).clamp(0, 255).float(), grad


def _miou(model, inputs, dicts, defend=lambda z: z):
    """mIoU (float64) of the model's predictions on (defended) clean images vs the PNGs."""
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for x, d in zip(inputs, dicts):
        with torch.no_grad():
            pred = model.logits(defend(x["image"].float())).argmax(0).numpy()
        gt = np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    tp, present = np.diag(conf), conf.sum(1) > 0
    return 100 * float(np.mean(tp[present] / (conf.sum(1) + conf.sum(0) - tp)[present]))


# ------------------------------------------------------------------------------ tests
def test_toy_extensions_run_in_a_sweep(synthetic_cityscapes_root, tmp_path):
    _, val = register_synthetic_cityscapes_semantic(synthetic_cityscapes_root, "pytest_extension")
    cfg = _cfg(val, tmp_path)
    node = cfg.DEFENSE.TOY_CLAMP  # generated from the class's keyword defaults
    assert set(node) == {"LOW", "HIGH"} and node.HIGH == HIGH and node.LOW == LOW
    assert DEFAULT_SURROGATES["toy_clamp"] == "toy_clamp"

    model = ToyPixelClassifier().eval()
    examples = {}
    sweep = RobustnessSweep(
        cfg, model, "", str(tmp_path),
        on_example=lambda spec, x, clean, adv, defended, outputs: examples.setdefault(
            (spec["attack"], x["image_id"]), adv.clone()),
    )  # fmt: skip
    assert isinstance(sweep.defenses["toy_clamp"], ToyClampDefense)
    assert sweep.defenses["toy_clamp"].low == LOW  # read from cfg.DEFENSE.TOY_CLAMP
    cells = sweep.run()

    keys = [(c["attack"], c["defense"], c["adaptive"]) for c in cells]
    assert keys == [
        ("clean", "none", False), ("clean", "toy_clamp", False),
        ("random_sign", "none", False), ("random_sign", "toy_clamp", False),
        ("fgsm", "none", False), ("fgsm", "toy_clamp", False),
        ("random_sign", "toy_clamp", True), ("fgsm", "toy_clamp", True),
    ]  # fmt: skip
    for c in cells:
        assert (c["model"], c["metric"], c["num_images"], c["num_failed"]) == (
            "ToyPixelClassifier", "mIoU", 2, 0)
        assert c["objective"] == (None if c["attack"] == "clean" else "toy_margin")
    adaptive_fgsm = cells[-1]
    assert adaptive_fgsm["surrogate"] == f"toy_clamp(low={LOW:g},high={HIGH:g})"

    dicts = DatasetCatalog.get(val)
    inputs = [DatasetMapper(cfg, is_train=False)(d) for d in dicts]
    by_cell = {(c["attack"], c["defense"], c["adaptive"]): c for c in cells}
    clean_miou = _miou(model, inputs, dicts)
    clamped_miou = _miou(model, inputs, dicts, lambda z: z.clamp(LOW, HIGH))
    assert by_cell[("clean", "none", False)]["mIoU"] == pytest.approx(clean_miou, abs=1e-9)
    assert by_cell[("clean", "toy_clamp", False)]["mIoU"] == pytest.approx(clamped_miou, abs=1e-9)

    for x in inputs:
        clean = x["image"].float()
        # the toy attack with the toy objective, each image with its own seed
        assert torch.equal(examples[("random_sign", x["image_id"])], _best_random_sign(model, x))
        # adaptive: the same draws, scored through the defense
        adv = examples[("random_sign-adaptive-toy_clamp", x["image_id"])]
        assert torch.equal(adv, _best_random_sign(model, x, lambda z: z.clamp(LOW, HIGH)))
        # adaptive FGSM differentiates through the defense's declared surrogate: pixels the
        # clamp clips get a zero gradient and stay put; the defense-unaware FGSM moves them
        adv = examples[("fgsm-adaptive-toy_clamp", x["image_id"])]
        expected, grad = _fgsm_through_clamp(model, x)
        clipped = (clean < LOW) | (clean > HIGH)
        assert clipped.float().mean() > 0.05  # not vacuous
        assert torch.equal(adv[clipped], clean[clipped])
        # (measured 0.84: unlabelled pixels have no gradient, dark ones cannot go below 0)
        assert (examples[("fgsm", x["image_id"])][clipped] != clean[clipped]).float().mean() > 0.5
        moved = grad.abs() > 1e-6 * grad.abs().max()
        assert (adv[moved] == expected[moved]).float().mean() > 0.999


def test_registration_declares_everything_or_fails_clearly():
    with pytest.raises(TypeError, match="surrogate"):
        register_defense("toy_without_surrogate")
    with pytest.raises(TypeError, match=r"\['strength'\] need defaults.*TOY_NO_DEFAULT"):

        @register_defense("toy_no_default", surrogate="identity")
        class NoDefault(DefenseTransform):
            def __init__(self, strength):
                super().__init__()

    with pytest.raises(ValueError, match="TOY_CLAMP belongs to 'toy_clamp'"):
        register_defense("toy_clamp_again", surrogate="identity", config_node="TOY_CLAMP")(
            ToyClampDefense
        )
    with pytest.raises(TypeError, match="Attack"):
        register_attack("not_an_attack")(object)
    with pytest.raises(TypeError, match="Surrogate"):
        register_surrogate("not_a_surrogate")(object)

    class Unregistered(DefenseTransform):
        def apply_image(self, img):
            return img

    # no silent identity: a defense without a declared surrogate must be given one
    with pytest.raises(ValueError, match="declares no default BPDA surrogate"):
        resolve_surrogates(Unregistered())
    assert [s.name for _, s in resolve_surrogates(Unregistered(), "identity")] == ["identity"]
    assert [s.name for _, s in resolve_surrogates(build_defense("toy_clamp"))] == ["toy_clamp"]
