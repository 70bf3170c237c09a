# Copyright (c) UPSNetRobust authors.
"""Tests of the model-agnostic attack algorithms in ``upsnet_robust.attacks``.

The reference loops below are written independently of the implementation: plain float64 numpy
with the analytic gradient of a linear-softmax model whose logits at a pixel also see its left
neighbour (logits = W z + V roll(z, 1, W-axis) + b, z = x/255 - 1/2), so per-pixel loss weights
(SegPGD, CosPGD) change gradient signs. They follow the formulas in docs/ATTACKS.md
literally, Clip_{x,eps}(z) included.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upsnet_robust.attacks import (
    ATTACK_REGISTRY,
    FGSM,
    IFGSM,
    ILLC,
    MIFGSM,
    PGD,
    CosPGD,
    NonFiniteGradientError,
    SegPGD,
    build_attack,
    kurakin_num_steps,
    project_linf,
)
from upsnet_robust.attacks.cospgd import cospgd_loss
from upsnet_robust.attacks.segpgd import segpgd_lambda, segpgd_loss

NUM_CLASSES = 4
IGNORE = 255
_RNG = np.random.default_rng(1234)
# Large weights so that a few grey levels flip predictions (exercises SegPGD's two sets).
W_NP = _RNG.normal(size=(NUM_CLASSES, 3)) * 40.0
V_NP = _RNG.normal(size=(NUM_CLASSES, 3)) * 30.0  # weights of the left neighbour (circular)
B_NP = _RNG.normal(size=NUM_CLASSES)


# ------------------------------------------------------------------------------------------
# The model: numpy float64 reference and torch version
# ------------------------------------------------------------------------------------------
def np_logits(x):
    """(N, 3, H, W) pixels -> (N, C, H, W) logits."""
    z = x / 255.0 - 0.5
    return (
        np.einsum("ck,nkhw->nchw", W_NP, z)
        + np.einsum("ck,nkhw->nchw", V_NP, np.roll(z, 1, axis=3))
        + B_NP[None, :, None, None]
    )


def np_softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_one_hot(labels):
    """(N, H, W) labels (ignore mapped to class 0) -> (N, C, H, W)."""
    safe = np.where(labels == IGNORE, 0, labels)
    return (np.arange(NUM_CLASSES)[None, :, None, None] == safe[:, None]).astype(np.float64)


def np_ce(x, labels):
    """Per-pixel cross-entropy (N, H, W)."""
    logp = np.log(np_softmax(np_logits(x)))
    return -(np_one_hot(labels) * logp).sum(axis=1)


def np_weighted_ce_grad(x, labels, pixel_weight):
    """d/dx of sum_{n,h,w} pixel_weight * CE, with pixel_weight held constant.

    dCE/dlogits = p - onehot(y); the neighbour term sends V^T dlogits one pixel back.
    """
    d = (np_softmax(np_logits(x)) - np_one_hot(labels)) * pixel_weight[:, None]
    own = np.einsum("ck,nchw->nkhw", W_NP, d)
    neighbour = np.roll(np.einsum("ck,nchw->nkhw", V_NP, d), -1, axis=3)
    return (own + neighbour) / 255.0


def np_clip(z, x, eps):
    """Clip_{x,eps}(z) = min(255, x + eps, max(0, x - eps, z))."""
    return np.minimum(np.minimum(255.0, x + eps), np.maximum(np.maximum(0.0, x - eps), z))


def eps_array(eps, n):
    return np.broadcast_to(np.asarray(eps, dtype=np.float64).reshape(-1, 1, 1, 1), (n, 1, 1, 1))


class PixelObjective:
    """Per-image sum of per-pixel CE of the linear-softmax model; also a dense objective."""

    def __init__(self, labels, sign=1.0, dtype=torch.float64):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.sign = sign
        self.w = torch.as_tensor(W_NP, dtype=dtype)
        self.v = torch.as_tensor(V_NP, dtype=dtype)
        self.b = torch.as_tensor(B_NP, dtype=dtype)

    def logits(self, x):
        w, v, b = self.w.to(x.dtype), self.v.to(x.dtype), self.b.to(x.dtype)
        z = x / 255.0 - 0.5
        return (
            torch.einsum("ck,nkhw->nchw", w, z)
            + torch.einsum("ck,nkhw->nchw", v, torch.roll(z, 1, dims=3))
            + b[None, :, None, None]
        )

    def logits_and_targets(self, x):
        return self.logits(x), self.labels

    def __call__(self, x):
        ce = F.cross_entropy(self.logits(x), self.labels, ignore_index=IGNORE, reduction="none")
        return self.sign * ce.flatten(1).sum(1)


def make_batch(n=2, h=5, w=6, seed=0, ignore_fraction=0.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, size=(n, 3, h, w))
    x[0, 0, 0, :2] = [0.0, 255.0]  # pixels on the box border
    y = rng.integers(0, NUM_CLASSES, size=(n, h, w))
    if ignore_fraction > 0:
        y[rng.uniform(size=y.shape) < ignore_fraction] = IGNORE
    return x, y


def to_t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------
# Reference loops (the formulas in docs/ATTACKS.md)
# ------------------------------------------------------------------------------------------
def ref_fgsm(x, y, eps):
    g = np_weighted_ce_grad(x, y, np.ones(y.shape))
    return np.clip(x + eps_array(eps, len(x)) * np.sign(g), 0.0, 255.0)


def ref_bim(x, y, eps, alpha, steps, start=None, sign=1.0):
    e = eps_array(eps, len(x))
    xt = x.copy() if start is None else start.copy()
    for _ in range(steps):
        g = sign * np_weighted_ce_grad(xt, y, np.ones(y.shape))
        xt = np_clip(xt + alpha * np.sign(g), x, e)
    return xt


def ref_mifgsm(x, y, eps, steps, mu):
    e = eps_array(eps, len(x))
    alpha = e / steps
    g_acc = np.zeros_like(x)
    xt = x.copy()
    for _ in range(steps):
        g = np_weighted_ce_grad(xt, y, np.ones(y.shape))
        g_acc = mu * g_acc + g / np.abs(g).sum(axis=(1, 2, 3), keepdims=True)
        xt = np_clip(xt + alpha * np.sign(g_acc), x, e)
    return xt


def ref_segpgd(x, y, eps, alpha, steps):
    e = eps_array(eps, len(x))
    valid = y != IGNORE
    hw = valid.sum(axis=(1, 2)).reshape(-1, 1, 1)
    xt = x.copy()
    for t in range(1, steps + 1):
        lam = (t - 1) / (2.0 * steps)
        correct = (np_logits(xt).argmax(axis=1) == y) & valid
        wrong = ~correct & valid
        weight = ((1 - lam) * correct + lam * wrong) / hw
        g = np_weighted_ce_grad(xt, y, weight)
        xt = np_clip(xt + alpha * np.sign(g), x, e)
    return xt


def ref_cospgd(x, y, eps, alpha, steps):
    e = eps_array(eps, len(x))
    valid = y != IGNORE
    hw = valid.sum(axis=(1, 2)).reshape(-1, 1, 1)
    xt = x.copy()
    for _ in range(steps):
        p = np_softmax(np_logits(xt))
        cos = (p * np_one_hot(y)).sum(axis=1) / np.sqrt((p**2).sum(axis=1))  # |onehot| = 1
        g = np_weighted_ce_grad(xt, y, cos * valid / hw)
        xt = np_clip(xt + alpha * np.sign(g), x, e)
    return xt


ATOL = 1e-9


# ------------------------------------------------------------------------------------------
# Algorithms against the references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.25, 4.0, [0.5, 8.0]])
def test_fgsm_matches_reference(eps):
    x, y = make_batch()
    e = torch.tensor(eps, dtype=torch.float64) if isinstance(eps, list) else eps
    adv = FGSM(e).perturb(to_t(x), PixelObjective(y))
    assert adv.dtype == torch.float64
    np.testing.assert_allclose(adv.numpy(), ref_fgsm(x, y, eps), rtol=0, atol=ATOL)


@pytest.mark.parametrize("eps", [0.25, 2.0, 8.0])
def test_ifgsm_matches_reference_with_kurakin_steps(eps):
    x, y = make_batch(seed=1)
    attack = IFGSM(eps)
    adv = attack.perturb(to_t(x), PixelObjective(y))
    steps = {0.25: 1, 2.0: 3, 8.0: 10}[eps]
    assert attack.num_forward_backward == steps
    np.testing.assert_allclose(adv.numpy(), ref_bim(x, y, eps, 1.0, steps), rtol=0, atol=ATOL)


def test_pgd_matches_reference_with_random_start():
    x, y = make_batch(seed=2)
    eps, alpha, steps, seed = 6.0, 1.5, 4, 7
    adv = PGD(eps, alpha, steps, random_start=True, generator=torch.Generator().manual_seed(seed))
    adv = adv.perturb(to_t(x), PixelObjective(y))
    # Documented start: one torch.rand(images.shape) from the generator, uniform on the box
    # [max(0, x - eps), min(255, x + eps)].
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo, hi = np.maximum(0.0, x - eps), np.minimum(255.0, x + eps)
    start = lo + u.numpy() * (hi - lo)
    expected = ref_bim(x, y, eps, alpha, steps, start=start)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=0, atol=ATOL)


def test_random_start_is_uniform_on_the_box():
    """A zero-gradient objective leaves PGD at its start: lo + u (hi - lo), u = torch.rand."""
    x = torch.tensor([0.0, 1.0, 128.0, 254.5, 255.0], dtype=torch.float64).repeat(40, 3, 4, 1)
    eps, seed = 2.0, 21
    gen = torch.Generator().manual_seed(seed)
    adv = PGD(eps, 1.0, 1, random_start=True, generator=gen).perturb(
        x, lambda z: (0.0 * z).flatten(1).sum(1)
    )
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=255)
    torch.testing.assert_close(adv, lo + u * (hi - lo), rtol=0, atol=ATOL)
    # No mass piles up on the pixel range's border (clipping x + U(-eps, eps) would put half
    # of the starts of a 0 pixel exactly at 0).
    assert (adv[..., 0] > 0).all() and (adv[..., 4] < 255).all()


def test_pgd_default_step_is_eps_over_steps():
    x, y = make_batch(seed=3)
    adv = PGD(5.0, None, 4).perturb(to_t(x), PixelObjective(y))
    np.testing.assert_allclose(adv.numpy(), ref_bim(x, y, 5.0, 5.0 / 4, 4), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_mifgsm_matches_reference(mu):
    x, y = make_batch(seed=4)
    adv = MIFGSM(8.0, num_steps=5, decay=mu).perturb(to_t(x), PixelObjective(y))
    np.testing.assert_allclose(adv.numpy(), ref_mifgsm(x, y, 8.0, 5, mu), rtol=0, atol=ATOL)


def test_illc_descends_cross_entropy_to_least_likely_class():
    """ILLC + "least_likely" objective (= -CE to y_LL) is x - alpha sign grad CE(x, y_LL)."""
    x, _ = make_batch(seed=5)
    y_ll = np_logits(x).argmin(axis=1)  # fixed from the clean prediction
    attack = ILLC(4.0)
    assert attack.required_objective == "least_likely"
    assert FGSM(1.0).required_objective is None and PGD(1.0).required_objective is None
    adv = attack.perturb(to_t(x), PixelObjective(y_ll, sign=-1.0))
    expected = ref_bim(x, y_ll, 4.0, 1.0, kurakin_num_steps(4.0), sign=-1.0)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=0, atol=ATOL)
    assert np_ce(adv.numpy(), y_ll).sum() < np_ce(x, y_ll).sum()


@pytest.mark.parametrize("eps", [4.0, [2.0, 16.0]])
def test_segpgd_matches_reference(eps):
    x, y = make_batch(seed=6, ignore_fraction=0.3)
    e = torch.tensor(eps, dtype=torch.float64) if isinstance(eps, list) else eps
    adv = SegPGD(e, 1.0, 6).perturb(to_t(x), PixelObjective(y))
    np.testing.assert_allclose(adv.numpy(), ref_segpgd(x, y, eps, 1.0, 6), rtol=0, atol=ATOL)


def test_cospgd_matches_reference():
    x, y = make_batch(seed=7, ignore_fraction=0.3)
    adv = CosPGD(4.0, 1.0, 6).perturb(to_t(x), PixelObjective(y))
    np.testing.assert_allclose(adv.numpy(), ref_cospgd(x, y, 4.0, 1.0, 6), rtol=0, atol=ATOL)


class TinyConvNet(torch.nn.Module):
    """A fixed random conv net (float64): a nonlinear model for a second reference check."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
        self.w2 = torch.randn(NUM_CLASSES, 6, 1, 1, generator=g, dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x / 255.0 - 0.5, self.w1, padding=1))
        return F.conv2d(h, self.w2)


def test_pgd_matches_autograd_reference_on_conv_net():
    net = TinyConvNet()
    x, y = make_batch(n=2, h=6, w=6, seed=8)
    x, y = to_t(x), torch.from_numpy(y)

    def objective(z):
        return F.cross_entropy(net(z), y, reduction="none").flatten(1).sum(1)

    eps, alpha, steps = 3.0, 0.75, 5
    adv = PGD(eps, alpha, steps).perturb(x, objective)
    ref = x.clone()
    for _ in range(steps):
        z = ref.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(z).sum(), z)
        z = ref + alpha * g.sign()
        ref = torch.minimum(torch.clamp(x + eps, max=255.0), torch.maximum(x - eps, z).clamp(0))
    torch.testing.assert_close(adv, ref, rtol=0, atol=ATOL)
    assert (objective(adv) > objective(x)).all()


@pytest.mark.parametrize("attack", [FGSM(4.0), IFGSM(4.0), PGD(4.0, 1.0, 5), MIFGSM(4.0)])
def test_attack_increases_objective(attack):
    x, y = make_batch(seed=9)
    objective = PixelObjective(y)
    adv = attack.perturb(to_t(x), objective)
    assert (objective(adv) > objective(to_t(x))).all()


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------
def _build(name, eps):
    gen = torch.Generator().manual_seed(0)
    return {
        "fgsm": lambda: FGSM(eps),
        "ifgsm": lambda: IFGSM(eps),  # Kurakin's T, per image if eps is per image
        "pgd": lambda: PGD(eps, None, 3, random_start=True, restarts=2, generator=gen),
        "mifgsm": lambda: MIFGSM(eps, num_steps=3),
        "segpgd": lambda: SegPGD(eps, 2.0, 3, random_start=True, generator=gen),
        "cospgd": lambda: CosPGD(eps, None, 3),
        "illc": lambda: ILLC(eps, num_steps=2),
    }[name]()


EPS_GRID = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
eps_strategy = st.one_of(
    st.sampled_from(EPS_GRID), st.floats(0.01, 40.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
)


@pytest.mark.parametrize("name", ["fgsm", "ifgsm", "pgd", "mifgsm", "segpgd", "cospgd", "illc"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    eps=eps_strategy,
    per_image=st.booleans(),
    saturate=st.booleans(),
)
def test_bounds_properties(name, n, h, w, seed, eps, per_image, saturate):
    g = torch.Generator().manual_seed(seed)
    if saturate:  # many pixels exactly at 0 or 255
        x = (torch.randn(n, 3, h, w, generator=g) * 200 + 128).clamp(0, 255)
    else:
        x = torch.rand(n, 3, h, w, generator=g) * 255
    labels = torch.randint(0, NUM_CLASSES, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    if per_image:
        eps_t = torch.rand(n, generator=g, dtype=torch.float64) * eps + 0.01
        eps_t[0] = eps
        budget = eps_t.float().view(-1, 1, 1, 1)
    else:
        eps_t, budget = eps, eps
    x_before = x.clone()
    adv = _build(name, eps_t).perturb(x, PixelObjective(labels, dtype=torch.float32))
    assert torch.equal(x, x_before), "input mutated"
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert torch.isfinite(adv).all()
    assert ((adv - x).abs() <= budget + 1e-4).all()
    assert (adv >= 0).all() and (adv <= 255).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    eps=st.lists(eps_strategy, min_size=1, max_size=3),
    scale=st.floats(0.0, 600.0, allow_subnormal=False),
)
def test_project_linf_matches_formula(seed, eps, scale):
    g = torch.Generator().manual_seed(seed)
    n = len(eps)
    x = torch.rand(n, 3, 2, 3, generator=g, dtype=torch.float64) * 255
    z = x + (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5) * 2 * scale
    e = np.asarray(eps).reshape(-1, 1, 1, 1)
    out = project_linf(z, x, torch.tensor(eps, dtype=torch.float64))
    np.testing.assert_array_equal(out.numpy(), np_clip(z.numpy(), x.numpy(), e))
    out_scalar = project_linf(z, x, eps[0])
    np.testing.assert_array_equal(out_scalar.numpy(), np_clip(z.numpy(), x.numpy(), eps[0]))


def test_per_image_kurakin_steps_equal_separate_runs():
    x, y = make_batch(n=3, seed=10)
    eps = torch.tensor([0.5, 4.0, 8.0], dtype=torch.float64)
    adv = IFGSM(eps).perturb(to_t(x), PixelObjective(y))
    for i, e in enumerate(eps.tolist()):
        alone = IFGSM(e).perturb(to_t(x[i : i + 1]), PixelObjective(y[i : i + 1]))
        torch.testing.assert_close(adv[i : i + 1], alone, rtol=0, atol=ATOL)
    assert IFGSM(eps).describe()["num_steps"] == [1, 5, 10]


def test_per_image_steps_stop_finished_images():
    """With per-image T, an image stops after its own T even if others go on: a quadratic
    objective peaking at x0 + 0.3 makes alpha = 1 steps oscillate between x0 +- eps."""
    x0 = torch.full((2, 3, 2, 2), 100.0, dtype=torch.float64)

    def objective(z):
        return -((z - x0 - 0.3) ** 2).flatten(1).sum(1)

    attack = IFGSM(torch.tensor([0.5, 1.0]))  # T = 1 and 2
    adv = attack.perturb(x0, objective)
    assert attack.num_forward_backward == 2
    assert torch.equal(adv[0], x0[0] + 0.5)  # one step; a second would go to x0 - 0.5
    assert torch.equal(adv[1], x0[1])  # +1, then -1


def test_mifgsm_normalises_each_image_by_its_own_l1_norm():
    """Quadratic objectives J_i = -s_i sum (x - c)^2 whose gradients change size and sign over
    the steps; very different scales s_i would leak between images under batch normalisation."""
    rng = np.random.default_rng(17)
    x = rng.uniform(50, 200, size=(2, 3, 3, 3))
    c = x + rng.uniform(-3, 3, size=x.shape)
    s = np.array([1e4, 1.0]).reshape(-1, 1, 1, 1)
    eps, steps, mu = 4.0, 10, 1.0
    ref, g_acc = x.copy(), np.zeros_like(x)
    for _ in range(steps):
        g = -2 * s * (ref - c)
        g_acc = mu * g_acc + g / np.abs(g).sum(axis=(1, 2, 3), keepdims=True)
        ref = np_clip(ref + eps / steps * np.sign(g_acc), x, eps)
    s_t, c_t = to_t(s), to_t(c)
    adv = MIFGSM(eps, num_steps=steps, decay=mu).perturb(
        to_t(x), lambda z: -(s_t * (z - c_t) ** 2).flatten(1).sum(1)
    )
    np.testing.assert_allclose(adv.numpy(), ref, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------
# Gradient plumbing and error handling
# ------------------------------------------------------------------------------------------
def test_gradient_reaches_input_under_no_grad():
    x, y = make_batch(seed=11)
    xt = to_t(x)
    with torch.no_grad():
        adv = FGSM(2.0).perturb(xt, PixelObjective(y))
        adv_pgd = PGD(2.0, 1.0, 2).perturb(xt, PixelObjective(y))
    assert not adv.requires_grad and not adv_pgd.requires_grad
    np.testing.assert_allclose(adv.numpy(), ref_fgsm(x, y, 2.0), rtol=0, atol=ATOL)
    np.testing.assert_allclose(adv_pgd.numpy(), ref_bim(x, y, 2.0, 1.0, 2), rtol=0, atol=ATOL)


def test_input_requiring_grad_and_uint8_input():
    x, y = make_batch(seed=12)
    leaf = to_t(x).requires_grad_(True)
    adv = IFGSM(1.0).perturb(leaf, PixelObjective(y))
    assert leaf.grad is None and not adv.requires_grad
    x8 = torch.from_numpy(np.round(x).astype(np.uint8))
    adv8 = FGSM(0.25).perturb(x8, PixelObjective(y, dtype=torch.float32))
    assert adv8.dtype == torch.float32 and x8.dtype == torch.uint8
    diff = (adv8 - x8.float()).abs()
    assert ((diff - 0.25).abs() < 1e-6).logical_or(diff == 0).all()  # no rounding to uint8
    assert (diff > 0).any()


@pytest.mark.parametrize("attack", [FGSM(1.0), IFGSM(1.0), PGD(1.0, 0.5, 2), MIFGSM(1.0)])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_gradient_raises_with_per_image_mask(attack, kind):
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64) * 200 + 20
    if kind == "nan":
        scale = torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64).view(-1, 1, 1, 1)

        def objective(z):
            return (z * scale).flatten(1).sum(1)

    else:
        x[1, 0, 0, 0] = 255.0  # d/dz sqrt(255 - z) at z = 255 is -inf

        def objective(z):
            return torch.sqrt(255.0 - z).flatten(1).sum(1)

    with pytest.raises(NonFiniteGradientError) as info:
        attack.perturb(x, objective)
    assert isinstance(info.value, RuntimeError)
    assert info.value.per_image_mask.tolist() == [False, True, False]
    assert "[1]" in str(info.value)


@pytest.mark.parametrize("cls", [FGSM, IFGSM, PGD, MIFGSM, SegPGD, CosPGD, ILLC])
@pytest.mark.parametrize(
    "bad, text",
    [
        (0.0, "0.0"),
        (-1.0, "-1.0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (torch.tensor([1.0, 0.0]), "0.0"),
    ],
)
def test_invalid_eps_raises_value_error(cls, bad, text):
    with pytest.raises(ValueError, match=text):
        cls(bad)


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="num_steps"):
        PGD(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="step_size"):
        PGD(1.0, -2.0, 3)
    with pytest.raises(ValueError, match="restarts"):
        PGD(1.0, 1.0, 3, restarts=0)
    with pytest.raises(ValueError, match="decay"):
        MIFGSM(1.0, decay=float("nan"))
    with pytest.raises(ValueError, match="per-image budgets"):
        FGSM(torch.tensor([1.0, 2.0])).perturb(torch.zeros(3, 3, 2, 2), lambda z: z.sum())


def test_kurakin_num_steps_table():
    table = {0.25: 1, 0.5: 1, 1: 2, 2: 3, 4: 5, 8: 10, 16: 20, 32: 36}
    assert {e: kurakin_num_steps(e) for e in table} == table
    assert kurakin_num_steps(0.8) == 1
    assert kurakin_num_steps(3 * 0.8) == 3  # 1.25 * 2.4000000000000004 = 3.0000000000000004
    assert kurakin_num_steps(0.01) == 1
    for e in [0.3, 1.7, 3.3, 5.0, 100.0]:
        assert kurakin_num_steps(e) == max(1, math.ceil(min(e + 4, 1.25 * e)))
    for bad in [0, -1, float("nan")]:
        with pytest.raises(ValueError):
            kurakin_num_steps(bad)


def test_num_forward_backward_counts():
    x, y = make_batch(seed=13)
    obj = PixelObjective(y)
    attack = PGD(2.0, 1.0, 3, random_start=True, restarts=2)
    attack.perturb(to_t(x), obj)
    assert (attack.num_forward_backward, attack.num_forward) == (6, 2)
    attack.perturb(to_t(x), obj)
    assert attack.num_forward_backward == 12
    attack.reset_counters()
    assert attack.num_forward_backward == 0
    fgsm = FGSM(1.0)
    fgsm.perturb(to_t(x), obj)
    assert fgsm.num_forward_backward == 1


# ------------------------------------------------------------------------------------------
# PGD restarts and determinism
# ------------------------------------------------------------------------------------------
class TwoPeakObjective:
    """J_i = a_i relu(m) + b_i relu(-m), m = mean(x - x0): sign ascent runs to +eps or -eps
    depending on the side the random start lands on, with values a_i eps or b_i eps."""

    def __init__(self, x0, a, b):
        self.x0, self.a, self.b = x0, torch.tensor(a), torch.tensor(b)

    def __call__(self, x):
        m = (x - self.x0).flatten(1).mean(1)
        return self.a * torch.relu(m) + self.b * torch.relu(-m)


def test_pgd_restarts_keep_per_image_worst_case():
    x0 = torch.full((2, 3, 2, 2), 128.0, dtype=torch.float64)
    objective = TwoPeakObjective(x0, a=[3.0, 1.0], b=[1.0, 2.0])
    eps, restarts, seed = 4.0, 6, 3

    def run(r):
        return PGD(
            eps,
            2.0,
            4,
            random_start=True,
            restarts=r,
            generator=torch.Generator().manual_seed(seed),
        )

    # Single runs drawn from the same generator stream as the restarts.
    single = run(1)
    runs = [single.perturb(x0, objective) for _ in range(restarts)]
    values = torch.stack([objective(r) for r in runs])  # (restarts, N)
    assert (values.max(0).values > values.min(0).values).all(), "restarts must differ"
    best = run(restarts).perturb(x0, objective)
    expected = torch.stack([runs[int(values[:, i].argmax())][i] for i in range(2)])
    torch.testing.assert_close(best, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        objective(best), torch.tensor([3.0 * eps, 2.0 * eps], dtype=torch.float64)
    )


def test_restarts_need_per_image_objective():
    x = torch.rand(2, 3, 2, 2) * 255
    with pytest.raises(ValueError, match="per-image"):
        PGD(1.0, 1.0, 2, random_start=True, restarts=2).perturb(x, lambda z: z.sum())
    adv = PGD(1.0, 1.0, 2, random_start=True, restarts=2).perturb(x[:1], lambda z: z.sum())
    assert torch.allclose(adv, torch.clamp(x[:1] + 1.0, max=255.0))
    PGD(1.0, 1.0, 2, random_start=True, restarts=1).perturb(x, lambda z: z.sum())  # fine


def test_random_start_is_deterministic_with_seeded_generator():
    x, y = make_batch(seed=14)

    def attack(seed):
        gen = torch.Generator().manual_seed(seed)
        return PGD(4.0, 1.0, 2, random_start=True, restarts=2, generator=gen)

    a = attack(5).perturb(to_t(x), PixelObjective(y))
    b = attack(5).perturb(to_t(x), PixelObjective(y))
    c = attack(6).perturb(to_t(x), PixelObjective(y))
    assert torch.equal(a, b) and not torch.equal(a, c)
    reseeded = attack(6).manual_seed(5)
    assert torch.equal(reseeded.perturb(to_t(x), PixelObjective(y)), a)


def test_per_image_generators_make_random_starts_independent_of_batching():
    x, y = make_batch(n=3, seed=19)
    seeds = [101, 202, 303]

    def attack():
        return PGD(4.0, 1.0, 2, random_start=True, restarts=2)

    batch = attack().manual_seed(seeds).perturb(to_t(x), PixelObjective(y))
    for i in range(3):
        alone = (
            attack()
            .manual_seed([seeds[i]])
            .perturb(to_t(x[i : i + 1]), PixelObjective(y[i : i + 1]))
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="per-image generators"):
        attack().manual_seed(seeds[:2]).perturb(to_t(x), PixelObjective(y))


# ------------------------------------------------------------------------------------------
# SegPGD / CosPGD specifics
# ------------------------------------------------------------------------------------------
def test_segpgd_lambda_schedule():
    assert [segpgd_lambda(t, 4) for t in range(1, 5)] == [0.0, 1 / 8, 2 / 8, 3 / 8]
    assert segpgd_lambda(1, 1) == 0.0


def test_segpgd_loss_sets_and_ignore():
    # One image, 2x2 pixels, 3 classes: pixel 0 correct, pixel 1 wrong, pixel 2 ignored,
    # pixel 3 correct.
    logits = torch.tensor(
        [[[[2.0, 0.0], [5.0, 1.0]], [[0.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]],
        dtype=torch.float64,
        requires_grad=True,
    )
    targets = torch.tensor([[[0, 0], [IGNORE, 0]]])
    ce = -torch.log_softmax(logits.detach(), 1)[0, 0].flatten()  # CE to class 0 per pixel
    lam = 0.3
    expected = ((1 - lam) * (ce[0] + ce[3]) + lam * ce[1]) / 3  # |HW| = 3 valid pixels
    loss = segpgd_loss(logits, targets, lam)
    assert loss.shape == (1,)
    torch.testing.assert_close(loss[0], expected)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert (g[0, :, 1, 0] == 0).all(), "ignored pixel must get no gradient"
    # Changing the ignored pixel's logits changes nothing.
    other = logits.detach().clone()
    other[0, :, 1, 0] = torch.tensor([-9.0, 9.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(segpgd_loss(other, targets, lam), loss.detach())


def test_dense_losses_are_per_image_over_valid_pixels():
    """Values (not only gradient signs) matter when ranking restarts: check them per image."""
    x, y = make_batch(n=3, seed=18)
    y[0, :, :3] = IGNORE
    y[2, 1:, :] = IGNORE
    logits = torch.from_numpy(np_logits(x))
    p = np_softmax(np_logits(x))
    valid = y != IGNORE
    ce = np_ce(x, y) * valid
    hw = valid.sum(axis=(1, 2))
    correct = (p.argmax(axis=1) == y) & valid
    lam = np.array([0.0, 0.25, 0.5])
    expected = [
        ((1 - lam[i]) * ce[i][correct[i]].sum() + lam[i] * ce[i][valid[i] & ~correct[i]].sum())
        / hw[i]
        for i in range(3)
    ]
    got = segpgd_loss(logits, torch.from_numpy(y), torch.from_numpy(lam))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    cos = (p * np_one_hot(y)).sum(axis=1) / np.linalg.norm(p, axis=1)
    expected_cos = (cos * ce).sum(axis=(1, 2)) / hw
    np.testing.assert_allclose(
        cospgd_loss(logits, torch.from_numpy(y)).numpy(), expected_cos, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("cls", [SegPGD, CosPGD])
def test_dense_attacks_all_ignore_image_is_finite_and_untouched(cls):
    x, y = make_batch(seed=15)
    y[1] = IGNORE
    adv = cls(4.0, 1.0, 3).perturb(to_t(x), PixelObjective(y))
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv[1], to_t(x)[1], rtol=0, atol=0)  # zero gradient: no step
    assert (adv[0] != to_t(x)[0]).any()


@pytest.mark.parametrize("cls", [SegPGD, CosPGD])
def test_dense_attacks_need_dense_objective(cls):
    x = torch.rand(1, 3, 2, 2) * 255
    with pytest.raises(TypeError, match="logits_and_targets"):
        cls(1.0, 1.0, 1).perturb(x, lambda z: z.sum())


# ------------------------------------------------------------------------------------------
# Registry and config
# ------------------------------------------------------------------------------------------
def _cfg(**robustness):
    from detectron2.config import get_cfg

    from upsnet_robust import add_robustness_config, add_upsnet_config

    cfg = get_cfg()
    add_upsnet_config(cfg)
    add_robustness_config(cfg)
    for k, v in robustness.items():
        setattr(cfg.ROBUSTNESS, k, v)
    return cfg


EXPECTED_CLASSES = {
    "fgsm": FGSM,
    "ifgsm": IFGSM,
    "pgd": PGD,
    "mifgsm": MIFGSM,
    "segpgd": SegPGD,
    "cospgd": CosPGD,
    "illc": ILLC,
}


def test_registry_names():
    names = {name for name, _ in ATTACK_REGISTRY}
    assert set(EXPECTED_CLASSES) <= names
    for name, cls in EXPECTED_CLASSES.items():
        assert ATTACK_REGISTRY.get(name) is cls
    assert ATTACK_REGISTRY.__doc__.strip()


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_build_attack_defaults(name):
    cfg = _cfg(STEP_SIZE=0.0, NUM_STEPS=0, RANDOM_START=False, RESTARTS=1, MOMENTUM=0.9)
    attack = build_attack(cfg, name, 8.0)
    assert type(attack) is EXPECTED_CLASSES[name]
    d = attack.describe()
    assert {"name", "eps", "num_steps", "step_size", "random_start", "restarts"} <= set(d)
    assert d["name"] == name and d["eps"] == 8.0
    expected_steps = {"fgsm": 1, "mifgsm": 10}.get(name, kurakin_num_steps(8.0))
    assert d["num_steps"] == expected_steps
    expected_alpha = {"fgsm": 8.0, "ifgsm": 1.0, "illc": 1.0}.get(name, 8.0 / expected_steps)
    assert d["step_size"] == pytest.approx(expected_alpha)
    if name == "mifgsm":
        assert d["decay"] == 0.9


def test_build_attack_reads_config():
    cfg = _cfg(STEP_SIZE=2.0, NUM_STEPS=7, RANDOM_START=True, RESTARTS=3, SEED=11)
    pgd = build_attack(cfg, "PGD", 8.0)
    d = pgd.describe()
    assert (d["num_steps"], d["step_size"], d["random_start"], d["restarts"]) == (7, 2.0, True, 3)
    fgsm = build_attack(cfg, "fgsm", 8.0).describe()
    assert (fgsm["num_steps"], fgsm["step_size"]) == (1, 8.0)  # FGSM ignores both
    x, y = make_batch(seed=16)
    a = build_attack(cfg, "pgd", 4.0).perturb(to_t(x), PixelObjective(y))
    b = build_attack(cfg, "pgd", 4.0).perturb(to_t(x), PixelObjective(y))
    assert torch.equal(a, b), "ROBUSTNESS.SEED must make random starts reproducible"


def test_build_attack_unknown_name_lists_registered():
    cfg = _cfg()
    for exc in (KeyError, ValueError):
        with pytest.raises(exc) as info:
            build_attack(cfg, "deepfool", 1.0)
        message = str(info.value)
        assert "deepfool" in message
        for name in EXPECTED_CLASSES:
            assert name in message
