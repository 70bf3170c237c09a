# Copyright (c) UPSNetRobust authors.
"""The ensemble kind ``sea`` (Croce, Singh & Hein, ECCV 2024): ``sea`` and ``sea_fast`` in
``ROBUSTNESS.ATTACKS`` run, per eps, one *member pass* per member of ``ROBUSTNESS.SEA`` (an
ordinary attack pass with the member's objective and step settings as ``overrides``, merged
with an identical pass of another ensemble) and then select, per image, the member whose
prediction lowers the data set's PQ (mIoU) most, from the members' stored per-image statistics
(:mod:`upsnet_robust.evaluation.ensemble`).

The cell's metrics are computed from the selected images' summed statistics, so they are what
the task's evaluator gives on the selected predictions; its ``members`` list says how many
images each member supplied and what the member scored alone.
"""
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

from ..adapters.base import UnsupportedModelError
from ..attacks.checks import check_attack_objective, dense_objectives, usable_objectives
from ..attacks.objectives import objective_class
from ..attacks.registry import ATTACK_REGISTRY, UnknownAttackError, attack_class
from .attack import AttackKind
from .base import ThreatKind, ThreatProperties, ThreatSpec
from .registry import register_threat
from .sea_cells import STATS_FILES, ensemble_cells, load_pass_stats, save_selection

__all__ = [
    "ENSEMBLES",
    "STATS_FILES",
    "SeaKind",
    "ensemble_members",
    "load_pass_stats",
    "parse_member",
]

#: Ensemble name -> (its members key, its steps key) under ROBUSTNESS.SEA.
ENSEMBLES = OrderedDict(
    [("sea", ("MEMBERS", "NUM_STEPS")), ("sea_fast", ("FAST_MEMBERS", "FAST_NUM_STEPS"))]
)


def parse_member(entry, key: str) -> Tuple[str, str]:
    """``(attack, objective)`` of a member entry ``"attack:objective"`` of config key ``key``.

    Raises:
        ValueError: naming ``key``, the entry and the expected form.
    """
    parts = entry.split(":") if isinstance(entry, str) else []
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"{key} entry {entry!r} is not of the form 'attack:objective', e.g. "
            "'apgd:masked_ce' (APGD maximising the masked cross-entropy)"
        )
    return parts[0].strip().lower(), parts[1].strip()


def _supports_early_stop(objective: str) -> bool:
    try:
        return bool(getattr(objective_class(objective), "supports_early_stop", False))
    except KeyError:  # an unknown objective: the set-up checks name it
        return False


def ensemble_members(cfg, name: str) -> List[Tuple[str, Dict]]:
    """``(entry, member fields)`` of each member of ensemble ``name``, repeats dropped; the
    fields are ``attack``, ``objective`` and the ROBUSTNESS ``overrides`` the member runs with.

    Raises:
        ValueError: no members, steps < 1 or a malformed entry, naming the key.
    """
    members_key, steps_key = ENSEMBLES[name]
    sea = cfg.ROBUSTNESS.SEA
    entries = list(sea[members_key])
    if not entries:
        raise ValueError(
            f"ROBUSTNESS.SEA.{members_key} is empty; {name!r} needs at least one member "
            "'attack:objective', e.g. ['apgd:masked_ce', 'apgd:js_divergence']"
        )
    steps = int(sea[steps_key])
    if steps < 1:
        raise ValueError(f"ROBUSTNESS.SEA.{steps_key} must be >= 1 (iterations per member of "
                         f"{name!r}), got {sea[steps_key]}")
    out = []
    for entry in OrderedDict.fromkeys(entries):
        attack, objective = parse_member(entry, f"ROBUSTNESS.SEA.{members_key}")
        _check_attack_name(f"ROBUSTNESS.SEA.{members_key} entry {entry!r}", attack, objective)
        dense = _supports_early_stop(objective)
        overrides = {
            "OBJECTIVE": objective,
            "NUM_STEPS": steps,
            "RANDOM_START": bool(sea.RANDOM_START),
            "APGD_RADIUS_SCHEDULE": bool(sea.RADIUS_SCHEDULE),
            # SEA's early stop, where the member's objective can tell what is left to break
            "EARLY_STOP": bool(sea.EARLY_STOP) and dense,
            # SEA's returned point: fewest correct pixels, where the objective counts them
            "APGD_KEEP": sea.KEEP if dense else "loss",
        }
        out.append((entry, {"attack": attack, "objective": objective, "overrides": overrides}))
    return out


@register_threat("sea")
class SeaKind(ThreatKind):
    """``sea`` / ``sea_fast``: the per-image worst case over member attack passes."""

    properties = ThreatProperties(
        iterative=True, ensemble=True, needs_gradients=True, needs_objective=True,
        eps_bounded=True,
    )  # fmt: skip
    threat_model = (
        "an ensemble cell (`sea`) keeps, image by image, the member attack's prediction that "
        "lowers the data set's metric most (a worst case over its members, white-box)"
    )
    combines = True
    sweep_only = True
    objective_texts = {
        "ensemble": "per image, the member prediction that lowers the data set's metric most"
    }
    stats_files = STATS_FILES  # the sweep keeps these per-image statistics for member passes

    @classmethod
    def names(cls) -> List[str]:
        return list(ENSEMBLES)

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in ENSEMBLES

    @classmethod
    def expand(cls, cfg, include_adaptive: bool = True) -> List[ThreatSpec]:
        """Per ensemble and eps: its member passes, then its selection spec (no adaptive
        passes: an ensemble attacks the undefended model)."""
        specs = []
        for name in OrderedDict.fromkeys(cfg.ROBUSTNESS.ATTACKS):
            if not cls.claims(name):
                continue
            for eps in cfg.ROBUSTNESS.EPSILONS:
                members = tuple(
                    AttackKind.spec(cfg, m["attack"], eps, overrides=m["overrides"],
                                    member_of=(name,))
                    for _, m in ensemble_members(cfg, name)
                )  # fmt: skip
                specs += list(members)
                specs.append(ThreatSpec(cls.name, name, eps=float(eps), objective="ensemble",
                                        members=members))  # fmt: skip
        return specs

    @classmethod
    def check(cls, cfg, adapter, specs: Sequence[ThreatSpec]) -> None:
        """A task it can select for (PQ or mIoU) and members that exist and that the model can
        serve.

        Raises:
            UnsupportedModelError: an instance-only model, or a member the adapter cannot serve.
            ValueError: a malformed or unknown member, naming the key and the entry.
        """
        for name in OrderedDict.fromkeys(s.name for s in specs if s.kind == cls.name):
            if adapter.task not in STATS_FILES:
                raise UnsupportedModelError(
                    f"{adapter.meta_architecture}: {name!r} in ROBUSTNESS.ATTACKS picks per image "
                    f"the member that lowers the data set's PQ or mIoU, but this model's task is "
                    f"{adapter.task!r}, which has no additive per-image statistics; remove "
                    f"{name!r} and list the attacks to compare in ROBUSTNESS.ATTACKS instead"
                )
            key = f"ROBUSTNESS.SEA.{ENSEMBLES[name][0]}"
            for entry, member in ensemble_members(cfg, name):
                _check_member(adapter, key, entry, member["attack"], member["objective"])

    @classmethod
    def cache_key(cls, cfg, spec: ThreatSpec) -> Dict:
        return {"ensemble": spec.name, "eps": spec.eps}  # the sweep adds its members' keys

    @classmethod
    def cell_fields(cls, spec, step):
        return {"threat": dict(kind=cls.name, **cls.properties.to_dict())}

    @classmethod
    def combine(cls, spec: ThreatSpec, members, task: str, directory: str) -> List[Dict]:
        """The ensemble's cells, one per defense of its member passes; the selection (per
        defense, image_id -> member) and the selected statistics are kept in ``directory``."""
        cells, selections = ensemble_cells(spec, members, task)
        save_selection(directory, task, selections)
        return [dict(c, threat=dict(kind=cls.name, **cls.properties.to_dict())) for c in cells]


def _check_attack_name(where: str, attack: str, objective: str) -> type:
    try:
        return attack_class(attack)
    except UnknownAttackError:
        registered = ", ".join(sorted(k for k, _ in ATTACK_REGISTRY))
        raise ValueError(
            f"{where}: unknown attack {attack!r}; registered attacks: {registered} (e.g. "
            f"'apgd:{objective}')"
        ) from None


def _check_member(adapter, key: str, entry: str, attack: str, objective: str):
    where = f"{key} entry {entry!r}"
    cls = _check_attack_name(where, attack, objective)
    dense = dense_objectives(adapter)
    usable = dense if getattr(cls, "needs_dense_objective", False) else usable_objectives(adapter)
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
