# Copyright (c) UPSNetRobust authors.
"""The attack hook: a model wrapper that perturbs each batch before inference.

Used like detectron2's TTA wrappers, through ``inference_on_dataset``: per batch it makes the
images float, runs the attack under ``torch.enable_grad()`` (inference runs under no_grad),
optionally rounds to uint8, applies each configured defense to the SAME adversarial images, and
runs inference once per defense. It returns, per image, ``{defense name: output}`` (or
``{FAILED_KEY: reason}`` for an image that could not be scored), whatever the number of
defenses: score it with :class:`~.evaluators.MultiVariantEvaluator`, which routes each defense's
outputs to its own evaluator and counts failures. Per-image attack / defense seconds and
failures are recorded in :attr:`AdversarialInference.records`.

What perturbs a batch is an :class:`~upsnet_robust.threats.ImageStep` built by the pass's threat
kind (an attack maximising an objective, an image function, a stored perturbation, ...); the
hook builds no objective of its own. An :class:`~upsnet_robust.attacks.Attack` given instead is
wrapped in the attack kind's :class:`~upsnet_robust.threats.attack.AttackStep` with the hook's
settings. With an :class:`~.hook_settings.AdaptiveSettings`, that attack is defense-aware: its
objective is wrapped in :class:`~upsnet_robust.defenses.bpda.DefenseAwareObjective`, so it
attacks ``model o defense`` (BPDA through the real defense, EOT over the masks of a randomised
one) instead of the model.
"""
import logging
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable

from ..adapters.base import as_adapter
from ..attacks import NonFiniteGradientError
from ..defenses import apply_defense_to_tensor
from ..defenses.workers import DefenseWorkers
from ..threats.attack import AttackStep, objective_for
from ..threats.base import ImageFailure, ImageStep
from ..utils.image import pad_stack
from .hook_settings import AdaptiveSettings, HookSettings
from .image_cache import FAILED_KEY, ImageCache

__all__ = ["AdversarialInference", "FAILED_KEY", "pad_stack"]

logger = logging.getLogger(__name__)

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AdversarialInference(nn.Module):
    """Attack, then defend, then infer, per batch; outputs ``{defense: output}`` per image.

    Build it from a config (``AdversarialInference(cfg, model, attack, defenses, ...)``, see
    :meth:`from_config`) or from its arguments. Fields of :class:`HookSettings` may also be
    given as keywords (``objective="semantic_ce", seed=3, panoptic_only=True``), a shorthand
    for ``settings=HookSettings(...)``.

    Args:
        model: a detectron2 model with a registered adapter (:mod:`upsnet_robust.adapters`),
            or its :class:`~upsnet_robust.adapters.ModelAdapter` (built with
            ``build_adapter(cfg, model)`` for models whose labels need the data set's
            conventions).
        attack: the pass's :class:`~upsnet_robust.threats.ImageStep` (from its threat kind), an
            attack from :func:`upsnet_robust.attacks.build_attack` (run by an
            :class:`~upsnet_robust.threats.attack.AttackStep` with ``settings``), or None
            (clean).
        defenses: ordered mapping name -> detectron2 Transform or None (undefended); default
            ``{"none": None}``.
        settings (HookSettings): objective, input format, quantisation, seed, batch size,
            mixed precision and the outputs read.
        adaptive (AdaptiveSettings): attack through one of ``defenses`` (an adaptive pass);
            None attacks the model alone (defense-unaware).
        cache_dir (str): where finished images are stored (:class:`ImageCache`); present ones
            are not recomputed.
        on_image (callable): called per freshly computed image with
            ``(input, clean (3,H,W), adversarial (3,H,W), {defense: defended image},
            {defense: output})``.
        defense_workers (DefenseWorkers): processes for CPU defenses, overlapping inference.
    """

    @configurable
    def __init__(
        self,
        model: nn.Module,
        attack=None,
        defenses: Optional[Dict] = None,
        *,
        settings: Optional[HookSettings] = None,
        adaptive: Optional[AdaptiveSettings] = None,
        cache_dir: Optional[str] = None,
        on_image: Optional[Callable] = None,
        defense_workers: Optional[DefenseWorkers] = None,
        **setting_fields,
    ):
        super().__init__()
        self.adapter = as_adapter(model)
        self.model = self.adapter.model
        self.settings = (settings or HookSettings()).replace(**setting_fields)
        self.defenses = OrderedDict(defenses if defenses is not None else {"none": None})
        if FAILED_KEY in self.defenses:
            raise ValueError(f"{FAILED_KEY!r} is reserved for failed images, not a defense name")
        self.adaptive = adaptive
        if adaptive is not None:
            if self.defenses.get(adaptive.defense) is None:
                raise ValueError(
                    f"adaptive defense {adaptive.defense!r} must name a defense (not 'none') of "
                    f"{list(self.defenses)}"
                )
            if attack is None:
                raise ValueError("An adaptive pass needs an attack.")
        self.step = self._as_step(attack, adaptive)
        self.attack = getattr(self.step, "attack", attack)
        keys = self.settings.output_keys
        if keys is None and cache_dir:
            keys = (self.adapter.task,)
        self.output_keys = frozenset(keys) if keys is not None else None
        self.cache = ImageCache(cache_dir, self.output_keys) if cache_dir else None
        self.on_image = on_image
        self.defense_workers = defense_workers
        self.records: List[Dict] = []
        # The model's mode, not nn.Module's default (training): inference_on_dataset puts the
        # wrapper back in its mode afterwards, and with it the model.
        self.train(self.model.training)

    @classmethod
    def from_config(
        cls,
        cfg,
        model,
        attack=None,
        defenses=None,
        *,
        adaptive_defense: Optional[str] = None,
        cache_dir: Optional[str] = None,
        on_image: Optional[Callable] = None,
        defense_workers: Optional[DefenseWorkers] = None,
        output_keys=None,
    ):
        """Settings from ``cfg.ROBUSTNESS`` and ``cfg.INPUT.FORMAT``
        (:meth:`HookSettings.from_config`); ``adaptive_defense`` names the defense of an
        adaptive pass (BPDA_SURROGATE, EOT_SAMPLES)."""
        adaptive = None
        if adaptive_defense is not None:
            adaptive = AdaptiveSettings.from_config(cfg, adaptive_defense)
        return {
            "model": model,
            "attack": attack,
            "defenses": defenses,
            "settings": HookSettings.from_config(cfg, output_keys),
            "adaptive": adaptive,
            "cache_dir": cache_dir,
            "on_image": on_image,
            "defense_workers": defense_workers,
        }

    def _as_step(self, attack, adaptive) -> Optional[ImageStep]:
        """The image step of ``attack`` (an Attack runs as the attack kind's step)."""
        if attack is None or isinstance(attack, ImageStep):
            return attack
        s = self.settings
        return AttackStep(
            attack,
            objective_for(attack, s.objective),
            self.adapter,
            seed=s.seed,
            input_format=s.input_format,
            amp_dtype=s.amp_dtype,
            adaptive=adaptive,
            defense=self.defenses[adaptive.defense] if adaptive is not None else None,
        )

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        # Finished images come from the cache; the others are attacked ``batch_size`` at a time
        # (an adaptive pass: one at a time). Per-image seeds, eps-balls and objective values make
        # an image's result independent of its batch up to float summation order, so 1- and
        # N-process runs agree; a failing image is isolated by redoing its batch image by image.
        entries = [self.cache.load(x) if self.cache else None for x in batched_inputs]
        todo = [i for i, e in enumerate(entries) if e is None]
        size = getattr(self.step, "batch_size", None) or self.settings.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            for i, entry in zip(chunk, self._compute_batch([batched_inputs[i] for i in chunk])):
                if self.cache:
                    self.cache.store(batched_inputs[i], entry)
                entries[i] = entry
        self.records.extend(e["record"] for e in entries)
        return [e["outputs"] for e in entries]

    # ------------------------------------------------------------------ one batch
    def _new_record(self, x: Dict) -> Dict:
        record = {
            "image_id": x.get("image_id"),
            "file_name": x.get("file_name"),
            "attack_s": 0.0,
            "defense_s": {name: 0.0 for name in self.defenses},
            "failure": None,
        }
        if self.adaptive is not None:
            # seconds of real defense forwards inside the attack (part of attack_s), and count
            record["attack_defense_s"] = 0.0
            record["attack_defense_calls"] = 0
        return record

    @staticmethod
    def _failed(record: Dict, reason: str) -> Dict:
        record["failure"] = reason
        return {"outputs": {FAILED_KEY: reason}, "record": record}

    def _compute_batch(self, xs: List[Dict]) -> List[Dict]:
        records = [self._new_record(x) for x in xs]
        entries: List[Optional[Dict]] = [None] * len(xs)
        for j, x in enumerate(xs):
            if "error" in x:  # the mapper could not read the image (see RobustMapper)
                entries[j] = self._failed(records[j], x["error"])
        valid = [j for j, e in enumerate(entries) if e is None]
        if not valid:
            return entries
        vx = [xs[j] for j in valid]
        device = self._device
        advs = [x["image"].to(device).float() for x in vx]
        if self.step is not None:
            try:
                advs, seconds, result = self._produce(vx, advs)
            except (NonFiniteGradientError, ImageFailure) as e:
                if len(vx) > 1:  # find out which image(s): redo them one by one
                    return [self._compute_batch([x])[0] for x in xs]
                reason = f"non-finite gradient ({e})" if isinstance(
                    e, NonFiniteGradientError) else str(e)  # fmt: skip
                logger.warning("Skipping %s: %s", vx[0].get("file_name"), reason)
                entries[valid[0]] = self._failed(records[valid[0]], reason)
                return entries
            for k, j in enumerate(valid):
                records[j]["attack_s"] = seconds / len(vx)  # the batch's time, shared evenly
                records[j]["attack_batch_size"] = len(vx)
                records[j].update(result.stats)
                if result.passes is not None:  # forward+backward passes this image needed
                    records[j]["attack_passes"] = int(result.passes[k])
                if result.losses is not None:  # the objective at the returned image
                    records[j]["attack_loss"] = float(result.losses[k])
        if self.settings.quantize:
            advs = [a.round().clamp(0, 255) for a in advs]
        outputs, defended = self._defend_and_infer(vx, advs, [records[j] for j in valid])
        for k, j in enumerate(valid):
            if self.on_image is not None:
                clean = vx[k]["image"].to(device).float()
                self.on_image(vx[k], clean, advs[k], defended[k], outputs[k])
            entries[j] = {"outputs": outputs[k], "record": records[j]}
        return entries

    def _produce(self, xs: List[Dict], images: List[torch.Tensor]):
        """The step's images of a batch, their seconds (the step's own timing if it keeps one)
        and its :class:`~upsnet_robust.threats.StepResult`."""
        device = self._device
        _sync(device)
        start = time.perf_counter()
        with torch.enable_grad():
            result = self.step(xs, images)
        _sync(device)
        seconds = time.perf_counter() - start if result.seconds is None else result.seconds
        return [im.detach() for im in result.images], seconds, result

    def _defended_images(self, name, transform, advs, records, futures):
        """One defense's images of the batch (from worker futures or in process), timed."""
        device = self._device
        if transform is None:
            return advs
        images = []
        if name in futures:
            for record, future in zip(records, futures[name]):
                image, seconds = future.result()
                images.append(image.to(device))
                record["defense_s"][name] = seconds
            return images
        fmt = self.settings.input_format
        for record, a in zip(records, advs):
            _sync(device)
            start = time.perf_counter()
            images.append(apply_defense_to_tensor(transform, a[None], fmt)[0])
            _sync(device)
            record["defense_s"][name] = time.perf_counter() - start
        return images

    def _defend_and_infer(self, xs: List[Dict], advs: List[torch.Tensor], records: List[Dict]):
        """Every defense on the same adversarial images, then one batched inference per
        defense. With worker processes, all CPU defense jobs start first, so they run while
        the model infers the variants already available."""
        futures = {}
        if self.defense_workers is not None:
            for name, transform in self.defenses.items():
                if self.defense_workers.accepts(transform):
                    futures[name] = [
                        self.defense_workers.submit(transform, a, self.settings.input_format)
                        for a in advs
                    ]
        outputs = [{} for _ in xs]
        defended = [{} for _ in xs]
        for name, transform in self.defenses.items():
            images = self._defended_images(name, transform, advs, records, futures)
            with torch.no_grad():
                outs = self._infer([dict(x, image=image) for x, image in zip(xs, images)])
            for k, out in enumerate(outs):
                defended[k][name] = images[k]
                # fresh and cached results take the same (compact) form
                outputs[k][name] = self.cache.normalize(out) if self.cache else out
        return outputs, defended

    def _infer(self, inputs: List[Dict]) -> List[Dict]:
        outputs = self.adapter.inference(inputs, keys=self.output_keys)
        if self.output_keys is None:
            return outputs
        return [{k: o[k] for k in self.output_keys} for o in outputs]
