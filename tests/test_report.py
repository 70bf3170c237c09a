# Copyright (c) UPSNetRobust authors.
"""Tests of the robustness report writers and example grids (pure functions, no model)."""

import csv
import json
import os
import re

import cv2
import numpy as np
import pytest

from upsnet_robust.evaluation.examples import (
    LABEL_HEIGHT,
    TITLE_HEIGHT,
    amplified_difference,
    example_grid_shape,
    save_example_grid,
)
from upsnet_robust.evaluation.report import (
    CSV_COLUMNS,
    PQ_TOLERANCE,
    THREAT_MODEL,
    defense_ranking,
    format_table,
    pq_ratios,
    sanity_checks,
    write_report,
)

EPS = (0.25, 1.0, 4.0, 16.0)
STEPS = {0.25: 1, 1.0: 2, 4.0: 5, 16.0: 20}  # Kurakin's T with ceil rounding
CLEAN_PQ = {"none": 60.0, "nlmeans": 55.0}
# Monotone PQ per (attack, defense); ifgsm is stronger than fgsm everywhere.
PQ = {
    ("fgsm", "none"): (58.0, 50.0, 35.0, 20.0),
    ("ifgsm", "none"): (57.0, 45.0, 25.0, 8.0),
    ("fgsm", "nlmeans"): (54.0, 50.0, 40.0, 30.0),
    ("ifgsm", "nlmeans"): (53.0, 48.0, 35.0, 22.0),
}
FAILURE = {"image_id": "frankfurt_000000_000294", "reason": "non-finite gradient"}


def _cell(attack, eps, defense, pq, num_steps=None, adaptive=False, **kw):
    cell = {
        "attack": attack,
        "objective": None if attack == "clean" else "train_losses",
        "eps": float(eps),
        "num_steps": (
            0
            if attack == "clean"
            else (num_steps if num_steps is not None else (1 if attack == "fgsm" else STEPS[eps]))
        ),
        "step_size": 0.0 if attack == "clean" else (eps if attack == "fgsm" else 1.0),
        "random_start": False,
        "restarts": 1,
        "defense": defense,
        "adaptive": adaptive,
        "quantized": False,
        "PQ": pq,
        "SQ": 70.0 + pq / 10,
        "RQ": pq * 1.2,
        "PQ_th": pq - 5,
        "PQ_st": pq + 5,
        "attack_s_per_image": 0.0 if attack == "clean" else 0.1 * (num_steps or STEPS.get(eps, 1)),
        "defense_s_per_image": 0.0 if defense == "none" else 0.05,
        "num_images": 30,
        "num_failed": 0,
        "failures": [],
    }
    cell.update(kw)
    return cell


def make_cells():
    cells = [_cell("clean", 0.0, d, pq) for d, pq in CLEAN_PQ.items()]
    for (attack, defense), values in PQ.items():
        cells += [_cell(attack, e, defense, v) for e, v in zip(EPS, values)]
    # One image failed in the ifgsm eps=16 pass (both defenses score the same pass).
    for c in cells:
        if c["attack"] == "ifgsm" and c["eps"] == 16.0:
            c.update(num_images=29, num_failed=1, failures=[dict(FAILURE)])
    return cells


def _find(cells, attack, eps, defense):
    return next(
        c for c in cells if c["attack"] == attack and c["eps"] == eps and c["defense"] == defense
    )


def _failed(checks):
    return [c for c in checks if not c["passed"]]


METADATA = {
    "hardware": "2 CPU cores (test)",
    "config_file": "configs/Synthetic/upsnet_tiny_robustness.yaml",
    "weights": "model_final.pth",
    "date": "2024-01-01T00:00:00",
    "seed": 0,
}


# ------------------------------------------------------------------------------------------------
def test_write_report_files(tmp_path):
    cells = make_cells()
    paths = write_report(cells, str(tmp_path / "out"), METADATA)
    # two defense rows (none, nlmeans): the robustness-accuracy trade-off figure too
    assert set(paths) == {
        "json", "csv", "md", "pq_vs_eps", "time_vs_eps", "worst_case_vs_eps", "pq_by_size",
        "tradeoff",
    }
    for p in paths.values():
        assert os.path.isfile(p) and os.path.getsize(p) > 0
    # Atomic writes leave no temp files behind.
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        os.path.basename(p) for p in paths.values()
    )

    with open(paths["json"]) as f:
        data = json.load(f)
    assert set(data) == {"metadata", "cells", "checks"}
    assert data["metadata"] == METADATA
    assert data["cells"] == cells
    assert data["checks"] and all(c["passed"] for c in data["checks"])

    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(rows) == len(cells)
    assert [r["attack"] for r in rows] == [c["attack"] for c in cells]

    md = open(paths["md"]).read()
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    for eps in ("clean", "0.25", "1", "4", "16"):
        # One row per eps in each attack table (fgsm, ifgsm); the worst-case table adds one.
        assert sum(line.startswith(f"| {eps} |") for line in table_rows) >= 2, eps
    assert "## Sanity checks" in md and "**FAIL**" not in md
    assert THREAT_MODEL in md
    for key in ("hardware", "config_file", "weights", "date"):
        assert METADATA[key] in md
    assert "## Attack: fgsm" in md and "## Attack: ifgsm" in md
    assert FAILURE["image_id"] in md and FAILURE["reason"] in md

    for key in ("pq_vs_eps", "time_vs_eps", "worst_case_vs_eps"):
        img = cv2.imread(paths[key])
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 5  # not a blank canvas


def test_pq_ratio_in_csv(tmp_path):
    cells = make_cells()
    # A defense without its own clean cell falls back to the clean undefended PQ.
    cells.append(_cell("ifgsm", 4.0, "median", 30.0))
    paths = write_report(cells, str(tmp_path), METADATA)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    for cell, row, ratio in zip(cells, rows, pq_ratios(cells)):
        ref = CLEAN_PQ.get(cell["defense"], CLEAN_PQ["none"])
        assert float(row["PQ_ratio"]) == pytest.approx(cell["PQ"] / ref)
        assert ratio == pytest.approx(cell["PQ"] / ref)
        assert float(row["eps"]) == cell["eps"] and row["defense"] == cell["defense"]
    assert float(rows[-1]["PQ_ratio"]) == pytest.approx(0.5)
    assert float(rows[0]["PQ_ratio"]) == 1.0  # clean, undefended
    # No clean cells at all: ratios are empty, not invented.
    assert pq_ratios([c for c in cells if c["attack"] != "clean"]) == [None] * (len(cells) - 2)


def test_sanity_checks_pass_on_monotone_data():
    checks = sanity_checks(make_cells())
    assert not _failed(checks), _failed(checks)
    kinds = [c["check"].split(":")[0] for c in checks]
    assert kinds.count("monotone_eps") == 4  # (fgsm, ifgsm) x (none, nlmeans)
    assert kinds.count("iterative_vs_single_step") == 8  # 4 eps x 2 defenses
    assert kinds.count("all_cells_scored") == 1


def _non_monotone(cells):
    _find(cells, "fgsm", 16.0, "none")["PQ"] = 40.0  # above eps=4's 35
    return "monotone_eps: fgsm/train_losses/none"


def _fgsm_stronger(cells):
    _find(cells, "fgsm", 4.0, "nlmeans")["PQ"] = 30.0  # ifgsm has 35 at eps 4
    return "iterative_vs_single_step: ifgsm/train_losses/nlmeans eps=4"


def _adaptive_weaker(cells):
    cells.append(_cell("ifgsm", 4.0, "nlmeans", 45.0, adaptive=True))  # transfer: 35
    return "adaptive_vs_transfer: ifgsm/train_losses/nlmeans eps=4"


def _more_steps_weaker(cells):
    cells.append(_cell("ifgsm", 4.0, "none", 40.0, num_steps=10))  # 5 steps: 25
    return "more_steps: ifgsm/train_losses/none eps=4"


def _more_restarts_weaker(cells):
    cells.append(_cell("ifgsm", 4.0, "none", 40.0, restarts=5))  # 1 restart: 25
    return "more_restarts: ifgsm/train_losses/none eps=4 steps=5"


def _missing_pq(cells):
    _find(cells, "fgsm", 1.0, "none")["PQ"] = float("nan")
    return "all_cells_scored"


@pytest.mark.parametrize(
    "corrupt",
    [
        _non_monotone,
        _fgsm_stronger,
        _adaptive_weaker,
        _more_steps_weaker,
        _more_restarts_weaker,
        _missing_pq,
    ],
)
def test_sanity_checks_flag_violations(corrupt, tmp_path, monkeypatch):
    cells = make_cells()
    name = corrupt(cells)
    checks = sanity_checks(cells)
    assert [c["check"] for c in _failed(checks)] == [name]
    # The flag reaches both the Markdown and the JSON report (plots are tested elsewhere; stub
    # them to keep this test fast).
    import upsnet_robust.evaluation.report as report

    for plot in ("plot_pq_vs_eps", "plot_time_vs_eps", "plot_worst_case_vs_eps", "plot_pq_by_size"):
        monkeypatch.setattr(report, plot, lambda cells, path: path)
    paths = write_report(cells, str(tmp_path), METADATA)
    md = open(paths["md"]).read()
    assert f"**FAIL** `{name}`" in md
    assert "1 FAILED" in md
    with open(paths["json"]) as f:
        data = json.load(f)  # strict JSON: NaN was written as null
    flagged = [c for c in data["checks"] if not c["passed"]]
    assert [c["check"] for c in flagged] == [name] and flagged[0]["detail"]


def test_monotone_tolerance_and_drift():
    def checks_for(values):
        cells = [_cell("clean", 0.0, "none", values[0])]
        cells += [_cell("ifgsm", e, "none", v) for e, v in zip(EPS, values[1:])]
        return {c["check"]: c["passed"] for c in sanity_checks(cells)}

    name = "monotone_eps: ifgsm/train_losses/none"
    assert checks_for([60, 50, 50 + PQ_TOLERANCE - 0.1, 40, 30])[name]
    assert not checks_for([60, 50, 50 + PQ_TOLERANCE + 0.1, 40, 30])[name]
    # A slow upward drift within tolerance per step is still caught (compared to the minimum).
    assert not checks_for([60, 50, 50.4, 50.8, 51.2])[name]


def test_format_table():
    cells = make_cells()
    cells.append(_cell("ifgsm", 4.0, "nlmeans", 12.34, adaptive=True))
    lines = format_table(cells).splitlines()
    assert len(lines) == 2 + len(cells)
    # The dashes under the header give each column's extent; every line has its fields inside
    # them (text columns left-aligned, numbers right-aligned) and only blanks between them.
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    assert len(spans) == 7 and lines[1] == "  ".join("-" * (b - a) for a, b in spans)
    rows = []
    for line in [lines[0]] + lines[2:]:
        padded = line.ljust(spans[-1][1])
        assert len(padded) == spans[-1][1], line
        assert all(padded[b:a].strip() == "" for (_, b), (a, _) in zip(spans, spans[1:])), line
        fields = [padded[a:b] for a, b in spans]
        for i, field in enumerate(fields):
            value = field.strip()
            aligned = value.ljust(len(field)) if i in (0, 2) else value.rjust(len(field))
            assert field == aligned, (line, i)
        rows.append(tuple(f.strip() for f in fields))
    assert rows[0] == ("attack", "eps", "defense", "PQ", "SQ", "RQ", "s/img")
    expected = [
        (
            c["attack"] + (" (adaptive)" if c["adaptive"] else ""),
            "clean" if c["attack"] == "clean" else f"{c['eps']:g}",
            c["defense"],
            f"{c['PQ']:.1f}",
            f"{c['SQ']:.1f}",
            f"{c['RQ']:.1f}",
            f"{c['attack_s_per_image'] + c['defense_s_per_image']:.3f}",
        )
        for c in cells
    ]
    assert sorted(rows[1:]) == sorted(expected)
    assert [r[0] for r in rows[1:3]] == ["clean", "clean"]  # clean rows first
    assert ("ifgsm (adaptive)", "4", "nlmeans", "12.3", "71.2", "14.8", "0.550") in rows


# ------------------------------------------------------------------------------------------------
# defense ranking (the README's ranking table comes from it)
# ------------------------------------------------------------------------------------------------
def _ranking_cells():
    """Defenses with known worst cases, tie-breaks and a defense without attacked cells.

    worst PQ / mean over eps of the per-eps worst / clean PQ:
    none 20 / 30 / 60; A 25 / 35 / 55; B 25 / 36 / 50; C 33 (transfer only) / 42.5 / 58;
    D and E 25 / 35 / 52 (a full tie); F: clean only.
    """
    clean = {"none": 60.0, "A": 55.0, "B": 50.0, "C": 58.0, "D": 52.0, "E": 52.0, "F": 57.0}
    cells = [_cell("clean", 0.0, d, pq) for d, pq in clean.items()]
    unaware = {
        "none": (40.0, 20.0), "A": (50.0, 35.0), "B": (48.0, 30.0), "C": (52.0, 33.0),
        "D": (46.0, 28.0), "E": (46.0, 28.0),
    }  # fmt: skip
    adaptive = {"A": (45.0, 25.0), "B": (47.0, 25.0), "D": (45.0, 25.0), "E": (45.0, 25.0)}
    for d, values in unaware.items():
        cells += [_cell("ifgsm", e, d, v) for e, v in zip((1.0, 4.0), values)]
    for d, values in adaptive.items():
        cells += [
            _cell("ifgsm", e, d, v, adaptive=True, surrogate=f"sur-{d}", eot_samples=2,
                  attack_s_per_image=e)
            for e, v in zip((1.0, 4.0), values)
        ]  # fmt: skip
    cells.append(_cell("fgsm", 4.0, "A", 32.0))  # A's transfer worst at eps 4 is fgsm's
    cells.append(_cell("fgsm", 1.0, "B", float("nan")))  # unscored: ignored
    cells.append(_cell("fgsm", 16.0, "B", 0.0, PQ=None))  # unscored eps: no per-eps worst case
    return cells


def test_defense_ranking_on_hand_made_cells():
    ranking = defense_ranking(_ranking_cells())
    order = [(r["defense"], r["rank"]) for r in ranking]
    # worst case first; B before A on the mean over eps; A before D/E on clean PQ; D and E
    # tie fully and share rank 4; F has no attacked cell: unranked, last
    assert order == [("C", 1), ("B", 2), ("A", 3), ("D", 4), ("E", 4), ("none", 6), ("F", None)]
    r = {x["defense"]: x for x in ranking}
    assert [r[d]["worst_PQ"] for d in ("C", "B", "A", "D", "none")] == [33.0, 25.0, 25.0, 25.0, 20.0]
    assert r["B"]["mean_worst_PQ_over_eps"] == pytest.approx(36.0)
    assert r["A"]["mean_worst_PQ_over_eps"] == pytest.approx(35.0)
    assert r["C"]["mean_worst_PQ_over_eps"] == pytest.approx(42.5)
    assert r["A"]["per_eps"] == [
        {"eps": 1.0, "unaware_PQ": 50.0, "adaptive_PQ": 45.0, "worst_PQ": 45.0},
        {"eps": 4.0, "unaware_PQ": 32.0, "adaptive_PQ": 25.0, "worst_PQ": 25.0},
    ]
    assert r["C"]["per_eps"][1] == {"eps": 4.0, "unaware_PQ": 33.0, "adaptive_PQ": None, "worst_PQ": 33.0}
    assert r["A"]["worst_PQ_unaware"] == 32.0 and r["A"]["worst_PQ_adaptive"] == 25.0
    assert r["A"]["worst_setting"] == {
        "attack": "ifgsm", "objective": "train_losses", "eps": 4.0, "adaptive": True,
    }  # fmt: skip
    assert r["C"]["worst_setting"]["adaptive"] is False
    assert r["C"]["worst_PQ_adaptive"] is None and not r["C"]["adaptively_evaluated"]
    assert r["none"]["adaptively_evaluated"] and r["A"]["adaptively_evaluated"]
    assert {d: r[d]["clean_PQ_cost"] for d in ("none", "A", "F")} == {"none": 0.0, "A": 5.0, "F": 3.0}
    assert r["A"]["surrogate"] == "sur-A" and r["A"]["eot_samples"] == 2 and r["C"]["surrogate"] is None
    assert r["none"]["defense_s_per_image"] == 0.0 and r["A"]["defense_s_per_image"] == 0.05
    assert r["A"]["adaptive_attack_s_per_image"] == pytest.approx(2.5)  # mean of 1 and 4
    assert r["F"]["worst_PQ"] is None and r["F"]["clean_PQ"] == 57.0


def test_defense_ranking_reaches_json_and_markdown(tmp_path, monkeypatch):
    import upsnet_robust.evaluation.report as report

    monkeypatch.setattr(report, "plot_pq_vs_eps", lambda cells, path: path)
    monkeypatch.setattr(report, "plot_time_vs_eps", lambda cells, path: path)
    cells = _ranking_cells()
    paths = write_report(cells, str(tmp_path / "a"), METADATA)
    with open(paths["json"]) as f:
        data = json.load(f)
    assert [(x["defense"], x["rank"]) for x in data["defense_ranking"]] == [
        (x["defense"], x["rank"]) for x in defense_ranking(cells)
    ]
    md = open(paths["md"]).read()
    section = md.split("## Defenses ranked by worst case")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0].startswith("| rank | defense |") and set(table[1]) <= set("|-: ")
    rows = [line.split("|")[1:3] for line in table[2:]]
    assert [(a.strip(), b.strip()) for a, b in rows] == [
        ("1 †", "C"), ("2", "B"), ("3", "A"), ("4", "D"), ("4", "E"), ("6", "none"), ("-", "F")
    ]  # fmt: skip
    assert "† no adaptive attack on this defense" in section
    # Without adaptive cells: no ranking in the JSON, and the Markdown says so.
    paths = write_report([c for c in cells if not c["adaptive"]], str(tmp_path / "b"), METADATA)
    with open(paths["json"]) as f:
        assert "defense_ranking" not in json.load(f)
    assert "defenses are not ranked" in open(paths["md"]).read()


# ------------------------------------------------------------------------------------------------
def test_amplified_difference_matches_float64():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, size=(9, 11, 3))
    b = np.clip(a + rng.uniform(-3, 3, size=a.shape), 0, 255).astype(np.float32)
    for amp in (1.0, 10.0, 37.5):
        out = amplified_difference(a, b, amp)
        ref = np.clip(amp * np.abs(a.astype(np.float64) - b.astype(np.float64)), 0, 255)
        assert out.dtype == np.uint8 and out.shape == a.shape
        assert np.abs(out.astype(np.float64) - ref).max() <= 0.5
        assert np.array_equal(out, np.rint(ref).astype(np.uint8))
    u8 = a.astype(np.uint8)
    assert np.array_equal(amplified_difference(u8, u8, 10.0), np.zeros_like(u8))
    with pytest.raises(ValueError):
        amplified_difference(a, a[:, :5], 10.0)


def _tiny_panoptic(h, w):
    ids = np.zeros((h, w), np.int32)
    ids[: h // 2] = 1  # stuff: road
    ids[h // 2 :] = 2  # stuff: building
    ids[2:8, 4:12] = 3  # thing: car
    segments = [
        {"id": 1, "category_id": 0, "isthing": False},
        {"id": 2, "category_id": 2, "isthing": False},
        {"id": 3, "category_id": 13, "isthing": True},
    ]
    return ids, segments


@pytest.mark.parametrize("defended", [False, True])
def test_save_example_grid_layout(defended, tmp_path):
    import torch
    from detectron2.data import MetadataCatalog

    metadata = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    h, w = 24, 32
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)  # RGB here
    adv = np.clip(clean.astype(np.float64) + rng.uniform(-2, 2, size=clean.shape), 0, 255)
    dfd = np.clip(adv + 1.0, 0, 255) if defended else None
    ids, seg = _tiny_panoptic(h, w)
    path = str(tmp_path / "sub" / "grid.png")
    out = save_example_grid(
        path,
        clean,
        adv,
        (torch.from_numpy(ids), seg),
        metadata,
        defended_image=dfd,
        panoptic_def=(ids, seg) if defended else None,
        panoptic_clean=(ids, seg),
        amplification=10.0,
        input_format="RGB",
        title="ifgsm eps=1" if defended else None,
    )
    assert out == path and os.listdir(tmp_path / "sub") == ["grid.png"]
    grid = cv2.imread(path, cv2.IMREAD_COLOR)
    rows = 3 if defended else 2
    top = TITLE_HEIGHT if defended else 0
    expected = (top + rows * (LABEL_HEIGHT + h), 3 * w)
    assert (
        grid.shape[:2] == expected == example_grid_shape(h, w, defended, "t" if defended else None)
    )
    # Panels hold the images, converted to BGR for cv2.
    y = top + LABEL_HEIGHT
    assert np.array_equal(grid[y : y + h, :w], clean[:, :, ::-1])
    y2 = y + LABEL_HEIGHT + h
    diff = amplified_difference(adv, clean, 10.0)[:, :, ::-1]
    assert np.array_equal(grid[y2 : y2 + h, 2 * w :], diff)
    # The panoptic panel is drawn (differs from the raw image) and labels are written.
    assert not np.array_equal(grid[y2 : y2 + h, w : 2 * w], grid[y2 : y2 + h, :w])
    assert grid[top : top + LABEL_HEIGHT, :w].max() > 100


def test_save_example_grid_resamples_ids_and_allows_missing_panoptic(tmp_path):
    from detectron2.data import MetadataCatalog

    metadata = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    h, w = 16, 24
    clean = np.full((h, w, 3), 120, np.uint8)
    adv = clean.astype(np.float64) + 0.3  # sub-unit perturbation survives in the difference
    ids, seg = _tiny_panoptic(2 * h, 2 * w)  # outputs at twice the attacked image's size
    path = save_example_grid(str(tmp_path / "a.png"), clean, adv, (ids, seg), metadata)
    grid = cv2.imread(path)
    assert grid.shape[:2] == example_grid_shape(h, w, defended=False)
    y = 2 * LABEL_HEIGHT + h
    assert np.all(grid[y : y + h, 2 * w :] == 3)  # rint(10 * 0.3)
    path = save_example_grid(str(tmp_path / "b.png"), clean, adv, None, metadata)
    assert cv2.imread(path).shape[:2] == example_grid_shape(h, w, defended=False)
