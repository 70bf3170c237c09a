# Copyright (c) UPSNetRobust authors.
"""Adversarial training: the crafting step against a float64 reference, its invariants (eps-ball,
[0, 255], frozen norms, restored modes, seeds per iteration and process), the Trainer with
ADV_TRAIN on 1 and 2 processes, and the guard against catastrophic overfitting."""
import hashlib
import json
import os

import pytest
import torch
from conftest import REPO_ROOT, make_panoptic_input, tiny_cfg
from conftest import TRAIN_OPTS as TINY_TRAIN_OPTS
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from upsnet_robust.engine import Trainer, build_checkpointer
from upsnet_robust.engine.adversarial_training import AdversarialExamples, craft, step_seed
from upsnet_robust.engine.overfitting_guard import OverfittingGuard, guard_decision

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
TRAIN_OPTS = [*TINY_TRAIN_OPTS, "ADV_TRAIN.ENABLED", "True", "ADV_TRAIN.EPS", "4.0"]


# ----------------------------------------------------------------------------- craft()
W = torch.linspace(-1.0, 1.0, 2 * 3 * 5 * 7).reshape(2, 3, 5, 7)


def _loss(x):
    """A smooth non-linear per-image loss: its gradient depends on where it is taken."""
    return (torch.sin(x / 17.0) * W.to(x.dtype)).flatten(1).sum(1)


def _grad64(x):
    return torch.cos(x / 17.0) / 17.0 * W.double()


def _reference(x, eps, attack, alpha, steps, noise, seed):
    """An independent float64 loop with the analytic gradient and the same noise draws."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(x.shape, generator=g, dtype=torch.float32).double()
    x = x.double()
    delta = (2 * u - 1) * (noise * eps if attack == "n_fgsm" else eps)
    for _ in range(steps):
        start = torch.clamp(x + delta, 0, 255)
        delta = start - x + alpha * torch.sign(_grad64(start))
        if attack != "n_fgsm":
            delta = torch.clamp(delta, -eps, eps)
    return torch.clamp(x + delta, 0, 255)


@pytest.mark.parametrize(
    "attack,alpha,steps", [("fgsm_rs", 1.25 * 6, 1), ("n_fgsm", 6.0, 1), ("pgd", 2.5 * 6 / 4, 4)]
)
def test_craft_equals_a_float64_reference(attack, alpha, steps):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) * 255
    x[0, 0, 0] = 0.0  # pixels at the bounds: the clipping matters
    x[1, 2, 4] = 255.0
    out = craft(x, _loss, 6.0, attack, None, steps, 2.0, torch.Generator().manual_seed(5))
    ref = _reference(x, 6.0, attack, alpha, steps, 2.0, 5)
    assert torch.allclose(out.double(), ref, atol=1e-3)
    assert 0 <= out.min() and out.max() <= 255
    radius = 3 * 6.0 if attack == "n_fgsm" else 6.0
    assert (out - x).abs().max() <= radius + 1e-4
    if attack == "n_fgsm":  # N-FGSM leaves the eps-ball on purpose
        assert (out - x).abs().max() > 6.0


def test_craft_rejects_unknown_attacks_and_is_identity_at_eps_zero():
    x = torch.rand(2, 3, 5, 7) * 255
    with pytest.raises(ValueError, match="fgsm_rs, n_fgsm, pgd"):
        craft(x, _loss, 4.0, "fgsm")
    assert torch.equal(craft(x, _loss, 0.0), x)


def test_step_seed_differs_per_iteration_and_process():
    seeds = {step_seed(0, it, rank) for it in range(3) for rank in range(2)}
    assert len(seeds) == 6 and step_seed(0, 1, 1) == step_seed(0, 1, 1)
    assert step_seed(1, 1, 1) != step_seed(0, 1, 1)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="ADV_TRAIN.RATIO"):
        AdversarialExamples(ratio=1.5)
    with pytest.raises(ValueError, match="ADV_TRAIN.ATTACK"):
        AdversarialExamples(attack="pgd40")


def test_eps_warmup_ramps_linearly():
    ex = AdversarialExamples(eps=8.0, warmup_iters=4)
    assert [ex.eps_at(i) for i in range(5)] == [2.0, 4.0, 6.0, 8.0, 8.0]


# ----------------------------------------------------------------------------- on UPSNet
def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DEVICE", "cpu"))
    model.train()
    return model


def _batch():
    return [make_panoptic_input(seed=s) for s in (0, 1, 2)]


def test_crafting_freezes_norms_restores_modes_and_keeps_the_rest(tiny_model):
    model = tiny_model
    norms = _norm_layers(model)
    assert norms, "the tiny UPSNet has batch norms"
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, i: seen.append(m.training)) for m in norms]
    try:
        batch = _batch()
        with EventStorage():
            out = AdversarialExamples(eps=4.0, ratio=0.67, seed=3)(model, batch, iteration=7)
    finally:
        for h in handles:
            h.remove()
    assert seen and not any(seen), "norm layers ran in training mode while crafting"
    assert model.training and all(m.training for m in norms), "train mode not restored"
    for m, (mean, var) in zip(norms, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    # round(0.67 * 3) = 2 adversarial images, the third one untouched, labels untouched
    for d, ref in zip(out[:2], batch[:2]):
        diff = d["image"].float() - ref["image"].float()
        assert d["image"].dtype == torch.float32 and 0 < diff.abs().max() <= 4.0 + 1e-4
        assert 0 <= d["image"].min() and d["image"].max() <= 255
        assert torch.equal(d["sem_seg"], ref["sem_seg"]) and d["instances"] is ref["instances"]
    assert out[2] is batch[2]


def test_crafting_is_deterministic_per_seed_iteration_and_process(tiny_model):
    batch = _batch()[:2]
    ex = AdversarialExamples(eps=4.0, seed=3)

    def images(**kw):
        with EventStorage():
            return torch.stack([d["image"] for d in ex(tiny_model, batch, **kw)])

    a = images(iteration=1, rank=0)
    assert torch.equal(a, images(iteration=1, rank=0))
    assert not torch.equal(a, images(iteration=1, rank=1))
    assert not torch.equal(a, images(iteration=2, rank=0))


# ----------------------------------------------------------------------------- the Trainer
def _train_cfg(names, tmp_path, *opts):
    return tiny_cfg(
        "DATASETS.TRAIN", f"('{names['train']}',)",
        "DATASETS.TEST", f"('{names['val']}',)",
        "OUTPUT_DIR", str(tmp_path),
        *TRAIN_OPTS,
        *opts,
    )


def test_trainer_trains_on_adversarial_batches_and_runs_the_guard(synthetic_cityscapes_names, tmp_path):
    cfg = _train_cfg(synthetic_cityscapes_names, tmp_path, "ADV_TRAIN.GUARD.PERIOD", "2",
                     "ADV_TRAIN.GUARD.NUM_STEPS", "2")
    trainer = Trainer(cfg)
    crafted = []
    examples = trainer._trainer.data_loader.examples
    original = examples.__class__.__call__

    def spy(self, model, batch, iteration, rank=0):
        out = original(self, model, batch, iteration, rank)
        crafted.append((iteration, [d["image"].dtype for d in out]))
        return out

    examples.__class__.__call__ = spy
    try:
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        examples.__class__.__call__ = original
    assert [it for it, _ in crafted] == [0, 1, 2]
    assert all(dt == torch.float32 for _, dts in crafted for dt in dts)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert any("adv_time" in m for m in metrics)
    assert any("adv_guard/pgd_loss" in m for m in metrics)
    events = json.load(open(tmp_path / "adv_guard.json"))
    assert [e["iteration"] for e in events] == [1] and events[0]["decision"] == "best"
    assert (tmp_path / "model_adv_best.pth").exists()


def _two_process_worker(root, out_dir):
    from detectron2.utils import comm

    from upsnet_robust.data import register_synthetic_cityscapes_panoptic

    names = dict(zip(("train", "val"), register_synthetic_cityscapes_panoptic(
        root, name_prefix="adv_two_process")))
    cfg = _train_cfg(names, out_dir, "SOLVER.MAX_ITER", "2")
    hashes = []
    original = AdversarialExamples.__call__

    def spy(self, model, batch, iteration, rank=0):
        out = original(self, model, batch, iteration, rank)
        hashes.append(hashlib.sha256(torch.stack([d["image"] for d in out]).numpy()).hexdigest())
        return out

    AdversarialExamples.__call__ = spy
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # parameters only: BN running statistics are per process (DDP without broadcast_buffers,
    # as detectron2 builds it), in standard training too
    params = dict(trainer.model.module.named_parameters())
    digest = hashlib.sha256()
    for k in sorted(params):
        digest.update(params[k].detach().cpu().numpy().tobytes())
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"images": hashes, "weights": digest.hexdigest()}, f)


@pytest.mark.slow
def test_two_processes_keep_identical_replicas_with_different_adversarial_images(
    synthetic_cityscapes_root, tmp_path
):
    from detectron2.engine import launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launch(_two_process_worker, 2, dist_url="auto", args=(synthetic_cityscapes_root, str(tmp_path)))
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["weights"] == r1["weights"], "the replicas' weights differ after training"
    assert len(r0["images"]) == 2 and all(a != b for a, b in zip(r0["images"], r1["images"]))


# ----------------------------------------------------------------------------- the guard
def test_guard_decision_rules():
    best = {"pgd_loss": 2.0, "train_attack_loss": 1.5, "robust_acc": 0.6}
    assert guard_decision(best, None, 0.2, 1.5) == "best"
    assert guard_decision(dict(best, robust_acc=0.7), best, 0.2, 1.5) == "best"
    assert guard_decision(dict(best, robust_acc=0.5), best, 0.2, 1.5) == "ok"
    assert guard_decision(dict(best, robust_acc=0.39), best, 0.2, 1.5) == "collapse"
    # without accuracy: PGD finds much more while the training attack finds less
    no_acc = {"pgd_loss": 2.0, "train_attack_loss": 1.5}
    assert guard_decision({"pgd_loss": 3.1, "train_attack_loss": 1.4}, no_acc, 0.2, 1.5) == "collapse"
    assert guard_decision({"pgd_loss": 3.1, "train_attack_loss": 1.6}, no_acc, 0.2, 1.5) == "ok"
    assert guard_decision({"pgd_loss": 1.9, "train_attack_loss": 1.6}, no_acc, 0.2, 1.5) == "best"


def test_guard_rolls_back_a_constructed_collapse(synthetic_cityscapes_names, tmp_path):
    """The shipped tiny UPSNet is measured (best), then its semantic head is wrecked (robust
    pixel accuracy collapses): the guard restores the weights and the optimiser, and says so."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from upsnet_robust.adapters.base import adapter_class

    cfg = _train_cfg(synthetic_cityscapes_names, tmp_path, "MODEL.WEIGHTS", SHIPPED)
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(SHIPPED)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mapper = adapter_class(model).train_mapper(cfg)
    batch = [mapper(d) for d in DatasetCatalog.get(synthetic_cityscapes_names["train"])[:2]]
    guard = OverfittingGuard(
        batch,
        AdversarialExamples(eps=2.0),
        adapter_class(model)(model, MetadataCatalog.get(synthetic_cityscapes_names["train"])),
        period=1,
        num_steps=2,
        output_dir=str(tmp_path),
    )
    assert guard.check(model, optimizer, 0) == "best"
    first = guard.events[0]
    assert first["robust_acc"] is not None and first["robust_acc"] > 0.3
    good = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.sem_seg_head
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 5)
    assert guard.check(model, optimizer, 1) == "collapse"
    assert guard.rollbacks == 1 and guard.events[1]["rolled_back_to"] == 0
    assert guard.events[1]["robust_acc"] < first["robust_acc"] - 0.2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    assert json.load(open(tmp_path / "adv_guard.json"))[1]["decision"] == "collapse"


def test_a_dense_objective_crafts_in_eval_mode_against_the_training_labels(tiny_model):
    """ADV_TRAIN.OBJECTIVE semantic_ce: the attack raises the cross-entropy of the model's dense
    logits to the batch's own sem_seg (training labels are the model's classes)."""
    import torch.nn.functional as F

    from upsnet_robust.adapters.base import adapter_class, eval_mode

    batch = _batch()[:2]
    ex = AdversarialExamples(eps=8.0, objective="semantic_ce", seed=1)
    modes = []
    handle = tiny_model.backbone.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    try:
        with EventStorage():
            out = ex(tiny_model, batch, iteration=0)
    finally:
        handle.remove()
    assert modes and not any(modes) and tiny_model.training
    adapter = adapter_class(tiny_model)(tiny_model)

    def ce(images):
        with eval_mode(tiny_model), torch.no_grad():
            logits = adapter.dense_logits([im.float() for im in images])
        return sum(F.cross_entropy(lg[None], d["sem_seg"][None], ignore_index=255)
                   for lg, d in zip(logits, batch))

    assert ce([d["image"] for d in out]) > ce([d["image"] for d in batch])
    with pytest.raises(ValueError, match="ADV_TRAIN.OBJECTIVE"):
        AdversarialExamples(objective="panoptic")


FAMILIES = {
    "panoptic_fpn": "panoptic_fpn_tiny.yaml",
    "panoptic_deeplab": "panoptic_deeplab_tiny.yaml",
    "semantic_fpn": "semantic_fpn_tiny.yaml",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_with_training_losses_trains_adversarially(
    family, synthetic_cityscapes_root, synthetic_cityscapes_names, tmp_path
):
    """Two adversarial iterations of each other model family on its own training mapper; the
    crafted images are scored by the model's training losses (each one higher than clean)."""
    from upsnet_robust.data import register_synthetic_cityscapes_semantic
    from upsnet_robust.engine import get_upsnet_cfg, merge_with_hints

    names = synthetic_cityscapes_names
    if family == "semantic_fpn":
        names = dict(zip(("train", "val"), register_synthetic_cityscapes_semantic(
            synthetic_cityscapes_root, name_prefix="adv_semantic")))
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, os.path.join(REPO_ROOT, "configs", "Synthetic", FAMILIES[family]), [
        "DATASETS.TRAIN", f"('{names['train']}',)", "DATASETS.TEST", f"('{names['val']}',)",
        "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", "", *TRAIN_OPTS, "SOLVER.MAX_ITER", "2",
    ])
    trainer = Trainer(cfg)
    examples = trainer._trainer.data_loader.examples
    rises = []
    original = type(examples).__call__

    def spy(self, model, batch, iteration, rank=0):
        out = original(self, model, batch, iteration, rank)
        loss = self.loss_fn(model, batch)
        with self.crafting_mode(model), EventStorage(), torch.no_grad():
            for clean, adv in ((batch, out),):
                torch.manual_seed(0)
                before = float(loss(torch.stack([d["image"].float() for d in clean])))
                torch.manual_seed(0)
                after = float(loss(torch.stack([d["image"] for d in adv])))
        rises.append(after > before)
        return out

    type(examples).__call__ = spy
    try:
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        type(examples).__call__ = original
    assert len(rises) == 2 and all(rises)
