# Copyright (c) UPSNetRobust authors.
"""ROBUSTNESS.EARLY_STOP: an image stops once none of its labelled pixels is correct, the rest of
the batch goes on, the batch ends when all have stopped, and passes are counted per image."""
import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from upsnet_robust.adapters import DENSE_LOGITS, ModelAdapter, register_adapter
from upsnet_robust.attacks import APGD, IFGSM, PGD, SegPGD, build_attack, build_objective
from upsnet_robust.config import add_robustness_config
from upsnet_robust.evaluation.checks import check_early_stop

THRESHOLD = 100.0
IGNORE = 255


class ThresholdNet(nn.Module):
    """Two classes per pixel: z0 = THRESHOLD - mean over channels, z1 = 0. A pixel is class 0
    (its label) while its mean is below THRESHOLD; every sign step of +1 raises it by 1."""

    def forward(self, inputs):  # pragma: no cover - only the adapter is used
        raise NotImplementedError


@register_adapter("ThresholdNet")
class ThresholdNetAdapter(ModelAdapter):
    task = "sem_seg"
    capabilities = frozenset({DENSE_LOGITS})

    @property
    def device(self):
        return torch.device("cpu")

    def dense_logits(self, images):
        return [torch.stack([THRESHOLD - im.mean(0), torch.zeros_like(im[0])]) for im in images]


def _image(steps_to_break, h=3, w=4):
    """Pixel p needs j_p in 1..steps_to_break steps of +1 to turn wrong (all values occur)."""
    j = torch.arange(h * w).reshape(h, w) % steps_to_break + 1
    return (THRESHOLD - j + 0.5).float().expand(3, h, w).clone()


def _inputs(*ks):
    inputs = []
    for i, k in enumerate(ks):
        sem = torch.zeros(3, 4, dtype=torch.long)
        sem[0, 0] = IGNORE  # ignored pixels do not count
        inputs.append({"image": _image(k), "image_id": f"img{i}", "sem_seg": sem})
    return inputs


def _correct(images, inputs):
    """Labelled pixels still class 0, per image (independent of the objective's record)."""
    return [int(((im.mean(0) < THRESHOLD) & (x["sem_seg"] != IGNORE)).sum())
            for im, x in zip(images, inputs)]  # fmt: skip


def _run(attack, inputs, objective="semantic_ce"):
    model = ThresholdNet()
    x = torch.stack([v["image"] for v in inputs])
    obj = build_objective(objective, model, inputs, batched=True)
    with torch.no_grad():
        adv = attack.perturb(x, obj)
    return x, adv


@pytest.mark.parametrize("early_stop", [False, True])
def test_ifgsm_stops_each_image_after_its_steps(early_stop):
    inputs = _inputs(2, 5)  # image 0: every pixel wrong after 2 steps; image 1: after 5
    attack = IFGSM(10.0, step_size=1.0, num_steps=8, early_stop=early_stop)
    x, adv = _run(attack, inputs)
    moved = (adv - x).amax(dim=(1, 2, 3))
    assert ((adv - x).abs() <= 10.0 + 1e-5).all()
    if early_stop:
        # image 0: 2 steps, then the 3rd pass (at the point of step 2) finds nothing left; image
        # 1 goes on in the same batch; after its 6th pass nothing is left anywhere: loop ends
        assert moved.tolist() == [2.0, 5.0]
        assert attack.image_passes.tolist() == [3, 6]
        assert attack.num_forward_backward == 6 and attack.num_image_passes == 9
        assert _correct(adv, inputs) == [0, 0]
        assert attack.describe()["early_stop"] is True
    else:  # nothing changes: every image takes all 8 steps
        assert moved.tolist() == [8.0, 8.0]
        assert attack.image_passes.tolist() == [8, 8] and attack.num_forward_backward == 8
        assert "early_stop" not in attack.describe()


def test_an_image_that_cannot_be_broken_runs_as_without_early_stop():
    inputs = _inputs(2, 40)  # image 1 needs 40 steps: more than the budget allows
    x, stopped = _run(PGD(6.0, step_size=1.0, num_steps=10, early_stop=True), inputs)
    _, plain = _run(PGD(6.0, step_size=1.0, num_steps=10), inputs)
    assert torch.equal(stopped[1], plain[1])
    assert not torch.equal(stopped[0], plain[0]) and _correct(stopped, inputs)[0] == 0


def test_pgd_restarts_skip_a_stopped_image_and_keep_its_point():
    inputs = _inputs(2, 40)
    attack = PGD(6.0, step_size=1.0, num_steps=10, restarts=2, random_start=True,
                 generator=torch.Generator().manual_seed(0), early_stop=True)  # fmt: skip
    x, adv = _run(attack, inputs)
    assert ((adv - x).abs() <= 6.0 + 1e-5).all() and (adv >= 0).all() and (adv <= 255).all()
    passes = attack.image_passes.tolist()
    one_run = PGD(6.0, step_size=1.0, num_steps=10, random_start=True,
                  generator=torch.Generator().manual_seed(0), early_stop=True)  # fmt: skip
    _, first = _run(one_run, inputs)
    # image 0 stopped in the first run (same start) and was not run again; image 1 ran twice
    assert passes[1] == 20 and passes[0] == one_run.image_passes.tolist()[0] < 10
    assert torch.equal(adv[0], first[0])
    assert _correct(adv, inputs)[0] == 0


def test_apgd_stops_an_image_and_keeps_the_other_running():
    inputs = _inputs(3, 40)  # eps 8: one step of 2 eps (clipped to eps) breaks image 0
    x, stopped = _run(APGD(8.0, num_steps=12, early_stop=True), inputs)
    attack = APGD(8.0, num_steps=12, early_stop=True)
    _run(attack, inputs)
    assert attack.image_passes.tolist() == [2, 12]  # start, first iterate; all 12 for image 1
    assert _correct(stopped, inputs)[0] == 0
    assert ((stopped - x).abs() <= 8.0 + 1e-5).all()
    plain = APGD(8.0, num_steps=12)
    _, ref = _run(plain, inputs)
    assert torch.equal(stopped[1], ref[1]) and plain.image_passes.tolist() == [12, 12]
    # both stop: the loop ends and saves the batch's passes
    both = APGD(8.0, num_steps=12, early_stop=True)
    _, adv = _run(both, _inputs(3, 2))
    assert both.num_forward_backward == 2 and _correct(adv, _inputs(3, 2)) == [0, 0]


def test_apgd_radius_schedule_checks_only_the_last_stage():
    inputs = _inputs(3, 3)
    attack = APGD(8.0, num_steps=10, radius_schedule=True, early_stop=True)
    x, adv = _run(attack, inputs)
    assert ((adv - x).abs() <= 8.0 + 1e-5).all() and _correct(adv, inputs) == [0, 0]
    # stages of 3 and 3 iterations at 2 and 1.5 eps run in full, the last stops at once
    assert attack.image_passes.tolist() == [7, 7]


def test_segpgd_reads_correctness_from_its_dense_forward():
    inputs = _inputs(2, 40)
    attack = SegPGD(6.0, step_size=1.0, num_steps=10, early_stop=True)
    x, adv = _run(attack, inputs)
    assert attack.image_passes.tolist()[0] < 10 and attack.image_passes.tolist()[1] == 10
    assert _correct(adv, inputs)[0] == 0


def test_non_dense_or_targeted_objectives_are_rejected():
    inputs = _inputs(2)
    x = inputs[0]["image"][None]
    with pytest.raises(ValueError, match=r"PGD \(pgd\).*EARLY_STOP.*'<lambda>'|PGD \(pgd\).*EARLY"):
        PGD(4.0, num_steps=2, early_stop=True).perturb(x, lambda z: z.sum())
    with pytest.raises(ValueError, match="least_likely"):
        _run(APGD(4.0, num_steps=2, early_stop=True), inputs, objective="least_likely")


def _cfg(*opts):
    cfg = get_cfg()
    add_robustness_config(cfg)
    cfg.ROBUSTNESS.merge_from_list(list(opts))
    return cfg


def test_config_key_builds_and_set_up_checks():
    assert _cfg().ROBUSTNESS.EARLY_STOP is False
    cfg = _cfg("EARLY_STOP", True, "OBJECTIVE", "masked_ce", "NUM_STEPS", 3)
    for name in ("pgd", "ifgsm", "bim", "mifgsm", "segpgd", "cospgd", "apgd"):
        attack = build_attack(cfg, name, 4.0)
        assert attack.early_stop and attack.describe()["early_stop"] is True, name
        assert not build_attack(_cfg("NUM_STEPS", 3), name, 4.0).early_stop
    check_early_stop(cfg.clone())  # passes
    cfg.ROBUSTNESS.ATTACKS = ["fgsm", "pgd"]
    check_early_stop(cfg)  # fgsm has nothing to stop: ignored
    bad = _cfg("EARLY_STOP", True, "OBJECTIVE", "train_losses", "ATTACKS", ["pgd"])
    with pytest.raises(ValueError, match="attack 'pgd' runs with objective 'train_losses'"):
        check_early_stop(bad)
    with pytest.raises(ValueError, match="attack 'illc'.*least_likely"):
        check_early_stop(_cfg("EARLY_STOP", True, "OBJECTIVE", "masked_ce", "ATTACKS", ["illc"]))
    with pytest.raises(ValueError, match="ADAPTIVE"):
        check_early_stop(_cfg("EARLY_STOP", True, "OBJECTIVE", "masked_ce", "ADAPTIVE", True))


def test_apgd_keep_set_up_checks():
    """ROBUSTNESS.APGD_KEEP 'accuracy' reaches APGD and needs a dense objective, at set-up."""
    cfg = _cfg("ATTACKS", ["apgd"], "OBJECTIVE", "masked_ce", "APGD_KEEP", "accuracy")
    check_early_stop(cfg)
    assert build_attack(cfg, "apgd", 4.0).keep == "accuracy"
    assert build_attack(_cfg(), "apgd", 4.0).describe().get("keep") is None  # default: loss
    with pytest.raises(ValueError, match="APGD_KEEP 'accuracy'.*'train_losses'"):
        check_early_stop(_cfg("ATTACKS", ["apgd"], "APGD_KEEP", "accuracy"))
    check_early_stop(_cfg("ATTACKS", ["pgd"], "APGD_KEEP", "accuracy"))  # no apgd: nothing read
    with pytest.raises(ValueError, match="must be 'loss' or 'accuracy'"):
        check_early_stop(_cfg("APGD_KEEP", "pq"))
