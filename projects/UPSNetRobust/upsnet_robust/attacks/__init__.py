# Copyright (c) UPSNetRobust authors.
"""Adversarial attack algorithms (model-agnostic) and their registry.

Add an attack with :func:`register_attack` on an :class:`Attack` subclass, an objective with
:func:`register_objective`.

An attack maximises ``objective(x)`` (a scalar or one value per image) over float images on the
0-255 scale within an L-inf ball; see :class:`Attack`.
"""

from .apgd import APGD, apgd_checkpoints, radius_stages
from .base import Attack, DenseObjective, NonFiniteGradientError, objective_gradient, project_linf
from .cospgd import CosPGD, cospgd_loss
from .dense import DenseAttack
from .fgsm import FGSM
from .iterative import BIM, IFGSM, ILLC, PGD, kurakin_num_steps
from .momentum import MIFGSM
from .random_search import RandomSearch
from .registry import (
    ATTACK_REGISTRY,
    UnknownAttackError,
    attack_class,
    build_attack,
    register_attack,
)
from .segpgd import SegPGD, segpgd_lambda, segpgd_loss
from . import objectives
from .objectives import *  # noqa: F401,F403  (objectives, OBJECTIVE_REGISTRY, build_objective)
from . import dense_objectives  # registers masked_ce, balanced_masked_ce, js_divergence, ...
from .dense_objectives import *  # noqa: F401,F403
from . import segment_objective  # registers segment
from .segment_objective import *  # noqa: F401,F403

__all__ = [
    "APGD",
    "ATTACK_REGISTRY",
    "Attack",
    "BIM",
    "CosPGD",
    "DenseAttack",
    "DenseObjective",
    "FGSM",
    "IFGSM",
    "ILLC",
    "MIFGSM",
    "NonFiniteGradientError",
    "PGD",
    "RandomSearch",
    "SegPGD",
    "UnknownAttackError",
    "apgd_checkpoints",
    "attack_class",
    "build_attack",
    "register_attack",
    "cospgd_loss",
    "kurakin_num_steps",
    "objective_gradient",
    "project_linf",
    "radius_stages",
    "segpgd_lambda",
    "segpgd_loss",
]
__all__ += objectives.__all__
__all__ += dense_objectives.__all__
__all__ += segment_objective.__all__
