# Copyright (c) UPSNetRobust authors.
"""OpenCV's 8-bit Lab colour conversions in torch, bit-exact and differentiable (used by the
torch NL-means, :mod:`.torch_nlmeans`).

* :func:`bgr_to_lab8` is ``cvtColor(src, COLOR_LBGR2Lab)``: *linear* BGR (no sRGB gamma) to
  OpenCV's 8-bit Lab (L scaled to [0, 255], a and b offset by 128), with OpenCV's fixed-point
  arithmetic: 12-bit XYZ coefficients, a 3072-entry cube-root table at 15-bit precision and
  ``L = 296 * f(Y) - 40.8`` (OpenCV's integer ``Lscale`` is 296, not 295.8), rounded to uint8.
* :func:`lab8_to_bgr` is ``cvtColor(dst_lab, COLOR_Lab2LBGR)``: OpenCV's bit-exact integer Lab
  -> linear BGR (14-bit tables, 255/4096 truncating scale).

With ``quantize=True`` the forward value is OpenCV's integer result (the tables are checked
against ``cv2.cvtColor`` on all 2^24 colours in both directions) and the backward pass is the
gradient of the smooth real-valued Lab formulas (straight-through estimators, :func:`ste`); with
``quantize=False`` the smooth formulas are also the forward pass.
"""

import numpy as np
import torch

__all__ = ["bgr_to_lab8", "lab8_to_bgr", "ste", "ste_round_uint8"]

# ------------------------------------------------------------------------------------------------
# OpenCV colour constants (sRGB/D65 primaries, used without gamma by COLOR_LBGR2Lab)
# ------------------------------------------------------------------------------------------------
_RGB2XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_XYZ2RGB = np.array(
    [
        [3.240479, -1.53715, -0.498535],
        [-0.969256, 1.875991, 0.041556],
        [0.055648, -0.204043, 1.057311],
    ]
)
_WHITE_D65 = np.array([0.950456, 1.0, 1.088754])
# Lab nonlinearity: f(t) = t^(1/3) above (6/29)^3, else t * 841/108 + 16/116
_LTHRESH = 216.0 / 24389.0
_LSCALE = 841.0 / 108.0
_LBIAS = 16.0 / 116.0
# 8-bit Lab, forward (RGB2Lab_b): 12-bit coefficients, 15-bit cube-root table, Lscale 296
_LAB_SHIFT = 12
_LAB_SHIFT2 = 15
_GAMMA_SHIFT = 3
_CBRT_TAB_SIZE = 256 * 3 // 2 * (1 << _GAMMA_SHIFT)
_L_SCALE_INT = (116 * 255 + 50) // 100  # 296
_L_SHIFT_INT = -((16 * 255 * (1 << _LAB_SHIFT2) + 50) // 100)  # -1336934
# Two cube-root table entries where OpenCV's softfloat rounding of an almost exact .5 differs from
# float64 rounding (found by comparing with cv2.cvtColor on all 2^24 colours; OpenCV 4.11).
_CBRT_TAB_FIXUPS = {49: 9454, 628: 22126}
# 8-bit Lab, inverse (Lab2RGBinteger): 14-bit base, a/b -> X/Z table
_INV_BASE = 1 << 14
_MIN_AB = -8145
_INV_SHIFT = _LAB_SHIFT + (14 - 12)  # lab_shift + (base_shift - inv_gamma_shift)

_TABLE_CACHE = {}


def _c_div(a, b):
    """C integer division (truncation toward zero) of an int64 array by a positive int."""
    return np.sign(a) * (np.abs(a) // b)


def _lab_tables():
    """The integer tables of OpenCV's 8-bit Lab conversions (numpy int64, built once)."""
    if "np" in _TABLE_CACHE:
        return _TABLE_CACHE["np"]
    f32 = np.float32
    # forward: XYZ coefficients (rows X, Y, Z; columns R, G, B), scaled by 2^12 / white point
    fwd = np.rint((1 << _LAB_SHIFT) * _RGB2XYZ / _WHITE_D65[:, None]).astype(np.int64)
    x = np.arange(_CBRT_TAB_SIZE) / (255.0 * (1 << _GAMMA_SHIFT))
    cbrt = np.where(x < _LTHRESH, x * _LSCALE + _LBIAS, np.cbrt(x))
    cbrt = np.rint((1 << _LAB_SHIFT2) * cbrt).astype(np.int64)
    for i, v in _CBRT_TAB_FIXUPS.items():
        cbrt[i] = v
    # inverse: L -> (y, f(y)) at 14 bits, computed in float32 like OpenCV's softfloat
    y_tab = np.zeros(256, np.int64)
    fy_tab = np.zeros(256, np.int64)
    for i in range(256):
        if i <= 20:
            y_tab[i] = np.rint(f32(i * _INV_BASE * 20 * 9) / f32(17 * 29 * 29 * 29))
            fy_tab[i] = np.rint(
                f32(_INV_BASE) * (f32(16) / f32(116) + f32(i * 5) / f32(3 * 17 * 29))
            )
        else:
            fy = f32(i * 100 * _INV_BASE) / f32(255 * 116) + f32(16 * _INV_BASE) / f32(116)
            fy_tab[i] = np.rint(fy)
            y_tab[i] = np.rint(f32(fy * fy * fy) / f32(_INV_BASE * _INV_BASE))
    # f^-1 for X and Z, indexed by f * 2^14 - MIN_AB
    i = np.arange(_MIN_AB, _INV_BASE * 9 // 4 + _MIN_AB, dtype=np.int64)
    lin = _c_div(i * 108, 841) - (_INV_BASE * 16 // 116 * 108 // 841)
    cub = _c_div(_c_div(i * i, _INV_BASE) * i, _INV_BASE)
    ab_to_xz = np.where(i <= 3390, lin, cub)
    # inverse XYZ -> RGB coefficients (rows R, G, B; columns X, Y, Z) times the white point
    inv = np.rint((1 << _LAB_SHIFT) * _XYZ2RGB * _WHITE_D65[None, :]).astype(np.int64)
    tabs = dict(fwd=fwd, cbrt=cbrt, y=y_tab, fy=fy_tab, ab_to_xz=ab_to_xz, inv=inv)
    _TABLE_CACHE["np"] = tabs
    return tabs


def _lab_tables_on(device):
    key = ("torch", str(device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = {k: torch.as_tensor(v, device=device) for k, v in _lab_tables().items()}
    return _TABLE_CACHE[key]


# ------------------------------------------------------------------------------------------------
# straight-through helpers
# ------------------------------------------------------------------------------------------------
def ste(smooth, exact):
    """``exact`` in the forward pass, the gradient of ``smooth`` in the backward pass."""
    if not smooth.requires_grad:
        return exact.to(smooth.dtype)
    return smooth + (exact.to(smooth.dtype) - smooth).detach()


def ste_round_uint8(x):
    """Round half to even (np.rint, like the project's uint8 conversion) and clip to [0, 255]."""
    return ste(x, torch.round(x.detach()).clamp_(0, 255))


def _channels_rgb(x, input_format):
    """(R, G, B) planes of an (N, 3, H, W) tensor in ``input_format``."""
    if input_format == "BGR":
        return x[:, 2], x[:, 1], x[:, 0]
    return x[:, 0], x[:, 1], x[:, 2]


# ------------------------------------------------------------------------------------------------
# colour conversion
# ------------------------------------------------------------------------------------------------
def _lab_f(t):
    """The Lab nonlinearity f(t), smooth and safe for autograd."""
    cube = torch.clamp(t, min=_LTHRESH).pow(1.0 / 3.0)
    return torch.where(t > _LTHRESH, cube, t * _LSCALE + _LBIAS)


def _bgr_to_lab8_smooth(images, input_format):
    r, g, b = _channels_rgb(images, input_format)
    m = _RGB2XYZ / _WHITE_D65[:, None] / 255.0
    xyz = [m[i, 0] * r + m[i, 1] * g + m[i, 2] * b for i in range(3)]
    fx, fy, fz = (_lab_f(t) for t in xyz)
    L = _L_SCALE_INT * fy + _L_SHIFT_INT / float(1 << _LAB_SHIFT2)
    a = 500.0 * (fx - fy) + 128.0
    bb = 200.0 * (fy - fz) + 128.0
    return torch.stack([L, a, bb], 1).clamp(0, 255)


def _bgr_to_lab8_exact(images_u8, input_format):
    """OpenCV's integer RGB2Lab_b on integer-valued float input (no autograd)."""
    tabs = _lab_tables_on(images_u8.device)
    r, g, b = (c.to(torch.int64) << _GAMMA_SHIFT for c in _channels_rgb(images_u8, input_format))
    c = tabs["fwd"]
    half = 1 << (_LAB_SHIFT - 1)
    fxyz = [
        tabs["cbrt"][(r * c[i, 0] + g * c[i, 1] + b * c[i, 2] + half) >> _LAB_SHIFT]
        for i in range(3)
    ]
    fx, fy, fz = fxyz
    half2 = 1 << (_LAB_SHIFT2 - 1)
    ab0 = 128 << _LAB_SHIFT2
    L = (_L_SCALE_INT * fy + _L_SHIFT_INT + half2) >> _LAB_SHIFT2
    a = (500 * (fx - fy) + ab0 + half2) >> _LAB_SHIFT2
    bb = (200 * (fy - fz) + ab0 + half2) >> _LAB_SHIFT2
    return torch.stack([L, a, bb], 1).clamp_(0, 255)


def bgr_to_lab8(images, input_format="BGR", quantize=True):
    """OpenCV's ``COLOR_LBGR2Lab`` for 8-bit images, in torch (differentiable).

    Args:
        images (Tensor): (N, 3, H, W) float, values in [0, 255].
        input_format (str): "BGR" or "RGB" channel order of ``images``.
        quantize (bool): if True the forward value is OpenCV's exact uint8 result (the input is
            first rounded to uint8 like OpenCV's uint8 input); gradients are those of the smooth
            formulas (straight-through). If False the smooth float formulas are returned.

    Returns:
        Tensor: (N, 3, H, W) Lab in OpenCV's 8-bit scaling (L * 255 / 100, a + 128, b + 128),
        same dtype as ``images``.
    """
    if quantize:
        images = ste_round_uint8(images)
    smooth = _bgr_to_lab8_smooth(images, input_format)
    if not quantize:
        return smooth
    with torch.no_grad():
        exact = _bgr_to_lab8_exact(images.detach(), input_format)
    return ste(smooth, exact)


def _lab8_to_bgr_smooth(lab, output_format):
    L = lab[:, 0] * (100.0 / 255.0)
    a = lab[:, 1] - 128.0
    b = lab[:, 2] - 128.0
    low = L <= 8.0
    y = torch.where(low, L / 903.3, ((L + 16.0) / 116.0) ** 3)
    fy = torch.where(low, 7.787 * (L / 903.3) + 16.0 / 116.0, (L + 16.0) / 116.0)
    f_thresh = 6.0 / 29.0

    def finv(f):
        return torch.where(f <= f_thresh, (f - 16.0 / 116.0) / 7.787, f**3)

    x = finv(a / 500.0 + fy)
    z = finv(fy - b / 200.0)
    m = _XYZ2RGB * _WHITE_D65[None, :]
    # OpenCV truncates (floor(255 * v), v in 12-bit steps below 1), so the smooth model of its
    # output is 255 v - 0.5 (its largest output is 254)
    rgb = [
        ((m[i, 0] * x + m[i, 1] * y + m[i, 2] * z).clamp(0.0, 1.0) * 255.0 - 0.5).clamp(min=0.0)
        for i in range(3)
    ]
    order = (2, 1, 0) if output_format == "BGR" else (0, 1, 2)
    return torch.stack([rgb[i] for i in order], 1)


def _lab8_to_bgr_exact(lab_u8, output_format):
    """OpenCV's integer Lab2RGBinteger (linear RGB) on integer-valued float input."""
    tabs = _lab_tables_on(lab_u8.device)
    L, a, b = (lab_u8[:, i].to(torch.int64) for i in range(3))
    y = tabs["y"][L]
    fy = tabs["fy"][L]
    adiv = ((5 * a * 53687 + (1 << 7)) >> 13) - 128 * _INV_BASE // 500
    bdiv = ((b * 41943 + (1 << 4)) >> 9) - 128 * _INV_BASE // 200 + 1
    x = tabs["ab_to_xz"][fy + adiv - _MIN_AB]
    z = tabs["ab_to_xz"][fy - bdiv - _MIN_AB]
    c = tabs["inv"]
    half = 1 << (_INV_SHIFT - 1)
    rgb = []
    for i in range(3):
        v = (c[i, 0] * x + c[i, 1] * y + c[i, 2] * z + half) >> _INV_SHIFT
        v = v.clamp_(0, 4095)
        rgb.append(((v << 8) - v) >> 12)
    order = (2, 1, 0) if output_format == "BGR" else (0, 1, 2)
    return torch.stack([rgb[i] for i in order], 1).clamp_(0, 255)


def lab8_to_bgr(lab, output_format="BGR", quantize=True):
    """OpenCV's ``COLOR_Lab2LBGR`` for 8-bit Lab, in torch (differentiable).

    Args:
        lab (Tensor): (N, 3, H, W) Lab in OpenCV's 8-bit scaling (see :func:`bgr_to_lab8`).
        output_format (str): "BGR" or "RGB" channel order of the result.
        quantize (bool): if True the Lab input is rounded to uint8 and the forward value is
            OpenCV's exact uint8 output (straight-through gradients of the float formulas);
            if False the float formulas, ``max(255 * clip(rgb, 0, 1) - 0.5, 0)`` (the -0.5 models
            OpenCV's truncating integer scale on average), no rounding.

    Returns:
        Tensor: (N, 3, H, W) image in [0, 255], same dtype as ``lab``.
    """
    if quantize:
        lab = ste_round_uint8(lab)
    smooth = _lab8_to_bgr_smooth(lab, output_format)
    if not quantize:
        return smooth
    with torch.no_grad():
        exact = _lab8_to_bgr_exact(lab.detach(), output_format)
    return ste(smooth, exact)
