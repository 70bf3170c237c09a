# Copyright (c) UPSNetRobust authors.
"""Set-up checks of a robustness run: everything that can be known to fail before the model
runs on a single image (model adapter, attack/objective pairs, threat kinds, data set,
evaluator). The attack/objective checks live with the attacks (:mod:`upsnet_robust.attacks.checks`,
re-exported here); each threat kind checks its own passes
(:meth:`upsnet_robust.threats.ThreatKind.check`)."""
from typing import Iterable

from ..adapters.base import ModelAdapter
from ..attacks.checks import (  # noqa: F401  (re-exported: one set-up module)
    check_attack_objective,
    check_attack_settings,
    objective_for,
)
from ..attacks.registry import ATTACK_REGISTRY
from ..data import check_dataset_registered  # noqa: F401  (re-exported: one set-up module)
from ..threats import kind_of, kinds
from ..threats.registry import sweep_only_error

__all__ = [
    "check_attack_objective",
    "check_attack_settings",
    "check_early_stop",
    "check_dataset_registered",
    "check_ensembles",
    "check_sweep_attacks",
    "objective_for",
]


def check_sweep_attacks(
    adapter: ModelAdapter, attacks: Iterable[str], objective: str, skip: Iterable[str] = ("clean",)
) -> None:
    """:func:`check_attack_objective` for every attack of ``attacks`` (``skip``: names not to
    check). A name served by a sweep-only kind (the ``sea`` ensembles) fails with a message
    saying what to list instead; other kinds' names are left to their kinds."""
    for name in attacks:
        if name in skip:
            continue
        kind = kind_of(name)
        if kind is not None and kind.sweep_only:
            raise sweep_only_error(kind, name)
        if kind is None or (kind.properties.needs_objective and not kind.combines):
            check_attack_objective(adapter, name, objective)


def check_early_stop(cfg, skip: Iterable[str] = ("clean",)) -> None:
    """The global rules of ROBUSTNESS.EARLY_STOP and APGD_KEEP, and
    :func:`check_attack_settings` for the registered attacks of ROBUSTNESS.ATTACKS."""
    r = cfg.ROBUSTNESS
    if r.APGD_KEEP not in ("loss", "accuracy"):
        raise ValueError(f"ROBUSTNESS.APGD_KEEP must be 'loss' or 'accuracy', got {r.APGD_KEEP!r}")
    if r.EARLY_STOP and r.ADAPTIVE:
        raise ValueError(
            "ROBUSTNESS.EARLY_STOP reads the undefended model's dense logits; it cannot be "
            "combined with ROBUSTNESS.ADAPTIVE (attacks on model o defense). Turn one off."
        )
    check_attack_settings(cfg, [n for n in r.ATTACKS if n not in skip and n in ATTACK_REGISTRY])


def check_ensembles(adapter: ModelAdapter, cfg) -> None:
    """Each ensemble kind's check (:meth:`upsnet_robust.threats.ThreatKind.check`) of its
    entries in ROBUSTNESS.ATTACKS: a task it can select for and members that exist and that
    the model can serve."""
    for kind in kinds():
        if kind.properties.ensemble:
            names = [n for n in cfg.ROBUSTNESS.ATTACKS if kind.claims(n)]
            if names:
                kind.check(cfg, adapter, [s for s in kind.expand(cfg) if s.kind == kind.name])
