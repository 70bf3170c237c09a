# Copyright (c) UPSNetRobust authors.
"""Models side by side: the comparison table and plot read finished sweeps' JSON."""
import json
import os

import pytest

from upsnet_robust.evaluation.compare import comparison_markdown, load_run, write_comparison


def _run(folder, config, metric, values):
    os.makedirs(folder)
    cells = [{"attack": a, "eps": e, "defense": d, "metric": metric, metric: v}
             for (a, e, d), v in values.items()]  # fmt: skip
    cells.append({"attack": "ifgsm", "eps": 4.0, "defense": "nlmeans", "adaptive": True, "metric": metric, metric: 1.0})
    with open(os.path.join(folder, "robustness.json"), "w") as f:
        json.dump({"metadata": {"config_file": config}, "cells": cells}, f)
    return str(folder)


def test_side_by_side(tmp_path):
    a = _run(tmp_path / "a", "configs/Synthetic/upsnet_tiny_robustness.yaml", "PQ",
             {("clean", 0.0, "none"): 86.7, ("ifgsm", 4.0, "none"): 60.25, ("ifgsm", 16.0, "none"): 40.0})  # fmt: skip
    b = _run(tmp_path / "b", "x/semantic_fpn_tiny.yaml", "mIoU",
             {("clean", 0.0, "none"): 70.0, ("ifgsm", 4.0, "none"): 30.0})  # fmt: skip
    name, cells = load_run(a)
    assert name == "upsnet_tiny" and len(cells) == 3  # adaptive cells are left out
    md = comparison_markdown([load_run(a), load_run(b)])
    lines = md.splitlines()
    assert lines[0] == "| attack | eps | defense | upsnet_tiny (PQ) | semantic_fpn_tiny (mIoU) |"
    assert "| clean | clean | none | 86.7 | 70.0 |" in lines
    assert "| ifgsm | 4 | none | 60.2 | 30.0 |" in lines or "| ifgsm | 4 | none | 60.3 | 30.0 |" in lines
    assert "| ifgsm | 16 | none | 40.0 | - |" in lines
    paths = write_comparison([a, b], str(tmp_path / "out"))
    assert os.path.getsize(paths["png"]) > 1000 and open(paths["md"]).read().endswith(md)
    with pytest.raises(FileNotFoundError, match="attack_net"):
        load_run(str(tmp_path))
