# Copyright (c) UPSNetRobust authors.
"""The torch NL-means (``defenses/torch_nlmeans.py``) against ``cv2.fastNlMeansDenoisingColored``.

Measured accuracy (OpenCV 4.11, torch 2.3.1) and the tolerances asserted here:

* ``quantize=True`` (default) reproduces OpenCV's integer pipeline, so the outputs are
  **identical** (max abs diff 0, PSNR infinite) on every image and parameter set tried: smooth
  and noisy synthetic images, noisy photographs, pure noise, images smaller than the border,
  h = 0, template 1/3/5/8/15, search 5/7/11/20/21, strips of 5 rows. The tests assert exact
  equality; a failure means OpenCV's arithmetic changed (another version) or a regression.
* ``quantize=False`` (smooth relaxation, no rounding, exp weights) differs by the roundings it
  leaves out: measured on the four images below, mean abs diff 0.66-0.81 grey levels, max
  3.6-4.5, PSNR 48.0-49.1 dB. Asserted: mean < 1.0, max <= 8, PSNR > 44 dB.

The 8-bit Lab conversions are checked against ``cv2.cvtColor`` on a subsampled colour cube (the
full 2^24 cube was checked once when the tables were written: 0 mismatches both ways).
"""

import math

import numpy as np
import cv2
import pytest
import torch

from upsnet_robust.defenses.functional import nlmeans_denoise
from upsnet_robust.defenses.torch_nlmeans import (
    bgr_to_lab8,
    lab8_to_bgr,
    nlmeans_lab8,
    nlmeans_torch,
    nlmeans_weight_table,
    opencv_fixed_point_unit,
)

H, W = 48, 64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread for this module: the filter is thousands of short element-wise ops, and
    OpenMP parallel regions stall on a busy machine (the test time doubles with 2 threads on a
    loaded 2-core CPU); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def synthetic_bgr(height=H, width=W, seed=0, noise=10.0):
    """Natural-like synthetic BGR uint8: smooth colour gradients, blurred blobs, a hard edge
    and a textured patch, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    for c in range(3):
        fy, fx, ph = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        img[:, :, c] = 120 + 60 * np.sin(2 * np.pi * (fy * yy / height + fx * xx / width) + ph)
    blobs = cv2.GaussianBlur(rng.uniform(-80, 80, (height, width, 3)), (0, 0), 4)
    img += blobs
    img[:, width // 2 :, :] += 40.0  # a vertical edge
    img[height // 4 : height // 2, width // 8 : width // 3] += rng.normal(0, 25, (1, 1, 3)) + (
        15 * np.sign(np.sin(xx[height // 4 : height // 2, width // 8 : width // 3]))[..., None]
    )
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def natural_bgr(height=H, width=W, seed=0, noise=10.0):
    """A downscaled photograph shipped with scikit-image, BGR uint8, plus Gaussian noise."""
    skdata = pytest.importorskip("skimage.data")
    rgb = skdata.astronaut()
    img = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    rng = np.random.default_rng(seed)
    img = img.astype(np.float64) + rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(img):
    """(H, W, 3) uint8 -> (1, 3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def to_numpy(x):
    return x.detach()[0].permute(1, 2, 0).double().numpy()


def opencv(img, h=10, h_color=10, template=7, search=21):
    return cv2.fastNlMeansDenoisingColored(img, None, h, h_color, template, search)


def compare(out, ref):
    """max / mean abs diff and PSNR (dB, inf when identical) between two images."""
    d = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    mse = float((d**2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return dict(max=float(d.max()), mean=float(d.mean()), psnr=psnr)


IMAGES = {
    "synthetic_48x64": lambda: synthetic_bgr(H, W, seed=0),
    "synthetic_noisy_48x64": lambda: synthetic_bgr(H, W, seed=1, noise=25.0),
    "photo_48x64": lambda: natural_bgr(H, W),
    "photo_96x128": lambda: natural_bgr(96, 128, seed=2),
}


# ------------------------------------------------------------------------------------------------
# colour conversion
# ------------------------------------------------------------------------------------------------
def colour_cube(step=3):
    v = np.arange(0, 256, step)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    cube = np.concatenate([cube, [[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]])
    n = int(math.ceil(len(cube) / 512)) * 512
    cube = np.concatenate([cube, np.zeros((n - len(cube), 3), cube.dtype)])
    return np.ascontiguousarray(cube.reshape(-1, 512, 3).astype(np.uint8))


def test_lab_conversions_match_opencv_exactly():
    cube = colour_cube()
    lab = bgr_to_lab8(to_tensor(cube))
    assert np.array_equal(to_numpy(lab), cv2.cvtColor(cube, cv2.COLOR_LBGR2Lab))
    # the same cube read as Lab triples
    back = lab8_to_bgr(to_tensor(cube))
    assert np.array_equal(to_numpy(back), cv2.cvtColor(cube, cv2.COLOR_Lab2LBGR))


def test_lab_rgb_order_and_smooth_formulas():
    cube = colour_cube(step=17)
    x = to_tensor(cube)
    rgb = x.flip(1)
    assert torch.equal(bgr_to_lab8(x), bgr_to_lab8(rgb, input_format="RGB"))
    assert torch.equal(lab8_to_bgr(x).flip(1), lab8_to_bgr(x, output_format="RGB"))
    # the smooth formulas stay within about a grey level of OpenCV's integer ones
    ref = cv2.cvtColor(cube, cv2.COLOR_LBGR2Lab).astype(np.float64)
    assert np.abs(to_numpy(bgr_to_lab8(x, quantize=False)) - ref).max() < 1.5
    ref = cv2.cvtColor(cube, cv2.COLOR_Lab2LBGR).astype(np.float64)
    assert np.abs(to_numpy(lab8_to_bgr(x, quantize=False)) - ref).max() < 1.5


def test_weight_table_follows_opencv():
    unit = opencv_fixed_point_unit(21)
    assert unit == (2**31 - 1) // (21 * 21 * 255) == 19096
    tab = nlmeans_weight_table(10.0, 1)
    assert tab[0] == unit
    assert len(tab) == int(255 * 255 / (64 / 49) + 1)
    k = 10
    assert tab[k] == np.rint(unit * np.exp(-k * 64 / 49 / 100.0))
    assert np.all(np.diff(tab) <= 0)
    nonzero = tab[tab > 0]
    assert nonzero.min() >= 0.001 * unit
    # two channels: h^2 * 2 in the exponent, table twice as long
    tab2 = nlmeans_weight_table(10.0, 2)
    assert tab2[k] == np.rint(unit * np.exp(-k * 64 / 49 / 200.0))
    assert len(tab2) == int(2 * 255 * 255 / (64 / 49) + 1)
    # h = 0: only identical patches count
    tab0 = nlmeans_weight_table(0.0, 1)
    assert tab0[0] == unit and not tab0[1:].any()


# ------------------------------------------------------------------------------------------------
# agreement with OpenCV
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_matches_opencv_exactly(name):
    img = IMAGES[name]()
    ref = opencv(img)
    out = nlmeans_torch(to_tensor(img))
    stats = compare(to_numpy(out), ref)
    print(f"{name}: quantize=True vs OpenCV {stats}")
    assert stats["max"] == 0, stats


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_smooth_relaxation_close_to_opencv(name):
    img = IMAGES[name]()
    ref = opencv(img)
    out = nlmeans_torch(to_tensor(img), quantize=False)
    stats = compare(to_numpy(out), ref)
    print(f"{name}: quantize=False vs OpenCV {stats}")
    assert stats["mean"] < 1.0 and stats["max"] <= 8 and stats["psnr"] > 44.0, stats


@pytest.mark.parametrize(
    "params,shape",
    [
        ((3.0, 15.0, 5, 11), (H, W)),
        ((0.0, 10.0, 7, 21), (H, W)),
        ((25.0, 5.0, 3, 7), (H, W)),
        ((7.5, 12.5, 8, 20), (H, W)),  # even sizes act like the next smaller odd ones
        ((10.0, 10.0, 7, 21), (9, 11)),  # smaller than the 13-pixel border
        ((10.0, 10.0, 7, 21), (1, 17)),
    ],
)
def test_other_parameters_and_tiny_images_match_opencv(params, shape):
    rng = np.random.default_rng(7)
    img = synthetic_bgr(max(shape[0], 8), max(shape[1], 8), seed=3, noise=20.0)
    img = np.ascontiguousarray(img[: shape[0], : shape[1]])
    img[0, 0] = rng.integers(0, 256, 3)
    ref = opencv(img, *params)
    out = nlmeans_torch(to_tensor(img), *params)
    assert np.array_equal(to_numpy(out), ref)


def test_strips_and_float_input_match_project_defense():
    img = synthetic_bgr(seed=4)
    noisy = img.astype(np.float32) + np.random.default_rng(0).uniform(-0.6, 0.6, img.shape)
    noisy = np.clip(noisy, 0, 255).astype(np.float32)
    # the project's OpenCV defense rounds float input to uint8 first, as nlmeans_torch does
    ref = nlmeans_denoise(noisy)
    x = to_tensor(noisy)
    assert np.array_equal(to_numpy(nlmeans_torch(x)), ref)
    assert np.array_equal(to_numpy(nlmeans_torch(x, rows_per_strip=5)), ref)


def test_lab_level_planes_are_denoised_separately():
    img = synthetic_bgr(seed=5, noise=20.0)
    lab = cv2.cvtColor(img, cv2.COLOR_LBGR2Lab)
    ref_l = cv2.fastNlMeansDenoising(np.ascontiguousarray(lab[:, :, 0]), None, 6, 7, 21)
    ref_ab = cv2.fastNlMeansDenoising(np.ascontiguousarray(lab[:, :, 1:]), None, 14, 7, 21)
    out = to_numpy(nlmeans_lab8(to_tensor(lab), h=6, h_color=14))
    assert np.array_equal(out[:, :, 0], ref_l)
    assert np.array_equal(out[:, :, 1:], ref_ab)


# ------------------------------------------------------------------------------------------------
# batching, channel order, dtype and device
# ------------------------------------------------------------------------------------------------
def test_batch_equals_per_image():
    a, b = synthetic_bgr(32, 40, seed=0), natural_bgr(32, 40, seed=1)
    batch = torch.cat([to_tensor(a), to_tensor(b)])
    for quantize in (True, False):
        out = nlmeans_torch(batch, quantize=quantize)
        for i, img in enumerate((a, b)):
            single = nlmeans_torch(to_tensor(img), quantize=quantize)
            torch.testing.assert_close(out[i : i + 1], single, rtol=0, atol=1e-3)
            if quantize:
                assert torch.equal(out[i : i + 1], single)


def test_rgb_input_format():
    img = natural_bgr(seed=3)
    bgr = to_tensor(img)
    out_bgr = nlmeans_torch(bgr)
    out_rgb = nlmeans_torch(bgr.flip(1), input_format="RGB")
    assert torch.equal(out_rgb, out_bgr.flip(1))
    # and not the same as misreading the channel order
    assert not torch.equal(nlmeans_torch(bgr.flip(1)), out_rgb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
def test_dtype_shape_and_device_kept(dtype):
    img = synthetic_bgr(24, 32, seed=6)
    x = to_tensor(img)[0]  # unbatched (3, H, W)
    x = x.round().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    out = nlmeans_torch(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert np.array_equal(out.double().permute(1, 2, 0).numpy(), opencv(img))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img = natural_bgr(seed=4)
    x = to_tensor(img)
    out = nlmeans_torch(x.cuda())
    assert out.is_cuda and out.dtype == torch.float32
    assert np.array_equal(to_numpy(out.cpu()), opencv(img))
    smooth_gpu = nlmeans_torch(x.cuda(), quantize=False).cpu()
    torch.testing.assert_close(smooth_gpu, nlmeans_torch(x, quantize=False), rtol=0, atol=1e-2)
    xg = x.cuda().requires_grad_(True)
    nlmeans_torch(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_invalid_arguments():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError):
        nlmeans_torch(x, input_format="YUV")
    with pytest.raises(ValueError):
        nlmeans_torch(x, h=-1)
    with pytest.raises(ValueError):
        nlmeans_torch(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError):
        nlmeans_lab8(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize,search", [(True, 21), (False, 11)])
def test_gradient_exists_and_is_finite(quantize, search):
    img = synthetic_bgr(16, 20, seed=8, noise=15.0)
    x = to_tensor(img).requires_grad_(True)
    out = nlmeans_torch(x, quantize=quantize, search_window=search)
    # the autograd path computes the same forward values as the fast no-grad path
    with torch.no_grad():
        ref = nlmeans_torch(to_tensor(img), quantize=quantize, search_window=search)
    if quantize:
        assert torch.equal(out.detach(), ref)
        assert np.array_equal(to_numpy(out), opencv(img, search=search))
    else:
        torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-2)
    g = torch.Generator().manual_seed(0)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()
    assert (x.grad != 0).float().mean() > 0.5


def test_gradient_matches_finite_differences():
    """The smooth relaxation's autograd gradient equals central finite differences (float64,
    small windows, mid-range colours so no branch or clip is crossed)."""
    rng = np.random.default_rng(9)
    base = 90 + 60 * rng.random((1, 3, 1, 1))
    x = torch.from_numpy(base + rng.normal(0, 6, (1, 3, 9, 11))).requires_grad_(True)

    def f(inp):
        return nlmeans_torch(
            inp, h=12, h_color=12, template_window=3, search_window=5, quantize=False
        )

    u = torch.from_numpy(rng.normal(0, 1, (1, 3, 9, 11)))
    v = torch.from_numpy(rng.normal(0, 1, (1, 3, 9, 11)))
    (f(x) * u).sum().backward()
    analytic = float((x.grad * v).sum())
    eps = 1e-4
    with torch.no_grad():
        numeric = float(((f(x + eps * v) - f(x - eps * v)) * u).sum() / (2 * eps))
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)


def test_gradient_flows_through_patch_weights():
    """Not just the identity-like centre term: perturbing a pixel changes other pixels' output
    through the weights, and the gradient sees it."""
    img = synthetic_bgr(16, 20, seed=10, noise=8.0)
    x = to_tensor(img).requires_grad_(True)
    out = nlmeans_torch(x, quantize=False, search_window=11)
    out[0, :, 8, 10].sum().backward()
    g = x.grad[0].abs().sum(0)
    assert g[8, 10] > 0
    assert (g > 0).sum() > 20  # many neighbours contribute


def test_nlmeans_transform_torch_backend_equals_opencv():
    from upsnet_robust.defenses import build_defense

    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(120, 30, (40, 56, 3)), 0, 255).astype(np.uint8)
    expected = cv2.fastNlMeansDenoisingColored(img, None, 10, 10, 7, 21)
    out = build_defense("nlmeans", backend="torch").apply_image(img)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
