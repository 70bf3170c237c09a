# Copyright (c) UPSNetRobust authors.
"""Glue of the main job: sweep, example grids and report for one loaded model."""
import datetime
import logging
import os
import platform

import torch

import detectron2
from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from ..adapters.base import AdapterInference, build_adapter
from ..utils.image import tensor_to_hwc_uint8
from ..threats import threat_kind
from .compare_weights import compare_weights_entries, sweep_compared_weights
from .examples import save_example_grid
from .report import format_table, write_report
from .sweep import RobustnessSweep

__all__ = ["run_robustness_sweep", "hardware_description"]

logger = logging.getLogger(__name__)


def hardware_description(device: str) -> str:
    """One line naming the device, CPU and threads, stated with every timing."""
    cpu = platform.processor() or platform.machine()
    line = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        line = f"{torch.cuda.get_device_name()} ({line})"
    return f"{line}, {comm.get_world_size()} process(es)"


def _clean_prediction(model, x, clean):
    """The model's output dict on the clean image ``clean`` (3, H, W) of input dict ``x``: the
    example grids' reference result. Runs in eval mode without gradients; the model's mode is
    restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model([dict(x, image=clean)])[0]
    finally:
        model.train(was_training)


def _example_writer(cfg, output_dir, model):
    """The sweep's ``on_example`` callback: one grid per example image of an attacked pass,
    with the model's result on the clean, adversarial and (first non-"none") defended image."""
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    folder = os.path.join(output_dir, "examples")
    os.makedirs(folder, exist_ok=True)

    def write(spec, x, clean, adv, defended, outputs, clean_outputs=None):
        # The sweep may pass the clean outputs it computed; else infer them here.
        if clean_outputs is None:
            clean_outputs = _clean_prediction(model, x, clean)
        defended_name = next((d for d in defended if d != "none"), None)
        name = f"{spec['attack']}_eps{spec['eps']:g}_{x.get('image_id', 'image')}.png"
        kind = threat_kind(spec.kind)
        save_example_grid(
            os.path.join(folder, name),
            tensor_to_hwc_uint8(clean),
            tensor_to_hwc_uint8(adv),
            outputs.get("none"),
            metadata,
            defended_image=tensor_to_hwc_uint8(defended[defended_name]) if defended_name else None,
            panoptic_def=outputs.get(defended_name) if defended_name else None,
            panoptic_clean=clean_outputs,
            amplification=cfg.ROBUSTNESS.DIFF_AMPLIFICATION,
            input_format=cfg.INPUT.FORMAT,
            title=f"{kind.example_title(spec)} {x.get('image_id', '')}",
            perturbed_label=kind.example_label,
        )

    return write


def _step_rules(cfg) -> str:
    """Each configured attack's own step rule (``Attack.step_rule``), for the metadata."""
    from ..attacks import ATTACK_REGISTRY

    rules = [
        f"{n}: {ATTACK_REGISTRY.get(n).step_rule}"
        for n in dict.fromkeys(cfg.ROBUSTNESS.ATTACKS)
        if n in ATTACK_REGISTRY and ATTACK_REGISTRY.get(n).step_rule
    ]
    return "; ".join(rules) or "-"


def run_robustness_sweep(cfg, model, config_file: str = "", mapper=None):
    """Run or resume the sweep, then (main process) write the report into cfg.OUTPUT_DIR.

    Returns:
        dict with ``cells`` and the report ``paths`` on the main process, else None.
    """
    output_dir = cfg.OUTPUT_DIR
    if cfg.ROBUSTNESS.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    compare_weights_entries(cfg)  # a bad entry fails now, not after the first sweep
    # the clean panels of the example grids are drawn from predictions in the data set's ids
    adapter = build_adapter(cfg, model)

    def sweep(weights: str, examples_dir: str):
        return RobustnessSweep(
            cfg,
            model,
            weights,
            output_dir,
            on_example=_example_writer(cfg, examples_dir, AdapterInference(adapter)),
            adapter=adapter,
            mapper=mapper,
        ).run()

    cells = sweep(cfg.MODEL.WEIGHTS, output_dir)
    # other checkpoints of the architecture (e.g. adversarially trained) as defense rows
    cells += sweep_compared_weights(
        cfg, model, lambda weights, name: sweep(weights, os.path.join(output_dir, name))
    )
    if not comm.is_main_process():
        return None
    metadata = {
        "config_file": config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "compared_weights": list(cfg.ROBUSTNESS.COMPARE_WEIGHTS),
        "dataset": cfg.DATASETS.TEST[0],
        "hardware": hardware_description(cfg.MODEL.DEVICE),
        "batch_size": cfg.ROBUSTNESS.BATCH_SIZE,
        "defense_workers": cfg.ROBUSTNESS.DEFENSE_WORKERS,
        "amp": cfg.ROBUSTNESS.AMP or "off",
        "channels_last": cfg.ROBUSTNESS.CHANNELS_LAST,
        "input_format": cfg.INPUT.FORMAT,
        "objective": cfg.ROBUSTNESS.OBJECTIVE,
        "seed": cfg.ROBUSTNESS.SEED,
        "quantized": cfg.ROBUSTNESS.QUANTIZE,
        "eps_scale": "0-255 pixel values of INPUT.FORMAT, before mean subtraction",
        "step_rule": _step_rules(cfg),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    paths = write_report(cells, output_dir, metadata)
    logger.info("Robustness results:\n%s", format_table(cells))
    logger.info("Report written: %s", ", ".join(sorted(paths.values())))
    return {"cells": cells, "paths": paths}
