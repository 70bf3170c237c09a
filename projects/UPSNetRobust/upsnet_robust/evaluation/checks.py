# Copyright (c) UPSNetRobust authors.
"""Set-up checks of a robustness run: everything that can be known to fail before the model
runs on a single image (model adapter, attack/objective pairs, data set, evaluator)."""
from collections import OrderedDict
from typing import Iterable, List

from ..adapters.base import DENSE_LOGITS, ModelAdapter, UnsupportedModelError
from ..attacks.objectives import objective_class
from ..attacks.registry import ATTACK_REGISTRY, UnknownAttackError, attack_class
from ..data import check_dataset_registered  # noqa: F401  (re-exported: one set-up module)
from .sweep_passes import ENSEMBLES, ensemble_members

__all__ = [
    "check_attack_objective",
    "check_early_stop",
    "check_dataset_registered",
    "check_ensembles",
    "check_sweep_attacks",
    "objective_for",
]


def objective_for(attack_name: str, objective: str) -> str:
    """The objective an attack runs with: its required one (ILLC: least_likely), else
    ``objective`` (ROBUSTNESS.OBJECTIVE)."""
    return getattr(attack_class(attack_name), "required_objective", None) or objective


def _dense_objectives(adapter: ModelAdapter) -> List[str]:
    from ..attacks.objectives import OBJECTIVE_REGISTRY

    names = []
    for name, cls in sorted(OBJECTIVE_REGISTRY):
        if getattr(cls, "dense", False) and name != "least_likely" and adapter.has(DENSE_LOGITS):
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
    if dense_attack and (not getattr(obj_cls, "dense", False) or name == "least_likely"):
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} weights a per-pixel loss and needs an untargeted "
            f"dense objective, but ROBUSTNESS.OBJECTIVE is {name!r}; set ROBUSTNESS.OBJECTIVE "
            f"to one of {', '.join(_dense_objectives(adapter))}"
        )
    return name


def check_sweep_attacks(
    adapter: ModelAdapter, attacks: Iterable[str], objective: str, skip: Iterable[str] = ("clean",)
) -> None:
    """:func:`check_attack_objective` for every attack of a sweep. Ensembles ("sea") must be
    in ``skip`` (the sweep checks them with :func:`check_ensembles`): elsewhere they fail."""
    for name in attacks:
        if name in skip:
            continue
        if name in ENSEMBLES:
            raise ValueError(
                f"{name!r} in ROBUSTNESS.ATTACKS is an ensemble (ROBUSTNESS.SEA) that only the "
                "robustness sweep runs; list its members' attacks here instead (e.g. 'apgd' with "
                "ROBUSTNESS.OBJECTIVE 'masked_ce')"
            )
        check_attack_objective(adapter, name, objective)


def check_early_stop(cfg, skip: Iterable[str] = ("clean",)) -> None:
    """ROBUSTNESS.EARLY_STOP needs an untargeted dense objective (it reads which labelled pixels
    are still correct) and an undefended objective (not ROBUSTNESS.ADAPTIVE); attacks without
    iterations to save (fgsm) ignore it.

    Raises:
        ValueError: naming the attack and objective, and what to set instead.
    """
    r = cfg.ROBUSTNESS
    _check_apgd_keep(cfg, skip)
    if not r.EARLY_STOP:
        return
    if r.ADAPTIVE:
        raise ValueError(
            "ROBUSTNESS.EARLY_STOP reads the undefended model's dense logits; it cannot be "
            "combined with ROBUSTNESS.ADAPTIVE (attacks on model o defense). Turn one off."
        )
    from ..attacks.objectives import OBJECTIVE_REGISTRY

    usable = [n for n, c in sorted(OBJECTIVE_REGISTRY) if getattr(c, "supports_early_stop", False)]
    for name in r.ATTACKS:
        if name in skip or name in ENSEMBLES:  # members: see check_ensembles
            continue
        if not getattr(attack_class(name), "supports_early_stop", False):
            continue
        objective = objective_for(name, r.OBJECTIVE)
        if not getattr(objective_class(objective), "supports_early_stop", False):
            raise ValueError(
                f"ROBUSTNESS.EARLY_STOP: attack {name!r} runs with objective {objective!r}, "
                f"which is not an untargeted dense objective (early stopping needs to know which "
                f"labelled pixels are still correct). Use ROBUSTNESS.OBJECTIVE one of "
                f"{', '.join(usable)}, or set ROBUSTNESS.EARLY_STOP False"
                + (" (ILLC is targeted: leave it out)" if name == "illc" else "")
            )


def _check_apgd_keep(cfg, skip) -> None:
    """ROBUSTNESS.APGD_KEEP "accuracy" reads the correct-pixel counts of a dense objective."""
    r = cfg.ROBUSTNESS
    if r.APGD_KEEP not in ("loss", "accuracy"):
        raise ValueError(f"ROBUSTNESS.APGD_KEEP must be 'loss' or 'accuracy', got {r.APGD_KEEP!r}")
    if r.APGD_KEEP != "accuracy" or "apgd" not in r.ATTACKS or "apgd" in skip:
        return
    objective = objective_for("apgd", r.OBJECTIVE)
    if not getattr(objective_class(objective), "supports_early_stop", False):
        raise ValueError(
            f"ROBUSTNESS.APGD_KEEP 'accuracy' keeps each image's point of fewest correct pixels, "
            f"which only an untargeted dense objective counts; ROBUSTNESS.OBJECTIVE is "
            f"{objective!r}. Use a dense objective (masked_ce, semantic_ce, ...) or APGD_KEEP "
            "'loss'."
        )


#: Tasks whose evaluations keep the per-image statistics an ensemble's selection needs.
ENSEMBLE_TASKS = ("panoptic_seg", "sem_seg")


def check_ensembles(adapter: ModelAdapter, cfg) -> None:
    """Each ensemble ("sea", "sea_fast") in ROBUSTNESS.ATTACKS: a task it can select for (PQ
    or mIoU) and members (ROBUSTNESS.SEA) that exist and that the model can serve.

    Raises:
        UnsupportedModelError: an instance-only model, or a member the adapter cannot serve.
        ValueError: a malformed or unknown member, naming the key and the entry.
    """
    for name in OrderedDict.fromkeys(cfg.ROBUSTNESS.ATTACKS):
        if name not in ENSEMBLES:
            continue
        if adapter.task not in ENSEMBLE_TASKS:
            raise UnsupportedModelError(
                f"{adapter.meta_architecture}: {name!r} in ROBUSTNESS.ATTACKS picks per image the "
                f"member that lowers the data set's PQ or mIoU, but this model's task is "
                f"{adapter.task!r}, which has no additive per-image statistics; remove {name!r} "
                "and list the attacks to compare in ROBUSTNESS.ATTACKS instead"
            )
        key = f"ROBUSTNESS.SEA.{ENSEMBLES[name][0]}"
        for entry, member in ensemble_members(cfg, name):
            _check_member(adapter, key, entry, member["attack"], member["objective"])


def _check_member(adapter: ModelAdapter, key: str, entry: str, attack: str, objective: str):
    where = f"{key} entry {entry!r}"
    try:
        cls = attack_class(attack)
    except UnknownAttackError:
        registered = ", ".join(sorted(k for k, _ in ATTACK_REGISTRY))
        raise ValueError(
            f"{where}: unknown attack {attack!r}; registered attacks: {registered} (e.g. "
            f"'apgd:{objective}')"
        ) from None
    dense = _dense_objectives(adapter)
    usable = dense if getattr(cls, "needs_dense_objective", False) else _usable_objectives(adapter)
    suggestion = f"objectives this model serves: {', '.join(usable) or 'none'}"
    try:
        obj_cls = objective_class(objective)
    except KeyError:
        raise ValueError(f"{where}: unknown objective {objective!r}; {suggestion}") from None
    required = getattr(cls, "required_objective", None)
    if required and required != objective:
        raise ValueError(
            f"{where}: attack {attack!r} always maximises {required!r}; write "
            f"'{attack}:{required}' or choose another attack, e.g. 'apgd:{objective}'"
        )
    try:
        check_attack_objective(adapter, attack, objective)
    except UnsupportedModelError as e:
        needs = getattr(obj_cls, "requires", "")
        if needs and not adapter.has(needs):
            reason = (
                f"objective {objective!r} needs the model's {needs.replace('_', ' ')}, which its "
                f"adapter ({type(adapter).__name__}) does not expose"
            )
        else:
            reason = str(e)
        raise UnsupportedModelError(
            f"{where} cannot run on {adapter.meta_architecture}: {reason}. Use members "
            f"'{attack}:objective' with {suggestion}"
        ) from None
