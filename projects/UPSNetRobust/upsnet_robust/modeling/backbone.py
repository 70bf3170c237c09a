# Copyright (c) UPSNetRobust authors.
"""A slim ResNet-18 (and -FPN) whose widths come from the config, for models that train on a CPU.

detectron2's ``build_resnet_backbone`` fixes R18/R34 at 64 channels in res2; the embedded
default model wants fewer, so this builds the same detectron2 ``ResNet`` from ``BasicBlock``
stages with ``MODEL.RESNETS.RES2_OUT_CHANNELS`` and ``STEM_OUT_CHANNELS`` honoured.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

__all__ = ["build_slim_resnet_backbone", "build_slim_resnet_fpn_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 (BasicBlock) with configurable widths and ``MODEL.RESNETS.OUT_FEATURES``
    (e.g. res2, res3, res5 for the DeepLab heads of a CPU-sized Panoptic-DeepLab)."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"slim ResNet supports MODEL.RESNETS.DEPTH 18 or 34, got {r.DEPTH}")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for i, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                stride_per_block=[1 if i == 0 else 2] + [1] * (num_blocks - 1),
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_slim_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-18/34 (BasicBlock) with configurable widths, plus detectron2's FPN."""
    return FPN(
        bottom_up=build_slim_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
