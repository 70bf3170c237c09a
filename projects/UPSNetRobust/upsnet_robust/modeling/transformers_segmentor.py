# Copyright (c) UPSNetRobust authors.
"""``TransformersSegmentor``: a Hugging Face `transformers` segmentation model as a detectron2
meta-architecture (Mask2Former, MaskFormer, SegFormer, UperNet, ...).

It takes detectron2's ``list[dict]`` inputs (``image``: (3, H, W) in ``INPUT.FORMAT``, 0-255),
normalises them inside the forward (so attacks see [0, 255] pixels; BGR is turned into the RGB
that `transformers` models expect), returns ``sem_seg`` / ``panoptic_seg`` / ``instances`` in the
data set's contiguous ids, and in training returns the model's own losses against targets built
from the mapper's ground truth (:mod:`.transformers_outputs`).

Nothing is ever downloaded: ``MODEL.TRANSFORMERS.CONFIG`` and a directory in ``MODEL.WEIGHTS``
must be local (a hub id gets an error saying to ``save_pretrained`` it on a connected machine),
every load passes ``local_files_only``, and configs asking for a pretrained or timm backbone are
turned to (or rejected for) a backbone built from the config alone. See docs/MODELS.md.
"""
import json
import logging
import os
from typing import Dict, FrozenSet, List, Optional

import torch
from torch import nn
import torch.nn.functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..config import register_config
from . import transformers_outputs as outputs

__all__ = [
    "TransformersSegmentor",
    "add_transformers_config",
    "load_transformers_config",
    "check_class_names",
]

logger = logging.getLogger(__name__)

TASKS = ("panoptic", "semantic", "instance")
# mask-classification heads: (Q, K+1) class logits and (Q, h, w) mask logits per image
MASK_CLASSIFICATION = ("Mask2FormerForUniversalSegmentation", "MaskFormerForInstanceSegmentation")
_LOCAL_HINT = (
    "Nothing is downloaded at run time: on a connected machine run "
    "`{cls}.from_pretrained('<hub id>').save_pretrained('<dir>')` and pass that local directory "
    "(docs/MODELS.md)."
)


@register_config  # MODEL.TRANSFORMERS exists in every config the tools build
def add_transformers_config(cfg):
    """Add ``MODEL.TRANSFORMERS``: which `transformers` class, its config, the task."""
    _C = cfg
    _C.MODEL.TRANSFORMERS = CN()
    # A class of `transformers` with a segmentation head, e.g. Mask2FormerForUniversalSegmentation,
    # MaskFormerForInstanceSegmentation, SegformerForSemanticSegmentation,
    # UperNetForSemanticSegmentation.
    _C.MODEL.TRANSFORMERS.CLASS = "Mask2FormerForUniversalSegmentation"
    # A config.json file or a directory written by save_pretrained ("" = the MODEL.WEIGHTS
    # directory). Local paths only.
    _C.MODEL.TRANSFORMERS.CONFIG = ""
    # "panoptic" (panoptic_seg + sem_seg, PQ), "semantic" (sem_seg, mIoU) or "instance" (AP).
    _C.MODEL.TRANSFORMERS.TASK = "panoptic"
    # Mask classification: a query is kept above this class probability, and keeps its pixels
    # if they are at least this share of its mask (Mask2Former's defaults).
    _C.MODEL.TRANSFORMERS.OBJECT_MASK_THRESHOLD = 0.8
    _C.MODEL.TRANSFORMERS.OVERLAP_THRESHOLD = 0.8
    # Inputs are padded to a multiple of this (the backbone's largest stride).
    _C.MODEL.TRANSFORMERS.SIZE_DIVISIBILITY = 32
    # The project's Trainer: "SGD" (detectron2's) or "ADAMW" (how transformer models are trained).
    if "OPTIMIZER" not in _C.SOLVER:
        _C.SOLVER.OPTIMIZER = "SGD"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the lock file
        raise ImportError(
            "MODEL.META_ARCHITECTURE TransformersSegmentor needs the `transformers` package "
            "(requirements/lock.txt; `make install`)"
        ) from e
    return transformers


def model_class(name: str):
    """The `transformers` class ``name`` (MODEL.TRANSFORMERS.CLASS), with a segmentation head."""
    cls = getattr(_transformers(), name, None)
    if cls is None or not (name in MASK_CLASSIFICATION or name.endswith("ForSemanticSegmentation")):
        raise ValueError(
            f"MODEL.TRANSFORMERS.CLASS {name!r} is not a supported `transformers` segmentation "
            f"class; use one of {', '.join(MASK_CLASSIFICATION)} or a *ForSemanticSegmentation "
            "class (e.g. SegformerForSemanticSegmentation, UperNetForSemanticSegmentation)"
        )
    return cls


def _local_config_path(path: str, key: str, cls_name: str) -> str:
    """``path`` as a local config.json file, or a clear error (a hub id is never fetched)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key} {path!r} is neither a config.json file nor a local directory written by "
            f"save_pretrained (with a config.json). " + _LOCAL_HINT.format(cls=cls_name)
        )
    return path


def _offline_backbone(config, source: str) -> None:
    """Make building ``config``'s model touch no network: a pretrained backbone is built from
    its config instead (the weights come from MODEL.WEIGHTS); a timm backbone, or one named by
    a hub id without its config, is rejected."""
    if getattr(config, "use_timm_backbone", False):
        raise ValueError(
            f"{source} asks for a timm backbone ({config.backbone!r}), which would be fetched; "
            "save the model with a `transformers` backbone (backbone_config) instead"
        )
    if getattr(config, "backbone_config", None) is None and getattr(config, "backbone", None):
        raise ValueError(
            f"{source} names its backbone by hub id ({config.backbone!r}) without a "
            "backbone_config, so building it would download that config; save a config whose "
            "backbone_config is set (e.g. a ResNetConfig or SwinConfig)"
        )
    if getattr(config, "use_pretrained_backbone", False):
        logger.info("%s: use_pretrained_backbone set to False (weights from MODEL.WEIGHTS)", source)
        config.use_pretrained_backbone = False


def load_transformers_config(cfg):
    """The `transformers` config of ``cfg``: MODEL.TRANSFORMERS.CONFIG, else the config.json of
    the MODEL.WEIGHTS directory, made safe to build offline."""
    cls_name = cfg.MODEL.TRANSFORMERS.CLASS
    model_cls = model_class(cls_name)
    key, path = "MODEL.TRANSFORMERS.CONFIG", cfg.MODEL.TRANSFORMERS.CONFIG
    if not path:
        key, path = "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS
        if not os.path.isdir(path):
            raise ValueError(
                "TransformersSegmentor needs MODEL.TRANSFORMERS.CONFIG (a config.json or a "
                "save_pretrained directory), or MODEL.WEIGHTS set to a save_pretrained "
                f"directory; got CONFIG '' and WEIGHTS {path!r}"
            )
    path = _local_config_path(path, key, cls_name)
    with open(path) as f:
        config = model_cls.config_class.from_dict(json.load(f))
    _offline_backbone(config, f"{key} {path}")
    return config


def _is_default_name(i: int, name: str) -> bool:
    return str(name) == f"LABEL_{i}"


def check_class_names(config, names, dataset: str, source: str) -> None:
    """ValueError unless the model's classes (``num_labels`` / ``id2label``) are the data set's
    contiguous classes ``names``, in number and, where the model names them, in order."""
    labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    if len(labels) != len(names):
        raise ValueError(
            f"{source} predicts {len(labels)} classes (num_labels) but data set {dataset!r} has "
            f"{len(names)} ({', '.join(map(str, names))}); the model's class k must be the data "
            "set's contiguous id k: use a model trained on this label set, or a data set with "
            f"{len(labels)} classes"
        )
    for i, (label, name) in enumerate(zip(labels, names)):
        if _is_default_name(i, label):
            continue
        if str(label).strip().lower() != str(name).strip().lower():
            raise ValueError(
                f"{source} names class {i} {label!r} (id2label) but data set {dataset!r} has "
                f"{name!r} at contiguous id {i}; the model's classes {labels} must be the data "
                f"set's {list(names)} in the same order"
            )


def dataset_class_names(metadata, task: str):
    """The data set's contiguous classes the model predicts: things for instance models, every
    class (detectron2's ``stuff_classes`` in the unified convention) otherwise; None if unknown."""
    if metadata is None:
        return None
    key = "thing_classes" if task == "instance" else "stuff_classes"
    return metadata.get(key, None)


def _metadata(cfg):
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name in MetadataCatalog.list():
            return MetadataCatalog.get(name)
    return None


@META_ARCH_REGISTRY.register()
class TransformersSegmentor(nn.Module):
    """A `transformers` segmentation model with detectron2's interface (module docstring).

    The model's class k is the data set's contiguous id k (checked at set-up against the
    data set's class names); ``thing_ids`` says which ids are things (panoptic merge).
    """

    @configurable
    def __init__(
        self,
        *,
        network: nn.Module,
        task: str,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
        thing_ids=(),
        ignore_label: int = 255,
        size_divisibility: int = 32,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        max_detections: int = 100,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"MODEL.TRANSFORMERS.TASK must be one of {TASKS}, got {task!r}")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"TransformersSegmentor reads RGB or BGR images, got {input_format!r}")
        self.network = network
        self.task = task
        self.mask_classification = type(network).__name__ in MASK_CLASSIFICATION
        if not self.mask_classification and task != "semantic":
            raise ValueError(
                f"{type(network).__name__} predicts semantic maps only; set "
                f"MODEL.TRANSFORMERS.TASK semantic (got {task!r})"
            )
        self.input_format = input_format
        self.thing_ids = sorted(int(i) for i in thing_ids)
        self.ignore_label = int(ignore_label)
        self.size_divisibility = int(size_divisibility)
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.max_detections = int(max_detections)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.TRANSFORMERS
        config = load_transformers_config(cfg)
        meta = _metadata(cfg)
        names = dataset_class_names(meta, node.TASK)
        source = f"{node.CLASS} ({node.CONFIG or cfg.MODEL.WEIGHTS})"
        if names:
            check_class_names(config, names, meta.name, source)
        things = meta.get("thing_dataset_id_to_contiguous_id", {}) if meta is not None else {}
        return {
            "network": model_class(node.CLASS)(config),
            "task": node.TASK,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "thing_ids": list(things.values()) if node.TASK == "panoptic" else (),
            "ignore_label": meta.get("ignore_label", 255) if meta is not None else 255,
            "size_divisibility": node.SIZE_DIVISIBILITY,
            "object_mask_threshold": node.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": node.OVERLAP_THRESHOLD,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_labels)

    # ------------------------------------------------------------------ weights
    def load_pretrained_directory(self, path: str) -> None:
        """Load a directory written by ``save_pretrained`` (``from_pretrained`` with
        ``local_files_only``, this model's config), strictly: every tensor must match. The
        project's checkpointer calls it for a directory in MODEL.WEIGHTS."""
        cls_name = type(self.network).__name__
        _local_config_path(path, "MODEL.WEIGHTS", cls_name)
        loaded = type(self.network).from_pretrained(
            path, config=self.network.config, local_files_only=True
        )
        self.network.load_state_dict(loaded.state_dict(), strict=True)

    # ------------------------------------------------------------------ forward
    def preprocess(self, images: List[torch.Tensor]) -> ImageList:
        """Normalise 0-255 images in INPUT.FORMAT (differentiably), BGR -> RGB, and pad."""
        normalized = []
        for x in images:
            x = (x.to(self.device).float() - self.pixel_mean) / self.pixel_std
            normalized.append(x.flip(0) if self.input_format == "BGR" else x)
        return ImageList.from_tensors(normalized, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        batch = self.preprocess([x["image"] for x in batched_inputs])
        size = tuple(batch.tensor.shape[-2:])
        if not self.mask_classification:
            model_ignore = self._model_ignore_index()
            labels = torch.stack(
                [outputs.semantic_targets(x, self.ignore_label, model_ignore, size)
                 for x in batched_inputs]
            ).to(self.device)
            return {"loss_sem_seg": self.network(pixel_values=batch.tensor, labels=labels).loss}
        targets = [
            outputs.mask_targets(
                x, self.task, self.thing_ids, self.num_classes, self.ignore_label, size
            )
            for x in batched_inputs
        ]
        out = self.network(pixel_values=batch.tensor, output_auxiliary_logits=True)
        # the model's own loss terms (its get_loss_dict, weighted), not only their sum
        return self.network.get_loss_dict(
            out.masks_queries_logits,
            out.class_queries_logits,
            [m.to(self.device) for m, _ in targets],
            [c.to(self.device) for _, c in targets],
            out.auxiliary_logits,
        )

    def _model_ignore_index(self) -> int:
        config = self.network.config
        for key in ("semantic_loss_ignore_index", "loss_ignore_index"):
            if hasattr(config, key):
                return int(getattr(config, key))
        return 255

    def _raw(self, batch: ImageList):
        """Eval outputs upsampled to the padded input: (class, mask) logits, or pixel logits."""
        size = tuple(batch.tensor.shape[-2:])
        out = self.network(pixel_values=batch.tensor)
        if self.mask_classification:
            masks = out.masks_queries_logits
            masks = F.interpolate(masks, size, mode="bilinear", align_corners=False)
            return out.class_queries_logits, masks
        return None, F.interpolate(out.logits, size, mode="bilinear", align_corners=False)

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per image (C, h, w) class scores at its own size: a semantic model's logits; for a
        mask-classification model the log of its normalised per-pixel class probabilities
        (:func:`~.transformers_outputs.normalized_log_scores`). Images of one size run together,
        so padding never depends on the other images."""
        out: List[Optional[torch.Tensor]] = [None] * len(images)
        groups: Dict[tuple, List[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        for indices in groups.values():
            batch = self.preprocess([images[i] for i in indices])
            classes, pixels = self._raw(batch)
            for k, i in enumerate(indices):
                h, w = batch.image_sizes[k]
                if classes is None:
                    out[i] = pixels[k, :, :h, :w]
                else:
                    scores = outputs.semantic_probabilities(classes[k], pixels[k, :, :h, :w])
                    out[i] = outputs.normalized_log_scores(scores)
        return out

    def inference(self, batched_inputs: List[Dict], keys: Optional[FrozenSet[str]] = None):
        """detectron2 outputs at each input's ``height`` x ``width`` (default: its size):
        ``sem_seg`` always, ``panoptic_seg`` / ``instances`` for those tasks; ``keys`` limits
        the work to the outputs a caller reads."""
        batch = self.preprocess([x["image"] for x in batched_inputs])
        classes, pixels = self._raw(batch)
        results = []
        for k, (x, image_size) in enumerate(zip(batched_inputs, batch.image_sizes)):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            pred = sem_seg_postprocess(pixels[k], image_size, height, width)
            if classes is None:
                results.append({"sem_seg": pred})
                continue
            results.append(self._mask_outputs(classes[k], pred, keys))
        return results

    def _mask_outputs(self, classes, masks, keys) -> Dict:
        result = {}
        if keys is None or "sem_seg" in keys:
            result["sem_seg"] = outputs.semantic_probabilities(classes, masks)
        if self.task == "panoptic" and (keys is None or "panoptic_seg" in keys):
            result["panoptic_seg"] = outputs.panoptic_inference(
                classes, masks, self.thing_ids, self.object_mask_threshold, self.overlap_threshold
            )
        if self.task == "instance" and (keys is None or "instances" in keys):
            result["instances"] = outputs.instance_inference(classes, masks, self.max_detections)
        return result
