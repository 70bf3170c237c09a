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

from ..attacks import NonFiniteGradientError
from ..attacks.objectives import build_objective, image_seed
from ..defenses import apply_defense_to_tensor
from ..defenses.bpda import DefenseAwareObjective

__all__ = ["AdversarialInference", "FAILED_KEY"]

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
        model: a detectron2 panoptic model (UPSNet, or any with the same input contract).
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
    ):
        super().__init__()
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

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        # Images are attacked one by one: per-image seeds and eps-balls, results independent of
        # batch composition (so 1- and N-process runs agree), per-image failure isolation.
        outputs = [self._process(x) for x in batched_inputs]
        if len(self.defenses) == 1:
            only = next(iter(self.defenses))
            outputs = [o if FAILED_KEY in o else o[only] for o in outputs]
        return outputs

    # ------------------------------------------------------------------ per image
    def _cache_path(self, x: Dict) -> Optional[str]:
        if not self.cache_dir:
            return None
        key = str(x.get("image_id", os.path.basename(x.get("file_name", ""))))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return os.path.join(self.cache_dir, f"{safe}.pt")

    def _process(self, x: Dict) -> Dict:
        path = self._cache_path(x)
        if path and os.path.isfile(path):
            entry = torch.load(path, map_location="cpu", weights_only=True)
            self.records.append(entry["record"])
            return entry["outputs"]
        entry = self._compute(x)
        if path:
            tmp = path + ".tmp"
            torch.save(entry, tmp)
            os.replace(tmp, path)
        self.records.append(entry["record"])
        return entry["outputs"]

    def _compute(self, x: Dict) -> Dict:
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
        if "error" in x:  # the mapper could not read the image (see RobustMapper)
            record["failure"] = x["error"]
            return {"outputs": {FAILED_KEY: x["error"]}, "record": record}

        device = self._device
        clean = x["image"].to(device).float()
        adv = clean
        if self.attack is not None:
            name = getattr(self.attack, "required_objective", None) or self.objective
            objective = build_objective(name, self.model, [x], seed=self.seed)
            if self.adaptive_defense is not None:
                objective = DefenseAwareObjective(
                    objective,
                    self.defenses[self.adaptive_defense],
                    input_format=self.input_format,
                    surrogate=self.surrogate,
                    eot_samples=self.eot_samples,
                    generator=np.random.default_rng(
                        [image_seed(self.seed, x.get("image_id")), _EOT_STREAM]
                    ),
                )
            if hasattr(self.attack, "manual_seed"):  # random starts seeded per image too
                self.attack.manual_seed([image_seed(self.seed, x.get("image_id"))])
            _sync(device)
            start = time.perf_counter()
            try:
                with torch.enable_grad():
                    adv = self.attack.perturb(clean[None], objective)[0].detach()
            except NonFiniteGradientError as e:
                reason = f"non-finite gradient ({e})"
                logger.warning("Skipping %s: %s", x.get("file_name"), reason)
                record["failure"] = reason
                return {"outputs": {FAILED_KEY: reason}, "record": record}
            _sync(device)
            record["attack_s"] = time.perf_counter() - start
            if self.adaptive_defense is not None:
                record["attack_defense_s"] = objective.stats["defense_s"]
                record["attack_defense_calls"] = objective.stats["defense_calls"]
        if self.quantize:
            adv = adv.round().clamp(0, 255)

        outputs, defended_images = {}, {}
        for name, transform in self.defenses.items():
            image = adv
            if transform is not None:
                _sync(device)
                start = time.perf_counter()
                image = apply_defense_to_tensor(transform, adv[None], self.input_format)[0]
                _sync(device)
                record["defense_s"][name] = time.perf_counter() - start
            defended_images[name] = image
            with torch.no_grad():
                out = self.model([dict(x, image=image)])[0]
            # Cached entries keep only the panoptic result (loadable with weights_only=True).
            outputs[name] = {"panoptic_seg": _to_cpu(out["panoptic_seg"])} if self.cache_dir else out
        if self.on_image is not None:
            self.on_image(x, clean, adv, defended_images, outputs)
        return {"outputs": outputs, "record": record}


def _to_cpu(panoptic_seg):
    ids, segments = panoptic_seg
    return ids.cpu(), segments
