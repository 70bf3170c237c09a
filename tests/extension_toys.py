# Copyright (c) UPSNetRobust authors.
"""Toy extensions of :mod:`test_extension_api`, each registered beside its class through the
public API only: a model adapter, an objective, an attack, a BPDA surrogate, a defense (its
``cfg.DEFENSE`` node and default surrogate declared with it) and a threat kind (an image
function with a config key of its own).

Run as a script, in a fresh process (registries are process-global: the toys must not leak into
other tests), it runs them in a small sweep and saves what the test checks::

    python tests/extension_toys.py DATA_ROOT OUTPUT_DIR
"""
import os
import sys

import numpy as np
import torch
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, as_adapter, register_adapter
from upsnet_robust.attacks import Attack, project_linf, register_attack
from upsnet_robust.attacks.objectives import register_objective
from upsnet_robust.config import register_config
from upsnet_robust.data import register_synthetic_cityscapes_semantic
from upsnet_robust.defenses import DefenseTransform, register_defense
from upsnet_robust.defenses.surrogates import DEFAULT_SURROGATES, Surrogate, register_surrogate
from upsnet_robust.engine import get_upsnet_cfg
from upsnet_robust.evaluation import RobustnessSweep
from upsnet_robust.evaluation.report import write_report
from upsnet_robust.threats import ImageStep, StepResult, ThreatKind, ThreatSpec, register_threat

NUM_CLASSES = 19  # the Cityscapes trainIds of the synthetic semantic split
EPS, SEED, LOW, HIGH, GAMMA = 8.0, 5, 60.0, 240.0, 0.5


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
    needs_gradients = False

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


# the threat kind (docs/EXTENDING.md, "A threat kind", shows this code)
@register_config
def add_gamma_config(cfg):
    cfg.ROBUSTNESS.GAMMAS = []  # gamma curves x' = 255 (x / 255) ** g, one pass each


class GammaStep(ImageStep):
    """A batch under one gamma curve (no objective, no gradient)."""

    def __init__(self, gamma):
        self.gamma = gamma

    def __call__(self, inputs, images):
        return StepResult([255.0 * (im / 255.0) ** self.gamma for im in images])


@register_threat("gamma")
class GammaKind(ThreatKind):
    """One pass per gamma of ROBUSTNESS.GAMMAS; its cells carry ``gamma``."""

    threat_model = "gamma cells score the test images under a fixed gamma curve (no adversary)"

    @classmethod
    def names(cls):
        return ["gamma"]

    @classmethod
    def claims(cls, name):
        return name == "gamma"

    @classmethod
    def expand(cls, cfg, include_adaptive=True):
        return [ThreatSpec.make(cls.name, "gamma", params={"gamma": float(g)})
                for g in cfg.ROBUSTNESS.GAMMAS]  # fmt: skip

    @classmethod
    def tag(cls, spec):
        return f"gamma{spec.param('gamma'):g}"

    @classmethod
    def image_step(cls, spec, context):
        return GammaStep(spec.param("gamma"))


# ------------------------------------------------------------------------------ the sweep
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
        "ROBUSTNESS.GAMMAS", f"[{GAMMA}]",
    ])  # fmt: skip
    return cfg


def main(root: str, output_dir: str) -> None:
    """Sweep the toys on the semantic val split of the data set at ``root``; save the cells,
    the adversarial images of every attacked pass, the model's weights and what the config and
    the registries say about the toy defense to ``<output_dir>/extension.pt``."""
    torch.set_num_threads(1)
    _, val = register_synthetic_cityscapes_semantic(root, "pytest_extension")
    cfg = _cfg(val, output_dir)
    model = ToyPixelClassifier().eval()
    examples = {}

    def on_example(spec, x, clean, adv, defended, outputs):
        examples[f"{spec['attack']}|{x['image_id']}"] = adv.detach().clone()

    sweep = RobustnessSweep(cfg, model, "", output_dir, on_example=on_example)
    defense = sweep.defenses["toy_clamp"]
    cells = sweep.run()
    paths = write_report(cells, output_dir, {"config_file": "extension_toys.py"})
    with open(paths["md"]) as f:
        report = f.read()
    torch.save(
        {
            "cells": cells,
            "examples": examples,
            "weight": model.conv.weight.detach().clone(),
            "bias": model.conv.bias.detach().clone(),
            "config_node": {k: float(v) for k, v in cfg.DEFENSE.TOY_CLAMP.items()},
            "defense": {"class": type(defense).__name__, "low": float(defense.low)},
            "default_surrogate": DEFAULT_SURROGATES["toy_clamp"],
            "num_draws": RandomSignAttack.num_draws,
            "report": report,
        },
        os.path.join(output_dir, "extension.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
