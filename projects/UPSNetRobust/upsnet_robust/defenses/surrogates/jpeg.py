# Copyright (c) UPSNetRobust authors.
"""A differentiable JPEG codec in torch, the default BPDA surrogate of the JPEG defense.

Written from the JPEG standard (ITU-T T.81 / JFIF): JFIF RGB -> YCbCr, replicate-padding to
whole 16x16 MCUs, 4:2:0 chroma subsampling (2x2 mean, as libjpeg's default encoder),
orthonormal 8x8 block DCT-II, quantisation with the Annex K tables scaled by the IJG quality
rule (``5000 / q`` below 50, ``200 - 2 q`` above), dequantisation, inverse DCT, chroma
upsampling by bilinear interpolation (libjpeg's "fancy" triangle filter is this 3/4-1/4
interpolation), YCbCr -> RGB, clip and rounding to 8 bits. Every rounding is straight-through,
so the Jacobian is that of the linear codec (colour transform, chroma subsampling / upsampling)
and of the clips: the attacker learns that chroma detail finer than 2x2 is discarded. The
forward is within about one grey level of OpenCV's codec on natural images (see the tests).
``jpeg_cubic`` replaces the straight-through rounding of the DCT coefficients by Shin & Song's
(2017) ``round(u) + (u - round(u))^3``, whose derivative ``3 (u - round(u))^2`` also weights the
coefficients by their distance to the quantisation lattice (zero gradient exactly on it).
"""

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import Surrogate, register_surrogate, ste_round, to_rgb

__all__ = ["JPEGCubicSurrogate", "JPEGSurrogate", "differentiable_jpeg", "jpeg_quant_tables"]

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
        uq = ste_round(u)
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
    rgb = ste_round(to_rgb(x, input_format).clamp(0.0, 255.0))  # the codec takes uint8
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
    out = ste_round(out.clamp(0.0, 255.0))
    return to_rgb(out, input_format)  # RGB -> input format (the flip is its own inverse)


@register_surrogate("jpeg")
class JPEGSurrogate(Surrogate):
    """:func:`differentiable_jpeg` at the defense's quality (straight-through rounding)."""

    rounding = "ste"

    def __init__(self, transform=None, quality=None):
        super().__init__(transform)
        self.quality = int(self.defense_param(transform, "quality", quality, default=75))

    def __call__(self, x, input_format="BGR"):
        return differentiable_jpeg(x, self.quality, input_format, self.rounding)

    def params(self):
        return {"quality": self.quality}


@register_surrogate("jpeg_cubic")
class JPEGCubicSurrogate(JPEGSurrogate):
    """:func:`differentiable_jpeg` with Shin & Song's cubic rounding of the DCT coefficients."""

    rounding = "cubic"
