# Copyright (c) UPSNetRobust authors.
"""Smoke test of the benchmark suite (benchmarks/): the modules import and their pure helpers
are right, and the sweep-economy benchmark's counters see every call of a one-image sweep.
Nothing is timed (``make bench`` runs the benchmarks)."""

import importlib
import json
import math
import os
import sys

import pytest
from conftest import REPO_ROOT

BENCH_DIR = os.path.join(REPO_ROOT, "benchmarks")
MODULES = [
    "benchutils",
    "bench_attack_overhead",
    "bench_sweep_economy",
    "bench_defenses",
    "bench_pq_eval",
    "bench_scale",
    "bench_fast_paths",
    "bench_attack_strength",
    "bench_adv_train",
    "bench_corruptions",
    "run_all",
]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH_DIR)
    try:
        yield {name: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(BENCH_DIR)


def test_modules_import_and_parse_common_flags(bench):
    for name in MODULES[1:-1]:
        args = bench[name].get_parser().parse_args(["--device", "cpu", "--quick"])
        assert args.quick and args.device == "cpu" and args.threads == 0
    assert bench["run_all"].get_parser().parse_args([]).full is False


def test_median_ratio_paired(bench):
    bu = bench["benchutils"]
    assert bu.median([3.0, 1.0, 2.0]) == 2.0
    assert bu.median([4, 1, 2, 3]) == 2.5
    assert math.isnan(bu.median([]))
    assert bu.ratio(3.0, 2.0) == 1.5
    assert math.isnan(bu.ratio(1.0, 0.0))
    assert bu.paired_ratios([2.0, 3.0], [1.0, 3.0]) == [2.0, 1.0]
    with pytest.raises(ValueError):
        bu.paired_ratios([1.0], [1.0, 2.0])


def test_interleaved_timings_rotates_and_counts(bench):
    bu = bench["benchutils"]
    calls = []
    tasks = {k: (lambda k=k: calls.append(k) or k) for k in "abc"}
    seen = []
    t = bu.interleaved_timings(
        tasks, reps=3, warmup=1, on_result=lambda n, r, v: seen.append((n, r, v))
    )
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"]  # order rotates
    assert all(len(t.wall[k]) == 3 and len(t.cpu[k]) == 3 for k in "abc")
    assert len(seen) == 9 and all(n == v for n, _, v in seen)


def test_format_table_and_values(bench):
    bu = bench["benchutils"]
    table = bu.format_table(["a", "b"], [[1.23456, True], [None, "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | yes |", "| - | x\\|y |"]
    assert bu.format_value(0.000123456) == "0.000123"
    assert bu.format_value(12345.6) == "12346"
    with pytest.raises(ValueError):
        bu.format_table(["a"], [[1, 2]])


def test_kurakin_steps_ceil_rule(bench):
    bu = bench["benchutils"]
    grid = [0.25, 0.5, 1, 2, 4, 8, 16, 32]
    assert [bu.kurakin_steps(e) for e in grid] == [1, 1, 2, 3, 5, 10, 20, 36]
    assert bu.kurakin_steps(0.8) == 1  # 1.25 * 0.8 = 1.0000000000000002 is not 2 steps


def test_protocol_minimum(bench):
    bu = bench["benchutils"]
    passes = [
        {"attack": "clean", "eps": 0.0},
        {"attack": "fgsm", "eps": 1.0},
        {"attack": "ifgsm", "eps": 4.0},
        {"attack": "pgd", "eps": 8.0, "num_steps": 7},
    ]
    m = bu.protocol_minimum(2, passes, ["none", "nlmeans", "jpeg"])
    assert [p["T"] for p in m["passes"]] == [0, 1, 5, 7]
    assert [p["forward_backward"] for p in m["passes"]] == [0, 2, 10, 14]
    assert [p["loss_forward"] for p in m["passes"]] == [0, 2, 2, 2]  # attacked images
    assert m["total"] == {
        "forward_backward": 26,
        "forward_only": 0,
        "loss_forward": 6,
        "inference": 4 * 2 * 3,
        "defense_calls": {"nlmeans": 8, "jpeg": 8},
    }
    with pytest.raises(ValueError):
        bu.protocol_minimum(1, [{"attack": "pgd", "eps": 8.0}], ["none"])


def test_sweep_economy_compare(bench):
    bu, econ = bench["benchutils"], bench["bench_sweep_economy"]
    want = bu.protocol_minimum(2, [{"attack": "ifgsm", "eps": 1.0}], ["none", "nlmeans"])["total"]
    got = {
        "forward_backward": 4,
        "input_backward": 4,
        "forward_only": 0,
        "loss_forward": 2,
        "inference": 4,
        "defense_calls": {"nlmeans": 2},
    }
    assert econ.compare(got, want)["equal"]
    assert econ.compare(got, want)["zero_counters"] == []
    got["defense_calls"] = {"nlmeans": 4}
    v = econ.compare(got, want)
    assert not v["equal"] and v["defense:nlmeans"] == {"measured": 4, "minimum": 2, "equal": False}
    got["inference"] = 0  # a counter that misses the code path doing the work
    assert econ.compare(got, want)["zero_counters"] == ["inference"]


def test_sweep_economy_counters_see_every_call(bench, synthetic_cityscapes_names, monkeypatch):
    """A one-image sweep through the benchmark: every counter reads the protocol's minimum, and
    none reads 0 where work was done (a counter that no longer sees a code path reads 0)."""
    # the benchmark sets DETECTRON2_DATASETS if unset; keep that inside this test
    monkeypatch.setenv("DETECTRON2_DATASETS", os.environ.get("DETECTRON2_DATASETS", "datasets"))
    econ = bench["bench_sweep_economy"]
    args = econ.get_parser().parse_args(
        ["--device", "cpu", "--images", "1", "--eps", "1", "--attacks", "fgsm", "ifgsm",
         "--dataset", synthetic_cityscapes_names["val"]]
    )  # fmt: skip
    result = econ.run(args)
    assert result["zero_counters"] == [], result["zero_counters"]
    per_pass, minimum = result["per_pass"], result["per_pass_minimum"]
    assert [p["attack"] for p in per_pass] == ["clean", "fgsm", "ifgsm"]
    for got, want in zip(per_pass, minimum):
        assert got["inference"] == want["inference"] == 2  # one per defense variant (1 image)
        assert got["forward_backward"] == got["input_backward"] == want["forward_backward"]
        # the objective once more at the adversarial image, without a gradient (attack_loss)
        assert got["loss_forward"] == want["loss_forward"] == (0 if got["T"] == 0 else 1)
        assert got["defense_calls"] == want["defense_calls"] == {"nlmeans": 1}
    assert [p["forward_backward"] for p in per_pass] == [0, 1, 2]  # T of clean, FGSM, I-FGSM
    assert result["resume_work"] == {}
    assert result["equal_to_minimum"], result["total"]


def test_parse_log_times_and_thread_env(bench):
    bu, scale = bench["benchutils"], bench["bench_scale"]
    lines = [
        "[11/24 19:59:58 d2]: start",
        "[11/24 19:59:59 upsnet_robust.sweep]: [1/2] clean_x: running",
        "[11/24 20:00:30 upsnet_robust]: Report written: a, b",
        "no timestamp",
    ]
    assert bu.parse_log_times(lines, r"\[1/\d+\] .*: running", "Report written") == 31.0
    assert bu.parse_log_times(lines[:2], "running", "Report written") is None
    evals = [
        "[11/24 20:36:01 d2]: Writing all panoptic predictions to /tmp/a",
        "[11/24 20:36:04 d2]: Panoptic Evaluation Results:",
        "[11/24 20:36:04 d2]: Writing all panoptic predictions to /tmp/b",
        "[11/24 20:36:07 d2]: Panoptic Evaluation Results:",
    ]
    assert bu.parse_log_spans(evals, "Writing all panoptic", "Evaluation Results") == [3.0, 3.0]
    assert scale.thread_env(2, cores=2)["OMP_NUM_THREADS"] == "1"
    assert scale.thread_env(4, cores=2)["OPENCV_FOR_THREADS_NUM"] == "1"


def test_write_result_strict_json_and_summary_rows(bench, tmp_path):
    bu, run_all = bench["benchutils"], bench["run_all"]
    path = bu.write_result(
        "x", {"v": float("nan"), "headline": [bu.headline("m", 1.5, "x")]}, str(tmp_path / "x.json")
    )
    with open(path) as f:
        data = json.load(f)
    assert data["v"] is None and data["benchmark"] == "x"
    assert run_all.headline_rows("x", data) == [["x", "m", 1.5, "x", ""]]
    assert run_all.headline_rows("y", {"a": 2.0, "b": "s", "c": True}) == [["y", "a", 2.0, "", ""]]
    table = run_all.combined_table(
        {
            "x": {"rc": 0, "wall_s": 3.0, "result": data},
            "y": {"rc": 1, "wall_s": 1.0, "result": None, "error": "boom"},
        }
    )
    assert "| x | m | 1.5 | x | [3 s] |" in table and "| y | FAILED |" in table
    assert run_all.flag_attempts("defenses", "cpu", True, 0) == [["--device", "cpu", "--quick"]]
    assert run_all.flag_attempts("nlmeans", "cpu", True, 0)[-1] == []


def test_hardware_info_states_cpu_and_threads(bench):
    info = bench["benchutils"].hardware_info("cpu")
    assert info["cpu_model"] and info["torch_threads"] >= 1 and info["device"] == "cpu"


def test_attack_strength_goals(bench):
    """The goals are read per eps: sea 2 below the best fixed-step attack; sea_fast within 1 PQ
    of sea with at most 25 % of its passes."""
    goals = bench["bench_attack_strength"]._goals

    def row(name, eps, pq, passes):
        return {"name": name, "eps": eps, "PQ": pq, "passes_per_image": passes}

    rows = [
        row("pgd-40", 8.0, 70.0, 40), row("cospgd-40", 8.0, 66.0, 40),
        row("sea", 8.0, 63.9, 400), row("sea_fast", 8.0, 64.9, 100),
        row("pgd-40", 16.0, 50.0, 40), row("segpgd-40", 16.0, 40.0, 40),
        row("sea", 16.0, 38.5, 400), row("sea_fast", 16.0, 39.0, 101),
    ]  # fmt: skip
    out = goals(rows)
    assert out["8"]["best_fixed_step_PQ"] == 66.0 and out["8"]["sea_2_below_best_fixed"]
    assert out["8"]["sea_fast_within_1_PQ_at_25pct"] and out["8"]["sea_fast_pass_ratio"] == 0.25
    assert not out["16"]["sea_2_below_best_fixed"]  # 1.5 below only
    assert not out["16"]["sea_fast_within_1_PQ_at_25pct"]  # 101 of 400 passes


def test_adv_train_goals(bench):
    """At eps 8: robust PQ >= standard + 10 under sea and under the worst fixed-step attack;
    clean PQ at most 5 below the standard model's."""
    goals = bench["bench_adv_train"]._goals

    def row(model, name, eps, pq):
        return {"model": model, "name": name, "eps": eps, "PQ": pq}

    rows = [
        row("standard", "clean", 0, 87.0), row("robust", "clean", 0, 83.0),
        row("standard", "pgd-40", 8.0, 71.0), row("standard", "cospgd-40", 8.0, 67.0),
        row("standard", "sea", 8.0, 65.0),
        row("robust", "pgd-40", 8.0, 82.0), row("robust", "segpgd-40", 8.0, 77.5),
        row("robust", "sea", 8.0, 74.0),
    ]  # fmt: skip
    out = goals(rows)
    assert out["8"]["robust_worst_fixed"] == 77.5 and out["8"]["fixed_gain"] == 10.5
    assert out["8"]["sea_gain"] == 9.0
    assert out["goal_eps8"] == {
        "sea_gain_ge_10": False, "fixed_gain_ge_10": True, "clean_drop_le_5": True
    }
    rows[1] = row("robust", "clean", 0, 81.9)
    assert not goals(rows)["goal_eps8"]["clean_drop_le_5"]


def test_corruption_benchmark_flags_and_projects(bench):
    # Two corruptions at 1 s, one at 25 s (25x the median): flagged with its documented reason;
    # an undocumented slow one says so. Projection: every cell's seconds x the 500 val images.
    bc = bench["bench_corruptions"]
    times = {"fog": {1: 1.0, 2: 1.0}, "zoom_blur": {1: 20.0, 2: 30.0}, "contrast": {1: 1.0, 2: 1.0}}
    out = bc.summarise(times)
    assert out["median_seconds"] == 1.0 and out["cells_per_image"] == 6
    assert out["rows"]["zoom_blur"]["flagged"] and out["rows"]["zoom_blur"]["x_median"] == 25.0
    assert out["rows"]["zoom_blur"]["reason"] == bc.SLOW_REASONS["zoom_blur"]
    assert not out["rows"]["fog"]["flagged"] and out["rows"]["fog"]["reason"] is None
    assert out["projected_hours"] == pytest.approx(54.0 * 500 / 3600)
    times["pixelate"] = times.pop("zoom_blur")
    assert bc.summarise(times)["rows"]["pixelate"]["reason"] == "undocumented"


def test_train_tiny_reads_panoptic_and_semantic_scores(bench):
    """The training benchmark reads detectron2's copypaste lines of either task."""
    train_tiny = importlib.import_module("bench_train_tiny")  # its own flags: not in MODULES
    log = (
        "[d2.evaluation.testing]: copypaste: Task: panoptic_seg\n"
        "[d2.evaluation.testing]: copypaste: PQ,SQ,RQ,PQ_th,SQ_th,RQ_th,PQ_st,SQ_st,RQ_st\n"
        "[d2.evaluation.testing]: copypaste: 80.7973,89.48,88.9,1,2,3,4,5,6\n"
        "[d2.evaluation.testing]: copypaste: Task: sem_seg\n"
        "[d2.evaluation.testing]: copypaste: mIoU,fwIoU,mACC,pACC\n"
        "[d2.evaluation.testing]: copypaste: 92.612,96.8268,96.5203,98.3525\n"
    )
    scores = train_tiny._scores(log)
    assert scores["panoptic"]["PQ"] == 80.7973 and scores["panoptic"]["RQ_st"] == 6.0
    assert scores["semantic"] == {"mIoU": 92.612, "fwIoU": 96.8268, "mACC": 96.5203,
                                  "pACC": 98.3525}  # fmt: skip
    semantic_only = log.split("copypaste: Task: sem_seg")[1]
    assert set(train_tiny._scores(semantic_only)) == {"semantic"}
