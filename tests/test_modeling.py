# Copyright (c) UPSNetRobust authors.
"""UPSNet meta-architecture: registration, losses, gradient transparency, output format."""
import pytest
import torch
from conftest import make_panoptic_input, tiny_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_model
from detectron2.utils.events import EventStorage
from detectron2.utils.visualizer import Visualizer

from upsnet_robust.modeling import UPSNet, UPSNetSemanticHead

LOSS_KEYS = {
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
    "loss_sem_seg",
    "loss_panoptic",
}


def _model(*opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


def test_registered():
    assert META_ARCH_REGISTRY.get("UPSNet") is UPSNet
    assert SEM_SEG_HEADS_REGISTRY.get("UPSNetSemanticHead") is UPSNetSemanticHead


def test_training_losses_finite_and_complete():
    model = _model()
    model.train()
    with EventStorage():
        losses = model([make_panoptic_input(seed=0), make_panoptic_input(seed=1)])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())


def test_training_needs_ground_truth():
    model = _model()
    model.train()
    x = make_panoptic_input()
    del x["sem_seg"]
    with EventStorage(), pytest.raises(KeyError, match="sem_seg"):
        model([x])


@pytest.mark.parametrize("deformable", [True, False])
def test_gradients_reach_the_input_with_frozen_early_stages(deformable):
    """No detach between the image and the losses: the study had to remove UPSNet's."""
    model = _model("MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.UPSNET.SEM_DEFORMABLE", str(deformable))
    model.train()
    frozen = [p for n, p in model.named_parameters() if "bottom_up.stem" in n or "res2" in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    for loss_keys in (LOSS_KEYS, {"loss_panoptic"}):
        x = make_panoptic_input(float_image=True)
        x["image"].requires_grad_(True)
        torch.manual_seed(0)
        with EventStorage():
            losses = model([x])
        sum(losses[k] for k in loss_keys).backward()
        g = x["image"].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, loss_keys


def test_inference_logits_are_differentiable_under_eval():
    model = _model()
    model.eval()
    x = make_panoptic_input(float_image=True)
    x["image"].requires_grad_(True)
    raw = model.inference([x], do_postprocess=False)[0]
    raw["panoptic_logits"].logsumexp(0).sum().backward()
    assert x["image"].grad.abs().sum() > 0


def test_inference_output_format_and_resize():
    model = _model()
    model.eval()
    x = make_panoptic_input(64, 128)
    x["height"], x["width"] = 96, 192  # the original image was larger
    with torch.no_grad():
        out = model([x])[0]
    assert set(out) == {"sem_seg", "instances", "panoptic_seg"}
    ids, segments = out["panoptic_seg"]
    assert ids.shape == (96, 192) and ids.dtype == torch.int32
    assert out["sem_seg"].shape == (19, 96, 192)
    assert out["instances"].image_size == (96, 192)
    assert set(torch.unique(ids).tolist()) - {0} == {s["id"] for s in segments}
    for s in segments:
        assert s["isthing"] == (s["category_id"] >= 11)
        assert s["area"] == int((ids == s["id"]).sum())
    # The panoptic-only path (sweeps) gives the same panoptic result without the extra work.
    with torch.no_grad():
        only = model.inference([x], panoptic_only=True)[0]
    assert set(only) == {"panoptic_seg"} and torch.equal(only["panoptic_seg"][0], ids)
    assert only["panoptic_seg"][1] == segments
    # detectron2's Visualizer draws it with the Cityscapes metadata unchanged.
    meta = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    img = torch.zeros(96, 192, 3, dtype=torch.uint8).numpy()
    Visualizer(img, meta).draw_panoptic_seg(ids, segments).get_image()


def test_seeded_training_loss_is_deterministic():
    model = _model()
    model.train()
    vals = []
    for _ in range(2):
        torch.manual_seed(123)
        with EventStorage():
            vals.append({k: float(v) for k, v in model([make_panoptic_input()]).items()})
    assert vals[0] == vals[1]
