# Copyright (c) UPSNetRobust authors.
"""Conversion of original UPSNet checkpoints: names, re-orderings, loading, CLI.

The original-named state dict is built from this project's R-50 Cityscapes model by inverting
names with a table written from the original model definition (independent of convert.py's),
and checked against the original's documented keys and shapes. Re-orderings are checked value
by value and by running the converted heads against plain-torch reruns of the original heads.
"""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from upsnet_robust.engine import build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.modeling.convert import (
    convert_upsnet_state_dict,
    load_upsnet_checkpoint,
    unwrap_upsnet_checkpoint,
)

R50_CONFIG = os.path.join(
    REPO_ROOT, "configs", "Cityscapes-PanopticSegmentation", "upsnet_R_50_FPN.yaml"
)
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny.yaml")
# The tiny model with the original's module types (frozen BN, deformable semantic convs).
TINY_AS_ORIGINAL = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.UPSNET.SEM_DEFORMABLE", "True"]

# detectron2 name -> original UPSNet name, from the original's modules (resnet.py, fpn.py, rpn.py,
# rcnn.py, fcn.py).
_TO_ORIGINAL = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "resnet_backbone.conv1.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"resnet_backbone.conv1.bn1.\1"),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight",
        r"resnet_backbone.res\1.layers.\2.conv\3.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)",
        r"resnet_backbone.res\1.layers.\2.bn\3.\4",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight",
        r"resnet_backbone.res\1.layers.\2.downsample.0.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)",
        r"resnet_backbone.res\1.layers.\2.downsample.1.\3",
    ),
    (r"backbone\.fpn_lateral(\d)\.(\w+)", r"fpn.fpn_p\1_1x1.\2"),
    (r"backbone\.fpn_output(\d)\.(\w+)", r"fpn.fpn_p\1.\2"),
    (r"proposal_generator\.rpn_head\.conv\.(\w+)", r"rpn.conv_proposal.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(\w+)", r"rpn.cls_score.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(\w+)", r"rpn.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(\w+)", r"rcnn.fc6.0.\1"),
    (r"roi_heads\.box_head\.fc2\.(\w+)", r"rcnn.fc7.0.\1"),
    (r"roi_heads\.box_predictor\.cls_score\.(\w+)", r"rcnn.cls_score.\1"),
    (r"roi_heads\.box_predictor\.bbox_pred\.(\w+)", r"rcnn.bbox_pred.\1"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(\w+)", r"mask_branch.mask_conv\1.0.\2"),
    (r"roi_heads\.mask_head\.deconv\.(\w+)", r"mask_branch.mask_deconv1.0.\1"),
    (r"roi_heads\.mask_head\.predictor\.(\w+)", r"mask_branch.mask_score.\1"),
    (
        r"sem_seg_head\.subnet\.(\d+)\.conv_offset\.(\w+)",
        r"fcn_head.fcn_subnet.conv.\1.0.conv_offset.\2",
    ),
    (r"sem_seg_head\.subnet\.(\d+)\.(weight|bias)", r"fcn_head.fcn_subnet.conv.\1.0.conv.\2"),
    (r"sem_seg_head\.score\.(\w+)", r"fcn_head.score.\1"),
]
# Keys and shapes of the original R-50 Cityscapes checkpoint (K = 8 things + background).
ORIGINAL_R50_KEYS = {
    "resnet_backbone.conv1.conv1.weight": (64, 3, 7, 7),
    "resnet_backbone.conv1.bn1.running_var": (64,),
    "resnet_backbone.res2.layers.0.conv1.weight": (64, 64, 1, 1),
    "resnet_backbone.res2.layers.0.bn1.weight": (64,),
    "resnet_backbone.res2.layers.0.conv3.weight": (256, 64, 1, 1),
    "resnet_backbone.res2.layers.0.downsample.0.weight": (256, 64, 1, 1),
    "resnet_backbone.res2.layers.0.downsample.1.running_mean": (256,),
    "resnet_backbone.res3.layers.0.conv1.weight": (128, 256, 1, 1),
    "resnet_backbone.res4.layers.5.conv2.weight": (256, 256, 3, 3),
    "resnet_backbone.res5.layers.0.downsample.0.weight": (2048, 1024, 1, 1),
    "resnet_backbone.res5.layers.2.bn3.num_batches_tracked": (),
    "fpn.fpn_p5_1x1.weight": (256, 2048, 1, 1),
    "fpn.fpn_p2_1x1.weight": (256, 256, 1, 1),
    "fpn.fpn_p3.bias": (256,),
    "rpn.conv_proposal.0.weight": (256, 256, 3, 3),
    "rpn.cls_score.weight": (3, 256, 1, 1),
    "rpn.bbox_pred.weight": (12, 256, 1, 1),
    "rcnn.fc6.0.weight": (1024, 12544),
    "rcnn.fc7.0.weight": (1024, 1024),
    "rcnn.cls_score.weight": (9, 1024),
    "rcnn.bbox_pred.weight": (36, 1024),
    "mask_branch.mask_conv4.0.weight": (256, 256, 3, 3),
    "mask_branch.mask_deconv1.0.weight": (256, 256, 2, 2),
    "mask_branch.mask_score.weight": (9, 256, 1, 1),
    "fcn_head.fcn_subnet.conv.0.0.conv_offset.weight": (18, 256, 3, 3),
    "fcn_head.fcn_subnet.conv.0.0.conv.weight": (128, 256, 3, 3),
    "fcn_head.fcn_subnet.conv.0.0.conv.bias": (128,),
    "fcn_head.fcn_subnet.conv.1.0.conv_offset.weight": (18, 128, 3, 3),
    "fcn_head.fcn_subnet.conv.1.0.conv.weight": (128, 128, 3, 3),
    "fcn_head.score.weight": (19, 512, 1, 1),
}
_EXTRA_ROWS = {"rcnn.bbox_pred": 4, "mask_branch.mask_score": 1}  # background rows


def _to_original(key):
    for pattern, template in _TO_ORIGINAL:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    raise AssertionError(f"test table has no original name for {key}")


def _build(config_file, *opts):
    from detectron2.modeling import build_model

    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def make_original(model, seed=0):
    """An original-named state dict with the original shapes and distinct random values."""
    g = torch.Generator().manual_seed(seed)
    original = {}
    for key, t in model.state_dict().items():
        name = _to_original(key)
        shape = list(t.shape)
        shape[0] += _EXTRA_ROWS.get(name.rsplit(".", 1)[0], 0)
        if name.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        else:
            value = torch.randn(shape, generator=g) * 0.02
        original[name] = value.to(t.dtype)
        if name.endswith("running_var"):  # the original's nn.BatchNorm2d counts batches
            original[name.replace("running_var", "num_batches_tracked")] = torch.tensor(12000)
    return original


@pytest.fixture(scope="module")
def r50():
    _, model = _build(R50_CONFIG)
    original = make_original(model)
    return model, original, convert_upsnet_state_dict(original)


def test_synthetic_original_has_the_documented_keys_and_shapes(r50):
    _, original, _ = r50
    for key, shape in ORIGINAL_R50_KEYS.items():
        assert key in original, key
        assert tuple(original[key].shape) == shape, key


def test_r50_converts_without_missing_or_unexpected_keys(r50):
    model, original, converted = r50
    model.load_state_dict(converted, strict=True)  # raises on any missing/unexpected key
    state = model.state_dict()
    reordered = ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
    for key, value in converted.items():
        assert torch.equal(state[key], value), key
        if not any(r in key for r in reordered):
            assert torch.equal(value, original[_to_original(key)]), key
    assert not any("num_batches_tracked" in k for k in converted)
    # no BGR<->RGB flip: both read BGR (INPUT.FORMAT of the config)
    stem = original["resnet_backbone.conv1.conv1.weight"]
    assert torch.equal(converted["backbone.bottom_up.stem.conv1.weight"][:, 0], stem[:, 0])


def test_class_reorderings_value_by_value(r50):
    _, original, converted = r50
    num_things = original["rcnn.cls_score.weight"].shape[0] - 1
    assert num_things == 8
    for p in ("weight", "bias"):
        cls_orig = original[f"rcnn.cls_score.{p}"]
        cls_new = converted[f"roi_heads.box_predictor.cls_score.{p}"]
        box_orig = original[f"rcnn.bbox_pred.{p}"]
        box_new = converted[f"roi_heads.box_predictor.bbox_pred.{p}"]
        mask_orig = original[f"mask_branch.mask_score.{p}"]
        mask_new = converted[f"roi_heads.mask_head.predictor.{p}"]
        assert box_new.shape[0] == 4 * num_things and mask_new.shape[0] == num_things
        assert torch.equal(cls_new[num_things], cls_orig[0])  # background: first -> last
        for c in range(num_things):  # detectron2 class c = original detector class c + 1
            assert torch.equal(cls_new[c], cls_orig[c + 1])
            assert torch.equal(mask_new[c], mask_orig[c + 1])
            for k in range(4):  # (dx, dy, dw, dh) of class c
                assert torch.equal(box_new[4 * c + k], box_orig[4 * (c + 1) + k])


def _w(original, name):
    return original[name].double()


def test_converted_heads_compute_what_the_original_heads_compute(r50):
    """Box, mask and stem modules with converted weights against plain-torch reruns of the
    original modules (float64)."""
    model, original, converted = r50
    model.load_state_dict(converted)
    o = lambda n: _w(original, n)  # noqa: E731
    close = dict(rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(1)
    rh = copy.deepcopy(model.roi_heads).double()

    # box head: softmax over [bg, classes] vs detectron2's [classes, bg]; deltas without bg
    x = torch.randn(5, 256, 7, 7, generator=g, dtype=torch.float64)
    h = F.relu(F.linear(x.flatten(1), o("rcnn.fc6.0.weight"), o("rcnn.fc6.0.bias")))
    h = F.relu(F.linear(h, o("rcnn.fc7.0.weight"), o("rcnn.fc7.0.bias")))
    probs_ref = F.softmax(F.linear(h, o("rcnn.cls_score.weight"), o("rcnn.cls_score.bias")), dim=1)
    deltas_ref = F.linear(h, o("rcnn.bbox_pred.weight"), o("rcnn.bbox_pred.bias"))
    scores, deltas = rh.box_predictor(rh.box_head(x))
    probs = F.softmax(scores, dim=1)
    torch.testing.assert_close(probs[:, :8], probs_ref[:, 1:], **close)
    torch.testing.assert_close(probs[:, 8], probs_ref[:, 0], **close)
    torch.testing.assert_close(deltas, deltas_ref[:, 4:], **close)

    # mask head: 4 x (conv + ReLU), deconv + ReLU, 1x1 score; detectron2 has no bg channel
    x = torch.randn(3, 256, 14, 14, generator=g, dtype=torch.float64)
    m = x
    for i in range(1, 5):
        m = F.relu(
            F.conv2d(
                m,
                o(f"mask_branch.mask_conv{i}.0.weight"),
                o(f"mask_branch.mask_conv{i}.0.bias"),
                padding=1,
            )
        )
    m = F.relu(
        F.conv_transpose2d(
            m,
            o("mask_branch.mask_deconv1.0.weight"),
            o("mask_branch.mask_deconv1.0.bias"),
            stride=2,
        )
    )
    m = F.conv2d(m, o("mask_branch.mask_score.weight"), o("mask_branch.mask_score.bias"))
    torch.testing.assert_close(rh.mask_head.layers(x), m[:, 1:], **close)

    # stem on a BGR image: conv 7x7/2, BatchNorm (eval), ReLU, max-pool 3/2
    stem = copy.deepcopy(model.backbone.bottom_up.stem).double()
    img = torch.rand(1, 3, 32, 48, generator=g, dtype=torch.float64) * 255 - 120
    bn = "resnet_backbone.conv1.bn1."
    ref = F.conv2d(img, o("resnet_backbone.conv1.conv1.weight"), stride=2, padding=3)
    ref = F.batch_norm(
        ref,
        o(bn + "running_mean"),
        o(bn + "running_var"),
        o(bn + "weight"),
        o(bn + "bias"),
        eps=1e-5,
    )
    ref = F.max_pool2d(F.relu(ref), kernel_size=3, stride=2, padding=1)
    torch.testing.assert_close(stem(img), ref, **close)


def test_rpn_layout_needs_no_reordering(r50):
    """The original reads objectness (1, A, H, W) and deltas (1, 4A, H, W) as rows (y, x, a) with
    deltas [4a:4a+4], anchors of size 8 x stride in aspect-ratio order (0.5, 1, 2); the converted
    RPN must hand its decoder the same numbers for the same anchors."""
    from detectron2.structures import ImageList

    model, original, converted = r50
    model.load_state_dict(converted)
    rpn = copy.deepcopy(model.proposal_generator).double()
    captured = {}

    def capture(anchors, logits, deltas, image_sizes):
        captured.update(anchors=anchors, logits=logits, deltas=deltas)
        return [None]

    rpn.predict_proposals = capture
    g = torch.Generator().manual_seed(2)
    strides = (4, 8, 16, 32, 64)
    feats = {
        f"p{i + 2}": torch.randn(1, 256, 128 // s, 192 // s, generator=g, dtype=torch.float64)
        for i, s in enumerate(strides)
    }
    rpn(ImageList(torch.zeros(1, 3, 128, 192, dtype=torch.float64), [(128, 192)]), feats)
    o = lambda n: _w(original, n)  # noqa: E731
    for level, stride in enumerate(strides):
        f = feats[f"p{level + 2}"]
        t = F.relu(
            F.conv2d(f, o("rpn.conv_proposal.0.weight"), o("rpn.conv_proposal.0.bias"), padding=1)
        )
        scores = F.conv2d(t, o("rpn.cls_score.weight"), o("rpn.cls_score.bias"))
        deltas = F.conv2d(t, o("rpn.bbox_pred.weight"), o("rpn.bbox_pred.bias"))
        torch.testing.assert_close(
            captured["logits"][level][0], scores.permute(0, 2, 3, 1).reshape(-1)
        )
        torch.testing.assert_close(
            captured["deltas"][level][0], deltas.permute(0, 2, 3, 1).reshape(-1, 4)
        )
        a = captured["anchors"][level].tensor.view(f.shape[2], f.shape[3], 3, 4)  # rows (y, x, a)
        w, h = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
        torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0], dtype=w.dtype).expand_as(w))
        torch.testing.assert_close((w * h).sqrt(), torch.full_like(w, 8.0 * stride))
        cx = (a[..., 0] + a[..., 2]) / 2
        cy = (a[..., 1] + a[..., 3]) / 2
        xs = torch.arange(f.shape[3], dtype=w.dtype) * stride
        ys = torch.arange(f.shape[2], dtype=w.dtype) * stride
        torch.testing.assert_close(cx, xs[None, :, None].expand_as(cx))
        torch.testing.assert_close(cy, ys[:, None, None].expand_as(cy))


def _small_original(num_rows=3, box_rows=None, mask_rows=None):
    return {
        "resnet_backbone.conv1.conv1.weight": torch.randn(2, 3, 7, 7),
        "resnet_backbone.conv1.bn1.num_batches_tracked": torch.tensor(5),
        "rcnn.cls_score.weight": torch.randn(num_rows, 4),
        "rcnn.cls_score.bias": torch.randn(num_rows),
        "rcnn.bbox_pred.weight": torch.randn(box_rows or 4 * num_rows, 4),
        "mask_branch.mask_score.weight": torch.randn(mask_rows or num_rows, 4, 1, 1),
        "fcn_head.score.weight": torch.randn(5, 8, 1, 1),
    }


def test_wrappers_and_module_prefix_are_unwrapped():
    sd = _small_original()
    for wrapped in (
        sd,
        {"state_dict": sd},
        {"model": sd},
        {"module." + k: v for k, v in sd.items()},
        {"state_dict": {"module." + k: v for k, v in sd.items()}},
    ):
        out = unwrap_upsnet_checkpoint(wrapped)
        assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


def test_class_agnostic_boxes_drop_the_background_rows():
    sd = _small_original(box_rows=8)
    out = convert_upsnet_state_dict(sd)
    assert torch.equal(
        out["roi_heads.box_predictor.bbox_pred.weight"], sd["rcnn.bbox_pred.weight"][4:]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.update({"fcn_head.fcn_subnet.conv.0.1.weight": torch.ones(3)}),
            r"fcn_head\.fcn_subnet\.conv\.0\.1\.weight",
        ),
        (
            lambda sd: sd.update({"fpn.fpn_gap.weight": torch.ones(3), "rpn.extra": torch.ones(1)}),
            r"2 key\(s\).*fpn\.fpn_gap\.weight.*rpn\.extra",
        ),
        (
            lambda sd: sd.pop("mask_branch.mask_score.weight"),
            "missing.*mask_branch.mask_score.weight",
        ),
        (
            lambda sd: sd.update({"rcnn.bbox_pred.weight": torch.ones(10, 4)}),
            "rcnn.bbox_pred.weight has 10 rows",
        ),
        (
            lambda sd: sd.update({"mask_branch.mask_score.weight": torch.ones(2, 4, 1, 1)}),
            "mask_score.weight has 2 channels; expected 3",
        ),
        (
            lambda sd: sd.update({"rcnn.cls_score.bias": [1.0, 2.0]}),
            "non-tensor.*rcnn.cls_score.bias",
        ),
    ],
)
def test_bad_checkpoints_give_clear_errors(change, message):
    sd = _small_original()
    change(sd)
    with pytest.raises(ValueError, match=message):
        convert_upsnet_state_dict(sd)


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _small_original(), "obj": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_upsnet_checkpoint(str(path))


def test_cli_output_loads_through_the_checkpointer(tmp_path):
    cfg, model = _build(TINY_CONFIG, *TINY_AS_ORIGINAL)
    original = make_original(model, seed=3)
    src, dst = tmp_path / "upsnet_original.pth", tmp_path / "out" / "converted.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in original.items()}}, src)
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "tools", "convert_upsnet_weights.py"),
        str(src),
        str(dst),
    ]
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 thing classes" in proc.stdout
    assert set(torch.load(dst, weights_only=True)) == {"model"}

    _, fresh = _build(TINY_CONFIG, *TINY_AS_ORIGINAL)
    build_checkpointer(cfg, fresh).load(str(dst))
    expected = convert_upsnet_state_dict(original)
    state = fresh.state_dict()
    assert state.keys() == expected.keys()
    for key in state:  # every tensor came from the file (random values, not an init)
        assert torch.equal(state[key], expected[key]), key
    bg = original["rcnn.cls_score.weight"][0]
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"][-1], bg)

    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.ones(1)}, bad)
    proc = subprocess.run(
        cmd[:2] + [str(bad), str(tmp_path / "x.pth")],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Not a complete UPSNet checkpoint" in proc.stderr
    assert not (tmp_path / "x.pth").exists()
