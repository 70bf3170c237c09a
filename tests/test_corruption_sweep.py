# Copyright (c) UPSNetRobust authors.
"""The corruption threat kind in a sweep: cells for every corruption x severity x defense with
`corruption` and `severity`, mPC / rPC in the report, images equal to the reference function,
identical with 1 and 2 processes and after a kill and resume."""
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SMALL_TEST_OPTS, tiny_cfg
from detectron2.modeling import build_model
from imagecorruptions import corrupt as reference_corrupt
from test_robustness_sweep import _KILL_MID_SWEEP, _attack_net, _mark_cached_records

from upsnet_robust.corruptions import corruption_seed
from upsnet_robust.evaluation import run_robustness_sweep
from upsnet_robust.threats import StepContext, ThreatSpec, expand_threats, threat_kind

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
CORRUPTION_OPTS = [
    "ROBUSTNESS.ATTACKS", "[]",
    "ROBUSTNESS.RUN_CORRUPTIONS", "True",
    "ROBUSTNESS.CORRUPTIONS", "['gaussian_noise', 'fog']",
    "ROBUSTNESS.SEVERITIES", "[1, 3]",
    "ROBUSTNESS.DEFENSES", "['none', 'median']",
    "ROBUSTNESS.NUM_EXAMPLES", "1",
    *SMALL_TEST_OPTS,
]  # fmt: skip


@pytest.fixture(scope="module")
def weights():
    """The shipped tiny UPSNet: a trained model, so clean PQ (rPC's denominator) is not 0."""
    if not os.path.isfile(SHIPPED):
        pytest.skip("the shipped tiny UPSNet checkpoint is missing (make demo trains it)")
    return SHIPPED


def _cfg(names, weights, output_dir, *opts):
    return tiny_cfg("DATASETS.TEST", f"('{names['val']}',)", "MODEL.WEIGHTS", weights,
                    "OUTPUT_DIR", str(output_dir), *CORRUPTION_OPTS, *opts)  # fmt: skip


def _model(cfg):
    from upsnet_robust.engine import build_checkpointer

    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def test_corruptions_only_sweep_cells_and_report(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path / "a")
    run_robustness_sweep(cfg, _model(cfg))
    out = cfg.OUTPUT_DIR
    data = json.load(open(os.path.join(out, "robustness.json")))
    cells = data["cells"]
    corrupted = [c for c in cells if c.get("corruption") is not None]
    assert len(cells) == (1 + 2 * 2) * 2 and len(corrupted) == 2 * 2 * 2
    assert {(c["corruption"], c["severity"], c["defense"]) for c in corrupted} == {
        (n, s, d) for n in ("gaussian_noise", "fog") for s in (1, 3) for d in ("none", "median")
    }
    assert all(c["attack"] == c["corruption"] and c["eps"] == 0 for c in corrupted)
    for d in ("none", "median"):
        summary = data["corruptions"]["defenses"][d]
        pq = [c["PQ"] for c in corrupted if c["defense"] == d]
        clean = next(c["PQ"] for c in cells if c["attack"] == "clean" and c["defense"] == d)
        assert summary["mPC"] == pytest.approx(sum(pq) / 4)
        assert summary["rPC"] == pytest.approx(sum(pq) / 4 / clean)
    assert all(c["passed"] for c in data["checks"])  # no attack check misreads a corruption
    assert os.path.getsize(os.path.join(out, "metric_vs_severity.png")) > 0
    examples = sorted(os.listdir(os.path.join(out, "examples")))
    assert len(examples) == 4 and examples[0].startswith("fog_s1_")  # one per cell, distinct
    assert "## Natural corruptions" in open(os.path.join(out, "robustness.md")).read()


def test_attacks_and_corruptions_in_one_sweep(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path / "mixed", "ROBUSTNESS.ATTACKS",
               "['fgsm', 'ifgsm']", "ROBUSTNESS.EPSILONS", "[1.0]", "ROBUSTNESS.CORRUPTIONS",
               "['contrast']", "ROBUSTNESS.SEVERITIES", "[5]", "ROBUSTNESS.NUM_EXAMPLES", "0",
               "ROBUSTNESS.DEFENSES", "['none']")
    run_robustness_sweep(cfg, _model(cfg))
    data = json.load(open(os.path.join(cfg.OUTPUT_DIR, "robustness.json")))
    kinds = [(c["attack"], c.get("corruption")) for c in data["cells"] if c["defense"] == "none"]
    assert kinds == [("clean", None), ("fgsm", None), ("ifgsm", None), ("contrast", "contrast")]
    # the attack checks see fgsm and ifgsm only: a corruption cell (no steps, no eps) is
    # neither "iterative" nor "single-step"
    names = [c["check"] for c in data["checks"]]
    assert any("iterative_vs_single_step" in n for n in names)
    assert not any("contrast" in n for n in names)
    md = open(os.path.join(cfg.OUTPUT_DIR, "robustness.md")).read()
    assert "## Attack: fgsm" in md and "## Attack: contrast" not in md
    assert data["corruptions"]["defenses"]["none"]["num_cells"] == 1


def _step(corruption, severity, cfg):
    spec = ThreatSpec.make("corruption", corruption,
                           params={"corruption": corruption, "severity": severity})  # fmt: skip
    return threat_kind("corruption").image_step(spec, StepContext(cfg=cfg, adapter=None))


def test_step_equals_the_reference_per_image_whatever_the_batch():
    cfg = tiny_cfg("ROBUSTNESS.SEED", "5")  # INPUT.FORMAT BGR
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    inputs = [{"image_id": f"img_{i}"} for i in range(3)]
    images = [torch.from_numpy(im[..., ::-1].copy()).permute(2, 0, 1).float() for im in rgb]
    step = _step("shot_noise", 2, cfg)
    out = step(inputs, images).images
    for i, im in enumerate(rgb):
        np.random.seed(corruption_seed(5, f"img_{i}", "shot_noise", 2))
        expected = reference_corrupt(im, corruption_name="shot_noise", severity=2)[..., ::-1]
        got = out[i].permute(1, 2, 0).numpy()
        assert out[i].dtype == torch.float32 and np.array_equal(got, expected)
    alone = step(inputs[2:], images[2:]).images[0]  # batch and position do not matter
    assert torch.equal(alone, out[2])
    assert not torch.equal(_step("shot_noise", 3, cfg)(inputs, images).images[0], out[0])


def test_prepare_compiles_glass_blur_before_the_first_image():
    # In a fresh interpreter (numba compiles once per process): the kernel has no compiled
    # signature before prepare and has one after it, so no image's time includes compiling.
    code = (
        "import numpy as np\n"
        "from imagecorruptions import corruptions as c\n"
        "from upsnet_robust.threats import ThreatSpec, threat_kind\n"
        "kernel = c._shuffle_pixels_njit_glass_blur\n"
        "before = len(kernel.signatures)\n"
        "spec = ThreatSpec.make('corruption', 'glass_blur',\n"
        "                       params={'corruption': 'glass_blur', 'severity': 1})\n"
        "threat_kind('corruption').prepare(None, spec, None, '')\n"
        "print(before, len(kernel.signatures))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=_package_path()))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"]


def _package_path():
    import upsnet_robust

    return os.path.dirname(os.path.dirname(upsnet_robust.__file__))


def test_switch_and_bad_keys_fail_at_set_up():
    assert all(s.kind != "corruption" for s in expand_threats(tiny_cfg()))  # off by default
    on = ["ROBUSTNESS.RUN_CORRUPTIONS", "True"]
    specs = expand_threats(tiny_cfg(*on))
    assert len([s for s in specs if s.kind == "corruption"]) == 15 * 5
    with pytest.raises(ValueError, match="valid names \\(closest first\\): frost"):
        expand_threats(tiny_cfg(*on, "ROBUSTNESS.CORRUPTIONS", "['frosty']"))
    with pytest.raises(ValueError, match="ROBUSTNESS.SEVERITIES: severity 0"):
        expand_threats(tiny_cfg(*on, "ROBUSTNESS.SEVERITIES", "[0, 1]"))
    with pytest.raises(ValueError, match="go in ROBUSTNESS.CORRUPTIONS"):
        expand_threats(tiny_cfg("ROBUSTNESS.ATTACKS", "['fog']"))


def _scores(cells):
    keys = ("attack", "corruption", "severity", "defense", "PQ", "SQ", "RQ", "num_images")
    return [{k: c.get(k) for k in keys} for c in cells]


@pytest.mark.slow
def test_corruption_cells_equal_with_one_and_two_processes_and_after_kill(
    synthetic_cityscapes_root, weights, tmp_path
):
    """gloo on CPU through detectron2's launch: identical cells and per-image outputs; a run
    killed in its first corruption pass and started again ends with the same cells."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(synthetic_cityscapes_root),
               OMP_NUM_THREADS="1")  # fmt: skip
    common = ["--config-file", os.path.join(REPO_ROOT, "configs", "Synthetic",
                                            "upsnet_tiny_robustness.yaml")]  # fmt: skip
    opts = ["MODEL.WEIGHTS", weights, *CORRUPTION_OPTS, "ROBUSTNESS.NUM_EXAMPLES", "0",
            "ROBUSTNESS.CORRUPTIONS", "['glass_blur', 'snow']", "ROBUSTNESS.SEVERITIES", "[2]"]
    outs = []
    for n in (1, 2):
        out = str(tmp_path / f"n{n}")
        _attack_net(common + ["--num-gpus", str(n), "--dist-url", "auto"] + opts
                    + ["OUTPUT_DIR", out], env, tmp_path)  # fmt: skip
        outs.append(out)
    cells = [json.load(open(os.path.join(o, "robustness.json")))["cells"] for o in outs]
    assert _scores(cells[0]) == _scores(cells[1]) and len(cells[0]) == 3 * 2
    files = [sorted(glob.glob(os.path.join(o, "robustness_cache", "*", "*", "*.pt"))) for o in outs]
    assert len(files[0]) == len(files[1]) == 3 * 2  # 3 passes x 2 images
    for a, b in zip(*files):
        ea, eb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        for d in ("none", "median"):
            ids_a, ids_b = ea["outputs"][d]["panoptic_seg"][0], eb["outputs"][d]["panoptic_seg"][0]
            assert torch.equal(ids_a, ids_b)

    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-c", _KILL_MID_SWEEP, os.path.join(REPO_ROOT, "tools", "attack_net.py")]
    cmd += common + opts + ["OUTPUT_DIR", killed]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    (cache,) = glob.glob(os.path.join(killed, "robustness_cache", "*"))
    passes = sorted(os.listdir(cache))  # clean_..., glass_blur_s2_..., (snow_s2_... not begun)
    assert [os.path.isfile(os.path.join(cache, p, "cells.json")) for p in passes[:2]] == [
        True, False]  # fmt: skip
    assert len(glob.glob(os.path.join(cache, passes[1], "*.pt"))) == 1  # killed mid-pass
    _mark_cached_records(os.path.join(cache, passes[1]))
    _attack_net(common + opts + ["OUTPUT_DIR", killed], env, tmp_path)
    resumed = json.load(open(os.path.join(killed, "robustness.json")))["cells"]
    assert _scores(resumed) == _scores(cells[0])
    # the interrupted pass kept its stored image (marked) and corrupted only the other one
    glass = [c for c in resumed if c.get("corruption") == "glass_blur"]
    assert len(glass) == 2 and all(500 < c["attack_s_per_image"] < 1000 for c in glass)
