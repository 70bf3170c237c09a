# Copyright (c) UPSNetRobust authors.
"""Set-up checks of attacks and objectives against a model's adapter: which objective an attack
runs with (the one rule), whether the model can serve the pair, and the settings an attack reads
that need a particular objective (EARLY_STOP, APGD_KEEP). They read the properties attacks and
objectives declare (``required_objective``, ``targeted``, ``dense``, ``needs_dense_objective``,
``supports_early_stop``, ``keeps_accuracy``), never their names; the threat kinds call them."""
from collections import OrderedDict
from typing import Iterable, List

from ..adapters.base import DENSE_LOGITS, ModelAdapter, UnsupportedModelError
from .objectives import OBJECTIVE_REGISTRY, objective_class
from .registry import ATTACK_REGISTRY, attack_class

__all__ = [
    "check_attack_objective",
    "check_attack_settings",
    "dense_objectives",
    "objective_for",
    "usable_objectives",
]


def objective_for(attack, objective: str) -> str:
    """The objective an attack (a registered name, or a built attack) runs with: its required
    one (ILLC's), else ``objective`` (ROBUSTNESS.OBJECTIVE). The one place this rule lives."""
    cls = attack_class(attack) if isinstance(attack, str) else attack
    return getattr(cls, "required_objective", None) or objective


def _untargeted_dense(cls) -> bool:
    return bool(getattr(cls, "dense", False)) and not getattr(cls, "targeted", False)


def dense_objectives(adapter: ModelAdapter) -> List[str]:
    names = []
    for name, cls in sorted(OBJECTIVE_REGISTRY):
        if _untargeted_dense(cls) and adapter.has(DENSE_LOGITS):
            names.append(name)
    return names


def usable_objectives(adapter: ModelAdapter) -> List[str]:
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
        if getattr(cls, "needs_dense_objective", False) and not dense_objectives(adapter):
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
        dense_attack and not dense_objectives(adapter)
    ):  # no objective makes this attack work on this model
        what = needs if name != objective else DENSE_LOGITS
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} (objective {name!r}) needs the model's "
            f"{what.replace('_', ' ')}, {where}. Use one of the attacks "
            f"{', '.join(_usable_attacks(adapter)) or 'none'} in ROBUSTNESS.ATTACKS, with "
            f"ROBUSTNESS.OBJECTIVE one of {', '.join(usable_objectives(adapter)) or 'none'}"
        )
    if needs and not adapter.has(needs):
        usable = dense_objectives(adapter) if dense_attack else usable_objectives(adapter)
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} with objective {name!r} needs the model's "
            f"{needs.replace('_', ' ')}, {where}. Set ROBUSTNESS.OBJECTIVE to one of "
            f"{', '.join(usable) or 'none'}"
        )
    if dense_attack and not _untargeted_dense(obj_cls):
        raise UnsupportedModelError(
            f"{arch}: attack {attack_name!r} weights a per-pixel loss and needs an untargeted "
            f"dense objective, but ROBUSTNESS.OBJECTIVE is {name!r}; set ROBUSTNESS.OBJECTIVE "
            f"to one of {', '.join(dense_objectives(adapter))}"
        )
    return name


def check_attack_settings(cfg, attacks: Iterable[str]) -> None:
    """ROBUSTNESS.EARLY_STOP needs an untargeted dense objective (it reads which labelled pixels
    are still correct) for attacks that support it (those without iterations to save ignore
    it); APGD_KEEP "accuracy" likewise for attacks that read it (``keeps_accuracy``).

    Raises:
        ValueError: naming the attack and objective, and what to set instead.
    """
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
