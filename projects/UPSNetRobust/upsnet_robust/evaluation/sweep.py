# Copyright (c) UPSNetRobust authors.
"""The robustness sweep: attacks x eps x defenses, plus clean cells, with resume.

Each *pass* (clean, or one attack at one eps) computes its adversarial images once and scores
them under every defense of ``ROBUSTNESS.DEFENSES`` (one cell per defense). With
``ROBUSTNESS.ADAPTIVE``, each attack x eps also gets one *adaptive pass* per defense other than
"none": the attack runs against ``model o defense`` (BPDA with ``ROBUSTNESS.BPDA_SURROGATE``, EOT
with ``ROBUSTNESS.EOT_SAMPLES`` masks for TVM) and its images are scored with that defense only
(one cell, ``"adaptive": true``). The ensembles ``sea`` and ``sea_fast`` run one member pass per
member of ``ROBUSTNESS.SEA`` and then select, per image, the member that lowers the data set's
metric most (:mod:`.sweep_passes`, :mod:`.ensemble`). Finished images are
cached per pass, finished passes store their cells; both live under a directory keyed by a
fingerprint of the model config and the checkpoint's bytes, and each pass's directory by a hash
of its attack, objective, defense and data settings, so a changed config or checkpoint never
reuses stale work while unrelated additions (a new eps) keep what is done.
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
from ..attacks import build_attack
from ..defenses import build_defense_from_cfg
from ..defenses.bpda import describe_surrogates, eot_samples_for
from ..defenses.workers import DefenseWorkers
from ..utils.io import atomic_json
from .adversarial_inference import AdversarialInference
from .breakdown import cell_breakdown
from .checks import check_dataset_registered, check_early_stop, check_ensembles, check_sweep_attacks
from .evaluators import MultiVariantEvaluator, build_task_evaluator, headline_results
from .hook_settings import amp_dtype
from .panoptic_stats import save_image_stats
from .robust_mapper import RobustMapper, objective_needs_segments
from .sea_cells import STATS_FILES, ensemble_cells, save_selection
from .semantic_stats import save_confusion_stats
from .sweep_passes import (
    CLEAN,
    ENSEMBLES,
    adaptive_defense_names,
    member_tag,
    spec_cfg,
    sweep_passes,
)

__all__ = ["RobustnessSweep", "sweep_passes", "fingerprint"]  # sweep_passes: re-exported

logger = logging.getLogger(__name__)

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
        check_sweep_attacks(
            self.adapter, cfg.ROBUSTNESS.ATTACKS, cfg.ROBUSTNESS.OBJECTIVE, (CLEAN, *ENSEMBLES)
        )
        check_ensembles(self.adapter, cfg)  # members, their steps and the model's task
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
        for d in adaptive_defense_names(cfg):
            self._adaptive_settings(d)
        self._evaluator()

    # ------------------------------------------------------------------ data
    def _dataset(self) -> List[Dict]:
        dicts = DatasetCatalog.get(self.dataset_name)
        n = self.cfg.ROBUSTNESS.MAX_IMAGES
        return dicts[:n] if n > 0 else dicts

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
    def _attack(self, spec: Dict):
        if spec["attack"] == CLEAN:
            return None
        return build_attack(spec_cfg(self.cfg, spec), spec["attack"], spec["eps"])

    def _adaptive_settings(self, defense: str) -> Dict:
        """Surrogate description and EOT samples of an adaptive pass against ``defense``."""
        r = self.cfg.ROBUSTNESS
        transform = self.defenses[defense]
        return {
            "defense": defense,
            "surrogate": describe_surrogates(transform, r.BPDA_SURROGATE),
            "eot_samples": eot_samples_for(transform, r.EOT_SAMPLES),
        }

    def _pass_key(self, spec: Dict, attack) -> str:
        r = self.cfg.ROBUSTNESS
        adaptive = spec.get("adaptive")
        desc = {
            "attack": attack.describe() if attack is not None else CLEAN,
            "objective": self._objective(attack, spec),
            "quantize": r.QUANTIZE,
            "seed": r.SEED,
            "defenses": self.defense_names,
            "defense_cfg": self.cfg.DEFENSE.dump(),
            "images": r.MAX_IMAGES,
        }
        if r.AMP:  # only when on: full-precision passes keep their earlier keys (and caches)
            desc["amp"] = r.AMP
        if adaptive:
            # Only adaptive passes carry these keys: defense-unaware passes keep their old keys
            # (and caches). EOT masks derive from the seed, part of desc already.
            desc["defenses"] = [adaptive]
            desc["adaptive"] = self._adaptive_settings(adaptive)
        digest = _sha(json.dumps(desc, sort_keys=True, default=str).encode())[:10]
        tag = f"_adaptive-{_safe(adaptive)}" if adaptive else ""
        return f"{spec['attack']}_eps{spec['eps']:g}{tag}_{digest}"

    def _objective(self, attack, spec: Optional[Dict] = None) -> Optional[str]:
        if attack is None:
            return None
        objective = spec_cfg(self.cfg, spec or {}).ROBUSTNESS.OBJECTIVE  # a member's own
        return getattr(attack, "required_objective", None) or objective

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

    def _run_passes(self) -> List[Dict]:
        passes = sweep_passes(self.cfg)
        keys = [None if p.get("ensemble") else self._pass_key(p, self._attack(p)) for p in passes]
        # passes whose per-image statistics an ensemble reads (a plain pass may be one too)
        member_keys = {k for p, k in zip(passes, keys) if p.get("member_of")}
        cells, by_key = [], {}
        for index, (spec, key) in enumerate(zip(passes, keys)):
            label = f"[{index + 1}/{len(passes)}] {key or spec['attack']}"
            if spec.get("ensemble"):
                cells += self._ensemble_cells(spec, by_key, label)
                continue
            if key in by_key:  # equal to a pass listed before (same key): its cells serve both
                for c in by_key[key]:
                    both = c.get("member_of", []) + spec.get("member_of", [])
                    if both:
                        c["member_of"] = list(dict.fromkeys(both))
                continue
            pass_cells = self._load_or_run(spec, key, label, key in member_keys)
            if spec.get("member_of"):
                pass_cells = [dict(c, member_of=list(spec["member_of"])) for c in pass_cells]
            by_key[key] = pass_cells
            cells += pass_cells
        return cells

    def _load_or_run(self, spec: Dict, key: str, label: str, needs_stats: bool) -> List[Dict]:
        """A pass's cells: stored ones, else run (or resumed) and stored. A member pass stored
        without per-image statistics (before they existed) is re-scored from its cached images."""
        pass_dir = os.path.join(self.cache_root, key)
        done = os.path.join(pass_dir, "cells.json")
        stats = STATS_FILES.get(self.task)
        lacks = needs_stats and stats and not os.path.isfile(os.path.join(pass_dir, stats))
        if os.path.isfile(done) and not lacks:
            logger.info("%s: finished earlier, loading %s", label, done)
            with open(done) as f:
                return json.load(f)
        logger.info("%s: %s", label, "re-scoring for per-image statistics" if lacks else "running")
        pass_cells = self._run_pass(spec, self._attack(spec), pass_dir)
        if comm.is_main_process():
            atomic_json(done, pass_cells)
        comm.synchronize()
        return pass_cells

    def _ensemble_cells(self, spec: Dict, by_key: Dict, label: str) -> List[Dict]:
        """The ensemble's cells (main process), selected from its member passes' stored
        per-image statistics; the selection is kept in its own directory for inspection."""
        if not comm.is_main_process():
            return []
        members, keys = [], []
        for member in spec["members"]:
            key = self._pass_key(member, self._attack(member))
            keys.append(key)
            members.append((member, os.path.join(self.cache_root, key), by_key[key]))
        cells, selections = ensemble_cells(spec, members, self.task)
        digest = _sha(json.dumps(keys).encode())[:10]
        directory = os.path.join(self.cache_root, f"{spec['attack']}_eps{spec['eps']:g}_{digest}")
        save_selection(directory, self.task, selections)
        logger.info("%s: worst case over %d members, kept in %s", label, len(members), directory)
        return cells

    def _run_pass(self, spec: Dict, attack, pass_dir: str) -> List[Dict]:
        adaptive = spec.get("adaptive")
        defense_names = [adaptive] if adaptive else self.defense_names
        wrapper = AdversarialInference(
            spec_cfg(self.cfg, spec),
            self.adapter,
            attack,
            OrderedDict((d, self.defenses[d]) for d in defense_names),
            adaptive_defense=adaptive,
            cache_dir=pass_dir,
            on_image=self._example_hook(spec),
            defense_workers=self._defense_workers,
            output_keys=(self.task,),  # what the evaluators (and the example grids) read
        )
        evaluator = MultiVariantEvaluator({d: self._evaluator() for d in defense_names})
        loader = self._loader(self._objective(attack, spec))
        results = inference_on_dataset(wrapper, loader, evaluator)
        records = [rec for part in comm.all_gather(wrapper.records) for rec in part]
        if not comm.is_main_process():
            return []
        # per-image PQ sums of each defense (panoptic tasks): kept beside the pass's cells
        stats = {
            d: results[d].pop("panoptic_stats")
            for d in defense_names
            if "panoptic_stats" in (results.get(d) or {})
        }
        if stats:
            save_image_stats(pass_dir, stats)
        # per-image confusion matrices of each defense (semantic tasks), likewise
        confusion = {
            d: results[d].pop("sem_seg_stats")
            for d in defense_names
            if "sem_seg_stats" in (results.get(d) or {})
        }
        if confusion:
            save_confusion_stats(pass_dir, confusion)
        return self._cells(spec, attack, results, records, stats)

    def _example_hook(self, spec: Dict):
        if self.on_example is None or spec["attack"] == CLEAN or not comm.is_main_process():
            return None
        budget = {"left": self.cfg.ROBUSTNESS.NUM_EXAMPLES}
        if spec.get("adaptive"):
            # A distinct name for the adaptive pass's grids (writers name files by attack, eps).
            spec = dict(spec, attack=f"{spec['attack']}-adaptive-{_safe(spec['adaptive'])}")
        elif spec.get("member_of"):  # a member's grids, apart from a plain pass of its attack
            spec = dict(spec, attack=member_tag(spec))

        def hook(x, clean, adv, defended, outputs):
            if budget["left"] > 0:
                budget["left"] -= 1
                self.on_example(spec, x, clean, adv, defended, outputs)

        return hook

    def _cells(self, spec, attack, results, records, stats=None) -> List[Dict]:
        """One cell per scored defense; ``stats``: the pass's per-image PQ sums per defense
        (panoptic), from which each cell's ``breakdown`` is built."""
        ok = [rec for rec in records if rec["failure"] is None]
        desc = attack.describe() if attack is not None else {}
        adaptive = spec.get("adaptive")
        cells = []
        for d in [adaptive] if adaptive else self.defense_names:
            metrics = headline_results(self.task, results.get(d, {}))
            cell = {
                "model": self.adapter.meta_architecture,
                "task": self.task,
                "metric": self.adapter.headline_metric,
                "attack": spec["attack"],
                "objective": self._objective(attack, spec),
                "eps": spec["eps"],
                "num_steps": int(desc.get("num_steps", 0) or 0),
                "step_size": float(desc.get("step_size", 0.0) or 0.0),
                "random_start": bool(desc.get("random_start", False)),
                "restarts": int(desc.get("restarts", 1) or 1),
                "defense": d,
                "adaptive": bool(adaptive),
                "quantized": bool(self.cfg.ROBUSTNESS.QUANTIZE),
                **metrics,
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
            if adaptive:
                settings = self._adaptive_settings(adaptive)
                cell["surrogate"] = settings["surrogate"]
                cell["eot_samples"] = settings["eot_samples"]
                # seconds of real defense forwards inside the attack (included in attack_s)
                cell["attack_defense_s_per_image"] = _mean(
                    [rec.get("attack_defense_s", 0.0) for rec in ok]
                )
            breakdown = cell_breakdown(self.task, results.get(d), (stats or {}).get(d))
            if breakdown is not None:
                cell["breakdown"] = breakdown
            cells.append(cell)
        return cells


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else 0.0
