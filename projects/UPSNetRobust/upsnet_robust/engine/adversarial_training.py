# Copyright (c) UPSNetRobust authors.
"""Adversarial training: each training batch is (partly) replaced by adversarial images crafted
against the model's own training losses before the optimiser step.

Three ways to craft, all in 0-255 pixel units of ``INPUT.FORMAT`` (``ADV_TRAIN.ATTACK``):

* ``fgsm_rs`` (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): a uniform start
  ``delta_0 ~ U[-eps, eps]``, one signed-gradient step of 1.25 eps, projected back onto the
  eps-ball;
* ``n_fgsm`` (de Jorge et al., NeurIPS 2022): noise ``U[-k eps, k eps]`` (k = ``NOISE``, 2),
  one step of eps, and *no* projection onto the eps-ball (the point may lie up to (k + 1) eps
  away): single-step cost without catastrophic overfitting at larger eps;
* ``pgd`` (Madry et al., ICLR 2018): a uniform start and ``NUM_STEPS`` projected steps.

The attack maximises the model's summed training losses (``ADV_TRAIN.OBJECTIVE
"train_losses"``, one batched training forward per step) or a registered dense objective
(``semantic_ce``, ``masked_ce``, ...) on the model's dense logits in eval mode; the training
mapper's ``sem_seg`` already holds the classes of the model's dense logits, so it is used as is.

Crafting runs the unwrapped model (no DDP gradient synchronisation; the replicas are identical)
in training mode with every normalisation layer frozen (batch statistics neither used nor
updated), inside its own ``EventStorage`` (the crafting forwards log nothing), and under a seed
derived from ``ADV_TRAIN.SEED``, the iteration and the process rank: runs are reproducible and
each process draws its own noise. The model's modes are restored afterwards. Every image is
clipped to [0, 255].
"""
import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, get_event_storage

from ..adapters.base import (
    LOSSES,
    adapter_class,
    eval_mode,
    frozen_norm_training_mode,
    unwrap_model,
)
from ..attacks.base import PIXEL_MAX, PIXEL_MIN, objective_gradient
from ..attacks.objectives import build_objective, objective_class

__all__ = [
    "ADV_TRAIN_ATTACKS",
    "AdversarialBatches",
    "AdversarialExamples",
    "CraftRule",
    "craft",
    "craft_rule",
    "step_seed",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class CraftRule:
    """How one ``ADV_TRAIN.ATTACK`` crafts (read instead of its name).

    Attributes:
        step: the default step in multiples of eps (divided by the steps when ``multi_step``).
        noise_start: the start is uniform in ``NOISE`` x eps instead of the eps-ball.
        multi_step: runs ``NUM_STEPS`` steps (else one).
        projected: each step is projected back onto the eps-ball.
    """

    step: float
    noise_start: bool = False
    multi_step: bool = False
    projected: bool = True


#: ADV_TRAIN.ATTACK -> how it crafts.
ADV_TRAIN_ATTACKS = {
    "fgsm_rs": CraftRule(step=1.25),
    "n_fgsm": CraftRule(step=1.0, noise_start=True, projected=False),
    "pgd": CraftRule(step=2.5, multi_step=True),
}
#: The multi-step attack of the guard's checks.
CHECK_ATTACK = "pgd"


def craft_rule(attack: str) -> CraftRule:
    """The rule of ``ADV_TRAIN.ATTACK`` ``attack``, or a ValueError naming the valid ones."""
    if attack not in ADV_TRAIN_ATTACKS:
        raise ValueError(
            f"ADV_TRAIN.ATTACK {attack!r} is not one of {', '.join(ADV_TRAIN_ATTACKS)}"
        )
    return ADV_TRAIN_ATTACKS[attack]


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The crafting seed of one training step on one process."""
    digest = hashlib.sha256(f"adv-train:{seed}:{iteration}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def craft(
    x: torch.Tensor,
    loss_fn,
    eps: float,
    attack: str = "fgsm_rs",
    step_size: Optional[float] = None,
    num_steps: int = 1,
    noise: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Adversarial images for ``x`` (N, 3, H, W), 0-255, maximising ``loss_fn`` (see the module
    docstring for the three attacks). ``step_size`` None: the attack's default.

    Returns:
        Tensor: detached images of ``x``'s shape and dtype, in [0, 255].
    """
    rule = craft_rule(attack)
    x = x.detach()
    if eps <= 0:
        return x.clone()
    steps = int(num_steps) if rule.multi_step else 1
    if steps < 1:
        raise ValueError(f"ADV_TRAIN.NUM_STEPS must be >= 1 for {attack}, got {num_steps}")
    alpha = step_size if step_size and step_size > 0 else rule.step * eps / steps
    radius = noise * eps if rule.noise_start else eps
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    delta = (2 * u - 1) * radius
    for _ in range(steps):
        x_adv = (x + delta).clamp(PIXEL_MIN, PIXEL_MAX)
        _, grad = objective_gradient(loss_fn, x_adv)
        delta = x_adv - x + alpha * grad.sign()
        if rule.projected:  # N-FGSM deliberately leaves the eps-ball
            delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(PIXEL_MIN, PIXEL_MAX).detach()


def _training_labels(x: Dict) -> torch.Tensor:
    """Dense targets of a training-mapper input: its ``sem_seg``, already in the model's classes."""
    return x["sem_seg"]


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float (N, 3, H, W) of equally sized images, zero-padded to the largest otherwise."""
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros((len(images), 3, h, w), dtype=torch.float32)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im.float()
    return out


class AdversarialExamples:
    """Replaces the first ``ratio`` share of a training batch by adversarial images crafted
    against the model's summed training losses (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        attack: str = "fgsm_rs",
        eps: float = 8.0,
        warmup_iters: int = 0,
        step_size: float = 0.0,
        num_steps: int = 1,
        noise: float = 2.0,
        ratio: float = 1.0,
        seed: int = 0,
        objective: str = "train_losses",
        metadata=None,
    ):
        rule = craft_rule(attack)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ADV_TRAIN.RATIO must be in [0, 1], got {ratio}")
        if eps < 0 or warmup_iters < 0 or noise < 0:
            raise ValueError(
                f"ADV_TRAIN.EPS ({eps}), EPS_WARMUP_ITERS ({warmup_iters}) and NOISE ({noise}) "
                "must be >= 0"
            )
        if rule.multi_step and num_steps < 1:
            raise ValueError(f"ADV_TRAIN.NUM_STEPS must be >= 1 for {attack}, got {num_steps}")
        self.attack = attack
        self.eps = float(eps)
        self.warmup_iters = int(warmup_iters)
        self.step_size = float(step_size)
        self.num_steps = int(num_steps)
        self.noise = float(noise)
        self.ratio = float(ratio)
        self.seed = int(seed)
        cls = objective_class(objective)  # an unknown name fails now, listing the registered ones
        # the model's own training losses run as one batched training forward
        self.training_losses = getattr(cls, "requires", "") == LOSSES
        if not (self.training_losses or getattr(cls, "dense", False)):
            raise ValueError(
                f"ADV_TRAIN.OBJECTIVE {objective!r}: adversarial training maximises the training "
                "losses ('train_losses') or a dense objective (semantic_ce, masked_ce, ...)"
            )
        self.objective = objective
        self.metadata = metadata

    @classmethod
    def from_config(cls, cfg):
        a = cfg.ADV_TRAIN
        return {
            "attack": a.ATTACK,
            "eps": a.EPS,
            "warmup_iters": a.EPS_WARMUP_ITERS,
            "step_size": a.STEP_SIZE,
            "num_steps": a.NUM_STEPS,
            "noise": a.NOISE,
            "ratio": a.RATIO,
            "seed": a.SEED,
            "objective": a.OBJECTIVE,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
        }

    def eps_at(self, iteration: int) -> float:
        """eps at ``iteration``: a linear ramp from eps / warm-up to eps over the warm-up."""
        if self.warmup_iters <= 0:
            return self.eps
        return self.eps * min(1.0, (iteration + 1) / self.warmup_iters)

    def num_adversarial(self, batch_size: int) -> int:
        return int(round(self.ratio * batch_size))

    def loss_fn(self, model, batch: List[Dict], seed: int = 0):
        """``x -> value`` to maximise for ``batch`` with its images replaced by ``x`` (each
        cropped back to its own size): the summed training losses, or the dense objective."""
        if not self.training_losses:
            adapter = copy.copy(adapter_class(model)(model, self.metadata))
            adapter.dense_targets = _training_labels
            return build_objective(self.objective, adapter, batch, seed=seed, batched=True)
        sizes = [tuple(d["image"].shape[-2:]) for d in batch]

        def loss(x):
            crops = [x[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
            return sum(model([dict(d, image=c) for d, c in zip(batch, crops)]).values())

        return loss

    def crafting_mode(self, model):
        """Training mode with frozen norms for the training losses, eval mode for the dense
        objectives (which read the inference logits)."""
        return frozen_norm_training_mode(model) if self.training_losses else eval_mode(model)

    def __call__(self, model, batch: List[Dict], iteration: int, rank: int = 0) -> List[Dict]:
        """``batch`` with its first :meth:`num_adversarial` images adversarial (float 0-255
        tensors of the same size); the rest and every other key unchanged."""
        n = self.num_adversarial(len(batch))
        eps = self.eps_at(iteration)
        if n == 0 or eps <= 0:
            return batch
        model = unwrap_model(model)
        targets = batch[:n]
        x = _stack([d["image"] for d in targets]).to(next(model.parameters()).device)
        seed = step_seed(self.seed, iteration, rank)
        generator = torch.Generator().manual_seed(seed)
        devices = [x.device] if x.device.type == "cuda" else []
        with self.crafting_mode(model), EventStorage(), torch.random.fork_rng(devices):
            torch.manual_seed(seed)  # proposal sampling inside the losses
            x_adv = craft(
                x,
                self.loss_fn(model, targets, seed),
                eps,
                self.attack,
                self.step_size,
                self.num_steps,
                self.noise,
                generator,
            )
        out = []
        for i, d in enumerate(batch):
            if i < n:
                h, w = d["image"].shape[-2:]
                d = dict(d, image=x_adv[i, :, :h, :w].to(d["image"].device))
            out.append(d)
        return out


class AdversarialBatches:
    """A training data loader whose batches go through :class:`AdversarialExamples` (detectron2's
    advice: wrap the loader to change the data). ``trainer`` gives the model and the iteration;
    the crafting time is logged as ``adv_time`` (it is part of ``data_time``)."""

    def __init__(self, loader, examples: AdversarialExamples, trainer):
        self.loader = loader
        self.examples = examples
        self.trainer = trainer

    def __iter__(self):
        for batch in self.loader:
            start = time.perf_counter()
            out = self.examples(self.trainer.model, batch, self.trainer.iter, comm.get_rank())
            try:
                storage = get_event_storage()
            except AssertionError:  # no training storage (used outside a trainer)
                storage = None
            if storage is not None:
                storage.put_scalar("adv_time", time.perf_counter() - start)
                storage.put_scalar("adv_eps", self.examples.eps_at(self.trainer.iter))
            yield out
