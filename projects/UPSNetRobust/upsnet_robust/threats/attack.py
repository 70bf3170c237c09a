# Copyright (c) UPSNetRobust authors.
"""The per-image attack kind ("attack"): every registered attack (``ROBUSTNESS.ATTACKS``) at
every eps, maximising the pass's objective, plus (``ROBUSTNESS.ADAPTIVE``) one adaptive pass per
defense, where the attack differentiates through ``model o defense`` (BPDA, EOT).

Its cache key holds every argument the attack is built with, as ``from_config`` returns them,
so a setting an attack reads can never be left out of the key."""
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..attacks.checks import check_attack_objective, check_attack_settings, objective_for
from ..attacks.objectives import AutocastObjective, build_objective, image_seed, objective_class
from ..attacks.registry import ATTACK_REGISTRY, attack_class, build_attack
from ..defenses.bpda import DefenseAwareObjective
from ..utils.image import pad_stack
from .base import ImageStep, StepContext, StepResult, ThreatKind, ThreatProperties, ThreatSpec
from .base import canonical
from .registry import register_threat

__all__ = [
    "AttackKind", "AttackStep", "adaptive_defense_names", "attack_steps", "final_losses",
    "objective_for",
]

# Mixed into an image's seed for its EOT mask stream (independent of the attack's own stream).
_EOT_STREAM = 0x0E07


def adaptive_defense_names(cfg) -> List[str]:
    """Defenses that get adaptive passes: those of ROBUSTNESS.DEFENSES other than "none" (in
    order, without repeats), if ROBUSTNESS.ADAPTIVE; else none."""
    if not cfg.ROBUSTNESS.ADAPTIVE:
        return []
    return [d for d in OrderedDict.fromkeys(cfg.ROBUSTNESS.DEFENSES) if d != "none"]


def attack_steps(attack):
    """``(num_steps, step_size)`` of a built attack, as the cells record them: its own
    ``num_steps`` / ``step_size`` attributes where it sets them (the arguments it was built
    with), else what its ``describe()`` states (e.g. Kurakin's rule resolved per eps); per-image
    lists reduced to their maximum."""
    desc = attack.describe()
    steps = getattr(attack, "num_steps", None)
    size = getattr(attack, "step_size", None)
    steps = desc.get("num_steps") if steps is None else steps
    size = desc.get("step_size") if size is None or steps is None else size

    def first(v, cast):
        if torch.is_tensor(v):
            v = v.tolist()
        if isinstance(v, (list, tuple)):
            v = max(v) if v else 0
        return cast(v or 0)

    return first(steps, int), first(size, float)


class AttackStep(ImageStep):
    """A batch's adversarial images: ``attack.perturb`` on the padded batch, maximising the
    pass's objective (through the defense for an adaptive pass, under autocast with AMP);
    random starts are seeded per image.

    Args:
        attack: an :class:`~upsnet_robust.attacks.Attack`.
        objective: the objective's registered name.
        adapter: the model's adapter.
        seed: the sweep's seed (each image's derives from it and its image_id).
        input_format: channel order of the images (for defenses in an adaptive pass).
        amp_dtype: autocast dtype of the attack's forward/backward, or None.
        adaptive: :class:`~upsnet_robust.evaluation.AdaptiveSettings` of an adaptive pass.
        defense: the Transform of the adaptive pass's defense.
    """

    needs_objective = True

    def __init__(self, attack, objective: str, adapter, *, seed: int = 0, input_format="BGR",
                 amp_dtype=None, adaptive=None, defense=None):  # fmt: skip
        self.attack = attack
        self.objective = objective
        self.adapter = adapter
        self.seed = seed
        self.input_format = input_format
        self.amp_dtype = amp_dtype
        self.adaptive = adaptive
        self.defense = defense
        self.batch_size = 1 if adaptive is not None else None  # adaptive: one image at a time
        self.steps = attack_steps(attack)

    def describe(self) -> Dict:
        desc = self.attack.describe()
        return {
            "random_start": bool(desc.get("random_start", False)),
            "restarts": int(desc.get("restarts", 1) or 1),
        }

    def build_objective(self, xs: Sequence[Dict]):
        """The batch's objective: adaptive (through the defense) and mixed precision if set."""
        objective = build_objective(
            self.objective, self.adapter, list(xs), seed=self.seed, batched=len(xs) > 1
        )
        if self.adaptive is not None:
            objective = DefenseAwareObjective(
                objective,
                self.defense,
                input_format=self.input_format,
                surrogate=self.adaptive.surrogate,
                eot_samples=self.adaptive.eot_samples,
                generator=np.random.default_rng(
                    [image_seed(self.seed, xs[0].get("image_id")), _EOT_STREAM]
                ),
            )
        if self.amp_dtype is not None:
            device = self.adapter.device
            objective = AutocastObjective(objective, torch.device(device).type, self.amp_dtype)
        return objective

    def __call__(self, xs, images) -> StepResult:
        objective = self.build_objective(xs)
        if hasattr(self.attack, "manual_seed"):  # random starts seeded per image too
            self.attack.manual_seed([image_seed(self.seed, x.get("image_id")) for x in xs])
        batch = pad_stack(images)
        _sync(batch.device)
        start = time.perf_counter()
        with torch.enable_grad():
            adv = self.attack.perturb(batch, objective).detach()
        _sync(batch.device)
        seconds = time.perf_counter() - start
        stats = {}
        if self.adaptive is not None:
            stats = {
                "attack_defense_s": objective.stats["defense_s"],
                "attack_defense_calls": objective.stats["defense_calls"],
            }
        passes = getattr(self.attack, "image_passes", None)
        advs = [adv[j, :, : im.shape[-2], : im.shape[-1]] for j, im in enumerate(images)]
        passes = [int(p) for p in passes] if passes is not None else None
        # the loss at the returned point is the attack's maximum only when it keeps the
        # highest-loss iterate and runs every step (not early stopping, not keeping accuracy)
        keeps_loss = not self.attack.early_stop and getattr(self.attack, "keep", "loss") == "loss"
        # in float32 (the attack's mixed precision, if any, is for its gradients)
        plain = objective.objective if isinstance(objective, AutocastObjective) else objective
        losses = final_losses(plain, adv) if keeps_loss else None
        return StepResult(advs, passes, stats, seconds, losses)


def final_losses(objective, adv: torch.Tensor) -> Optional[List[float]]:
    """Each image's objective value at its adversarial point (one extra forward per batch,
    without a gradient, outside the timed attack: the attacks evaluate the objective before each
    step, never after the last), or None where the objective gives one value for the batch."""
    with torch.no_grad():
        value = objective(adv).detach().float().reshape(-1)
    if value.numel() != adv.shape[0]:
        return None
    return [float(v) for v in value.cpu()]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register_threat("attack")
class AttackKind(ThreatKind):
    """Every registered attack of ``ROBUSTNESS.ATTACKS`` at every eps of
    ``ROBUSTNESS.EPSILONS``; adaptive passes per defense with ``ROBUSTNESS.ADAPTIVE``."""

    properties = ThreatProperties(
        iterative=True, needs_gradients=True, needs_objective=True, eps_bounded=True
    )
    threat_model = (
        "attacks are white-box on the undefended model; defended cells score the same "
        "adversarial images after the defense (defense-unaware / gray-box) unless `adaptive` is "
        "true, in which case the attack ran against model o defense: the real defense forward, "
        "the VJP of a differentiable surrogate backward (BPDA, see `surrogate`), averaged over "
        "`eot_samples` random masks for randomised defenses (EOT)"
    )

    @classmethod
    def names(cls) -> List[str]:
        return sorted(k for k, _ in ATTACK_REGISTRY)

    @classmethod
    def claims(cls, name: str) -> bool:
        return str(name) in ATTACK_REGISTRY or str(name).strip().lower() in ATTACK_REGISTRY

    @classmethod
    def spec(cls, cfg, name: str, eps: float, adaptive: Optional[str] = None,
             overrides: Optional[Dict] = None, member_of=()) -> ThreatSpec:  # fmt: skip
        """A pass of attack ``name``; its objective resolved from the pass's config."""
        spec = ThreatSpec.make(cls.name, name, eps=float(eps), adaptive=adaptive,
                               overrides=overrides, member_of=tuple(member_of))  # fmt: skip
        objective = objective_for(name, spec.cfg(cfg).ROBUSTNESS.OBJECTIVE)
        return spec.replace(objective=objective)

    @classmethod
    def expand(cls, cfg, include_adaptive: bool = True) -> List[ThreatSpec]:
        r = cfg.ROBUSTNESS
        names = [n for n in OrderedDict.fromkeys(r.ATTACKS) if cls.claims(n)]
        specs = [cls.spec(cfg, n, e) for n in names for e in r.EPSILONS]
        if include_adaptive:
            specs += [
                cls.spec(cfg, n, e, adaptive=d)
                for n in names for e in r.EPSILONS for d in adaptive_defense_names(cfg)
            ]  # fmt: skip
        return specs

    @classmethod
    def check(cls, cfg, adapter, specs: Sequence[ThreatSpec]) -> None:
        own = [s for s in specs if not s.member_of]  # members: their ensemble's kind checks them
        # with the configured objective: the check tells "no objective helps" (an attack with a
        # required one the model cannot serve) from "another objective would"
        pairs = ((s.name, s.cfg(cfg).ROBUSTNESS.OBJECTIVE) for s in own)
        for name, objective in OrderedDict.fromkeys(pairs):
            check_attack_objective(adapter, name, objective)
        check_attack_settings(cfg, [s.name for s in own])

    @classmethod
    def spec_properties(cls, spec_or_name) -> ThreatProperties:
        name = getattr(spec_or_name, "name", spec_or_name)
        attack = attack_class(name)
        objective = getattr(spec_or_name, "objective", None) or attack.required_objective
        try:
            targeted = bool(objective and getattr(objective_class(objective), "targeted", False))
        except KeyError:
            targeted = False
        return ThreatProperties(
            single_step=bool(attack.single_step),
            # several gradient steps (a gradient-free search is neither single-step nor this)
            iterative=not attack.single_step and bool(attack.needs_gradients),
            targeted=targeted,
            needs_gradients=bool(attack.needs_gradients),
            needs_objective=True,
            eps_bounded=True,
            baseline=attack.baseline,
        )

    @classmethod
    def cache_key(cls, cfg, spec: ThreatSpec) -> Dict:
        """The attack's name, every constructor argument ``from_config`` gives it at this eps
        (a generator by its seed) and the objective."""
        attack = attack_class(spec.name)
        return {
            "attack": spec.name,
            "arguments": canonical(attack.from_config(cfg, spec.eps)),
            "objective": spec.objective,
        }

    @classmethod
    def image_step(cls, spec: ThreatSpec, context: StepContext) -> AttackStep:
        from ..evaluation.hook_settings import amp_dtype

        cfg = context.cfg
        r = cfg.ROBUSTNESS
        attack = build_attack(cfg, spec.name, spec.eps)
        defense = context.defenses.get(spec.adaptive) if spec.adaptive else None
        return AttackStep(attack, spec.objective, context.adapter, seed=r.SEED,
                          input_format=cfg.INPUT.FORMAT, amp_dtype=amp_dtype(r.AMP),
                          adaptive=context.adaptive, defense=defense)  # fmt: skip
