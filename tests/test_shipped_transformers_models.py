# Copyright (c) UPSNetRobust authors.
"""The shipped tiny Mask2Former and SegFormer (`transformers` models trained from scratch on the
generated data) reach their clean goals on the generated val split, the split the README's
figures are measured on, and the study's attack hurts them as it should: the metric falls with
eps and the attack's loss rises with it (no flat, masked loss surface)."""
import os

import pytest
from conftest import REPO_ROOT

import upsnet_robust  # noqa: F401
from upsnet_robust.data import (
    generate_synthetic_cityscapes,
    register_synthetic_cityscapes_panoptic,
    register_synthetic_cityscapes_semantic,
)
from upsnet_robust.engine import Trainer, build_checkpointer, get_upsnet_cfg, merge_with_hints
from upsnet_robust.evaluation import run_robustness_sweep

pytest.importorskip("transformers")

SYNTHETIC = os.path.join(REPO_ROOT, "configs", "Synthetic")
# kind -> (robustness config, model description, checkpoint, task, metric, clean goal)
MODELS = {
    "mask2former": ("mask2former_tiny_robustness.yaml", "mask2former_tiny.json",
                    "mask2former_tiny_synthetic.pth", "panoptic", "PQ", 60.0),
    "segformer": ("segformer_tiny_robustness.yaml", "segformer_tiny.json",
                  "segformer_tiny_synthetic.pth", "semantic", "mIoU", 80.0),
}  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    """The val split of `tools/prepare_synthetic_cityscapes.py`'s default data set (each image is
    drawn from its own generator seeded by (seed, split, index), so 50 val images at seed 0 are
    the same images whatever the train split's size)."""
    root = str(tmp_path_factory.mktemp("shipped_hf") / "synthetic_cityscapes")
    generate_synthetic_cityscapes(root, num_train=1, num_val=50, seed=0, show_progress=False)
    panoptic = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_shipped_hf")
    semantic = register_synthetic_cityscapes_semantic(root, name_prefix="pytest_shipped_hf")
    return {"panoptic": panoptic[1], "semantic": semantic[1]}


def _cfg(kind, val_split, output_dir, *opts):
    config, description, checkpoint, task = MODELS[kind][:4]
    cfg = get_upsnet_cfg()
    merge_with_hints(cfg, os.path.join(SYNTHETIC, config), [
        "MODEL.TRANSFORMERS.CONFIG", os.path.join(SYNTHETIC, "transformers", description),
        "MODEL.WEIGHTS", os.path.join(REPO_ROOT, "checkpoints", checkpoint),
        "DATASETS.TEST", f"('{val_split[task]}',)",
        "OUTPUT_DIR", str(output_dir),
        "DATALOADER.NUM_WORKERS", "0",
        *opts,
    ])  # fmt: skip
    return cfg


def _model(cfg):
    model = Trainer.build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_shipped_model_reaches_its_clean_goal(kind, val_split, tmp_path):
    metric, goal = MODELS[kind][4:]
    cfg = _cfg(kind, val_split, tmp_path)
    results = Trainer.test(cfg, _model(cfg))  # detectron2's evaluators, the 50 val images
    section = "panoptic_seg" if metric == "PQ" else "sem_seg"
    assert results[section][metric] >= goal, results[section]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_study_attack_hurts_the_shipped_model(kind, val_split, tmp_path):
    metric = MODELS[kind][4]
    cfg = _cfg(kind, val_split, tmp_path,
               "ROBUSTNESS.ATTACKS", "['ifgsm']", "ROBUSTNESS.EPSILONS", "[1.0, 4.0, 16.0]",
               "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.MAX_IMAGES", "4",
               "ROBUSTNESS.NUM_EXAMPLES", "0")  # fmt: skip
    report = run_robustness_sweep(cfg, _model(cfg))
    scores = {c["eps"]: c[metric] for c in report["cells"]}
    series = [scores[e] for e in (0.0, 1.0, 4.0, 16.0)]
    assert all(b <= a + 0.5 for a, b in zip(series, series[1:])), series
    assert series[-1] < series[0] - 20, series  # eps 16 hurts a trained model badly
    losses = [c["attack_loss"] for c in sorted(report["cells"], key=lambda c: c["eps"])[1:]]
    assert losses[0] < losses[-1], losses
