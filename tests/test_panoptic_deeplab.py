# Copyright (c) UPSNetRobust authors.
"""detectron2's Panoptic-DeepLab through the robustness engine: its adapter (dense logits,
losses, test-time targets, label convention), the shipped tiny model and a sweep over every
attack family."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from detectron2.projects.panoptic_deeplab import PanopticDeeplabDatasetMapper

from upsnet_robust.adapters import UnsupportedModelError, build_adapter
from upsnet_robust.adapters.panoptic_deeplab import PanopticDeepLabAdapter
from upsnet_robust.attacks.objectives import build_objective
from upsnet_robust.engine import Trainer, build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import PanopticSubsetEvaluator, RobustnessSweep
from upsnet_robust.evaluation.checks import check_attack_objective

PDL_CONFIG = os.path.join(REPO_ROOT, "configs", "Synthetic", "panoptic_deeplab_tiny.yaml")
CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "panoptic_deeplab_tiny_synthetic.pth")
needs_checkpoint = pytest.mark.skipif(
    not os.path.isfile(CHECKPOINT), reason=f"{CHECKPOINT} missing (see the config's header)"
)
LOSS_KEYS = {"loss_sem_seg", "loss_center", "loss_offset"}
LOSS_TARGETS = (
    "sem_seg", "sem_seg_weights", "center", "center_weights", "offset", "offset_weights"
)


def pdl_cfg(names, *opts):
    """The tiny Panoptic-DeepLab config on the registered data set ``names``."""
    cfg = get_upsnet_cfg()
    merge_with_hints(
        cfg,
        PDL_CONFIG,
        [
            "DATASETS.TRAIN", f"('{names['train']}',)",
            "DATASETS.TEST", f"('{names['val']}',)",
            "DATALOADER.NUM_WORKERS", "0",
            *opts,
        ],
    )
    return cfg


def _model(cfg, weights=None):
    torch.manual_seed(0)
    model = build_model(cfg)
    if weights:
        build_checkpointer(cfg, model).load(weights)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_cfg(synthetic_cityscapes_names):
    """The shipped model when present (meaningful logits), else a randomly initialised one."""
    cfg = pdl_cfg(synthetic_cityscapes_names)
    return _model(cfg, CHECKPOINT if os.path.isfile(CHECKPOINT) else None), cfg


def _val_dict(names, i=0):
    return DatasetCatalog.get(names["val"])[i]


# ------------------------------------------------------------------------------ test mapper
def test_test_mapper_targets_align_with_the_test_image(synthetic_cityscapes_names):
    names = synthetic_cityscapes_names
    d = _val_dict(names)
    # no resize: every target can be checked against the files the generator wrote
    cfg = pdl_cfg(names, "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128")
    mapper = PanopticDeepLabAdapter.test_mapper(cfg)
    assert isinstance(mapper, PanopticDeeplabDatasetMapper)
    x, again = mapper(d), mapper(d)
    for k in ("image", *LOSS_TARGETS):
        assert torch.equal(x[k], again[k]), f"{k}: the test mapper must be deterministic (no flip)"
    assert x["file_name"] == d["file_name"] and x["image_id"] == d["image_id"]
    assert (x["height"], x["width"]) == (64, 128)
    bgr = utils.read_image(d["file_name"], format="BGR")
    assert torch.equal(x["image"], torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1))))
    # the semantic target equals the generator's labelTrainIds file
    train_ids = np.asarray(Image.open(d["sem_seg_file_name"]))
    assert np.array_equal(x["sem_seg"].numpy(), train_ids)
    # offsets point from each thing pixel to its instance's centroid (float64 recomputation)
    pan = utils.read_image(d["pan_seg_file_name"], "RGB").astype(np.int64)
    pan = pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2]
    things = set(MetadataCatalog.get(names["val"]).thing_dataset_id_to_contiguous_id.values())
    thing_segments = [s for s in d["segments_info"] if s["category_id"] in things]
    assert thing_segments
    for s in thing_segments:
        ys, xs = np.nonzero(pan == s["id"])
        cy, cx = ys.mean(), xs.mean()
        np.testing.assert_allclose(ys + x["offset"][0].numpy()[ys, xs], cy, atol=1e-3)
        np.testing.assert_allclose(xs + x["offset"][1].numpy()[ys, xs], cx, atol=1e-3)
        assert x["center"][int(round(cy)), int(round(cx))] == pytest.approx(1.0)
    thing_pixels = np.isin(pan, [s["id"] for s in thing_segments])
    assert np.array_equal(x["offset_weights"][0].numpy() > 0, thing_pixels)

    # the configured test size: image and targets resized together, output size kept
    x = PanopticDeepLabAdapter.test_mapper(pdl_cfg(names))(d)
    assert x["image"].shape[-2:] == x["sem_seg"].shape == x["center"].shape == (128, 256)
    assert (x["height"], x["width"]) == (64, 128)
    assert set(LOSS_TARGETS) <= set(x) and set(PanopticDeepLabAdapter.loss_ground_truth) <= set(x)

    # clear errors: a dict without panoptic annotations, a data set without panoptic metadata
    with pytest.raises(KeyError, match="pan_seg_file_name.*panoptic data set"):
        mapper({k: v for k, v in d.items() if k != "pan_seg_file_name"})
    if "pytest_pdl_no_metadata" not in DatasetCatalog.list():
        DatasetCatalog.register("pytest_pdl_no_metadata", lambda: [])
    bad = pdl_cfg({"train": "pytest_pdl_no_metadata", "val": names["val"]})
    with pytest.raises(ValueError, match="pytest_pdl_no_metadata.*lacks thing_dataset_id"):
        PanopticDeepLabAdapter.test_mapper(bad)


def test_panoptic_ids_decode_to_the_data_sets_categories(synthetic_cityscapes_names, tmp_path):
    """Panoptic-DeepLab's ``(category * label_divisor + instance, None)`` output, decoded by
    detectron2's COCOPanopticEvaluator with the generated data's metadata: the ground truth
    written that way scores PQ 100; written with the data set's label ids (not contiguous
    trainIds) it does not."""
    name = synthetic_cityscapes_names["val"]
    meta = MetadataCatalog.get(name)
    things = set(meta.thing_dataset_id_to_contiguous_id.values())
    to_label_id = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    to_label_id.update({v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()})

    def score(category_of, instance_of=lambda k: k + 1):
        evaluator = PanopticSubsetEvaluator(name, str(tmp_path))
        evaluator.reset()
        for d in DatasetCatalog.get(name):
            pan = utils.read_image(d["pan_seg_file_name"], "RGB").astype(np.int64)
            pan = pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2]
            ids = torch.full(pan.shape, -1, dtype=torch.int64)
            for k, s in enumerate(d["segments_info"]):
                instance = instance_of(k) if s["category_id"] in things else 0
                ids[torch.from_numpy(pan == s["id"])] = (
                    category_of(s["category_id"]) * meta.label_divisor + instance
                )
            evaluator.process([d], [{"panoptic_seg": (ids, None)}])
        return evaluator.evaluate()["panoptic_seg"]

    perfect = score(lambda c: c)
    assert perfect["PQ"] == pytest.approx(100.0) and perfect["PQ_th"] == pytest.approx(100.0)
    # controls: instances of a class merged into one segment; label ids instead of trainIds
    assert score(lambda c: c, instance_of=lambda k: 1)["PQ_th"] < 90
    with pytest.raises(KeyError):
        score(lambda c: to_label_id[c] if c in things else c)


# ------------------------------------------------------------------------------ capabilities
def test_dense_logits_are_the_models_eval_semantic_logits(
    model_and_cfg, synthetic_cityscapes_names
):
    model, cfg = model_and_cfg
    adapter = build_adapter(cfg, model)
    x = adapter.test_mapper(cfg)(_val_dict(synthetic_cityscapes_names))
    image = x["image"].float().requires_grad_()
    (logits,) = adapter.dense_logits([image])
    assert logits.shape == (19, 128, 256)
    with torch.no_grad():
        (out,) = adapter.inference([x], keys={"panoptic_seg", "sem_seg"})
    # the model resizes its logits to the original 64x128 (sem_seg_postprocess: bilinear)
    assert out["sem_seg"].shape == (19, 64, 128)
    resized = F.interpolate(logits.detach()[None], (64, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized[0], out["sem_seg"], rtol=1e-4, atol=1e-4)
    # a size that is not a multiple of 32: the padding is cropped away, output size = input size
    crop = x["image"][:, :100, :200].float()
    (cropped,) = adapter.dense_logits([crop])
    with torch.no_grad():
        (ref,) = model([{"image": crop, "height": 100, "width": 200}])
    torch.testing.assert_close(cropped, ref["sem_seg"], rtol=1e-4, atol=1e-4)
    # differentiable w.r.t. the image, in eval mode (dropout off: deterministic)
    loss = F.cross_entropy(logits[None], x["sem_seg"][None], ignore_index=255)
    loss.backward()
    assert torch.isfinite(image.grad).all() and (image.grad != 0).float().mean() > 0.5
    torch.testing.assert_close(adapter.dense_logits([image.detach()])[0], logits.detach())
    assert not model.training


def test_losses_from_test_mapper_targets_are_finite_and_reach_the_image(
    model_and_cfg, synthetic_cityscapes_names
):
    model, cfg = model_and_cfg
    adapter = build_adapter(cfg, model)
    x = adapter.test_mapper(cfg)(_val_dict(synthetic_cityscapes_names))
    image = x["image"].float().requires_grad_()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    (losses,) = adapter.losses([dict(x, image=image)], seeds=[7])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert torch.isfinite(image.grad).all() and (image.grad != 0).float().mean() > 0.5
    # seeded (ASPP dropout is on in the training forward), norm statistics untouched
    (again,) = adapter.losses([dict(x, image=image.detach())], seeds=[7])
    assert all(torch.equal(losses[k].detach(), again[k]) for k in LOSS_KEYS)
    assert all(torch.equal(running[k], model.state_dict()[k]) for k in running)
    assert not model.training
    # the train_losses objective is their sum
    value = build_objective("train_losses", adapter, [x])(x["image"].float()[None])
    assert value.shape == (1,) and torch.isfinite(value).all()


def test_panoptic_objective_rejected_at_setup(model_and_cfg, synthetic_cityscapes_names, tmp_path):
    model, cfg = model_and_cfg
    adapter = build_adapter(cfg, model)
    assert type(adapter) is PanopticDeepLabAdapter
    with pytest.raises(UnsupportedModelError, match="PanopticDeepLab") as info:
        check_attack_objective(adapter, "ifgsm", "panoptic")
    assert "panoptic logits" in str(info.value) and "semantic_ce" in str(info.value)
    sweep_cfg = pdl_cfg(
        synthetic_cityscapes_names,
        "ROBUSTNESS.ATTACKS", "['ifgsm']",
        "ROBUSTNESS.OBJECTIVE", "panoptic",
    )
    with pytest.raises(UnsupportedModelError, match="PanopticDeepLab"):
        RobustnessSweep(sweep_cfg, model, "", str(tmp_path))
    # the objectives it does serve are accepted
    assert check_attack_objective(adapter, "segpgd", "semantic_ce") == "semantic_ce"
    assert check_attack_objective(adapter, "illc", "train_losses") == "least_likely"


def test_trainer_trains_with_the_adapters_mapper(synthetic_cityscapes_names, tmp_path):
    cfg = pdl_cfg(
        synthetic_cityscapes_names,
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()",
        "OUTPUT_DIR", str(tmp_path),
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert LOSS_KEYS <= set(trainer.storage.latest())
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    results = Trainer.test(cfg, trainer.model)
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"]) and "mIoU" in results["sem_seg"]


# ------------------------------------------------------------------------------ shipped model
@needs_checkpoint
@pytest.mark.slow
def test_shipped_model_pq_on_fresh_scenes(tmp_path_factory):
    """Fresh scenes at the training resolution (seed 1: not the training images)."""
    from upsnet_robust.data import (
        generate_synthetic_cityscapes,
        register_synthetic_cityscapes_panoptic,
    )

    root = str(tmp_path_factory.mktemp("pdl_fresh") / "synthetic_cityscapes")
    generate_synthetic_cityscapes(root, num_train=1, num_val=8, seed=1, show_progress=False)
    train, val = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_pdl_fresh")
    output_dir = str(tmp_path_factory.mktemp("pdl_eval"))
    cfg = pdl_cfg({"train": train, "val": val}, "OUTPUT_DIR", output_dir)
    results = Trainer.test(cfg, _model(cfg, CHECKPOINT))
    pq = results["panoptic_seg"]
    assert pq["PQ"] >= 60, pq
    assert pq["PQ_th"] >= 40, pq  # instances found through the metadata's thing ids
    assert results["sem_seg"]["mIoU"] >= 60, results["sem_seg"]


# Attacked PQ may exceed clean PQ by at most this much (PQ points): twice the spread measured on
# the two fixture images, where random +-4 sign noise (5 seeds) moved the shipped model's PQ by
# +0.4 to +1.0 (clean 75.9).
MARGIN = 2.0
SWEEP_EPS = 4.0
SWEEP_OBJECTIVES = {
    "fgsm": "train_losses",
    "ifgsm": "train_losses",
    "pgd": "train_losses",
    "illc": "least_likely",  # ILLC's own objective
    "segpgd": "semantic_ce",
    "cospgd": "semantic_ce",
}


@needs_checkpoint
@pytest.mark.slow
def test_sweep_every_attack_family_on_the_shipped_model(synthetic_cityscapes_names, tmp_path):
    """Two sweeps sharing a cache (their clean pass is computed once): the loss attacks and
    ILLC under train_losses, SegPGD/CosPGD under semantic_ce."""
    names = synthetic_cityscapes_names
    seen = []

    def on_example(spec, x, clean, adv, defended, outputs):
        seen.append((spec["attack"], clean.detach().cpu(), adv.detach().cpu()))

    cells = []
    for objective, attacks in (
        ("train_losses", ["fgsm", "ifgsm", "pgd", "illc"]),
        ("semantic_ce", ["segpgd", "cospgd"]),
    ):
        cfg = pdl_cfg(
            names,
            "MODEL.WEIGHTS", CHECKPOINT,
            "OUTPUT_DIR", str(tmp_path),
            "ROBUSTNESS.ATTACKS", str(attacks),
            "ROBUSTNESS.OBJECTIVE", objective,
            "ROBUSTNESS.EPSILONS", f"[{SWEEP_EPS}]",
            "ROBUSTNESS.DEFENSES", "['none']",
            "ROBUSTNESS.NUM_EXAMPLES", "2",
        )
        model = _model(cfg, CHECKPOINT)
        sweep = RobustnessSweep(cfg, model, CHECKPOINT, str(tmp_path), on_example=on_example)
        cells += sweep.run()

    assert all(c["num_images"] == 2 and c["num_failed"] == 0 for c in cells), cells
    assert all(c["model"] == "PanopticDeepLab" and c["metric"] == "PQ" for c in cells)
    clean = [c["PQ"] for c in cells if c["attack"] == "clean"]
    assert len(clean) == 2 and clean[0] == clean[1]  # the second sweep reused the clean pass
    attacked = {c["attack"]: c for c in cells if c["attack"] != "clean"}
    assert {a: c["objective"] for a, c in attacked.items()} == SWEEP_OBJECTIVES
    scores = {name: cell["PQ"] for name, cell in attacked.items()}
    assert all(pq <= clean[0] + MARGIN for pq in scores.values()), (clean[0], scores)
    # and the strongest attack does more than noise can (measured: SegPGD/CosPGD -7, I-FGSM -3.5)
    assert min(scores.values()) < clean[0] - 2 * MARGIN, (clean[0], scores)
    # the adversarial images: inside the eps-ball and [0, 255], and the attack moved them
    assert sorted({a for a, _, _ in seen}) == sorted(SWEEP_OBJECTIVES) and len(seen) == 12
    for name, x, adv in seen:
        delta = (adv - x).abs()
        assert delta.max() <= SWEEP_EPS + 1e-4 and adv.min() >= 0 and adv.max() <= 255, name
        assert delta.max() >= SWEEP_EPS - 1e-3, name
