# Copyright (c) UPSNetRobust authors.
"""The robustness sweep: threat passes x defenses, plus clean cells, with resume.

The passes come from the registered threat kinds (:mod:`upsnet_robust.threats`): clean, every
attack x eps (plus, with ``ROBUSTNESS.ADAPTIVE``, one adaptive pass per defense other than
"none", whose images are scored with that defense only), the ``sea`` ensembles, and any kind a
plug-in registers. Each pass computes its images once through its kind's image step and scores
them under every defense of ``ROBUSTNESS.DEFENSES`` (one cell per defense); a combining kind
(an ensemble) computes its cells from its member passes' stored per-image statistics. Finished
images are cached per pass, finished passes store their cells; both live under a directory keyed
by a fingerprint of the model config and the checkpoint's bytes, and each pass's directory by a
hash of its kind's cache key (for an attack: every argument it is built with), objective,
defenses, seed, data and precision, so a changed setting never reuses stale work while unrelated
additions (a new eps) keep what is done.
"""
import hashlib
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm

from ..adapters.base import build_adapter
from ..defenses import build_defense_from_cfg
from ..defenses.bpda import describe_surrogates, eot_samples_for
from ..defenses.workers import DefenseWorkers
from ..threats import StepContext, ThreatSpec, check_threats, expand_threats, kinds, threat_kind
from ..utils.io import atomic_json
from .adversarial_inference import AdversarialInference
from .breakdown import cell_breakdown
from .checks import check_dataset_registered, check_early_stop
from .evaluators import MultiVariantEvaluator, build_task_evaluator, headline_results
from .hook_settings import AdaptiveSettings, amp_dtype
from .panoptic_stats import save_image_stats
from .report.cells import ResultCell
from .robust_mapper import RobustMapper, objective_needs_segments
from .semantic_stats import save_confusion_stats

__all__ = ["RobustnessSweep", "sweep_passes", "fingerprint"]

logger = logging.getLogger(__name__)


def sweep_passes(cfg) -> List[ThreatSpec]:
    """The passes of a sweep, in order (:func:`upsnet_robust.threats.expand_threats`)."""
    return expand_threats(cfg)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_files(h, path: str) -> bool:
    """Feed the bytes of a file, or of every file of a directory (e.g. one written by
    `transformers`' save_pretrained) in name order, to ``h``; False if ``path`` is neither."""
    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(root, f), path)
            for root, _, names in os.walk(path) for f in names
        )
    elif os.path.isfile(path):
        files = [""]
    else:
        return False
    for name in files:
        h.update(name.encode())
        with open(os.path.join(path, name) if name else path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return True


def fingerprint(cfg, weights: str) -> str:
    """Hash of what determines the model's predictions: model, input and test-data config, and
    the checkpoint's bytes (a weights directory's files; the `transformers` config file)."""
    h = hashlib.sha256()
    for node in ("MODEL", "INPUT"):
        h.update(cfg[node].dump().encode())
    h.update(repr(tuple(cfg.DATASETS.TEST)).encode())
    if not (weights and _hash_files(h, weights)):
        h.update(f"weights:{weights}".encode())
    model_config = cfg.MODEL.get("TRANSFORMERS", {}).get("CONFIG", "")
    if model_config:
        _hash_files(h, model_config)
    return h.hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RobustnessSweep:
    """Runs (or resumes) the configured sweep for one model and returns its cells.

    Args:
        cfg: a config with UPSNetRobust's keys.
        model: the model in eval mode, weights loaded.
        weights (str): the checkpoint path (part of the cache fingerprint).
        output_dir (str): where the cache, results and examples go.
        on_example (callable): ``(pass_spec, input, clean, adv, defended, outputs)`` for the
            first ``ROBUSTNESS.NUM_EXAMPLES`` images of each attacked pass (main process).
        adapter (ModelAdapter): the model's adapter (default: ``build_adapter(cfg, model)``).
        mapper (callable): the test-time dataset mapper (default: the adapter's, else
            detectron2's ``DatasetMapper``), e.g. a LazyConfig's ``dataloader.test.mapper``.
    """

    def __init__(
        self, cfg, model, weights: str, output_dir: str, on_example=None, adapter=None, mapper=None
    ):
        self.cfg = cfg
        self.mapper = mapper
        self.model = model
        self.dataset_name = cfg.DATASETS.TEST[0]
        # Everything that can fail on the config fails here, before data or model work.
        check_dataset_registered(self.dataset_name)
        self.adapter = adapter if adapter is not None else build_adapter(cfg, model)
        self.task = self.adapter.task
        self.passes = expand_threats(cfg)  # the one expansion (shared with Trainer, transfer)
        check_threats(cfg, self.adapter, self.passes)  # each kind checks its own passes
        check_early_stop(cfg)
        self.output_dir = output_dir
        self.on_example = on_example
        self._defense_workers = None
        if cfg.ROBUSTNESS.BATCH_SIZE < 1:
            raise ValueError(f"ROBUSTNESS.BATCH_SIZE must be >= 1, got {cfg.ROBUSTNESS.BATCH_SIZE}")
        amp_dtype(cfg.ROBUSTNESS.AMP)  # fail now on a bad value
        self.cache_root = os.path.join(output_dir, "robustness_cache", fingerprint(cfg, weights))
        self.defense_names = list(OrderedDict.fromkeys(["none"] + list(cfg.ROBUSTNESS.DEFENSES)))
        if "none" not in cfg.ROBUSTNESS.DEFENSES:
            self.defense_names.remove("none")
        self.defenses = OrderedDict(
            (d, None if d == "none" else build_defense_from_cfg(cfg, d)) for d in self.defense_names
        )
        # Fail now, not after hours of passes, on a bad surrogate choice or evaluator.
        for d in OrderedDict.fromkeys(p.adaptive for p in self.passes if p.adaptive):
            self._adaptive_settings(d)
        self._evaluator()
        self._data_digest = None

    # ------------------------------------------------------------------ data
    def _dataset(self) -> List[Dict]:
        dicts = DatasetCatalog.get(self.dataset_name)
        n = self.cfg.ROBUSTNESS.MAX_IMAGES
        return dicts[:n] if n > 0 else dicts

    def _data_key(self) -> str:
        """A hash of the scored images' names (which images a pass covers)."""
        if self._data_digest is None:
            names = [(str(d.get("file_name")), str(d.get("image_id"))) for d in self._dataset()]
            self._data_digest = _sha(json.dumps(names).encode())[:16]
        return self._data_digest

    def _loader(self, objective: Optional[str] = None):
        """The test images through the model's mapper, plus the ground truth ``objective``
        reads (a pass's own objective: a member's may differ from ROBUSTNESS.OBJECTIVE)."""
        mapper = self.mapper or self.adapter.test_mapper(self.cfg)
        mapper = RobustMapper(
            mapper or DatasetMapper(self.cfg, is_train=False),
            panoptic_segments=bool(objective) and objective_needs_segments(objective),
        )
        return build_detection_test_loader(
            self._dataset(),
            mapper=mapper,
            batch_size=self.cfg.ROBUSTNESS.BATCH_SIZE,
            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
        )

    # ------------------------------------------------------------------ passes
    def _context(self, spec: ThreatSpec, pass_dir: Optional[str] = None) -> StepContext:
        cfg = spec.cfg(self.cfg)
        adaptive = AdaptiveSettings.from_config(cfg, spec.adaptive) if spec.adaptive else None
        return StepContext(cfg, self.adapter, self._pass_defenses(spec), adaptive,
                           self.adapter.device, pass_dir)  # fmt: skip

    def _step(self, spec: ThreatSpec, pass_dir: Optional[str] = None):
        """The pass's image step, built by its kind (None: clean images)."""
        return threat_kind(spec.kind).image_step(spec, self._context(spec, pass_dir))

    def _attack(self, spec: ThreatSpec):  # the older name of _step
        return self._step(spec)

    def _pass_defenses(self, spec: ThreatSpec) -> "OrderedDict":
        names = [spec.adaptive] if spec.adaptive else self.defense_names
        return OrderedDict((d, self.defenses[d]) for d in names)

    def _adaptive_settings(self, defense: str) -> Dict:
        """Surrogate description and EOT samples of an adaptive pass against ``defense``."""
        r = self.cfg.ROBUSTNESS
        transform = self.defenses[defense]
        return {
            "defense": defense,
            "surrogate": describe_surrogates(transform, r.BPDA_SURROGATE),
            "eot_samples": eot_samples_for(transform, r.EOT_SAMPLES),
        }

    def _pass_key(self, spec: ThreatSpec, attack=None) -> str:
        """The pass's cache directory name: its kind's tag and a hash of its kind's cache key
        (``attack``: unused, kept for older callers) plus the settings every pass shares."""
        r = self.cfg.ROBUSTNESS
        kind = threat_kind(spec.kind)
        desc = {
            "kind": spec.kind,
            "threat": kind.cache_key(spec.cfg(self.cfg), spec),
            "objective": spec.objective,
            "quantize": r.QUANTIZE,
            "seed": r.SEED,
            "amp": r.AMP,
            "defenses": self.defense_names,
            "defense_cfg": self.cfg.DEFENSE.dump(),
            "images": r.MAX_IMAGES,
            "data": self._data_key(),
        }
        adaptive = spec.adaptive
        if adaptive:  # the defense the attack sees, with its surrogate and EOT samples
            desc["defenses"] = [adaptive]
            desc["adaptive"] = self._adaptive_settings(adaptive)
        digest = _sha(json.dumps(desc, sort_keys=True, default=str).encode())[:10]
        tag = f"_adaptive-{_safe(adaptive)}" if adaptive else ""
        return f"{_safe(kind.tag(spec))}{tag}_{digest}"

    def _evaluator(self):
        """The task's evaluator on the test set (COCO-format conversions cached once)."""
        folder = os.path.join(self.output_dir, "inference")
        os.makedirs(folder, exist_ok=True)
        return build_task_evaluator(self.dataset_name, self.task, folder, per_image_stats=True)

    def run(self) -> List[Dict]:
        workers = self.cfg.ROBUSTNESS.DEFENSE_WORKERS
        needs = any(DefenseWorkers.accepts(t) for t in self.defenses.values())
        self._defense_workers = DefenseWorkers(workers) if workers > 0 and needs else None
        try:
            return self._run_passes()
        finally:
            if self._defense_workers is not None:
                self._defense_workers.close()
                self._defense_workers = None

    def _stats_file(self, spec: ThreatSpec) -> Optional[str]:
        """The per-image statistics file a combining kind reads from its members' passes."""
        return getattr(threat_kind(spec.kind), "stats_files", {}).get(self.task)

    def _run_passes(self) -> List[Dict]:
        passes = self.passes
        combining = {k.name for k in kinds() if k.combines}
        keys = [None if p.kind in combining else self._pass_key(p) for p in passes]
        # passes whose per-image statistics a combining kind reads (a plain pass may be one too)
        needs = {}
        for p in passes:
            for m in p.members if p.kind in combining else ():
                needs[self._pass_key(m)] = self._stats_file(p)
        cells, by_key = [], {}
        for index, (spec, key) in enumerate(zip(passes, keys)):
            label = f"[{index + 1}/{len(passes)}] {key or spec.name}"
            if spec.kind in combining:
                cells += self._combined_cells(spec, by_key, label)
                continue
            if key in by_key:  # equal to a pass listed before (same key): its cells serve both
                for c in by_key[key]:
                    both = c.get("member_of", []) + list(spec.member_of)
                    if both:
                        c["member_of"] = list(dict.fromkeys(both))
                continue
            pass_cells = self._load_or_run(spec, key, label, needs.get(key))
            if spec.member_of:
                pass_cells = [dict(c, member_of=list(spec.member_of)) for c in pass_cells]
            by_key[key] = pass_cells
            cells += pass_cells
        return cells

    def _load_or_run(self, spec, key: str, label: str, stats: Optional[str]) -> List[Dict]:
        """A pass's cells: stored ones, else run (or resumed) and stored. A member pass stored
        without per-image statistics (``stats``, before they existed) is re-scored from its
        cached images."""
        pass_dir = os.path.join(self.cache_root, key)
        done = os.path.join(pass_dir, "cells.json")
        lacks = bool(stats) and not os.path.isfile(os.path.join(pass_dir, stats))
        if os.path.isfile(done) and not lacks:
            logger.info("%s: finished earlier, loading %s", label, done)
            with open(done) as f:
                return json.load(f)
        logger.info("%s: %s", label, "re-scoring for per-image statistics" if lacks else "running")
        pass_cells = self._run_pass(spec, pass_dir)
        if comm.is_main_process():
            atomic_json(done, pass_cells)
        comm.synchronize()
        return pass_cells

    def _combined_cells(self, spec: ThreatSpec, by_key: Dict, label: str) -> List[Dict]:
        """A combining kind's cells (main process), from its member passes' stored per-image
        statistics; what it selected is kept in its own directory for inspection."""
        if not comm.is_main_process():
            return []
        members, keys = [], []
        for member in spec.members:
            key = self._pass_key(member)
            keys.append(key)
            members.append((member, os.path.join(self.cache_root, key), by_key[key]))
        kind = threat_kind(spec.kind)
        digest = _sha(json.dumps([kind.cache_key(self.cfg, spec), keys]).encode())[:10]
        directory = os.path.join(self.cache_root, f"{_safe(kind.tag(spec))}_{digest}")
        cells = kind.combine(spec, members, self.task, directory)
        cells = [ResultCell.from_dict(c).to_dict() for c in cells]  # typed: fails on a bad field
        logger.info("%s: combined %d member passes, kept in %s", label, len(members), directory)
        return cells

    def _run_pass(self, spec: ThreatSpec, pass_dir: str) -> List[Dict]:
        defenses = self._pass_defenses(spec)
        context = self._context(spec, pass_dir)
        cfg = context.cfg
        kind = threat_kind(spec.kind)
        kind.prepare(cfg, spec, context, pass_dir)
        step = self._step(spec, pass_dir)
        wrapper = AdversarialInference(
            cfg,
            self.adapter,
            step,
            defenses,
            adaptive_defense=spec.adaptive,
            cache_dir=pass_dir,
            on_image=self._example_hook(spec, step),
            defense_workers=self._defense_workers,
            output_keys=(self.task,),  # what the evaluators (and the example grids) read
        )
        evaluator = MultiVariantEvaluator({d: self._evaluator() for d in defenses})
        needs_objective = step is not None and step.needs_objective
        results = inference_on_dataset(
            wrapper, self._loader(spec.objective if needs_objective else None), evaluator
        )
        records = [rec for part in comm.all_gather(wrapper.records) for rec in part]
        if not comm.is_main_process():
            return []
        # per-image PQ sums of each defense (panoptic tasks): kept beside the pass's cells
        stats = {
            d: results[d].pop("panoptic_stats")
            for d in defenses
            if "panoptic_stats" in (results.get(d) or {})
        }
        if stats:
            save_image_stats(pass_dir, stats)
        # per-image confusion matrices of each defense (semantic tasks), likewise
        confusion = {
            d: results[d].pop("sem_seg_stats")
            for d in defenses
            if "sem_seg_stats" in (results.get(d) or {})
        }
        if confusion:
            save_confusion_stats(pass_dir, confusion)
        return self._cells(spec, step, results, records, stats)

    def _example_hook(self, spec: ThreatSpec, step):
        if self.on_example is None or step is None or not comm.is_main_process():
            return None
        budget = {"left": self.cfg.ROBUSTNESS.NUM_EXAMPLES}
        # a distinct name per pass for the grids (writers name files by attack, eps)
        spec = spec.replace(name=_safe(threat_kind(spec.kind).example_name(spec)))

        def hook(x, clean, adv, defended, outputs):
            if budget["left"] > 0:
                budget["left"] -= 1
                self.on_example(spec, x, clean, adv, defended, outputs)

        return hook

    def _cells(self, spec: ThreatSpec, step, results, records, stats=None) -> List[Dict]:
        """One cell per scored defense: the kind's fields, then metrics, times and counts;
        ``stats``: the pass's per-image PQ sums per defense, for each cell's ``breakdown``."""
        ok = [rec for rec in records if rec["failure"] is None]
        fields = threat_kind(spec.kind).cell_fields(spec, step)
        threat = fields.pop("threat", None)
        cells = []
        for d in self._pass_defenses(spec):
            cell = {
                "model": self.adapter.meta_architecture,
                "task": self.task,
                "metric": self.adapter.headline_metric,
                **fields,
                "defense": d,
                "adaptive": bool(spec.adaptive),
                "quantized": bool(self.cfg.ROBUSTNESS.QUANTIZE),
                **headline_results(self.task, results.get(d, {})),
                "attack_s_per_image": _mean([rec["attack_s"] for rec in ok]),
                # forward+backward passes per image (fewer than the steps with early stopping)
                "attack_passes_per_image": _mean([rec.get("attack_passes", 0) for rec in ok]),
                "defense_s_per_image": _mean([rec["defense_s"][d] for rec in ok]),
                "num_images": len(ok),
                "num_failed": len(records) - len(ok),
                "failures": [
                    {"image_id": rec["image_id"], "reason": rec["failure"]}
                    for rec in records
                    if rec["failure"] is not None
                ],
            }
            losses = [rec["attack_loss"] for rec in ok if rec.get("attack_loss") is not None]
            if ok and len(losses) == len(ok):  # mean objective value at the adversarial images
                cell["attack_loss"] = _mean(losses)
            if spec.adaptive:
                settings = self._adaptive_settings(spec.adaptive)
                cell["surrogate"] = settings["surrogate"]
                cell["eot_samples"] = settings["eot_samples"]
                # seconds of real defense forwards inside the attack (included in attack_s)
                cell["attack_defense_s_per_image"] = _mean(
                    [rec.get("attack_defense_s", 0.0) for rec in ok]
                )
            breakdown = cell_breakdown(self.task, results.get(d), (stats or {}).get(d))
            if breakdown is not None:
                cell["breakdown"] = breakdown
            if threat is not None:
                cell["threat"] = threat
            cells.append(ResultCell.from_dict(cell).to_dict())  # typed: fails on a bad field
        return cells


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else 0.0
