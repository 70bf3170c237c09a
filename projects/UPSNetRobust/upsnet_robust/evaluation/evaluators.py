# Copyright (c) UPSNetRobust authors.
"""Evaluators for robustness sweeps: one pass scored under several defenses, and PQ over
exactly the images that were scored (subsets, skipped images)."""
import contextlib
import copy
import itertools
import json
import logging
import multiprocessing
import os
import tempfile
from collections import OrderedDict
from typing import Dict

from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluator, SemSegEvaluator
from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from .adversarial_inference import FAILED_KEY

__all__ = ["MultiVariantEvaluator", "PanopticSubsetEvaluator", "PanopticSemSegEvaluator"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _fork_workers():
    """panopticapi's pq_compute starts a process pool. Under detectron2's launch the ranks use
    "spawn", so each pool worker would re-import torch and detectron2 (seconds per evaluation);
    its workers only run numpy/PIL, so fork them."""
    previous = multiprocessing.get_start_method(allow_none=True)
    if previous in (None, "fork") or "fork" not in multiprocessing.get_all_start_methods():
        yield
        return
    multiprocessing.set_start_method("fork", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(previous, force=True)


class _MetadataOverride:
    """Read-only view of a detectron2 Metadata with some attributes replaced."""

    def __init__(self, metadata, **overrides):
        self._metadata = metadata
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._metadata, name)


class PanopticSubsetEvaluator(COCOPanopticEvaluator):
    """detectron2's COCOPanopticEvaluator, restricted to the images it was given.

    panopticapi's ``pq_compute`` requires a prediction for every image of the ground-truth JSON;
    a sweep over ``ROBUSTNESS.MAX_IMAGES`` images, or with images skipped for a recorded reason,
    has fewer. This writes a ground-truth JSON holding just the scored images and evaluates
    against it; the scoring itself is detectron2's and panopticapi's, unchanged.
    """

    def evaluate(self):
        comm.synchronize()
        scored = set(itertools.chain(*comm.all_gather([p["image_id"] for p in self._predictions])))
        if not scored:  # every rank knows: no collective call is left waiting
            logger.warning("No image was scored; PQ is undefined.")
            return OrderedDict({"panoptic_seg": {}}) if comm.is_main_process() else None
        if not comm.is_main_process():
            return super().evaluate()
        with open(self._metadata.panoptic_json) as f:
            gt = json.load(f)
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in scored]
        gt["images"] = [i for i in gt["images"] if i["id"] in scored]
        with tempfile.TemporaryDirectory(prefix="panoptic_subset") as tmp:
            subset_json = os.path.join(tmp, "gt_subset.json")
            with open(subset_json, "w") as f:
                json.dump(gt, f)
            original = self._metadata
            self._metadata = _MetadataOverride(original, panoptic_json=subset_json)
            try:
                with _fork_workers():
                    return super().evaluate()
            finally:
                self._metadata = original


class PanopticSemSegEvaluator(SemSegEvaluator):
    """detectron2's SemSegEvaluator (mIoU) on a panoptic data set.

    Panoptic metadata maps only stuff ids in ``stuff_dataset_id_to_contiguous_id``; the semantic
    map also holds things, so their ids are added to the evaluator's reverse mapping (used when
    it encodes predictions as JSON)."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        meta = MetadataCatalog.get(dataset_name)
        things = meta.get("thing_dataset_id_to_contiguous_id", {})
        mapping = dict(self._contiguous_id_to_dataset_id or {})
        mapping.update({v: k for k, v in things.items()})
        self._contiguous_id_to_dataset_id = mapping


class MultiVariantEvaluator(DatasetEvaluator):
    """Routes ``{variant: output}`` per image to one evaluator per variant (e.g. per defense),
    so one adversarial batch is scored under every defense. Failed images are counted, not
    scored."""

    def __init__(self, evaluators: Dict[str, DatasetEvaluator]):
        self._evaluators = OrderedDict(evaluators)
        self._failed = []

    def reset(self):
        self._failed = []
        for e in self._evaluators.values():
            e.reset()

    def process(self, inputs, outputs):
        if len(self._evaluators) == 1:  # AdversarialInference returns plain outputs then
            only = next(iter(self._evaluators))
            outputs = [o if FAILED_KEY in o else {only: o} for o in outputs]
        ok = [(i, o) for i, o in zip(inputs, outputs) if FAILED_KEY not in o]
        self._failed += [
            {"image_id": i.get("image_id"), "reason": o[FAILED_KEY]}
            for i, o in zip(inputs, outputs)
            if FAILED_KEY in o
        ]
        if not ok:
            return
        for name, evaluator in self._evaluators.items():
            evaluator.process([i for i, _ in ok], [o[name] for _, o in ok])

    def evaluate(self):
        results = OrderedDict()
        for name, evaluator in self._evaluators.items():
            results[name] = copy.deepcopy(evaluator.evaluate())
        failed = list(itertools.chain(*comm.all_gather(self._failed)))
        if not comm.is_main_process():
            return {}
        results["failures"] = failed
        return results
