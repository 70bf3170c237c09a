# Copyright (c) UPSNetRobust authors.
"""Differentiable surrogates of the defenses, for BPDA (Athalye et al., ICML 2018).

BPDA runs the REAL defense ``g`` forward and, in the backward pass, replaces its (missing or
useless) Jacobian by the vector-Jacobian product of a differentiable surrogate ``s`` with
``s(x) ~ g(x)``. A surrogate here is a torch function of (N, 3, H, W) float images on the 0-255
scale, in the model's ``INPUT.FORMAT``; :meth:`Surrogate.vjp` evaluates ``grad^T ds/dx`` at the
real input of the defense. The registered surrogates, and why each is the default of its
defense (:data:`DEFAULT_SURROGATES`):

``identity``  (NL-means, adaptive NL-means, TVM)
    ``s(x) = x``, so the VJP passes the gradient through unchanged. Athalye et al. broke TVM and
    quilting this way (with EOT for TVM's randomness); NL-means (OpenCV, uint8, no autograd) and
    adaptive NL-means are denoisers with ``g(x) ~ x`` on clean images, the case the paper names.
    Adaptive NL-means is exactly the identity (no rounding either) on images whose estimated
    noise is below its threshold. A differentiable TV solver (unrolled primal-dual) is a possible
    tighter TVM surrogate; it is not implemented.
``straight_through``  (bit-depth reduction)
    The quantiser ``round(x (2^b - 1) / 255) 255 / (2^b - 1)`` on ``clip(x, 0, 255)`` with the
    straight-through estimator ``d round(u) / du := 1`` (Bengio et al., 2013): the forward equals
    the real defense, the VJP is the gradient of the clip, i.e. the incoming gradient where
    ``0 <= x <= 255`` and 0 elsewhere (attack iterates always lie inside, so: identity).
``jpeg``  (JPEG)
    A differentiable JPEG codec in torch, written from the JPEG standard (ITU-T T.81 / JFIF):
    JFIF RGB -> YCbCr, replicate-padding to whole 16x16 MCUs, 4:2:0 chroma subsampling (2x2
    mean, as libjpeg's default encoder), orthonormal 8x8 block DCT-II, quantisation with the
    Annex K tables scaled by the IJG quality rule (``5000 / q`` below 50, ``200 - 2 q`` above),
    dequantisation, inverse DCT, chroma upsampling by bilinear interpolation (libjpeg's "fancy"
    triangle filter is this 3/4-1/4 interpolation), YCbCr -> RGB, clip and rounding to 8 bits.
    Every rounding is straight-through, so the Jacobian is that of the linear codec (colour
    transform, chroma subsampling / upsampling) and of the clips: the attacker learns that
    chroma detail finer than 2x2 is discarded. The forward is within about one grey level of
    OpenCV's codec on natural images (see the tests). ``jpeg_cubic`` replaces the
    straight-through rounding of the DCT coefficients by Shin & Song's (2017) ``round(u) +
    (u - round(u))^3``, whose derivative ``3 (u - round(u))^2`` also weights the coefficients
    by their distance to the quantisation lattice (zero gradient exactly on it).
``soft_median``  (median filter)
    Per window, the values ``v_k`` weighted by ``softmax_k(-|v_k - m| / T)`` around the exact
    window median ``m`` (same window, placement, rank and replicated border as the real filter),
    ``s(x) = sum_k w_k v_k``. As ``T -> 0`` this is the median and its VJP the exact subgradient
    of the median filter (all gradient on the one pixel holding the median); as ``T -> inf`` it
    is the box filter of the same window. A temperature of a few grey levels (default
    :data:`SOFT_MEDIAN_TEMPERATURE`) spreads the gradient over the pixels whose value is close
    to the median, i.e. those that can take over the median under a small perturbation, where
    the exact subgradient would leave most pixels with a zero gradient (and a zero sign step).
``nlmeans_exact``  (opt-in for NL-means: ``BPDA_SURROGATE nlmeans:nlmeans_exact``)
    :func:`.torch_nlmeans.nlmeans_torch` with the defense's h, hColor and windows: its forward
    equals OpenCV's output bit for bit and its backward is the filter's own gradient (the
    patch-similarity weights included), straight-through only over OpenCV's integer roundings.
    The tightest NL-means surrogate here, but each VJP costs a forward and a backward of the
    filter (seconds per step on a CPU at Cityscapes size), so identity stays the default.
``gaussian``  (Gaussian blur)
    The blur itself, re-implemented in torch with OpenCV's kernel
    (``cv2.getGaussianKernel(2 int(truncate sigma + 0.5) + 1, sigma)``), separable, with
    reflect-101 borders and the same input clip: the exact gradient, not an approximation.

Chains ("median+nlmeans") get one surrogate per stage; :func:`resolve_surrogates` parses the
choices ("auto", one name for every stage, or ``"stage:name,stage:name"``).
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import cv2
import torch
import torch.nn.functional as F
from fvcore.transforms.transform import NoOpTransform, Transform, TransformList

from detectron2.utils.registry import Registry

__all__ = [
    "SURROGATE_REGISTRY",
    "DEFAULT_SURROGATES",
    "SOFT_MEDIAN_TEMPERATURE",
    "Surrogate",
    "IdentitySurrogate",
    "StraightThroughSurrogate",
    "JPEGSurrogate",
    "SoftMedianSurrogate",
    "GaussianSurrogate",
    "build_surrogate",
    "default_surrogate",
    "defense_stages",
    "differentiable_jpeg",
    "gaussian_blur_torch",
    "resolve_surrogates",
    "soft_median_filter",
    "surrogate_names",
]

logger = logging.getLogger(__name__)

SURROGATE_REGISTRY = Registry("BPDA_SURROGATE")
SURROGATE_REGISTRY.__doc__ = """
Differentiable BPDA surrogates. A registered class is built as ``cls(transform, **params)`` from
one (non-chained) defense transform and is a :class:`Surrogate`.
"""

# Default surrogate of each registered defense ("auto"); unknown defenses fall back to identity.
DEFAULT_SURROGATES = {
    "nlmeans": "identity",
    "adaptive_nlmeans": "identity",
    "tvm": "identity",
    "bitdepth": "straight_through",
    "jpeg": "jpeg",
    "median": "soft_median",
    "gaussian": "gaussian",
}

# Temperature (grey levels, 0-255 scale) of the soft median.
SOFT_MEDIAN_TEMPERATURE = 4.0

AUTO = "auto"


def _register(name: str):
    def deco(cls):
        cls.name = name
        SURROGATE_REGISTRY._do_register(name, cls)
        return cls

    return deco


def surrogate_names() -> List[str]:
    """Sorted names in :data:`SURROGATE_REGISTRY`."""
    return sorted(name for name, _ in SURROGATE_REGISTRY)


def _to_rgb(x: torch.Tensor, input_format: str) -> torch.Tensor:
    if input_format not in ("BGR", "RGB"):
        raise ValueError(f"Surrogates support INPUT.FORMAT 'BGR' or 'RGB', got '{input_format}'.")
    return x.flip(1) if input_format == "BGR" else x


def _ste_round(u: torch.Tensor) -> torch.Tensor:
    """round(u) forward (half to even, like ``np.rint``), identity backward."""
    return u + (torch.round(u) - u).detach()


class Surrogate:
    """A differentiable stand-in ``s`` for one defense ``g``, used only for its VJP.

    Subclasses implement :meth:`__call__`; :meth:`vjp` differentiates it at the given point.

    Attributes:
        name (str): registered name.
    """

    name = "surrogate"

    def __init__(self, transform: Optional[Transform] = None):
        self.defense = getattr(transform, "defense_name", None) or type(transform).__name__

    def __call__(self, x: torch.Tensor, input_format: str = "BGR") -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, 3, H, W) float images, 0-255, in ``input_format``.
            input_format (str): "BGR" or "RGB".

        Returns:
            Tensor: the surrogate's output, same shape, differentiable w.r.t. ``x``.
        """
        raise NotImplementedError

    def vjp(self, x: torch.Tensor, grad: torch.Tensor, input_format: str = "BGR") -> torch.Tensor:
        """``grad^T (d s / d x)`` evaluated at ``x`` (the real defense's input).

        Args:
            x (Tensor): (N, 3, H, W) point of evaluation.
            grad (Tensor): gradient w.r.t. the defense's output, same shape.
            input_format (str): channel order.

        Returns:
            Tensor: gradient w.r.t. ``x``.
        """
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            y = self(xs, input_format)
            (g,) = torch.autograd.grad(y, xs, grad, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    def params(self) -> Dict:
        """Parameters that change the VJP (for reports and cache keys)."""
        return {}

    def describe(self) -> str:
        """E.g. ``"soft_median(temperature=4)"``."""
        p = self.params()
        args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.defense}]: {self.describe()}"


@_register("identity")
class IdentitySurrogate(Surrogate):
    """``s(x) = x``: the VJP is the incoming gradient (BPDA with the identity)."""

    def __call__(self, x, input_format="BGR"):
        return x

    def vjp(self, x, grad, input_format="BGR"):
        return grad


def _param(transform, name: str, default, surrogate: str):
    value = getattr(transform, name, None)
    if value is None:
        if default is None:
            raise ValueError(
                f"Surrogate '{surrogate}' needs the defense parameter '{name}', which "
                f"{type(transform).__name__} does not have; pick another surrogate (e.g. identity)."
            )
        return default
    return value


@_register("straight_through")
class StraightThroughSurrogate(Surrogate):
    """Bit-depth quantiser with straight-through rounding (see the module docstring)."""

    def __init__(self, transform=None, bits=None):
        super().__init__(transform)
        self.bits = int(bits if bits is not None else _param(transform, "bits", None, self.name))
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in [1, 8], got {self.bits}.")

    def __call__(self, x, input_format="BGR"):
        levels = float(2**self.bits - 1)
        xc = x.clamp(0.0, 255.0)
        q = torch.round(xc * (levels / 255.0)) * (255.0 / levels)
        return xc + (q - xc).detach()  # forward q, gradient exactly that of the clip

    def params(self):
        return {"bits": self.bits}


# ------------------------------------------------------------------------------------------------
# JPEG
# ------------------------------------------------------------------------------------------------
# ITU-T T.81 Annex K.1: example quantisation tables (luminance, chrominance), row-major.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


def jpeg_quant_tables(quality: int) -> Tuple[np.ndarray, np.ndarray]:
    """Annex K tables scaled by the IJG quality rule, clipped to [1, 255] (baseline JPEG).

    Args:
        quality (int): 1-100.

    Returns:
        tuple[ndarray, ndarray]: (8, 8) luminance and chrominance tables (float64).
    """
    q = min(max(int(quality), 1), 100)
    scale = 5000 / q if q < 50 else 200 - 2 * q
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        t = np.floor((np.asarray(base, np.float64) * scale + 50) / 100)
        tables.append(np.clip(t, 1, 255))
    return tables[0], tables[1]


def _dct_matrix(dtype, device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D (rows: frequencies), so 2-D DCT = D B D^T."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    d[0] /= math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def _blockwise_quantise(plane: torch.Tensor, table: torch.Tensor, rounding: str) -> torch.Tensor:
    """DCT, quantise, dequantise and inverse DCT of (N, 1, H, W) with H, W multiples of 8."""
    n, _, h, w = plane.shape
    d = _dct_matrix(plane.dtype, plane.device)
    blocks = plane.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # (N, hb, wb, 8, 8)
    coef = d @ blocks @ d.T
    u = coef / table
    if rounding == "cubic":
        r = torch.round(u).detach()
        uq = r + (u - r) ** 3
    else:
        uq = _ste_round(u)
    rec = d.T @ (uq * table) @ d
    return rec.permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)


def differentiable_jpeg(
    x: torch.Tensor, quality: int = 75, input_format: str = "BGR", rounding: str = "ste"
) -> torch.Tensor:
    """A differentiable JPEG encode + decode (baseline, 4:2:0), see the module docstring.

    Args:
        x (Tensor): (N, 3, H, W) images, 0-255, in ``input_format``.
        quality (int): IJG quality 1-100.
        input_format (str): "BGR" or "RGB".
        rounding (str): "ste" (straight-through) or "cubic" (Shin & Song) for the quantised
            DCT coefficients; the pixel roundings are always straight-through.

    Returns:
        Tensor: decoded images, same shape, format and dtype.
    """
    if rounding not in ("ste", "cubic"):
        raise ValueError(f"rounding must be 'ste' or 'cubic', got {rounding!r}")
    n, c, h, w = x.shape
    rgb = _ste_round(_to_rgb(x, input_format).clamp(0.0, 255.0))  # the codec takes uint8
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16
    ycc = F.pad(torch.cat([y, cb, cr], 1), (0, wp - w, 0, hp - h), mode="replicate")
    luma_t, chroma_t = (
        torch.as_tensor(t, dtype=x.dtype, device=x.device) for t in jpeg_quant_tables(quality)
    )
    y = _blockwise_quantise(ycc[:, :1] - 128.0, luma_t, rounding) + 128.0
    chroma = F.avg_pool2d(ycc[:, 1:], 2) - 128.0
    chroma = torch.cat(
        [_blockwise_quantise(chroma[:, i : i + 1], chroma_t, rounding) for i in range(2)], 1
    )
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False) + 128.0
    y, cb, cr = y[..., :h, :w], chroma[:, :1, :h, :w] - 128.0, chroma[:, 1:, :h, :w] - 128.0
    out = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    out = _ste_round(out.clamp(0.0, 255.0))
    return _to_rgb(out, input_format)  # RGB -> input format (the flip is its own inverse)


@_register("jpeg")
class JPEGSurrogate(Surrogate):
    """:func:`differentiable_jpeg` at the defense's quality (straight-through rounding)."""

    rounding = "ste"

    def __init__(self, transform=None, quality=None):
        super().__init__(transform)
        self.quality = int(
            quality if quality is not None else _param(transform, "quality", 75, self.name)
        )

    def __call__(self, x, input_format="BGR"):
        return differentiable_jpeg(x, self.quality, input_format, self.rounding)

    def params(self):
        return {"quality": self.quality}


@_register("jpeg_cubic")
class JPEGCubicSurrogate(JPEGSurrogate):
    """:func:`differentiable_jpeg` with Shin & Song's cubic rounding of the DCT coefficients."""

    rounding = "cubic"


# ------------------------------------------------------------------------------------------------
# median
# ------------------------------------------------------------------------------------------------
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


@_register("soft_median")
class SoftMedianSurrogate(Surrogate):
    """:func:`soft_median_filter` with the defense's window."""

    def __init__(self, transform=None, window=None, temperature=SOFT_MEDIAN_TEMPERATURE):
        super().__init__(transform)
        self.window = int(
            window if window is not None else _param(transform, "window", None, self.name)
        )
        self.temperature = float(temperature)

    def __call__(self, x, input_format="BGR"):
        return soft_median_filter(x, self.window, self.temperature)

    def params(self):
        return {"window": self.window, "temperature": self.temperature}


# ------------------------------------------------------------------------------------------------
# Gaussian
# ------------------------------------------------------------------------------------------------
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


@_register("gaussian")
class GaussianSurrogate(Surrogate):
    """:func:`gaussian_blur_torch` with the defense's sigma and truncate: the exact gradient."""

    def __init__(self, transform=None, sigma=None, truncate=None):
        super().__init__(transform)
        self.sigma = float(
            sigma if sigma is not None else _param(transform, "sigma", None, self.name)
        )
        self.truncate = float(
            truncate if truncate is not None else _param(transform, "truncate", 4.0, self.name)
        )

    def __call__(self, x, input_format="BGR"):
        return gaussian_blur_torch(x, self.sigma, self.truncate)

    def params(self):
        return {"sigma": self.sigma, "truncate": self.truncate}


@_register("nlmeans_exact")
class NLMeansExactSurrogate(Surrogate):
    """The differentiable torch port of the NL-means defense (exact forward, see module doc)."""

    def __init__(self, transform=None, h=None, h_color=None, template_window=None, search_window=None):
        super().__init__(transform)
        self.h = float(h if h is not None else _param(transform, "h", None, self.name))
        self.h_color = float(
            h_color if h_color is not None else _param(transform, "h_color", None, self.name)
        )
        self.template_window = int(
            template_window
            if template_window is not None
            else _param(transform, "template_window", None, self.name)
        )
        self.search_window = int(
            search_window
            if search_window is not None
            else _param(transform, "search_window", None, self.name)
        )

    def __call__(self, x, input_format="BGR"):
        from .torch_nlmeans import nlmeans_torch

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


# ------------------------------------------------------------------------------------------------
# building and resolving
# ------------------------------------------------------------------------------------------------
def defense_stages(transform: Transform) -> List[Transform]:
    """The stages of a (possibly chained) defense, in application order, without no-ops."""
    if transform is None:
        return []
    stages = transform.transforms if isinstance(transform, TransformList) else [transform]
    return [t for t in stages if not isinstance(t, NoOpTransform)]


def default_surrogate(transform: Transform) -> str:
    """The default surrogate name of one defense stage (:data:`DEFAULT_SURROGATES`)."""
    name = getattr(transform, "defense_name", None)
    if name not in DEFAULT_SURROGATES:
        logger.warning(
            "No default BPDA surrogate for defense %r (%s); using identity.",
            name,
            type(transform).__name__,
        )
        return "identity"
    return DEFAULT_SURROGATES[name]


def build_surrogate(name: str, transform: Optional[Transform] = None, **params) -> Surrogate:
    """Build surrogate ``name`` ("auto": the default of ``transform``) for one defense stage.

    Raises:
        KeyError: unknown surrogate name (the message lists the registered ones).
        ValueError: the surrogate needs a parameter the defense does not have.
    """
    key = str(name).strip().lower()
    if key == AUTO:
        key = default_surrogate(transform)
    if key not in SURROGATE_REGISTRY:
        raise KeyError(
            f"Unknown BPDA surrogate {name!r}; registered: {', '.join(surrogate_names())} "
            f"(or '{AUTO}' for each defense's default)."
        )
    return SURROGATE_REGISTRY.get(key)(transform, **params)


SurrogateSpec = Union[str, Surrogate, Sequence, Dict[str, Union[str, Surrogate]]]


def _parse_spec(spec: str) -> Union[str, Dict[str, str]]:
    """ "auto" / "name" stay strings; "median:soft_median,nlmeans:identity" becomes a dict."""
    spec = str(spec).strip()
    if ":" not in spec:
        return spec
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if ":" not in item:
            raise ValueError(
                f"Bad surrogate spec {spec!r}: use 'auto', one surrogate name, or "
                "'defense:surrogate,defense:surrogate'."
            )
        stage, name = (s.strip().lower() for s in item.split(":", 1))
        out[stage] = name
    return out


def resolve_surrogates(
    transform: Transform, surrogate: SurrogateSpec = AUTO
) -> List[Tuple[Transform, Surrogate]]:
    """Pair each stage of a (possibly chained) defense with its surrogate.

    Args:
        transform (Transform): a defense (single, chain ``TransformList`` or no-op).
        surrogate: "auto" (each stage's default); one registered name for every stage; a spec
            string "defense:surrogate,..." or a dict {defense name: surrogate} (stages not
            named get their default; named defenses that are not stages are ignored, unknown
            defense names raise); a list with one entry per stage; or a :class:`Surrogate`
            (single-stage defenses).

    Returns:
        list[tuple[Transform, Surrogate]]: in application order (empty for a no-op).
    """
    stages = defense_stages(transform)
    if isinstance(surrogate, str):
        surrogate = _parse_spec(surrogate)
    if isinstance(surrogate, Surrogate):
        if len(stages) != 1:
            raise ValueError(
                f"A Surrogate instance fits a single-stage defense, not {len(stages)} stages."
            )
        return [(stages[0], surrogate)]
    if isinstance(surrogate, dict):
        # Keys must be registered defenses (typos fail); ones absent from this chain are ignored,
        # so one spec serves every defense of a sweep.
        from .registry import registered_defense_names

        unknown = sorted(set(surrogate) - set(registered_defense_names()))
        if unknown:
            raise ValueError(
                f"Surrogates given for {unknown}, which are not registered defenses "
                f"({', '.join(registered_defense_names())})."
            )
        choices = [surrogate.get(getattr(t, "defense_name", None), AUTO) for t in stages]
    elif isinstance(surrogate, (list, tuple)):
        if len(surrogate) != len(stages):
            raise ValueError(f"{len(surrogate)} surrogates for {len(stages)} defense stages.")
        choices = list(surrogate)
    else:
        choices = [surrogate] * len(stages)
    return [
        (t, s if isinstance(s, Surrogate) else build_surrogate(s, t))
        for t, s in zip(stages, choices)
    ]
