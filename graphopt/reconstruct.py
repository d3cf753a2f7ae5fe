"""Reconstruction of one site on real activations: K and L (and, in paper mode, BN') chosen so
that the site reproduces, on the inputs it sees, the output of what it replaces. NumPy only:
least squares weighted by the activations' second moments for the linear site; Adam steps with
gradients written out for the paper site, whose branches hold BN and an activation.

Rows are positions: `x` is n x Cin (the site's inputs), `target` n x F. Layouts of the weights are
fit.py's: K is F x Cin/N, L is F x F/N, in block form (N, F/N, Cin/N) inside this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphopt.fit import Fitted, _cast
from graphopt.plan import SitePlan, interleave_permutation

SWEEPS = 25
CG_STEPS = 8
TOLERANCE = 1e-5
RIDGE = 1e-6
PAPER_STEPS = 600
PAPER_BATCH = 2048


@dataclass(frozen=True)
class Step:
    """One operation of a branch after its conv: a per-channel affine map (a BatchNormalization
    in inference: `scale * z + shift`, epsilon kept for BN') or an elementwise activation `fn`
    on NumPy arrays (its derivative `grad`, when not given, by central differences)."""

    kind: str  # "affine" or "act"
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    epsilon: float = 1e-3
    fn: Callable | None = None
    grad: Callable | None = None

    def derivative(self, z: np.ndarray) -> np.ndarray:
        if self.grad is not None:
            return self.grad(z)
        h = 1e-3 * np.maximum(1.0, np.abs(z))
        up = np.asarray(self.fn(z + h), np.float64)
        down = np.asarray(self.fn(z - h), np.float64)
        return (up - down) / (2 * h)


def apply_steps(z: np.ndarray, steps: list[Step]) -> np.ndarray:
    """What the original conv's BN/activation make of its output `z` (n x F)."""
    z = np.asarray(z, np.float64)
    for step in steps:
        z = z * step.scale + step.shift if step.kind == "affine" else np.asarray(step.fn(z))
    return np.asarray(z, np.float64)


def relative_error(pred: np.ndarray, target: np.ndarray) -> float:
    norm = float(np.linalg.norm(target))
    return float(np.linalg.norm(pred - target)) / (norm or 1.0)


# ---- the linear site -------------------------------------------------------------------------


class _Blocks:
    """The structure of one site: grouped products, interleave P and A = I + L P."""

    def __init__(self, plan: SitePlan):
        self.n, self.f, self.cin = plan.groups, plan.filters, plan.cin
        self.s, self.c = self.f // self.n, self.cin // self.n
        self.perm = np.asarray(interleave_permutation(self.f, self.n))

    def grouped(self, blocks: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(block-diagonal matrix of `blocks`) @ y, for y with as many rows as its columns."""
        width = blocks.shape[-1]
        return np.matmul(blocks, y.reshape(self.n, width, -1)).reshape(self.f, -1)

    def diagonal(self, full: np.ndarray) -> np.ndarray:
        """The (N, s, c) diagonal blocks of an F x Cin matrix."""
        r = full.reshape(self.n, self.s, self.n, self.c)
        return r[np.arange(self.n), :, np.arange(self.n), :]

    def a(self, lb, z):  # (I + L P) z
        return z if lb is None else z + self.grouped(lb, z[self.perm])

    def a_t(self, lb, z):  # (I + L P)^T z
        if lb is None:
            return z
        back = np.empty_like(z)
        back[self.perm] = self.grouped(lb.transpose(0, 2, 1), z)
        return z + back

    def full(self, kb) -> np.ndarray:
        out = np.zeros((self.f, self.cin))
        for g in range(self.n):
            out[g * self.s : (g + 1) * self.s, g * self.c : (g + 1) * self.c] = kb[g]
        return out


def fit_linear(plan: SitePlan, x: np.ndarray, target: np.ndarray) -> Fitted:
    """min ||target - (x K^T (I + L P)^T + bias)|| over K, L (and biases when the site has
    them), by alternating exact L steps and preconditioned conjugate-gradient K steps on the
    activations' second moments. `error` is the relative error on these rows."""
    x, target = np.asarray(x, np.float64), np.asarray(target, np.float64)
    mean_x = x.mean(0) if plan.use_bias else np.zeros(x.shape[1])
    mean_t = target.mean(0) if plan.use_bias else np.zeros(target.shape[1])
    xc, tc = x - mean_x, target - mean_t
    n = len(x)
    cov = xc.T @ xc / n
    cov += RIDGE * (np.trace(cov) / len(cov) + 1e-12) * np.eye(len(cov))
    cross = tc.T @ xc / n  # F x Cin
    b = _Blocks(plan)
    if plan.has_l:
        kb, lb = _als(b, cov, cross)
    else:
        unpermuted = np.empty_like(cross)
        unpermuted[b.perm] = cross  # M = P K: K's blocks solve against P^T D
        kb, lb = _k_alone(b, cov, unpermuted), None
    m = b.a(lb, b.full(kb)) if plan.has_l else b.full(kb)[b.perm]
    offset = mean_t - m @ mean_x
    k_bias = l_bias = None
    if plan.use_bias:
        if plan.has_l:
            k_bias, l_bias = np.zeros(plan.filters), offset
        else:
            k_bias = np.empty_like(offset)
            k_bias[b.perm] = offset  # the interleave moves the bias with its channel
    error = relative_error(x @ m.T + offset, target)
    kw = kb.reshape(plan.filters, b.c)
    lw = None if lb is None else lb.reshape(plan.filters, b.s)
    like = np.zeros(1, np.float32)
    return Fitted(*_cast(like, kw, lw, k_bias, l_bias), error)


def _k_alone(b: _Blocks, cov, cross) -> np.ndarray:
    """K's blocks when nothing mixes the groups' outputs: K_g = D_gg C_gg^-1."""
    cg = cov.reshape(b.n, b.c, b.n, b.c)[np.arange(b.n), :, np.arange(b.n), :]
    return np.linalg.solve(cg, b.diagonal(cross).transpose(0, 2, 1)).transpose(0, 2, 1)


def _objective(b: _Blocks, kb, lb, cov, cross) -> float:
    m = b.a(lb, b.full(kb))
    return float(np.sum((m @ cov) * m) - 2 * np.sum(cross * m))


def _l_step(b: _Blocks, kb, cov, cross) -> np.ndarray:
    """L_h (Z_h C Z_h^T) = (D - K) ... per group of rows, Z = P K: exact."""
    k_full = b.full(kb)
    z = k_full[b.perm]
    zc = z @ cov  # F x Cin
    rows = (b.n, b.s, b.cin)
    zr, zcr = z.reshape(rows), zc.reshape(rows)
    gram = np.matmul(zcr, zr.transpose(0, 2, 1))  # (N, s, s)
    rhs = np.matmul(cross.reshape(rows), zr.transpose(0, 2, 1)) - np.matmul(
        (k_full @ cov).reshape(rows), zr.transpose(0, 2, 1)
    )
    ridge = RIDGE * (np.trace(gram, axis1=1, axis2=2)[:, None, None] / b.s + 1e-12)
    return np.linalg.solve(gram + ridge * np.eye(b.s), rhs.transpose(0, 2, 1)).transpose(0, 2, 1)


def _k_step(b: _Blocks, kb, lb, cov, cross) -> np.ndarray:
    """K given L by conjugate gradients on the blocks, preconditioned by the exact solve of
    each block alone."""
    a_dense = b.a(lb, np.eye(b.f))
    cols = a_dense.reshape(b.f, b.n, b.s)
    gram_a = np.einsum("fgi,fgj->gij", cols, cols) + 1e-9 * np.eye(b.s)
    cov_blocks = cov.reshape(b.n, b.c, b.n, b.c)[np.arange(b.n), :, np.arange(b.n), :]
    inv_a, inv_c = np.linalg.inv(gram_a), np.linalg.inv(cov_blocks)

    def hess(v):
        return b.diagonal(b.a_t(lb, b.a(lb, b.grouped(v, cov))))

    def precondition(r):
        return np.matmul(np.matmul(inv_a, r), inv_c)

    rhs = b.diagonal(b.a_t(lb, cross))
    r = rhs - hess(kb)
    z = precondition(r)
    p, rz = z, np.sum(r * z)
    for _ in range(CG_STEPS):
        hp = hess(p)
        denom = np.sum(p * hp)
        if denom <= 0 or rz <= 1e-30:
            break
        alpha = rz / denom
        kb = kb + alpha * p
        r = r - alpha * hp
        z = precondition(r)
        rz_new = np.sum(r * z)
        p, rz = z + (rz_new / rz) * p, rz_new
    return kb


def _als(b: _Blocks, cov, cross):
    kb = _k_alone(b, cov, cross)
    lb = _l_step(b, kb, cov, cross)
    scale = float(np.sum(cross * cross)) or 1.0
    current = _objective(b, kb, lb, cov, cross)
    for _ in range(SWEEPS):
        kb = _k_step(b, kb, lb, cov, cross)
        lb = _l_step(b, kb, cov, cross)
        new = _objective(b, kb, lb, cov, cross)
        if current - new < TOLERANCE * scale:
            current = new
            break
        current = new
    return kb, lb


# ---- the paper site ---------------------------------------------------------------------------


def fit_paper(
    plan: SitePlan,
    x: np.ndarray,
    target: np.ndarray,
    pre: np.ndarray,
    steps: list[Step],
    seed: int = 0,
    iterations: int = PAPER_STEPS,
) -> Fitted:
    """Adam steps (cosine decay) on K, L, their biases and BN' for
    `chain(K x) + chain'(L P chain(K x))`, from K fitted alone to the pre-activation `pre` and a
    small L. `steps` are the original's BN (fixed in K's branch) and activation."""
    b = _Blocks(plan)
    if not plan.has_l:  # the output is P u: K's own outputs answer to P^T pre
        unpermuted = np.empty_like(pre)
        unpermuted[:, b.perm] = pre
        pre = unpermuted
    start_k, start_bias = _k_alone_rows(b, x, pre, plan.use_bias)
    x = np.asarray(x, np.float32)  # the steps in float32, as a framework would take them
    target = np.asarray(target, np.float32)
    rng = np.random.default_rng(seed)
    site = _PaperSite(plan, b, steps, start_k, start_bias if plan.use_bias else None, rng)
    norm2 = float(np.mean(target.astype(np.float64) ** 2)) or 1.0
    adam = _Adam(site.params, 3e-3, iterations)
    batch = min(PAPER_BATCH, len(x))
    for _ in range(iterations):
        pick = rng.integers(0, len(x), batch)
        out, tape = site.forward(x[pick])
        scale = np.float32(2 / (out.size * norm2))
        adam.step(site.backward((out - target[pick]) * scale, tape))
    chunks = range(0, len(x), 8192)
    pred = np.concatenate([site.forward(x[i : i + 8192])[0] for i in chunks]).astype(np.float64)
    l_norm = None
    if site.norm_index is not None and plan.has_l:
        eps = steps[site.norm_index].epsilon
        p = site.params
        l_norm = (
            (p["scale"] * np.sqrt(1 + eps)).astype(np.float32),
            p["shift"].astype(np.float32),
        )
    p = site.params
    return Fitted(
        p["k"].reshape(plan.filters, b.c).astype(np.float32),
        None if "l" not in p else p["l"].reshape(plan.filters, b.s).astype(np.float32),
        None if "kb" not in p else p["kb"].astype(np.float32),
        None if "lb" not in p else p["lb"].astype(np.float32),
        relative_error(pred, target.astype(np.float64)),
        l_norm,
    )


class _PaperSite:
    """The paper site's forward pass on rows, and its gradients written out (a tape of each
    step's input): K -> branch -> interleave -> L -> branch' (BN' trained) -> sum."""

    def __init__(self, plan, b: _Blocks, steps, start_k, start_bias, rng, dtype=np.float32):
        self.plan, self.b, self.steps, self.dtype = plan, b, steps, dtype
        self.norm_index = next((i for i, s in enumerate(steps) if s.kind == "affine"), None)
        self.inverse = np.argsort(b.perm)
        self.params = {"k": np.array(start_k, np.float32)}
        if start_bias is not None:
            self.params["kb"] = np.array(start_bias, np.float32)
        if plan.has_l:
            limit = 0.1 * np.sqrt(6.0 / (2 * b.s))
            self.params["l"] = rng.uniform(-limit, limit, (b.n, b.s, b.s)).astype(np.float32)
            if plan.use_bias:
                self.params["lb"] = np.zeros(plan.filters, np.float32)
            if self.norm_index is not None:
                self.params["scale"] = np.ones(plan.filters, np.float32)
                self.params["shift"] = np.zeros(plan.filters, np.float32)
        self.params = {k: v.astype(dtype) for k, v in self.params.items()}
        self.fixed = [
            (s.scale.astype(dtype), s.shift.astype(dtype)) if s.kind == "affine" else None
            for s in steps
        ]

    def _grouped(self, w, rows):
        """Rows through the block-diagonal matrix of blocks `w` (N, out, in): one batched
        matrix product over the groups."""
        n = len(rows)
        by_group = rows.reshape(n, self.b.n, -1).transpose(1, 0, 2)  # (N, n, in)
        return np.matmul(by_group, w.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(n, -1)

    def _grouped_back(self, w, rows, d):
        """(gradient of the blocks, gradient of the rows) of `_grouped(w, rows)` given `d`."""
        n = len(rows)
        dg = d.reshape(n, self.b.n, -1).transpose(1, 0, 2)  # (N, n, out)
        rg = rows.reshape(n, self.b.n, -1).transpose(1, 0, 2)  # (N, n, in)
        d_rows = np.matmul(dg, w).transpose(1, 0, 2).reshape(n, -1)
        return np.matmul(dg.transpose(0, 2, 1), rg), d_rows

    def _branch(self, z, trained: bool, tape: list):
        for step, fixed in zip(self.steps, self.fixed):
            tape.append(z)
            if step.kind == "act":
                z = np.asarray(step.fn(z), self.dtype)
            elif trained:
                z = z * self.params["scale"] + self.params["shift"]
            else:
                z = z * fixed[0] + fixed[1]
        return z

    def _branch_back(self, d, trained: bool, tape: list, grads: dict):
        for i in reversed(range(len(self.steps))):
            step, z = self.steps[i], tape[i]
            if step.kind == "act":
                d = d * np.asarray(step.derivative(z), self.dtype)
            elif trained:
                grads["scale"] = np.sum(d * z, axis=0)
                grads["shift"] = np.sum(d, axis=0)
                d = d * self.params["scale"]
            else:
                d = d * self.fixed[i][0]
        return d

    def forward(self, rows):
        p, tape = self.params, {"x": rows, "k": [], "l": []}
        z = self._grouped(p["k"], rows)
        if "kb" in p:
            z = z + p["kb"]
        u = self._branch(z, False, tape["k"])
        mixed = u[:, self.b.perm]
        tape["mixed"] = mixed
        if not self.plan.has_l:
            return mixed, tape
        v = self._grouped(p["l"], mixed)
        if "lb" in p:
            v = v + p["lb"]
        trained = "scale" in p
        return u + self._branch(v, trained, tape["l"]), tape

    def backward(self, d_out, tape) -> dict:
        p, grads = self.params, {}
        if self.plan.has_l:
            dv = self._branch_back(d_out, "scale" in p, tape["l"], grads)
            if "lb" in p:
                grads["lb"] = dv.sum(0)
            grads["l"], d_mixed = self._grouped_back(p["l"], tape["mixed"], dv)
            du = d_out + d_mixed[:, self.inverse]
        else:
            du = d_out[:, self.inverse]
        dz = self._branch_back(du, False, tape["k"], grads)
        if "kb" in p:
            grads["kb"] = dz.sum(0)
        grads["k"], _ = self._grouped_back(p["k"], tape["x"], dz)
        return grads


class _Adam:
    """Adam (Keras' defaults) with a cosine decay of the learning rate over `total` steps,
    updating the arrays of `params` in place."""

    def __init__(self, params: dict, lr: float, total: int):
        self.params, self.lr, self.total, self.t = params, lr, total, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict) -> None:
        lr = self.lr * 0.5 * (1 + np.cos(np.pi * min(self.t, self.total) / self.total))
        self.t += 1
        for k, g in grads.items():
            self.m[k] = 0.9 * self.m[k] + 0.1 * g
            self.v[k] = 0.999 * self.v[k] + 0.001 * g * g
            m_hat = self.m[k] / (1 - 0.9**self.t)
            v_hat = self.v[k] / (1 - 0.999**self.t)
            self.params[k] -= lr * m_hat / (np.sqrt(v_hat) + 1e-7)


def _k_alone_rows(b: _Blocks, x, t, use_bias: bool):
    """K's blocks (and bias) fitted to `t` with nothing mixing the groups: per group, least
    squares of its outputs on its inputs."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    mean_x = x.mean(0) if use_bias else np.zeros(x.shape[1])
    mean_t = t.mean(0) if use_bias else np.zeros(t.shape[1])
    xc, tc = x - mean_x, t - mean_t
    cov = xc.T @ xc / len(x)
    cov += RIDGE * (np.trace(cov) / len(cov) + 1e-12) * np.eye(len(cov))
    kb = _k_alone(b, cov, tc.T @ xc / len(x))
    return kb, mean_t - b.full(kb) @ mean_x
