# Copyright (c) UPSNetRobust authors.
"""The task-aware report (semantic mIoU and instance AP sweeps) and example grids of every task.

Cells are hand-made; every expected number is recomputed here from the cells, never copied
from the report.
"""

import csv
import json
import os

import cv2
import numpy as np
import pytest
import torch

import upsnet_robust.evaluation.report as report
from upsnet_robust.evaluation.examples import (
    LABEL_HEIGHT,
    TITLE_HEIGHT,
    draw_result,
    example_grid_shape,
    save_example_grid,
)
from upsnet_robust.evaluation.report import (
    CSV_COLUMNS,
    METRIC_TOLERANCE,
    TASK_METRICS,
    csv_columns,
    defense_ranking,
    format_table,
    metric_vs_eps_figure,
    sanity_checks,
    split_by_model_task,
    write_report,
)
from upsnet_robust.threats import ThreatSpec

EPS = (1.0, 4.0, 16.0)
STEPS = {1.0: 2, 4.0: 5, 16.0: 20}
HEADLINE = {"sem_seg": "mIoU", "instances": "AP"}
MODEL = {"sem_seg": "SemanticFPN", "instances": "MaskRCNN"}
CLEAN = {"none": 60.0, "median": 55.0}
# Monotone headline scores per (attack, defense); ifgsm is stronger than fgsm everywhere.
SCORES = {
    ("fgsm", "none"): (50.0, 35.0, 20.0),
    ("ifgsm", "none"): (45.0, 25.0, 8.0),
    ("fgsm", "median"): (50.0, 40.0, 30.0),
    ("ifgsm", "median"): (48.0, 35.0, 22.0),
}
METADATA = {"date": "2024-01-01T00:00:00", "hardware": "test", "weights": "w.pth"}


def _cell(task, attack, eps, defense, score, pq=None, adaptive=False, **kw):
    """A sweep cell of ``task``: the headline metric is ``score``, the task's other metrics are
    offsets of it; ``pq`` adds a panoptic PQ the report must ignore for this task."""
    cell = {
        "attack": attack,
        "objective": None if attack == "clean" else "train_losses",
        "eps": float(eps),
        "num_steps": 0 if attack == "clean" else (1 if attack == "fgsm" else STEPS[eps]),
        "step_size": 0.0 if attack == "clean" else 1.0,
        "random_start": False,
        "restarts": 1,
        "defense": defense,
        "adaptive": adaptive,
        "quantized": False,
        "task": task,
        "metric": HEADLINE[task],
        "model": MODEL[task],
        "attack_s_per_image": 0.0 if attack == "clean" else 0.1,
        "defense_s_per_image": 0.0 if defense == "none" else 0.05,
        "num_images": 10,
        "num_failed": 0,
        "failures": [],
    }
    for i, name in enumerate(TASK_METRICS[task]):
        cell[name] = score + 3.0 * i
    if pq is not None:
        cell["PQ"] = pq
    cell.update(kw)
    return cell


def make_cells(task, with_pq=False):
    """A monotone sweep; ``with_pq`` adds a PQ that is *inverted* in eps (ignored by the task)."""
    cells = [
        _cell(task, "clean", 0.0, d, v, pq=10.0 if with_pq else None) for d, v in CLEAN.items()
    ]
    for (attack, defense), values in SCORES.items():
        for k, (e, v) in enumerate(zip(EPS, values)):
            cells.append(
                _cell(task, attack, e, defense, v, pq=(20.0 + 10 * k) if with_pq else None)
            )
    return cells


def _find(cells, attack, eps, defense):
    return next(
        c for c in cells if c["attack"] == attack and c["eps"] == eps and c["defense"] == defense
    )


def _failed(checks):
    return [c["check"] for c in checks if not c["passed"]]


TASK_PARAMS = pytest.mark.parametrize("task", ["sem_seg", "instances"])


# ------------------------------------------------------------------------------------------------
# sanity checks
# ------------------------------------------------------------------------------------------------
@TASK_PARAMS
def test_checks_judge_the_headline_metric_not_pq(task):
    metric = HEADLINE[task]
    # Monotone headline, inverted PQ: nothing to flag (PQ is not this task's metric).
    cells = make_cells(task, with_pq=True)
    checks = sanity_checks(cells)
    assert _failed(checks) == []
    assert [c["detail"] for c in checks if c["check"] == "all_cells_scored"] == [
        f"{len(cells)} of {len(cells)} cells have a finite {metric}"
    ]
    # eps 16 scoring 5 points above eps 4: an inversion in the headline metric is flagged.
    cell = _find(cells, "fgsm", 16.0, "none")
    cell[metric] = _find(cells, "fgsm", 4.0, "none")[metric] + 5.0
    checks = sanity_checks(cells)
    name = "monotone_eps: fgsm/train_losses/none"
    assert _failed(checks) == [name]
    detail = next(c["detail"] for c in checks if c["check"] == name)
    assert f"{metric} by eps" in detail and "PQ" not in detail


@TASK_PARAMS
def test_tolerance_is_in_headline_points(task):
    metric = HEADLINE[task]

    def failed_with(delta):
        cells = make_cells(task)
        ref = _find(cells, "fgsm", 4.0, "median")[metric]
        _find(cells, "fgsm", 16.0, "median")[metric] = ref + delta
        return _failed(sanity_checks(cells))

    assert failed_with(METRIC_TOLERANCE - 0.1) == []
    assert failed_with(METRIC_TOLERANCE + 0.1) == ["monotone_eps: fgsm/train_losses/median"]


@TASK_PARAMS
def test_fgsm_stronger_and_unscored_cells_are_flagged_in_the_headline(task):
    metric = HEADLINE[task]
    cells = make_cells(task)
    _find(cells, "fgsm", 4.0, "median")[metric] = 30.0  # ifgsm: 35
    _find(cells, "fgsm", 1.0, "none")[metric] = None
    checks = sanity_checks(cells)
    assert _failed(checks) == [
        "all_cells_scored",
        "iterative_vs_single_step: ifgsm/train_losses/median eps=4",
    ]
    detail = next(c["detail"] for c in checks if c["check"] == _failed(checks)[1])
    assert f"ifgsm {metric} 35.00" in detail and f"fgsm {metric} 30.00" in detail


# ------------------------------------------------------------------------------------------------
# report files
# ------------------------------------------------------------------------------------------------
def _md_tables(md):
    """Markdown tables as lists of rows (each a list of cell strings), header first."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([v.strip() for v in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


@TASK_PARAMS
def test_write_report_headline_everywhere(task, tmp_path):
    metric, names = HEADLINE[task], TASK_METRICS[task]
    cells = make_cells(task)
    _find(cells, "fgsm", 16.0, "none")[metric] = _find(cells, "fgsm", 4.0, "none")[metric] + 5
    paths = write_report(cells, str(tmp_path), METADATA)

    md = open(paths["md"]).read()
    assert f"headline metric **{metric}**" in md and f"![{metric} vs eps](pq_vs_eps.png)" in md
    assert "**FAIL** `monotone_eps: fgsm/train_losses/none`" in md
    assert f"Tolerance: {METRIC_TOLERANCE:g} {metric} points" in md
    tables = _md_tables(md)
    clean_table = tables[0]
    assert clean_table[0][: 1 + len(names)] == ["defense", *names]
    assert all("PQ" not in h for t in tables for h in t[0])
    # The clean table's ratio column is recomputed from the cells.
    ratio_col = clean_table[0].index(f"{metric} / clean undefended")
    for row in clean_table[1:]:
        assert float(row[ratio_col]) == pytest.approx(CLEAN[row[0]] / CLEAN["none"], abs=1e-3)

    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    expected = list(CSV_COLUMNS) + list(names) + [f"{metric}_ratio", "task", "metric", "model"]
    assert reader.fieldnames == expected
    for cell, row in zip(cells, rows):
        ref = CLEAN[cell["defense"]]
        assert float(row[f"{metric}_ratio"]) == pytest.approx(cell[metric] / ref)
        assert row["PQ"] == "" and row["PQ_ratio"] == ""
        assert [float(row[n]) for n in names] == [cell[n] for n in names]
        assert (row["task"], row["metric"], row["model"]) == (task, metric, MODEL[task])

    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["cells"] == cells
    assert [c["check"] for c in data["checks"] if not c["passed"]] == [
        "monotone_eps: fgsm/train_losses/none"
    ]
    for key in ("pq_vs_eps", "time_vs_eps", "worst_case_vs_eps", "pq_by_size"):
        img = cv2.imread(paths[key])
        assert img is not None and img.std() > 5


@TASK_PARAMS
def test_metric_plot_axis_and_points(task):
    metric = HEADLINE[task]
    cells = make_cells(task)
    fig = metric_vs_eps_figure(cells)
    (ax,) = fig.axes
    assert ax.get_ylabel() == f"{metric} (%)"
    assert f"{metric} vs eps" in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    for (attack, defense), values in SCORES.items():
        label = f"{attack} (attacked)" if defense == "none" else f"{attack} + {defense} (defended)"
        assert list(lines[label].get_xdata()) == list(EPS)
        assert list(lines[label].get_ydata()) == list(values)
    assert list(lines["clean"].get_ydata()) == [CLEAN["none"]] * 2
    assert list(lines["clean + median"].get_ydata()) == [CLEAN["median"]] * 2


@TASK_PARAMS
def test_format_table_shows_the_task_metrics(task):
    cells = make_cells(task)
    lines = format_table(cells).splitlines()
    expected = {"sem_seg": ["mIoU", "fwIoU", "mACC", "pACC"], "instances": ["AP", "AP50", "AP75"]}
    assert lines[0].split() == ["attack", "eps", "defense", *expected[task], "s/img"]
    clean = lines[2].split()
    assert clean[:3] == ["clean", "clean", "none"]
    assert [float(v) for v in clean[3:-1]] == [60.0 + 3.0 * i for i in range(len(expected[task]))]


def test_ranking_keys_and_worst_case_follow_the_headline():
    cells = make_cells("sem_seg")
    cells.append(_cell("sem_seg", "ifgsm", 16.0, "median", 12.0, adaptive=True))
    ranking = {r["defense"]: r for r in defense_ranking(cells)}
    for d, r in ranking.items():
        assert r["metric"] == "mIoU" and not any("PQ" in k for k in r)
        mine = [c["mIoU"] for c in cells if c["defense"] == d and c["attack"] != "clean"]
        assert r["worst_mIoU"] == min(mine)
        assert r["clean_mIoU"] == CLEAN[d]
    assert ranking["median"]["worst_mIoU_adaptive"] == 12.0
    # Ranked by the worst case, higher first: median (12) before none (8).
    assert ranking["median"]["rank"] == 1 and ranking["none"]["rank"] == 2


def test_mixed_tasks_raise_and_split_by_model_task(tmp_path):
    panoptic = [
        _panoptic(c, task="panoptic_seg", metric="PQ", model="UPSNet")
        for c in make_cells("sem_seg")
    ]
    semantic = make_cells("sem_seg")
    with pytest.raises(ValueError, match="split_by_model_task"):
        write_report(panoptic + semantic, str(tmp_path / "mixed"), METADATA)
    assert not os.path.exists(tmp_path / "mixed" / "robustness.json")
    with pytest.raises(ValueError, match="models"):
        sanity_checks(semantic + [dict(semantic[0], model="OtherNet")])
    # Cells without a model name go with the named ones.
    assert sanity_checks(semantic + [{k: v for k, v in semantic[0].items() if k != "model"}])
    groups = split_by_model_task(panoptic + semantic)
    assert list(groups) == [("UPSNet", "panoptic_seg", "PQ"), ("SemanticFPN", "sem_seg", "mIoU")]
    assert groups[("SemanticFPN", "sem_seg", "mIoU")] == semantic
    for (model, task, metric), group in groups.items():
        paths = write_report(group, str(tmp_path / f"{model}_{task}"), METADATA)
        assert f"headline metric **{metric}**" in open(paths["md"]).read()


def test_attack_tables_are_long_and_do_not_widen_with_defenses(tmp_path, monkeypatch):
    for plot in ("plot_pq_vs_eps", "plot_time_vs_eps", "plot_worst_case_vs_eps", "plot_pq_by_size"):
        monkeypatch.setattr(report, plot, lambda cells, path: path)

    def attack_tables(defenses):
        cells = [_cell("sem_seg", "clean", 0.0, d, 60.0) for d in defenses]
        cells += [_cell("sem_seg", "ifgsm", e, d, 50.0 - e) for e in EPS for d in defenses]
        md = open(write_report(cells, str(tmp_path / str(len(defenses))), METADATA)["md"]).read()
        start = md.index("## Attack: ifgsm")
        return _md_tables(md[start : md.index("## Worst case")])

    (one,) = attack_tables(["none"])
    defenses = ["none", "median", "tvm", "jpeg", "bitdepth", "nlmeans"]
    (six,) = attack_tables(defenses)
    assert one[0] == six[0]  # same columns: a row per (eps, defense)
    assert len(six) == 1 + len(defenses) * (1 + len(EPS))
    body = six[1:]
    assert [r[:2] for r in body[: len(defenses)]] == [["clean", d] for d in defenses]
    col = six[0].index("mIoU")
    for eps in EPS:
        rows = [r for r in body if r[0] == f"{eps:g}"]
        assert [r[1] for r in rows] == defenses
        assert all(float(r[col]) == 50.0 - eps for r in rows)


def test_write_report_draws_with_the_package_plot_functions(tmp_path, monkeypatch):
    calls = []
    plots = ("pq_vs_eps", "time_vs_eps", "worst_case_vs_eps", "pq_by_size")
    for key in plots:
        monkeypatch.setattr(report, f"plot_{key}", lambda cells, path: calls.append(path))
    paths = write_report(make_cells("instances"), str(tmp_path), METADATA)
    assert calls == [paths[key] for key in plots]
    assert not os.path.exists(paths["pq_vs_eps"])


def _panoptic(cell, **keys):
    """The panoptic cell of a semantic one (mIoU -> PQ; SQ, RQ, PQ_th, PQ_st added), without
    task/metric/model (a cell of the panoptic-only sweep) unless given in ``keys``."""
    out = {
        k: v
        for k, v in cell.items()
        if k not in TASK_METRICS["sem_seg"] + ("task", "metric", "model")
    }
    out.update(PQ=cell["mIoU"], SQ=80.0, RQ=cell["mIoU"] * 1.2, PQ_th=1.0, PQ_st=2.0, **keys)
    return out


def test_csv_columns_of_panoptic_cells():
    old = [_panoptic(c) for c in make_cells("sem_seg")]
    assert csv_columns(old) == list(CSV_COLUMNS)
    new = [
        _panoptic(c, task="panoptic_seg", metric="PQ", model="UPSNet")
        for c in make_cells("sem_seg")
    ]
    assert csv_columns(new) == list(CSV_COLUMNS) + ["task", "metric", "model"]


# ------------------------------------------------------------------------------------------------
# example grids of every task
# ------------------------------------------------------------------------------------------------
H, W = 96, 160


def _metadata():
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get("cityscapes_fine_panoptic_val")


def _image():
    """A flat image: detectron2's Visualizer re-renders the image through matplotlib, which
    shifts some rows/columns of a small image by a pixel; on a flat image that shift changes
    nothing, so every changed pixel is a drawn one."""
    image = np.empty((H, W, 3), np.uint8)
    image[:] = (90, 120, 150)
    return image


def _segments():
    """A label map (255 = void) with a road band on top and a car block; the mask of both."""
    labels = np.full((H, W), 255, np.int64)
    labels[:24] = 0  # road (stuff)
    labels[60:88, 16:64] = 13  # car
    return labels, labels != 255


def _outputs(kind):
    labels, _ = _segments()
    if kind == "panoptic":
        ids = np.zeros((H, W), np.int32)
        ids[labels == 0], ids[labels == 13] = 1, 2
        info = [
            {"id": 1, "category_id": 0, "isthing": False},
            {"id": 2, "category_id": 13, "isthing": True},
        ]
        return {"panoptic_seg": (torch.from_numpy(ids), info)}
    if kind == "semantic_logits":
        # Scores at twice the image size (outputs are at the original resolution); the void
        # of the label map is building (2) here: every pixel has a drawable class.
        up = labels.repeat(2, axis=0).repeat(2, axis=1)
        up[up == 255] = 2
        logits = torch.zeros(19, 2 * H, 2 * W)
        for c in (0, 2, 13):
            logits[c, torch.from_numpy(up == c)] = 5.0
        return {"sem_seg": logits}
    return {"sem_seg": torch.from_numpy(labels)}


def _clean_panels(grid, top):
    y = top + LABEL_HEIGHT
    return grid[y : y + H, :W], grid[y : y + H, W : 2 * W]


def _changed(a, b):
    return np.abs(a.astype(int) - b.astype(int)).sum(axis=-1) > 0


@pytest.mark.parametrize("kind", ["panoptic", "semantic_labels", "semantic_logits"])
def test_example_grid_draws_the_clean_result(kind, tmp_path):
    clean = _image()
    adv = np.clip(clean.astype(np.float64) + 2.0, 0, 255)
    outputs = _outputs(kind)
    path = save_example_grid(
        str(tmp_path / "g.png"),
        clean,
        adv,
        outputs,
        _metadata(),
        panoptic_clean=outputs,
        title="t",
    )
    grid = cv2.imread(path)
    assert grid.shape[:2] == example_grid_shape(H, W, defended=False, title="t")
    image_panel, result_panel = _clean_panels(grid, TITLE_HEIGHT)
    assert np.array_equal(image_panel, clean)  # BGR in, BGR panel
    changed = _changed(result_panel, clean)
    _, drawn = _segments()
    assert changed[drawn].mean() > 0.9  # segments are painted over the clean image
    if kind == "semantic_logits":
        assert changed.mean() > 0.9  # every pixel has a class
    else:
        assert changed[~drawn].mean() < 0.1  # void is left as it is (but for label text)
    # The label strip of the clean result names the result's kind.
    y = TITLE_HEIGHT
    assert grid[y : y + LABEL_HEIGHT, W : 2 * W].max() > 100


def test_draw_result_forms_and_errors():
    clean = _image()
    labels, drawn = _segments()
    sem, kind = draw_result(clean, {"sem_seg": torch.from_numpy(labels), "foo": 1}, _metadata())
    assert kind == "semantic"
    same, kind2 = draw_result(clean, labels, _metadata())
    assert kind2 == "semantic" and np.array_equal(sem, same)
    pan, kind = draw_result(clean, _outputs("panoptic"), _metadata())
    assert kind == "panoptic" and _changed(pan, clean)[drawn].mean() > 0.9
    assert draw_result(clean, None, _metadata()) == (None, "")
    with pytest.raises(ValueError, match="panoptic_seg"):
        draw_result(clean, {"proposals": 1}, _metadata())
    with pytest.raises(ValueError, match="sem_seg"):
        draw_result(clean, np.zeros((1, 2, 3, 4)), _metadata())
    with pytest.raises(TypeError):
        draw_result(clean, "seg", _metadata())


def test_example_grid_draws_instances():
    from detectron2.structures import Boxes, Instances

    clean = _image()
    _, drawn = _segments()
    inst = Instances((2 * H, 2 * W))  # at twice the image size
    mask = torch.zeros(1, 2 * H, 2 * W, dtype=torch.bool)
    mask[0, 56:88, 16:72] = True
    inst.pred_masks = mask
    inst.pred_boxes = Boxes(torch.tensor([[16.0, 56.0, 72.0, 88.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([13])
    out, kind = draw_result(clean, {"instances": inst}, _metadata())
    assert kind == "instances" and out.shape == clean.shape
    car = np.zeros((H, W), bool)
    car[30:42, 10:34] = True  # inside the mask, away from its resized border
    assert _changed(out, clean)[car].mean() > 0.9


class _FakeSemanticModel(torch.nn.Module):
    """Predicts road on the top band and car on the block of :func:`_segments`, at the input
    dict's ``height x width``; records the mode and grad state of each call."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, batched_inputs):
        self.calls.append((self.training, torch.is_grad_enabled(), batched_inputs[0]["image"]))
        labels, _ = _segments()
        labels[labels == 255] = 2  # building elsewhere
        logits = torch.zeros(19, H, W) + self.weight
        for c in (0, 2, 13):
            logits[c, torch.from_numpy(labels == c)] = 5.0
        return [{"sem_seg": logits}]


def test_example_grids_are_titled_and_labelled_by_their_threat_kind(tmp_path, monkeypatch):
    """A corruption's grid says "corrupted" and names corruption and severity; an attack's says
    "adversarial" and eps."""
    from conftest import tiny_cfg

    from upsnet_robust.evaluation import run

    calls = []
    monkeypatch.setattr(run, "save_example_grid", lambda *a, **kw: calls.append(kw))
    cfg = tiny_cfg("DATASETS.TEST", "('cityscapes_fine_panoptic_val',)")
    write = run._example_writer(cfg, str(tmp_path), _FakeSemanticModel())
    clean = torch.from_numpy(_image()).permute(2, 0, 1).float()
    x = {"image": clean.to(torch.uint8), "image_id": "img0", "height": H, "width": W}
    out = {"none": {"sem_seg": torch.zeros(19, H, W)}}
    fog = ThreatSpec.make("corruption", "fog", params={"corruption": "fog", "severity": 3})
    write(fog, x, clean, clean, {"none": clean}, out, clean_outputs=out["none"])
    write(ThreatSpec.make("attack", "pgd", eps=8.0), x, clean, clean, {"none": clean}, out,
          clean_outputs=out["none"])
    assert [c["perturbed_label"] for c in calls] == ["corrupted", "adversarial"]
    assert calls[0]["title"] == "fog severity 3 img0" and calls[1]["title"] == "pgd eps=8 img0"


def test_example_writer_infers_and_draws_the_clean_prediction(tmp_path):
    from conftest import tiny_cfg

    from upsnet_robust.evaluation.run import _example_writer

    cfg = tiny_cfg("DATASETS.TEST", "('cityscapes_fine_panoptic_val',)", "INPUT.FORMAT", "BGR")
    model = _FakeSemanticModel().train()
    write = _example_writer(cfg, str(tmp_path), model)
    clean = torch.from_numpy(_image()).permute(2, 0, 1).float()
    adv = (clean + 3.0).clamp(0, 255)
    x = {"image": clean.to(torch.uint8), "image_id": "img0", "height": H, "width": W}
    spec = ThreatSpec.make("attack", "ifgsm", eps=4.0)
    write(spec, x, clean, adv, {"none": adv}, {"none": {"sem_seg": torch.zeros(19, H, W)}})

    assert len(model.calls) == 1
    training, grad, image = model.calls[0]
    assert not training and not grad and torch.equal(image, clean)
    assert model.training  # mode restored
    grid = cv2.imread(str(tmp_path / "examples" / "ifgsm_eps4_img0.png"))
    image_panel, result_panel = _clean_panels(grid, TITLE_HEIGHT)
    assert np.array_equal(image_panel, _image())
    # Road, car and building are painted over the image, each in its own colour.
    assert _changed(result_panel, image_panel).mean() > 0.9
    road, car, building = (
        tuple(np.median(result_panel[rows, cols].reshape(-1, 3), axis=0))
        for rows, cols in ((slice(4, 12), slice(100, 140)), (slice(70, 80), slice(30, 50)),
                           (slice(40, 50), slice(100, 140)))
    )  # fmt: skip
    assert len({road, car, building}) == 3

    # Clean outputs given by the caller (the sweep): the model is not run again.
    write(
        spec,
        dict(x, image_id="img1"),
        clean,
        adv,
        {"none": adv},
        {},
        clean_outputs=_outputs("panoptic"),
    )
    assert len(model.calls) == 1
    grid = cv2.imread(str(tmp_path / "examples" / "ifgsm_eps4_img1.png"))
    image_panel, result_panel = _clean_panels(grid, TITLE_HEIGHT)
    _, drawn = _segments()
    changed = _changed(result_panel, image_panel)
    assert changed[drawn].mean() > 0.9 and changed[~drawn].mean() < 0.1
