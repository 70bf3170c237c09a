# Copyright (c) UPSNetRobust authors.
"""ROBUSTNESS.COMPARE_WEIGHTS: other checkpoints of the architecture as defense rows of one
report (a robustly trained model beside the input transforms), and the trade-off section."""
import json
import os

import pytest
import torch
from conftest import REPO_ROOT, tiny_cfg
from detectron2.modeling import build_model

from upsnet_robust.engine import build_checkpointer
from upsnet_robust.evaluation import run_robustness_sweep
from upsnet_robust.evaluation.compare_weights import compare_weights_entries, relabel_cells
from upsnet_robust.evaluation.report.tradeoff import tradeoff_markdown, tradeoff_rows

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
OPTS = [
    "ROBUSTNESS.ATTACKS", "['fgsm']",
    "ROBUSTNESS.EPSILONS", "[4.0]",
    "ROBUSTNESS.DEFENSES", "['none', 'median']",
    "ROBUSTNESS.OBJECTIVE", "semantic_ce",
    "ROBUSTNESS.MAX_IMAGES", "2",
    "ROBUSTNESS.NUM_EXAMPLES", "1",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """The shipped tiny UPSNet with its semantic head's weights scaled: another checkpoint of the
    same architecture whose predictions differ."""
    model = build_model(tiny_cfg())
    build_checkpointer(tiny_cfg(), model).load(SHIPPED)
    with torch.no_grad():
        for p in model.sem_seg_head.parameters():
            p.mul_(0.5)
    path = str(tmp_path_factory.mktemp("weights") / "other.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _cfg(names, output_dir, *opts):
    return tiny_cfg("DATASETS.TEST", f"('{names['val']}',)", "MODEL.WEIGHTS", SHIPPED,
                    "OUTPUT_DIR", str(output_dir), *OPTS, *opts)


def _model(cfg):
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def test_entries_are_checked_at_set_up(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    ok = tiny_cfg("ROBUSTNESS.COMPARE_WEIGHTS", f"['adv={path}']")
    assert compare_weights_entries(ok) == [("adv", str(path))]
    for entry, match in [("adv", "name=path"), ("a+b=x", "name=path"), (f"none={path}", "already"),
                         (f"median={path}", "already"), ("adv=/no/such.pth", "no checkpoint")]:
        cfg = tiny_cfg("ROBUSTNESS.COMPARE_WEIGHTS", f"['{entry}']",
                       "ROBUSTNESS.DEFENSES", "['none', 'median']")
        with pytest.raises(ValueError, match=match) as e:
            compare_weights_entries(cfg)
        assert "ROBUSTNESS.COMPARE_WEIGHTS" in str(e.value)


def test_relabel_cells():
    cells = [{"attack": "fgsm", "defense": "none"}, {"attack": "fgsm", "defense": "median"}]
    out = relabel_cells(cells, "adv", "w.pth")
    assert [c["defense"] for c in out] == ["adv", "adv+median"]
    assert all(c["weights"] == "w.pth" for c in out) and cells[0]["defense"] == "none"


def test_compared_checkpoint_rows_equal_its_own_sweep(synthetic_cityscapes_names, other_weights,
                                                      tmp_path):
    """The compared checkpoint's rows are what a sweep of that checkpoint alone scores, the
    primary model's weights are restored, and the report puts every row in its trade-off."""
    names = synthetic_cityscapes_names
    cfg = _cfg(names, tmp_path / "both", "ROBUSTNESS.COMPARE_WEIGHTS", f"['half={other_weights}']")
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cells = run_robustness_sweep(cfg, model)["cells"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    rows = {(c["attack"], c["defense"]): c for c in cells}
    assert set(rows) == {(a, d) for a in ("clean", "fgsm")
                         for d in ("none", "median", "half", "half+median")}

    alone_cfg = _cfg(names, tmp_path / "alone", "MODEL.WEIGHTS", other_weights)
    alone = run_robustness_sweep(alone_cfg, _model(alone_cfg))["cells"]
    for c in alone:
        row = rows[(c["attack"], "half" if c["defense"] == "none" else f"half+{c['defense']}")]
        assert row["PQ"] == pytest.approx(c["PQ"], abs=1e-9) and row["weights"] == other_weights
    assert rows[("clean", "half")]["PQ"] != pytest.approx(rows[("clean", "none")]["PQ"])

    report = json.load(open(tmp_path / "both" / "robustness.json"))
    assert report["metadata"]["compared_weights"] == [f"half={other_weights}"]
    md = open(tmp_path / "both" / "robustness.md").read()
    assert "## Robustness-accuracy trade-off" in md and "| half+median |" in md
    assert (tmp_path / "both" / "robustness_accuracy_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "both" / "half" / "examples").is_dir()


def test_tradeoff_rows_against_a_hand_computation():
    def cell(attack, eps, defense, pq):
        return {"attack": attack, "eps": eps, "defense": defense, "PQ": pq, "objective": "x"}

    cells = [
        cell("clean", 0.0, "none", 80.0), cell("clean", 0.0, "adv", 75.0),
        cell("fgsm", 4.0, "none", 50.0), cell("pgd", 4.0, "none", 40.0),
        cell("fgsm", 4.0, "adv", 70.0), cell("pgd", 4.0, "adv", 72.0),
        cell("pgd", 8.0, "adv", 60.0),
    ]
    rows = tradeoff_rows(cells)
    assert list(rows) == ["none", "adv"]
    assert rows["none"]["clean"] == 80.0 and rows["none"]["worst"][4.0][0] == 40.0
    assert rows["adv"]["worst"][4.0][0] == 70.0 and rows["adv"]["worst"][8.0][0] == 60.0
    lines = tradeoff_markdown(cells)
    assert any(line.startswith("| adv | 75.0 | 70.0") for line in lines)
    assert tradeoff_markdown(cells[:1] + cells[2:4]) == []  # one defense row: no section
