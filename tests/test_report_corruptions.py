# Copyright (c) UPSNetRobust authors.
"""The corruption part of the robustness report: mPC / rPC per defense in robustness.json
against a hand computation, the Markdown section and the metric-vs-severity figure."""
import json
import logging
import os

import cv2
import pytest

from upsnet_robust.evaluation.report import write_report
from upsnet_robust.evaluation.report.corruptions import corruption_summaries

CLEAN = {"none": 80.0, "nlmeans": 70.0}
# (corruption, severity) -> PQ per defense
PQ = {
    "none": {("fog", 1): 50.0, ("fog", 2): 40.0, ("gaussian_noise", 1): 30.0,
             ("gaussian_noise", 2): 20.0},
    "nlmeans": {("fog", 1): 60.0, ("fog", 2): 50.0, ("gaussian_noise", 1): 55.0,
                ("gaussian_noise", 2): 45.0},
}  # fmt: skip


def _cell(attack, defense, pq, **extra):
    return dict(attack=attack, objective=None, eps=0.0, num_steps=0, step_size=0.0,
                random_start=False, restarts=1, defense=defense, adaptive=False,
                quantized=False, PQ=pq, SQ=80.0, RQ=pq / 0.8, PQ_th=pq, PQ_st=pq,
                attack_s_per_image=0.01, defense_s_per_image=0.0, num_images=4, num_failed=0,
                failures=[], **extra)  # fmt: skip


def _cells():
    cells = [_cell("clean", d, pq) for d, pq in CLEAN.items()]
    for d, values in PQ.items():
        for (c, s), pq in values.items():
            cells.append(_cell(c, d, pq, corruption=c, severity=s))
    return cells


def test_mpc_and_rpc_per_defense_by_hand(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        paths = write_report(_cells(), str(tmp_path))
    data = json.load(open(paths["json"]))["corruptions"]
    assert data["metric"] == "PQ"
    none, nlm = data["defenses"]["none"], data["defenses"]["nlmeans"]
    assert none["mPC"] == pytest.approx((50 + 40 + 30 + 20) / 4)
    assert none["rPC"] == pytest.approx(35.0 / 80.0)
    assert nlm["mPC"] == pytest.approx((60 + 50 + 55 + 45) / 4)
    assert nlm["rPC"] == pytest.approx(52.5 / 70.0)  # against the defense's own clean PQ
    assert none["families"] == pytest.approx({"noise": 25.0, "weather": 45.0})
    assert none["corruptions"] == pytest.approx({"fog": 45.0, "gaussian_noise": 25.0})
    assert none["severities"] == pytest.approx({"1": 40.0, "2": 30.0})
    # the eps figures are not handed corruption cells (eps 0 has no place on their log axis)
    assert "log axis" not in caplog.text


def test_markdown_section_and_severity_figure(tmp_path):
    paths = write_report(_cells(), str(tmp_path))
    md = open(paths["md"]).read()
    assert "## Natural corruptions" in md
    assert "| none | 80.00 | 35.00 | 0.438 | 4 |" in md
    assert "| nlmeans | 70.00 | 52.50 | 0.750 | 4 |" in md
    assert "| gaussian_noise | 30.00 | 20.00 | 25.00 |" in md
    image = cv2.imread(paths["metric_vs_severity"])
    assert image is not None and image.shape[1] > image.shape[0]  # two panels side by side
    assert os.path.basename(paths["metric_vs_severity"]) == "metric_vs_severity.png"


def test_no_corruption_cells_no_corruption_output(tmp_path):
    cells = [c for c in _cells() if "corruption" not in c]
    paths = write_report(cells, str(tmp_path))
    assert "corruptions" not in json.load(open(paths["json"]))
    assert "Natural corruptions" not in open(paths["md"]).read()
    assert "metric_vs_severity" not in paths and corruption_summaries(cells) is None


def test_failures_of_corruption_cells_are_listed(tmp_path):
    cells = _cells()
    cells[-1].update(num_failed=1, failures=[{"image_id": "img_7", "reason": "boom"}])
    md = open(write_report(cells, str(tmp_path))["md"]).read()
    assert "- gaussian_noise severity 2, nlmeans: img_7: boom" in md


def test_terminal_table_shows_severity_instead_of_eps():
    from upsnet_robust.evaluation.report import format_table

    lines = format_table(_cells()).splitlines()
    fog = [line.split() for line in lines if line.startswith("fog")]
    assert [row[1:4] for row in fog] == [["sev", "1", "none"], ["sev", "2", "none"],
                                         ["sev", "1", "nlmeans"], ["sev", "2", "nlmeans"]]


def test_csv_has_corruption_and_severity_columns(tmp_path):
    import csv

    rows = list(csv.DictReader(open(write_report(_cells(), str(tmp_path))["csv"])))
    columns = [(r["corruption"], r["severity"]) for r in rows[:3]]
    assert columns == [("", ""), ("", ""), ("fog", "1")]
