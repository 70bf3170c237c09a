# Copyright (c) UPSNetRobust authors.
"""The model boundary: what attacks, objectives and evaluation may ask of a model.

Attack algorithms know nothing of models; objectives and the evaluation layer talk to a model only
through a :class:`ModelAdapter`, looked up by meta-architecture in ``ADAPTER_REGISTRY``. An adapter
exposes up to three *capabilities*, and an objective or attack that needs one the model lacks is
rejected at set-up (:func:`check_attack_objective`), before any data is loaded:

* ``losses``: each image's training losses against ground truth, under its own seed, with norm
  layers frozen (``train_losses``);
* ``dense_logits``: per-pixel class logits at input resolution (``semantic_ce``,
  ``pseudo_label``, ``least_likely``, SegPGD, CosPGD, ILLC);
* ``panoptic_logits``: the panoptic head's inference-path logits (UPSNet's ``panoptic``).

Besides, an adapter runs inference restricted to what the task's evaluators read, maps the
model's label convention to the data set's contiguous ids, and names the dataset mapper that
gives the model its inputs (and ground truth) at test time.
"""
import contextlib
import difflib
import logging
from typing import Dict, FrozenSet, List, Optional, Sequence

import torch
from torch import nn

from detectron2.utils.events import EventStorage
from detectron2.utils.registry import Registry

from ..tasks import HEADLINE_METRICS
from ..utils.registry import subclass_decorator

__all__ = [
    "ADAPTER_REGISTRY",
    "AdapterInference",
    "LOSSES",
    "DENSE_LOGITS",
    "PANOPTIC_LOGITS",
    "TASKS",
    "ModelAdapter",
    "UnsupportedModelError",
    "register_adapter",
    "build_adapter",
    "adapter_class",
    "as_adapter",
    "frozen_norm_training_mode",
    "strided_head_logits",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

ADAPTER_REGISTRY = Registry("MODEL_ADAPTER")
ADAPTER_REGISTRY.__doc__ = """
Model adapters, keyed by the meta-architecture's class name (``MODEL.META_ARCHITECTURE``).
Register with :func:`register_adapter`; look up with :func:`build_adapter`.
"""

LOSSES = "losses"
DENSE_LOGITS = "dense_logits"
PANOPTIC_LOGITS = "panoptic_logits"

# The tasks an adapter can be scored on, with their headline metric (upsnet_robust.tasks).
TASKS = HEADLINE_METRICS

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class UnsupportedModelError(ValueError):
    """A model without an adapter, or a capability its adapter does not have."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel wrapper."""
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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the block, then the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdapterInference(nn.Module):
    """A model seen through its adapter: ``forward`` is :meth:`ModelAdapter.inference`, so
    detectron2's evaluators receive predictions in the data set's ids (used by the Trainer's
    evaluation and anywhere a plain ``model(inputs)`` call is expected)."""

    def __init__(self, adapter: "ModelAdapter"):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model  # a submodule: .eval()/.train() reach the model
        # the model's mode, which inference_on_dataset restores afterwards (not Module's default)
        self.train(self.model.training)

    def forward(self, batched_inputs):
        return self.adapter.inference(batched_inputs)


class ModelAdapter:
    """What the robustness engine needs of one meta-architecture.

    Subclasses set :attr:`task` and :attr:`capabilities` and implement the methods of their
    capabilities. Methods take detectron2 input dicts (``image``: (3, H, W) float 0-255 in
    ``INPUT.FORMAT``, possibly requiring grad) or image lists and must not detach anything
    between the image and the values they return.

    Args:
        model: the detectron2 model (a DDP wrapper is unwrapped).
        metadata: the test data set's metadata (label conventions), or None.
    """

    #: "panoptic_seg", "sem_seg" or "instances": which evaluators score the model.
    task: str = "panoptic_seg"
    #: subset of {LOSSES, DENSE_LOGITS, PANOPTIC_LOGITS}.
    capabilities: FrozenSet[str] = frozenset({LOSSES})
    #: input keys the training losses need (checked before an attack starts).
    loss_ground_truth: Sequence[str] = ("instances",)
    #: the ignore label of dense targets.
    ignore_value: int = 255
    #: whether the model's ``sem_seg`` output has the data set's classes (False for models
    #: with another semantic label convention, e.g. PanopticFPN's merged "things" class).
    sem_seg_in_dataset_classes: bool = True

    def __init__(self, model: nn.Module, metadata=None):
        self.model = unwrap_model(model)
        self.metadata = metadata

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> "ModelAdapter":
        """Build from a config (its first test data set's metadata)."""
        from detectron2.data import MetadataCatalog

        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        return cls(model, MetadataCatalog.get(names[0]) if names else None)

    # ------------------------------------------------------------------ description
    @property
    def meta_architecture(self) -> str:
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        return device if device is not None else next(self.model.parameters()).device

    @property
    def headline_metric(self) -> str:
        return TASKS[self.task]

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, what: str, instead: str = "") -> None:
        """Raise :class:`UnsupportedModelError` unless the adapter has ``capability``."""
        if not self.has(capability):
            hint = f" Use {instead} instead." if instead else ""
            raise UnsupportedModelError(
                f"{what} needs the model's {capability.replace('_', ' ')}, which the "
                f"{self.meta_architecture} adapter ({type(self).__name__}) does not expose "
                f"(it has: {', '.join(sorted(self.capabilities)) or 'none'}).{hint}"
            )

    # ------------------------------------------------------------------ capabilities
    def losses(self, inputs: List[Dict], seeds: Optional[List[int]] = None) -> List[Dict]:
        """Per image, the training-loss dict of the model on that image alone, under
        ``torch.manual_seed(seeds[i])`` (the caller's RNG state is restored), norm layers
        frozen, inside an ``EventStorage``. Batched adapters may run shared parts once."""
        self.require(LOSSES, "train_losses")
        results = []
        with frozen_norm_training_mode(self.model), EventStorage():
            for i, x in enumerate(inputs):
                with torch.random.fork_rng(devices=self._rng_devices()):
                    if seeds is not None:
                        torch.manual_seed(int(seeds[i]))
                    results.append(self.model([self.loss_input(x)]))
        return results

    def loss_input(self, x: Dict) -> Dict:
        """The input dict the model's training forward expects (label conventions applied)."""
        return x

    def dense_logits(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per image (C, h, w) class logits at the image's resolution, in eval mode, one model
        run for the list. Classes are the model's own (see :meth:`dense_targets`)."""
        self.require(DENSE_LOGITS, "A dense objective")
        raise NotImplementedError

    def dense_targets(self, x: Dict) -> torch.Tensor:
        """The ground-truth (h, w) labels of input ``x`` in the classes of :meth:`dense_logits`
        (default: ``x["sem_seg"]`` unchanged), ``ignore_value`` where ignored."""
        return x["sem_seg"]

    def panoptic_predictions(self, inputs: List[Dict]) -> List[Dict]:
        """Per image a dict with ``panoptic_logits`` ((num_stuff + K + 1, h, w): stuff
        channels, one per kept instance, unknown last), ``classes`` (K,), ``num_stuff`` and
        ``image_size``, differentiable w.r.t. the images."""
        self.require(PANOPTIC_LOGITS, "The panoptic objective")
        raise NotImplementedError

    # ------------------------------------------------------------------ inference and data
    def inference(self, inputs: List[Dict], keys: Optional[FrozenSet[str]] = None) -> List[Dict]:
        """Eval-mode outputs in detectron2's standard format and the data set's contiguous ids
        (``panoptic_seg``, ``sem_seg``, ``instances``). ``keys``: the outputs the caller reads
        (None: all); an adapter may skip work for the others."""
        return self.model(inputs)

    @classmethod
    def test_mapper(cls, cfg):
        """The dataset mapper giving this model its test inputs, with the ground truth its
        losses and dense targets need (None: detectron2's default ``DatasetMapper``)."""
        return None

    @classmethod
    def train_mapper(cls, cfg):
        """The dataset mapper that trains this model on ``cfg.DATASETS.TRAIN`` (None:
        detectron2's default ``DatasetMapper``). Used by the project's ``Trainer``."""
        return None

    def _rng_devices(self):
        device = self.device
        return [device] if device.type == "cuda" else []


def strided_head_logits(head: nn.Module, features, image_sizes) -> List[torch.Tensor]:
    """Per image (C, h, w) logits of a semantic head with ``layers`` and ``common_stride``
    (detectron2's SemSegFPNHead, PanopticDeepLabSemSegHead): its eval-mode forward, upsampled
    by the common stride, cropped from the padded batch to each image's size."""
    import torch.nn.functional as F

    logits = F.interpolate(
        head.layers(features), scale_factor=head.common_stride, mode="bilinear", align_corners=False
    )
    return [logits[i, :, :h, :w] for i, (h, w) in enumerate(image_sizes)]


def register_adapter(*meta_architectures: str):
    """Class decorator: register a :class:`ModelAdapter` for the named meta-architectures (the
    class names in ``MODEL.META_ARCHITECTURE``). The one public way to add an adapter."""
    if not meta_architectures:
        raise ValueError("register_adapter needs at least one meta-architecture name")
    return subclass_decorator(ADAPTER_REGISTRY, ModelAdapter, *meta_architectures)


def adapter_class(model_or_name) -> type:
    """The adapter class of a model (its class, then its base classes) or meta-arch name."""
    if isinstance(model_or_name, str):
        candidates = [model_or_name]
    else:
        candidates = [k.__name__ for k in type(unwrap_model(model_or_name)).__mro__]
    for name in candidates:
        if name in ADAPTER_REGISTRY:
            return ADAPTER_REGISTRY.get(name)
    registered = sorted(k for k, _ in ADAPTER_REGISTRY)
    close = difflib.get_close_matches(candidates[0], registered, n=2)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UnsupportedModelError(
        f"No model adapter for meta-architecture {candidates[0]!r}. Adapters exist for: "
        f"{', '.join(registered)}.{hint} Add one with @register_adapter (docs/MODELS.md)."
    )


def build_adapter(cfg, model: nn.Module) -> ModelAdapter:
    """The adapter of ``model`` built from ``cfg`` (label conventions of its data sets)."""
    return adapter_class(model).from_config(cfg, model)


def as_adapter(model_or_adapter) -> ModelAdapter:
    """An adapter as is; a model wrapped in its adapter without metadata (enough for adapters
    whose model carries its own label convention, like UPSNet)."""
    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    return adapter_class(model_or_adapter)(model_or_adapter)
