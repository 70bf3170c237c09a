# Copyright (c) UPSNetRobust authors.
"""Batched, differentiable PyTorch re-implementation of ``cv2.fastNlMeansDenoisingColored``.

What OpenCV (4.x, CPU path, 8-bit input) computes, and what this module follows:

1. ``cvtColor(src, COLOR_LBGR2Lab)``: linear BGR to OpenCV's 8-bit Lab, rounded to uint8
   (:func:`.opencv_lab.bgr_to_lab8`, bit-exact).
2. The L plane and the (a, b) planes are denoised **separately**: ``fastNlMeansDenoising(L, h)``
   on a 1-channel image and ``fastNlMeansDenoising(ab, hColor)`` on a 2-channel image (not one
   3-channel call with a per-channel h). For each pixel p and each offset o of the
   ``search_window`` x ``search_window`` window (p itself included) the squared patch distance
   ``D = sum over the template_window^2 patch and the plane's channels of (I[p+u] - I[p+o+u])^2``
   is an exact integer; its weight is ``LUT[D >> 6]`` with
   ``LUT[k] = round(M * exp(-(k * 64 / 49) / (h^2 * c)))`` (64/49 because OpenCV replaces the
   division by the 49 patch pixels by a shift by 6), ``c`` the plane's channel count (1 or 2),
   ``M = INT_MAX // (search^2 * 255)`` (19096 for 21) the fixed-point unit, and weights below
   ``0.001 * M`` set to 0. The output is ``(sum w * I[p+o] + sum w / 2) // sum w`` (integer
   rounding). Borders are ``BORDER_REFLECT_101`` of size ``search//2 + template//2``.
3. ``cvtColor(dst_lab, COLOR_Lab2LBGR)``: OpenCV's integer Lab -> linear BGR
   (:func:`.opencv_lab.lab8_to_bgr`, bit-exact).

With ``quantize=True`` (default) every one of those integer steps is reproduced exactly in the
forward pass: the uint8 rounding of a float input (``torch.round``, half to even, like the
project's ``np.rint``), OpenCV's rounding of Lab to uint8 before denoising (the integer Lab
tables, checked against ``cv2.cvtColor`` on all 2^24 colours in both directions), the exact
integer patch distances, the table weights, the int32 weighted sums (float64 on the autograd
path, also exact) with OpenCV's rounded division, and the integer Lab -> BGR conversion. The
outputs are therefore identical to OpenCV's (the tests assert it). The backward pass uses
straight-through estimators: each rounding or table step passes the gradient of its smooth
counterpart (the real-valued Lab formulas, ``w = M * exp(-D / (T^2 h^2 c))`` masked where the
table weight is 0, ``num / den`` for the rounded division, the identity for the roundings).
With ``quantize=False`` the smooth counterparts are also the forward pass (a continuous
relaxation without any uint8 rounding; it differs from OpenCV by the roundings it leaves out,
mean abs difference about 0.7 grey levels, PSNR about 48-49 dB).

**Differentiability.** Because the whole filter is written in torch, gradients flow from the
output to the input image: an adaptive attacker gets an exact gradient of this (smooth or
straight-through) approximation of the OpenCV defense, instead of needing BPDA around a
non-differentiable black box. The autograd path checkpoints chunks of offset pairs, so memory
stays bounded (the input, the accumulators and one chunk's temporaries per strip of rows).

Cost is ``O(search_window^2 * H * W)`` per image, with about 220 offset pairs for a 21 search
window (the distance of offset o at p equals that of -o at p + o, so each pair's distances are
computed once and used twice). Images are processed in strips of rows, batches are vectorised.
Without autograd the CPU path runs on int32 tensors with preallocated buffers. On a busy CPU
prefer ``torch.set_num_threads(1)``: the filter is a long sequence of short element-wise ops,
and OpenMP parallel regions stall whenever one of their threads is descheduled.
"""

import math

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .opencv_lab import bgr_to_lab8, lab8_to_bgr, ste
from .window_sums import box_buffers_per_pass, box_sum, reflect101_index

__all__ = [
    "nlmeans_torch",
    "nlmeans_lab8",
    "bgr_to_lab8",
    "lab8_to_bgr",
    "nlmeans_weight_table",
    "opencv_fixed_point_unit",
]


# ------------------------------------------------------------------------------------------------
# NL-means weights
# ------------------------------------------------------------------------------------------------
def opencv_fixed_point_unit(search_window=21):
    """OpenCV's fixed-point weight unit ``M = INT_MAX // (search^2 * 255)`` (19096 for 21)."""
    s = search_window // 2 * 2 + 1
    return (2**31 - 1) // (s * s * 255)


def _bin_shift(template_window):
    t = template_window // 2 * 2 + 1
    return int(math.ceil(math.log2(t * t)))


def nlmeans_weight_table(h, channels, template_window=7, search_window=21):
    """OpenCV's ``almost_dist2weight`` table for one plane (numpy float64 of integers).

    Entry ``k`` is the fixed-point weight of a patch whose summed squared distance ``D`` (over
    the ``template_window^2`` pixels and ``channels`` channels) has ``D >> shift == k``, with
    ``2^shift`` the power of two at or above ``template_window^2``.

    Args:
        h (float): filter strength of the plane.
        channels (int): 1 (L plane) or 2 (a, b planes).
        template_window (int): patch size.
        search_window (int): search window size (sets the fixed-point unit).

    Returns:
        ndarray: the table, values in {0} U [0.001 M, M].
    """
    t = template_window // 2 * 2 + 1
    shift = _bin_shift(t)
    mult = float(1 << shift) / (t * t)
    unit = opencv_fixed_point_unit(search_window)
    size = int(255 * 255 * channels / mult + 1)
    dist = np.arange(size) * mult
    # OpenCV multiplies h * h * channels in float32
    denom = float(np.float32(h) * np.float32(h) * np.float32(channels))
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.exp(-dist / denom) if denom > 0 else np.where(dist == 0, 1.0, 0.0)
    w = np.where(np.isnan(w), 1.0, w)
    table = np.rint(unit * w)
    table[table < 0.001 * unit] = 0
    return table


# ------------------------------------------------------------------------------------------------
# the NL-means core on 8-bit Lab
# ------------------------------------------------------------------------------------------------
class _Plan:
    """Static parameters of one nlmeans call."""

    def __init__(self, h, h_color, template_window, search_window, quantize, device, dtype):
        self.t = template_window // 2
        self.s = search_window // 2
        self.tw = 2 * self.t + 1
        self.border = self.s + self.t
        self.quantize = quantize
        self.unit = float(opencv_fixed_point_unit(search_window))
        self.shift = _bin_shift(self.tw)
        # per plane: L (1 channel, h), ab (2 channels, h_color)
        self.h2c = []
        tables = []
        for hh, c in ((h, 1), (h_color, 2)):
            self.h2c.append(float(np.float32(hh) * np.float32(hh) * np.float32(c)))
            tables.append(nlmeans_weight_table(hh, c, template_window, search_window))
        self.offset_ab = len(tables[0])
        self.table_max = len(tables[0]) + len(tables[1]) - 1
        self.table = torch.as_tensor(np.concatenate(tables), dtype=dtype, device=device)
        self.table_int = self.table.to(torch.int32)
        self.chan_offset = torch.tensor(
            [0.0, float(self.offset_ab)], dtype=dtype, device=device
        ).view(1, 2, 1, 1)
        # smooth weight: unit * exp(-D * k) with k = 1 / (T^2 h^2 c); per plane, as (1, 2, 1, 1)
        ks = []
        for h2c in self.h2c:
            ks.append(1.0 / (self.tw * self.tw * h2c) if h2c > 0 else 1e30)
        self.k = torch.tensor(ks, dtype=dtype, device=device).view(1, 2, 1, 1)
        # offsets: (0, 0) handled separately; one of each +-o pair
        self.pairs = [
            (dy, dx)
            for dy in range(0, self.s + 1)
            for dx in range(-self.s, self.s + 1)
            if dy > 0 or dx > 0
        ]


def _smooth_weight(d, plan):
    """unit * exp(-D / (T^2 h^2 c)) per plane, 0 below OpenCV's 0.001 cut-off (the exponent is
    clamped so that exp never returns denormals, which are slow on CPUs)."""
    arg = (-d * plan.k).clamp(min=-80.0)
    w = plan.unit * torch.exp(arg)
    return torch.where(w >= 0.001 * plan.unit, w, torch.zeros_like(w))


def _table_weight(d, plan):
    """OpenCV's table weight of exact integer distances ``d`` (N, 2, h, w), any real dtype."""
    q = torch.floor(d * (1.0 / (1 << plan.shift))) + plan.chan_offset
    q = q.clamp_(0, plan.table_max).long()
    return plan.table[q]


def _pair_geometry(plan, r0, h, width, dy, dx):
    """Slices for one +-o pair on the strip of image rows [r0, r0 + h).

    The pair's distances are computed once on a region covering the strip's pixels p (distance
    of p to p + o) and the pixels q - o (distance of q to q - o, which is the same number), i.e.
    image rows [r0 - dy, r0 + h) and columns [min(0, -dx), max(W, W - dx)).
    """
    t, s, B = plan.t, plan.s, plan.border
    c0 = min(0, -dx)
    wr = width + abs(dx)  # region width
    hr = h + dy  # region height
    # reference patches (A) and displaced patches (B) covering the region plus the template margin
    a_rows = (r0 - dy + s, hr + 2 * t)
    a_cols = (c0 + s, wr + 2 * t)
    return dict(
        hr=hr,
        wr=wr,
        a_rows=a_rows,
        a_cols=a_cols,
        b_rows=(a_rows[0] + dy, a_rows[1]),
        b_cols=(a_cols[0] + dx, a_cols[1]),
        # forward use: pixel p in the strip, weight D(p), value I[p + o]
        wf=((dy, h), (-c0, width)),
        vf=((r0 + B + dy, h), (B + dx, width)),
        # backward use: pixel q in the strip, weight D(q - o), value I[q - o]
        wb=((0, h), (-dx - c0, width)),
        vb=((r0 + B - dy, h), (B - dx, width)),
    )


def _sl(x, rows, cols):
    return x[:, :, rows[0] : rows[0] + rows[1], cols[0] : cols[0] + cols[1]]


def _view(flat, shape):
    """A contiguous view of the first elements of a flat workspace buffer."""
    return flat.narrow(0, 0, int(np.prod(shape))).view(shape)


def _pair_distances(P, g, plan):
    """Exact patch distances (N, 2, hr, wr) of a pair: L plane and summed a, b planes."""
    diff = _sl(P, g["a_rows"], g["a_cols"]) - _sl(P, g["b_rows"], g["b_cols"])
    sq = diff * diff
    planes = torch.cat([sq[:, :1], sq[:, 1:2] + sq[:, 2:3]], 1)
    return box_sum(planes, plan.tw)


def _pair_weights(d, plan):
    if plan.quantize:
        with torch.no_grad():
            wq = _table_weight(d.detach(), plan)
        if not d.requires_grad:
            return wq
        ws = _smooth_weight(d, plan) * (wq > 0)
        return ws + (wq - ws).detach()
    return _smooth_weight(d, plan)


def _finish(num, den, plan, dtype):
    """num / den per plane; with ``quantize`` OpenCV's ``(num + den // 2) // den`` (exact for
    the float64 integer sums) in the forward pass, the gradient of num / den backward."""
    den3 = torch.cat([den[:, :1], den[:, 1:2], den[:, 1:2]], 1).to(num.dtype)
    smooth = (num / den3).to(dtype)
    if not plan.quantize:
        return smooth
    with torch.no_grad():
        exact = torch.floor((num.detach() + torch.floor(den3.detach() * 0.5)) / den3.detach())
    return ste(smooth, exact)


def _accumulate_functional(P, r0, h, width, pairs, plan, acc_dtype):
    """Sum of w * value and of w over ``pairs`` for the strip (autograd-friendly)."""
    num = None
    den = None
    for dy, dx in pairs:
        g = _pair_geometry(plan, r0, h, width, dy, dx)
        w = _pair_weights(_pair_distances(P, g, plan), plan)
        for wsl, vsl in ((g["wf"], g["vf"]), (g["wb"], g["vb"])):
            ww = _sl(w, *wsl)
            v = _sl(P, *vsl)
            contrib = torch.cat([ww[:, :1] * v[:, :1], ww[:, 1:2] * v[:, 1:]], 1).to(acc_dtype)
            num = contrib if num is None else num + contrib
            den = ww if den is None else den + ww
    return num, den


def _strip_functional(P, r0, h, width, plan, chunk):
    """Denoised Lab of a strip, with autograd; chunks of offset pairs are checkpointed."""
    B = plan.border
    acc_dtype = torch.float64 if plan.quantize else P.dtype
    centre = P[:, :, r0 + B : r0 + B + h, B : B + width]
    num = (centre * plan.unit).to(acc_dtype)
    den = torch.full_like(centre[:, :2], plan.unit)
    use_ckpt = torch.is_grad_enabled() and P.requires_grad
    for i in range(0, len(plan.pairs), chunk):
        pairs = plan.pairs[i : i + chunk]
        if use_ckpt:
            n, d = _checkpoint(
                _accumulate_functional,
                P,
                r0,
                h,
                width,
                pairs,
                plan,
                acc_dtype,
                use_reentrant=False,
            )
        else:
            n, d = _accumulate_functional(P, r0, h, width, pairs, plan, acc_dtype)
        num = num + n
        den = den + d
    return _finish(num, den, plan, P.dtype)


@torch.no_grad()
def _strip_inplace(P, r0, h, width, plan, ws):
    """Denoised Lab of a strip without autograd, allocation-free.

    With ``quantize``, ``P`` is int32 and everything is OpenCV's exact integer arithmetic
    (distances, ``D >> shift`` table index, int32 weighted sums that cannot overflow because
    ``M * search^2 * 255 <= INT_MAX``, rounded integer division). Otherwise ``P`` is float.
    """
    B = plan.border
    N = P.shape[0]
    num, den = ws["num"][:, :, :h], ws["den"][:, :, :h]
    centre = P[:, :, r0 + B : r0 + B + h, B : B + width]
    unit = int(plan.unit) if plan.quantize else plan.unit
    torch.mul(centre, unit, out=num)
    den.fill_(unit)
    for dy, dx in plan.pairs:
        g = _pair_geometry(plan, r0, h, width, dy, dx)
        ar, ac = g["a_rows"], g["a_cols"]
        diff = _view(ws["diff"], (N, 3, ar[1], ac[1]))
        torch.sub(_sl(P, ar, ac), _sl(P, g["b_rows"], g["b_cols"]), out=diff)
        diff.mul_(diff)
        diff[:, 1].add_(diff[:, 2])
        dshape = (N, 2, g["hr"], g["wr"])
        d = _view(ws["d"], dshape)
        box_sum(diff[:, :2], plan.tw, out=d, work=ws["box"])
        if plan.quantize:
            # table index: D >> shift (+ the a,b table's offset)
            d.bitwise_right_shift_(plan.shift)
            d[:, 1].add_(plan.offset_ab)
            w = _view(ws["w"], dshape)
            torch.index_select(plan.table_int, 0, d.view(-1), out=w.view(-1))
        else:
            w = d.mul_(plan.k).neg_().clamp_(min=-80.0).exp_().mul_(plan.unit)
            w.masked_fill_(w < 0.001 * plan.unit, 0.0)
        for wsl, vsl in ((g["wf"], g["vf"]), (g["wb"], g["vb"])):
            ww = _sl(w, *wsl)
            v = _sl(P, *vsl)
            num[:, :1].addcmul_(ww[:, :1], v[:, :1])
            num[:, 1:].addcmul_(ww[:, 1:2], v[:, 1:])
            den.add_(ww)
    den3 = torch.cat([den[:, :1], den[:, 1:2], den[:, 1:2]], 1)
    if plan.quantize:
        # OpenCV: (sum w I + sum w / 2) / sum w in integers
        den3 = den3.long()
        return torch.div(num.long() + den3 // 2, den3, rounding_mode="floor")
    return num / den3


def _workspace(N, rows, width, plan, device, dtype):
    t, s = plan.t, plan.s
    hr, wr = rows + s, width + s
    wdtype = torch.int32 if plan.quantize else dtype
    big = N * 3 * (hr + 2 * t) * (wr + 2 * t)
    return dict(
        num=torch.empty(N, 3, rows, width, device=device, dtype=wdtype),
        den=torch.empty(N, 2, rows, width, device=device, dtype=wdtype),
        diff=torch.empty(big, device=device, dtype=wdtype),
        d=torch.empty(N * 2 * hr * wr, device=device, dtype=wdtype),
        w=torch.empty(N * 2 * hr * wr, device=device, dtype=wdtype),
        box=[
            torch.empty(N * 2 * (hr + 2 * t) * (wr + 2 * t), device=device, dtype=wdtype)
            for _ in range(2 * box_buffers_per_pass(plan.tw))
        ],
    )


def _default_rows(N, H, W, device, grad):
    """Rows per strip. Without autograd: rows * W within 2^17 pixels on CPU (64 rows at 2048
    wide; the measured optimum between per-op overhead, which favours tall strips, and memory
    traffic), independent of the batch size because each strip recomputes ``search/2 + template``
    extra rows; on CUDA N * rows * W within 2^23 (a 1024x2048 batch of 4 in one strip, about
    1 GB of int32 temporaries). With autograd: N * rows * W within 2^16 (CPU) or 2^21 (CUDA),
    since a checkpointed chunk of 16 pairs keeps some 10 float tensors of the strip per pair."""
    if grad:
        per = (1 << 21 if device.type == "cuda" else 1 << 16) // max(1, N * W)
    elif device.type == "cuda":
        per = (1 << 23) // max(1, N * W)
    else:
        per = (1 << 17) // max(1, W)
    return int(max(8, min(H, per)))


def nlmeans_lab8(
    lab,
    h=10.0,
    h_color=10.0,
    template_window=7,
    search_window=21,
    quantize=True,
    rows_per_strip=None,
    pairs_per_checkpoint=16,
):
    """OpenCV's NL-means on 8-bit Lab planes: L with ``h``, (a, b) jointly with ``h_color``.

    Args:
        lab (Tensor): (N, 3, H, W) float Lab in OpenCV's 8-bit scaling; with ``quantize`` it
            should be integer-valued (as :func:`bgr_to_lab8` returns).
        h (float): strength for the L plane.
        h_color (float): strength for the a, b planes.
        template_window (int): patch size (odd; even sizes act like the next smaller odd one,
            as in OpenCV).
        search_window (int): search window size (odd, same rule).
        quantize (bool): OpenCV's table weights and rounded output (straight-through
            gradients) if True; smooth ``exp`` weights and unrounded output if False.
        rows_per_strip (int or None): image rows processed at once (memory / cache knob);
            None picks a device-dependent default.
        pairs_per_checkpoint (int): offset pairs per gradient checkpoint (only with autograd).

    Returns:
        Tensor: (N, 3, H, W) denoised Lab, same dtype and device.
    """
    if lab.dim() != 4 or lab.shape[1] != 3:
        raise ValueError(f"Expected an (N, 3, H, W) Lab tensor, got {tuple(lab.shape)}.")
    N, _, H, W = lab.shape
    plan = _Plan(h, h_color, template_window, search_window, quantize, lab.device, lab.dtype)
    B = plan.border
    P = lab.index_select(2, reflect101_index(H, B, lab.device))
    P = P.index_select(3, reflect101_index(W, B, lab.device))
    grad = torch.is_grad_enabled() and lab.requires_grad
    rows = rows_per_strip or _default_rows(N, H, W, lab.device, grad)
    rows = max(1, min(int(rows), H))
    strips = []
    if grad:
        for r0 in range(0, H, rows):
            h_ = min(rows, H - r0)
            strips.append(_strip_functional(P, r0, h_, W, plan, pairs_per_checkpoint))
    else:
        ws = _workspace(N, rows, W, plan, lab.device, lab.dtype)
        P = P.detach()
        P = torch.round(P).to(torch.int32) if quantize else P.contiguous()
        for r0 in range(0, H, rows):
            h_ = min(rows, H - r0)
            strips.append(_strip_inplace(P, r0, h_, W, plan, ws))
    out = torch.cat(strips, 2) if len(strips) > 1 else strips[0]
    return out.to(lab.dtype)


def nlmeans_torch(
    images,
    h=10.0,
    h_color=10.0,
    template_window=7,
    search_window=21,
    input_format="BGR",
    quantize=True,
    rows_per_strip=None,
    pairs_per_checkpoint=16,
):
    """Batched torch version of ``cv2.fastNlMeansDenoisingColored(img, None, h, h_color, t, s)``.

    Differentiable: gradients flow to ``images`` (straight-through through OpenCV's roundings
    and weight table when ``quantize``; see the module docstring), which gives adaptive attacks
    an exact gradient of this approximation of the OpenCV defense.

    Args:
        images (Tensor): (N, 3, H, W) or (3, H, W), values in [0, 255], float (any float dtype;
            float16/bfloat16 are computed in float32) or uint8, on any device.
        h (float): luminance strength (OpenCV's ``h``).
        h_color (float): colour strength (OpenCV's ``hColor``).
        template_window (int): patch size (OpenCV's ``templateWindowSize``).
        search_window (int): search window size (OpenCV's ``searchWindowSize``).
        input_format (str): "BGR" (OpenCV's order, detectron2's default) or "RGB"; the output
            has the same order.
        quantize (bool): True reproduces OpenCV's integer pipeline in the forward pass (uint8
            input rounding, 8-bit Lab, table weights, rounded Lab, uint8 output values); False
            is the smooth float relaxation.
        rows_per_strip (int or None): rows per processing strip (None: automatic).
        pairs_per_checkpoint (int): offset pairs per gradient-checkpoint segment.

    Returns:
        Tensor: denoised images, same shape, dtype and device as ``images`` (uint8 input gives
        uint8 output; float output holds integer values when ``quantize``).
    """
    if input_format not in ("BGR", "RGB"):
        raise ValueError(f"input_format must be 'BGR' or 'RGB', got '{input_format}'.")
    if h < 0 or h_color < 0:
        raise ValueError(f"NL-means strengths must be >= 0, got h={h}, h_color={h_color}.")
    if template_window < 1 or search_window < 1:
        raise ValueError("template_window and search_window must be >= 1.")
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Expected (N, 3, H, W) or (3, H, W) images, got {tuple(images.shape)}.")
    orig_dtype = x.dtype
    if orig_dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not quantize:
        x = x.clamp(0, 255)
    lab = bgr_to_lab8(x, input_format, quantize)
    lab = nlmeans_lab8(
        lab,
        h,
        h_color,
        template_window,
        search_window,
        quantize,
        rows_per_strip,
        pairs_per_checkpoint,
    )
    out = lab8_to_bgr(lab, input_format, quantize)
    if orig_dtype == torch.uint8:
        out = torch.round(out.detach()).clamp_(0, 255).to(torch.uint8)
    elif out.dtype != orig_dtype:
        out = out.to(orig_dtype)
    return out.squeeze(0) if single else out
