# Copyright (c) UPSNetRobust authors.
"""Attack objectives: what an attack maximises, separate from how (the algorithms).

An objective is built for one batch of dataset-mapper inputs and called as ``objective(x)`` on
float images ``x`` (N, 3, H, W) in 0-255 pixel units; it returns per-image values (N,) to
MAXIMISE. Every objective evaluates each image on its own with its own seed, so results do not
depend on batching or on the process that computes them.

Built with ``batched=True``, an objective runs the model once on the whole batch (the fast path
of batched attacks) and still returns each image's own value: the dense objectives and
``panoptic`` are deterministic per image; ``train_losses`` runs the backbone on the batch and
the sampling heads per image under the image's seed (UPSNet's adapter). Images
may be zero-padded to a common size (the attack hook's padded batches): each image is cropped
back to its own size, so padding never reaches the model as image content and gets no gradient.

Objectives reach the model only through its adapter (:mod:`upsnet_robust.adapters`): training
losses, dense per-pixel logits or panoptic logits, whichever the objective ``requires``.
Objectives that need ground truth (``instances`` / ``sem_seg`` ...) raise
:class:`MissingGroundTruthError` on data without it; the label-free ``pseudo_label`` objective
uses the model's own clean prediction instead.
"""
import hashlib
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from detectron2.utils.registry import Registry

from ..adapters.base import (
    DENSE_LOGITS,
    LOSSES,
    PANOPTIC_LOGITS,
    as_adapter,
    frozen_norm_training_mode,
)
from ..utils.registry import register_as

__all__ = [
    "OBJECTIVE_REGISTRY",
    "MissingGroundTruthError",
    "build_objective",
    "objective_class",
    "register_objective",
    "image_seed",
    "frozen_norm_training_mode",
    "TrainLossesObjective",
    "SemanticCEObjective",
    "PanopticObjective",
    "LeastLikelyObjective",
    "PseudoLabelObjective",
    "AutocastObjective",
    "panoptic_objective_targets",
]

OBJECTIVE_REGISTRY = Registry("ATTACK_OBJECTIVE")
OBJECTIVE_REGISTRY.__doc__ = """
Attack objectives. A registered class is built as
``cls(model_or_adapter, batched_inputs, seed=..., batched=...)`` and called on float images
(N, 3, H, W), returning per-image values (N,) to maximise. Register with
:func:`register_objective`.
"""


class MissingGroundTruthError(ValueError):
    """An objective needs ground truth the data does not have."""


def image_seed(seed: int, image_id) -> int:
    """A per-image seed from the sweep seed and the image id, independent of batch and rank."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def register_objective(name: str):
    """Class decorator: register an objective under its config name (``ROBUSTNESS.OBJECTIVE``).
    The class may set ``requires`` (an adapter capability: "losses", "dense_logits",
    "panoptic_logits") so that models without it are rejected at set-up."""

    def deco(cls):
        cls.registered_name = name
        register_as(OBJECTIVE_REGISTRY, name, cls)
        return cls

    return deco


def _to_device(value, device):
    return value.to(device) if hasattr(value, "to") else value


class _Objective:
    """Base: holds the model's adapter, the inputs (without their images) and per-image seeds.

    Subclasses set ``requires`` (the adapter capability they use) and ``ground_truth`` (input
    keys they need; the string "losses" means the adapter's ``loss_ground_truth``)."""

    requires: str = ""
    ground_truth: Sequence[str] = ()
    #: True for objectives built on per-pixel logits (SegPGD, CosPGD and ILLC need one).
    dense = False
    #: True for objectives that pull towards chosen targets (least_likely): the sanity checks
    #: do not hold them against untargeted ones, dense attacks and early stopping refuse them.
    targeted = False
    #: What the attack maximises, one phrase for the report's threat model.
    description = "a registered objective"

    def __init__(self, model, batched_inputs: List[Dict], seed: int = 0, batched: bool = False):
        self.adapter = as_adapter(model)
        self.model = self.adapter.model
        self.batched = batched
        if self.requires:
            self.adapter.require(self.requires, f"objective '{self.name}'")
        device = self.adapter.device
        # ground truth goes to the model's device once, not at every attack step
        self.inputs = [
            {k: _to_device(v, device) for k, v in x.items() if k != "image"} for x in batched_inputs
        ]
        self.sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        self.seeds = [
            image_seed(seed, x.get("image_id", x.get("file_name", i)))
            for i, x in enumerate(batched_inputs)
        ]
        self._check_ground_truth(batched_inputs)

    def _check_ground_truth(self, batched_inputs):
        keys = self.adapter.loss_ground_truth if self.ground_truth == "losses" else self.ground_truth
        for x in batched_inputs:
            missing = [k for k in keys if k not in x]
            if missing:
                raise MissingGroundTruthError(
                    f"objective '{self.name}' needs ground truth {missing} for "
                    f"{x.get('file_name', 'an input')} ({self.adapter.meta_architecture}); use "
                    "ROBUSTNESS.OBJECTIVE pseudo_label (label-free: the model's own clean "
                    "prediction) on data without labels"
                )

    @property
    def name(self) -> str:
        return type(self).registered_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.inputs):
            raise ValueError(f"objective built for {len(self.inputs)} images called on {x.shape[0]}")
        if self.batched and x.shape[0] > 1:
            return self.batch(x)
        values = []
        for i in range(x.shape[0]):
            with torch.random.fork_rng(devices=self.adapter._rng_devices()):
                torch.manual_seed(self.seeds[i])
                values.append(self.single(x[i], i))
        return torch.stack(values)

    def crop(self, image: torch.Tensor, i: int) -> torch.Tensor:
        """Image ``i`` without the padding of a padded batch."""
        h, w = self.sizes[i]
        return image[:, :h, :w]

    def _input(self, image: torch.Tensor, i: int) -> Dict:
        return dict(self.inputs[i], image=self.crop(image, i))

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image values (N,) from one model run on the batch (``batched=True``)."""
        return torch.stack([self.single(x[i], i) for i in range(x.shape[0])])

    def single(self, image: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError


@register_objective("train_losses")
class TrainLossesObjective(_Objective):
    """Sum of all training losses against ground truth (for UPSNet: RPN, box, mask, semantic,
    panoptic): the reference study's objective. Any sampling is seeded per image."""

    description = "sum of the model's training losses against the ground truth (the study's)"

    requires = LOSSES
    ground_truth = "losses"

    def single(self, image, i):
        (losses,) = self.adapter.losses([self._input(image, i)], [self.seeds[i]])
        return sum(losses.values())

    def batch(self, x):
        inputs = [self._input(x[i], i) for i in range(x.shape[0])]
        losses = self.adapter.losses(inputs, self.seeds)
        return torch.stack([sum(d.values()) for d in losses])


class DenseObjective(_Objective):
    """Objectives on per-pixel class logits; they also serve SegPGD/CosPGD through
    :meth:`logits_and_targets`. Subclasses give the per-pixel :meth:`targets`."""

    requires = DENSE_LOGITS
    dense = True
    #: records ``correct_pixels`` at every call (early stopping reads it); False for targeted
    #: objectives, whose targets are not the classes to break.
    supports_early_stop = True

    def __init__(self, model, batched_inputs: List[Dict], seed: int = 0, batched: bool = False):
        super().__init__(model, batched_inputs, seed, batched)
        self._correct: List = [None] * len(self.inputs)

    @property
    def ignore_value(self) -> int:
        return self.adapter.ignore_value

    @property
    def correct_pixels(self):
        """(N,) long: per image, the labelled pixels (target != ignore) whose argmax is their
        target at the last evaluation (a call or ``logits_and_targets``); None before any."""
        if any(c is None for c in self._correct):
            return None
        return torch.stack(self._correct)

    def _record(self, logits: torch.Tensor, i: int) -> None:
        target = self.targets(i)
        right = (logits.detach().argmax(dim=0) == target) & (target != self.ignore_value)
        self._correct[i] = right.sum()

    def targets(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def logits_and_targets(self, x: torch.Tensor):
        logits = self._logits(x)
        for i, l in enumerate(logits):
            self._record(l, i)
        height, width = x.shape[-2:]
        # a padded batch: pad logits with zeros and targets with the ignore label
        logits = torch.stack(
            [F.pad(l, (0, width - l.shape[-1], 0, height - l.shape[-2])) for l in logits]
        )
        targets = torch.stack(
            [
                F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=self.ignore_value)
                for t in (self.targets(i) for i in range(x.shape[0]))
            ]
        )
        return logits, targets

    def _logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        crops = [self.crop(x[i], i) for i in range(x.shape[0])]
        if self.batched:
            return self.adapter.dense_logits(crops)
        return [self.adapter.dense_logits([c])[0] for c in crops]

    def single(self, image, i):
        (logits,) = self.adapter.dense_logits([self.crop(image, i)])
        self._record(logits, i)
        return self.pixel_loss(logits, i)

    def batch(self, x):
        values = []
        for i, l in enumerate(self._logits(x)):
            self._record(l, i)
            values.append(self.pixel_loss(l, i))
        return torch.stack(values)

    def pixel_loss(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        """The image's value from its (C, h, w) logits (default: mean cross-entropy to the
        targets over non-ignored pixels)."""
        target = self.targets(i)
        valid = target != self.ignore_value
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[None], target[None], ignore_index=self.ignore_value)

    def _clean_logits(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Logits of the clean images, image by image (targets fixed once)."""
        device = self.adapter.device
        with torch.no_grad():
            return [
                self.adapter.dense_logits([x["image"].to(device).float()])[0]
                for x in batched_inputs
            ]


# kept for code written against the first version's private name
_DenseObjective = DenseObjective


@register_objective("semantic_ce")
class SemanticCEObjective(DenseObjective):
    """Cross-entropy of the dense logits against the ground-truth semantic map (mapped to the
    model's classes by its adapter)."""

    description = "per-pixel cross-entropy of the dense class logits against the ground truth"

    ground_truth = ("sem_seg",)

    def __init__(self, model, batched_inputs, seed=0, batched=False):
        super().__init__(model, batched_inputs, seed, batched)
        self._targets = [self.adapter.dense_targets(x) for x in self.inputs]

    def targets(self, i):
        return self._targets[i]


@register_objective("pseudo_label")
class PseudoLabelObjective(DenseObjective):
    """Label-free: cross-entropy against the model's own clean per-pixel prediction."""

    description = "cross-entropy against the model's own clean prediction (no ground truth)"

    def __init__(self, model, batched_inputs, seed=0, batched=False):
        super().__init__(model, batched_inputs, seed, batched)
        self._targets = [l.argmax(0) for l in self._clean_logits(batched_inputs)]

    def targets(self, i):
        return self._targets[i]


@register_objective("least_likely")
class LeastLikelyObjective(DenseObjective):
    """Iterative least-likely class (Kurakin et al.) for a multi-head model: the per-pixel
    least-likely class of the CLEAN dense logits is the target, fixed once; the value is the
    NEGATIVE cross-entropy to it, so maximising it pulls every pixel towards its least-likely
    class. For UPSNet, stuff, instance (Y + M) and unknown panoptic channels are all built from
    the semantic logits, so the panoptic output follows."""

    supports_early_stop = False
    targeted = True
    description = "targeted: towards each pixel's least likely class (ILLC)"

    def __init__(self, model, batched_inputs, seed=0, batched=False):
        super().__init__(model, batched_inputs, seed, batched)
        self._targets = [l.argmin(0) for l in self._clean_logits(batched_inputs)]

    def targets(self, i):
        return self._targets[i]

    def pixel_loss(self, logits, i):
        return -super().pixel_loss(logits, i)

    def logits_and_targets(self, x):
        raise TypeError("least_likely is a targeted objective; SegPGD/CosPGD are untargeted")


@register_objective("panoptic")
class PanopticObjective(_Objective):
    """Cross-entropy of the panoptic head's INFERENCE-path logits against ground truth: stuff
    pixels want their class; pixels of a GT instance want the predicted instance channel that
    matches it (same class, IoU > 0.5 with the current prediction), else the unknown channel.
    The matching is redone at every call, as the predicted instances change."""

    description = "UPSNet's panoptic-logit loss on matched ground-truth segments"

    requires = PANOPTIC_LOGITS
    ground_truth = ("instances", "sem_seg")

    def single(self, image, i):
        (raw,) = self.adapter.panoptic_predictions([self._input(image, i)])
        return self._cross_entropy(raw, i)

    def batch(self, x):
        raws = self.adapter.panoptic_predictions([self._input(x[i], i) for i in range(x.shape[0])])
        return torch.stack([self._cross_entropy(raw, i) for i, raw in enumerate(raws)])

    def _cross_entropy(self, raw, i):
        target = self._target(raw, self.inputs[i])
        return F.cross_entropy(raw["panoptic_logits"][None], target[None], ignore_index=255)

    def _target(self, raw, inputs):
        h, w = raw["image_size"]
        return panoptic_objective_targets(
            raw["panoptic_logits"].detach().argmax(0),
            raw["classes"],
            inputs["sem_seg"][:h, :w],
            inputs["instances"].gt_masks.tensor[:, :h, :w],
            inputs["instances"].gt_classes,
            raw["num_stuff"],
        )


def panoptic_objective_targets(
    pred: torch.Tensor,
    pred_classes: torch.Tensor,
    sem_seg: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_classes: torch.Tensor,
    num_stuff: int,
    ignore_value: int = 255,
) -> torch.Tensor:
    """Per-pixel target channel of the panoptic objective (matching rules of ``panoptic``).

    Args:
        pred: (h, w) current argmax of the panoptic logits: stuff channels ``[0, num_stuff)``,
            instance ``j`` at channel ``num_stuff + j``, unknown at ``num_stuff + K``.
        pred_classes: (K,) thing class of each predicted instance (detector class ids).
        sem_seg: (h, w) ground-truth semantic labels; ``< num_stuff`` is stuff.
        gt_masks: (G, h, w) bool ground-truth instance masks; gt_classes: (G,) their classes.

    Returns:
        (h, w) long: a stuff pixel targets its class; a pixel of GT instance ``g`` targets the
        predicted instance of the same class with the highest IoU > 0.5 with ``g`` (the
        standard PQ matching threshold, so at most one prediction can qualify), else the
        unknown channel; ignored pixels (``ignore_value`` in ``sem_seg``) keep ``ignore_value``.
        Later GT instances overwrite earlier ones where masks overlap.
    """
    num_instances = len(pred_classes)
    unknown = num_stuff + num_instances
    target = torch.where(sem_seg < num_stuff, sem_seg, torch.full_like(sem_seg, ignore_value))
    for g in range(len(gt_classes)):
        mask = gt_masks[g]
        target[mask] = unknown
        best, best_iou = None, 0.5
        for j in range(num_instances):
            if int(pred_classes[j]) != int(gt_classes[g]):
                continue
            region = pred == num_stuff + j
            inter = int((region & mask).sum())
            iou = inter / max(1, int((region | mask).sum()))
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            target[mask] = num_stuff + best
    target[sem_seg == ignore_value] = ignore_value
    return target


class AutocastObjective:
    """Runs an objective under ``torch.autocast`` (mixed precision on the attack's forward and
    backward); values and logits come back as float32, the input gradient has the input's
    dtype. bfloat16 keeps float32's range, so sign-gradient attacks need no loss scaling;
    float16 gradients can underflow to 0 (no step for those pixels) or overflow (reported as a
    non-finite gradient)."""

    def __init__(self, objective: Callable, device_type: str, dtype: torch.dtype):
        self.objective = objective
        self.device_type = device_type
        self.dtype = dtype
        if hasattr(objective, "logits_and_targets"):  # stay a DenseObjective for SegPGD/CosPGD
            self.logits_and_targets = self._logits_and_targets

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            value = self.objective(x)
        return value.float()

    def _logits_and_targets(self, x: torch.Tensor):
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits, targets = self.objective.logits_and_targets(x)
        return logits.float(), targets

    def __getattr__(self, name):  # required_objective, stats, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)


def objective_class(name: str) -> type:
    """The registered objective class ``name``; KeyError listing the registered names."""
    names = sorted(k for k, _ in OBJECTIVE_REGISTRY)
    if name not in names:
        raise KeyError(f"Unknown attack objective '{name}'. Registered objectives: {names}")
    return OBJECTIVE_REGISTRY.get(name)


def build_objective(
    name: str, model, batched_inputs: List[Dict], seed: int = 0, batched: bool = False
) -> Callable:
    """Build the registered objective ``name`` for one batch (``batched``: one model run per
    call for the whole batch instead of one per image; same per-image values).

    Args:
        model: a :class:`~upsnet_robust.adapters.ModelAdapter`, or a model with a registered
            adapter (wrapped without data set metadata).

    Raises:
        KeyError: unknown name, listing the registered ones.
        UnsupportedModelError: the model's adapter lacks what the objective needs.
        MissingGroundTruthError: the objective needs labels the inputs lack.
    """
    cls = objective_class(name)
    extra = {"batched": True} if batched else {}  # objectives registered elsewhere may lack it
    return cls(model, batched_inputs, seed=seed, **extra)
