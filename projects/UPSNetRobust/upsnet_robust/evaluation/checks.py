# Copyright (c) UPSNetRobust authors.
"""Set-up checks of a robustness run: everything that can be known to fail before the model
runs on a single image (model adapter, attack/objective pairs, data set, evaluator). They read
the properties attacks and objectives declare (``targeted``, ``needs_dense_objective``,
``supports_early_stop``, ``keeps_accuracy``, ...), never their names; each threat kind calls the
checks of its passes (:meth:`upsnet_robust.threats.ThreatKind.check`)."""
from collections import OrderedDict
from typing import Iterable, List

from ..adapters.base import DENSE_LOGITS, ModelAdapter, UnsupportedModelError
from ..attacks.objectives import objective_class
from ..attacks.registry import ATTACK_REGISTRY, attack_class
from ..data import check_dataset_registered  # noqa: F401  (re-exported: one set-up module)

__all__ = [
    "check_attack_objective",
    "check_attack_settings",
    "check_early_stop",
    "check_dataset_registered",
    "check_ensembles",
    "check_sweep_attacks",
    "objective_for",
]


def objective_for(attack_name: str, objective: str) -> str:
    """The objective an attack runs with (:func:`upsnet_robust.threats.attack.objective_for`)."""
    from ..threats.attack import objective_for as resolve

    return resolve(attack_name, objective)


def _untargeted_dense(cls) -> bool:
    return bool(getattr(cls, "dense", False)) and not getattr(cls, "targeted", False)


def _dense_objectives(adapter: ModelAdapter) -> List[str]:
    from ..attacks.objectives import OBJECTIVE_REGISTRY

    names = []
    for name, cls in sorted(OBJECTIVE_REGISTRY):
        if _untargeted_dense(cls) and adapter.has(DENSE_LOGITS):
            names.append(name)
    return names


def _usable_objectives(adapter: ModelAdapter) -> List[str]:
    from ..attacks.objectives import OBJECTIVE_REGISTRY

    return [
        name
        for name, cls in sorted(OBJECTIVE_REGISTRY)
        if not getattr(cls, "requires", "") or adapter.has(cls.requires)
    ]


def _usable_attacks(adapter: ModelAdapter) -> List[str]:
    """Attacks the adapter can serve with some objective (those needing no capability it
    lacks)."""
    names = []
    for name, cls in sorted(ATTACK_REGISTRY):
        required = getattr(cls, "required_objective", None)
        needs = getattr(objective_class(required), "requires", "") if required else ""
        if needs and not adapter.has(needs):
            continue
        if getattr(cls, "needs_dense_objective", False) and not _dense_objectives(adapter):
            continue
        names.append(name)
    return names


def check_attack_objective(adapter: ModelAdapter, attack_name: str, objective: str) -> str:
    """Check that ``adapter``'s model can serve ``attack_name`` with ``objective``; returns the
    objective the attack will use.

    Raises:
        UnsupportedModelError: naming the meta-architecture, the attack, the objective and what
            to use instead.
        UnknownAttackError / KeyError: unknown attack or objective names.
    """
    cls = attack_class(attack_name)
    name = objective_for(attack_name, objective)
    obj_cls = objective_class(name)
    arch = adapter.meta_architecture
    needs = getattr(obj_cls, "requires", "")
    dense_attack = getattr(cls, "needs_dense_objective", False)
    where = f"which its adapter ({type(adapter).__name__}) does not expose"
    if (name != objective and needs and not adapter.has(needs)) or (
        dense_attack and not _dense_objectives(adapter)
    ):  # no objective makes this attack work on this model
        what = needs if name != objective else DENSE_LOGITS
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} (objective {name!r}) needs the model's "
            f"{what.replace('_', ' ')}, {where}. Use one of the attacks "
            f"{', '.join(_usable_attacks(adapter)) or 'none'} in ROBUSTNESS.ATTACKS, with "
            f"ROBUSTNESS.OBJECTIVE one of {', '.join(_usable_objectives(adapter)) or 'none'}"
        )
    if needs and not adapter.has(needs):
        usable = _dense_objectives(adapter) if dense_attack else _usable_objectives(adapter)
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} with objective {name!r} needs the model's "
            f"{needs.replace('_', ' ')}, {where}. Set ROBUSTNESS.OBJECTIVE to one of "
            f"{', '.join(usable) or 'none'}"
        )
    if dense_attack and not _untargeted_dense(obj_cls):
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} weights a per-pixel loss and needs an untargeted "
            f"dense objective, but ROBUSTNESS.OBJECTIVE is {name!r}; set ROBUSTNESS.OBJECTIVE "
            f"to one of {', '.join(_dense_objectives(adapter))}"
        )
    return name


def check_sweep_attacks(
    adapter: ModelAdapter, attacks: Iterable[str], objective: str, skip: Iterable[str] = ("clean",)
) -> None:
    """:func:`check_attack_objective` for every attack of ``attacks`` (``skip``: names not to
    check). A name served by a sweep-only kind (the ``sea`` ensembles) fails with a message
    saying what to list instead; other kinds' names are left to their kinds."""
    from ..threats import kind_of
    from ..threats.registry import sweep_only_error

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


def check_attack_settings(cfg, attacks: Iterable[str]) -> None:
    """ROBUSTNESS.EARLY_STOP needs an untargeted dense objective (it reads which labelled pixels
    are still correct) for attacks that support it (those without iterations to save ignore
    it); APGD_KEEP "accuracy" likewise for attacks that read it (``keeps_accuracy``).

    Raises:
        ValueError: naming the attack and objective, and what to set instead.
    """
    from ..attacks.objectives import OBJECTIVE_REGISTRY

    r = cfg.ROBUSTNESS
    usable = [n for n, c in sorted(OBJECTIVE_REGISTRY) if getattr(c, "supports_early_stop", False)]
    for name in OrderedDict.fromkeys(attacks):
        cls = attack_class(name)
        objective = objective_for(name, r.OBJECTIVE)
        obj_cls = objective_class(objective)
        counts = getattr(obj_cls, "supports_early_stop", False)
        if r.EARLY_STOP and getattr(cls, "supports_early_stop", False) and not counts:
            required = getattr(cls, "required_objective", None)
            raise ValueError(
                f"ROBUSTNESS.EARLY_STOP: attack {name!r} runs with objective {objective!r}, "
                f"which is not an untargeted dense objective (early stopping needs to know which "
                f"labelled pixels are still correct). Use ROBUSTNESS.OBJECTIVE one of "
                f"{', '.join(usable)}, or set ROBUSTNESS.EARLY_STOP False"
                + (f" ({name} always maximises {required!r}: leave it out)" if required else "")
            )
        if r.APGD_KEEP == "accuracy" and getattr(cls, "keeps_accuracy", False) and not counts:
            raise ValueError(
                f"ROBUSTNESS.APGD_KEEP 'accuracy' keeps each image's point of fewest correct "
                f"pixels, which only an untargeted dense objective counts; attack {name!r} runs "
                f"with objective {objective!r}. Use a dense objective (masked_ce, semantic_ce, "
                "...) or APGD_KEEP 'loss'."
            )


def check_ensembles(adapter: ModelAdapter, cfg) -> None:
    """Each ensemble kind's check (:meth:`upsnet_robust.threats.ThreatKind.check`) of its
    entries in ROBUSTNESS.ATTACKS: a task it can select for and members that exist and that
    the model can serve."""
    from ..threats import kinds

    for kind in kinds():
        if kind.properties.ensemble:
            names = [n for n in cfg.ROBUSTNESS.ATTACKS if kind.claims(n)]
            if names:
                kind.check(cfg, adapter, [s for s in kind.expand(cfg) if s.kind == kind.name])
