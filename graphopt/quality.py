"""How closely a rewritten model follows its original on the same inputs (docs/calibration.md).

An output holds class scores when its last axis (2 entries or more) holds probabilities (no
value below 0, each position summing to 1, as after a softmax) or log-probabilities (no value
above 0, each position's exponentials summing to 1, as after a log-softmax: CTC recognisers),
within 1e-3; or when the user names it (`scores`, the CLI's --scores). Raw logits cannot be
told from other values (a 2-D regression output looks the same), so they count as class scores
only when named. Such an output is compared by top-1 agreement per position; every output also
by relative L2 error and cosine similarity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FEW_HELD_OUT = 30  # with fewer held-out samples, a report says its figures say little


def few_held_out(samples: int) -> list[str]:
    """The report line that says the held-out figures rest on too few samples, if they do."""
    if samples >= FEW_HELD_OUT:
        return []
    noun = "sample" if samples == 1 else "samples"
    return [f"  only {samples} held-out {noun}: these figures say little ({FEW_HELD_OUT}+ needed)"]


@dataclass(frozen=True)
class OutputQuality:
    name: str
    agreement: float | None
    """Share of positions whose top-1 class is the original's (None: not class scores)."""
    relative_error: float
    cosine: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


def holds_scores(array: np.ndarray) -> bool:
    """Probabilities or log-probabilities on the last axis (see the module)."""
    if array.ndim < 2 or array.shape[-1] < 2 or not np.issubdtype(array.dtype, np.floating):
        return False
    rows = np.asarray(array, np.float64).reshape(-1, array.shape[-1])
    if not np.all(np.isfinite(rows)):
        return False
    if rows.min() >= 0:
        return bool(np.allclose(rows.sum(-1), 1.0, atol=1e-3))
    if rows.max() <= 1e-6:
        return bool(np.allclose(np.exp(rows).sum(-1), 1.0, atol=1e-3))
    return False


def compare(
    names: list[str],
    original: list[np.ndarray],
    rewritten: list[np.ndarray],
    scores: tuple[str, ...] = (),
):
    """One OutputQuality per output; outputs named in `scores` hold class scores."""
    out = []
    for name, a, b in zip(names, original, rewritten):
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        rel = float(np.linalg.norm(a64 - b64)) / (norm_a or 1.0)
        cos = float(a64 @ b64) / ((norm_a * norm_b) or 1.0)
        agreement, positions = None, int(np.asarray(a).shape[0])
        if name in scores or holds_scores(np.asarray(a)):
            top_a = np.argmax(a, axis=-1).ravel()
            top_b = np.argmax(b, axis=-1).ravel()
            agreement, positions = float(np.mean(top_a == top_b)), int(top_a.size)
        out.append(OutputQuality(name, agreement, round(rel, 6), round(cos, 6), positions))
    return out


def agreement(outputs: list[OutputQuality]) -> float | None:
    """The worst top-1 agreement over the outputs that hold class scores."""
    values = [o.agreement for o in outputs if o.agreement is not None]
    return min(values) if values else None


def output_error(outputs: list[OutputQuality]) -> float:
    """The worst relative L2 error over all outputs."""
    return max(o.relative_error for o in outputs)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose top-1 class is the label (a classifier's first output)."""
    return float(np.mean(np.argmax(outputs, axis=-1).ravel() == np.asarray(labels).ravel()))
