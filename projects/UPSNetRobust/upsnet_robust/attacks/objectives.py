# Copyright (c) UPSNetRobust authors.
"""Attack objectives: what an attack maximises, separate from how (the algorithms).

An objective is built for one batch of dataset-mapper inputs and called as ``objective(x)`` on
float images ``x`` (N, 3, H, W) in 0-255 pixel units; it returns per-image values (N,) to
MAXIMISE. Every objective evaluates each image on its own with its own seed, so results do not
depend on batching or on the process that computes them.

Objectives that need ground truth (``instances`` / ``sem_seg`` from the panoptic mapper) raise
:class:`MissingGroundTruthError` on data without it; the label-free ``pseudo_label`` objective
uses the model's own clean prediction instead.
"""
import contextlib
import hashlib
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.events import EventStorage
from detectron2.utils.registry import Registry

__all__ = [
    "OBJECTIVE_REGISTRY",
    "MissingGroundTruthError",
    "build_objective",
    "image_seed",
    "frozen_norm_training_mode",
    "TrainLossesObjective",
    "SemanticCEObjective",
    "PanopticObjective",
    "LeastLikelyObjective",
    "PseudoLabelObjective",
]

OBJECTIVE_REGISTRY = Registry("ATTACK_OBJECTIVE")
OBJECTIVE_REGISTRY.__doc__ = """
Attack objectives. A registered class is built as ``cls(model, batched_inputs, seed=...)`` and
called on float images (N, 3, H, W), returning per-image values (N,) to maximise.
"""

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class MissingGroundTruthError(ValueError):
    """An objective needs ground truth the data does not have."""


def image_seed(seed: int, image_id) -> int:
    """A per-image seed from the sweep seed and the image id, independent of batch and rank."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def frozen_norm_training_mode(model: nn.Module):
    """Training-mode forward (losses) without touching normalisation statistics: the model is
    put in train mode but every norm layer stays in eval mode; the previous modes come back."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            m.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


class _Objective:
    """Base: holds the model, the inputs (without their images) and per-image seeds."""

    needs_ground_truth = False

    def __init__(self, model: nn.Module, batched_inputs: List[Dict], seed: int = 0):
        self.model = _unwrap(model)
        self.inputs = [{k: v for k, v in x.items() if k != "image"} for x in batched_inputs]
        self.seeds = [image_seed(seed, x.get("image_id", x.get("file_name", i))) for i, x in enumerate(batched_inputs)]
        if self.needs_ground_truth:
            for x in batched_inputs:
                missing = [k for k in ("instances", "sem_seg") if k not in x]
                if missing:
                    raise MissingGroundTruthError(
                        f"objective '{self.name}' needs ground truth {missing} for "
                        f"{x.get('file_name', 'an input')}; use ROBUSTNESS.OBJECTIVE pseudo_label "
                        "(label-free: the model's own clean prediction) on data without labels"
                    )

    @property
    def name(self) -> str:
        return type(self).registered_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = []
        for i in range(x.shape[0]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seeds[i])
                values.append(self.single(x[i], i))
        return torch.stack(values)

    def _input(self, image: torch.Tensor, i: int) -> Dict:
        return dict(self.inputs[i], image=image)

    def single(self, image: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError


def _register(name: str):
    """Register under the lowercase config name (fvcore's public register() uses __name__)."""

    def deco(cls):
        cls.registered_name = name
        OBJECTIVE_REGISTRY._do_register(name, cls)
        return cls

    return deco


def _semantic_logits(model, image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) semantic logits at input resolution, through the backbone and semantic head."""
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    logits = model.sem_seg_head.upsample(model.sem_seg_head.layers(features))
    h, w = images.image_sizes[0]
    return logits[0, :, :h, :w]


@_register("train_losses")
class TrainLossesObjective(_Objective):
    """Sum of all training losses against ground truth (RPN, box, mask, semantic, panoptic):
    the reference study's objective. Proposal and instance sampling are seeded per image."""

    needs_ground_truth = True

    def single(self, image, i):
        with frozen_norm_training_mode(self.model), EventStorage():
            losses = self.model([self._input(image, i)])
        return sum(losses.values())


class _DenseObjective(_Objective):
    """Objectives on per-pixel semantic logits; they also serve SegPGD/CosPGD through
    :meth:`logits_and_targets`."""

    ignore_value = 255

    def targets(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def logits_and_targets(self, x: torch.Tensor):
        with _eval_mode(self.model):
            logits = torch.stack([_semantic_logits(self.model, x[i]) for i in range(x.shape[0])])
        return logits, torch.stack([self.targets(i) for i in range(x.shape[0])])

    def single(self, image, i):
        with _eval_mode(self.model):
            logits = _semantic_logits(self.model, image)
        target = self.targets(i)
        valid = target != self.ignore_value
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[None], target[None], ignore_index=self.ignore_value)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@_register("semantic_ce")
class SemanticCEObjective(_DenseObjective):
    """Cross-entropy of the semantic head against the ground-truth semantic map."""

    needs_ground_truth = True

    def targets(self, i):
        return self.inputs[i]["sem_seg"].to(self.model.device)


@_register("pseudo_label")
class PseudoLabelObjective(_DenseObjective):
    """Label-free: cross-entropy against the model's own clean semantic prediction."""

    def __init__(self, model, batched_inputs, seed=0):
        super().__init__(model, batched_inputs, seed)
        with torch.no_grad(), _eval_mode(self.model):
            self._targets = [
                _semantic_logits(self.model, x["image"].to(self.model.device).float()).argmax(0)
                for x in batched_inputs
            ]

    def targets(self, i):
        return self._targets[i]


@_register("least_likely")
class LeastLikelyObjective(_DenseObjective):
    """Iterative least-likely class (Kurakin et al.) for a multi-head model: the per-pixel
    least-likely class of the CLEAN semantic logits is the target, fixed once; the value is the
    NEGATIVE cross-entropy to it, so maximising it pulls every pixel towards its least-likely
    class. Stuff, instance (Y + M) and unknown panoptic channels are all built from the semantic
    logits, so the panoptic output follows."""

    def __init__(self, model, batched_inputs, seed=0):
        super().__init__(model, batched_inputs, seed)
        with torch.no_grad(), _eval_mode(self.model):
            self._targets = [
                _semantic_logits(self.model, x["image"].to(self.model.device).float()).argmin(0)
                for x in batched_inputs
            ]

    def targets(self, i):
        return self._targets[i]

    def single(self, image, i):
        return -super().single(image, i)

    def logits_and_targets(self, x):
        raise TypeError("least_likely is a targeted objective; SegPGD/CosPGD are untargeted")


@_register("panoptic")
class PanopticObjective(_Objective):
    """Cross-entropy of the panoptic head's INFERENCE-path logits against ground truth: stuff
    pixels want their class; pixels of a GT instance want the predicted instance channel that
    matches it (same class, IoU > 0.5 with the current prediction), else the unknown channel.
    The matching is redone at every call, as the predicted instances change."""

    needs_ground_truth = True

    def single(self, image, i):
        with _eval_mode(self.model):
            raw = self.model.predict([self._input(image, i)], with_detector_masks=False)[0]
        logits = raw["panoptic_logits"]
        target = self._target(raw, self.inputs[i])
        return F.cross_entropy(logits[None], target[None], ignore_index=255)

    def _target(self, raw, inputs):
        num_stuff = self.model.num_stuff
        h, w = raw["image_size"]
        sem = inputs["sem_seg"].to(self.model.device)[:h, :w]
        num_instances = len(raw["classes"])
        unknown = num_stuff + num_instances
        target = torch.where(sem < num_stuff, sem, torch.full_like(sem, 255))
        pred = raw["panoptic_logits"].detach().argmax(0)
        gt = inputs["instances"].to(self.model.device)
        gt_masks = gt.gt_masks.tensor[:, :h, :w]
        for g in range(len(gt)):
            mask = gt_masks[g]
            target[mask] = unknown
            best, best_iou = None, 0.5
            for j in range(num_instances):
                if int(raw["classes"][j]) != int(gt.gt_classes[g]):
                    continue
                region = pred == num_stuff + j
                inter = int((region & mask).sum())
                iou = inter / max(1, int((region | mask).sum()))
                if iou > best_iou:
                    best, best_iou = j, iou
            if best is not None:
                target[mask] = num_stuff + best
        target[sem == 255] = 255
        return target


def build_objective(name: str, model: nn.Module, batched_inputs: List[Dict], seed: int = 0) -> Callable:
    """Build the registered objective ``name`` for one batch.

    Raises:
        KeyError: unknown name, listing the registered ones.
        MissingGroundTruthError: the objective needs labels the inputs lack.
    """
    names = sorted(k for k, _ in OBJECTIVE_REGISTRY)
    if name not in names:
        raise KeyError(f"Unknown attack objective '{name}'. Registered objectives: {names}")
    return OBJECTIVE_REGISTRY.get(name)(model, batched_inputs, seed=seed)
