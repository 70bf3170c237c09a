# Copyright (c) UPSNetRobust authors.
"""The passes of a robustness sweep, as plain specs derived from the config alone.

A spec is ``{"attack", "eps", "adaptive"}`` for a clean, plain or adaptive pass. The ensembles
``sea`` and ``sea_fast`` (:data:`ENSEMBLES`) expand, per eps, into one *member pass* per member
of ``ROBUSTNESS.SEA`` -- an ordinary pass of that attack whose spec also carries the member's
``objective``, ``num_steps``, ``random_start``, ``radius_schedule``, ``early_stop``, ``keep``
and ``member_of`` (the ensembles it serves) -- followed by an *ensemble spec* ``{"attack":
"sea", "eps", "adaptive": None, "ensemble": True, "members": [member specs]}`` that selects the
worst case from the members' stored per-image statistics. A member shared by two ensembles is
one pass.
"""
from collections import OrderedDict
from typing import Dict, List, Tuple

__all__ = [
    "CLEAN",
    "ENSEMBLES",
    "MEMBER_FIELDS",
    "adaptive_defense_names",
    "ensemble_members",
    "member_tag",
    "parse_member",
    "spec_cfg",
    "sweep_passes",
]

CLEAN = "clean"
#: Ensemble name -> (its members key, its steps key) under ROBUSTNESS.SEA.
ENSEMBLES = OrderedDict(
    [("sea", ("MEMBERS", "NUM_STEPS")), ("sea_fast", ("FAST_MEMBERS", "FAST_NUM_STEPS"))]
)
#: What a member spec adds to a pass spec (each overrides a ROBUSTNESS key, see spec_cfg).
MEMBER_FIELDS = (
    "objective", "num_steps", "random_start", "radius_schedule", "early_stop", "keep"
)


def adaptive_defense_names(cfg) -> List[str]:
    """Defenses that get adaptive passes: those of ROBUSTNESS.DEFENSES other than "none" (in
    order, without repeats), if ROBUSTNESS.ADAPTIVE; else none."""
    if not cfg.ROBUSTNESS.ADAPTIVE:
        return []
    return [d for d in OrderedDict.fromkeys(cfg.ROBUSTNESS.DEFENSES) if d != "none"]


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


def ensemble_members(cfg, name: str) -> List[Tuple[str, Dict]]:
    """``(entry, member fields)`` of each member of ensemble ``name``, repeats dropped.

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
        fields = {
            "attack": attack,
            "objective": objective,
            "num_steps": steps,
            "random_start": bool(sea.RANDOM_START),
            "radius_schedule": bool(sea.RADIUS_SCHEDULE),
            # SEA's early stop, where the member's objective can tell what is left to break
            "early_stop": bool(sea.EARLY_STOP) and _supports_early_stop(objective),
            # SEA's returned point: fewest correct pixels, where the objective counts them
            "keep": sea.KEEP if _supports_early_stop(objective) else "loss",
        }
        out.append((entry, fields))
    return out


def _supports_early_stop(objective: str) -> bool:
    from ..attacks.objectives import objective_class

    try:
        return bool(getattr(objective_class(objective), "supports_early_stop", False))
    except KeyError:  # an unknown objective: the set-up checks name it
        return False


def _ensemble_passes(cfg, name: str, eps: float, passes: List[Dict]) -> None:
    """Append ensemble ``name``'s member passes at ``eps`` (merging with identical ones already
    listed) and its selection spec to ``passes``."""
    members = []
    for _, fields in ensemble_members(cfg, name):
        spec = dict(fields, eps=eps, adaptive=None)
        members.append(spec)
        same = next((p for p in passes if "member_of" in p and _same_member(p, spec)), None)
        if same is None:
            passes.append(dict(spec, member_of=[name]))
        elif name not in same["member_of"]:
            same["member_of"].append(name)
    passes.append(
        {"attack": name, "eps": eps, "adaptive": None, "ensemble": True, "members": members}
    )


def _same_member(a: Dict, b: Dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("attack", "eps", "adaptive") + MEMBER_FIELDS)


def sweep_passes(cfg) -> List[Dict]:
    """The passes of a sweep, in order: clean first (if configured), then attack x eps (an
    ensemble: its member passes, then its selection), then (ROBUSTNESS.ADAPTIVE) attack x eps x
    defense adaptive passes (none for ensembles). See the module docstring for the specs."""
    r = cfg.ROBUSTNESS
    passes = [{"attack": CLEAN, "eps": 0.0, "adaptive": None}] if r.INCLUDE_CLEAN else []
    for name in r.ATTACKS:
        for eps in r.EPSILONS:
            if name in ENSEMBLES:
                _ensemble_passes(cfg, name, float(eps), passes)
            else:
                passes.append({"attack": name, "eps": float(eps), "adaptive": None})
    for name in r.ATTACKS:
        if name in ENSEMBLES:
            continue
        for eps in r.EPSILONS:
            for d in adaptive_defense_names(cfg):
                passes.append({"attack": name, "eps": float(eps), "adaptive": d})
    return passes


def spec_cfg(cfg, spec: Dict):
    """The config a pass runs with: ``cfg`` itself, or for a member pass a copy with its
    objective and step settings in ROBUSTNESS.{OBJECTIVE, NUM_STEPS, RANDOM_START,
    APGD_RADIUS_SCHEDULE, EARLY_STOP, APGD_KEEP}, so the attack and the hook read them as for
    any pass (and a member equal to a plain pass has that pass's key and cache)."""
    if "objective" not in spec:
        return cfg
    out = cfg.clone()
    out.defrost()
    r = out.ROBUSTNESS
    r.OBJECTIVE = spec["objective"]
    r.NUM_STEPS = int(spec["num_steps"])
    r.RANDOM_START = bool(spec["random_start"])
    r.APGD_RADIUS_SCHEDULE = bool(spec["radius_schedule"])
    r.EARLY_STOP = bool(spec.get("early_stop", False))
    r.APGD_KEEP = spec.get("keep", "loss")
    out.freeze()
    return out


def member_tag(spec: Dict) -> str:
    """A member pass's name in file names: ``attack-objective-T<steps>``."""
    return f"{spec['attack']}-{spec['objective']}-T{spec['num_steps']}"
