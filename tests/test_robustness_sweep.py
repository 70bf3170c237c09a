# Copyright (c) UPSNetRobust authors.
"""The attack hook, the sweep, its outputs, resume, failures and 1-vs-2-process equality."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SMALL_TEST_OPTS, tiny_cfg
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from upsnet_robust.attacks import FGSM, IFGSM, build_attack
from upsnet_robust.attacks.objectives import (
    OBJECTIVE_REGISTRY,
    MissingGroundTruthError,
    build_objective,
)
from upsnet_robust.data import build_panoptic_mapper
from upsnet_robust.evaluation.panoptic_stats import PanopticStats, load_image_stats
from upsnet_robust.evaluation import (
    AdversarialInference,
    MultiVariantEvaluator,
    PanopticSubsetEvaluator,
    fingerprint,
    run_robustness_sweep,
)

SHIPPED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")
SWEEP_OPTS = [
    "ROBUSTNESS.ATTACKS", "['fgsm', 'ifgsm']",
    "ROBUSTNESS.EPSILONS", "[1.0, 4.0]",
    "ROBUSTNESS.DEFENSES", "['none', 'nlmeans']",
    "DEFENSE.NLMEANS.SEARCH_WINDOW", "11",
    *SMALL_TEST_OPTS,
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny UPSNet checkpoint (the sweep's plumbing does not need a trained one)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _cfg(names, weights, output_dir, *opts):
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names['val']}',)",
        "MODEL.WEIGHTS", weights,
        "OUTPUT_DIR", str(output_dir),
        *SWEEP_OPTS,
        *opts,
    )
    return cfg


def _model(cfg):
    from upsnet_robust.engine import build_checkpointer

    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _loader(cfg):
    return build_detection_test_loader(
        cfg, cfg.DATASETS.TEST[0], mapper=build_panoptic_mapper(cfg, is_train=False)
    )


def test_hook_attacks_under_inference_on_dataset_no_grad(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path)
    model = _model(cfg)
    seen = []
    wrapper = AdversarialInference(
        model, attack=FGSM(4.0), objective="semantic_ce",
        on_image=lambda x, clean, adv, defended, outputs: seen.append((clean, adv)),
    )
    evaluator = MultiVariantEvaluator({"none": PanopticSubsetEvaluator(cfg.DATASETS.TEST[0])})
    results = inference_on_dataset(wrapper, _loader(cfg), evaluator)  # runs under no_grad
    assert "panoptic_seg" in results["none"] and results["failures"] == []
    assert len(seen) == 2 and len(wrapper.records) == 2
    for clean, adv in seen:
        delta = (adv - clean).abs()
        assert delta.max() <= 4.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
        # FGSM moves (almost) every pixel by eps: the gradient reached the input.
        assert (delta > 3.99).float().mean() > 0.5
    assert all(r["attack_s"] > 0 for r in wrapper.records)


def test_objectives_values_and_errors(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path)
    model = _model(cfg)
    d = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    x = build_panoptic_mapper(cfg, is_train=False)(d)
    image = x["image"].float()[None]
    for name in ("train_losses", "semantic_ce", "panoptic", "least_likely", "pseudo_label"):
        objective = build_objective(name, model, [x], seed=3)
        a, b = objective(image), objective(image)
        assert a.shape == (1,) and torch.isfinite(a).all()
        assert torch.equal(a, b), f"{name} is not deterministic for a seed"
    assert build_objective("least_likely", model, [x])(image) < 0  # negative CE to targets
    no_gt = {k: v for k, v in x.items() if k not in ("instances", "sem_seg")}
    with pytest.raises(MissingGroundTruthError, match="pseudo_label"):
        build_objective("train_losses", model, [no_gt])
    with pytest.raises(KeyError, match="train_losses"):
        build_objective("nope", model, [x])
    # train-mode losses leave BatchNorm statistics untouched
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    build_objective("train_losses", model, [x])(image)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert not model.training


def _nonfinite_objective():
    name = "pytest_nonfinite"
    if name not in OBJECTIVE_REGISTRY:

        class NonFinite:
            registered_name = name

            def __init__(self, model, batched_inputs, seed=0):
                pass

            def __call__(self, x):
                return (x * float("nan")).flatten(1).sum(1)

        OBJECTIVE_REGISTRY._do_register(name, NonFinite)
    return name


def test_nonfinite_gradient_skips_image_and_records_why(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path)
    wrapper = AdversarialInference(_model(cfg), attack=IFGSM(2.0), objective=_nonfinite_objective())
    evaluator = MultiVariantEvaluator({"none": PanopticSubsetEvaluator(cfg.DATASETS.TEST[0])})
    results = inference_on_dataset(wrapper, _loader(cfg), evaluator)
    assert len(results["failures"]) == 2
    assert all("non-finite gradient" in f["reason"] for f in results["failures"])
    assert results["none"]["panoptic_seg"] == {}


def _read(path):
    with open(path) as f:
        return json.load(f)


def _scores(cells):
    keys = ("attack", "eps", "defense", "PQ", "SQ", "RQ", "PQ_th", "PQ_st", "num_images", "num_failed")
    return [{k: c[k] for k in keys} for c in cells]


def test_sweep_outputs_resume_and_invalidation(synthetic_cityscapes_names, weights, tmp_path):
    cfg = _cfg(synthetic_cityscapes_names, weights, tmp_path / "a")
    model = _model(cfg)
    first = run_robustness_sweep(cfg, model)
    out = cfg.OUTPUT_DIR
    for name in ("robustness.json", "robustness.csv", "robustness.md", "pq_vs_eps.png", "time_vs_eps.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    cells = _read(os.path.join(out, "robustness.json"))["cells"]
    assert len(cells) == (1 + 2 * 2) * 2  # (clean + attacks x eps) x defenses
    assert {(c["attack"], c["eps"], c["defense"]) for c in cells} >= {
        ("clean", 0.0, "none"), ("clean", 0.0, "nlmeans"), ("ifgsm", 4.0, "nlmeans")
    }
    ifgsm4 = next(c for c in cells if c["attack"] == "ifgsm" and c["eps"] == 4.0)
    assert ifgsm4["num_steps"] == 5 and ifgsm4["step_size"] == 1.0 and ifgsm4["num_images"] == 2
    assert ifgsm4["attack_passes_per_image"] == 5  # one forward+backward per step and image
    # the objective at the adversarial images, one value per pass (every defense row shares
    # it); it rises with eps, and the report says so
    losses = {(c["attack"], c["eps"], c["defense"]): c.get("attack_loss") for c in cells}
    for attack in ("fgsm", "ifgsm"):
        assert losses[(attack, 4.0, "none")] == losses[(attack, 4.0, "nlmeans")]
        assert losses[(attack, 4.0, "none")] > losses[(attack, 1.0, "none")] > 0
    assert losses[("clean", 0.0, "none")] is None
    checks = _read(os.path.join(out, "robustness.json"))["checks"]
    rises = [c for c in checks if c["check"].startswith("loss_rises_with_eps")]
    assert len(rises) == 4 and all(c["passed"] for c in rises), rises
    assert len(glob.glob(os.path.join(out, "examples", "*.png"))) == 2 * 2 * cfg.ROBUSTNESS.NUM_EXAMPLES

    # Interrupt: forget one finished pass and one image of another, then run again. The kept
    # images' records are marked (attack_s 1000): the resumed cells average the marks only if
    # those images were loaded from the cache rather than recomputed.
    cache = glob.glob(os.path.join(out, "robustness_cache", "*"))
    assert len(cache) == 1
    passes = sorted(glob.glob(os.path.join(cache[0], "*")))
    os.remove(os.path.join(passes[-1], "cells.json"))
    os.remove(os.path.join(passes[1], "cells.json"))
    os.remove(sorted(glob.glob(os.path.join(passes[1], "*.pt")))[0])
    _mark_cached_records(passes[-1], passes[1])
    second = run_robustness_sweep(cfg, model)
    assert _scores(second["cells"]) == _scores(first["cells"])
    _check_image_stats(passes, second["cells"])
    finished = _pass_cells(second["cells"], passes[-1])
    assert [c["attack_s_per_image"] for c in finished] == [1000.0, 1000.0]  # both from the cache
    half = _pass_cells(second["cells"], passes[1])
    assert len(half) == 2 and all(500 < c["attack_s_per_image"] < 1000 for c in half)  # 1 redone

    # A different checkpoint or model config gets a different cache.
    other = str(tmp_path / "other.pth")
    state = torch.load(weights, weights_only=True)
    state["model"]["sem_seg_head.score.bias"] += 1
    torch.save(state, other)
    assert fingerprint(cfg, other) != fingerprint(cfg, weights)
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.MODEL.UPSNET.STUFF_AREA_LIMIT += 1
    assert fingerprint(cfg2, weights) != fingerprint(cfg, weights)


def _check_image_stats(pass_dirs, cells):
    """Each pass keeps per-image PQ sums per defense; summed, they give its cells' PQ (also
    for a resumed pass, whose stored images were scored from the cache)."""
    for pass_dir in pass_dirs:
        stored = load_image_stats(pass_dir)
        pass_cells = _pass_cells(cells, pass_dir)
        assert stored is not None and set(stored) == {c["defense"] for c in pass_cells}
        for cell in pass_cells:
            block = stored[cell["defense"]]
            assert len(block["images"]) == cell["num_images"]
            total = PanopticStats.total(block["images"].values())
            summary = total.summary(block["categories"])
            assert summary["PQ"]["PQ"] == pytest.approx(cell["PQ"], abs=1e-9)
            assert summary["things"]["PQ"] == pytest.approx(cell["PQ_th"], abs=1e-9)


def _pass_cells(cells, pass_dir):
    """The cells of the pass cached in ``pass_dir`` (named ``<attack>_eps<eps>_<hash>``)."""
    name = os.path.basename(pass_dir)
    return [c for c in cells if name.startswith(f"{c['attack']}_eps{c['eps']:g}_")]


def _mark_cached_records(*pass_dirs):
    """Set ``attack_s`` of every cached image of these passes to 1000 (a mark that only a
    cached, not a recomputed, image carries into the cells)."""
    for d in pass_dirs:
        for p in glob.glob(os.path.join(d, "*.pt")):
            entry = torch.load(p, weights_only=True)
            entry["record"]["attack_s"] = 1000.0
            torch.save(entry, p)


def test_sweep_max_images_include_clean_and_quantize(synthetic_cityscapes_names, weights, tmp_path):
    """ROBUSTNESS.MAX_IMAGES 1 scores the first image only; INCLUDE_CLEAN False has no clean
    pass; QUANTIZE True hands defenses and model uint8-valued adversarial images (eps 0.4
    rounds back to the clean image, eps 2 to integers within the eps-ball)."""
    from upsnet_robust.evaluation import RobustnessSweep

    cfg = _cfg(
        synthetic_cityscapes_names, weights, tmp_path / "out",
        "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[0.4, 2.0]",
        "ROBUSTNESS.DEFENSES", "['none']", "ROBUSTNESS.MAX_IMAGES", "1",
        "ROBUSTNESS.INCLUDE_CLEAN", "False", "ROBUSTNESS.QUANTIZE", "True",
        "ROBUSTNESS.NUM_EXAMPLES", "5", "ROBUSTNESS.OBJECTIVE", "semantic_ce",
    )  # fmt: skip
    seen = []

    def on_example(spec, x, clean, adv, defended, outputs):
        seen.append((spec["eps"], x["image_id"], clean, adv, defended["none"]))

    sweep = RobustnessSweep(cfg, _model(cfg), weights, cfg.OUTPUT_DIR, on_example=on_example)
    cells = sweep.run()
    first_id = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["image_id"]
    assert [(c["attack"], c["eps"]) for c in cells] == [("fgsm", 0.4), ("fgsm", 2.0)]  # no clean
    assert all(c["num_images"] == 1 and c["num_failed"] == 0 and c["quantized"] for c in cells)
    assert [(eps, image_id) for eps, image_id, *_ in seen] == [(0.4, first_id), (2.0, first_id)]
    cache = glob.glob(os.path.join(cfg.OUTPUT_DIR, "robustness_cache", "*", "*"))
    assert len(cache) == 2 and not any(os.path.basename(d).startswith("clean") for d in cache)
    assert all(len(glob.glob(os.path.join(d, "*.pt"))) == 1 for d in cache)
    for eps, _, clean, adv, defended in seen:
        assert torch.equal(defended, adv)  # "none" scores the attacked image itself
        assert torch.equal(adv, adv.round()) and (adv - clean).abs().max() <= eps
    (_, _, clean, adv_small, _), (_, _, _, adv_large, _) = seen
    assert torch.equal(adv_small, clean)  # a step of 0.4 rounds back to the clean pixel
    assert (adv_large != clean).float().mean() > 0.5
    # the same passes unquantised are other passes (own cache keys), with float images
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.ROBUSTNESS.QUANTIZE = False
    seen.clear()
    cells2 = RobustnessSweep(cfg2, sweep.model, weights, cfg.OUTPUT_DIR, on_example=on_example).run()
    assert not any(c["quantized"] for c in cells2)
    assert len(glob.glob(os.path.join(cfg.OUTPUT_DIR, "robustness_cache", "*", "*"))) == 4
    assert not torch.equal(seen[0][3], seen[0][3].round())  # float: clean +- 0.4


def test_corrupt_image_is_counted_and_sweep_goes_on(synthetic_cityscapes_root, weights, tmp_path):
    import shutil

    from upsnet_robust.data import register_synthetic_cityscapes_panoptic

    root = tmp_path / "synthetic_cityscapes"
    shutil.copytree(synthetic_cityscapes_root, root)
    names = dict(zip(("train", "val"), register_synthetic_cityscapes_panoptic(str(root), name_prefix="pytest_corrupt")))
    bad = sorted(glob.glob(str(root / "leftImg8bit" / "val" / "*" / "*.png")))[0]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    cfg = _cfg(names, weights, tmp_path / "out", "ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[2.0]")
    cells = run_robustness_sweep(cfg, _model(cfg))["cells"]
    for c in cells:
        assert c["num_images"] == 1 and c["num_failed"] == 1
        assert os.path.basename(bad) in c["failures"][0]["reason"]
    assert os.path.basename(bad) in open(os.path.join(cfg.OUTPUT_DIR, "robustness.md")).read()


def test_bad_attack_inputs():
    cfg = tiny_cfg()
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            build_attack(cfg, "ifgsm", eps)
    with pytest.raises(KeyError, match="ifgsm"):
        build_attack(cfg, "not_an_attack", 1.0)


def _attack_net(args, env, cwd):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "attack_net.py")] + args
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# Runs a script like ``python SCRIPT ARGS...`` and SIGKILLs itself right after the second pass
# of the sweep stored its first image (one pass finished, another half done): a deterministic
# interruption, whatever the machine's speed. It watches the sweep's atomic writes (os.replace),
# the cache layout the test checks anyway.
_KILL_MID_SWEEP = """
import os, runpy, signal, sys
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    dst = str(dst)
    if dst.endswith(".pt"):
        pass_dir = os.path.dirname(dst)
        cache = os.path.dirname(pass_dir)
        done = [p for p in os.listdir(cache) if os.path.isfile(os.path.join(cache, p, "cells.json"))]
        if done and os.path.basename(pass_dir) not in done:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_one_vs_two_processes_equal_and_resume_after_kill(synthetic_cityscapes_root, weights, tmp_path):
    """gloo on CPU through detectron2's launch: identical cells and per-image outputs; a run
    killed mid-sweep and started again ends with the uninterrupted run's results."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(synthetic_cityscapes_root), OMP_NUM_THREADS="1")
    common = [
        "--config-file", os.path.join(REPO_ROOT, "configs", "Synthetic", "upsnet_tiny_robustness.yaml"),
    ]
    opts = ["MODEL.WEIGHTS", weights, *SWEEP_OPTS, "ROBUSTNESS.ATTACKS", "['ifgsm']",
            "ROBUSTNESS.EPSILONS", "[2.0]", "ROBUSTNESS.NUM_EXAMPLES", "0"]
    outs = []
    for n in (1, 2):
        out = str(tmp_path / f"n{n}")
        _attack_net(common + ["--num-gpus", str(n), "--dist-url", "auto"] + opts + ["OUTPUT_DIR", out], env, tmp_path)
        outs.append(out)
    cells = [_read(os.path.join(o, "robustness.json"))["cells"] for o in outs]
    assert _scores(cells[0]) == _scores(cells[1])

    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-c", _KILL_MID_SWEEP, os.path.join(REPO_ROOT, "tools", "attack_net.py")]
    cmd += common + opts + ["OUTPUT_DIR", killed]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(killed, "robustness.json"))
    (cache,) = glob.glob(os.path.join(killed, "robustness_cache", "*"))
    passes = sorted(os.listdir(cache))  # clean_..., ifgsm_...
    assert [os.path.isfile(os.path.join(cache, p, "cells.json")) for p in passes] == [True, False]
    assert len(glob.glob(os.path.join(cache, passes[1], "*.pt"))) == 1  # killed mid-pass
    _mark_cached_records(os.path.join(cache, passes[1]))
    _attack_net(common + opts + ["OUTPUT_DIR", killed], env, tmp_path)
    resumed = _read(os.path.join(killed, "robustness.json"))["cells"]
    assert _scores(resumed) == _scores(cells[0])
    # the interrupted pass kept its stored image (marked) and computed only the other one
    assert all(500 < c["attack_s_per_image"] < 1000 for c in resumed if c["attack"] == "ifgsm")
    files = [sorted(glob.glob(os.path.join(o, "robustness_cache", "*", "*", "*.pt"))) for o in outs]
    assert len(files[0]) == len(files[1]) == 2 * 2  # 2 passes x 2 images
    for a, b in zip(*files):
        ea, eb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        for d in ("none", "nlmeans"):
            assert torch.equal(ea["outputs"][d]["panoptic_seg"][0], eb["outputs"][d]["panoptic_seg"][0])
            assert ea["outputs"][d]["panoptic_seg"][1] == eb["outputs"][d]["panoptic_seg"][1]


def test_sweep_fast_paths_keep_pass_keys_and_scores(synthetic_cityscapes_names, tmp_path):
    """Batched attacks and defense workers change the speed, not the pass keys or the scores;
    mixed precision makes new pass keys (its adversarial images differ). On the shipped trained
    model, so that the scores are not all 0; with FGSM, whose one step starts from the same
    iterate for both batch sizes (longer trajectories diverge with the summation order)."""
    opts = ("ROBUSTNESS.ATTACKS", "['fgsm']", "ROBUSTNESS.EPSILONS", "[2.0]",
            "ROBUSTNESS.OBJECTIVE", "semantic_ce")  # fmt: skip
    plain_cfg = _cfg(synthetic_cityscapes_names, SHIPPED, tmp_path / "plain", *opts)
    fast_cfg = _cfg(synthetic_cityscapes_names, SHIPPED, tmp_path / "fast", *opts,
                    "ROBUSTNESS.BATCH_SIZE", "2", "ROBUSTNESS.DEFENSE_WORKERS", "1")  # fmt: skip
    model = _model(plain_cfg)
    plain = run_robustness_sweep(plain_cfg, model)["cells"]
    fast = run_robustness_sweep(fast_cfg, model)["cells"]
    assert len(plain) == len(fast) == 4
    assert all(c["PQ"] > 40 for c in plain if c["attack"] == "clean")  # scores worth comparing
    metrics = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")
    for p, f in zip(_scores(plain), _scores(fast)):
        assert {k: v for k, v in p.items() if k not in metrics} == {
            k: v for k, v in f.items() if k not in metrics
        }
        # Measured for batch 1 vs 2 on 20 pairs of val images x (none, NL-means): identical
        # PQ in all 40 clean and all 40 FGSM eps 2 comparisons (0 pixels of a step from the same
        # iterate flipped enough to change a segment); a flipped segment would move PQ by > 0.5.
        for k in metrics:
            assert abs(p[k] - f[k]) <= 0.5, (k, p, f)

    def keys(cfg):
        return sorted(os.path.basename(d) for d in glob.glob(os.path.join(cfg.OUTPUT_DIR, "robustness_cache", "*", "*")))

    assert keys(plain_cfg) == keys(fast_cfg)
    meta = _read(os.path.join(fast_cfg.OUTPUT_DIR, "robustness.json"))["metadata"]
    assert meta["batch_size"] == 2 and meta["defense_workers"] == 1
    amp_cfg = _cfg(synthetic_cityscapes_names, SHIPPED, tmp_path / "amp", *opts, "ROBUSTNESS.AMP", "bfloat16",
                   "ROBUSTNESS.INCLUDE_CLEAN", "False")  # fmt: skip
    amp = run_robustness_sweep(amp_cfg, model)["cells"]
    assert [c["attack"] for c in amp] == ["fgsm", "fgsm"]  # INCLUDE_CLEAN False: no clean cells
    assert set(keys(amp_cfg)).isdisjoint(keys(plain_cfg)) and len(keys(amp_cfg)) == 1
    with pytest.raises(ValueError, match="ROBUSTNESS.BATCH_SIZE"):
        run_robustness_sweep(_cfg(synthetic_cityscapes_names, SHIPPED, tmp_path / "bad", "ROBUSTNESS.BATCH_SIZE", "0"), model)
