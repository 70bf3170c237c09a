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


# Lower selection thresholds: the untrained model then has instances in its panoptic output.
WITH_THINGS = ("MODEL.UPSNET.PANOPTIC_SCORE_THRESH", "0.05", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")


def test_inference_output_format_and_resize():
    model = _model(*WITH_THINGS)
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
    assert any(s["isthing"] for s in segments) and not all(s["isthing"] for s in segments)
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


UPSNET_KEYS = {
    "PANOPTIC_LOSS_WEIGHT": ("panoptic_loss_weight", 1.0),
    "BOX_KEEP_FRACTION": ("box_keep_fraction", 0.9),
    "PANOPTIC_SCORE_THRESH": ("panoptic_score_thresh", 0.05),
    "PANOPTIC_NMS_THRESH": ("panoptic_nms_thresh", 0.4),
    "PANOPTIC_MAX_INSTANCES": ("panoptic_max_instances", 2),
    "MASK_OVERLAP_THRESH": ("mask_overlap_thresh", 0.2),
    "STUFF_AREA_LIMIT": ("stuff_area_limit", 100),
    "STUFF_RELABEL_FRACTION": ("stuff_relabel_fraction", 0.6),
}


def test_upsnet_config_keys_reach_the_model():
    """Every MODEL.UPSNET key arrives in the model (non-default values), and the ones with a
    visible effect have it."""
    opts = [x for k, (_, v) in UPSNET_KEYS.items() for x in (f"MODEL.UPSNET.{k}", str(v))]
    head_opts = [
        "MODEL.UPSNET.SEM_IN_FEATURES", "['p2', 'p3']", "MODEL.UPSNET.SEM_CONV_DIM", "16",
        "MODEL.UPSNET.SEM_NUM_CONVS", "3", "MODEL.UPSNET.SEM_DEFORMABLE", "True",
        "MODEL.UPSNET.SEM_LOSS_WEIGHT", "3.0",
    ]  # fmt: skip
    model = _model(*opts, *head_opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    default = _model()
    for key, (attr, value) in UPSNET_KEYS.items():
        assert getattr(model, attr) == value != getattr(default, attr), key
    head = model.sem_seg_head
    assert head.in_features == ["p2", "p3"] and len(head.subnet) == 3
    assert all(layer.weight.shape[0] == 16 and layer.deformable for layer in head.subnet)
    assert all(hasattr(layer, "conv_offset") for layer in head.subnet)
    assert head.score.in_channels == 16 * 2 and head.loss_weight == 3.0
    assert not any(layer.deformable for layer in default.sem_seg_head.subnet)  # tiny: plain
    # Loss weights scale their losses (same weights, same sampling seed).
    weights = _model(*WITH_THINGS)
    scaled = _model(
        *WITH_THINGS, "MODEL.UPSNET.PANOPTIC_LOSS_WEIGHT", "1.0", "MODEL.UPSNET.SEM_LOSS_WEIGHT", "3.0"
    )
    scaled.load_state_dict(weights.state_dict())
    losses = []
    for m in (weights, scaled):
        m.train()
        torch.manual_seed(5)
        with EventStorage():
            losses.append({k: float(v) for k, v in m([make_panoptic_input()]).items()})
    base, more = losses
    assert more["loss_panoptic"] == pytest.approx(2 * base["loss_panoptic"], rel=1e-5)  # 1.0 / 0.5
    assert more["loss_sem_seg"] == pytest.approx(3 * base["loss_sem_seg"], rel=1e-5)
    assert {k: v for k, v in more.items() if k not in ("loss_panoptic", "loss_sem_seg")} == {
        k: v for k, v in base.items() if k not in ("loss_panoptic", "loss_sem_seg")
    }

    # PANOPTIC_MAX_INSTANCES caps the things; STUFF_AREA_LIMIT above the image area voids stuff.
    x = make_panoptic_input()

    def segments(*extra):
        m = _model(*WITH_THINGS, *extra)
        m.load_state_dict(weights.state_dict())
        with torch.no_grad():
            return m.eval()([x])[0]["panoptic_seg"][1]

    free = segments()
    assert sum(s["isthing"] for s in free) > 2 and any(not s["isthing"] for s in free)
    assert sum(s["isthing"] for s in segments("MODEL.UPSNET.PANOPTIC_MAX_INSTANCES", "2")) <= 2
    assert not any(not s["isthing"] for s in segments("MODEL.UPSNET.STUFF_AREA_LIMIT", "100000"))
