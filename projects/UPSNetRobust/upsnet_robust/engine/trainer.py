# Copyright (c) UPSNetRobust authors.
"""The UPSNetRobust trainer: detectron2's DefaultTrainer with UPSNet's data, evaluators and a
safe checkpointer, and multi-process training on CPU."""
import contextlib
import logging
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm

from ..attacks import build_attack
from ..data import build_panoptic_mapper
from ..evaluation import AdversarialInference, PanopticSemSegEvaluator
from ..evaluation.sweep import amp_dtype
from ..modeling import UPSNetCheckpointer

__all__ = ["Trainer", "build_checkpointer"]

logger = logging.getLogger(__name__)

_PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "cityscapes_panoptic_seg")


def build_checkpointer(cfg, model, save_dir="", **kwargs) -> UPSNetCheckpointer:
    """A checkpointer honouring ``MODEL.UNSAFE_LOAD_CHECKPOINT``."""
    return UPSNetCheckpointer(
        model, save_dir, allow_unsafe=cfg.MODEL.UNSAFE_LOAD_CHECKPOINT, **kwargs
    )


@contextlib.contextmanager
def _ddp_without_device_ids_on_cpu(device: str):
    """DefaultTrainer passes ``device_ids=[local_rank]`` to DDP, which DDP rejects for CPU
    modules. While the trainer is built on CPU, make its DDP wrapper omit them."""
    if torch.device(device).type != "cpu":
        yield
        return
    original = d2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer for UPSNet: panoptic data mapper, PQ (+ mIoU) evaluation, safe loading."""

    def __init__(self, cfg):
        with _ddp_without_device_ids_on_cpu(cfg.MODEL.DEVICE):
            super().__init__(cfg)
        self.checkpointer = build_checkpointer(
            cfg, self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """PQ/SQ/RQ with detectron2's COCOPanopticEvaluator, plus mIoU when semantic GT exists."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = meta.get("evaluator_type", None)
        if evaluator_type not in _PANOPTIC_EVALUATOR_TYPES:
            raise NotImplementedError(
                f"No evaluator for dataset {dataset_name} of evaluator_type {evaluator_type}; "
                f"UPSNetRobust evaluates panoptic data sets ({', '.join(_PANOPTIC_EVALUATOR_TYPES)})"
            )
        evaluators = [COCOPanopticEvaluator(dataset_name, output_folder)]
        if cfg.TEST.SEM_SEG_EVAL:
            evaluators.append(
                PanopticSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
            )
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_panoptic_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=build_panoptic_mapper(cfg, is_train=False)
        )

    def build_hooks(self):
        """detectron2's hooks, plus attacked evaluation every ROBUSTNESS.TRAIN_EVAL_PERIOD
        iterations when it is > 0 (registered on every process, like EvalHook)."""
        ret = super().build_hooks()
        period = self.cfg.ROBUSTNESS.TRAIN_EVAL_PERIOD
        if period > 0:
            ret.insert(-1, hooks.EvalHook(period, lambda: self.test_with_attack(self.cfg, self.model)))
        return ret

    @classmethod
    def test_with_attack(cls, cfg, model, evaluators=None):
        """Score the model under each configured (attack, eps), undefended, with any evaluators.

        Results are keyed like ``test_with_TTA``'s: ``<task>_<attack>_eps<eps>``.
        """
        results = {}
        for dataset_name in cfg.DATASETS.TEST:
            data_loader = cls.build_test_loader(cfg, dataset_name)
            for attack_name in cfg.ROBUSTNESS.ATTACKS:
                for eps in cfg.ROBUSTNESS.EPSILONS:
                    tag = f"{attack_name}_eps{eps:g}"
                    evaluator = evaluators or cls.build_evaluator(
                        cfg, dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference_attack", tag)
                    )
                    wrapper = AdversarialInference(
                        model,
                        attack=build_attack(cfg, attack_name, eps),
                        objective=cfg.ROBUSTNESS.OBJECTIVE,
                        input_format=cfg.INPUT.FORMAT,
                        quantize=cfg.ROBUSTNESS.QUANTIZE,
                        seed=cfg.ROBUSTNESS.SEED,
                        batch_size=cfg.ROBUSTNESS.BATCH_SIZE,
                        amp_dtype=amp_dtype(cfg.ROBUSTNESS.AMP),
                    )
                    res = inference_on_dataset(wrapper, data_loader, evaluator)
                    if comm.is_main_process():
                        logger.info("Attacked (%s) results on %s:", tag, dataset_name)
                        print_csv_format(res)
                    results.update({f"{k}_{tag}": v for k, v in res.items()})
        return results
