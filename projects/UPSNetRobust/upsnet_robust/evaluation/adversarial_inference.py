# Copyright (c) UPSNetRobust authors.
"""The attack hook: a model wrapper that perturbs each batch before inference.

Used like detectron2's TTA wrappers, through ``inference_on_dataset``: per batch it makes the
images float, runs the attack under ``torch.enable_grad()`` (inference runs under no_grad),
optionally rounds to uint8, applies each configured defense to the SAME adversarial images, and
runs inference once per defense. With one defense it returns ordinary outputs (any
``DatasetEvaluator`` works); with several, per image a dict ``{defense_name: output}`` for
:class:`MultiVariantEvaluator`. Per-image attack / defense seconds and failures are recorded.

With ``adaptive_defense`` set, the attack is defense-aware: its objective is wrapped in
:class:`~upsnet_robust.defenses.bpda.DefenseAwareObjective`, so it attacks ``model o defense``
(BPDA through the real defense, EOT over the masks of a randomised one) instead of the model.
"""
import logging
import os
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..adapters.base import ModelAdapter, as_adapter
from ..attacks import NonFiniteGradientError
from ..attacks.objectives import AutocastObjective, build_objective, image_seed
from ..defenses import apply_defense_to_tensor
from ..defenses.bpda import DefenseAwareObjective
from ..defenses.workers import DefenseWorkers
from .outputs import compact_outputs, expand_outputs

__all__ = ["AdversarialInference", "FAILED_KEY", "pad_stack"]

logger = logging.getLogger(__name__)

# Output key of an image that could not be scored; evaluators skip it, the report counts it.
FAILED_KEY = "failed"

# Mixed into an image's seed for its EOT mask stream (independent of the attack's own stream).
_EOT_STREAM = 0x0E07


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AdversarialInference(nn.Module):
    """Attack, then defend, then infer, per batch.

    Args:
        model: a detectron2 model with a registered adapter (:mod:`upsnet_robust.adapters`).
        attack: an attack from :func:`upsnet_robust.attacks.build_attack`, or None (clean).
        objective (str): objective name used when the attack does not require its own.
        defenses: ordered mapping name -> detectron2 Transform or None (undefended).
        input_format (str): channel order of ``image`` (cfg.INPUT.FORMAT).
        quantize (bool): round adversarial images to uint8 before defense and model.
        seed (int): sweep seed; each image's seed derives from it and its image_id.
        cache_dir (str): where finished images are stored; present ones are not recomputed.
        on_image (callable): called per freshly computed image with
            ``(input, clean (3,H,W), adversarial (3,H,W), {defense: defended image}, outputs)``.
        adaptive_defense (str): name of a defense in ``defenses`` to attack through (an
            adaptive attack); None attacks the model alone (defense-unaware).
        surrogate: BPDA surrogate choice for the adaptive attack
            (:func:`upsnet_robust.defenses.surrogates.resolve_surrogates`; "auto" = defaults).
        eot_samples (int): EOT samples for a randomised adaptive defense (None/<= 0: default).
        batch_size (int): images attacked together (one model run per attack step for all of
            them, per-image eps-balls on a zero-padded batch); adaptive passes use 1.
        defense_workers (DefenseWorkers): processes for CPU defenses, overlapping inference.
        amp_dtype (torch.dtype): run the attack's forward/backward under ``torch.autocast``
            with this dtype (mixed precision); None: full precision. Inference stays in float32.
        panoptic_only (bool): shorthand for ``output_keys=("panoptic_seg",)``.
        adapter (ModelAdapter): the model's adapter (default: looked up by meta-architecture,
            without data set metadata; pass one built with ``build_adapter(cfg, model)`` for
            models whose labels need the data set's conventions).
        output_keys: the model outputs the evaluators read (e.g. ``("panoptic_seg",)``); the
            adapter may skip the others, and the cache keeps only these. None: all outputs
            (cached: the adapter task's output).
    """

    def __init__(
        self,
        model: nn.Module,
        attack=None,
        objective: str = "train_losses",
        defenses: Optional[Dict] = None,
        input_format: str = "BGR",
        quantize: bool = False,
        seed: int = 0,
        cache_dir: Optional[str] = None,
        on_image: Optional[Callable] = None,
        adaptive_defense: Optional[str] = None,
        surrogate="auto",
        eot_samples: Optional[int] = None,
        batch_size: int = 1,
        defense_workers: Optional[DefenseWorkers] = None,
        amp_dtype: Optional[torch.dtype] = None,
        panoptic_only: bool = False,
        adapter: Optional[ModelAdapter] = None,
        output_keys=None,
    ):
        super().__init__()
        self.adapter = adapter if adapter is not None else as_adapter(model)
        if panoptic_only:
            output_keys = ("panoptic_seg",)
        if output_keys is None and cache_dir:
            output_keys = (self.adapter.task,)
        self.output_keys = frozenset(output_keys) if output_keys is not None else None
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.defense_workers = defense_workers
        self.amp_dtype = amp_dtype
        self.model = model
        self.attack = attack
        self.objective = objective
        self.defenses = OrderedDict(defenses if defenses is not None else {"none": None})
        self.input_format = input_format
        self.quantize = quantize
        self.seed = seed
        self.cache_dir = cache_dir
        self.on_image = on_image
        self.adaptive_defense = adaptive_defense
        self.surrogate = surrogate
        self.eot_samples = eot_samples
        if adaptive_defense is not None:
            if self.defenses.get(adaptive_defense) is None:
                raise ValueError(
                    f"adaptive_defense {adaptive_defense!r} must name a defense (not 'none') of "
                    f"{list(self.defenses)}"
                )
            if attack is None:
                raise ValueError("An adaptive pass needs an attack.")
        self.records: List[Dict] = []
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
        # The model's mode, not nn.Module's default (training): inference_on_dataset puts the
        # wrapper back in its mode afterwards, and with it the model.
        self.train(model.training)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        # Finished images come from the cache; the others are attacked ``batch_size`` at a time
        # (an adaptive pass: one at a time). Per-image seeds, eps-balls and objective values make
        # an image's result independent of its batch up to float summation order, so 1- and
        # N-process runs agree; a failing image is isolated by redoing its batch image by image.
        entries = [self._load_cached(x) for x in batched_inputs]
        todo = [i for i, e in enumerate(entries) if e is None]
        size = 1 if self.adaptive_defense is not None else self.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            for i, entry in zip(chunk, self._compute_batch([batched_inputs[i] for i in chunk])):
                self._store(batched_inputs[i], entry)
                entries[i] = entry
        self.records.extend(e["record"] for e in entries)
        outputs = [e["outputs"] for e in entries]
        if len(self.defenses) == 1:
            only = next(iter(self.defenses))
            outputs = [o if FAILED_KEY in o else o[only] for o in outputs]
        return outputs

    # ------------------------------------------------------------------ cache
    def _cache_path(self, x: Dict) -> Optional[str]:
        if not self.cache_dir:
            return None
        key = str(x.get("image_id", os.path.basename(x.get("file_name", ""))))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return os.path.join(self.cache_dir, f"{safe}.pt")

    def _load_cached(self, x: Dict) -> Optional[Dict]:
        path = self._cache_path(x)
        if path and os.path.isfile(path):
            entry = torch.load(path, map_location="cpu", weights_only=True)
            outputs = entry["outputs"]
            if FAILED_KEY not in outputs:
                entry["outputs"] = {d: expand_outputs(o) for d, o in outputs.items()}
            return entry
        return None

    def _store(self, x: Dict, entry: Dict) -> None:
        path = self._cache_path(x)
        if path:
            # only what the evaluators read, in a form torch.load(weights_only=True) reads back
            outputs = entry["outputs"]
            if FAILED_KEY not in outputs:
                outputs = {d: compact_outputs(o, self.output_keys) for d, o in outputs.items()}
            tmp = path + ".tmp"
            torch.save(dict(entry, outputs=outputs), tmp)
            os.replace(tmp, path)

    # ------------------------------------------------------------------ one batch
    def _new_record(self, x: Dict) -> Dict:
        record = {
            "image_id": x.get("image_id"),
            "file_name": x.get("file_name"),
            "attack_s": 0.0,
            "defense_s": {name: 0.0 for name in self.defenses},
            "failure": None,
        }
        if self.adaptive_defense is not None:
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
        if self.attack is not None:
            try:
                advs, seconds, stats = self._attack(vx, advs)
            except NonFiniteGradientError as e:
                if len(vx) > 1:  # find out which image(s): redo them one by one
                    return [self._compute_batch([x])[0] for x in xs]
                reason = f"non-finite gradient ({e})"
                logger.warning("Skipping %s: %s", vx[0].get("file_name"), reason)
                entries[valid[0]] = self._failed(records[valid[0]], reason)
                return entries
            for j in valid:
                records[j]["attack_s"] = seconds / len(vx)  # the batch's time, shared evenly
                records[j]["attack_batch_size"] = len(vx)
                records[j].update(stats)
        if self.quantize:
            advs = [a.round().clamp(0, 255) for a in advs]
        outputs, defended = self._defend_and_infer(vx, advs, [records[j] for j in valid])
        for k, j in enumerate(valid):
            if self.on_image is not None:
                self.on_image(vx[k], vx[k]["image"].to(device).float(), advs[k], defended[k], outputs[k])
            entries[j] = {"outputs": outputs[k], "record": records[j]}
        return entries

    def _attack(self, xs: List[Dict], images: List[torch.Tensor]):
        """Attack a batch; returns per-image adversarial images, the batch's seconds and
        adaptive-attack statistics."""
        name = getattr(self.attack, "required_objective", None) or self.objective
        objective = build_objective(name, self.adapter, xs, seed=self.seed, batched=len(xs) > 1)
        if self.adaptive_defense is not None:  # one image at a time (see forward)
            objective = DefenseAwareObjective(
                objective,
                self.defenses[self.adaptive_defense],
                input_format=self.input_format,
                surrogate=self.surrogate,
                eot_samples=self.eot_samples,
                generator=np.random.default_rng(
                    [image_seed(self.seed, xs[0].get("image_id")), _EOT_STREAM]
                ),
            )
        if self.amp_dtype is not None:
            objective = AutocastObjective(objective, self._device.type, self.amp_dtype)
        if hasattr(self.attack, "manual_seed"):  # random starts seeded per image too
            self.attack.manual_seed([image_seed(self.seed, x.get("image_id")) for x in xs])
        batch = pad_stack(images)
        device = self._device
        _sync(device)
        start = time.perf_counter()
        with torch.enable_grad():
            adv = self.attack.perturb(batch, objective).detach()
        _sync(device)
        seconds = time.perf_counter() - start
        stats = {}
        if self.adaptive_defense is not None:
            stats = {
                "attack_defense_s": objective.stats["defense_s"],
                "attack_defense_calls": objective.stats["defense_calls"],
            }
        return [adv[j, :, : im.shape[-2], : im.shape[-1]] for j, im in enumerate(images)], seconds, stats

    def _defend_and_infer(self, xs: List[Dict], advs: List[torch.Tensor], records: List[Dict]):
        """Every defense on the same adversarial images, then one batched inference per
        defense. With worker processes, all CPU defense jobs start first, so they run while
        the model infers the variants already available."""
        device = self._device
        futures = {}
        if self.defense_workers is not None:
            for name, transform in self.defenses.items():
                if self.defense_workers.accepts(transform):
                    futures[name] = [
                        self.defense_workers.submit(transform, a, self.input_format) for a in advs
                    ]
        outputs = [{} for _ in xs]
        defended = [{} for _ in xs]
        for name, transform in self.defenses.items():
            if transform is None:
                images = advs
            elif name in futures:
                images = []
                for record, future in zip(records, futures[name]):
                    image, seconds = future.result()
                    images.append(image.to(device))
                    record["defense_s"][name] = seconds
            else:
                images = []
                for record, a in zip(records, advs):
                    _sync(device)
                    start = time.perf_counter()
                    images.append(apply_defense_to_tensor(transform, a[None], self.input_format)[0])
                    _sync(device)
                    record["defense_s"][name] = time.perf_counter() - start
            with torch.no_grad():
                outs = self._infer([dict(x, image=image) for x, image in zip(xs, images)])
            for k, out in enumerate(outs):
                defended[k][name] = images[k]
                if self.cache_dir:  # fresh and cached results take the same (compact) form
                    out = expand_outputs(compact_outputs(out, self.output_keys))
                outputs[k][name] = out
        return outputs, defended


    def _infer(self, inputs: List[Dict]) -> List[Dict]:
        outputs = self.adapter.inference(inputs, keys=self.output_keys)
        if self.output_keys is None:
            return outputs
        return [{k: o[k] for k in self.output_keys} for o in outputs]


def pad_stack(images: List[torch.Tensor]) -> torch.Tensor:
    """(3, h_i, w_i) images as one (N, 3, H, W) batch, zero-padded at the bottom/right to the
    largest size (objectives crop each image back, so padding gets no gradient)."""
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    if all(im.shape[-2:] == (height, width) for im in images):
        return torch.stack(images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for j, im in enumerate(images):
        batch[j, :, : im.shape[-2], : im.shape[-1]] = im
    return batch
