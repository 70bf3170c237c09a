# Copyright (c) UPSNetRobust authors.
"""The ``segment`` objective's gradient on hand-made logits where segments are still matched
(a random network breaks every segment, so its segment loss is flat): equal to the gradient of
the segment loss written out in float64 numpy, and different from plain cross-entropy's."""
import numpy as np
import pytest
import torch
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, register_adapter
from upsnet_robust.attacks import build_objective

SCALE = 16.0  # logits = (image - 128) / SCALE: one class per colour channel


class ChannelLogitsNet(nn.Module):
    """Its dense logits are the image's colour channels, shifted and scaled."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # the device


@register_adapter("ChannelLogitsNet")
class ChannelLogitsAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    def dense_logits(self, images):
        return [(im - 128.0) / SCALE + self.model.anchor for im in images]


def _case():
    """A 4 x 6 image; segment id 5 (class 0, 12 px, 1 wrong: matched), 6 (class 1, 4 px, 1
    wrong: matched), 7 (class 2, 4 px, 3 wrong: broken), a crowd segment (id 8) and void (0)."""
    pan = np.zeros((4, 6), dtype=np.int64)
    pan[:2, :] = 5
    pan[2, :4] = 6
    pan[3, :4] = 7
    pan[2:, 4] = 8
    rng = np.random.default_rng(3)
    z = rng.uniform(-1.0, 1.0, size=(3, 4, 6))
    top = np.zeros((4, 6), dtype=np.int64)  # the class each pixel's argmax is made to be
    top[pan == 6] = 1
    top[pan == 7] = 2
    top[0, 3], top[2, 1] = 2, 0  # one wrong pixel in each matched segment
    top[3, 0], top[3, 1], top[3, 3] = 0, 1, 0  # segment 7: 1 of 4 right
    top[2:, 4:] = rng.integers(0, 3, size=(2, 2))
    for c in range(3):
        z[c][top == c] += 3.0
    info = [
        {"id": 5, "category_id": 0, "iscrowd": 0},
        {"id": 6, "category_id": 1, "iscrowd": 0},
        {"id": 7, "category_id": 2},
        {"id": 8, "category_id": 1, "iscrowd": 1},
    ]
    return pan, z, info


def _softmax(z):
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _reference_gradients(pan, z, info):
    """d/dz of the segment loss and of plain CE (mean over the segments' pixels), in float64:
    CE's gradient at pixel p is softmax(z_p) - onehot(c); the segment loss weights it by
    [p still correct] [segment matched, r_s > 0.5] / (|P_s| S)."""
    p = _softmax(z)
    segments = [(s["id"], s["category_id"]) for s in info if not s.get("iscrowd", 0)]
    g_seg, g_ce = np.zeros_like(z), np.zeros_like(z)
    labelled = sum(int((pan == i).sum()) for i, _ in segments)
    for seg_id, c in segments:
        mask = pan == seg_id
        correct = mask & (z.argmax(axis=0) == c)
        d = p.copy()
        d[c] -= 1.0
        g_ce += d * mask / labelled
        if correct.sum() / mask.sum() > 0.5:
            g_seg += d * correct / (mask.sum() * len(segments))
    return g_seg, g_ce


def test_segment_gradient_matches_float64_reference_and_differs_from_cross_entropy():
    pan, z, info = _case()
    image = torch.tensor(z * SCALE + 128.0, dtype=torch.float64)
    adapter = ChannelLogitsAdapter(ChannelLogitsNet())
    x = {"image": image, "image_id": "hand", "pan_seg": torch.tensor(pan), "segments_info": info}
    objective = build_objective("segment", adapter, [x])
    images = image[None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(images).sum(), images)
    g_seg, g_ce = _reference_gradients(pan, z, info)
    expected = torch.tensor(g_seg / SCALE)  # chain rule through logits = (x - 128) / SCALE
    assert expected.abs().max() > 1e-3  # segments 5 and 6 are still matched: not flat
    torch.testing.assert_close(grad[0], expected, rtol=1e-9, atol=1e-12)
    # plain cross-entropy's gradient is elsewhere: on the broken segment, the wrong pixels, and
    # with per-pixel rather than per-segment weights
    ce = torch.tensor(g_ce / SCALE)
    assert (grad[0] - ce).abs().max() > 0.2 * ce.abs().max()
    broken = torch.tensor(pan == 7)
    assert grad[0][:, broken].abs().max() == 0 and ce[:, broken].abs().max() > 1e-3
