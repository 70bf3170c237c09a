# Copyright (c) UPSNetRobust authors.
"""Adaptive attacks: BPDA (real defense forward, surrogate VJP backward), EOT over TVM masks,
the defense-aware objective on a toy model, and adaptive passes of the sweep (cells, resume)."""

import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, SMALL_TEST_OPTS, tiny_cfg

from upsnet_robust.attacks import IFGSM, SegPGD, objective_gradient
from upsnet_robust.defenses import TVMTransform, apply_defense_to_tensor, build_defense
from upsnet_robust.defenses.bpda import (
    DefenseAwareObjective,
    defense_forward_bpda,
    eot_samples_for,
)
from upsnet_robust.defenses.surrogates import (
    DEFAULT_SURROGATES,
    SoftMedianSurrogate,
    build_surrogate,
    differentiable_jpeg,
    gaussian_blur_torch,
    resolve_surrogates,
    soft_median_filter,
)

ALL_DEFENSES = ["nlmeans", "adaptive_nlmeans", "jpeg", "bitdepth", "median", "gaussian", "tvm"]
TRAINED = os.path.join(REPO_ROOT, "checkpoints", "upsnet_tiny_synthetic.pth")


def natural(height=40, width=56, name="coffee", top=100, left=200):
    """A crop of a natural photograph as a (1, 3, H, W) float32 BGR tensor, 0-255."""
    import skimage.data

    rgb = getattr(skimage.data, name)()[top : top + height, left : left + width]
    return (
        torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1]).astype(np.float32))
        .permute(2, 0, 1)[None]
        .contiguous()
    )


def bpda_grad(transform, x, grad, surrogate="auto", input_format="BGR"):
    xs = x.clone().requires_grad_(True)
    y = defense_forward_bpda(transform, xs, surrogate, input_format)
    (g,) = torch.autograd.grad(y, xs, grad)
    return y.detach(), g


def surrogate_grad(fn, x, grad):
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xs), xs, grad)
    return g


@pytest.fixture(scope="module")
def x2():
    """Two different natural images (N = 2)."""
    return torch.cat([natural(), natural(name="astronaut", top=60, left=180)])


# ------------------------------------------------------------------------------------------------
# BPDA: forward = real defense, backward = surrogate VJP
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_DEFENSES + ["median+nlmeans", "gaussian+tvm", "none"])
@pytest.mark.parametrize("input_format", ["BGR", "RGB"])
def test_bpda_forward_equals_real_defense(x2, name, input_format):
    t = build_defense(name)
    x = x2 + 0.3  # float, off the uint8 grid
    y = defense_forward_bpda(t, x.clone().requires_grad_(True), "auto", input_format)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.detach(), apply_defense_to_tensor(t, x, input_format))


@pytest.mark.parametrize("name", ["nlmeans", "adaptive_nlmeans", "tvm"])
def test_identity_surrogate_passes_gradient_unchanged(x2, name):
    assert DEFAULT_SURROGATES[name] == "identity"
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(0))
    _, grad = bpda_grad(build_defense(name), x2, g)
    assert torch.equal(grad, g)


def test_gaussian_surrogate_is_the_exact_blur_and_gradient(x2):
    t = build_defense("gaussian", sigma=1.5)
    y_torch = gaussian_blur_torch(x2, 1.5, 4.0)
    assert (y_torch - apply_defense_to_tensor(t, x2)).abs().max() < 1e-3
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(1))
    y, grad = bpda_grad(t, x2, g)
    ref = surrogate_grad(lambda z: gaussian_blur_torch(z, 1.5, 4.0), x2, g)
    assert torch.allclose(grad, ref, atol=1e-6)
    # a blur's VJP is a blur: smooth, not the incoming noise
    assert (grad - g).abs().mean() > 0.3 * g.abs().mean()


def test_straight_through_bitdepth(x2):
    t = build_defense("bitdepth", bits=3)
    sur = build_surrogate("auto", t)
    assert sur.name == "straight_through"
    assert torch.equal(sur(x2), apply_defense_to_tensor(t, x2))  # its forward is the quantiser
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(2))
    _, grad = bpda_grad(t, x2, g)
    assert torch.equal(grad, g)  # identity through round (x inside [0, 255])
    outside = x2.clone()
    outside[0, 0, 0, 0] = 300.0
    _, grad = bpda_grad(t, outside, g)
    assert grad[0, 0, 0, 0] == 0 and torch.equal(grad.flatten()[1:], g.flatten()[1:])


@pytest.mark.parametrize("window", [2, 3])
def test_soft_median_surrogate(x2, window):
    t = build_defense("median", window=window)
    real = apply_defense_to_tensor(t, x2)
    assert torch.equal(soft_median_filter(x2, window, temperature=0), real)  # exact median
    assert (soft_median_filter(x2, window) - real).abs().mean() < 1.0  # default T: close
    box = F.avg_pool2d(
        F.pad(x2, (window // 2, window - 1 - window // 2) * 2, mode="replicate"), window, 1
    )
    assert torch.allclose(soft_median_filter(x2, window, temperature=1e9), box, atol=1e-3)
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(3))
    _, grad = bpda_grad(t, x2, g)
    sur = SoftMedianSurrogate(t)
    assert torch.allclose(grad, surrogate_grad(lambda z: sur(z), x2, g), atol=1e-6)
    # spread over the near-median pixels: more pixels get a gradient than the exact median's
    exact = surrogate_grad(lambda z: soft_median_filter(z, window, 0), x2, g)
    assert (grad != 0).float().mean() > (exact != 0).float().mean()


def test_differentiable_jpeg_approximates_the_codec(x2):
    t = build_defense("jpeg", quality=75)
    real = apply_defense_to_tensor(t, x2)
    approx = differentiable_jpeg(x2, 75)
    err, err_identity = (approx - real).abs().mean(), (x2 - real).abs().mean()
    assert err < 1.5 and err < 0.5 * err_identity, (err, err_identity)
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(4))
    for fmt in ("BGR", "RGB"):
        _, grad = bpda_grad(t, x2, g, input_format=fmt)
        ref = surrogate_grad(lambda z: differentiable_jpeg(z, 75, fmt), x2, g)
        assert torch.allclose(grad, ref, atol=1e-5) and grad.abs().sum() > 0
    _, cubic = bpda_grad(t, x2, g, surrogate="jpeg_cubic")
    assert torch.isfinite(cubic).all() and not torch.allclose(cubic, grad)


def test_chains_compose_surrogates_at_each_stage_input(x2):
    g = torch.randn(x2.shape, generator=torch.Generator().manual_seed(5))
    t = build_defense("gaussian+median")
    stages = resolve_surrogates(t)
    assert [s.name for _, s in stages] == ["gaussian", "soft_median"]
    y, grad = bpda_grad(t, x2, g)
    mid = apply_defense_to_tensor(t.transforms[0], x2)
    # chain rule: the median's VJP at the blurred (real) image, then the blur's VJP at x
    g_mid = surrogate_grad(lambda z: stages[1][1](z), mid, g)
    ref = surrogate_grad(lambda z: stages[0][1](z), x2, g_mid)
    assert torch.allclose(grad, ref, atol=1e-5)
    # one name for every stage, or per stage
    assert [s.name for _, s in resolve_surrogates(t, "identity")] == ["identity"] * 2
    assert [s.name for _, s in resolve_surrogates(t, "median:identity")] == ["gaussian", "identity"]
    with pytest.raises(KeyError, match="soft_median"):
        resolve_surrogates(t, "no_such_surrogate")
    with pytest.raises(ValueError, match="sigma"):
        build_surrogate("gaussian", build_defense("nlmeans"))


# ------------------------------------------------------------------------------------------------
# EOT over TVM masks
# ------------------------------------------------------------------------------------------------
class SpyTVM(TVMTransform):
    """TVM that records every mask it is applied with."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.masks = []

    def apply_image(self, img, mask=None):
        self.masks.append(None if mask is None else mask.copy())
        return super().apply_image(img, mask=mask)


def _quadratic(weights):
    target = torch.full_like(weights, 100.0)

    def objective(z):
        return (weights * (z - target) ** 2).flatten(1).sum(1) / 1e4

    return objective


def test_eot_averages_over_distinct_masks_and_is_seeded(x2):
    w = torch.rand(x2.shape, generator=torch.Generator().manual_seed(6))
    objective = _quadratic(w)
    spy = SpyTVM(num_iters=10)
    assert eot_samples_for(spy) == 4 and eot_samples_for(build_defense("median"), 8) == 1
    eot = DefenseAwareObjective(objective, spy, eot_samples=3, generator=123)
    assert eot.eot_samples == 3 and eot.surrogate == "identity"
    value, grad = objective_gradient(eot, x2)
    masks = spy.masks
    assert len(masks) == 3 * 2 and eot.stats["defense_calls"] == 3
    assert len({m.tobytes() for m in masks}) == 6  # all distinct
    # the same computation by hand: mean over the recorded masks, identity VJP
    values, grads = [], []
    for s in range(3):
        outs = [
            torch.from_numpy(
                TVMTransform(num_iters=10).apply_image(
                    x2[i].permute(1, 2, 0).numpy(), mask=masks[2 * s + i]
                )
            ).permute(2, 0, 1)
            for i in range(2)
        ]
        y = torch.stack(outs).requires_grad_(True)
        v = objective(y)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v.sum(), y)[0])
    assert torch.allclose(value, torch.stack(values).mean(0), rtol=1e-6)
    assert torch.allclose(grad, torch.stack(grads).mean(0), rtol=1e-5, atol=1e-7)
    # seeded: same seed, same masks and values; the no-grad path (restart scoring) agrees
    spy2 = SpyTVM(num_iters=10)
    with torch.no_grad():
        v2 = DefenseAwareObjective(objective, spy2, eot_samples=3, generator=123)(x2)
    assert torch.allclose(v2, value, rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(masks, spy2.masks))
    spy3 = SpyTVM(num_iters=10)
    DefenseAwareObjective(objective, spy3, eot_samples=3, generator=124)(x2)
    assert not np.array_equal(masks[0], spy3.masks[0])
    # without an rng the defense's own deterministic mask is used: the real defense exactly
    spy4 = SpyTVM(num_iters=10)
    defense_forward_bpda(spy4, x2)
    assert spy4.masks == [None, None]


def test_deterministic_defense_uses_one_sample(x2):
    calls = []

    def objective(z):
        calls.append(1)
        return z.flatten(1).mean(1)

    eot = DefenseAwareObjective(objective, build_defense("median"), eot_samples=5, generator=0)
    assert eot.eot_samples == 1 and eot.rng is None
    objective_gradient(eot, x2)
    assert len(calls) == 1 and eot.stats["defense_calls"] == 1


# ------------------------------------------------------------------------------------------------
# The defense-aware objective on a toy differentiable model
# ------------------------------------------------------------------------------------------------
class ToySegmenter(torch.nn.Module):
    """Three 3x3 convs, 5 classes, per-pixel logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 5, 3, padding=1),
        )
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return 10 * self.net((x - 128.0) / 16.0)


class ToyObjective:
    """Per-image CE against the clean prediction; also dense (for SegPGD)."""

    def __init__(self, model, clean):
        self.model = model
        self.target = model(clean).argmax(1)

    def __call__(self, x):
        return F.cross_entropy(self.model(x), self.target, reduction="none").flatten(1).mean(1)

    def logits_and_targets(self, x):
        return self.model(x), self.target


@pytest.fixture(scope="module")
def toy():
    model = ToySegmenter()
    x = natural(64, 96)
    return model, x, ToyObjective(model, x)


def test_gradient_reaches_input_through_opencv_nlmeans(toy):
    model, x, objective = toy
    t = build_defense("nlmeans")
    with pytest.raises(RuntimeError):  # the real defense alone has no gradient
        objective_gradient(lambda z: objective(apply_defense_to_tensor(t, z)), x)
    value, grad = objective_gradient(DefenseAwareObjective(objective, t), x)
    assert value.shape == (1,) and torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.9
    assert torch.isclose(value, objective(apply_defense_to_tensor(t, x))).all()


@pytest.mark.parametrize("name", ["gaussian"])
def test_adaptive_ifgsm_beats_transfer_on_the_defended_pipeline(toy, name):
    model, x, objective = toy
    t = build_defense(name)

    def defended(z):
        with torch.no_grad():
            return float(objective(apply_defense_to_tensor(t, z)))

    transfer = IFGSM(8.0).perturb(x, objective)  # defense-unaware: white-box on the model
    adaptive = IFGSM(8.0).perturb(x, DefenseAwareObjective(objective, t))
    assert (adaptive - x).abs().max() <= 8.0 + 1e-4
    clean, v_transfer, v_adaptive = defended(x), defended(transfer), defended(adaptive)
    assert v_adaptive > v_transfer + 0.02 and v_transfer > clean, (clean, v_transfer, v_adaptive)


def test_dense_attacks_run_through_the_wrapper(toy):
    model, x, objective = toy
    wrapped = DefenseAwareObjective(
        objective, build_defense("tvm", num_iters=5), eot_samples=2, generator=0
    )
    logits, targets = wrapped.logits_and_targets(x)
    assert logits.shape == (1, 5, 64, 96) and torch.equal(targets, objective.target)
    adv = SegPGD(4.0, num_steps=2).perturb(x, wrapped)
    assert (adv - x).abs().max() <= 4.0 + 1e-4 and not torch.equal(adv, x)
    plain = DefenseAwareObjective(lambda z: z.flatten(1).mean(1), build_defense("median"))
    assert getattr(plain, "logits_and_targets", None) is None
    with pytest.raises(TypeError, match="dense objective"):
        SegPGD(4.0, num_steps=1).perturb(x, plain)


# ------------------------------------------------------------------------------------------------
# Sweep: adaptive passes, cells, report and resume
# ------------------------------------------------------------------------------------------------
ADAPTIVE_OPTS = [
    "ROBUSTNESS.ATTACKS", "['ifgsm']",
    "ROBUSTNESS.EPSILONS", "[1.0]",
    "ROBUSTNESS.OBJECTIVE", "semantic_ce",  # the plumbing, not the loss, is under test: cheap
    "ROBUSTNESS.DEFENSES", "['none', 'median', 'tvm']",
    "ROBUSTNESS.ADAPTIVE", "True",
    "ROBUSTNESS.EOT_SAMPLES", "2",
    "ROBUSTNESS.NUM_EXAMPLES", "1",
    "DEFENSE.TVM.NUM_ITERS", "10",
    *SMALL_TEST_OPTS,
]  # fmt: skip


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _load_model(cfg):
    from detectron2.modeling import build_model

    from upsnet_robust.engine import build_checkpointer

    model = build_model(cfg)
    build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _scores(cells):
    keys = ("attack", "eps", "defense", "adaptive", "PQ", "SQ", "RQ", "num_images", "num_failed")
    return [{k: c[k] for k in keys} for c in cells]


def test_sweep_adaptive_passes_cells_report_and_resume(
    synthetic_cityscapes_names, untrained_weights, tmp_path
):
    from upsnet_robust.evaluation import run_robustness_sweep
    from upsnet_robust.evaluation.report import defense_ranking

    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{synthetic_cityscapes_names['val']}',)",
        "MODEL.WEIGHTS", untrained_weights,
        "OUTPUT_DIR", str(tmp_path / "out"),
        *ADAPTIVE_OPTS,
    )  # fmt: skip
    model = _load_model(cfg)
    first = run_robustness_sweep(cfg, model)["cells"]
    # clean x 3 + ifgsm x 3 (defense-unaware) + 2 adaptive (median, tvm)
    assert len(first) == 8
    unaware = [c for c in first if not c["adaptive"]]
    adaptive = {c["defense"]: c for c in first if c["adaptive"]}
    assert len(unaware) == 6 and set(adaptive) == {"median", "tvm"}
    assert all("surrogate" not in c for c in unaware)
    assert adaptive["median"]["surrogate"] == "soft_median(window=3,temperature=4)"
    assert adaptive["tvm"]["surrogate"] == "identity"
    assert adaptive["median"]["eot_samples"] == 1 and adaptive["tvm"]["eot_samples"] == 2
    for c in adaptive.values():
        assert c["attack"] == "ifgsm" and c["eps"] == 1.0 and c["num_steps"] == 2
        assert c["num_images"] == 2 and c["PQ"] is not None
        assert c["attack_s_per_image"] > c["attack_defense_s_per_image"] > 0
        assert c["defense_s_per_image"] > 0

    out = cfg.OUTPUT_DIR
    with open(os.path.join(out, "robustness.json")) as f:
        report = json.load(f)
    # The report's ranking is defense_ranking (tested on hand-made cells in test_report.py) of
    # the sweep's own cells, each defense's worst case the lowest PQ of its attacked cells.
    assert report["defense_ranking"] == json.loads(json.dumps(defense_ranking(report["cells"])))
    ranking = {r["defense"]: r for r in report["defense_ranking"]}
    assert set(ranking) == {"none", "median", "tvm"}
    for d, r in ranking.items():
        attacked = [c["PQ"] for c in first if c["defense"] == d and c["attack"] != "clean"]
        assert all(isinstance(pq, float) for pq in attacked)
        assert r["worst_PQ"] == min(attacked) and r["rank"] in (1, 2, 3)
        if d != "none":
            assert r["worst_PQ"] == min(r["worst_PQ_unaware"], r["worst_PQ_adaptive"])
            assert r["adaptively_evaluated"]
    worst = [r["worst_PQ"] for r in report["defense_ranking"]]
    assert worst == sorted(worst, reverse=True) and report["defense_ranking"][0]["rank"] == 1
    checks = [c["check"] for c in report["checks"]]
    assert "adaptive_vs_transfer: ifgsm/semantic_ce/median eps=1" in checks
    assert "adaptive_vs_transfer: ifgsm/semantic_ce/tvm eps=1" in checks
    md = open(os.path.join(out, "robustness.md")).read()
    assert "## Defenses ranked by worst case" in md and "## Attack: ifgsm (adaptive)" in md
    assert len(glob.glob(os.path.join(out, "examples", "ifgsm-adaptive-tvm_eps1_*.png"))) == 1

    # Per-image records: the adaptive attack's time and its real-defense calls (T x EOT).
    cache = glob.glob(os.path.join(out, "robustness_cache", "*"))[0]
    tvm_dir = glob.glob(os.path.join(cache, "ifgsm_eps1_adaptive-tvm_*"))
    median_dir = glob.glob(os.path.join(cache, "ifgsm_eps1_adaptive-median_*"))
    assert len(tvm_dir) == len(median_dir) == 1
    for d, calls in ((tvm_dir[0], 2 * 2), (median_dir[0], 2)):
        for p in glob.glob(os.path.join(d, "*.pt")):
            rec = torch.load(p, weights_only=True)["record"]
            assert rec["attack_s"] > 0 and rec["attack_defense_calls"] == calls

    # Resume: forget the tvm pass and one image of the median pass; the rest is not redone.
    # The kept images' records are marked (attack_s 1000): a resumed cell averages the marks
    # only if those images were loaded from the cache, not recomputed.
    os.remove(os.path.join(tvm_dir[0], "cells.json"))
    os.remove(os.path.join(median_dir[0], "cells.json"))
    os.remove(sorted(glob.glob(os.path.join(median_dir[0], "*.pt")))[0])
    kept = sorted(glob.glob(os.path.join(tvm_dir[0], "*.pt")))
    kept += sorted(glob.glob(os.path.join(median_dir[0], "*.pt")))
    assert len(kept) == 3
    for p in kept:
        entry = torch.load(p, weights_only=True)
        entry["record"]["attack_s"] = 1000.0
        torch.save(entry, p)
    second = run_robustness_sweep(cfg, model)["cells"]
    assert _scores(second) == _scores(first)
    resumed = {c["defense"]: c for c in second if c["adaptive"]}
    assert resumed["tvm"]["attack_s_per_image"] == 1000.0  # both images from the cache
    assert 500.0 < resumed["median"]["attack_s_per_image"] < 1000.0  # one cached, one redone
    assert len(glob.glob(os.path.join(median_dir[0], "*.pt"))) == 2

    # Another surrogate or EOT count is another pass (own cache); defense-unaware keys do not move.
    from upsnet_robust.evaluation.sweep import RobustnessSweep, sweep_passes

    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.ROBUSTNESS.BPDA_SURROGATE = "identity"
    s1, s2 = RobustnessSweep(cfg, model, untrained_weights, out), RobustnessSweep(
        cfg2, model, untrained_weights, out
    )
    for spec in sweep_passes(cfg):
        k1, k2 = s1._pass_key(spec, s1._attack(spec)), s2._pass_key(spec, s2._attack(spec))
        assert (k1 == k2) == (spec["adaptive"] != "median"), spec
    cfg3 = cfg.clone()
    cfg3.defrost()
    cfg3.ROBUSTNESS.ADAPTIVE = False
    assert [p for p in sweep_passes(cfg3)] == [p for p in sweep_passes(cfg) if not p["adaptive"]]


# ------------------------------------------------------------------------------------------------
# On the trained tiny model (the shipped checkpoint)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(TRAINED),
    reason=f"needs the trained tiny checkpoint {os.path.relpath(TRAINED, REPO_ROOT)} (not shipped yet)",
)
def test_trained_model_adaptive_attacks_reach_lower_pq_than_defense_unaware(tmp_path):
    """BPDA / EOT find lower PQ than the same attack transferred from the undefended model."""
    from upsnet_robust.data import (
        generate_synthetic_cityscapes,
        register_synthetic_cityscapes_panoptic,
    )
    from upsnet_robust.evaluation import run_robustness_sweep
    from upsnet_robust.evaluation.report import PQ_TOLERANCE

    # The first validation images of the default data set (images depend on (seed, split, index)).
    root = generate_synthetic_cityscapes(
        str(tmp_path / "synthetic_cityscapes"), num_train=0, num_val=4, show_progress=False
    )
    names = register_synthetic_cityscapes_panoptic(root, name_prefix="pytest_trained_adaptive")
    cfg = tiny_cfg(
        "DATASETS.TEST", f"('{names[1]}',)",
        "MODEL.WEIGHTS", TRAINED,
        "OUTPUT_DIR", str(tmp_path / "out"),
        "ROBUSTNESS.ATTACKS", "['ifgsm']",
        "ROBUSTNESS.EPSILONS", "[8.0]",
        "ROBUSTNESS.DEFENSES", "['none', 'gaussian', 'median', 'tvm']",
        "ROBUSTNESS.ADAPTIVE", "True",
        "ROBUSTNESS.EOT_SAMPLES", "2",
        "ROBUSTNESS.NUM_EXAMPLES", "0",
        "DATALOADER.NUM_WORKERS", "0",
    )  # fmt: skip
    cells = run_robustness_sweep(cfg, _load_model(cfg))["cells"]
    pq = {(c["defense"], c["adaptive"]): c["PQ"] for c in cells if c["attack"] == "ifgsm"}
    gains = {d: pq[(d, False)] - pq[(d, True)] for d in ("gaussian", "median", "tvm")}
    assert all(g >= -PQ_TOLERANCE for g in gains.values()), gains  # never weaker than transfer
    assert max(gains.values()) > 1.0, gains  # and clearly stronger somewhere


def test_nlmeans_exact_surrogate_is_opencv_forward_with_the_filters_gradient():
    import cv2

    from upsnet_robust.defenses import nlmeans_torch

    g = torch.Generator().manual_seed(4)
    x = (torch.rand(1, 3, 24, 32, generator=g) * 255).round()
    t = build_defense("nlmeans", search_window=9)
    sur = build_surrogate("nlmeans_exact", t)
    assert sur.params() == {"h": 10.0, "h_color": 10.0, "template_window": 7, "search_window": 9}
    y = sur(x)
    expected = cv2.fastNlMeansDenoisingColored(x[0].permute(1, 2, 0).to(torch.uint8).numpy(), None, 10, 10, 7, 9)
    assert np.array_equal(y[0].permute(1, 2, 0).to(torch.uint8).numpy(), expected)
    grad = torch.randn(x.shape, generator=g)
    vjp = sur.vjp(x, grad)
    xs = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(nlmeans_torch(xs, 10, 10, 7, 9), xs, grad)
    torch.testing.assert_close(vjp, ref)
    assert not torch.allclose(vjp, grad)  # not the identity: the filter's own Jacobian
    with pytest.raises(ValueError, match="nlmeans_exact"):
        build_surrogate("nlmeans_exact", build_defense("median"))
