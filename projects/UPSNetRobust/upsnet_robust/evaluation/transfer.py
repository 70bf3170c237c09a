# Copyright (c) UPSNetRobust authors.
"""Transfer attacks: adversarial images crafted white-box on one model, scored on others.

For every *source* model, each attack x eps of its own ``ROBUSTNESS`` settings crafts the
adversarial test images once (through the same attack hook as the sweep, so seeds, batching and
``ROBUSTNESS.QUANTIZE`` behave identically) and stores them (float unless quantised). Every
*target* model then scores the stored images under each of its own defenses, with its task's
evaluator. The diagonal (source == target) therefore equals the sweep's white-box cell with the
same settings, and an off-diagonal entry that is *stronger* than the target's own white-box attack
signals gradient masking in the target.

Resumable like the sweep: stored images and finished (source pass, target) entries are found
again under the output directory, keyed by fingerprints of models and settings.
"""
import hashlib
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.utils import comm

from ..adapters.base import build_adapter
from ..defenses import build_defense_from_cfg
from ..threats import StepContext, ThreatSpec, check_threats, expand_threats, threat_kind
from ..utils.io import atomic_json
from ..utils.torch_io import atomic_torch_save
from .adversarial_inference import AdversarialInference
from .checks import check_dataset_registered, check_early_stop
from .evaluators import MultiVariantEvaluator, build_task_evaluator, headline_results
from .hook_settings import HookSettings
from .robust_mapper import RobustMapper, objective_needs_segments
from .sweep import fingerprint

__all__ = ["TransferModel", "TransferStudy", "image_key"]

logger = logging.getLogger(__name__)

CLEAN = "clean"


def image_key(d: Dict) -> str:
    """An image's key across data sets (its file name): the panoptic and the semantic split of
    the same images share it."""
    name = os.path.basename(str(d.get("file_name", d.get("image_id"))))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class TransferModel:
    """One model of a transfer study: its config, loaded model, adapter and test mapper."""

    def __init__(self, name: str, cfg, model, mapper=None):
        self.name = name
        self.cfg = cfg
        self.model = model
        self.dataset_name = cfg.DATASETS.TEST[0]
        check_dataset_registered(self.dataset_name)
        self.adapter = build_adapter(cfg, model)
        # the sweep's expansion, without clean, adaptive and sweep-only (ensemble) passes
        self.specs = expand_threats(
            cfg, include_clean=False, include_adaptive=False, combining=False
        )
        check_threats(cfg, self.adapter, self.specs)
        check_early_stop(cfg)
        self.mapper = mapper or self.adapter.test_mapper(cfg) or DatasetMapper(cfg, is_train=False)
        self.fingerprint = fingerprint(cfg, cfg.MODEL.WEIGHTS)
        names = list(OrderedDict.fromkeys(["none"] + list(cfg.ROBUSTNESS.DEFENSES)))
        if "none" not in cfg.ROBUSTNESS.DEFENSES:
            names.remove("none")
        self.defenses = OrderedDict(
            (d, None if d == "none" else build_defense_from_cfg(cfg, d)) for d in names
        )

    def dataset(self, keys: Optional[Sequence[str]] = None) -> List[Dict]:
        """The test images: the first ``ROBUSTNESS.MAX_IMAGES`` of the data set, or, given
        ``keys``, the images with those :func:`image_key` s (whatever the data set's order: a
        semantic split may list the images of a panoptic one in another order)."""
        dicts = DatasetCatalog.get(self.dataset_name)
        if keys is not None:
            wanted = set(keys)
            return [d for d in dicts if image_key(d) in wanted]
        n = self.cfg.ROBUSTNESS.MAX_IMAGES
        return dicts[:n] if n > 0 else dicts

    def passes(self) -> List[ThreatSpec]:
        return list(self.specs)


class _StoredImageMapper:
    """Maps a dataset dict with the target's mapper, then replaces its image by the stored
    adversarial one (same size required: both models must see the images at one resolution)."""

    def __init__(self, mapper, folder: str, source: str, target: str):
        self.mapper, self.folder, self.source, self.target = mapper, folder, source, target

    def __call__(self, d: Dict) -> Dict:
        x = self.mapper(d)
        if "error" in x:
            return x
        path = os.path.join(self.folder, image_key(d) + ".pt")
        if not os.path.isfile(path):  # the source could not attack it (a recorded failure)
            return dict(x, error=f"no adversarial image from {self.source} (failed there)")
        adv = torch.load(path, map_location="cpu", weights_only=True)
        if tuple(adv.shape) != tuple(x["image"].shape):
            raise ValueError(
                f"Image {d.get('file_name')}: source {self.source} attacked it at "
                f"{tuple(adv.shape)}, target {self.target} sees it at {tuple(x['image'].shape)}; "
                "transfer needs the same test resolution (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)"
            )
        return dict(x, image=adv)


class TransferStudy:
    """Crafts on every source, scores on every target; returns the list of entries."""

    def __init__(self, models: Sequence[TransferModel], output_dir: str):
        if len({m.name for m in models}) != len(models):
            raise ValueError(f"Model names must be distinct: {[m.name for m in models]}")
        self.models = list(models)
        self.output_dir = output_dir
        # the first model's test images (its MAX_IMAGES), found by name in every other model's
        self.keys = [image_key(d) for d in self.models[0].dataset()]
        for m in self.models[1:]:
            missing = sorted(set(self.keys) - {image_key(d) for d in m.dataset(self.keys)})
            if missing:
                raise ValueError(
                    f"Test set of {m.name} ({m.dataset_name}) lacks {len(missing)} image(s) of "
                    f"{self.models[0].name}'s ({self.models[0].dataset_name}), e.g. {missing[0]}; "
                    "a transfer study scores the same images on every model"
                )

    # ------------------------------------------------------------------ crafting
    def _adv_folder(self, source: TransferModel, spec: ThreatSpec) -> str:
        r = source.cfg.ROBUSTNESS
        kind = threat_kind(spec.kind)
        desc = {"kind": spec.kind, "threat": kind.cache_key(spec.cfg(source.cfg), spec),
                "objective": spec.objective, "seed": r.SEED, "quantize": r.QUANTIZE,
                "amp": r.AMP, "images": r.MAX_IMAGES}  # fmt: skip
        tag = f"{kind.tag(spec)}_{_digest(desc)}"
        return os.path.join(self.output_dir, "adversarial", f"{source.name}_{source.fingerprint}", tag)

    def craft(self, source: TransferModel, spec: ThreatSpec) -> str:
        """Store the source's adversarial images of one pass (those not stored yet)."""
        folder = self._adv_folder(source, spec)
        os.makedirs(folder, exist_ok=True)
        todo = [d for d in source.dataset(self.keys) if not os.path.isfile(os.path.join(folder, image_key(d) + ".pt"))]
        comm.synchronize()  # every rank lists the same images before any writes one
        if todo:
            r = source.cfg.ROBUSTNESS
            logger.info("Crafting %s eps %g on %s: %d image(s)", spec.name, spec.eps, source.name, len(todo))

            def save(x, clean, adv, defended, outputs):
                atomic_torch_save(os.path.join(folder, image_key(x) + ".pt"), adv.detach().cpu())

            cfg = spec.cfg(source.cfg)
            context = StepContext(cfg, source.adapter, {"none": None}, None,
                                  source.adapter.device, folder)  # fmt: skip
            threat_kind(spec.kind).prepare(cfg, spec, context, folder)
            step = threat_kind(spec.kind).image_step(spec, context)
            hook = AdversarialInference(
                cfg, source.adapter, step, on_image=save, output_keys=(source.adapter.task,),
            )  # fmt: skip
            objective = spec.objective if step is not None and step.needs_objective else None
            loader = build_detection_test_loader(
                todo,
                mapper=RobustMapper(
                    source.mapper,
                    panoptic_segments=bool(objective) and objective_needs_segments(objective),
                ),
                batch_size=r.BATCH_SIZE,
                num_workers=0,
            )
            inference_on_dataset(hook, loader, DatasetEvaluators([]))
        comm.synchronize()
        return folder

    # ------------------------------------------------------------------ scoring
    def score(self, source, spec: Optional[ThreatSpec], target: TransferModel, folder) -> List[Dict]:
        """Entries of one (source pass, target): the stored images (or the clean ones, when
        ``source`` is None) under each of the target's defenses."""
        r = target.cfg.ROBUSTNESS
        key = {"source": source.fingerprint if source else CLEAN, "images": folder or CLEAN,
               "target": target.fingerprint, "defenses": list(target.defenses),
               "defense_cfg": target.cfg.DEFENSE.dump(), "max_images": r.MAX_IMAGES}  # fmt: skip
        tag = f"{source.name if source else CLEAN}__{target.name}__{_digest(key)}"
        done = os.path.join(self.output_dir, "entries", tag + ".json")
        if os.path.isfile(done):
            with open(done) as f:
                return json.load(f)
        mapper = target.mapper
        if folder:
            mapper = _StoredImageMapper(mapper, folder, source.name, target.name)
        settings = HookSettings(  # scoring only: stored or clean images, no attack, no rounding
            input_format=target.cfg.INPUT.FORMAT, batch_size=r.BATCH_SIZE,
            output_keys=(target.adapter.task,),
        )  # fmt: skip
        hook = AdversarialInference(target.adapter, None, target.defenses, settings=settings)
        eval_dir = os.path.join(self.output_dir, "inference", target.name)
        evaluator = MultiVariantEvaluator(
            {d: build_task_evaluator(target.dataset_name, target.adapter.task, eval_dir) for d in target.defenses}
        )
        loader = build_detection_test_loader(
            target.dataset(self.keys), mapper=RobustMapper(mapper),
            batch_size=target.cfg.ROBUSTNESS.BATCH_SIZE, num_workers=0,
        )  # fmt: skip
        results = inference_on_dataset(hook, loader, evaluator)
        records = [rec for part in comm.all_gather(hook.records) for rec in part]
        entries = []
        if comm.is_main_process():
            ok = sum(rec["failure"] is None for rec in records)
            for d in target.defenses:
                entries.append({
                    "source": source.name if source else CLEAN,
                    "target": target.name,
                    "attack": spec.name if source else CLEAN,
                    "objective": spec.objective if source else None,
                    "eps": spec.eps if source else 0.0,
                    "defense": d,
                    "task": target.adapter.task,
                    "metric": target.adapter.headline_metric,
                    "model": target.adapter.meta_architecture,
                    **headline_results(target.adapter.task, results.get(d, {})),
                    "num_images": ok,
                    "num_failed": len(records) - ok,
                })  # fmt: skip
            atomic_json(done, entries)
        comm.synchronize()
        return entries

    def run(self) -> List[Dict]:
        entries = []
        for target in self.models:
            entries += self.score(None, None, target, None)
        for source in self.models:
            for spec in source.passes():
                folder = self.craft(source, spec)
                for target in self.models:
                    entries += self.score(source, spec, target, folder)
        return entries
