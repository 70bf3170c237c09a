#!/usr/bin/env python
# Copyright (c) UPSNetRobust authors.
"""Seconds per image of PQ computation with detectron2's COCOPanopticEvaluator.

Predictions are derived from the ground truth of the synthetic val set (the panoptic PNG's
segment ids and ``segments_info`` with contiguous category ids, as a model's
``panoptic_seg`` output looks), so the run needs no model and PQ must come out as 100 (a
correctness check of the feeding). Optionally (``--shift``) the id maps are shifted by a few
pixels so that matching works on imperfect predictions. Timed per repetition: ``process()``
over all images (PNG encoding, category conversion) and ``evaluate()`` (panopticapi
``pq_compute``: PNG decoding, matching, its multiprocessing pool); the sweep's
``PanopticSubsetEvaluator`` (which also writes a subset ground-truth JSON) is timed alongside.
It also runs on 2 images (one small-sweep pass), which exposes the fixed cost of each
``evaluate()`` call. Repetitions interleave the configurations; medians are reported.

    python benchmarks/bench_pq_eval.py [--quick] [--images 50]
"""

import contextlib
import copy
import io
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutils as bu  # noqa: E402

NAME = "pq_eval"
DATASET = "synthetic_cityscapes_fine_panoptic_val"


def get_parser():
    """The command-line options (the common ones from :func:`benchutils.base_parser`)."""
    parser = bu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=0, help="val images (0: all)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (5; 3 with --quick)")
    parser.add_argument(
        "--shift", type=int, default=0, help="shift predicted id maps by this many pixels"
    )
    return parser


def gt_predictions(dicts, thing_contiguous_ids, shift: int = 0):
    """Per data-set dict, a model-style output ``{"panoptic_seg": (ids, segments_info)}``.

    Args:
        dicts (list[dict]): detectron2 data-set dicts with ``pan_seg_file_name`` and
            ``segments_info`` (contiguous ``category_id``).
        thing_contiguous_ids (set[int]): contiguous ids of thing classes.
        shift (int): roll the id map right/down by this many pixels (0: exact ground truth).

    Returns:
        list[dict]: one output per dict.
    """
    import numpy as np
    import torch
    from PIL import Image
    from panopticapi.utils import rgb2id

    outputs = []
    for d in dicts:
        ids = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        if shift:
            ids = np.roll(ids, (shift, shift), axis=(0, 1))
        segments = [
            {
                "id": int(s["id"]),
                "category_id": int(s["category_id"]),
                "isthing": int(s["category_id"]) in thing_contiguous_ids,
            }
            for s in d["segments_info"]
        ]
        outputs.append({"panoptic_seg": (torch.from_numpy(ids.astype(np.int32)), segments)})
    return outputs


def _evaluator_configs(n_all: int, n: int) -> dict:
    """{name: (evaluator class, images)}. COCOPanopticEvaluator needs a prediction for every GT
    image, so it runs on the full set only; the sweep's subset evaluator also runs on 2 images
    (a small sweep's pass), which shows the fixed cost per evaluate() call."""
    from detectron2.evaluation import COCOPanopticEvaluator

    from upsnet_robust.evaluation import PanopticSubsetEvaluator

    configs = {}
    if n == n_all:
        configs["COCOPanopticEvaluator"] = (COCOPanopticEvaluator, n)
    configs["PanopticSubsetEvaluator"] = (PanopticSubsetEvaluator, n)
    configs[f"PanopticSubsetEvaluator, {min(2, n)} images"] = (PanopticSubsetEvaluator, min(2, n))
    return configs


def _time_evaluators(configs, inputs, outputs, reps):
    """process() and evaluate() seconds per configuration, rotating the order each repetition
    (the first repetition is a warm-up), and each configuration's results."""
    process_s = {k: [] for k in configs}
    evaluate_s = {k: [] for k in configs}
    pq = {}
    names = list(configs)
    for r in range(reps + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cls, count = configs[name]
            ev = cls(DATASET)
            ev.reset()
            # process() pops "isthing" from the segments: give it fresh copies
            outs = [
                {"panoptic_seg": (o["panoptic_seg"][0], copy.deepcopy(o["panoptic_seg"][1]))}
                for o in outputs[:count]
            ]
            start = time.perf_counter()
            for i, o in zip(inputs[:count], outs):
                ev.process([i], [o])
            t_process = time.perf_counter() - start
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                res = ev.evaluate()
            t_eval = time.perf_counter() - start
            if r > 0:
                process_s[name].append(t_process)
                evaluate_s[name].append(t_eval)
            pq[name] = res["panoptic_seg"]
    return process_s, evaluate_s, pq


def _rows(configs, process_s, evaluate_s, pq):
    rows = []
    for name, (_, count) in configs.items():
        total = [p + e for p, e in zip(process_s[name], evaluate_s[name])]
        rows.append(
            {
                "evaluator": name,
                "images": count,
                "process_s_per_image": bu.median(process_s[name]) / count,
                "evaluate_s_per_image": bu.median(evaluate_s[name]) / count,
                "total_s_per_image": bu.median(total) / count,
                "evaluate_s_total": bu.median(evaluate_s[name]),
                "PQ": pq[name]["PQ"],
            }
        )
    return rows


def _headlines(rows, n, height, width):
    main_row = rows[0]
    return [
        bu.headline(
            f"PQ eval s/image ({main_row['evaluator']})",
            main_row["total_s_per_image"],
            "s",
            f"{n} images {height}x{width}; PQ {bu.format_value(main_row['PQ'])} on "
            "GT-derived predictions",
        ),
    ] + [
        bu.headline(
            f"PQ eval s/image ({r['evaluator']})",
            r["total_s_per_image"],
            "s",
            f"evaluate() {bu.format_value(r['evaluate_s_total'])} s per call",
        )
        for r in rows[1:]
    ]


def run(args) -> dict:
    """Run the benchmark; returns its JSON result (see :func:`benchutils.bench_main`)."""
    device = bu.prepare_run(args)
    bu.setup_environment()
    import upsnet_robust  # noqa: F401  registers the data set
    from detectron2.data import DatasetCatalog, MetadataCatalog

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    reps = args.reps or (3 if args.quick else 5)
    dicts = DatasetCatalog.get(DATASET)
    n_all = len(dicts)
    if args.images > 0:
        dicts = dicts[: args.images]
    meta = MetadataCatalog.get(DATASET)
    things = set(meta.thing_dataset_id_to_contiguous_id.values())
    outputs = gt_predictions(dicts, things, args.shift)
    inputs = [{"image_id": d["image_id"], "file_name": d["file_name"]} for d in dicts]
    n = len(dicts)
    configs = _evaluator_configs(n_all, n)
    process_s, evaluate_s, pq = _time_evaluators(configs, inputs, outputs, reps)
    height, width = outputs[0]["panoptic_seg"][0].shape
    rows = _rows(configs, process_s, evaluate_s, pq)
    return {
        "hardware": bu.hardware_info(device),
        "device": "cpu (panopticapi runs on the CPU)",
        "image_size": [int(height), int(width)],
        "batch_size": 1,
        "num_images": n,
        "repetitions": reps,
        "quick": bool(args.quick),
        "predictions": f"ground truth{f' shifted by {args.shift} px' if args.shift else ''}",
        "pq_compute_workers": os.cpu_count(),
        "results": rows,
        "pq_sanity": {k: v["PQ"] for k, v in pq.items()},
        "raw_seconds": {"process": process_s, "evaluate": evaluate_s},
        "headline": _headlines(rows, n, height, width),
    }


def print_report(result: dict) -> None:
    """Print the hardware line and a short Markdown table of ``result``."""
    print(f"Hardware: {bu.hardware_line(result['hardware'])}")
    h, w = result["image_size"]
    print(
        f"{result['num_images']} val images {h}x{w}, predictions: {result['predictions']}; medians of "
        f"{result['repetitions']} interleaved reps; pq_compute pool of {result['pq_compute_workers']} workers"
    )
    rows = [
        [
            r["evaluator"],
            r["images"],
            r["process_s_per_image"],
            r["evaluate_s_per_image"],
            r["total_s_per_image"],
            r["evaluate_s_total"],
            r["PQ"],
        ]
        for r in result["results"]
    ]
    print(
        bu.format_table(
            [
                "evaluator",
                "images",
                "process s/img",
                "evaluate s/img",
                "total s/img",
                "evaluate() s/call",
                "PQ",
            ],
            rows,
        )
    )


def main(argv=None) -> dict:
    """Parse ``argv``, run, write ``benchmarks/results/<name>.json`` and print the report."""
    return bu.bench_main(NAME, get_parser, run, print_report, argv)


if __name__ == "__main__":
    main()
