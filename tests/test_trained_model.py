# Copyright (c) UPSNetRobust authors.
"""Sanity of attacks on the shipped tiny model (trained by `make demo`'s command): PQ under I-FGSM
does not rise with eps, and the iterative attack is at least as strong as FGSM."""
import os

import pytest
from conftest import REPO_ROOT, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.data import generate_synthetic_cityscapes, register_synthetic_cityscapes_panoptic
from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import run_robustness_sweep

CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
TOLERANCE = 0.5  # PQ points, as in the report's sanity checks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.isfile(CHECKPOINT), reason=f"{CHECKPOINT} missing (make demo trains it)"
    ),
]


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trained") / "synthetic_cityscapes")
    # Fresh scenes at the training resolution (seed 1: not the training images).
    generate_synthetic_cityscapes(root, num_train=1, num_val=6, seed=1, show_progress=False)
    names = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_trained")
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names[1]}',)",
        "MODEL.WEIGHTS", CHECKPOINT,
        "OUTPUT_DIR", str(tmp_path_factory.mktemp("sweep")),
        "ROBUSTNESS.ATTACKS", "['fgsm', 'ifgsm']",
        "ROBUSTNESS.EPSILONS", "[1.0, 4.0, 16.0]",
        "ROBUSTNESS.DEFENSES", "['none']",
        "ROBUSTNESS.NUM_EXAMPLES", "0",
        "DATALOADER.NUM_WORKERS", "0",
    )
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(CHECKPOINT)
    return run_robustness_sweep(cfg, model.eval())["cells"]


def _pq(cells, attack, eps):
    return next(c["PQ"] for c in cells if c["attack"] == attack and c["eps"] == eps)


def test_clean_pq_is_high(trained_sweep):
    assert _pq(trained_sweep, "clean", 0.0) >= 40


def test_ifgsm_pq_does_not_rise_with_eps(trained_sweep):
    series = [_pq(trained_sweep, "clean", 0.0)] + [_pq(trained_sweep, "ifgsm", e) for e in (1.0, 4.0, 16.0)]
    assert all(b <= a + TOLERANCE for a, b in zip(series, series[1:])), series
    assert series[-1] < series[0] - 10, f"eps 16 should hurt a lot: {series}"


def test_iterative_at_least_as_strong_as_fgsm(trained_sweep):
    for eps in (1.0, 4.0, 16.0):
        assert _pq(trained_sweep, "ifgsm", eps) <= _pq(trained_sweep, "fgsm", eps) + TOLERANCE, eps
