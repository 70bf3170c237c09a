# Copyright (c) UPSNetRobust authors.
"""Model adapters: the only layer of the robustness engine that knows a model.

Importing this package registers the adapters of detectron2's meta-architectures; UPSNet's
adapter lives beside UPSNet (``upsnet_robust.modeling.adapter``).
"""
from .base import *  # noqa: F401,F403
from .base import __all__ as _base_all
from .panoptic_deeplab import PanopticDeepLabAdapter  # noqa: F401  registers "PanopticDeepLab"
from .panoptic_fpn import PanopticFPNAdapter  # noqa: F401  registers "PanopticFPN"

__all__ = list(_base_all)

# detectron2's meta-architectures (registered on import)
from .rcnn import GeneralizedRCNNAdapter  # noqa: E402
from .semantic import SemanticSegmentorAdapter  # noqa: E402

__all__ += ["GeneralizedRCNNAdapter", "SemanticSegmentorAdapter"]

# `transformers` models (TransformersSegmentor; transformers itself is imported lazily)
from .transformers import TransformersAdapter  # noqa: E402

__all__ += ["TransformersAdapter"]
