# Copyright (c) UPSNetRobust authors.
"""The cells' breakdowns in the report: the ResultCell field, the per-class drop tables, PQ by
segment size and the worst case over attacks (tables and figures). Cells are hand-made; every
expected number is recomputed here from the cells, never copied from the report."""

import copy
import json
import os

import cv2
import pytest

from upsnet_robust.evaluation.breakdown import per_class_results
from upsnet_robust.evaluation.report import (
    ResultCell,
    as_cells,
    per_class_drops,
    plot_pq_by_size,
    plot_worst_case_vs_eps,
    size_series,
    worst_case_curve,
    write_report,
)
from upsnet_robust.evaluation.report.plots import pq_by_size_figure, worst_case_figure

CLASSES = ("road", "car", "person")
BUCKETS = ("small", "medium", "large")
METADATA = {"date": "2024-01-01T00:00:00", "hardware": "test"}


def _breakdown(pq):
    """A panoptic breakdown whose values derive from the cell's PQ (distinct per class/bucket)."""
    return {
        "size": {b: {"PQ": pq * f, "SQ": 70.0, "RQ": pq * f * 1.2, "n": 3 - i}
                 for i, (b, f) in enumerate(zip(BUCKETS, (0.5, 0.8, 1.1)))},
        "things": {"PQ": pq - 5, "SQ": 70.0, "RQ": pq, "n": 2},
        "stuff": {"PQ": pq + 5, "SQ": 70.0, "RQ": pq, "n": 1},
        # road barely drops, car the most: the drop order differs from the class order
        "per_class": {n: {"PQ": v, "SQ": 70.0, "RQ": pq}
                      for n, v in zip(CLASSES, (68.0 + pq * 0.2, pq * 0.9, pq * 0.4))},
    }  # fmt: skip


def _cell(attack, eps, pq, defense="none", steps=None, breakdown=True, **kw):
    cell = {
        "attack": attack,
        "objective": None if attack == "clean" else "train_losses",
        "eps": float(eps),
        "num_steps": 0 if attack == "clean" else (steps or (1 if attack == "fgsm" else 5)),
        "step_size": 0.0 if attack == "clean" else 1.0,
        "random_start": False,
        "restarts": 1,
        "defense": defense,
        "adaptive": False,
        "quantized": False,
        "PQ": pq,
        "SQ": 70.0,
        "RQ": pq * 1.2,
        "PQ_th": pq - 5,
        "PQ_st": pq + 5,
        "num_images": 4,
        "num_failed": 0,
        "failures": [],
    }
    if breakdown:
        cell["breakdown"] = _breakdown(pq)
    cell.update(kw)
    return cell


def make_cells():
    cells = [_cell("clean", 0, 60.0), _cell("clean", 0, 65.0, defense="median")]
    for attack, values in (("fgsm", (50.0, 30.0)), ("ifgsm", (40.0, 12.0))):
        for e, v in zip((4.0, 16.0), values):
            cells += [_cell(attack, e, v), _cell(attack, e, v + 8, defense="median")]
    # A stronger ifgsm setting at eps 16 (more steps): the report's reference there.
    cells.append(_cell("ifgsm", 16.0, 10.0, steps=20))
    # An ensemble cell: the worst case at eps 16 with the median filter, like any attack.
    members = [{"attack": "apgd", "objective": o, "num_steps": 20, "PQ": v}
               for o, v in (("masked_ce", 9.0), ("js_divergence", 15.0))]  # fmt: skip
    cells.append(_cell("sea", 16.0, 9.0, defense="median", members=members))
    return cells


def _md_tables(text):
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([v.strip() for v in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def md_checks(paths):
    return _section(open(paths["md"]).read(), "## Sanity checks")


def _section(md, title):
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start : end if end >= 0 else len(md)]


# ------------------------------------------------------------------------------------------------
def test_breakdown_field_round_trip_and_validation():
    cell = _cell("ifgsm", 4.0, 40.0)
    rc = ResultCell.from_dict(cell)
    assert rc.breakdown == cell["breakdown"] and "breakdown" not in rc.extra
    back = rc.to_dict()
    assert back == cell and list(back) == list(cell)
    assert json.dumps(back) == json.dumps(cell)
    # An old cell without it stays without it.
    old = _cell("ifgsm", 4.0, 40.0, breakdown=False)
    rc = ResultCell.from_dict(old)
    assert rc.breakdown is None and list(rc.to_dict()) == list(old)
    # A constructed cell writes it only when set.
    assert "breakdown" not in ResultCell(attack="fgsm", eps=4.0).to_dict()
    assert ResultCell(attack="fgsm", breakdown={"per_class": {}}).to_dict()["breakdown"] == {
        "per_class": {}
    }
    with pytest.raises(ValueError, match="breakdown"):
        ResultCell.from_dict(dict(cell, breakdown=[1, 2]))


def test_worst_case_curve_is_the_per_eps_minimum_over_attacks():
    cells = make_cells()
    curves = worst_case_curve(as_cells(cells))
    assert list(curves) == ["none", "median"]
    for d, points in curves.items():
        mine = [c for c in cells if c["defense"] == d and c["attack"] != "clean"]
        expected = {}
        for c in mine:
            if c["eps"] not in expected or c["PQ"] < expected[c["eps"]]["PQ"]:
                expected[c["eps"]] = c
        assert [e for e, _ in points] == sorted(expected)
        for e, cell in points:
            assert (cell.attack, cell.score) == (expected[e]["attack"], expected[e]["PQ"])
    assert curves["median"][-1][1].attack == "sea"  # an ensemble counts like any attack

    fig = worst_case_figure(cells)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["worst case"].get_ydata()) == [c.score for _, c in curves["none"]]
    assert list(lines["worst case + median"].get_ydata()) == [c.score for _, c in curves["median"]]
    assert list(lines["clean (eps 0)"].get_ydata()) == [60.0] * 2
    assert "sea" in [t.get_text() for t in ax.texts]


def test_size_series_and_plot_follow_the_strongest_undefended_cell(tmp_path):
    cells = make_cells()
    data = size_series(as_cells(cells))
    assert data["clean"] == {b: v["PQ"] for b, v in _breakdown(60.0)["size"].items()}
    series = data["series"]
    assert list(series) == [("fgsm", "train_losses"), ("ifgsm", "train_losses")]
    # ifgsm at eps 16: the 20-step cell (PQ 10) is stronger than the 5-step one (12).
    ifgsm = dict(series[("ifgsm", "train_losses")])
    assert ifgsm[16.0] == {b: v["PQ"] for b, v in _breakdown(10.0)["size"].items()}

    fig = pq_by_size_figure(cells)
    assert [ax.get_title() for ax in fig.axes] == [f"{b} segments" for b in BUCKETS]
    for ax, bucket in zip(fig.axes, BUCKETS):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["ifgsm"].get_xdata()) == [4.0, 16.0]
        expected = [_breakdown(v)["size"][bucket]["PQ"] for v in (40.0, 10.0)]
        assert list(lines["ifgsm"].get_ydata()) == expected
        assert lines["clean (eps 0)"].get_ydata()[0] == _breakdown(60.0)["size"][bucket]["PQ"]
        assert "eps" in ax.get_xlabel() and "PQ" in ax.get_ylabel()

    for plot, name in ((plot_pq_by_size, "size.png"), (plot_worst_case_vs_eps, "worst.png")):
        path = plot(cells, str(tmp_path / name))
        img = cv2.imread(path)
        assert os.path.getsize(path) > 0 and img is not None and img.std() > 5


def test_per_class_drop_table_in_the_report(tmp_path):
    cells = make_cells()
    paths = write_report(cells, str(tmp_path), METADATA)
    assert "FAIL" not in md_checks(paths)  # consistent cells: the sea cell passes its check
    for key in ("pq_by_size", "worst_case_vs_eps"):
        assert os.path.getsize(paths[key]) > 0 and cv2.imread(paths[key]) is not None
    md = open(paths["md"]).read()
    assert "![PQ by segment size](pq_by_size.png)" in md
    assert "(worst_case_vs_eps.png)" in md
    clean = _breakdown(60.0)["per_class"]
    section = _section(md, "## Per-class PQ drop")
    for attack, pq in (("fgsm", 30.0), ("ifgsm", 10.0)):  # largest eps, strongest, undefended
        sub = section[section.index(f"### {attack} at eps 16") :]
        table = _md_tables(sub)[0]
        assert table[0] == ["class", "clean PQ", f"{attack} PQ", "drop"]
        attacked = _breakdown(pq)["per_class"]
        drops = {n: clean[n]["PQ"] - attacked[n]["PQ"] for n in CLASSES}
        assert [r[0] for r in table[1:]] == sorted(CLASSES, key=lambda n: -drops[n])
        for name, c, a, d in table[1:]:
            assert float(c) == pytest.approx(clean[name]["PQ"], abs=0.005)
            assert float(a) == pytest.approx(attacked[name]["PQ"], abs=0.005)
            assert float(d) == pytest.approx(drops[name], abs=0.005)
    assert "### sea" not in section  # sea ran only with the median filter

    # The worst-case table names the worst attack per eps and defense.
    worst = _md_tables(_section(md, "## Worst case over attacks"))[0]
    assert worst[0] == ["eps", "none worst PQ (attack)", "median worst PQ (attack)"]
    assert worst[2] == ["16", "10.00 (ifgsm)", "9.00 (sea)"]
    size = _md_tables(_section(md, "## PQ by segment size"))[0]
    assert size[1][:5] == ["clean", "-", "60.00", "55.00", "65.00"]
    assert size[1][5] == f"{60.0 * 0.5:.2f} (3)"


def test_cells_without_breakdown_report_na(tmp_path):
    cells = [{k: v for k, v in c.items() if k != "breakdown"} for c in make_cells()]
    clean_only = copy.deepcopy(cells)
    paths = write_report(cells, str(tmp_path / "old"), METADATA)
    md = open(paths["md"]).read()
    section = _section(md, "## Per-class PQ drop")
    assert "n/a: neither the clean nor the attacked cell has per-class PQ" in section
    size = _md_tables(_section(md, "## PQ by segment size"))[0]
    assert size[1][3:] == ["n/a"] * 5
    assert cv2.imread(paths["pq_by_size"]) is not None
    assert "n/a" in pq_by_size_figure(cells)._suptitle.get_text()
    # Only the clean cell has one: the attacked values are n/a, the table still lists classes.
    clean_only[0]["breakdown"] = _breakdown(60.0)
    (t, *_) = per_class_drops(as_cells(clean_only), "panoptic_seg")
    assert [r["class"] for r in t["rows"]] == list(CLASSES)
    assert all(r["attacked"] is None and r["drop"] is None for r in t["rows"])
    assert t["clean_available"] and not t["attacked_available"]


def test_semantic_per_class_drop_uses_iou(tmp_path):
    def sem(attack, eps, miou, iou):
        cell = _cell(attack, eps, miou, breakdown=False, task="sem_seg", metric="mIoU", mIoU=miou)
        for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
            del cell[k]
        cell["breakdown"] = {"per_class": {n: {"IoU": v, "ACC": v} for n, v in iou.items()}}
        return cell

    cells = [sem("clean", 0, 60.0, {"road": 90.0, "car": 30.0}),
             sem("pgd", 8, 20.0, {"road": 50.0, "car": None})]  # fmt: skip
    paths = write_report(cells, str(tmp_path), METADATA)
    md = open(paths["md"]).read()
    table = _md_tables(_section(md, "## Per-class IoU drop"))[0]
    assert table == [
        ["class", "clean IoU", "pgd IoU", "drop"],
        ["road", "90.00", "50.00", "40.00"],
        ["car", "30.00", "n/a", "n/a"],
    ]
    assert "## PQ by segment size" not in md


def test_per_class_results_read_detectron2_keys():
    sem = {"sem_seg": {"mIoU": 50.0, "IoU-road": 90.0, "IoU-traffic-light": float("nan"),
                       "ACC-road": 95.0, "ACC-traffic-light": float("nan"), "mACC": 60.0,
                       "BoundaryIoU-road": 10.0, "min(IoU, B-Iou)-road": 10.0}}  # fmt: skip
    assert per_class_results("sem_seg", sem) == {
        "road": {"IoU": 90.0, "ACC": 95.0},
        "traffic-light": {"IoU": None, "ACC": None},
    }
    inst = {"bbox": {"AP": 1.0, "AP-car": 3.0}, "segm": {"AP": 2.0, "AP-car": 4.0, "APs": 1.0}}
    assert per_class_results("instances", inst) == {"car": {"AP": 4.0}}
    assert per_class_results("instances", {"bbox": {"AP": 1.0, "AP-car": 3.0}}) == {
        "car": {"AP": 3.0}
    }
    assert per_class_results("instances", {"segm": {"AP": 2.0}}) is None
    assert per_class_results("panoptic_seg", sem) is None
