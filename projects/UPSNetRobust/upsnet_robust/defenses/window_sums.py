# Copyright (c) UPSNetRobust authors.
"""Exact k x k window sums and OpenCV's ``BORDER_REFLECT_101`` indices, in torch (the patch
distances of the torch NL-means, :mod:`.torch_nlmeans`)."""

import numpy as np
import torch

__all__ = ["box_buffers_per_pass", "box_sum", "reflect101_index"]

def reflect101_index(n, pad, device):
    """Source indices of OpenCV's BORDER_REFLECT_101 padding by ``pad`` on both sides."""
    idx = []
    for p in range(-pad, n + pad):
        if n == 1:
            idx.append(0)
            continue
        while p < 0 or p >= n:
            p = -p if p < 0 else 2 * n - 2 - p
        idx.append(p)
    return torch.tensor(idx, dtype=torch.long, device=device)


def box_buffers_per_pass(k):
    """Work buffers one direction of :func:`box_sum` needs: partial sums plus combinations."""
    return max(1, k.bit_length() - 1 + bin(k).count("1"))


def box_sum(x, k, out=None, work=None):
    """Sum over k x k windows (valid positions) of the last two dims, exact for integer data.

    Uses log-step partial sums (2, 4, ... then the remainder), i.e. about 2 log2(k) additions.
    ``work`` (a list of flat buffers) and ``out`` enable the allocation-free in-place mode.
    """
    if k == 1:
        if out is not None:
            out.copy_(x)
            return out
        return x

    def window_sum(t, dim, k, final_out, bufs):
        n = t.shape[dim] - k + 1
        # partial sums s_1 = t, s_2, s_4, ...: s_m[i] = t[i] + ... + t[i+m-1]
        sums = {1: t}
        m = 1
        bi = 0
        while 2 * m <= k:
            prev = sums[m]
            length = prev.shape[dim] - m
            a = prev.narrow(dim, 0, length)
            b = prev.narrow(dim, m, length)
            if bufs is not None:
                shape = list(a.shape)
                dst = bufs[bi].narrow(0, 0, int(np.prod(shape))).view(shape)
                bi += 1
                sums[2 * m] = torch.add(a, b, out=dst)
            else:
                sums[2 * m] = a + b
            m *= 2
        # combine the binary decomposition of k
        result = None
        covered = 0
        for p in sorted(sums, reverse=True):
            if covered + p <= k and (k - covered) & p:
                part = sums[p].narrow(dim, covered, n)
                if result is None:
                    result = part
                else:
                    last = covered + p == k
                    if bufs is not None:
                        shape = list(part.shape)
                        dst = (
                            final_out
                            if (last and final_out is not None)
                            else (bufs[bi].narrow(0, 0, int(np.prod(shape))).view(shape))
                        )
                        bi += 1
                        result = torch.add(result, part, out=dst)
                    else:
                        result = result + part
                covered += p
        if final_out is not None and result.data_ptr() != final_out.data_ptr():
            final_out.copy_(result)
            result = final_out
        return result

    if work is None:
        return window_sum(window_sum(x, x.dim() - 1, k, None, None), x.dim() - 2, k, out, None)
    half = len(work) // 2
    hsum = window_sum(x, x.dim() - 1, k, None, work[:half])
    return window_sum(hsum, x.dim() - 2, k, out, work[half:])
