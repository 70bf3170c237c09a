# Copyright (c) UPSNetRobust authors.
"""Attack-strength sanity checks on hand-made cells: an ensemble not weaker than its members,
more iterations not weaker, APGD not weaker than PGD at an equal gradient budget. Each check is
shown to fire on a violation and to stay quiet (or pass) without one."""

import pytest

from upsnet_robust.evaluation.report import METRIC_TOLERANCE, sanity_checks
from upsnet_robust.evaluation.report.checks import (
    ENSEMBLE_TOLERANCE,
    check_apgd_vs_pgd,
    LOSS_TOLERANCE,
    check_ensemble_vs_members,
    check_loss_rises_with_eps,
    check_more_steps,
)


def _cell(attack, eps, pq, defense="none", **kw):
    cell = {
        "attack": attack,
        "objective": None if attack == "clean" else "train_losses",
        "eps": float(eps),
        "num_steps": 0 if attack == "clean" else 10,
        "step_size": 0.0 if attack == "clean" else 1.0,
        "random_start": attack in ("pgd", "apgd"),
        "restarts": 1,
        "defense": defense,
        "adaptive": False,
        "quantized": False,
        "PQ": pq,
        "num_images": 4,
        "num_failed": 0,
        "failures": [],
    }
    cell.update(kw)
    return cell


def _members(*pqs):
    names = ("apgd", "apgd", "apgd")
    objectives = ("masked_ce", "balanced_masked_ce", "js_divergence")
    return [
        {"attack": a, "objective": o, "num_steps": 100, "PQ": v}
        for a, o, v in zip(names, objectives, pqs)
    ]


def _failed(checks):
    return [c["check"] for c in checks if not c["passed"]]


# -- ensemble_vs_members -------------------------------------------------------------------------
def test_ensemble_not_weaker_than_its_members_passes():
    cells = [_cell("clean", 0, 60.0), _cell("sea", 4, 20.0, members=_members(25.0, 20.0, 30.0))]
    checks = check_ensemble_vs_members(cells)
    assert len(checks) == 1 and checks[0]["passed"]
    assert "20.00" in checks[0]["detail"] and "js_divergence" in checks[0]["detail"]


@pytest.mark.parametrize("attack", ["sea", "sea_fast"])
def test_ensemble_above_a_member_is_flagged(attack):
    # 0.2 points above the strongest member: within the 0.5 of the other checks, but an
    # ensemble of its members' own predictions cannot be weaker than any of them.
    cells = [_cell(attack, 4, 20.2, members=_members(25.0, 20.0, 30.0))]
    checks = check_ensemble_vs_members(cells)
    assert _failed(checks) == [f"ensemble_vs_members: {attack}/train_losses/none eps=4"]
    assert "WEAKER than its member apgd/balanced_masked_ce" in checks[0]["detail"]
    # ... and it reaches the full set of checks.
    assert _failed(sanity_checks(cells)) == _failed(checks)
    # Within rounding it passes.
    cells[0]["PQ"] = 20.0 + ENSEMBLE_TOLERANCE / 2
    assert not _failed(check_ensemble_vs_members(cells))


def test_ensemble_without_member_scores_is_flagged_and_other_attacks_ignored():
    no_members = _cell("sea", 4, 10.0)
    unscored = _cell("sea", 8, 5.0, members=[{"attack": "apgd", "objective": "x", "PQ": None}])
    checks = check_ensemble_vs_members([no_members, unscored, _cell("pgd", 4, 50.0)])
    assert len(checks) == 2 and not any(c["passed"] for c in checks)
    assert "no members list" in checks[0]["detail"]
    assert "no member PQ" in checks[1]["detail"]
    # A "members" key on a non-ensemble attack is not an ensemble.
    assert check_ensemble_vs_members([_cell("pgd", 4, 50.0, members=_members(1.0))]) == []


def test_ensemble_members_use_the_headline_metric():
    cell = _cell("sea", 4, None, task="sem_seg", mIoU=30.0)
    del cell["PQ"]
    cell["members"] = [{"attack": "apgd", "objective": "masked_ce", "num_steps": 5, "mIoU": 29.0,
                        "PQ": 99.0}]  # fmt: skip
    assert _failed(check_ensemble_vs_members([cell])) == [
        "ensemble_vs_members: sea/train_losses/none eps=4"
    ]


# -- more_steps ----------------------------------------------------------------------------------
def test_more_steps_weaker_is_flagged_beyond_the_tolerance():
    base = [_cell("clean", 0, 60.0), _cell("pgd", 4, 30.0, num_steps=10)]
    assert not _failed(check_more_steps(base + [_cell("pgd", 4, 29.0, num_steps=50)]))
    within = base + [_cell("pgd", 4, 30.0 + 0.9 * METRIC_TOLERANCE, num_steps=50)]
    assert not _failed(check_more_steps(within))
    beyond = base + [_cell("pgd", 4, 30.0 + 1.5 * METRIC_TOLERANCE, num_steps=50)]
    assert _failed(check_more_steps(beyond)) == ["more_steps: pgd/train_losses/none eps=4"]
    assert _failed(sanity_checks(beyond)) == ["more_steps: pgd/train_losses/none eps=4"]


@pytest.mark.parametrize("change", [{"step_size": 0.25}, {"random_start": False}])
def test_more_steps_compares_only_the_same_step_size_and_random_start(change):
    # 50 small steps (or 50 steps without random start) scoring higher than 10 is another
    # attack, not an inversion: not compared, so no check at all.
    cells = [_cell("pgd", 4, 30.0, num_steps=10), _cell("pgd", 4, 35.0, num_steps=50, **change)]
    assert check_more_steps(cells) == []
    # With a same-setting partner the variant is named in the check.
    cells.append(_cell("pgd", 4, 36.0, num_steps=100, **change))
    (check,) = check_more_steps(cells)
    assert not check["passed"] and "step=" in check["check"] and "random_start=" in check["check"]


# -- apgd_vs_pgd ---------------------------------------------------------------------------------
def test_apgd_weaker_than_pgd_at_equal_passes_is_flagged():
    cells = [
        _cell("clean", 0, 60.0),
        _cell("pgd", 4, 30.0, num_steps=20, restarts=5),
        _cell("apgd", 4, 31.0, num_steps=100, restarts=1),  # 100 passes each
    ]
    name = "apgd_vs_pgd: train_losses/none eps=4 passes=100"
    assert _failed(check_apgd_vs_pgd(cells)) == [name]
    assert _failed(sanity_checks(cells)) == [name]


def test_apgd_vs_pgd_passes_within_tolerance_and_ignores_other_budgets():
    ok = [_cell("pgd", 4, 30.0, num_steps=100), _cell("apgd", 4, 30.4, num_steps=100)]
    (check,) = check_apgd_vs_pgd(ok)
    assert check["passed"] and "100 passes" in check["detail"]
    # Different budgets, objectives, eps or defenses are not compared.
    others = [
        _cell("pgd", 4, 10.0, num_steps=200),
        _cell("pgd", 4, 10.0, num_steps=100, objective="masked_ce"),
        _cell("pgd", 8, 10.0, num_steps=100),
        _cell("pgd", 4, 10.0, num_steps=100, defense="median"),
    ]
    assert check_apgd_vs_pgd([_cell("apgd", 4, 30.0, num_steps=100)] + others) == []


# -- how the report names ensemble members -------------------------------------------------------
def test_report_titles_members_by_objective_and_names_their_ensemble():
    from upsnet_robust.evaluation.report import as_cells, markdown_report, report_kind

    cells = [
        _cell("clean", 0, 60.0),
        _cell("apgd", 16, 25.0, objective="masked_ce", member_of=["sea"]),
        _cell("apgd", 16, 30.0, objective="js_divergence", member_of=["sea", "sea_fast"]),
        _cell("pgd", 16, 40.0),
        _cell("pgd", 16, 45.0, adaptive=True, defense="median"),  # same objective: no bracket
        _cell("sea", 16, 20.0, objective="ensemble", members=_members(25.0, 30.0)),
    ]
    cells = as_cells(cells)
    text = markdown_report(cells, report_kind(cells), {}, sanity_checks(cells), METRIC_TOLERANCE)
    assert "## Attack: apgd [masked_ce]" in text and "## Attack: apgd [js_divergence]" in text
    assert "## Attack: pgd\n" in text and "## Attack: pgd (adaptive)\n" in text  # one objective
    assert "Member of `sea`: " in text and "Member of `sea`, `sea_fast`: " in text
    assert "greedy selection" in text
    # the threat model says what each objective used makes the attack maximise
    assert "`masked_ce`: cross-entropy on the pixels still classified correctly" in text
    assert "`ensemble`: per image, the member prediction" in text
    assert "`segment`" not in text  # not used here


def test_every_built_in_objective_has_a_threat_model_text():
    from upsnet_robust.attacks.objectives import OBJECTIVE_REGISTRY
    from upsnet_robust.evaluation.report.markdown import objective_text

    built_in = [n for n, c in OBJECTIVE_REGISTRY if c.__module__.startswith("upsnet_robust.")]
    assert "segment" in built_in and len(built_in) >= 10
    # each declares its own description (the report's text), none falls back to the default
    generic = [n for n in built_in if objective_text(n) == "a registered objective"]
    assert generic == []


# -- loss_rises_with_eps -------------------------------------------------------------------------
def _loss_series(losses, **kw):
    return [_cell("clean", 0, 60.0)] + [
        _cell("pgd", e, 50.0 - e, attack_loss=v, **kw) for e, v in zip((1, 4, 8, 16), losses)
    ]


def test_loss_rising_with_eps_passes():
    (check,) = check_loss_rises_with_eps(_loss_series([0.5, 1.2, 2.0, 2.0]))
    assert check["passed"], check
    assert check["check"] == "loss_rises_with_eps: pgd/train_losses/none"
    assert "16: 2" in check["detail"]


def test_loss_falling_with_eps_is_flagged_against_the_highest_smaller_eps():
    # eps 16 is above eps 8 but below eps 4: compared with the highest loss so far
    (check,) = check_loss_rises_with_eps(_loss_series([0.5, 2.0, 1.0, 1.5]))
    assert not check["passed"]
    assert "eps 8: 1 < 2 at eps 4" in check["detail"]
    assert "16: 1.5 < 2 at eps 4" in check["detail"]


def test_loss_check_tolerance_is_relative():
    top = 10.0
    within = top * (1 - LOSS_TOLERANCE) + 1e-6
    beyond = top * (1 - LOSS_TOLERANCE) - 1e-3
    assert check_loss_rises_with_eps(_loss_series([1.0, top, within, top]))[0]["passed"]
    assert not check_loss_rises_with_eps(_loss_series([1.0, top, beyond, top]))[0]["passed"]


def test_loss_check_skips_cells_without_a_loss_and_single_eps_series():
    cells = _loss_series([0.5, 2.0, 1.0, 1.5])
    for c in cells:
        c.pop("attack_loss", None)
    assert check_loss_rises_with_eps(cells) == []
    one = [_cell("clean", 0, 60.0), _cell("pgd", 4, 40.0, attack_loss=1.0)]
    assert check_loss_rises_with_eps(one) == []


def test_loss_check_keeps_defenses_and_step_sizes_apart():
    cells = _loss_series([1.0, 2.0, 3.0, 4.0]) + [
        _cell("pgd", 8, 30.0, attack_loss=0.1, step_size=2.0),
        _cell("pgd", 16, 20.0, attack_loss=0.2, step_size=2.0),
        _cell("pgd", 8, 30.0, attack_loss=5.0, defense="median"),
        _cell("pgd", 16, 20.0, attack_loss=1.0, defense="median"),
    ]
    checks = {c["check"]: c["passed"] for c in check_loss_rises_with_eps(cells)}
    assert checks == {
        "loss_rises_with_eps: pgd/train_losses/none step=1 random_start=True": True,
        "loss_rises_with_eps: pgd/train_losses/none step=2 random_start=True": True,
        "loss_rises_with_eps: pgd/train_losses/median": False,
    }
    assert "loss_rises_with_eps" in {c["check"].split(":")[0] for c in sanity_checks(cells)}
