# Copyright (c) UPSNetRobust authors.
"""UPSNet modeling: importing it registers ``UPSNet`` in META_ARCH_REGISTRY and
``UPSNetSemanticHead`` in SEM_SEG_HEADS_REGISTRY."""
from .backbone import build_slim_resnet_backbone, build_slim_resnet_fpn_backbone
from .checkpoint import UPSNetCheckpointer
from .meta_arch import UPSNet
from .adapter import UPSNetAdapter  # registers UPSNet's model adapter
from .semantic_head import DeformConvWithOffset, UPSNetSemanticHead
from .transformers_segmentor import TransformersSegmentor, add_transformers_config

__all__ = ["UPSNet", "build_slim_resnet_backbone", "build_slim_resnet_fpn_backbone", "UPSNetSemanticHead", "DeformConvWithOffset", "UPSNetCheckpointer", "UPSNetAdapter", "TransformersSegmentor", "add_transformers_config"]
