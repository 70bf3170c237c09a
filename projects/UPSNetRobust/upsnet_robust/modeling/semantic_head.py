# Copyright (c) UPSNetRobust authors.
"""UPSNet's semantic head: a deformable-conv subnet shared over P2-P5 (UPSNet "FCN head")."""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

__all__ = ["DeformConvWithOffset", "UPSNetSemanticHead"]


class DeformConvWithOffset(nn.Module):
    """A 3x3 deformable conv (DCNv1) with bias, whose offsets come from a plain 3x3 conv.

    detectron2's ``DeformConv`` has no bias, and UPSNet's layer has one, so this uses
    ``torchvision.ops.deform_conv2d``. Its offset layout (interleaved (dy, dx) per kernel tap)
    equals UPSNet's, so original checkpoints map one to one. The offset conv is zero-initialised:
    the layer starts as an ordinary conv and learns to deform.
    """

    def __init__(self, in_channels: int, out_channels: int, deformable: bool = True):
        super().__init__()
        self.deformable = deformable
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = in_channels * 9
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if deformable:
            self.conv_offset = nn.Conv2d(in_channels, 18, kernel_size=3, padding=1)
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deformable:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, self.bias, padding=(1, 1))


@SEM_SEG_HEADS_REGISTRY.register()
class UPSNetSemanticHead(nn.Module):
    """Semantic logits at 1/4 resolution from P2-P5.

    One subnet of ``num_convs`` deformable conv + ReLU layers is shared over the FPN levels; the
    coarser outputs are bilinearly upsampled to the finest level, concatenated and scored with a
    1x1 conv. The loss is cross-entropy on the logits upsampled to input resolution.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        num_classes: int,
        conv_dim: int,
        num_convs: int,
        deformable: bool = True,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            input_shape: shapes of the backbone features.
            in_features (list[str]): FPN levels to use, finest first (e.g. p2..p5).
            num_classes (int): semantic classes (stuff + things).
            conv_dim (int): channels of the shared subnet.
            num_convs (int): deformable conv layers in the shared subnet.
            deformable (bool): False replaces deformable convs by plain ones.
            ignore_value (int): label ignored by the loss.
            loss_weight (float): weight of the semantic loss.
        """
        super().__init__()
        self.in_features = list(in_features)
        strides = [input_shape[f].stride for f in self.in_features]
        if strides != sorted(strides):
            raise ValueError(f"SEM_IN_FEATURES must go from fine to coarse, got strides {strides}")
        self.common_stride = strides[0]
        channels = {input_shape[f].channels for f in self.in_features}
        if len(channels) != 1:
            raise ValueError(f"The shared subnet needs equal channels on {in_features}: {channels}")
        in_channels = channels.pop()
        layers = []
        for i in range(num_convs):
            layers.append(DeformConvWithOffset(in_channels if i == 0 else conv_dim, conv_dim, deformable))
        self.subnet = nn.ModuleList(layers)
        self.score = nn.Conv2d(conv_dim * len(self.in_features), num_classes, kernel_size=1)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return {
            "input_shape": input_shape,
            "in_features": cfg.MODEL.UPSNET.SEM_IN_FEATURES,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "conv_dim": cfg.MODEL.UPSNET.SEM_CONV_DIM,
            "num_convs": cfg.MODEL.UPSNET.SEM_NUM_CONVS,
            "deformable": cfg.MODEL.UPSNET.SEM_DEFORMABLE,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": cfg.MODEL.UPSNET.SEM_LOSS_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns logits (N, num_classes, H/4, W/4) at the finest level's resolution."""
        outputs = []
        size = features[self.in_features[0]].shape[-2:]
        for name in self.in_features:
            x = features[name]
            for layer in self.subnet:
                x = F.relu(layer(x))
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outputs.append(x)
        return self.score(torch.cat(outputs, dim=1))

    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """Bilinear upsampling of 1/4-resolution logits to input resolution (UPSNet's fcn_output)."""
        return F.interpolate(
            logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cross-entropy of input-resolution logits against (N, H, W) labels."""
        full = self.upsample(logits)
        full = full[..., : targets.shape[-2], : targets.shape[-1]]
        loss = F.cross_entropy(full, targets, ignore_index=self.ignore_value, reduction="mean")
        if not torch.isfinite(loss):  # every pixel ignored: no signal, but keep the graph
            loss = full.sum() * 0.0
        return {"loss_sem_seg": loss * self.loss_weight}

    def forward(self, features, targets=None):
        """Returns (logits at 1/4 resolution, losses dict or {})."""
        logits = self.layers(features)
        if targets is None:
            return logits, {}
        return logits, self.losses(logits, targets)
