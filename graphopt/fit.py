"""The `fit` initialisation of docs/method.md: choose K and L so that a linear site approximates the
original pointwise convolution, `W ~ (I + L P) K`, by alternating least squares over the
blocks. NumPy only; each backend turns its weights into `W` (F x Cin) and back.

Layouts: `W` is F x Cin (output channel by input channel). K is F x Cin/N: row f holds the
weights of output channel f over the Cin/N input channels of its group, f // (F/N). L, when the
site has one, is F x F/N in the same way. These are ONNX's `[F, Cin/N, 1...]` without the
kernel's unit dimensions, and the transpose of Keras' grouped `(Cin/N, F)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.plan import SitePlan, interleave_permutation

ITERATIONS = 30
TOLERANCE = 1e-4
"""Stop when an iteration improves the relative error by less than this."""


@dataclass(frozen=True)
class Fitted:
    kw: np.ndarray
    lw: np.ndarray | None
    k_bias: np.ndarray | None
    l_bias: np.ndarray | None
    error: float
    """||W - (I + L P) K|| / ||W|| (Frobenius); 0 when W is 0. Calibrated weights: the
    held-out relative error of the site's output."""
    l_norm: tuple[np.ndarray, np.ndarray] | None = None
    """Paper mode with a BN' after L: its scale (gamma) and shift (beta); mean 0, variance 1."""


def block_diagonal(grouped: np.ndarray, groups: int, in_channels: int) -> np.ndarray:
    """The full F x in_channels matrix of a grouped weight (F x in_channels/groups)."""
    filters, width = grouped.shape
    step = filters // groups
    full = np.zeros((filters, in_channels), grouped.dtype)
    for g in range(groups):
        full[g * step : (g + 1) * step, g * width : (g + 1) * width] = grouped[
            g * step : (g + 1) * step
        ]
    return full


def site_matrix(plan: SitePlan, kw: np.ndarray, lw: np.ndarray | None) -> np.ndarray:
    """The F x Cin linear map of a site: `P K` without L, `K + L P K` with it."""
    perm = np.asarray(interleave_permutation(plan.filters, plan.groups))
    k_full = block_diagonal(kw, plan.groups, plan.cin)
    if lw is None:
        return k_full[perm]
    mixed, out, step = k_full[perm], k_full.copy(), plan.filters // plan.groups
    for h in range(plan.groups):  # L is block-diagonal: one small product per group
        rows = slice(h * step, (h + 1) * step)
        out[rows] += lw[rows] @ mixed[rows]
    return out


def fit_site(
    weight: np.ndarray, plan: SitePlan, bias: np.ndarray | None = None, iterations=ITERATIONS
) -> Fitted:
    """K and L (and biases giving exactly `bias`) that approximate `weight` (F x Cin)."""
    w = np.asarray(weight, np.float64)
    filters, cin, groups = plan.filters, plan.cin, plan.groups
    step, width = filters // groups, cin // groups
    perm = np.asarray(interleave_permutation(filters, groups))
    norm = float(np.linalg.norm(w)) or 1.0

    def error(kw, lw):
        return float(np.linalg.norm(w - site_matrix(plan, kw, lw))) / norm

    if not plan.has_l:
        # W ~ P K: K's blocks are the matching blocks of W with its rows put back in place
        unpermuted = np.empty_like(w)
        unpermuted[perm] = w
        kw = np.concatenate(
            [
                unpermuted[g * step : (g + 1) * step, g * width : (g + 1) * width]
                for g in range(groups)
            ]
        )
        k_bias = None
        if bias is not None:
            k_bias = np.empty_like(np.asarray(bias, np.float64))
            k_bias[perm] = bias  # the interleave moves the bias with its channel
        return Fitted(*_cast(weight, kw, None, k_bias, None), error(kw, None))

    def solve_k(lw):  # W[:, C_g] = (I + L P)[:, R_g] K_g, all groups in one batch
        a = np.eye(filters) + block_diagonal(lw, groups, filters)[:, np.argsort(perm)]
        lhs = a.reshape(filters, groups, step).transpose(1, 0, 2)  # (N, F, s): a[:, R_g]
        rhs = w.reshape(filters, groups, width).transpose(1, 0, 2)  # (N, F, c): w[:, C_g]
        return _least_squares(lhs, rhs).reshape(filters, width)

    def solve_l(kw):  # (W - K)[O_h] = L_h (P K)[O_h], all groups in one batch
        k_full = block_diagonal(kw, groups, cin)
        rest, mixed = w - k_full, k_full[perm]
        lhs = mixed.reshape(groups, step, cin).transpose(0, 2, 1)  # (N, Cin, s)
        rhs = rest.reshape(groups, step, cin).transpose(0, 2, 1)
        return _least_squares(lhs, rhs).transpose(0, 2, 1).reshape(filters, step)

    # Alternating least squares; after each sweep, a step further along the last move is
    # kept when it is better (plain ALS crawls along the valleys of this bilinear problem).
    kw = solve_k(np.zeros((filters, step)))
    lw = solve_l(kw)
    current = error(kw, lw)
    for _ in range(iterations):
        kw_next = solve_k(lw)
        lw_next = solve_l(kw_next)
        swept = error(kw_next, lw_next)
        kw_far, lw_far = 2 * kw_next - kw, 2 * lw_next - lw
        far = error(kw_far, lw_far)
        kw_new, lw_new, new = (kw_far, lw_far, far) if far < swept else (kw_next, lw_next, swept)
        improved = current - new
        kw, lw, current = kw_new, lw_new, new
        if improved < TOLERANCE:
            break
    l_bias = None if bias is None else np.asarray(bias, np.float64)
    k_bias = None if bias is None else np.zeros(filters)
    return Fitted(*_cast(weight, kw, lw, k_bias, l_bias), current)


def _least_squares(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """argmin_X ||lhs X - rhs|| for a batch of tall systems, by the normal equations (the
    Gram matrices are tiny: s x s); a whisker of ridge keeps an all-zero block solvable."""
    lhs_t = lhs.transpose(0, 2, 1)
    gram = lhs_t @ lhs
    ridge = 1e-12 * (np.trace(gram, axis1=1, axis2=2)[:, None, None] + 1e-300)
    return np.linalg.solve(gram + ridge * np.eye(gram.shape[-1]), lhs_t @ rhs)


def _cast(like, *arrays):
    dtype = np.asarray(like).dtype
    return tuple(None if a is None else np.asarray(a, dtype) for a in arrays)
