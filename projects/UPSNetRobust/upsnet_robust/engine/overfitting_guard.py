# Copyright (c) UPSNetRobust authors.
"""A guard against catastrophic overfitting in single-step adversarial training.

Single-step training can suddenly stop being robust: within a few hundred iterations the
model learns to mask the gradient that FGSM follows, so the training attack finds less and less
while a multi-step attack (PGD) breaks the model (Wong et al., ICLR 2020, who stop early on PGD
accuracy of a training batch). Every ``ADV_TRAIN.GUARD.PERIOD`` iterations the guard measures,
on a fixed batch of training images, the training losses at the training attack's point and at
a PGD point (``GUARD.NUM_STEPS`` steps of 2.5 eps / steps, random start) and, for models with
dense logits, the pixel accuracy of the PGD images. A measurement is a *collapse* when

* robust pixel accuracy fell more than ``GUARD.ACC_DROP`` (fraction, 0.2 = 20 points) below the
  best measured so far, or
* the PGD loss rose above ``GUARD.LOSS_RISE`` times its value at the best measurement while the
  training attack's loss fell below its value there (the training attack has stopped finding
  what PGD still finds: the signature of gradient masking).

On a collapse the model and optimiser go back to the best measurement's state (kept in memory
and saved as ``model_adv_best.pth``), and the event is logged, written to ``metrics.json``
(``adv_guard/rollbacks``) and to ``adv_guard.json``. The decision is taken on the main process
and shared, so replicas stay identical.
"""
import copy
import logging
import os
from typing import Dict, List, Optional

import torch

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..adapters.base import DENSE_LOGITS, eval_mode, unwrap_model
from ..utils.io import atomic_json
from .adversarial_training import CHECK_ATTACK, AdversarialExamples, _stack, craft, step_seed

__all__ = ["GuardDecision", "OverfittingGuard", "guard_decision"]

logger = logging.getLogger(__name__)

GuardDecision = str  # "best", "ok" or "collapse"


def guard_decision(
    measurement: Dict, best: Optional[Dict], acc_drop: float, loss_rise: float
) -> GuardDecision:
    """Classify a measurement against the best one so far (see the module docstring)."""
    if best is None:
        return "best"
    acc, best_acc = measurement.get("robust_acc"), best.get("robust_acc")
    if acc is not None and best_acc is not None:
        if acc < best_acc - acc_drop:
            return "collapse"
    if (
        measurement["pgd_loss"] > loss_rise * best["pgd_loss"]
        and measurement["train_attack_loss"] < best["train_attack_loss"]
    ):
        return "collapse"
    if acc is not None and best_acc is not None:
        return "best" if acc > best_acc else "ok"
    return "best" if measurement["pgd_loss"] < best["pgd_loss"] else "ok"


class OverfittingGuard(HookBase):
    """The guard as a detectron2 hook (registered on every process).

    Args:
        batch: the fixed training inputs the guard measures on (same on every process).
        examples: the training attack (its eps, attack and seed).
        adapter: the model's adapter (for dense logits; None: losses only).
        period, num_steps, acc_drop, loss_rise: ``ADV_TRAIN.GUARD.*``.
        output_dir: where ``adv_guard.json`` is written (main process).
    """

    def __init__(
        self,
        batch: List[Dict],
        examples: AdversarialExamples,
        adapter=None,
        *,
        period: int,
        num_steps: int = 10,
        acc_drop: float = 0.2,
        loss_rise: float = 1.5,
        output_dir: str = "",
    ):
        if period <= 0 or num_steps < 1:
            raise ValueError(
                f"ADV_TRAIN.GUARD.PERIOD ({period}) and NUM_STEPS ({num_steps}) must be >= 1"
            )
        self.batch = batch
        self.examples = examples
        self.adapter = adapter if adapter is not None and adapter.has(DENSE_LOGITS) else None
        self.period = int(period)
        self.num_steps = int(num_steps)
        self.acc_drop = float(acc_drop)
        self.loss_rise = float(loss_rise)
        self.output_dir = output_dir
        self.best: Optional[Dict] = None
        self._best_state = None
        self.events: List[Dict] = []
        self.rollbacks = 0

    # ------------------------------------------------------------------ measuring
    def measure(self, model, iteration: int) -> Dict:
        """Losses at the training attack's and at the PGD point, and robust pixel accuracy."""
        model = unwrap_model(model)
        eps = self.examples.eps
        device = next(model.parameters()).device
        x = _stack([d["image"] for d in self.batch]).to(device)
        seed = step_seed(self.examples.seed, -1, 0)  # the same points at every check
        loss_fn = self.examples.loss_fn(model, self.batch, seed)
        out = {"iteration": int(iteration)}
        with self.examples.crafting_mode(model), EventStorage(), torch.random.fork_rng([]):
            ex = self.examples
            for name, attack, step, steps, robust_acc in (
                ("train_attack", ex.attack, ex.step_size, ex.num_steps, False),
                ("pgd", CHECK_ATTACK, None, self.num_steps, True),
            ):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                x_adv = craft(x, loss_fn, eps, attack, step, steps, ex.noise, gen)
                torch.manual_seed(seed)
                with torch.no_grad():
                    out[f"{name}_loss"] = float(loss_fn(x_adv).sum())
                if robust_acc:  # of the PGD check's images
                    out["robust_acc"] = self._pixel_accuracy(x_adv)
        return out

    def _pixel_accuracy(self, x_adv: torch.Tensor) -> Optional[float]:
        if self.adapter is None or any("sem_seg" not in d for d in self.batch):
            return None
        correct = labelled = 0
        with eval_mode(self.adapter.model), torch.no_grad():
            images = [x_adv[i, :, : d["image"].shape[-2], : d["image"].shape[-1]]
                      for i, d in enumerate(self.batch)]
            logits = self.adapter.dense_logits(images)
        for lg, d in zip(logits, self.batch):
            target = d["sem_seg"].to(lg.device)
            valid = target != self.adapter.ignore_value
            correct += int(((lg.argmax(0) == target) & valid).sum())
            labelled += int(valid.sum())
        return correct / labelled if labelled else None

    # ------------------------------------------------------------------ the hook
    def after_step(self):
        if (self.trainer.iter + 1) % self.period == 0:
            self.check(self.trainer.model, self.trainer.optimizer, self.trainer.iter)

    def check(self, model, optimizer, iteration: int) -> GuardDecision:
        """Measure, decide on the main process, and keep or restore the best state."""
        measurement = self.measure(model, iteration)
        decision = guard_decision(measurement, self.best, self.acc_drop, self.loss_rise)
        decision = comm.all_gather(decision)[0]  # the main process decides for all
        measurement["decision"] = decision
        if decision == "best":
            self.best = measurement
            self._best_state = (
                copy.deepcopy(unwrap_model(model).state_dict()),
                copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            )
            checkpointer = getattr(getattr(self, "trainer", None), "checkpointer", None)
            if checkpointer is not None:
                checkpointer.save("model_adv_best", iteration=iteration)
        elif decision == "collapse":
            self.rollbacks += 1
            measurement["rolled_back_to"] = self.best["iteration"]
            unwrap_model(model).load_state_dict(self._best_state[0])
            if optimizer is not None and self._best_state[1] is not None:
                optimizer.load_state_dict(self._best_state[1])
            logger.warning(
                "Adversarial training: catastrophic overfitting at iteration %d (%s); rolled back "
                "to the state of iteration %d", iteration, _describe(measurement),
                self.best["iteration"],
            )
        self._record(measurement)
        return decision

    def _record(self, measurement: Dict) -> None:
        self.events.append(measurement)
        storage = getattr(getattr(self, "trainer", None), "storage", None)
        if storage is not None:
            values = {k: v for k, v in measurement.items() if isinstance(v, float)}
            values["rollbacks"] = float(self.rollbacks)
            for k, v in values.items():
                storage.put_scalar(f"adv_guard/{k}", v, smoothing_hint=False)
        if self.output_dir and comm.is_main_process():
            atomic_json(os.path.join(self.output_dir, "adv_guard.json"), self.events)


def _describe(m: Dict) -> str:
    acc = m.get("robust_acc")
    text = f"PGD loss {m['pgd_loss']:.3f}, training attack loss {m['train_attack_loss']:.3f}"
    return text + (f", robust pixel accuracy {acc:.3f}" if acc is not None else "")
