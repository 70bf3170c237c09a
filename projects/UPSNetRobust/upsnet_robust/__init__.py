# Copyright (c) UPSNetRobust authors.
"""UPSNetRobust: UPSNet for detectron2, adversarial attacks, defenses and robustness sweeps.

Importing this package registers every component (meta-architecture, datasets, attacks,
defenses, threat kinds) in detectron2's and the project's registries.
"""
from .config import add_robustness_config, add_upsnet_config

# Imported for their registration side effects.
from . import adapters  # noqa: F401  isort:skip
from . import data  # noqa: F401  isort:skip
from . import modeling  # noqa: F401  isort:skip
from . import attacks  # noqa: F401  isort:skip
from . import defenses  # noqa: F401  isort:skip
from . import threats  # noqa: F401  isort:skip
from . import evaluation  # noqa: F401  isort:skip
from . import engine  # noqa: F401  isort:skip

__all__ = ["add_upsnet_config", "add_robustness_config"]
