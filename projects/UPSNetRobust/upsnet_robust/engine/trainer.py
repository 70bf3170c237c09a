# Copyright (c) UPSNetRobust authors.
"""The UPSNetRobust trainer: detectron2's DefaultTrainer with UPSNet's data, evaluators and a
safe checkpointer, and multi-process training on CPU."""
import contextlib
import copy
import logging
import os
import random
import weakref

import numpy as np
import torch

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import (
    DatasetEvaluators,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm

from ..adapters.base import AdapterInference, adapter_class, build_adapter, unwrap_model
from ..evaluation import AdversarialInference, MultiVariantEvaluator, PanopticSemSegEvaluator
from ..evaluation.checks import check_early_stop
from ..evaluation.evaluators import build_task_evaluator
from ..evaluation.robust_mapper import RobustMapper, objective_needs_segments
from ..modeling import UPSNetCheckpointer
from ..threats import StepContext, check_threats, expand_threats, threat_kind
from .adversarial_training import AdversarialBatches, AdversarialExamples
from .overfitting_guard import OverfittingGuard

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
        if cfg.ADV_TRAIN.ENABLED:
            # every training batch is crafted against the current model before its step
            self._trainer.data_loader = AdversarialBatches(
                self._trainer.data_loader, AdversarialExamples(cfg), weakref.proxy(self)
            )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The model task's evaluator chosen from the data set's ``evaluator_type`` (PQ/SQ/RQ,
        mIoU or AP), plus mIoU beside PQ (``TEST.SEM_SEG_EVAL``) for panoptic models whose
        ``sem_seg`` output uses the data set's classes."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        adapter = adapter_class(cfg.MODEL.META_ARCHITECTURE)
        task = adapter.task_for(cfg)
        evaluators = [build_task_evaluator(dataset_name, task, output_folder)]
        meta = MetadataCatalog.get(dataset_name)
        if (
            task == "panoptic_seg"
            and cfg.TEST.SEM_SEG_EVAL
            and adapter.sem_seg_in_dataset_classes
            and meta.get("evaluator_type", None) in _PANOPTIC_EVALUATOR_TYPES
        ):
            evaluators.append(
                PanopticSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
            )
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW (``SOLVER.OPTIMIZER "ADAMW"``, as transformer models such
        as Mask2Former are trained) with the same parameter groups and gradient clipping."""
        if cfg.SOLVER.OPTIMIZER.upper() != "ADAMW":
            return super().build_optimizer(cfg, model)
        from detectron2.solver.build import (
            get_default_optimizer_params,
            maybe_add_gradient_clipping,
        )

        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = torch.optim.AdamW(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        # the model's adapter knows the mapper that builds its targets (None: detectron2's)
        mapper = adapter_class(cfg.MODEL.META_ARCHITECTURE).train_mapper(cfg)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = adapter_class(cfg.MODEL.META_ARCHITECTURE).test_mapper(cfg)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_attack_loader(cls, cfg, dataset_name, objective=None):
        """The test loader of attacked evaluation: the adapter's test mapper plus the ground
        truth the pass's ``objective`` reads (e.g. the panoptic segments of ``segment``;
        default ROBUSTNESS.OBJECTIVE)."""
        mapper = adapter_class(cfg.MODEL.META_ARCHITECTURE).test_mapper(cfg)
        objective = cfg.ROBUSTNESS.OBJECTIVE if objective is None else objective
        mapper = RobustMapper(
            mapper or DatasetMapper(cfg, is_train=False),
            panoptic_segments=bool(objective) and objective_needs_segments(objective),
        )
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test, with predictions mapped to the data set's ids by the model's
        adapter (a model with its own label convention, like PanopticFPN, scores correctly)."""
        return super().test(cfg, AdapterInference(build_adapter(cfg, model)), evaluators)

    def build_hooks(self):
        """detectron2's hooks, plus attacked evaluation every ROBUSTNESS.TRAIN_EVAL_PERIOD
        iterations when it is > 0 (registered on every process, like EvalHook), and the guard
        against catastrophic overfitting of adversarial training (ADV_TRAIN.GUARD.PERIOD)."""
        ret = super().build_hooks()
        guard = self.cfg.ADV_TRAIN.GUARD
        if self.cfg.ADV_TRAIN.ENABLED and guard.PERIOD > 0:
            ret.insert(-1, self.build_overfitting_guard(self.cfg, self.model))
        period = self.cfg.ROBUSTNESS.TRAIN_EVAL_PERIOD
        if period > 0:
            # fail now, not at the first evaluation hours into training
            self._check_attacks(self.cfg, self.model)
            ret.insert(-1, hooks.EvalHook(period, lambda: self.test_with_attack(self.cfg, self.model)))
        return ret

    @classmethod
    def build_overfitting_guard(cls, cfg, model) -> OverfittingGuard:
        """The guard on the last ADV_TRAIN.GUARD.IMAGES training images, mapped once by the
        training mapper under a fixed seed (the same batch on every process)."""
        guard = cfg.ADV_TRAIN.GUARD
        dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[-guard.IMAGES:]
        mapper = adapter_class(cfg.MODEL.META_ARCHITECTURE).train_mapper(cfg)
        mapper = mapper or DatasetMapper(cfg, is_train=True)
        state = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            torch.manual_seed(cfg.ADV_TRAIN.SEED)
            np.random.seed(cfg.ADV_TRAIN.SEED)
            random.seed(cfg.ADV_TRAIN.SEED)
            batch = [mapper(copy.deepcopy(d)) for d in dicts]
        finally:
            torch.random.set_rng_state(state[0])
            np.random.set_state(state[1])
            random.setstate(state[2])
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return OverfittingGuard(
            batch,
            AdversarialExamples(cfg),
            adapter_class(unwrap_model(model))(unwrap_model(model), metadata),
            period=guard.PERIOD,
            num_steps=guard.NUM_STEPS,
            acc_drop=guard.ACC_DROP,
            loss_rise=guard.LOSS_RISE,
            output_dir=cfg.OUTPUT_DIR,
        )

    @staticmethod
    def _check_attacks(cfg, model):
        """The passes of ROBUSTNESS (the sweep's expansion without clean, adaptive and
        sweep-only passes such as "sea", which fail with a message saying what to list), each
        checked by its kind; returns them."""
        specs = expand_threats(cfg, include_clean=False, include_adaptive=False, combining=False)
        check_threats(cfg, build_adapter(cfg, model), specs)
        check_early_stop(cfg)
        return specs

    @classmethod
    def test_with_attack(cls, cfg, model, evaluators=None):
        """Score the model under each configured pass (attack x eps, and any other kind a
        plug-in registers), undefended, with any evaluators.

        Results are keyed like ``test_with_TTA``'s: ``<task>_<pass tag>`` (``<attack>_eps<eps>``
        for attacks). Images that could not be scored (non-finite gradients) are skipped and
        logged.
        """
        specs = cls._check_attacks(cfg, model)
        results = {}
        for dataset_name in cfg.DATASETS.TEST:
            # the data set's label convention (e.g. PanopticFPN's separated labels)
            adapter = adapter_class(model)(model, MetadataCatalog.get(dataset_name))
            loaders = {}
            for spec in specs:
                kind = threat_kind(spec.kind)
                tag = kind.tag(spec)
                evaluator = evaluators or cls.build_evaluator(
                    cfg, dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference_attack", tag)
                )
                pass_cfg = spec.cfg(cfg)
                folder = os.path.join(cfg.OUTPUT_DIR, "inference_attack", tag)
                context = StepContext(pass_cfg, adapter, {"none": None}, None, adapter.device,
                                      folder)  # fmt: skip
                kind.prepare(pass_cfg, spec, context, folder)
                step = kind.image_step(spec, context)
                objective = spec.objective if step is not None and step.needs_objective else ""
                if objective not in loaders:
                    loaders[objective] = cls.build_attack_loader(cfg, dataset_name, objective)
                wrapper = AdversarialInference(pass_cfg, adapter, step)
                scored = inference_on_dataset(
                    wrapper, loaders[objective], MultiVariantEvaluator({"none": evaluator})
                )
                res = scored.get("none", {})
                if scored.get("failures"):
                    logger.warning("%s: %d image(s) not scored", tag, len(scored["failures"]))
                if comm.is_main_process():
                    logger.info("Attacked (%s) results on %s:", tag, dataset_name)
                    print_csv_format(res)
                results.update({f"{k}_{tag}": v for k, v in res.items()})
        return results
