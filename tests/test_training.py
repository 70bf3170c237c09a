# Copyright (c) UPSNetRobust authors.
"""A few training iterations through the Trainer and train_net.py, 1 and 2 processes, and safe
checkpoint loading."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TRAIN_OPTS, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.engine import Trainer, build_checkpointer

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


def test_trainer_runs_iterations_and_checkpoint_loads_safely(synthetic_cityscapes_names, tmp_path):
    cfg = tiny_cfg(
        "DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)",
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "OUTPUT_DIR", str(tmp_path),
        *TRAIN_OPTS,
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    final = tmp_path / "model_final.pth"
    assert final.exists()
    # The trainer's own checkpoint (model, optimizer, scheduler, iteration) loads weights-only.
    model = build_model(cfg)
    extra = build_checkpointer(cfg, model).resume_or_load(str(final), resume=False)
    assert extra.get("iteration") == 2
    assert all(torch.equal(model.state_dict()[k], after[k]) for k in after)
    # Evaluation after training: PQ keys from COCOPanopticEvaluator and mIoU.
    res = Trainer.test(cfg, model)
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(res["panoptic_seg"]) and "mIoU" in res["sem_seg"]


class _Payload:
    """Stands for arbitrary pickled code in a malicious checkpoint."""


def test_checkpointer_refuses_unsafe_files_unless_opted_in(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    pkl = tmp_path / "weights.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {}, "__author__": "x"}, f)
    with pytest.raises(ValueError, match="UNSAFE_LOAD_CHECKPOINT"):
        build_checkpointer(cfg, model).load(str(pkl))
    pth = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "payload": _Payload()}, pth)
    with pytest.raises(ValueError, match="weights_only"):
        build_checkpointer(cfg, model).load(str(pth))
    unsafe = tiny_cfg("MODEL.UNSAFE_LOAD_CHECKPOINT", "True")
    build_checkpointer(unsafe, model).load(str(pth))  # the user's explicit opt-in


@pytest.mark.slow
def test_train_net_two_processes_on_cpu(synthetic_cityscapes_root, tmp_path):
    """detectron2's launch with gloo; the trainer must build DDP without device_ids on CPU."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(synthetic_cityscapes_root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny.yaml"),
        "--num-gpus", "2", "--dist-url", "auto",
        "OUTPUT_DIR", str(tmp_path), "TEST.EVAL_PERIOD", "0", *TRAIN_OPTS,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "model_final.pth").exists()
    assert "PQ" in proc.stdout + proc.stderr


def test_test_with_attack_scores_each_attack_and_eps(synthetic_cityscapes_names, tmp_path):
    """Trainer.test_with_attack scores each configured (attack, eps): on the shipped model its
    PQ equals the hook's under FGSM at that eps, and eps 8 costs PQ."""
    from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset

    from upsnet_robust.attacks import FGSM
    from upsnet_robust.evaluation import AdversarialInference, MultiVariantEvaluator

    name = synthetic_cityscapes_names["val"]
    cfg = tiny_cfg(
        "DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)",
        "DATASETS.TEST", f"('{name}',)",
        "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['fgsm']",
        "ROBUSTNESS.EPSILONS", "[2.0, 8.0]",
        *TRAIN_OPTS,
    )  # fmt: skip
    model = build_model(cfg).eval()
    build_checkpointer(cfg, model).load(SHIPPED)
    res = Trainer.test_with_attack(cfg, model)
    assert {"panoptic_seg_fgsm_eps2", "panoptic_seg_fgsm_eps8", "sem_seg_fgsm_eps2"} <= set(res)
    clean = Trainer.test(cfg, model)["panoptic_seg"]["PQ"]
    wrapper = AdversarialInference(model, attack=FGSM(8.0), objective=cfg.ROBUSTNESS.OBJECTIVE)
    # the hook returns {defense: output} per image: one evaluator per defense
    evaluator = MultiVariantEvaluator({"none": COCOPanopticEvaluator(name, str(tmp_path / "ref"))})
    ref = inference_on_dataset(wrapper, Trainer.build_test_loader(cfg, name), evaluator)
    assert res["panoptic_seg_fgsm_eps8"] == ref["none"]["panoptic_seg"]
    # Measured on 10 pairs of val images: FGSM eps 8 lowers PQ by 5.3-9.6 points (6.4 here,
    # 64.7 -> 55.1 after eps 2's 61.5); margin 2.
    assert res["panoptic_seg_fgsm_eps8"]["PQ"] < clean - 2, (clean, res)
    assert res["sem_seg_fgsm_eps8"]["mIoU"] != res["sem_seg_fgsm_eps2"]["mIoU"]


def test_test_with_attack_gives_the_objective_its_ground_truth(synthetic_cityscapes_names, tmp_path):
    """The ``segment`` objective reads the panoptic segments, which the plain test mapper does
    not give: the attacked evaluation's loader adds them, and the attack lowers PQ."""
    name = synthetic_cityscapes_names["val"]
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{name}',)",
        "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['fgsm']",
        "ROBUSTNESS.EPSILONS", "[8.0]",
        "ROBUSTNESS.OBJECTIVE", "segment",
        *TRAIN_OPTS,
    )  # fmt: skip
    model = build_model(cfg).eval()
    build_checkpointer(cfg, model).load(SHIPPED)
    res = Trainer.test_with_attack(cfg, model)
    clean = Trainer.test(cfg, model)["panoptic_seg"]["PQ"]
    assert res["panoptic_seg_fgsm_eps8"]["PQ"] < clean, (clean, res)


def test_attacked_evaluation_rejects_sweep_only_attacks_before_training(
    synthetic_cityscapes_names, tmp_path
):
    """An ensemble ("sea") cannot run in training's attacked evaluation: the Trainer says so
    when it builds its hooks, before the first iteration."""
    cfg = tiny_cfg(
        "DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)",
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "OUTPUT_DIR", str(tmp_path),
        "ROBUSTNESS.ATTACKS", "['sea']",
        "ROBUSTNESS.TRAIN_EVAL_PERIOD", "5",
        *TRAIN_OPTS,
    )  # fmt: skip
    with pytest.raises(ValueError, match="'sea' in ROBUSTNESS.ATTACKS is an ensemble"):
        Trainer(cfg)


def test_defense_transform_in_the_dataset_mapper(synthetic_cityscapes_names):
    """Stored / transferred adversarial images: the defense runs as a mapper augmentation."""
    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    from upsnet_robust.data import UPSNetPanopticDatasetMapper, build_panoptic_mapper
    from upsnet_robust.defenses import build_defense

    cfg = tiny_cfg("DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)", *TRAIN_OPTS)
    plain = build_panoptic_mapper(cfg, is_train=False)
    defended = UPSNetPanopticDatasetMapper(
        is_train=False,
        augmentations=[T.ResizeShortestEdge(64, 128), build_defense("nlmeans")],
        image_format="BGR",
        thing_ids=plain.thing_ids,
    )
    d = DatasetCatalog.get(synthetic_cityscapes_names["val"])[0]
    a, b = plain(dict(d)), defended(dict(d))
    img = np.ascontiguousarray(a["image"].permute(1, 2, 0).numpy())
    expected = cv2.fastNlMeansDenoisingColored(img, None, 10, 10, 7, 21)
    assert np.array_equal(b["image"].permute(1, 2, 0).numpy(), expected)
    assert torch.equal(a["sem_seg"], b["sem_seg"])
    assert torch.equal(a["instances"].gt_masks.tensor, b["instances"].gt_masks.tensor)


def test_train_eval_period_scores_attacked_pq_during_training(
    synthetic_cityscapes_names, tmp_path, monkeypatch
):
    """ROBUSTNESS.TRAIN_EVAL_PERIOD 1 with 2 iterations: the periodic hook scores the attacked
    PQ after the first iteration (and EvalHook's end-of-training call after the last), on the
    model being trained, and puts the results in the trainer's storage."""
    calls = []
    original = Trainer.test_with_attack.__func__

    def recording(cls, cfg, model, evaluators=None):
        calls.append(model.training)
        return original(cls, cfg, model, evaluators)

    monkeypatch.setattr(Trainer, "test_with_attack", classmethod(recording))
    cfg = tiny_cfg(
        "DATASETS.TRAIN", f"('{synthetic_cityscapes_names['train']}',)",
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "OUTPUT_DIR", str(tmp_path), *TRAIN_OPTS,
        "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0",
        "ROBUSTNESS.TRAIN_EVAL_PERIOD", "1",
        "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[2.0]",
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(calls) == 2
    history = trainer.storage.history("panoptic_seg_fgsm_eps2/PQ")
    assert [it for _, it in history.values()][0] == 0  # periodic, after the first iteration
    assert all(0 <= v <= 100 for v, _ in history.values())
