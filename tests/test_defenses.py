# Copyright (c) UPSNetRobust authors.
"""The defense suite against its references (OpenCV, PIL, scipy, scikit-image, numpy), the
Transform contract (labels and coordinates untouched), the registry, configs and the tensor
adapter. Small images keep it fast."""

import io

import numpy as np
import cv2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

import detectron2.data.transforms as T
from detectron2.config import get_cfg

from upsnet_robust.defenses import (
    DEFENSE_REGISTRY,
    AdaptiveNLMeansTransform,
    BitDepthTransform,
    GaussianBlurTransform,
    JPEGTransform,
    MedianFilterTransform,
    NLMeansTransform,
    TVMTransform,
    adaptive_nlmeans_denoise,
    adaptive_nlmeans_h,
    adaptive_nlmeans_strength,
    add_defense_config,
    apply_defense_to_tensor,
    build_defense,
    build_defense_from_cfg,
    estimate_noise_sigma,
    gaussian_blur,
    jpeg_compress,
    median_blur,
    nlmeans_denoise,
    reduce_bit_depth,
    registered_defense_names,
    sample_tvm_mask,
    tv_energy,
    tv_reconstruct,
)

H, W = 48, 64
ALL_DEFENSES = ["nlmeans", "jpeg", "bitdepth", "median", "gaussian", "tvm", "adaptive_nlmeans"]


def natural_bgr(height=H, width=W, name="astronaut"):
    """A downscaled natural photograph (shipped with scikit-image) in BGR uint8."""
    import skimage.data

    rgb = getattr(skimage.data, name)()
    return np.ascontiguousarray(
        cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    )


def natural_crop(name="coffee", height=96, width=128):
    """A full-resolution crop (top-left) of a natural photograph, BGR uint8: natural noise and
    texture statistics, unlike a downscaled image."""
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[:height, :width, ::-1])


def smooth_bgr(height=H, width=W):
    """A clean piecewise-smooth synthetic image: gradients plus a flat disc, uint8 BGR."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([40 + 2 * xx, 60 + 2 * yy, 200 - xx - yy], axis=2)
    disc = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (height / 4) ** 2
    img[disc] = (30, 180, 90)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def img():
    return natural_bgr()


# ------------------------------------------------------------------------------------------------
# NL-means
# ------------------------------------------------------------------------------------------------
def test_nlmeans_defaults_equal_opencv_study_setting(img):
    out = build_defense("nlmeans").apply_image(img)
    ref = cv2.fastNlMeansDenoisingColored(img, None, 10, 10, 7, 21)
    assert out.dtype == np.uint8 and np.array_equal(out, ref)
    assert np.array_equal(nlmeans_denoise(img), ref)


def test_nlmeans_custom_parameters_equal_opencv(img):
    out = build_defense("nlmeans", h=4.0, h_color=2.0, template_window=3, search_window=11)
    ref = cv2.fastNlMeansDenoisingColored(img, None, 4.0, 2.0, 3, 11)
    assert np.array_equal(out.apply_image(img), ref)


def test_nlmeans_float_input_is_rounded_to_uint8_first(img):
    x = img.astype(np.float32) + np.float32(0.4)  # rounds back to img
    x[0, 0, 0] = 300.0  # clipped to 255
    out = NLMeansTransform(template_window=3, search_window=7).apply_image(x)
    u8 = img.copy()
    u8[0, 0, 0] = 255
    ref = cv2.fastNlMeansDenoisingColored(u8, None, 10, 10, 3, 7)
    assert out.dtype == np.float32 and np.array_equal(out, ref.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# JPEG
# ------------------------------------------------------------------------------------------------
def test_jpeg_opencv_backend_equals_imencode_imdecode(img):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
    ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    assert np.array_equal(build_defense("jpeg").apply_image(img), ref)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 30])
    assert np.array_equal(jpeg_compress(img, 30), cv2.imdecode(buf, cv2.IMREAD_COLOR))


def test_jpeg_pil_backend_equals_pillow_and_is_close_to_opencv(img):
    stream = io.BytesIO()
    Image.fromarray(img[:, :, ::-1]).save(stream, format="JPEG", quality=75)
    ref = np.asarray(Image.open(io.BytesIO(stream.getvalue())))[:, :, ::-1]
    out_pil = JPEGTransform(backend="pil").apply_image(img)
    assert np.array_equal(out_pil, ref)
    out_cv = JPEGTransform().apply_image(img)
    assert np.abs(out_pil.astype(int) - out_cv.astype(int)).mean() < 1.5
    # lower quality, larger error
    err = [np.abs(jpeg_compress(img, q).astype(int) - img).mean() for q in (10, 50, 95)]
    assert err[0] > err[1] > err[2]


def test_jpeg_float_input_keeps_dtype(img):
    out = jpeg_compress(img.astype(np.float64) - 0.3)
    assert out.dtype == np.float64
    assert np.array_equal(out, jpeg_compress(img).astype(np.float64))


# ------------------------------------------------------------------------------------------------
# Bit depth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bitdepth_matches_float64_formula(img, bits):
    levels = 2**bits - 1
    x = img.astype(np.float64) + np.random.default_rng(bits).uniform(-0.5, 0.5, img.shape)
    x = np.clip(x, 0, 255)
    ref = np.round(x / 255 * levels) / levels * 255
    np.testing.assert_allclose(reduce_bit_depth(x, bits), ref, atol=1e-9)
    ref_u8 = np.round(img.astype(np.float64) / 255 * levels) / levels * 255
    out_u8 = BitDepthTransform(bits).apply_image(img)
    assert out_u8.dtype == np.uint8 and np.array_equal(out_u8, np.round(ref_u8).astype(np.uint8))
    assert len(np.unique(out_u8)) <= 2**bits


def test_bitdepth_8_bits_is_identity_on_uint8(img):
    assert np.array_equal(reduce_bit_depth(img, 8), img)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_bitdepth_is_idempotent_and_bounded(bits, seed):
    x = np.random.default_rng(seed).uniform(-20, 275, (4, 5, 3)).astype(np.float32)
    once = reduce_bit_depth(x, bits)
    assert once.dtype == np.float32 and once.min() >= 0 and once.max() <= 255
    np.testing.assert_allclose(reduce_bit_depth(once, bits), once, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Median
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [3, 5, 7])
def test_median_odd_windows_equal_scipy_and_opencv(img, window):
    ref = ndimage.median_filter(img, size=(window, window, 1), mode="nearest")
    out = MedianFilterTransform(window).apply_image(img)
    assert np.array_equal(out, ref) and np.array_equal(out, cv2.medianBlur(img, window))
    x32 = img.astype(np.float32) + np.random.default_rng(0).random(img.shape, np.float32)
    x64 = x32.astype(np.float64)
    for x in (x32, x64):  # float32 3/5 go through OpenCV, the rest through scipy
        out = median_blur(x, window)
        assert out.dtype == x.dtype
        assert np.array_equal(
            out, ndimage.median_filter(x, size=(window, window, 1), mode="nearest")
        )


def test_median_even_window_is_xu_scipy_2x2(img):
    # Xu et al.'s squeezer: scipy.ndimage.median_filter(x, size=(1, 2, 2, 1)) (default mode)
    ref = ndimage.median_filter(img[None], size=(1, 2, 2, 1))[0]
    assert np.array_equal(median_blur(img, 2), ref)


def test_median_window_one_is_identity(img):
    assert np.array_equal(median_blur(img, 1), img)


# ------------------------------------------------------------------------------------------------
# Gaussian
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_matches_scipy(img, sigma):
    x = img.astype(np.float64)
    ref = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref, atol=1e-6)
    out = GaussianBlurTransform(sigma).apply_image(img)
    assert out.dtype == np.uint8 and np.abs(out.astype(float) - ref).max() <= 0.5 + 1e-3


# ------------------------------------------------------------------------------------------------
# TVM
# ------------------------------------------------------------------------------------------------
def test_tvm_decreases_objective_and_is_near_converged(img):
    x = img[:32, :48].astype(np.float32)
    mask = sample_tvm_mask(x.shape, 0.5, rng=0)
    out = tv_reconstruct(x, mask, 0.03, num_iters=50)
    ref = tv_reconstruct(x, mask, 0.03, num_iters=1500)
    e_out, e_ref, e_in = (tv_energy(z, x, mask, 0.03) for z in (out, ref, x))
    assert e_ref <= e_out < e_in
    assert e_out < 1.02 * e_ref
    assert np.abs(out - ref).mean() < 0.5


def test_tvm_without_dropping_matches_skimage_split_bregman(img):
    from skimage.restoration import denoise_tv_bregman

    x = img[:32, :48].astype(np.float64)
    ones = np.ones(x.shape[:2], bool)
    # Guo et al.'s code calls split Bregman with weight = 2 / lambda_TV (anisotropic TV)
    ref = (
        denoise_tv_bregman(
            x / 255, weight=2 / 0.03, isotropic=False, eps=1e-7, max_num_iter=1000, channel_axis=-1
        )
        * 255
    )
    out = tv_reconstruct(x, ones, 0.03, num_iters=600)
    inner = (slice(2, -2), slice(2, -2))  # skimage reflects at the border, we use Neumann
    assert np.abs(out - ref)[inner].mean() < 0.3
    assert tv_energy(out, x, ones) <= tv_energy(ref, x, ones) + 1e-6


def test_tvm_fills_dropped_pixels():
    clean = smooth_bgr().astype(np.float32)
    mask = sample_tvm_mask(clean.shape, 0.5, rng=1)
    observed = clean * mask[:, :, None]  # dropped pixels carry no information (black)
    out = tv_reconstruct(observed, mask, 0.03, num_iters=50)
    dropped = ~mask
    assert np.abs(out - clean)[dropped].mean() < 6.0  # vs ~120 if left black
    assert np.abs(out - clean)[mask].mean() < 3.0


def test_tvm_mask_is_deterministic_per_seed_and_image(img):
    t0, t0b, t1 = TVMTransform(seed=0), TVMTransform(seed=0), TVMTransform(seed=1)
    out = t0.apply_image(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out, t0b.apply_image(img))
    m0, m1 = t0.mask_for(img), t1.mask_for(img)
    assert m0.shape == img.shape[:2] and not np.array_equal(m0, m1)
    assert not np.array_equal(out, t1.apply_image(img))
    assert not np.array_equal(m0, t0.mask_for(natural_bgr(name="coffee")))
    assert abs(m0.mean() - 0.5) < 0.1
    # EOT: masks from the caller's generator, reproducible, and used when given
    eot = [t0.sample_mask(img.shape, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(eot[0], eot[1])
    assert np.array_equal(t0.apply_image(img, mask=eot[0]), tv_reconstruct(img, eot[0], 0.03, 50))


def test_tvm_keep_all_without_tv_is_identity(img):
    x = img.astype(np.float64)
    t = TVMTransform(keep_prob=1.0, tv_weight=0.0)
    np.testing.assert_allclose(t.apply_image(x), x, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Adaptive NL-means
# ------------------------------------------------------------------------------------------------
def test_noise_estimate_recovers_gaussian_sigma():
    rng = np.random.default_rng(0)
    flat = np.full((96, 128, 3), 128.0)
    for sigma in (2.0, 5.0, 10.0):
        est = estimate_noise_sigma(flat + rng.normal(0, sigma, flat.shape))
        assert abs(est - sigma) < 0.1 * sigma
    assert estimate_noise_sigma(np.full((8, 8, 3), 7, np.uint8)) < 1e-9
    assert estimate_noise_sigma(smooth_bgr()) < 0.5  # exact zeros are kept (see docstring)


def test_noise_estimate_matches_skimage(img):
    import pywt  # noqa: F401  pinned in requirements/lock.txt: skimage's estimate_sigma needs it
    from skimage.restoration import estimate_sigma

    x = img.astype(np.float64) + np.random.default_rng(0).normal(0, 6, img.shape)
    ref = estimate_sigma(x, channel_axis=-1, average_sigmas=True)
    # noise seeds 0-19: relative difference 2.9-4.7 % (mean 3.6 %); margin 10 %
    assert abs(estimate_noise_sigma(x) - ref) < 0.1 * ref


def test_adaptive_nlmeans_leaves_clean_images_unchanged():
    for clean in (smooth_bgr(), natural_crop("coffee"), natural_crop("astronaut")):
        assert adaptive_nlmeans_h(clean) < 1.0
        out = AdaptiveNLMeansTransform().apply_image(clean)
        assert np.array_equal(out, clean)
    x = smooth_bgr().astype(np.float32) + 0.25  # float eps-sized shift: untouched, not rounded
    assert np.array_equal(adaptive_nlmeans_denoise(x), x)


def test_adaptive_nlmeans_denoises_strong_noise():
    clean = natural_crop("coffee")
    noisy = np.clip(clean + np.random.default_rng(0).uniform(-16, 16, clean.shape), 0, 255)
    t = AdaptiveNLMeansTransform(template_window=5, search_window=11)
    h = t.strength(noisy)
    assert 7.0 < h <= 15.0  # near the study's fixed h = 10
    out = t.apply_image(noisy)
    assert out.dtype == np.float64
    assert psnr(out, clean) > psnr(noisy, clean) + 2.0
    assert np.array_equal(out, nlmeans_denoise(noisy, h, h, 5, 11))


def test_adaptive_strength_is_monotone_in_noise_level():
    clean = natural_crop("coffee").astype(np.float64)
    pattern = np.random.default_rng(0).uniform(-1, 1, clean.shape)
    eps = (0, 1, 2, 4, 8, 16, 32)
    sigmas = [estimate_noise_sigma(np.clip(clean + e * pattern, 0, 255)) for e in eps]
    assert all(a <= b for a, b in zip(sigmas, sigmas[1:]))
    hs = [adaptive_nlmeans_strength(s) for s in sigmas]
    assert all(a <= b for a, b in zip(hs, hs[1:])) and hs[0] < 1.0 < hs[-1]


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 100, allow_subnormal=False), st.floats(0, 100, allow_subnormal=False))
def test_adaptive_strength_rule(s1, s2):
    lo, hi = sorted((s1, s2))
    h_lo, h_hi = adaptive_nlmeans_strength(lo), adaptive_nlmeans_strength(hi)
    assert 0.0 <= h_lo <= h_hi <= 15.0
    assert h_hi == pytest.approx(min(max(1.25 * hi - 2.5, 0.0), 15.0))


# ------------------------------------------------------------------------------------------------
# Transform contract
# ------------------------------------------------------------------------------------------------
def test_all_defenses_are_registered():
    assert registered_defense_names() == sorted(ALL_DEFENSES)
    assert DEFENSE_REGISTRY.__doc__ and "DEFENSE" in repr(DEFENSE_REGISTRY)


@pytest.mark.parametrize("name", ALL_DEFENSES + ["none", "median+nlmeans"])
def test_defenses_leave_labels_and_geometry_untouched(img, name):
    t = build_defense(name)
    labels = np.random.default_rng(0).integers(0, 19, size=(H, W)).astype(np.uint8)
    labels[:3] = 255
    before = labels.copy()
    assert np.array_equal(t.apply_segmentation(labels), before)
    coords = np.array([[0.5, 1.5], [63.0, 47.0], [10.25, 20.75]])
    np.testing.assert_array_equal(t.apply_coords(coords.copy()), coords)
    boxes = np.array([[1.0, 2.0, 30.0, 40.0]])
    np.testing.assert_array_equal(t.apply_box(boxes.copy()), boxes)
    assert isinstance(t.inverse(), (T.NoOpTransform, T.TransformList))
    assert np.array_equal(t.inverse().apply_image(img), img)
    for x in (img, img.astype(np.float32)):
        out = t.apply_image(x)
        assert out.shape == x.shape and out.dtype == x.dtype


def test_defense_in_augmentation_list_keeps_sem_seg(img):
    sem = np.random.default_rng(1).integers(0, 19, size=(H, W)).astype(np.uint8)
    aug_input = T.AugInput(img.copy(), sem_seg=sem.copy())
    T.AugmentationList([build_defense("median")])(aug_input)
    assert np.array_equal(aug_input.sem_seg, sem)
    assert np.array_equal(aug_input.image, cv2.medianBlur(img, 3))


# ------------------------------------------------------------------------------------------------
# Registry, chaining and config
# ------------------------------------------------------------------------------------------------
def test_chain_applies_in_order(img):
    chain = build_defense("median+nlmeans")
    assert isinstance(chain, T.TransformList) and len(chain) == 2
    ref = cv2.fastNlMeansDenoisingColored(cv2.medianBlur(img, 3), None, 10, 10, 7, 21)
    assert np.array_equal(chain.apply_image(img), ref)
    chain = build_defense("Median + JPEG", median={"window": 5}, jpeg={"quality": 40})
    assert np.array_equal(chain.apply_image(img), jpeg_compress(cv2.medianBlur(img, 5), 40))


def test_none_is_identity(img):
    t = build_defense("none")
    assert isinstance(t, T.NoOpTransform) and np.array_equal(t.apply_image(img), img)


def test_registry_errors():
    with pytest.raises(KeyError) as e:
        build_defense("quilting")
    for name in ALL_DEFENSES + ["none"]:
        assert name in str(e.value)
    with pytest.raises(KeyError, match="nlmeans"):
        build_defense("median+nlmean")
    with pytest.raises(TypeError) as e:
        build_defense("nlmeans", strength=3)
    assert "strength" in str(e.value) and "h_color" in str(e.value)
    with pytest.raises(TypeError, match="window"):
        build_defense("median+nlmeans", window=5)
    with pytest.raises(TypeError):
        build_defense("none", h=1)
    with pytest.raises(ValueError):
        build_defense("median++nlmeans")


def _params(t):
    import inspect

    return {k: getattr(t, k) for k in inspect.signature(type(t)).parameters}


def test_cfg_nodes_reproduce_defaults():
    cfg = get_cfg()
    add_defense_config(cfg)
    add_defense_config(cfg)  # idempotent
    for name in ALL_DEFENSES:
        assert _params(build_defense_from_cfg(cfg, name)) == _params(build_defense(name)), name
    chain = build_defense_from_cfg(cfg, "none+median+tvm")
    assert [type(t) for t in chain.transforms] == [
        T.NoOpTransform,
        MedianFilterTransform,
        TVMTransform,
    ]


def test_cfg_values_are_used_and_checked():
    from upsnet_robust.config import add_robustness_config

    cfg = get_cfg()
    add_robustness_config(cfg)
    add_defense_config(cfg)
    cfg.merge_from_list(["DEFENSE.NLMEANS.H", 3.0, "DEFENSE.TVM.SEED", 5])
    assert build_defense_from_cfg(cfg, "nlmeans").h == 3.0
    assert build_defense_from_cfg(cfg, "tvm").seed == 5
    cfg.defrost()
    cfg.DEFENSE.MEDIAN.SIZE = 3
    with pytest.raises(TypeError, match="DEFENSE.MEDIAN"):
        build_defense_from_cfg(cfg, "median")


# ------------------------------------------------------------------------------------------------
# Tensor adapter
# ------------------------------------------------------------------------------------------------
def _zero_blue():
    """A channel-order sensitive transform: zeroes channel 0 of a BGR image (blue)."""

    def op(x):
        x = x.copy()
        x[:, :, 0] = 0
        return x

    return T.ColorTransform(op)


def test_tensor_adapter_bgr_and_rgb_order():
    g = torch.Generator().manual_seed(0)
    bgr = torch.rand(2, 3, 16, 24, generator=g) * 255
    out = apply_defense_to_tensor(_zero_blue(), bgr, "BGR")
    assert torch.all(out[:, 0] == 0) and torch.equal(out[:, 1:], bgr[:, 1:])
    rgb = bgr.flip(1)
    out_rgb = apply_defense_to_tensor(_zero_blue(), rgb, "RGB")
    assert torch.all(out_rgb[:, 2] == 0) and torch.equal(out_rgb[:, :2], rgb[:, :2])
    assert torch.equal(out_rgb, out.flip(1))


def test_tensor_adapter_matches_numpy_per_image(img):
    x = torch.from_numpy(np.stack([img, natural_bgr(name="coffee")])).permute(0, 3, 1, 2).float()
    t = build_defense("nlmeans", template_window=3, search_window=7)
    out = apply_defense_to_tensor(t, x)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    for i in range(2):
        ref = t.apply_image(x[i].permute(1, 2, 0).numpy())
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), ref)
    # RGB tensors: same result, in RGB
    out_rgb = apply_defense_to_tensor(t, x.flip(1), input_format="RGB")
    assert torch.equal(out_rgb, out.flip(1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float64])
def test_tensor_adapter_keeps_dtype_and_single_image(img, dtype):
    x = torch.from_numpy(img).permute(2, 0, 1).to(dtype)
    out = apply_defense_to_tensor("median", x)
    assert out.shape == x.shape and out.dtype == dtype
    np.testing.assert_array_equal(out.float().permute(1, 2, 0).numpy(), cv2.medianBlur(img, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_adapter_keeps_device(img):
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().cuda()
    out = apply_defense_to_tensor("bitdepth", x)
    assert out.device == x.device and out.dtype == x.dtype


def test_tensor_adapter_rejects_bad_inputs():
    with pytest.raises(ValueError):
        apply_defense_to_tensor("median", torch.zeros(1, 3, 4, 4), input_format="YUV-BT.601")
    with pytest.raises(ValueError):
        apply_defense_to_tensor("median", torch.zeros(1, 1, 4, 4))
