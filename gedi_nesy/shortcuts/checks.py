"""Checks of the metrics' inputs: label arrays, scores, probability rows, confusion matrices.

Torch tensors are accepted (detached and moved to the CPU). Bad input raises ``ValueError`` with a
one-line message saying what was given and what is allowed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "count_matrix",
    "label_array",
    "label_pair",
    "positive_count",
    "prob_rows",
    "score_array",
]

_PROB_SUM_ATOL = 1e-3


def as_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array.

    Args:
        x: an array-like; a torch tensor is detached and moved to the CPU first.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


def label_array(name: str, x: Any, n: int | None = None) -> np.ndarray:
    """A checked label array: 1-D, non-empty, integer.

    Args:
        name: the argument's name, for the message.
        x: the labels, (N,).
        n: when given, the labels must lie in [0, n).
    """
    a = as_array(x)
    if a.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D label array, got shape {a.shape}; "
            "pool positions with .reshape(-1) before calling"
        )
    if a.size == 0:
        raise ValueError(f"{name} is empty; pass at least one label")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer labels, got dtype {a.dtype}; "
            "pass class indices (e.g. probs.argmax(-1)), not probabilities"
        )
    if n is not None and (a.min() < 0 or a.max() >= n):
        raise ValueError(
            f"{name} has labels in [{a.min()}, {a.max()}], allowed [0, {n - 1}]; "
            f"fix the labels or raise the class count {n}"
        )
    return a


def label_pair(
    true: Any, pred: Any, n_true: int | None = None, n_pred: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Checked (true, pred) label arrays of equal length.

    Args:
        true: true labels, (N,), in [0, n_true) when n_true is given.
        pred: predicted labels or cluster ids, (N,), in [0, n_pred) when n_pred is given.
        n_true: number of true classes, or None.
        n_pred: number of predicted classes or clusters, or None.
    """
    t = label_array("true", true, n_true)
    p = label_array("pred", pred, n_pred)
    if t.shape != p.shape:
        raise ValueError(
            f"true and pred differ in length ({t.shape[0]} vs {p.shape[0]}); "
            "pass one prediction per label"
        )
    return t, p


def positive_count(name: str, n: int) -> int:
    """A checked class or cluster count, as an int.

    Args:
        name: the argument's name, for the message.
        n: the count; an int >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)


def score_array(name: str, x: Any) -> np.ndarray:
    """A checked float64 array of scores: 1-D, non-empty, finite.

    Args:
        name: the argument's name, for the message.
        x: the scores, (N,).
    """
    a = as_array(x).astype(np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; pass finite values")
    return a


def prob_rows(probs: Any) -> np.ndarray:
    """A checked float64 array of probability rows.

    Args:
        probs: (N, K), N, K >= 1, entries >= 0, rows summing to 1 (to 1e-3).
    """
    p = as_array(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty (N, K) array, got shape {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0.0:
        raise ValueError("probs has NaN, inf or negative entries; pass softmax outputs")
    row_sums = p.sum(axis=1)  # (N,)
    if np.abs(row_sums - 1.0).max() > _PROB_SUM_ATOL:
        raise ValueError(
            f"probs rows must sum to 1, got sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]; "
            "apply softmax to logits first"
        )
    return p


def count_matrix(matrix: Any) -> np.ndarray:
    """A checked float64 confusion matrix.

    Args:
        matrix: (K, K) counts >= 0, K >= 1, rows = true, cols = predicted.
    """
    m = as_array(matrix).astype(np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[0] != m.shape[1]:
        raise ValueError(
            f"matrix must be a square (K, K) confusion matrix, got shape {m.shape}; "
            "build it with confusion_matrix(true, pred, k, k)"
        )
    if not np.isfinite(m).all() or m.min() < 0.0:
        raise ValueError("matrix has NaN, inf or negative entries; pass counts")
    return m
