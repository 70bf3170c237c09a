# Copyright (c) UPSNetRobust authors.
"""Transfer attacks: the diagonal equals the white-box sweep cell, resume recomputes nothing, the
gradient-masking check, the report files and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SMALL_TEST_OPTS, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import AdversarialInference, run_robustness_sweep
from upsnet_robust.evaluation.transfer import TransferModel, TransferStudy
from upsnet_robust.evaluation.transfer_report import transfer_checks, write_transfer_report

OPTS = [
    "ROBUSTNESS.ATTACKS", "['fgsm']",
    "ROBUSTNESS.EPSILONS", "[2.5]",  # FGSM: x +- 2.5 is not an integer image
    "ROBUSTNESS.DEFENSES", "['none', 'median']",
    "ROBUSTNESS.NUM_EXAMPLES", "0",
    "ROBUSTNESS.SEED", "5",
    *SMALL_TEST_OPTS,
]  # fmt: skip


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer_weights")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = str(folder / f"model{seed}.pth")
        torch.save({"model": build_model(tiny_cfg()).state_dict()}, path)
        paths.append(path)
    return paths


def _cfg(names, weights, out):
    cfg = tiny_cfg("DATASETS.TEST", f"('{names['val']}',)", "MODEL.WEIGHTS", weights,
                   "OUTPUT_DIR", str(out), *OPTS)  # fmt: skip
    cfg.freeze()
    return cfg


def _model(cfg):
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def test_diagonal_equals_white_box_and_resume(synthetic_cityscapes_names, two_weights, tmp_path, monkeypatch):
    cfg_a = _cfg(synthetic_cityscapes_names, two_weights[0], tmp_path / "sweep_a")
    cfg_b = _cfg(synthetic_cityscapes_names, two_weights[1], tmp_path / "sweep_b")
    white = run_robustness_sweep(cfg_a, _model(cfg_a))["cells"]
    models = [TransferModel("a", cfg_a, _model(cfg_a)), TransferModel("b", cfg_b, _model(cfg_b))]
    entries = TransferStudy(models, str(tmp_path / "transfer")).run()

    # clean per target + (1 pass per source) x 2 targets, each under 2 defenses
    assert len(entries) == (2 + 2 * 2) * 2
    for cell in white:
        diag = [e for e in entries if e["source"] == ("a" if cell["attack"] != "clean" else "clean")
                and e["target"] == "a" and e["attack"] == cell["attack"] and e["defense"] == cell["defense"]]  # fmt: skip
        assert len(diag) == 1, cell
        for metric in ("PQ", "SQ", "RQ"):
            assert diag[0][metric] == pytest.approx(cell[metric], abs=1e-9), (cell["attack"], cell["defense"])
    # the stored images are float (the values they give on a target: test_transfer_values.py)
    folder = os.path.join(str(tmp_path / "transfer"), "adversarial")
    stored = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".pt")]
    assert len(stored) == 2 * 2  # 2 sources x 2 images
    adv = torch.load(stored[0], weights_only=True)
    assert adv.dtype == torch.float32 and not torch.equal(adv, adv.round())  # float: not quantised

    calls = {"n": 0}
    forward = AdversarialInference.forward

    def counting(self, inputs):
        calls["n"] += 1
        return forward(self, inputs)

    monkeypatch.setattr(AdversarialInference, "forward", counting)
    again = TransferStudy(models, str(tmp_path / "transfer")).run()
    assert calls["n"] == 0 and again == entries  # everything was found again


def _entry(source, target, value, defense="none"):
    return {"source": source, "target": target, "attack": "pgd", "eps": 4.0, "defense": defense,
            "metric": "PQ", "PQ": value}  # fmt: skip


def test_transfer_stronger_than_white_box_is_flagged(tmp_path):
    entries = [_entry("a", "a", 30.0), _entry("b", "a", 29.6), _entry("b", "b", 40.0), _entry("a", "b", 20.0)]
    checks = {c["name"].split("-> ")[1]: c for c in transfer_checks(entries)}
    assert checks["a (none)"]["passed"]  # 0.4 below white-box: within the 0.5 tolerance
    assert not checks["b (none)"]["passed"] and "gradient masking" in checks["b (none)"]["detail"]
    entries.insert(0, {**_entry("clean", "a", 80.0), "attack": "clean", "eps": 0.0})
    paths = write_transfer_report(entries, str(tmp_path), {"note": "hand-made"})
    data = json.load(open(paths["json"]))
    assert data["entries"] == entries and [c["passed"] for c in data["checks"]].count(False) == 1
    md = open(paths["md"]).read()
    assert "**FLAG**" in md and "| clean | 80.0 |" in md and "**30.0**" in md
    assert os.path.getsize(paths["png"]) > 1000


def test_command_line_rejects_a_bad_config_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_BASE_: '%s'\nROBUSTNESS:\n  ATTACKS: ['segpgd']\n" % os.path.join(
        REPO_ROOT, "configs", "Synthetic", "upsnet_tiny_robustness.yaml"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "transfer_net.py"),
         "--config-file", str(bad), "--config-file", str(bad), "--output-dir", str(tmp_path / "o"),
         "MODEL.WEIGHTS", "", "DATASETS.TEST", "('no_such_split',)"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no_such_split" in proc.stderr and "not registered" in proc.stderr


def test_models_whose_splits_list_the_images_in_another_order(synthetic_cityscapes_names,
                                                             two_weights, tmp_path):
    """With MAX_IMAGES below the split's size, every model scores the first model's images,
    found by name, even where its data set lists them in another order (a semantic split beside
    a panoptic one)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    val = synthetic_cityscapes_names["val"]
    dicts = DatasetCatalog.get(val)
    assert len(dicts) == 2
    reversed_name = val + "_reversed_for_transfer"
    if reversed_name not in DatasetCatalog.list():
        DatasetCatalog.register(reversed_name, lambda: list(reversed(DatasetCatalog.get(val))))
        MetadataCatalog.get(reversed_name).set(**MetadataCatalog.get(val).as_dict() | {"name": reversed_name})
    cfg_a = tiny_cfg("DATASETS.TEST", f"('{val}',)", "MODEL.WEIGHTS", two_weights[0],
                     "OUTPUT_DIR", str(tmp_path / "a"), *OPTS, "ROBUSTNESS.MAX_IMAGES", "1")
    cfg_b = tiny_cfg("DATASETS.TEST", f"('{reversed_name}',)", "MODEL.WEIGHTS", two_weights[1],
                     "OUTPUT_DIR", str(tmp_path / "b"), *OPTS, "ROBUSTNESS.MAX_IMAGES", "1")
    models = [TransferModel("a", cfg_a, _model(cfg_a)), TransferModel("b", cfg_b, _model(cfg_b))]
    study = TransferStudy(models, str(tmp_path / "transfer"))
    first = os.path.basename(dicts[0]["file_name"])
    assert [os.path.basename(d["file_name"]) for d in models[1].dataset(study.keys)] == [first]
    entries = study.run()
    assert entries and all(e["num_images"] == 1 and e["num_failed"] == 0 for e in entries)
    # the clean entry of b scores the image a was given, not b's own first image
    clean_b = next(e for e in entries if e["source"] == "clean" and e["target"] == "b"
                   and e["defense"] == "none")  # fmt: skip
    cfg_only = tiny_cfg("DATASETS.TEST", f"('{val}',)", "MODEL.WEIGHTS", two_weights[1],
                        "OUTPUT_DIR", str(tmp_path / "only"), *OPTS, "ROBUSTNESS.MAX_IMAGES", "1",
                        "ROBUSTNESS.ATTACKS", "[]", "ROBUSTNESS.DEFENSES", "['none']")
    own = run_robustness_sweep(cfg_only, _model(cfg_only))["cells"][0]
    assert clean_b["PQ"] == pytest.approx(own["PQ"], abs=1e-9)
