# Copyright (c) UPSNetRobust authors.
"""The shipped adversarially trained tiny UPSNet against the standard one, in one report
(ROBUSTNESS.COMPARE_WEIGHTS): far more robust under a white-box PGD, no worse clean, and not by
gradient masking (no white-box attack weaker than random search, a loss that rises with eps, and
images crafted on the standard model weaker on it than its own white-box attack)."""
import json
import os

import pytest
from conftest import REPO_ROOT, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.data import generate_synthetic_cityscapes, register_synthetic_cityscapes_panoptic
from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import run_robustness_sweep
from upsnet_robust.evaluation.transfer import TransferModel, TransferStudy
from upsnet_robust.evaluation.transfer_report import transfer_checks

STANDARD = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
ROBUST = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic_adv.pth")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def val_name(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adv") / "synthetic_cityscapes")
    # Fresh scenes at the training resolution (seed 1: not the training images).
    generate_synthetic_cityscapes(root, num_train=1, num_val=6, seed=1, show_progress=False)
    return register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_adv_shipped")[1]


@pytest.fixture(scope="module")
def report(val_name, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{val_name}',)", "MODEL.WEIGHTS", STANDARD, "OUTPUT_DIR", str(out),
        "ROBUSTNESS.ATTACKS", "['pgd', 'random_search']", "ROBUSTNESS.EPSILONS", "[4.0, 8.0]",
        "ROBUSTNESS.OBJECTIVE", "semantic_ce", "ROBUSTNESS.NUM_STEPS", "10",
        "ROBUSTNESS.STEP_SIZE", "2.0", "ROBUSTNESS.RANDOM_START", "True",
        "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.NUM_EXAMPLES", "0",
        "ROBUSTNESS.COMPARE_WEIGHTS", f"['adv={ROBUST}']", "DATALOADER.NUM_WORKERS", "0",
    )
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(STANDARD)
    run_robustness_sweep(cfg, model.eval())
    return json.load(open(out / "robustness.json"))


def _pq(report, attack, defense, eps=8.0):
    return next(c["PQ"] for c in report["cells"] if c["attack"] == attack
                and c["defense"] == defense and c["eps"] in (0.0, eps))  # fmt: skip


def test_robust_model_resists_pgd_without_losing_clean_pq(report):
    # measured (AMD EPYC): clean 82.7 vs 83.3; PGD-10 at eps 8 66.4 vs 73.0 (+6.6), so a gain of
    # 5 leaves room for CPU-to-CPU float differences (well under a PQ point) but not for a model
    # that is not robust (the standard weights as "adv" give +0)
    assert _pq(report, "clean", "adv") >= _pq(report, "clean", "none") - 5
    assert _pq(report, "pgd", "adv") >= _pq(report, "pgd", "none") + 5


def test_no_gradient_masking_flag(report):
    masking = [c for c in report["checks"] if c["check"].startswith("white_box_vs_random")]
    assert len(masking) == 4, masking  # PGD against random search, at each eps on each model
    assert all(c["passed"] for c in masking), masking


def test_robust_models_loss_rises_with_eps(report):
    rising = [c for c in report["checks"] if c["check"].startswith("loss_rises_with_eps")]
    assert len(rising) == 4, rising  # PGD and random search, on each model
    assert all(c["passed"] for c in rising), rising
    adv = sorted((c["eps"], c["attack_loss"]) for c in report["cells"]
                 if c["attack"] == "pgd" and c["defense"] == "adv")  # fmt: skip
    assert adv[0][1] < adv[1][1], adv


def test_transfer_from_the_standard_model_is_weaker_than_white_box(val_name, tmp_path):
    """Images crafted on the standard model hurt the robust one less than its own white-box PGD
    (a robust model whose own gradients mislead its attacker would fail the check)."""
    opts = ("DATASETS.TEST", f"('{val_name}',)", "ROBUSTNESS.ATTACKS", "['pgd']",
            "ROBUSTNESS.EPSILONS", "[8.0]", "ROBUSTNESS.OBJECTIVE", "semantic_ce",
            "ROBUSTNESS.NUM_STEPS", "10", "ROBUSTNESS.STEP_SIZE", "2.0",
            "ROBUSTNESS.RANDOM_START", "True", "ROBUSTNESS.DEFENSES", "['none']",
            "DATALOADER.NUM_WORKERS", "0")  # fmt: skip
    models = []
    for name, weights in (("standard", STANDARD), ("adv", ROBUST)):
        cfg = tiny_cfg(*opts, "MODEL.WEIGHTS", weights)
        model = build_model(cfg)
        build_checkpointer(cfg, model).load(weights)
        models.append(TransferModel(name, cfg, model.eval()))
    entries = TransferStudy(models, str(tmp_path)).run()
    pq = {(e["source"], e["target"]): e["PQ"] for e in entries if e["attack"] == "pgd"}
    # measured (AMD EPYC): standard -> adv 74.9, adv white-box 73.0 (standard white-box 66.4,
    # adv -> standard 71.6); CPU-to-CPU float differences stay well under a PQ point
    assert pq[("standard", "adv")] > pq[("adv", "adv")]
    checks = [c for c in transfer_checks(entries) if "-> adv" in c["name"]]
    assert len(checks) == 1 and checks[0]["passed"], checks
