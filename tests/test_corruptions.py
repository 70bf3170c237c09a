# Copyright (c) UPSNetRobust authors.
"""upsnet_robust.corruptions: the 15 benchmark corruptions equal `imagecorruptions.corrupt` (the
reference), seeded per image and cell, in the model's channel order; mPC / rPC; set-up errors."""
import importlib.metadata

import numpy as np
import pytest
from imagecorruptions import corrupt as reference_corrupt
from imagecorruptions import get_corruption_names

from upsnet_robust.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    UnknownCorruptionError,
    corrupt_image,
    corrupt_rgb,
    corruption_seed,
    corruption_summary,
    validate_corruptions,
    validate_severities,
)

# Random corruptions draw from numpy's global RNG; these two take the seed as an argument.
SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")
# Corruptions with no randomness at all: the same output for every seed.
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                 "jpeg_compression")  # fmt: skip


def _image(seed=0, h=48, w=64):
    """A smooth colour image with edges (random noise alone would hide blur and weather)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 32 * 8], axis=-1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _reference(image, name, severity, seed):
    """What the reference package gives with numpy's global RNG (and its own seed) at ``seed``."""
    np.random.seed(seed)
    kwargs = {"seed": seed} if name in SEEDED_BY_ARGUMENT else {}
    return reference_corrupt(image, corruption_name=name, severity=severity, **kwargs)


def test_the_benchmark_is_the_reference_packages_fifteen_in_four_families():
    assert list(CORRUPTIONS) == get_corruption_names("common") and len(CORRUPTIONS) == 15
    assert sum(len(v) for v in FAMILIES.values()) == 15
    assert FAMILIES["noise"] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert set(FAMILIES) == {"noise", "blur", "weather", "digital"}


@pytest.mark.parametrize("name", get_corruption_names("common"))
def test_every_corruption_and_severity_equals_the_reference(name):
    image = _image()
    for severity in (1, 2, 3, 4, 5):
        seed = corruption_seed(0, "img_0", name, severity)
        ours = corrupt_rgb(image, name, severity, seed)
        expected = _reference(image, name, severity, seed)
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        np.testing.assert_array_equal(ours, expected, err_msg=f"{name} severity {severity}")
        assert not np.array_equal(ours, image), f"{name} {severity} left the image unchanged"


def test_same_image_and_seed_give_the_same_result_whatever_ran_before():
    image = _image()
    first = {n: corrupt_rgb(image, n, 3, corruption_seed(0, "a", n, 3)) for n in CORRUPTIONS}
    np.random.seed(12345)
    np.random.rand(7)  # a caller's own use of the global RNG must not matter
    for name in reversed(CORRUPTIONS):  # the other order
        again = corrupt_rgb(image, name, 3, corruption_seed(0, "a", name, 3))
        np.testing.assert_array_equal(again, first[name], err_msg=name)


def test_the_callers_global_rng_state_is_restored():
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    corrupt_rgb(_image(), "gaussian_noise", 2, 99)
    corrupt_rgb(_image(), "glass_blur", 1, 99)
    np.testing.assert_array_equal(np.random.rand(3), expected)


@pytest.mark.parametrize(
    "name", [n for n in get_corruption_names("common") if n not in DETERMINISTIC]
)
def test_random_corruptions_differ_between_images_and_cells(name):
    image = _image()
    a = corrupt_rgb(image, name, 3, corruption_seed(0, "frankfurt_000000_000294", name, 3))
    b = corrupt_rgb(image, name, 3, corruption_seed(0, "frankfurt_000000_000576", name, 3))
    c = corrupt_rgb(image, name, 3, corruption_seed(1, "frankfurt_000000_000294", name, 3))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_seed_depends_on_every_part_of_the_cell():
    base = corruption_seed(0, "x", "fog", 2)
    others = [corruption_seed(1, "x", "fog", 2), corruption_seed(0, "y", "fog", 2),
              corruption_seed(0, "x", "frost", 2), corruption_seed(0, "x", "fog", 3)]  # fmt: skip
    assert base not in others and len(set(others)) == 4
    assert 0 <= base < 2**32 and corruption_seed(0, "x", "fog", 2) == base


@pytest.mark.parametrize("name", ["frost", "snow", "fog", "gaussian_noise"])
def test_bgr_images_are_corrupted_in_rgb_and_returned_in_bgr(name):
    rgb = _image(3)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    seed = corruption_seed(0, "img", name, 4)
    expected_rgb = _reference(rgb, name, 4, seed)
    np.testing.assert_array_equal(corrupt_image(bgr, name, 4, seed, "BGR"), expected_rgb[..., ::-1])
    np.testing.assert_array_equal(corrupt_image(rgb, name, 4, seed, "RGB"), expected_rgb)


def test_colour_specific_corruptions_would_differ_in_the_wrong_channel_order():
    # Why the conversion matters: frost's overlay is a colour photograph (bluish ice).
    bgr = np.ascontiguousarray(_image(3)[..., ::-1])
    seed = corruption_seed(0, "img", "frost", 4)
    wrong = corrupt_rgb(bgr, "frost", 4, seed)  # BGR data treated as RGB
    assert not np.array_equal(corrupt_image(bgr, "frost", 4, seed, "BGR"), wrong)


def test_input_format_other_than_bgr_or_rgb_is_rejected():
    with pytest.raises(ValueError, match="INPUT.FORMAT 'L'"):
        corrupt_image(_image(), "fog", 1, 0, "L")


def test_mpc_rpc_and_family_means_by_hand():
    values = {("gaussian_noise", 1): 50.0, ("gaussian_noise", 2): 30.0,
              ("fog", 1): 60.0, ("fog", 2): 40.0, ("contrast", 1): 20.0}  # fmt: skip
    out = corruption_summary(values, clean=80.0)
    mpc = (50 + 30 + 60 + 40 + 20) / 5  # 40
    assert out["mPC"] == pytest.approx(mpc) and out["rPC"] == pytest.approx(mpc / 80)
    assert out["families"] == pytest.approx({"noise": 40.0, "weather": 50.0, "digital": 20.0})
    assert out["corruptions"] == pytest.approx({"gaussian_noise": 40, "fog": 50, "contrast": 20})
    assert out["severities"] == pytest.approx({1: (50 + 60 + 20) / 3, 2: 35.0})
    assert out["num_cells"] == 5 and "blur" not in out["families"]
    assert corruption_summary(values, clean=0.0)["rPC"] is None
    assert np.isnan(corruption_summary({("fog", 1): float("nan"), ("fog", 2): 1.0}, 2.0)["mPC"])


def test_unknown_names_fail_with_the_valid_names_closest_first():
    with pytest.raises(UnknownCorruptionError) as err:
        validate_corruptions(["gausian_noise"])
    message = str(err.value)
    assert "ROBUSTNESS.CORRUPTIONS" in message and "'gausian_noise'" in message
    listed = message.split("closest first): ")[1].split(", ")
    assert listed[0] == "gaussian_noise" and sorted(listed) == sorted(CORRUPTIONS)
    with pytest.raises(ValueError, match="more than once"):
        validate_corruptions(["fog", "fog"])
    with pytest.raises(ValueError, match="ROBUSTNESS.SEVERITIES: severity 6"):
        validate_severities([1, 6])
    assert validate_severities([5, 1]) == [5, 1]


def test_only_the_headless_opencv_is_installed():
    # imagecorruptions-imaug declares opencv-python; the install puts it in without it.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("opencv-python")
    assert importlib.metadata.version("opencv-python-headless")
    assert importlib.metadata.version("imagecorruptions-imaug") == "1.1.5"
