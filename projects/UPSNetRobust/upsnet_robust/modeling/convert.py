# Copyright (c) UPSNetRobust authors.
"""Conversion of checkpoints of the original UPSNet implementation (uber-research/UPSNet) to
this project's :class:`UPSNet`.

Most tensors only change name. Three change layout, because the original detector puts the
background class first and this one (detectron2) puts it last or has none:

* ``rcnn.cls_score`` (K+1 rows, background first) -> ``box_predictor.cls_score``
  (K+1 rows, background last);
* ``rcnn.bbox_pred`` (4 (K+1) rows, class-specific, background's 4 rows first) ->
  ``box_predictor.bbox_pred`` (4 K rows): the background's rows are dropped. The class-agnostic
  variant (8 rows) gives 4 rows (``MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True``);
* ``mask_branch.mask_score`` (K+1 channels, background first) -> ``mask_head.predictor``
  (K channels).

Everything else is a one-to-one copy. In particular the first conv is *not* flipped: the
original reads images with OpenCV (BGR, caffe means, std 1), which is what ``Base-UPSNet.yaml``
sets (``INPUT.FORMAT "BGR"``). The RPN layouts already agree (A objectness channels, deltas
``4 a + (dx, dy, dw, dh)``, anchors in aspect-ratio order 0.5, 1, 2), and so does the offset
layout of the deformable convs (interleaved (dy, dx) per kernel tap, as
``torchvision.ops.deform_conv2d``). BatchNorm's ``num_batches_tracked`` counters are dropped
(the backbone's norms are ``FrozenBN``, which has none).
"""

import logging
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["convert_upsnet_state_dict", "unwrap_upsnet_checkpoint", "load_upsnet_checkpoint"]

logger = logging.getLogger(__name__)

_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"
_BACKBONE = "backbone.bottom_up"

# (original name pattern, detectron2 name template); the first full match wins.
_RENAMES: List[Tuple[str, str]] = [
    # ResNet (caffe/MSRA, stride in the 1x1 conv): stem, then resN.layers.i -> resN.i
    (r"resnet_backbone\.conv1\.conv1\.weight", f"{_BACKBONE}.stem.conv1.weight"),
    (rf"resnet_backbone\.conv1\.bn1\.{_BN}", rf"{_BACKBONE}.stem.conv1.norm.\1"),
    (
        r"resnet_backbone\.res(\d)\.layers\.(\d+)\.conv(\d)\.weight",
        rf"{_BACKBONE}.res\1.\2.conv\3.weight",
    ),
    (
        rf"resnet_backbone\.res(\d)\.layers\.(\d+)\.bn(\d)\.{_BN}",
        rf"{_BACKBONE}.res\1.\2.conv\3.norm.\4",
    ),
    (
        r"resnet_backbone\.res(\d)\.layers\.(\d+)\.downsample\.0\.weight",
        rf"{_BACKBONE}.res\1.\2.shortcut.weight",
    ),
    (
        rf"resnet_backbone\.res(\d)\.layers\.(\d+)\.downsample\.1\.{_BN}",
        rf"{_BACKBONE}.res\1.\2.shortcut.norm.\3",
    ),
    # FPN: 1x1 laterals and 3x3 outputs (P6 is a parameter-free max-pool in both)
    (rf"fpn\.fpn_p(\d)_1x1\.{_WB}", r"backbone.fpn_lateral\1.\2"),
    (rf"fpn\.fpn_p(\d)\.{_WB}", r"backbone.fpn_output\1.\2"),
    # RPN
    (rf"rpn\.conv_proposal\.0\.{_WB}", r"proposal_generator.rpn_head.conv.\1"),
    (rf"rpn\.cls_score\.{_WB}", r"proposal_generator.rpn_head.objectness_logits.\1"),
    (rf"rpn\.bbox_pred\.{_WB}", r"proposal_generator.rpn_head.anchor_deltas.\1"),
    # box head (fc6/fc7 flatten the 256x7x7 RoI feature in the same C, H, W order)
    (rf"rcnn\.fc6\.0\.{_WB}", r"roi_heads.box_head.fc1.\1"),
    (rf"rcnn\.fc7\.0\.{_WB}", r"roi_heads.box_head.fc2.\1"),
    (rf"rcnn\.cls_score\.{_WB}", r"roi_heads.box_predictor.cls_score.\1"),
    (rf"rcnn\.bbox_pred\.{_WB}", r"roi_heads.box_predictor.bbox_pred.\1"),
    # mask head
    (rf"mask_branch\.mask_conv(\d)\.0\.{_WB}", r"roi_heads.mask_head.mask_fcn\1.\2"),
    (rf"mask_branch\.mask_deconv1\.0\.{_WB}", r"roi_heads.mask_head.deconv.\1"),
    (rf"mask_branch\.mask_score\.{_WB}", r"roi_heads.mask_head.predictor.\1"),
    # semantic ("FCN") head: conv.i.0 is the i-th DeformConvWithOffset of the shared subnet
    (
        rf"fcn_head\.fcn_subnet\.conv\.(\d+)\.0\.conv_offset\.{_WB}",
        r"sem_seg_head.subnet.\1.conv_offset.\2",
    ),
    (rf"fcn_head\.fcn_subnet\.conv\.(\d+)\.0\.conv\.{_WB}", r"sem_seg_head.subnet.\1.\2"),
    (rf"fcn_head\.score\.{_WB}", r"sem_seg_head.score.\1"),
]
_RENAMES_COMPILED = [(re.compile(p), t) for p, t in _RENAMES]
_DROPPED = re.compile(r"resnet_backbone\..*\.num_batches_tracked")
# Without these it is not a trained UPSNet (e.g. an ImageNet backbone): refuse early.
_REQUIRED = (
    "resnet_backbone.conv1.conv1.weight",
    "rcnn.cls_score.weight",
    "rcnn.bbox_pred.weight",
    "mask_branch.mask_score.weight",
    "fcn_head.score.weight",
)


def _background_last(t: torch.Tensor) -> torch.Tensor:
    """Rows [bg, c1..cK] -> [c1..cK, bg] (softmax classifier)."""
    return torch.cat([t[1:], t[:1]], dim=0)


def _drop_first(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[rows:].clone()


def _layout_fixes(original: Mapping[str, torch.Tensor]) -> Dict[str, Callable]:
    """Per original key, the re-ordering it needs; checks that the class counts agree."""
    num_rows = original["rcnn.cls_score.weight"].shape[0]  # K + 1, background first
    if num_rows < 2:
        raise ValueError(f"rcnn.cls_score.weight has {num_rows} rows; expected K+1 >= 2")
    box_rows = original["rcnn.bbox_pred.weight"].shape[0]
    if box_rows not in (4 * num_rows, 8):
        raise ValueError(
            f"rcnn.bbox_pred.weight has {box_rows} rows; expected 4 x {num_rows} (class-specific, "
            f"as rcnn.cls_score) or 8 (class-agnostic)"
        )
    mask_rows = original["mask_branch.mask_score.weight"].shape[0]
    if mask_rows != num_rows:
        raise ValueError(
            f"mask_branch.mask_score.weight has {mask_rows} channels; expected {num_rows} "
            f"(the classes of rcnn.cls_score, background included)"
        )
    fixes = {}
    for p in ("weight", "bias"):
        fixes[f"rcnn.cls_score.{p}"] = _background_last
        fixes[f"rcnn.bbox_pred.{p}"] = _drop_first(4)
        fixes[f"mask_branch.mask_score.{p}"] = _drop_first(1)
    return fixes


def _rename(key: str) -> Optional[str]:
    for pattern, template in _RENAMES_COMPILED:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(template)
    return None


def convert_upsnet_state_dict(
    original: Mapping[str, torch.Tensor],
) -> "OrderedDict[str, torch.Tensor]":
    """Convert an original UPSNet state dict (keys without ``module.``; see
    :func:`unwrap_upsnet_checkpoint`) to this project's :class:`UPSNet` names and layouts.

    Raises:
        ValueError: if keys are left unconverted (all are listed), required heads are missing,
            values are not tensors, or the class counts of the box and mask heads disagree.
    """
    not_tensors = [k for k, v in original.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise ValueError(f"UPSNet state dict has non-tensor values under: {sorted(not_tensors)}")
    missing = [k for k in _REQUIRED if k not in original]
    if missing:
        raise ValueError(
            f"Not a complete UPSNet checkpoint: missing {missing} "
            f"(got {len(original)} keys, e.g. {sorted(original)[:5]})"
        )
    fixes = _layout_fixes(original)
    converted, unconverted, dropped = OrderedDict(), [], 0
    for key, value in original.items():
        if _DROPPED.fullmatch(key):
            dropped += 1
            continue
        new_key = _rename(key)
        if new_key is None:
            unconverted.append(key)
            continue
        converted[new_key] = fixes.get(key, lambda t: t)(value)
    if unconverted:
        raise ValueError(
            f"{len(unconverted)} key(s) of the UPSNet checkpoint have no counterpart in this "
            f"project's UPSNet (supported: the ResNet-FPN Mask R-CNN + FCN head of the Cityscapes/"
            f"COCO configs, without norms in the heads or deformable backbone convs): "
            f"{sorted(unconverted)}"
        )
    logger.info(f"Converted {len(converted)} tensors; dropped {dropped} BatchNorm counters")
    return converted


def unwrap_upsnet_checkpoint(checkpoint, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a plain state dict or one under ``state_dict``
    or ``model``, with a ``module.`` prefix (DataParallel / DDP) removed."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(checkpoint).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = OrderedDict((k[len("module.") :], v) for k, v in checkpoint.items())
    return dict(checkpoint)


def load_upsnet_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Load an original UPSNet ``.pth`` safely (``weights_only=True``) and unwrap its state dict."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(
            f"Cannot load {path} with torch.load(weights_only=True): {e}. An original UPSNet "
            f"checkpoint is a plain state dict of tensors."
        ) from e
    return unwrap_upsnet_checkpoint(checkpoint, source=path)
