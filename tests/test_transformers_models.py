# Copyright (c) UPSNetRobust authors.
"""`transformers` models (Mask2Former, MaskFormer, SegFormer, UperNet) as detectron2's
``TransformersSegmentor``: random-init models from small configs written here, swept with every
attack family and ``sea``; outputs against the model's own raw outputs and Mask2Former's rules;
training targets against the panoptic PNG; weights from save_pretrained directories and
detectron2 checkpoints; set-up errors (class lists, hub ids, timm backbones); no network."""
import json
import os
import socket

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from panopticapi.utils import rgb2id
from PIL import Image

import upsnet_robust  # noqa: F401
from upsnet_robust.adapters import TransformersAdapter, UnsupportedModelError, build_adapter
from upsnet_robust.data import build_panoptic_mapper, register_synthetic_cityscapes_semantic
from upsnet_robust.data.datasets import get_cityscapes_panoptic_metadata
from upsnet_robust.engine import Trainer, build_checkpointer, get_upsnet_cfg
from upsnet_robust.evaluation import RobustnessSweep
from upsnet_robust.evaluation.checks import check_attack_objective
from upsnet_robust.evaluation.transfer import TransferModel, TransferStudy
from upsnet_robust.modeling.transformers_outputs import mask_targets, panoptic_inference

transformers = pytest.importorskip("transformers")

NAMES = get_cityscapes_panoptic_metadata()["stuff_classes"]  # the 19 trainId classes
THINGS = list(range(11, 19))
PANOPTIC = ("mask2former", "maskformer")
SEMANTIC = ("segformer", "upernet")
CLASSES = {
    "mask2former": "Mask2FormerForUniversalSegmentation",
    "maskformer": "MaskFormerForInstanceSegmentation",
    "segformer": "SegformerForSemanticSegmentation",
    "upernet": "UperNetForSemanticSegmentation",
}


def _resnet():
    return transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip


def hf_config(kind, num_labels=19, **extra):
    """A small `transformers` config of ``kind`` (random init, no download)."""
    labels = dict(num_labels=num_labels, **extra)
    if kind == "mask2former":
        return transformers.Mask2FormerConfig(
            backbone_config=_resnet(), use_pretrained_backbone=False, hidden_dim=32,
            feature_size=32, mask_feature_size=32, encoder_layers=1, decoder_layers=2,
            num_queries=8, encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2,
            train_num_points=256, **labels,
        )  # fmt: skip
    if kind == "maskformer":
        decoder = dict(model_type="detr", d_model=16, encoder_layers=1, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                       decoder_ffn_dim=32, num_queries=8)  # fmt: skip
        return transformers.MaskFormerConfig(
            backbone_config=_resnet(), use_pretrained_backbone=False, fpn_feature_size=32,
            mask_feature_size=32, num_queries=8, decoder_config=decoder, **labels,
        )  # fmt: skip
    if kind == "segformer":
        return transformers.SegformerConfig(
            depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 32], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16, **labels,
        )  # fmt: skip
    return transformers.UperNetConfig(
        hidden_size=16, auxiliary_channels=8, pool_scales=[1, 2],
        **{"backbone_config": _resnet(), **labels},
    )  # fmt: skip


def write_config(kind, folder, **kw) -> str:
    os.makedirs(str(folder), exist_ok=True)
    path = os.path.join(str(folder), f"{kind}.json")
    with open(path, "w") as f:
        json.dump(hf_config(kind, **kw).to_dict(), f)
    return path


@pytest.fixture(scope="module")
def names(synthetic_cityscapes_names, synthetic_cityscapes_root):
    sem = register_synthetic_cityscapes_semantic(synthetic_cityscapes_root, "pytest_tf_semantic")
    return {"panoptic": synthetic_cityscapes_names, "semantic": dict(zip(("train", "val"), sem))}


def make_cfg(kind, names, tmp_path, *opts, config=None):
    task = "panoptic" if kind in PANOPTIC else "semantic"
    cfg = get_upsnet_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "TransformersSegmentor", "MODEL.DEVICE", "cpu",
        "MODEL.TRANSFORMERS.CLASS", CLASSES[kind],
        "MODEL.TRANSFORMERS.CONFIG",
        write_config(kind, tmp_path) if config is None else config,
        "MODEL.TRANSFORMERS.TASK", task,
        # a random model's class probabilities are near 1/20: keep queries for a real merge
        "MODEL.TRANSFORMERS.OBJECT_MASK_THRESHOLD", "0.0",
        "MODEL.TRANSFORMERS.OVERLAP_THRESHOLD", "0.0",
        "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[57.4, 57.1, 58.4]",
        "DATASETS.TRAIN", f"('{names[task]['train']}',)",
        "DATASETS.TEST", f"('{names[task]['val']}',)",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path), *opts,
    ])  # fmt: skip
    return cfg


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def val_inputs(cfg):
    mapper = TransformersAdapter.test_mapper(cfg)
    if mapper is None:
        from detectron2.data import DatasetMapper

        mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])]


def raw_semantic(model, image):
    """The model's per-pixel class scores from `transformers` directly, in float64: the image
    normalised by hand (BGR -> RGB), Mask2Former's einsum for mask classification."""
    mean = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    std = torch.tensor([57.4, 57.1, 58.4]).view(3, 1, 1)
    pixels = ((image.float() - mean) / std)[[2, 1, 0]][None]
    with torch.no_grad():
        out = model.network(pixel_values=pixels)
    size = pixels.shape[-2:]
    up = torch.nn.functional.interpolate
    if hasattr(out, "logits"):
        return up(out.logits, size, mode="bilinear", align_corners=False)[0].double()
    masks = up(out.masks_queries_logits, size, mode="bilinear", align_corners=False)[0].double()
    probs = out.class_queries_logits[0].double().softmax(-1)[:, :-1]
    return (probs[:, :, None, None] * masks.sigmoid()[:, None]).sum(0)


# ------------------------------------------------------------------ outputs and gradients
@pytest.mark.parametrize("kind", PANOPTIC + SEMANTIC)
def test_outputs_dense_logits_and_gradients(kind, names, tmp_path):
    cfg = make_cfg(kind, names, tmp_path)
    model = make_model(cfg)
    adapter = build_adapter(cfg, model)
    expected_task = "panoptic_seg" if kind in PANOPTIC else "sem_seg"
    assert adapter.task == expected_task == TransformersAdapter.task_for(cfg)
    x = val_inputs(cfg)[0]
    assert tuple(x["image"].shape[-2:]) == (64, 128)  # a multiple of 32: no padding
    ref = raw_semantic(model, x["image"])
    out = adapter.inference([dict(x, height=64, width=128)])[0]
    assert out["sem_seg"].shape == (19, 64, 128)
    torch.testing.assert_close(out["sem_seg"].double(), ref, rtol=1e-4, atol=1e-5)
    image = x["image"].float().requires_grad_()
    logits = adapter.dense_logits([image])[0]
    if kind in PANOPTIC:  # log of the normalised scores
        torch.testing.assert_close(logits.double().exp(), ref / ref.sum(0), rtol=1e-4, atol=1e-5)
        ids, segments = out["panoptic_seg"]
        assert ids.shape == (64, 128) and segments
        assert set(np.unique(ids.numpy())) - {0} == {s["id"] for s in segments}
        assert all(s["isthing"] == (s["category_id"] in THINGS) for s in segments)
    else:
        torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    logits.logsumexp(0).sum().backward()
    assert (image.grad != 0).float().mean() > 0.5  # the gradient reaches the pixels


def test_panoptic_merge_follows_mask2former_rules():
    """Hand-made queries: a kept stuff query, two stuff queries of one class merged, a thing,
    a low-score query dropped, and a query overlapped below the threshold dropped."""
    big = 20.0
    cls = torch.full((6, 20), -big)
    for q, c in enumerate([0, 2, 2, 11, 12, 5]):
        cls[q, c] = big
    cls[4, 12], cls[4, 19] = 0.0, 0.5  # query 4: most probable class is "no object"
    masks = torch.full((6, 4, 6), -big)
    masks[0, :2, :] = big  # top half: class 0
    masks[1, 2:, :2] = big  # class 2, left
    masks[2, 2:, 2:4] = big  # class 2, middle: merged with query 1
    masks[3, 2:, 4:] = big  # class 11 thing, right
    masks[5, :, :] = 0.1  # everywhere, just above 0.5 probability, but owns no pixel
    ids, segments = panoptic_inference(cls, masks, THINGS, 0.8, 0.8)
    expected = torch.tensor([[1] * 6, [1] * 6, [2, 2, 2, 2, 3, 3], [2, 2, 2, 2, 3, 3]])
    assert torch.equal(ids, expected.int())
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [
        (1, 0, False), (2, 2, False), (3, 11, True)
    ]


# ------------------------------------------------------------------ training
def test_mask_targets_are_the_panoptic_segments(names, tmp_path):
    """One mask per stuff class and per thing instance: the non-crowd segments of the
    panoptic PNG (decoded with panopticapi), same pixels and classes."""
    cfg = make_cfg("mask2former", names, tmp_path)
    mapper = build_panoptic_mapper(cfg, is_train=False)
    checked = 0
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        x = mapper(d)
        masks, classes = mask_targets(x, "panoptic", THINGS, 19, 255, (64, 128))
        pan = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        ref = {}
        for s in d["segments_info"]:
            if not s.get("iscrowd", 0):
                thing = s["category_id"] in THINGS
                key = ("thing", s["id"]) if thing else s["category_id"]
                ref[key] = ref.get(key, np.zeros(pan.shape, dtype=bool)) | (pan == s["id"])
        got = {}
        for m, c in zip(masks.bool().numpy(), classes.tolist()):
            key = c if c not in THINGS else ("thing", len(got))
            got[key] = m
        assert sorted(k for k in got if not isinstance(k, tuple)) == sorted(
            k for k in ref if not isinstance(k, tuple)
        )
        for c in (k for k in ref if not isinstance(k, tuple)):
            assert np.array_equal(got[c], ref[c]), c
        things_ref = sorted(m.tobytes() for k, m in ref.items() if isinstance(k, tuple))
        things_got = sorted(m.tobytes() for k, m in got.items() if isinstance(k, tuple))
        assert things_ref == things_got
        checked += len(things_ref)
    assert checked > 0


@pytest.mark.parametrize("kind", PANOPTIC + SEMANTIC)
def test_training_losses_finite_seeded_with_gradient(kind, names, tmp_path):
    cfg = make_cfg(kind, names, tmp_path)
    adapter = build_adapter(cfg, make_model(cfg))
    x = val_inputs(cfg)[0]
    image = x["image"].float().requires_grad_()
    (losses,) = adapter.losses([dict(x, image=image)], [3])
    expected = {"loss_cross_entropy", "loss_mask", "loss_dice"} if kind in PANOPTIC else {
        "loss_sem_seg"}  # fmt: skip
    assert expected <= set(losses) and not adapter.model.training
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert image.grad.abs().sum() > 0
    again = adapter.losses([x], [3])[0]
    assert all(torch.equal(again[k].detach(), losses[k].detach()) for k in losses)


def test_trainer_runs_adamw_steps(names, tmp_path):
    cfg = make_cfg("mask2former", names, tmp_path, "SOLVER.OPTIMIZER", "ADAMW",
                   "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001",
                   "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()")  # fmt: skip
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_instance_task_outputs_instances_and_losses(synthetic_cityscapes_root, names, tmp_path):
    from detectron2.structures import Instances

    from upsnet_robust.data import register_synthetic_cityscapes_instance

    inst = register_synthetic_cityscapes_instance(synthetic_cityscapes_root, "pytest_tf_instance")
    path = write_config("mask2former", tmp_path, num_labels=8)  # the thing classes
    cfg = make_cfg("mask2former", names, tmp_path, "MODEL.TRANSFORMERS.TASK", "instance",
                   "DATASETS.TRAIN", f"('{inst[0]}',)", "DATASETS.TEST", f"('{inst[1]}',)",
                   "TEST.DETECTIONS_PER_IMAGE", "5", config=path)  # fmt: skip
    adapter = build_adapter(cfg, make_model(cfg))
    assert adapter.task == "instances" and not adapter.has("dense_logits")
    x = val_inputs(cfg)[0]
    assert len(x["instances"]) > 0 and x["instances"].gt_masks.tensor.dtype == torch.bool
    out = adapter.inference([x])[0]
    assert set(out) == {"sem_seg", "instances"}
    pred = out["instances"]
    assert isinstance(pred, Instances) and len(pred) == 5
    assert pred.pred_masks.shape[-2:] == (x["height"], x["width"])
    assert ((pred.pred_classes >= 0) & (pred.pred_classes < 8)).all()
    (losses,) = adapter.losses([x], [0])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kind", ["mask2former", "segformer"])
def test_trainer_evaluators_follow_the_configured_task(kind, names, tmp_path):
    from detectron2.evaluation import COCOPanopticEvaluator, SemSegEvaluator

    cfg = make_cfg(kind, names, tmp_path)
    evaluators = Trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0])._evaluators
    kinds = [type(e) for e in evaluators]
    if kind == "mask2former":  # PQ, and mIoU of its sem_seg (the data set's classes)
        assert issubclass(kinds[0], COCOPanopticEvaluator) and len(kinds) == 2
        assert issubclass(kinds[1], SemSegEvaluator)
    else:
        assert len(kinds) == 1 and issubclass(kinds[0], SemSegEvaluator)


# ------------------------------------------------------------------ weights
def _outputs(model, x):
    with torch.no_grad():
        return model.inference([x])[0]["sem_seg"]


@pytest.mark.parametrize("kind", ["mask2former", "segformer"])
def test_save_pretrained_directory_loads_through_model_weights(kind, names, tmp_path):
    cfg = make_cfg(kind, names, tmp_path)
    saved = make_model(cfg, seed=0)
    folder = str(tmp_path / "hub_model")
    saved.network.save_pretrained(folder)
    # CONFIG "" reads the directory's config.json; the model starts from other random weights
    cfg_dir = make_cfg(kind, names, tmp_path, "MODEL.WEIGHTS", folder, config="")
    model = make_model(cfg_dir, seed=1)
    x = val_inputs(cfg)[0]
    assert not torch.allclose(_outputs(model, x), _outputs(saved, x))
    build_checkpointer(cfg_dir, model).load(folder)
    reference = getattr(transformers, CLASSES[kind]).from_pretrained(folder).eval()
    pixels = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        mine, ref = model.network(pixel_values=pixels), reference(pixel_values=pixels)
    for key in ("logits", "class_queries_logits", "masks_queries_logits"):
        if key in ref:
            assert torch.equal(mine[key], ref[key]), key
    torch.testing.assert_close(_outputs(model, x), _outputs(saved, x))
    # a directory for a model without the hook is refused with its name
    with pytest.raises(ValueError, match="Linear loads checkpoint files only"):
        build_checkpointer(cfg_dir, torch.nn.Linear(2, 2)).load(folder)


def test_cache_fingerprint_follows_directory_and_config_contents(names, tmp_path):
    from upsnet_robust.evaluation.sweep import fingerprint

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"one")
    cfg = make_cfg("segformer", names, tmp_path, "MODEL.WEIGHTS", str(folder))
    before = fingerprint(cfg, str(folder))
    (folder / "model.safetensors").write_bytes(b"two")
    changed_weights = fingerprint(cfg, str(folder))
    with open(cfg.MODEL.TRANSFORMERS.CONFIG, "a") as f:
        f.write("\n")
    changed_config = fingerprint(cfg, str(folder))
    assert len({before, changed_weights, changed_config}) == 3


def test_detectron2_checkpoint_round_trips(names, tmp_path):
    cfg = make_cfg("mask2former", names, tmp_path)
    model = make_model(cfg, seed=0)
    build_checkpointer(cfg, model, save_dir=str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    restored = make_model(cfg, seed=1)
    build_checkpointer(cfg, restored).load(path)
    x = val_inputs(cfg)[0]
    torch.testing.assert_close(_outputs(restored, x), _outputs(model, x), rtol=0, atol=0)


# ------------------------------------------------------------------ set-up errors
def test_class_count_and_order_mismatch_fail_at_set_up(names, tmp_path):
    bad = make_cfg("mask2former", names, tmp_path, config=write_config("mask2former", tmp_path,
                                                                       num_labels=7))
    with pytest.raises(ValueError, match=r"predicts 7 classes.*pytest_synthetic.*has 19"):
        build_model(bad)
    swapped = {i: n for i, n in enumerate(NAMES)}
    swapped[0], swapped[1] = NAMES[1], NAMES[0]
    path = write_config("segformer", tmp_path, id2label=swapped)
    cfg = make_cfg("segformer", names, tmp_path, config=path)
    with pytest.raises(ValueError, match=r"class 0 'sidewalk'.*'road'"):
        build_model(cfg)
    # the adapter checks the data set it scores on, too
    model = make_model(make_cfg("segformer", names, tmp_path))
    meta = type("M", (), {"name": "five", "get": lambda self, k, d=None: list("abcde")})()
    with pytest.raises(ValueError, match=r"19 classes.*'five' has 5"):
        TransformersAdapter(model, meta)
    with pytest.raises(ValueError, match="semantic maps only.*TASK semantic"):
        build_model(make_cfg("segformer", names, tmp_path, "MODEL.TRANSFORMERS.TASK", "panoptic"))


def test_hub_ids_and_downloading_backbones_are_refused(names, tmp_path, monkeypatch):
    hub = "facebook/mask2former-swin-small-cityscapes-panoptic"
    with pytest.raises(FileNotFoundError, match="local directory written by save_pretrained"):
        build_model(make_cfg("mask2former", names, tmp_path, config=hub))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS set to a save_pretrained directory"):
        build_model(make_cfg("mask2former", names, tmp_path, "MODEL.WEIGHTS", hub, config=""))
    timm = write_config("upernet", tmp_path, backbone_config=None, backbone="resnet18",
                        use_timm_backbone=True)  # fmt: skip
    with pytest.raises(ValueError, match="timm backbone"):
        build_model(make_cfg("upernet", names, tmp_path, config=timm))

    named = write_config("upernet", tmp_path)
    with open(named) as f:
        saved = json.load(f)
    with open(named, "w") as f:  # the backbone by hub id only: building would fetch its config
        json.dump(dict(saved, backbone_config=None, backbone="microsoft/resnet-18"), f)
    with pytest.raises(ValueError, match="hub id.*without a backbone_config"):
        build_model(make_cfg("upernet", names, tmp_path, config=named))

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    # a config asking for a pretrained backbone builds it from its config, offline
    monkeypatch.setattr(socket.socket, "connect", no_network)
    pretrained = write_config("mask2former", tmp_path)
    with open(pretrained) as f:
        saved = json.load(f)
    with open(pretrained, "w") as f:  # as a hub config.json may say
        json.dump(dict(saved, use_pretrained_backbone=True), f)
    model = build_model(make_cfg("mask2former", names, tmp_path, config=pretrained))
    assert model.network.config.use_pretrained_backbone is False


def test_panoptic_objective_rejected_with_the_adapter_name(names, tmp_path):
    cfg = make_cfg("mask2former", names, tmp_path)
    adapter = build_adapter(cfg, make_model(cfg))
    with pytest.raises(UnsupportedModelError, match="Mask2Former.*panoptic logits"):
        check_attack_objective(adapter, "pgd", "panoptic")


# ------------------------------------------------------------------ sweeps and transfer
SWEEP_OPTS = [
    "ROBUSTNESS.EPSILONS", "[2.0]", "ROBUSTNESS.NUM_STEPS", "2", "ROBUSTNESS.RANDOM_START", "True",
    "ROBUSTNESS.NUM_EXAMPLES", "0", "ROBUSTNESS.MAX_IMAGES", "2",
    "ROBUSTNESS.SEA.NUM_STEPS", "2", "ROBUSTNESS.SEA.FAST_NUM_STEPS", "2",
    "ROBUSTNESS.SEA.MEMBERS", "['apgd:masked_ce', 'apgd:balanced_masked_ce']",
]  # fmt: skip
# (objective, attacks): every family, each under an objective it takes
SWEEPS = (
    ("train_losses", ["fgsm", "ifgsm", "pgd", "mifgsm", "apgd", "illc"]),
    ("semantic_ce", ["segpgd", "cospgd", "sea", "sea_fast"]),
)


def _sweep(kind, names, folder, objective, attacks, *opts):
    cfg = make_cfg(kind, names, folder, "ROBUSTNESS.OBJECTIVE", objective,
                   "ROBUSTNESS.ATTACKS", str(attacks), *SWEEP_OPTS, *opts)  # fmt: skip
    seen = []

    def on_example(spec, x, clean, adv, defended, outputs):
        seen.append((spec["attack"], clean, adv))

    sweep = RobustnessSweep(cfg, make_model(cfg), "random-init", str(folder), on_example)
    return cfg, sweep.run(), seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", PANOPTIC + SEMANTIC)
def test_sweep_every_attack_family_and_sea(kind, names, tmp_path):
    metric = "PQ" if kind in PANOPTIC else "mIoU"
    for objective, attacks in SWEEPS:
        _, cells, seen = _sweep(kind, names, tmp_path / objective, objective, attacks,
                                "ROBUSTNESS.DEFENSES", "['none']",
                                "ROBUSTNESS.NUM_EXAMPLES", "2")  # fmt: skip
        ran = {c["attack"] for c in cells if not c.get("member_of")}
        assert ran == {"clean", *attacks}
        for c in cells:
            assert c["metric"] == metric and c["num_images"] == 2 and c["num_failed"] == 0, c
            assert 0 <= c[metric] <= 100
            assert c["model"] == f"TransformersSegmentor/{CLASSES[kind]}"
        assert {a for a, _, _ in seen} >= set(attacks) - {"sea", "sea_fast"}
        for attack, clean, adv in seen:  # in the eps-ball (2), and the gradient moved pixels
            delta = (adv - clean).abs()
            assert delta.max() <= 2.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255, attack
            assert (delta > 0).float().mean() > 0.5, f"{attack}: no gradient reached the image"


@pytest.mark.slow
def test_segment_objective_adaptive_defense_and_transfer(names, tmp_path):
    """Mask2Former: the segment objective, an adaptive attack through a defense (adversarial
    images in the eps-ball, the gradient reaching them), and transfer to a SegFormer."""
    eps = 2.0
    cfg, cells, seen = _sweep("mask2former", names, tmp_path / "m2f", "segment", ["pgd"],
                              "ROBUSTNESS.DEFENSES", "['none', 'median']",
                              "ROBUSTNESS.ADAPTIVE", "True",
                              "ROBUSTNESS.NUM_EXAMPLES", "2")  # fmt: skip
    assert {(c["attack"], c["defense"], bool(c.get("adaptive"))) for c in cells} >= {
        ("pgd", "none", False), ("pgd", "median", True)
    }
    assert all(c["num_failed"] == 0 for c in cells)
    for attack, clean, adv in seen:
        delta = (adv - clean).abs()
        assert delta.max() <= eps + 1e-4 and (delta > 0).float().mean() > 0.5, attack
    source = make_cfg("mask2former", names, tmp_path / "src", "ROBUSTNESS.ATTACKS", "['ifgsm']",
                      "ROBUSTNESS.DEFENSES", "['none']", *SWEEP_OPTS)  # fmt: skip
    target = make_cfg("segformer", names, tmp_path / "tgt", "ROBUSTNESS.ATTACKS", "['ifgsm']",
                      "ROBUSTNESS.DEFENSES", "['none']", *SWEEP_OPTS)  # fmt: skip
    models = [TransferModel("m2f", source, make_model(source)),
              TransferModel("segformer", target, make_model(target))]  # fmt: skip
    entries = TransferStudy(models, str(tmp_path / "transfer")).run()
    cross = [e for e in entries if e["source"] == "m2f" and e["target"] == "segformer"]
    assert len(cross) == 1 and 0 <= cross[0]["mIoU"] <= 100
