# Copyright (c) UPSNetRobust authors.
"""Surrogates of the filtering defenses: a soft median, the Gaussian blur in torch and the torch
NL-means port.

The soft median (median filter's default): per window, the values ``v_k`` weighted by
``softmax_k(-|v_k - m| / T)`` around the exact window median ``m`` (same window, placement, rank
and replicated border as the real filter), ``s(x) = sum_k w_k v_k``. As ``T -> 0`` this is the
median and its VJP the exact subgradient of the median filter (all gradient on the one pixel
holding the median); as ``T -> inf`` it is the box filter of the same window.
"""

import cv2
import torch
import torch.nn.functional as F

from .base import Surrogate, register_surrogate

__all__ = [
    "SOFT_MEDIAN_TEMPERATURE",
    "GaussianSurrogate",
    "NLMeansExactSurrogate",
    "SoftMedianSurrogate",
    "gaussian_blur_torch",
    "soft_median_filter",
]

# Temperature (grey levels, 0-255 scale) of the soft median.
SOFT_MEDIAN_TEMPERATURE = 4.0


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, window^2, H, W) values of each pixel's window, replicated border,
    offsets ``-window // 2 .. window - 1 - window // 2`` (scipy's placement, also for even
    windows; for odd ones the centred window of OpenCV)."""
    n, c, h, w = x.shape
    lo = window // 2
    hi = window - 1 - lo
    padded = F.pad(x.reshape(n * c, 1, h, w), (lo, hi, lo, hi), mode="replicate")
    cols = F.unfold(padded, window)  # (N*C, window^2, H*W)
    return cols.reshape(n, c, window * window, h, w)


def soft_median_filter(
    x: torch.Tensor, window: int = 3, temperature: float = SOFT_MEDIAN_TEMPERATURE
) -> torch.Tensor:
    """Soft median: ``sum_k softmax_k(-|v_k - m| / T) v_k`` over each window (module docstring).

    ``m`` is the exact median of the window (rank ``window^2 // 2``, the upper middle value for
    even windows, as the real filter), detached. ``temperature <= 0`` gives the exact median
    (with its one-hot subgradient).

    Args:
        x (Tensor): (N, C, H, W) images.
        window (int): window side (>= 1).
        temperature (float): T in grey levels.

    Returns:
        Tensor: (N, C, H, W).
    """
    window = int(window)
    if window < 1:
        raise ValueError(f"Median window must be >= 1, got {window}.")
    if window == 1:
        return x
    v = _windows(x, window)
    rank = window * window // 2 + 1  # 1-based k of kthvalue
    if temperature <= 0:
        return v.kthvalue(rank, dim=2).values
    m = v.detach().kthvalue(rank, dim=2, keepdim=True).values
    weights = torch.softmax(-(v - m).abs() / float(temperature), dim=2)
    return (weights * v).sum(dim=2)


@register_surrogate("soft_median")
class SoftMedianSurrogate(Surrogate):
    """:func:`soft_median_filter` with the defense's window, the median filter's default.

    A temperature of a few grey levels (default :data:`SOFT_MEDIAN_TEMPERATURE`) spreads the
    gradient over the pixels whose value is close to the median, i.e. those that can take over
    the median under a small perturbation, where the exact subgradient would leave most pixels
    with a zero gradient (and a zero sign step)."""

    def __init__(self, transform=None, window=None, temperature=SOFT_MEDIAN_TEMPERATURE):
        super().__init__(transform)
        self.window = int(self.defense_param(transform, "window", window))
        self.temperature = float(temperature)

    def __call__(self, x, input_format="BGR"):
        return soft_median_filter(x, self.window, self.temperature)

    def params(self):
        return {"window": self.window, "temperature": self.temperature}


def gaussian_blur_torch(x: torch.Tensor, sigma: float = 1.0, truncate: float = 4.0) -> torch.Tensor:
    """The Gaussian defense in torch: ``clip(x, 0, 255)`` blurred with OpenCV's kernel of size
    ``2 int(truncate sigma + 0.5) + 1``, separable, reflect-101 borders (``cv2.BORDER_REFLECT_101``
    = torch's "reflect" padding). Equals :func:`upsnet_robust.defenses.gaussian_blur` up to float
    rounding.

    Args:
        x (Tensor): (N, C, H, W) images, 0-255; H and W larger than the kernel radius.
        sigma (float): standard deviation in pixels.
        truncate (float): kernel radius in sigmas.

    Returns:
        Tensor: (N, C, H, W).
    """
    ksize = 2 * int(truncate * sigma + 0.5) + 1
    radius = ksize // 2
    n, c, h, w = x.shape
    if radius >= min(h, w):
        raise ValueError(f"Gaussian radius {radius} needs images larger than {h}x{w}.")
    k = cv2.getGaussianKernel(ksize, float(sigma), cv2.CV_64F).reshape(-1)
    k = torch.as_tensor(k, dtype=x.dtype, device=x.device)
    z = x.clamp(0.0, 255.0).reshape(n * c, 1, h, w)
    z = F.conv2d(F.pad(z, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    z = F.conv2d(F.pad(z, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return z.reshape(n, c, h, w)


@register_surrogate("gaussian")
class GaussianSurrogate(Surrogate):
    """:func:`gaussian_blur_torch` with the defense's sigma and truncate, the Gaussian blur's
    default: the blur itself in torch, so the exact gradient, not an approximation."""

    def __init__(self, transform=None, sigma=None, truncate=None):
        super().__init__(transform)
        self.sigma = float(self.defense_param(transform, "sigma", sigma))
        self.truncate = float(self.defense_param(transform, "truncate", truncate, default=4.0))

    def __call__(self, x, input_format="BGR"):
        return gaussian_blur_torch(x, self.sigma, self.truncate)

    def params(self):
        return {"sigma": self.sigma, "truncate": self.truncate}


@register_surrogate("nlmeans_exact")
class NLMeansExactSurrogate(Surrogate):
    """The differentiable torch port of the NL-means defense (opt-in:
    ``BPDA_SURROGATE nlmeans:nlmeans_exact``).

    :func:`~upsnet_robust.defenses.torch_nlmeans.nlmeans_torch` with the defense's h, hColor and
    windows: its forward equals OpenCV's output bit for bit and its backward is the filter's own
    gradient (the patch-similarity weights included), straight-through only over OpenCV's
    integer roundings. The tightest NL-means surrogate here, but each VJP costs a forward and a
    backward of the filter (seconds per step on a CPU at Cityscapes size), so identity stays the
    default."""

    def __init__(
        self, transform=None, h=None, h_color=None, template_window=None, search_window=None
    ):
        super().__init__(transform)
        self.h = float(self.defense_param(transform, "h", h))
        self.h_color = float(self.defense_param(transform, "h_color", h_color))
        self.template_window = int(
            self.defense_param(transform, "template_window", template_window)
        )
        self.search_window = int(self.defense_param(transform, "search_window", search_window))

    def __call__(self, x, input_format="BGR"):
        from ..torch_nlmeans import nlmeans_torch

        return nlmeans_torch(
            x, self.h, self.h_color, self.template_window, self.search_window,
            input_format=input_format,
        )

    def params(self):
        return {
            "h": self.h,
            "h_color": self.h_color,
            "template_window": self.template_window,
            "search_window": self.search_window,
        }
