"""NumPy reference of one site, written from docs/method.md independently of any backend."""

from __future__ import annotations

import numpy as np


def grouped_pointwise(x: np.ndarray, kernel: np.ndarray, groups: int, bias=None) -> np.ndarray:
    """Channels-last grouped 1x1 conv; kernel is (Cin/groups, F), one loop per group."""
    cin_g, filters = kernel.shape
    f_g = filters // groups
    out = np.zeros(x.shape[:-1] + (filters,), dtype=np.float64)
    for g in range(groups):
        xs = x[..., g * cin_g : (g + 1) * cin_g].astype(np.float64)
        out[..., g * f_g : (g + 1) * f_g] = xs @ kernel[:, g * f_g : (g + 1) * f_g]
    if bias is not None:
        out = out + bias
    return out


def interleave(x: np.ndarray, groups: int, axis: int = -1) -> np.ndarray:
    """View the channels as (N, s), transpose to (s, N), flatten."""
    x = np.moveaxis(x, axis, -1)
    step = x.shape[-1] // groups
    y = x.reshape(x.shape[:-1] + (groups, step)).swapaxes(-1, -2).reshape(x.shape)
    return np.moveaxis(y, -1, axis)


def linear_site(x, k_kernel, groups, k_bias=None, l_kernel=None, l_bias=None):
    """(I + L P) K x: K, interleave when step > 1, L when given, residual sum."""
    k_out = grouped_pointwise(x, k_kernel, groups, k_bias)
    step = k_out.shape[-1] // groups
    mixed = interleave(k_out, groups) if step > 1 else k_out
    if l_kernel is None:
        return mixed
    return k_out + grouped_pointwise(mixed, l_kernel, groups, l_bias)
