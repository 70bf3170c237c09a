# Copyright (c) UPSNetRobust authors.
"""Evaluators for robustness sweeps: one pass scored under several defenses, and PQ over
exactly the images that were scored (subsets, skipped images)."""
import contextlib
import copy
import functools
import itertools
import json
import logging
import multiprocessing
import os
import tempfile
from collections import OrderedDict
from typing import Dict

from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    SemSegEvaluator,
)
from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from .image_cache import FAILED_KEY
from .panoptic_stats import image_panoptic_stats, load_panoptic_gt, panoptic_ids_from_png
from .semantic_stats import sparse_confusion

__all__ = [
    "MultiVariantEvaluator",
    "PanopticSubsetEvaluator",
    "PanopticSemSegEvaluator",
    "LabelSemSegEvaluator",
    "PerImageSemSegEvaluator",
    "InstanceSubsetEvaluator",
    "build_task_evaluator",
    "headline_results",
]

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


def _ground_truth_ids(path: str):
    """The ground-truth panoptic ids of ``path``, decoded once for the evaluators of all the
    defenses that score the same image one after another (read-only; a rewritten file, with
    another modification time or size, is decoded again)."""
    st = os.stat(path)
    return _decoded_ids(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _decoded_ids(path: str, mtime_ns: int, size: int):
    with open(path, "rb") as f:
        ids = panoptic_ids_from_png(f.read())
    ids.setflags(write=False)
    return ids


class PanopticSubsetEvaluator(COCOPanopticEvaluator):
    """detectron2's COCOPanopticEvaluator, restricted to the images it was given.

    panopticapi's ``pq_compute`` requires a prediction for every image of the ground-truth JSON;
    a sweep over ``ROBUSTNESS.MAX_IMAGES`` images, or with images skipped for a recorded reason,
    has fewer. This writes a ground-truth JSON holding just the scored images and evaluates
    against it; the scoring itself is detectron2's and panopticapi's, unchanged.

    With ``per_image_stats``, each image's PQ sums (:mod:`.panoptic_stats`) are computed as it
    is processed and returned, gathered from every process, under ``"panoptic_stats"``:
    ``{"images": {image_id: PanopticStats}, "categories": {id: category}}`` (the sweep's size,
    class and worst-case computations read them).
    """

    def __init__(self, dataset_name, output_dir=None, per_image_stats: bool = False):
        super().__init__(dataset_name, output_dir)
        self._per_image_stats = per_image_stats
        self._gt = None
        self._image_stats = {}

    def reset(self):
        super().reset()
        self._image_stats = {}

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        if not self._per_image_stats:
            return
        if self._gt is None:
            self._gt = load_panoptic_gt(self._metadata.panoptic_json)
        for p in self._predictions[start:]:
            ann = self._gt["annotations"].get(p["image_id"])
            if ann is None:
                raise KeyError(
                    f"image {p['image_id']!r} is not in {self._metadata.panoptic_json}"
                )
            gt_ids = _ground_truth_ids(os.path.join(self._metadata.panoptic_root, ann["file_name"]))
            pred_ids = panoptic_ids_from_png(p["png_string"])
            stats = image_panoptic_stats(gt_ids, ann["segments_info"], pred_ids, p["segments_info"])
            self._image_stats[p["image_id"]] = stats

    def _gathered_stats(self):
        images = {}
        for part in comm.all_gather(self._image_stats):
            images.update(part)
        if self._gt is None:
            self._gt = load_panoptic_gt(self._metadata.panoptic_json)
        return {"images": images, "categories": self._gt["categories"]}

    def evaluate(self):
        comm.synchronize()
        scored = set(itertools.chain(*comm.all_gather([p["image_id"] for p in self._predictions])))
        stats = self._gathered_stats() if self._per_image_stats else None
        if not scored:  # every rank knows: no collective call is left waiting
            logger.warning("No image was scored; PQ is undefined.")
            return OrderedDict({"panoptic_seg": {}}) if comm.is_main_process() else None
        if not comm.is_main_process():
            return super().evaluate()
        results = self._evaluate_subset(scored)
        if stats is not None and results is not None:
            results["panoptic_stats"] = stats
        return results

    def _evaluate_subset(self, scored):
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


class _ArgmaxOf:
    """A label map answering SemSegEvaluator's ``output["sem_seg"].argmax(dim=0)`` with itself,
    so cached (H, W) labels are scored without rebuilding (C, H, W) logits."""

    def __init__(self, labels):
        self._labels = labels

    def argmax(self, dim=0):
        return self._labels


class LabelSemSegEvaluator(SemSegEvaluator):
    """detectron2's SemSegEvaluator (mIoU, fwIoU, mACC, pACC) accepting ``sem_seg`` as (C, H, W)
    logits, as usual, or as an (H, W) label map (the sweep's cached form)."""

    def process(self, inputs, outputs):
        outputs = [
            dict(o, sem_seg=_ArgmaxOf(o["sem_seg"])) if o["sem_seg"].dim() == 2 else o
            for o in outputs
        ]
        super().process(inputs, outputs)


class PerImageSemSegEvaluator(LabelSemSegEvaluator):
    """LabelSemSegEvaluator that, with ``per_image_stats``, also keeps each image's confusion
    matrix: the increment the image adds to detectron2's own matrix, so their sum is the
    matrix detectron2 scores. They are returned, gathered from every process, under
    ``"sem_seg_stats"``: ``{"images": {image_id: sparse (n, 3)}, "num_classes": K}``
    (:mod:`.semantic_stats`; the ``sea`` worst case reads them)."""

    def __init__(self, dataset_name, *args, per_image_stats: bool = False, **kwargs):
        self._per_image_stats = per_image_stats
        self._image_conf = {}
        super().__init__(dataset_name, *args, **kwargs)

    def reset(self):
        super().reset()
        self._image_conf = {}

    def process(self, inputs, outputs):
        if not self._per_image_stats:
            return super().process(inputs, outputs)
        for x, o in zip(inputs, outputs):
            before = self._conf_matrix.copy()
            super().process([x], [o])
            key = x.get("image_id", os.path.basename(x["file_name"]))
            self._image_conf[key] = sparse_confusion((self._conf_matrix - before)[:-1, :-1])

    def evaluate(self):
        stats = None
        if self._per_image_stats:  # every process gathers (a collective call), then scores
            images = {}
            for part in comm.all_gather(self._image_conf):
                images.update(part)
            stats = {"images": images, "num_classes": self._num_classes}
        results = super().evaluate()
        if results is not None and stats is not None:
            results["sem_seg_stats"] = stats
        return results


class InstanceSubsetEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator (box and mask AP) over the images it was given: COCO's
    evaluation would count every unscored image of the data set as all misses."""

    def evaluate(self, img_ids=None):
        scored = list(
            itertools.chain(*comm.all_gather([p["image_id"] for p in self._predictions]))
        )
        return super().evaluate(img_ids=img_ids if img_ids is not None else scored)


class PanopticSemSegEvaluator(PerImageSemSegEvaluator):
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
    """Routes ``{variant: output}`` per image (the attack hook's output) to one evaluator per
    variant (e.g. per defense), so one adversarial batch is scored under every defense. Images
    whose output is ``{FAILED_KEY: reason}`` are counted, not scored.

    ``evaluate()`` returns ``{variant: that evaluator's results, "failures": [{image_id,
    reason}]}`` on the main process."""

    def __init__(self, evaluators: Dict[str, DatasetEvaluator]):
        self._evaluators = OrderedDict(evaluators)
        self._failed = []

    def reset(self):
        self._failed = []
        for e in self._evaluators.values():
            e.reset()

    def process(self, inputs, outputs):
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


_PANOPTIC_TYPES = ("coco_panoptic_seg", "cityscapes_panoptic_seg")
_SEM_SEG_TYPES = ("sem_seg", "cityscapes_sem_seg")
_INSTANCE_TYPES = ("coco", "cityscapes_instance", "lvis")


def build_task_evaluator(
    dataset_name: str, task: str, output_dir=None, per_image_stats: bool = False
) -> DatasetEvaluator:
    """The evaluator of ``task`` ("panoptic_seg", "sem_seg", "instances") on a data set, chosen
    the detectron2 way from its metadata's ``evaluator_type``. Cityscapes' own semantic and
    instance evaluators are replaced by detectron2's generic ones (SemSegEvaluator,
    COCOEvaluator), which score the same predictions on any number of processes.
    ``per_image_stats``: panoptic and semantic evaluators also return per-image statistics
    (``"panoptic_stats"``, ``"sem_seg_stats"``) beside their metrics.

    Raises:
        ValueError: the data set cannot score that task, naming both and what would.
    """
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    if task == "panoptic_seg" and kind in _PANOPTIC_TYPES:
        return PanopticSubsetEvaluator(dataset_name, output_dir, per_image_stats=per_image_stats)
    if task == "sem_seg" and kind in _SEM_SEG_TYPES:
        return PerImageSemSegEvaluator(
            dataset_name, distributed=True, output_dir=output_dir, per_image_stats=per_image_stats
        )
    if task == "sem_seg" and kind in _PANOPTIC_TYPES and meta.get("stuff_classes", None):
        return PanopticSemSegEvaluator(
            dataset_name, distributed=True, output_dir=output_dir, per_image_stats=per_image_stats
        )
    if task == "instances" and kind in _INSTANCE_TYPES:
        return InstanceSubsetEvaluator(dataset_name, distributed=True, output_dir=output_dir)
    wanted = {"panoptic_seg": _PANOPTIC_TYPES, "sem_seg": _SEM_SEG_TYPES + _PANOPTIC_TYPES,
              "instances": _INSTANCE_TYPES}.get(task)
    raise ValueError(
        f"Data set {dataset_name!r} has evaluator_type {kind!r}, which cannot score the model's "
        f"task {task!r}; a {task} model needs a data set of evaluator_type "
        f"{' / '.join(wanted) if wanted else '?'} (DATASETS.TEST)"
    )


def headline_results(task: str, results: Dict) -> Dict:
    """The metrics of one evaluator's results under detectron2's names, flat: PQ, SQ, RQ, PQ_th,
    PQ_st ...; mIoU, fwIoU, mACC, pACC; AP, AP50, ... (mask AP when masks were scored, else box
    AP). Empty when nothing was scored."""
    results = results or {}
    if task == "instances":
        res = results.get("segm") or results.get("bbox") or {}
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    elif task == "sem_seg":
        res = results.get("sem_seg", {})
        keys = ("mIoU", "fwIoU", "mACC", "pACC")
    else:
        res = results.get("panoptic_seg", {})
        keys = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")
    return {k: (None if res.get(k) is None or _isnan(res[k]) else float(res[k])) for k in keys}


def _isnan(value) -> bool:
    try:
        return value != value
    except Exception:  # noqa: BLE001
        return False
