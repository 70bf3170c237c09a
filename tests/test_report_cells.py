# Copyright (c) UPSNetRobust authors.
"""ResultCell: exact round trips of a real sweep's cells, typed access and validation; the
atomic writers; and the real sweep's example grid showing the clean prediction."""

import copy
import glob
import json
import os

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_cfg

from upsnet_robust.evaluation.examples import LABEL_HEIGHT, TITLE_HEIGHT
from upsnet_robust.evaluation.report import (
    ResultCell,
    as_cells,
    csv_text,
    defense_ranking,
    format_table,
    metric_ratios,
    report_kind,
    sanity_checks,
)
from upsnet_robust.utils.io import atomic_json, atomic_write

CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """A real (tiny) sweep: the shipped model on one synthetic image, FGSM at eps 4, undefended,
    median-filtered and adaptive through the median filter; one example grid per pass."""
    if not os.path.isfile(CHECKPOINT):
        pytest.skip(f"{CHECKPOINT} missing (make demo trains it)")
    from detectron2.modeling import build_model

    from upsnet_robust.data import (
        generate_synthetic_cityscapes,
        register_synthetic_cityscapes_panoptic,
    )
    from upsnet_robust.engine import build_checkpointer
    from upsnet_robust.evaluation import run_robustness_sweep

    root = str(tmp_path_factory.mktemp("data") / "synthetic_cityscapes")
    generate_synthetic_cityscapes(root, num_train=0, num_val=1, seed=1, show_progress=False)
    names = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_report_cells")
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names[1]}',)",
        "MODEL.WEIGHTS", CHECKPOINT,
        "OUTPUT_DIR", str(tmp_path_factory.mktemp("sweep")),
        "ROBUSTNESS.ATTACKS", "['fgsm']",
        "ROBUSTNESS.EPSILONS", "[4.0]",
        "ROBUSTNESS.DEFENSES", "['none', 'median']",
        "ROBUSTNESS.ADAPTIVE", "True",
        "ROBUSTNESS.EOT_SAMPLES", "1",
        "ROBUSTNESS.NUM_EXAMPLES", "1",
        "DATALOADER.NUM_WORKERS", "0",
    )  # fmt: skip
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(CHECKPOINT)
    result = run_robustness_sweep(cfg, model.eval())
    return cfg, result["cells"]


def test_real_cells_round_trip_exactly(real_sweep):
    cfg, cells = real_sweep
    assert {c["adaptive"] for c in cells} == {False, True}  # surrogate/eot keys present too
    with open(os.path.join(cfg.OUTPUT_DIR, "robustness.json")) as f:
        stored = json.load(f)["cells"]
    for source in (cells, stored):
        for cell in source:
            back = ResultCell.from_dict(cell).to_dict()
            assert back == cell and list(back) == list(cell)
            assert json.dumps(back) == json.dumps(cell)  # same text: same order and types
    # Typed access reads the same values.
    for cell, rc in zip(cells, as_cells(cells)):
        assert (rc.attack, rc.eps, rc.defense, rc.PQ) == (
            cell["attack"],
            cell["eps"],
            cell["defense"],
            cell["PQ"],
        )
        assert rc.task == cell.get("task", "panoptic_seg")
        assert rc.metric == cell.get("metric", "PQ") and rc.score == cell[rc.metric]
        assert rc.surrogate == cell.get("surrogate")


def test_report_functions_accept_dicts_and_result_cells_alike(real_sweep):
    _, cells = real_sweep
    typed = as_cells(copy.deepcopy(cells))
    assert format_table(typed) == format_table(cells)
    assert csv_text(typed) == csv_text(cells)
    assert sanity_checks(typed) == sanity_checks(cells)
    assert defense_ranking(typed) == defense_ranking(cells)
    assert metric_ratios(typed) == metric_ratios(cells)


def test_real_sweep_example_grid_shows_the_clean_prediction(real_sweep):
    cfg, _ = real_sweep
    paths = sorted(glob.glob(os.path.join(cfg.OUTPUT_DIR, "examples", "fgsm_eps4_*.png")))
    assert len(paths) == 1
    grid = cv2.imread(paths[0])
    rows = 3  # clean, adversarial, defended (median)
    h = (grid.shape[0] - TITLE_HEIGHT) // rows - LABEL_HEIGHT
    w = grid.shape[1] // 3
    y = TITLE_HEIGHT + LABEL_HEIGHT
    image, result, blank = (grid[y : y + h, k * w : (k + 1) * w].astype(int) for k in range(3))
    assert np.all(blank == blank[0, 0])  # the clean row's third panel is empty
    # The clean prediction is drawn over the clean image: most pixels are tinted, and the
    # panel is a picture (not a uniform blank panel).
    changed = np.abs(result - image).sum(axis=-1) > 0
    assert changed.mean() > 0.5, changed.mean()
    assert len(np.unique(result.reshape(-1, 3), axis=0)) > 100
    # and it is labelled.
    assert grid[TITLE_HEIGHT : TITLE_HEIGHT + LABEL_HEIGHT, w : 2 * w].max() > 100


# ------------------------------------------------------------------------------------------------
# ResultCell without a sweep
# ------------------------------------------------------------------------------------------------
OLD_CELL = {
    "attack": "ifgsm",
    "objective": "train_losses",
    "eps": 4,
    "num_steps": 5,
    "step_size": 1.0,
    "random_start": False,
    "restarts": 1,
    "defense": "none",
    "adaptive": False,
    "quantized": False,
    "PQ": 31.2,
    "SQ": None,
    "RQ": 40.3,
    "PQ_th": float("nan"),
    "PQ_st": 40.0,
    "attack_s_per_image": 1.23,
    "defense_s_per_image": 0.0,
    "num_images": 30,
    "num_failed": 1,
    "failures": [{"image_id": "x", "reason": "non-finite gradient"}],
}


def test_defaults_extra_keys_and_changes():
    data = dict(OLD_CELL, custom_note="kept", extra={"nested": 1})
    cell = ResultCell.from_dict(data)
    assert (cell.task, cell.metric, cell.model) == ("panoptic_seg", "PQ", None)
    assert cell.extra == {"custom_note": "kept", "extra": {"nested": 1}}
    assert cell.get("custom_note") == "kept" and cell.get("missing", 3) == 3
    assert cell.value("PQ_th") is None and cell.value("SQ") is None and cell.score == 31.2
    assert cell.eps == 4 and isinstance(cell.eps, int)  # stored as given
    out = cell.to_dict()
    assert list(out) == list(data) and out["failures"] == data["failures"]
    assert "task" not in out and "metric" not in out  # defaults are not written back
    # A field set afterwards is written after the source's keys.
    cell.model = "UPSNet"
    assert list(cell.to_dict()) == list(data) + ["model"]
    # Copies: changing the cell's failures list leaves the source alone.
    cell.failures.append({"image_id": "y", "reason": "r"})
    assert len(data["failures"]) == 1


def test_task_defaults_and_validation():
    sem = ResultCell.from_dict(
        {"attack": "clean", "task": "sem_seg", "mIoU": 71.5, "fwIoU": 80.0, "mACC": None}
    )
    assert sem.metric == "mIoU" and sem.score == 71.5 and sem.is_clean
    assert sem.to_dict() == {
        "attack": "clean",
        "task": "sem_seg",
        "mIoU": 71.5,
        "fwIoU": 80.0,
        "mACC": None,
    }
    assert ResultCell(attack="fgsm", task="instances").metric == "AP"
    with pytest.raises(ValueError, match="'task' must be one of"):
        ResultCell.from_dict({"attack": "fgsm", "task": "depth"})
    with pytest.raises(ValueError, match=r"'metric' of a sem_seg cell must be one of .*mIoU"):
        ResultCell.from_dict({"attack": "fgsm", "task": "sem_seg", "metric": "PQ"})
    with pytest.raises(ValueError, match="without an 'attack' key"):
        ResultCell.from_dict({"eps": 1.0})
    with pytest.raises(TypeError, match="dict or ResultCell"):
        as_cells([OLD_CELL, ["attack", "fgsm"]])


def test_constructed_cell_writes_the_sweep_keys():
    cell = ResultCell(attack="fgsm", eps=2.0, task="sem_seg", mIoU=50.0, model="SemFPN")
    out = cell.to_dict()
    assert list(out)[:10] == [
        "attack", "objective", "eps", "num_steps", "step_size", "random_start", "restarts",
        "defense", "adaptive", "quantized",
    ]  # fmt: skip
    assert {k: out[k] for k in ("task", "metric", "model", "mIoU", "fwIoU")} == {
        "task": "sem_seg",
        "metric": "mIoU",
        "model": "SemFPN",
        "mIoU": 50.0,
        "fwIoU": None,
    }
    assert "PQ" not in out and "surrogate" not in out and "AP" not in out
    assert ResultCell.from_dict(out) == cell and ResultCell.from_dict(out).to_dict() == out
    assert report_kind([cell, out]) == ("sem_seg", "mIoU", "SemFPN")


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def test_atomic_write_and_json(tmp_path):
    path = str(tmp_path / "sub" / "a.json")
    assert atomic_json(path, {"b": [1, 2.5, None]}) == path
    with open(path) as f:
        assert json.load(f) == {"b": [1, 2.5, None]}
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    with pytest.raises(ValueError):
        atomic_json(path, {"x": float("nan")}, allow_nan=False)
    with pytest.raises(TypeError):
        atomic_write(path, b"bytes in text mode")
    # Failed writes left the previous content and no temporary file.
    with open(path) as f:
        assert json.load(f) == {"b": [1, 2.5, None]}
    assert os.listdir(tmp_path / "sub") == ["a.json"]
    atomic_write(str(tmp_path / "b.bin"), b"\x00\x01\r\n", mode="wb")
    assert open(tmp_path / "b.bin", "rb").read() == b"\x00\x01\r\n"
    atomic_write(str(tmp_path / "c.txt"), "x\r\ny\n")
    assert open(tmp_path / "c.txt", "rb").read() == b"x\r\ny\n"  # line endings as given
    with pytest.raises(ValueError, match="mode"):
        atomic_write(str(tmp_path / "d"), "x", mode="a")
