# Copyright (c) UPSNetRobust authors.
"""Sanity checks of a sweep's cells: the consistency an honest robustness evaluation reports.

Each kind of check is one function ``check_<kind>(cells, tol) -> list of check dicts``; the
kinds are listed in :data:`CHECKS`, in report order, and :func:`sanity_checks` runs them all.
Every check compares the cells' headline metric (``PQ``, ``mIoU``, ``AP``: see
:mod:`.cells`) with an absolute tolerance of :data:`METRIC_TOLERANCE` = 0.5 points of that
metric: a stronger setting may score up to 0.5 points *above* a weaker one before it is
flagged. That absorbs evaluation noise on small image subsets (one segment flipping on 30
images moves PQ by roughly that much) without hiding a real inversion. The one exception is
``ensemble_vs_members`` (:data:`ENSEMBLE_TOLERANCE`, rounding only): an ensemble and its
members score the same images, so there is no noise to absorb. A violated check is always
reported, never dropped.

A new kind of check: write ``check_<kind>`` with the same signature, returning one
:func:`make_check` dict per compared group, and add it to :data:`CHECKS`.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ._format import fmt_eps, min_score, series_label, unique
from .cells import CellLike, ResultCell, as_cells, finite, report_kind

__all__ = [
    "CHECKS",
    "ENSEMBLE_TOLERANCE",
    "METRIC_TOLERANCE",
    "LOSS_TOLERANCE",
    "PQ_TOLERANCE",
    "check_adaptive_vs_transfer",
    "check_apgd_vs_pgd",
    "check_ensemble_vs_members",
    "check_all_cells_scored",
    "check_iterative_vs_single_step",
    "check_loss_rises_with_eps",
    "check_monotone_eps",
    "check_more_restarts",
    "check_more_steps",
    "check_white_box_vs_random",
    "make_check",
    "sanity_checks",
]

# Absolute tolerance, in points (0-100 scale) of the headline metric, of every sanity check.
METRIC_TOLERANCE = 0.5
PQ_TOLERANCE = METRIC_TOLERANCE  # the name from the panoptic-only report

# Absolute tolerance of ensemble_vs_members (rounding only; see that check).
ENSEMBLE_TOLERANCE = 0.01

# Relative tolerance of loss_rises_with_eps: objectives have no common scale, so a larger eps
# may end up to 10 % (of the larger magnitude) below a smaller one before it is flagged. The
# training losses of detection models sample proposals that change with the input, which moves
# their value by a few percent where a small eps barely moves the image (measured: 4.8 % between
# eps 0.25 and 1 on the tiny PanopticFPN, FGSM, 12 images); a falling loss from a masked
# gradient or a broken step control is far larger.
LOSS_TOLERANCE = 0.10


def make_check(name: str, passed: bool, detail: str) -> Dict:
    """One check result: ``{"check": "<kind>: <what>", "passed": bool, "detail": str}``."""
    return {"check": name, "passed": bool(passed), "detail": detail}


class _Scored(NamedTuple):
    metric: str
    clean: Dict[str, List[ResultCell]]  # defense -> its scored clean cells
    attacked: List[ResultCell]  # scored attacked cells


def _scored(cells: Sequence[CellLike]) -> Tuple[List[ResultCell], _Scored]:
    cells = as_cells(cells)
    metric = report_kind(cells).metric
    clean = OrderedDict()
    for c in cells:
        if c.is_clean and c.score is not None:
            clean.setdefault(c.defense_name, []).append(c)
    # the perturbed cells of an L-inf budget (corruption cells have their own checks)
    attacked = [c for c in cells if c.is_adversarial and c.score is not None]
    return cells, _Scored(metric, clean, attacked)


def _group(cells, key: Callable) -> "OrderedDict":
    groups = OrderedDict()
    for c in cells:
        groups.setdefault(key(c), []).append(c)
    return groups


def _ordered_not_weaker(points: List[Tuple[float, float]], tol: float, metric: str) -> List[str]:
    """Points ``(strength, score)`` sorted by strength: each score must be <= the minimum score
    of every strictly weaker point + ``tol``. Returns a description of each violation."""
    bad = []
    best: Optional[Tuple[float, float]] = None  # (strength, score) of the lowest score so far
    i = 0
    while i < len(points):
        j = i
        while j < len(points) and points[j][0] == points[i][0]:
            j += 1
        group = points[i:j]
        if best is not None:
            for s, v in group:
                if v > best[1] + tol:
                    bad.append(f"{s:g}: {metric} {v:.2f} > {best[1]:.2f} at {best[0]:g} + {tol:g}")
        for s, v in group:
            if best is None or v < best[1]:
                best = (s, v)
        i = j
    return bad


def _variant(step: Optional[float], random_start: bool) -> str:
    """The step-size variant in a check's name, where one series has several."""
    return f" step={step if step is None else f'{step:g}'} random_start={random_start}"


def _adaptive_suffix(adaptive: bool) -> str:
    return " (adaptive)" if adaptive else ""


def check_all_cells_scored(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """``all_cells_scored``: every cell has a finite headline metric (a missing one is a failed
    evaluation). The other checks leave unscored cells out."""
    cells, s = _scored(cells)
    missing = [c for c in cells if c.score is None]
    detail = f"{len(cells) - len(missing)} of {len(cells)} cells have a finite {s.metric}"
    if missing:
        detail += "; missing: " + ", ".join(
            f"{c.attack}@{fmt_eps(c.eps_value)}/{c.defense_name}" for c in missing
        )
    return [make_check("all_cells_scored", not missing, detail)]


def check_monotone_eps(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """``monotone_eps``, one per (attack, objective, defense, adaptive) series: the metric is
    non-increasing in eps, with the clean cell of the same defense as eps 0. Each point is
    compared with the *lowest* score at any smaller eps (not only its neighbour), so a slow
    upward drift of less than ``tol`` per step is still caught. Where one eps has several cells
    (step counts, restarts) the lowest score stands for it; :func:`check_more_steps` compares
    those."""
    _, s = _scored(cells)
    checks = []
    series = _group(s.attacked, lambda c: (c.attack, c.objective, c.defense_name, c.is_adaptive))
    for (attack, objective, defense, adaptive), group in series.items():
        by_eps = _group(sorted(group, key=lambda c: c.eps_value), lambda c: c.eps_value)
        points = [(e, min_score(cs)) for e, cs in by_eps.items()]
        if defense in s.clean:
            points.insert(0, (0.0, min_score(s.clean[defense])))
        bad = _ordered_not_weaker(points, tol, s.metric)
        curve = ", ".join(
            f"{'clean' if (k == 0 and defense in s.clean) else fmt_eps(e)}: {v:.2f}"
            for k, (e, v) in enumerate(points)
        )
        label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
        detail = f"{s.metric} by eps [{curve}]"
        if bad:
            detail += "; increases beyond tolerance at eps " + "; ".join(bad)
        checks.append(make_check(f"monotone_eps: {label}", not bad, detail))
    return checks


def check_loss_rises_with_eps(
    cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE
) -> List[Dict]:
    """``loss_rises_with_eps``, per (attack, objective, defense, adaptive, step size, random
    start) series of cells that record ``attack_loss`` (the mean objective value at the
    adversarial images) at two or more eps: each eps's loss must be at least the highest loss
    at any smaller eps, less :data:`LOSS_TOLERANCE` of the larger magnitude (``tol`` is in
    metric points and not used). A larger ball contains the smaller one and the sweep's step
    rules never give it fewer steps, so an attack that climbs less in it is not finding its
    maximum: the gradient-masking sign that the metric alone can hide (a robust model's metric
    may barely move while its loss surface is flat). Where one eps has several step counts the
    highest loss stands for it. Attacks that stop early or keep the most-wrong point record no
    loss and are not checked."""
    _, s = _scored(cells)
    checks = []
    series = _group(
        [c for c in s.attacked if finite(c.attack_loss) is not None],
        lambda c: (
            c.attack, c.objective, c.defense_name, c.is_adaptive,
            None if c.properties.single_step else finite(c.step_size),  # FGSM's step is eps
            bool(c.random_start),
        ),
    )  # fmt: skip
    variants = _group(series, lambda k: k[:4])
    for key, group in series.items():
        attack, objective, defense, adaptive, step, random_start = key
        by_eps = _group(sorted(group, key=lambda c: c.eps_value), lambda c: c.eps_value)
        if len(by_eps) < 2:
            continue
        points = [(e, max(c.attack_loss for c in cs)) for e, cs in by_eps.items()]
        bad, best = [], None
        for e, v in points:
            if best is not None and v < best[1] - LOSS_TOLERANCE * max(abs(v), abs(best[1])):
                bad.append(f"{fmt_eps(e)}: {v:.4g} < {best[1]:.4g} at eps {fmt_eps(best[0])}")
            if best is None or v > best[1]:
                best = (e, v)
        curve = ", ".join(f"{fmt_eps(e)}: {v:.4g}" for e, v in points)
        detail = f"{objective} loss at the adversarial images by eps [{curve}]"
        if bad:
            detail += "; the loss FALLS with eps at eps " + "; ".join(bad)
        label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
        name = f"loss_rises_with_eps: {label}"
        if len(variants[key[:4]]) > 1:  # name the variant only where there are several
            name += _variant(step, random_start)
        checks.append(make_check(name, not bad, detail))
    return checks


def check_iterative_vs_single_step(
    cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE
) -> List[Dict]:
    """``iterative_vs_single_step``, per (objective, eps, defense, adaptive) with both a
    single-step cell (an attack declaring ``single_step``, e.g. FGSM) and an iterative one (a
    cell whose threat is ``iterative``: I-FGSM, PGD, an ensemble, ...):
    ``score_iterative <= score_single_step + tol``. Keyed by objective, so a targeted attack
    (ILLC) is not held against FGSM on the training loss."""
    _, s = _scored(cells)
    checks = []
    settings = _group(
        s.attacked, lambda c: (c.objective, c.eps_value, c.defense_name, c.is_adaptive)
    )
    for (objective, eps, defense, adaptive), group in settings.items():
        single = [c for c in group if c.properties.single_step]
        if not single:
            continue
        ref = min_score(single)
        names = "/".join(unique(c.attack for c in single))
        for attack in unique(c.attack for c in group if c.properties.iterative):
            its = [c for c in group if c.attack == attack]
            value = min_score(its)
            steps = sorted({c.steps for c in its})
            ok = value <= ref + tol
            label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
            detail = (
                f"eps {fmt_eps(eps)}: {attack} {s.metric} {value:.2f} (steps {steps}) vs {names} "
                f"{s.metric} {ref:.2f}; {'ok' if ok else 'iterative WEAKER than single-step'} "
                f"(tol {tol:g})"
            )
            name = f"iterative_vs_single_step: {label} eps={fmt_eps(eps)}"
            checks.append(make_check(name, ok, detail))
    return checks


def check_adaptive_vs_transfer(
    cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE
) -> List[Dict]:
    """``adaptive_vs_transfer``, per (attack, objective, eps, defense) with both adaptive and
    defense-unaware cells: the strongest adaptive score <= the strongest unaware one + ``tol``
    (an attack that knows the defense must not do worse than one that ignores it)."""
    _, s = _scored(cells)
    checks = []
    groups = _group(s.attacked, lambda c: (c.attack, c.objective, c.eps_value, c.defense_name))
    for (attack, objective, eps, defense), group in groups.items():
        ada = [c for c in group if c.is_adaptive]
        non = [c for c in group if not c.is_adaptive]
        if not ada or not non:
            continue
        va, vn = min_score(ada), min_score(non)
        ok = va <= vn + tol
        detail = (
            f"eps {fmt_eps(eps)}: adaptive {s.metric} {va:.2f} vs non-adaptive {s.metric} "
            f"{vn:.2f}; {'ok' if ok else 'adaptive WEAKER than transfer'} (tol {tol:g})"
        )
        label = series_label(attack, objective, defense)
        checks.append(make_check(f"adaptive_vs_transfer: {label} eps={fmt_eps(eps)}", ok, detail))
    return checks


def _configs(attacked: List[ResultCell]) -> "OrderedDict":
    return _group(
        attacked, lambda c: (c.attack, c.objective, c.eps_value, c.defense_name, c.is_adaptive)
    )


def check_more_steps(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """``more_steps``, per (attack, objective, eps, defense, adaptive, step size, random start)
    with several ``num_steps``: the score at more steps <= the lowest score at fewer steps +
    ``tol`` (more iterations of the same attack must not weaken it; a weaker result is a sign of
    gradient masking or a broken step control). Cells with another step size or random start
    are a different attack and are not compared."""
    _, s = _scored(cells)
    checks = []
    configs = _group(
        s.attacked,
        lambda c: (
            c.attack, c.objective, c.eps_value, c.defense_name, c.is_adaptive,
            finite(c.step_size), bool(c.random_start),
        ),
    )  # fmt: skip
    several = _group(configs, lambda k: k[:5])  # step-size variants of one config
    for key, group in configs.items():
        attack, objective, eps, defense, adaptive, step, random_start = key
        steps = sorted({c.steps for c in group})
        if len(steps) < 2:
            continue
        points = [(float(n), min_score(c for c in group if c.steps == n)) for n in steps]
        bad = _ordered_not_weaker(points, tol, s.metric)
        curve = ", ".join(f"{int(n)}: {v:.2f}" for n, v in points)
        detail = f"eps {fmt_eps(eps)}: {s.metric} by num_steps [{curve}]"
        if bad:
            detail += "; more steps WEAKER at steps " + "; ".join(bad)
        label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
        name = f"more_steps: {label} eps={fmt_eps(eps)}"
        if len(several[key[:5]]) > 1:  # name the variant only where there are several
            name += _variant(step, random_start)
        checks.append(make_check(name, not bad, detail))
    return checks


def check_more_restarts(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """``more_restarts``: as :func:`check_more_steps` over ``restarts`` at fixed ``num_steps``
    (extra restarts of a converged attack should change nothing, and never help the model)."""
    _, s = _scored(cells)
    checks = []
    for (attack, objective, eps, defense, adaptive), group in _configs(s.attacked).items():
        label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
        for n in sorted({c.steps for c in group}):
            same = [c for c in group if c.steps == n]
            restarts = sorted({c.restart_count for c in same})
            if len(restarts) < 2:
                continue
            points = [
                (float(r), min_score(c for c in same if c.restart_count == r)) for r in restarts
            ]
            bad = _ordered_not_weaker(points, tol, s.metric)
            curve = ", ".join(f"{int(r)}: {v:.2f}" for r, v in points)
            detail = f"eps {fmt_eps(eps)}, {n} steps: {s.metric} by restarts [{curve}]"
            if bad:
                detail += "; more restarts WEAKER at restarts " + "; ".join(bad)
            name = f"more_restarts: {label} eps={fmt_eps(eps)} steps={n}"
            checks.append(make_check(name, not bad, detail))
    return checks


def _member_label(m: Dict) -> str:
    steps = m.get("num_steps")
    return series_label(m.get("attack"), m.get("objective")) + (
        f" ({steps} steps)" if steps is not None else ""
    )


def check_ensemble_vs_members(
    cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE
) -> List[Dict]:
    """``ensemble_vs_members``, per ensemble cell (its threat is an ``ensemble``): its
    score <= the lowest score among its ``members`` (``[{"attack", "objective", "num_steps",
    <metric>: value, ...}]``) + :data:`ENSEMBLE_TOLERANCE`. The ensemble keeps, image by image,
    one of its members' own predictions, so it can be no weaker than its strongest member; the
    tolerance only absorbs rounding (``tol`` is not used: there is no evaluation noise between
    an ensemble and its members). An ensemble cell without a members list, or whose members
    have no finite score, cannot be verified and is flagged too."""
    _, s = _scored(cells)
    checks = []
    for c in s.attacked:
        if not c.properties.ensemble:
            continue
        label = series_label(c.attack, c.objective, c.defense_name) + _adaptive_suffix(
            c.is_adaptive
        )
        name = f"ensemble_vs_members: {label} eps={fmt_eps(c.eps_value)}"
        members = c.get("members")
        scored = [
            (m, finite(m.get(s.metric))) for m in (members or []) if isinstance(m, dict)
        ]
        scored = [(m, v) for m, v in scored if v is not None]
        if not scored:
            why = "no members list" if not isinstance(members, list) else f"no member {s.metric}"
            detail = f"{s.metric} {c.score:.2f}; {why}: the worst case cannot be verified"
            checks.append(make_check(name, False, detail))
            continue
        best, value = min(scored, key=lambda mv: mv[1])
        ok = c.score <= value + ENSEMBLE_TOLERANCE
        listing = ", ".join(f"{_member_label(m)}: {v:.2f}" for m, v in scored)
        detail = (
            f"ensemble {s.metric} {c.score:.2f} vs members [{listing}]; "
            + ("ok" if ok else f"ensemble WEAKER than its member {_member_label(best)}")
            + f" (tol {ENSEMBLE_TOLERANCE:g})"
        )
        checks.append(make_check(name, ok, detail))
    return checks


def check_apgd_vs_pgd(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """``apgd_vs_pgd``, per attack declaring a ``baseline`` (APGD: "pgd") and per (objective,
    eps, defense, adaptive, passes) with cells of both, passes = ``num_steps * restarts`` (equal
    gradient budgets): ``score_attack <= score_baseline + tol``. APGD's step-size control
    exists to beat fixed-step PGD at the same budget; losing to it points at a broken schedule
    or a masked gradient."""
    _, s = _scored(cells)
    checks = []
    baselines = OrderedDict((c.attack, c.properties.baseline) for c in s.attacked)
    baselines = OrderedDict((a, b) for a, b in baselines.items() if b)
    for attack, baseline in baselines.items():
        groups = _group(
            [c for c in s.attacked if c.attack in (attack, baseline)],
            lambda c: (c.objective, c.eps_value, c.defense_name, c.is_adaptive,
                       c.steps * c.restart_count),
        )  # fmt: skip
        for (objective, eps, defense, adaptive, passes), group in groups.items():
            own = [c for c in group if c.attack == attack]
            base = [c for c in group if c.attack == baseline]
            if not own or not base:
                continue
            va, vp = min_score(own), min_score(base)
            ok = va <= vp + tol
            detail = (
                f"eps {fmt_eps(eps)}, {passes} passes (steps x restarts): {attack} {s.metric} "
                f"{va:.2f} vs {baseline} {s.metric} {vp:.2f}; "
                f"{'ok' if ok else f'{attack} WEAKER than {baseline}'} (tol {tol:g})"
            )
            label = series_label(objective, defense) + _adaptive_suffix(adaptive)
            prefix = "apgd_vs_pgd" if len(baselines) == 1 else f"apgd_vs_pgd ({attack})"
            name = f"{prefix}: {label} eps={fmt_eps(eps)} passes={passes}"
            checks.append(make_check(name, ok, detail))
    return checks


def check_white_box_vs_random(
    cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE
) -> List[Dict]:
    """``white_box_vs_random``, per (objective, eps, defense, adaptive) with a gradient-free
    eps-bounded cell (random search: it declares ``needs_gradients`` False) and untargeted
    gradient attacks: ``score_white_box <= score_random + tol`` for each of them. A blind search
    that beats a white-box attack means the gradients mislead it (gradient masking, the classic
    sign of a defense or a robustly trained model that only looks robust)."""
    _, s = _scored(cells)
    checks = []
    groups = _group(
        [c for c in s.attacked if c.properties.eps_bounded and not c.properties.targeted],
        lambda c: (c.objective, c.eps_value, c.defense_name, c.is_adaptive),
    )
    for (objective, eps, defense, adaptive), group in groups.items():
        blind = [c for c in group if not c.properties.needs_gradients]
        if not blind:
            continue
        ref = min_score(blind)
        names = "/".join(unique(c.attack for c in blind))
        for attack in unique(c.attack for c in group if c.properties.needs_gradients):
            value = min_score([c for c in group if c.attack == attack])
            ok = value <= ref + tol
            label = series_label(attack, objective, defense) + _adaptive_suffix(adaptive)
            detail = (
                f"eps {fmt_eps(eps)}: {attack} {s.metric} {value:.2f} vs {names} {s.metric} "
                f"{ref:.2f}; {'ok' if ok else 'gradient-free search STRONGER: gradient masking'}"
                f" (tol {tol:g})"
            )
            checks.append(make_check(f"white_box_vs_random: {label} eps={fmt_eps(eps)}", ok,
                                     detail))
    return checks


# Every kind of check, in report order.
CHECKS = OrderedDict(
    [
        ("all_cells_scored", check_all_cells_scored),
        ("monotone_eps", check_monotone_eps),
        ("loss_rises_with_eps", check_loss_rises_with_eps),
        ("iterative_vs_single_step", check_iterative_vs_single_step),
        ("adaptive_vs_transfer", check_adaptive_vs_transfer),
        ("more_steps", check_more_steps),
        ("more_restarts", check_more_restarts),
        ("apgd_vs_pgd", check_apgd_vs_pgd),
        ("ensemble_vs_members", check_ensemble_vs_members),
        ("white_box_vs_random", check_white_box_vs_random),
    ]
)


def sanity_checks(cells: Sequence[CellLike], tol: float = METRIC_TOLERANCE) -> List[Dict]:
    """Run every check of :data:`CHECKS` on the cells of one report.

    "A at least as strong as B" passes when ``score_A <= score_B + tol``, the score being each
    cell's headline metric and ``tol`` in its points. Cells without a finite score are left
    out of the comparisons and reported by ``all_cells_scored``.

    Args:
        cells (list[dict or ResultCell]): sweep cells of one model and task
            (:func:`~.cells.report_kind`; mixed cells raise ValueError).
        tol (float): tolerance in points of the headline metric.

    Returns:
        list[dict]: ``{"check": name, "passed": bool, "detail": str}`` per check instance,
        violations included. Kinds with no applicable cells produce no entry.
    """
    cells = as_cells(cells)
    report_kind(cells)
    return [c for check in CHECKS.values() for c in check(cells, tol)]
