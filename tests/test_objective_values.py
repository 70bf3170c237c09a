# Copyright (c) UPSNetRobust authors.
"""The label-based dense objectives against float64 numpy on hand-made logits: ``semantic_ce``
(targets through the adapter's label mapping), ``pseudo_label`` (the clean argmax) and
``least_likely`` (minus the cross-entropy to the clean argmin)."""
import numpy as np
import pytest
import torch
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, register_adapter
from upsnet_robust.attacks import build_objective

SCALE = 16.0
C, H, W = 4, 3, 5


class ShiftedLabelsNet(nn.Module):
    """Dense logits: 4 channels, (image[c % 3] - 128) / SCALE + a fixed per-class bias."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64))


@register_adapter("ShiftedLabelsNet")
class ShiftedLabelsAdapter(ModelAdapter):
    """Its classes are the data set's labels shifted by one (label l -> class (l + 1) % 4), 255
    stays ignored: a label mapping, as PanopticFPN's adapter has one."""

    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        bias = self.model.bias[:, None, None]
        return [(im[[0, 1, 2, 0]] - 128.0) / SCALE + bias for im in images]

    def dense_targets(self, x):
        sem = x["sem_seg"]
        return torch.where(sem == 255, sem, (sem + 1) % C)


def _logits(image):
    z = (image[[0, 1, 2, 0]] - 128.0) / SCALE
    return z + np.array([0.3, -0.2, 0.1, 0.0])[:, None, None]


def _ce(z, target):
    """Mean over labelled pixels of -log softmax(z)[target], float64."""
    top = z.max(axis=0)
    log_sum = top + np.log(np.exp(z - top).sum(axis=0))
    valid = target != 255
    picked = np.take_along_axis(z, np.where(valid, target, 0)[None], 0)[0]
    return float(((log_sum - picked) * valid).sum() / valid.sum())


@pytest.fixture
def case():
    rng = np.random.default_rng(7)
    image = rng.uniform(60.0, 200.0, size=(3, H, W))
    sem = rng.integers(0, C, size=(H, W))
    sem[0, :2] = 255
    x = {"image": torch.tensor(image), "image_id": "h", "sem_seg": torch.tensor(sem)}
    return x, image, sem


@pytest.mark.parametrize("name", ["semantic_ce", "pseudo_label", "least_likely"])
def test_objective_value_against_float64(case, name):
    x, image, sem = case
    adapter = ShiftedLabelsAdapter(ShiftedLabelsNet())
    z = _logits(image)
    target = {
        "semantic_ce": np.where(sem == 255, 255, (sem + 1) % C),
        "pseudo_label": z.argmax(axis=0),
        "least_likely": z.argmin(axis=0),
    }[name]
    expected = _ce(z, target) * (-1.0 if name == "least_likely" else 1.0)
    value = build_objective(name, adapter, [x])(x["image"][None])
    assert float(value) == pytest.approx(expected, rel=1e-12)
