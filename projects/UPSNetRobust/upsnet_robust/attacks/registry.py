# Copyright (c) UPSNetRobust authors.
"""``ATTACK_REGISTRY`` and :func:`build_attack`: pick an attack algorithm by name from a config."""

from detectron2.utils.registry import Registry

from .apgd import APGD
from ..utils.registry import subclass_decorator
from .base import Attack
from .cospgd import CosPGD
from .fgsm import FGSM
from .iterative import BIM, IFGSM, ILLC, PGD
from .momentum import MIFGSM
from .random_search import RandomSearch
from .segpgd import SegPGD

__all__ = [
    "ATTACK_REGISTRY",
    "UnknownAttackError",
    "attack_class",
    "build_attack",
    "register_attack",
]

ATTACK_REGISTRY = Registry("ATTACK")
ATTACK_REGISTRY.__doc__ = """
Registry for attack algorithms: classes deriving from :class:`Attack`, built as
``cls(**cls.from_config(cfg, eps))``; they provide ``perturb(images, objective) -> adv_images``
and ``describe() -> dict``. Registered with :func:`register_attack` under the lowercase names of
``cfg.ROBUSTNESS.ATTACKS`` ("fgsm", "ifgsm", "bim", "pgd", "mifgsm", "segpgd", "cospgd",
"illc", "apgd", ...).
"""


def register_attack(name: str):
    """Class decorator: register an :class:`Attack` subclass under its ``ROBUSTNESS.ATTACKS``
    name (lower case); sets ``cls.name``. The class is built by :func:`build_attack` as
    ``cls(**cls.from_config(cfg, eps))`` (:meth:`Attack.from_config` passes ``eps`` only). A
    class that defines ``add_config(cfg)`` (a static or class method adding its own keys) gets
    it registered with :func:`upsnet_robust.config.register_config`, so an attack with a setting
    of its own is one file."""
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"Invalid attack name {name!r}: a lower-case config name, e.g. 'pgd'")
    deco = subclass_decorator(ATTACK_REGISTRY, Attack, name, attribute="name")

    def register(cls):
        cls = deco(cls)
        if "add_config" in vars(cls):
            from ..config import register_config

            register_config(cls.add_config)
        return cls

    return register


for _cls in (FGSM, IFGSM, BIM, PGD, MIFGSM, SegPGD, CosPGD, ILLC, APGD, RandomSearch):
    register_attack(_cls.name)(_cls)
del _cls


class UnknownAttackError(KeyError, ValueError):
    """No attack of that name; both a KeyError (registry lookup) and a ValueError (bad config)."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


def attack_class(name: str) -> type:
    """The registered attack class ``name`` (case-insensitive for lower-case names).

    Raises:
        UnknownAttackError: (a KeyError and a ValueError) listing the registered names.
    """
    key = name if name in ATTACK_REGISTRY else str(name).strip().lower()
    if key not in ATTACK_REGISTRY:
        registered = ", ".join(sorted(k for k, _ in ATTACK_REGISTRY))
        raise UnknownAttackError(f"Unknown attack {name!r}; registered attacks: {registered}")
    return ATTACK_REGISTRY.get(key)


def build_attack(cfg, name: str, eps) -> Attack:
    """Build the attack ``name`` with budget ``eps`` and the ``cfg.ROBUSTNESS`` settings.

    Reads ROBUSTNESS.{STEP_SIZE, NUM_STEPS, RANDOM_START, RESTARTS, MOMENTUM, SEED} (APGD also
    APGD_*). NUM_STEPS <= 0 means Kurakin's rule (10 for MI-FGSM, 100 for APGD); STEP_SIZE <= 0
    means the algorithm's default (1 for I-FGSM/ILLC, eps / T otherwise); FGSM ignores both and
    APGD STEP_SIZE. Randomised attacks get a CPU generator seeded with ROBUSTNESS.SEED.

    Args:
        cfg (CfgNode): a config with the robustness keys (``add_robustness_config``).
        name (str): a registered name (case-insensitive for the built-ins), e.g. "pgd".
        eps (float or Tensor): L-inf budget on the 0-255 scale, or (N,) per image.

    Returns:
        Attack: the attack instance.

    Raises:
        UnknownAttackError: (a KeyError and a ValueError) listing the registered names.
    """
    cls = attack_class(name)
    return cls(**cls.from_config(cfg, eps))
