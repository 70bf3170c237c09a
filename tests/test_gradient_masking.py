# Copyright (c) UPSNetRobust authors.
"""Gradient-masking checks for robust models: the gradient-free random search against an
independent loop, and the report's white_box_vs_random check on hand-made cells and a sweep."""
import json

import pytest
import torch
from conftest import tiny_cfg

from upsnet_robust.attacks import RandomSearch, build_attack
from upsnet_robust.evaluation.report.checks import (
    check_iterative_vs_single_step,
    check_white_box_vs_random,
)

W = torch.linspace(-1.0, 1.0, 3 * 3 * 4 * 5).reshape(3, 3, 4, 5)


def _objective(x):
    return (torch.cos(x / 9.0) * W.to(x.dtype)).flatten(1).sum(1)


def test_random_search_keeps_the_best_draw_per_image():
    x = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 255
    x[0, 0, 0, 0], x[1, 1, 1, 1] = 0.0, 255.0
    calls = []

    def objective(z):
        calls.append(torch.is_grad_enabled() or z.requires_grad)
        return _objective(z)

    attack = RandomSearch(5.0, num_steps=6, generator=torch.Generator().manual_seed(3))
    out = attack.perturb(x, objective)
    # an independent float64 loop over the same draws
    g = torch.Generator().manual_seed(3)
    best, best_value = x.double().clone(), torch.full((3,), -float("inf"), dtype=torch.float64)
    for _ in range(6):
        u = torch.rand(x.shape, generator=g, dtype=torch.float32).double()
        cand = torch.clamp(x.double() + (2 * u - 1) * 5.0, 0, 255)
        value = _objective(cand)
        for i in range(3):
            if value[i] > best_value[i]:
                best[i], best_value[i] = cand[i], value[i]
    assert torch.allclose(out.double(), best, atol=1e-4)
    assert not any(calls) and len(calls) == 6, "random search must not take gradients"
    assert (out - x).abs().max() <= 5.0 + 1e-4 and out.min() >= 0 and out.max() <= 255
    assert attack.num_forward_backward == 0 and attack.num_image_passes == 18


def test_random_search_from_config():
    attack = build_attack(tiny_cfg("ROBUSTNESS.NUM_STEPS", "7"), "random_search", 4.0)
    assert attack.num_steps == 7 and attack.describe()["num_steps"] == 7
    assert build_attack(tiny_cfg(), "random_search", 4.0).num_steps == 20


def _cell(attack, pq, eps=8.0, objective="semantic_ce", defense="none"):
    return {"attack": attack, "eps": eps, "objective": objective, "defense": defense, "PQ": pq,
            "num_steps": 10}


def test_white_box_vs_random_flags_a_blind_search_beating_a_gradient_attack():
    cells = [_cell("clean", 80.0, eps=0.0, objective=None), _cell("pgd", 50.0),
             _cell("fgsm", 70.0), _cell("random_search", 60.0)]
    checks = {c["check"]: c for c in check_white_box_vs_random(cells)}
    assert len(checks) == 2
    pgd = next(c for n, c in checks.items() if "pgd" in n)
    fgsm = next(c for n, c in checks.items() if "fgsm" in n)
    assert pgd["passed"] and not fgsm["passed"] and "gradient masking" in fgsm["detail"]
    cells[2] = _cell("fgsm", 60.4)  # within the 0.5 tolerance
    assert all(c["passed"] for c in check_white_box_vs_random(cells))
    # another objective or eps is another group; without a blind cell there is nothing to check
    assert check_white_box_vs_random([_cell("pgd", 50.0), _cell("random_search", 40.0, eps=4.0)]) == []


def test_random_search_is_not_held_against_fgsm_as_an_iterative_attack():
    cells = [_cell("fgsm", 50.0), _cell("random_search", 70.0), _cell("pgd", 40.0)]
    names = [c["check"] for c in check_iterative_vs_single_step(cells)]
    assert any("pgd" in n for n in names) and not any("random_search" in n for n in names)


@pytest.mark.slow
def test_sweep_with_random_search_reports_the_check(synthetic_cityscapes_names, tmp_path):
    from detectron2.modeling import build_model

    from upsnet_robust.evaluation import run_robustness_sweep

    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)", "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['fgsm', 'random_search']", "ROBUSTNESS.EPSILONS", "[8.0]",
        "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.OBJECTIVE", "semantic_ce",
        "ROBUSTNESS.NUM_STEPS", "3", "ROBUSTNESS.MAX_IMAGES", "2", "ROBUSTNESS.NUM_EXAMPLES", "0",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0",
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cells = run_robustness_sweep(cfg, model)["cells"]
    rs = next(c for c in cells if c["attack"] == "random_search")
    assert rs["num_steps"] == 3 and rs["attack_passes_per_image"] == 3
    checks = json.load(open(tmp_path / "robustness.json"))["checks"]
    assert any(c["check"].startswith("white_box_vs_random: fgsm") for c in checks)
