"""Evaluation metrics: reasoning shortcuts (concept metrics of NeSy tasks) and, from
:mod:`gedi_nesy.shortcuts.clustering`, clustering quality (standalone GEDI).

Every function is pure and takes numpy arrays; torch tensors are accepted too (moved to the CPU and
converted with ``np.asarray``). Label arrays are 1-D integer arrays; concept labels of several
positions (e.g. both digits of a pair) are pooled by the caller with ``.reshape(-1)``. Bad input
(empty arrays, mismatched shapes, labels out of range) raises ``ValueError`` with a one-line
message (:mod:`gedi_nesy.shortcuts.checks`).

Definitions follow rsbench (Bortolotti et al., 2024); formulas, function names and report keys
are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import entr
from sklearn import metrics as skm

from gedi_nesy.shortcuts.checks import (
    count_matrix,
    label_array,
    label_pair,
    positive_count,
    prob_rows,
    score_array,
)
from gedi_nesy.shortcuts.clustering import (
    ari,
    cluster_usage,
    clustering_accuracy,
    clustering_report,
    confusion_matrix,
    hungarian_mapping,
    mapped_accuracy,
    n_used_clusters,
    nmi,
    ood_auroc,
)

__all__ = [
    "accuracy",
    "ari",
    "cluster_usage",
    "clustering_accuracy",
    "clustering_report",
    "CONCEPT_LABEL_METRICS",
    "concept_ece",
    "concept_report",
    "confusion_matrix",
    "hard_concept_collapse",
    "hungarian_mapping",
    "implemented_concept_map",
    "is_intended_map",
    "macro_f1",
    "mapped_accuracy",
    "mean_normalized_entropy",
    "mean_per_class_accuracy",
    "n_used_clusters",
    "nmi",
    "ood_auroc",
    "per_class_accuracy",
    "reads_concept_labels",
    "rs_rate",
    "soft_concept_collapse",
    "weighted_f1",
]

# The keys of :func:`concept_report` whose values read the true concept labels; the others
# (``entropy_c``, ``collapse_hard``) depend on the predictions alone.
CONCEPT_LABEL_METRICS = frozenset({
    "acc_c", "acc_c_matched", "nmi_c", "f1_c_macro", "f1_c_weighted", "acc_c_per_class",
    "acc_c_per_class_mean", "collapse_soft", "ece_c", "ece_c_matched", "concept_map",
    "concept_map_is_intended",
})  # fmt: skip


def reads_concept_labels(key: str) -> bool:
    """Whether a run metric (a key of ``metrics.json``) reads concept labels: a
    :data:`CONCEPT_LABEL_METRICS` key, also with the out-of-distribution prefix ``ood_`` and a
    network prefix (``ood_digit_net.acc_c``). Model selection must not read such a metric."""
    return key.removeprefix("ood_").rpartition(".")[2] in CONCEPT_LABEL_METRICS


def accuracy(true: Any, pred: Any) -> float:
    """Raw accuracy: Acc(Y) for task labels, Acc(C) for pooled concept labels (no matching).

    Args:
        true: true labels, shape (N,).
        pred: predicted labels, shape (N,).

    Returns:
        Fraction of positions where pred equals true, in [0, 1].
    """
    t, p = label_pair(true, pred)
    return float(np.mean(t == p))


def macro_f1(true: Any, pred: Any) -> float:
    """Macro F1: F1(Y) for task labels, macro F1(C) for pooled concept labels.

    The mean of per-class F1 over the classes that occur in ``true`` or ``pred``
    (``sklearn.metrics.f1_score``, ``average="macro"``); an undefined precision or recall (a class
    never predicted, or never true) counts as 0.

    Args:
        true: true labels, shape (N,).
        pred: predicted labels, shape (N,).

    Returns:
        Macro F1 in [0, 1].
    """
    t, p = label_pair(true, pred)
    return float(skm.f1_score(t, p, average="macro", zero_division=0))


def weighted_f1(true: Any, pred: Any) -> float:
    """Support-weighted F1: weighted F1(C) for pooled concept labels.

    Per-class F1 averaged with weights #{n : true_n = i} / N (``average="weighted"``); an
    undefined precision or recall counts as 0.

    Args:
        true: true labels, shape (N,).
        pred: predicted labels, shape (N,).

    Returns:
        Weighted F1 in [0, 1].
    """
    t, p = label_pair(true, pred)
    return float(skm.f1_score(t, p, average="weighted", zero_division=0))


def per_class_accuracy(matrix: Any) -> np.ndarray:
    """Per-class concept accuracy (recall of each true class) from a confusion matrix.

    Args:
        matrix: confusion matrix M, shape (K, K), rows = true, cols = predicted.

    Returns:
        Float array, shape (K,): M_ii / sum_j M_ij, NaN for classes with no true sample.
    """
    m = count_matrix(matrix)  # (K, K)
    support = m.sum(axis=1)  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)  # (K,)


def mean_per_class_accuracy(matrix: Any) -> float:
    """Mean per-class concept accuracy (balanced accuracy) over the classes present in the data.

    Args:
        matrix: confusion matrix M, shape (K, K), rows = true, cols = predicted.

    Returns:
        Mean of :func:`per_class_accuracy` over the rows with at least one sample, in [0, 1].
    """
    m = count_matrix(matrix)
    if m.sum() == 0:
        raise ValueError("matrix has no samples (all counts are 0); pass a non-empty matrix")
    return float(np.nanmean(per_class_accuracy(m)))


def hard_concept_collapse(matrix: Any) -> float:
    """Hard concept collapse (rsbench): the fraction of concept values never predicted.

    Cls_hard = 1 - (1/K) #{j : max_i M_ij >= 1}.

    Args:
        matrix: confusion matrix M of counts, shape (K, K), rows = true, cols = predicted.

    Returns:
        Collapse in [0, 1 - 1/K]; 0 when every value is predicted at least once.
    """
    m = count_matrix(matrix)  # (K, K)
    used = m.max(axis=0) >= 1  # (K,) column j is predicted at least once
    return float(1.0 - used.sum() / m.shape[1])


def soft_concept_collapse(matrix: Any) -> float:
    """Soft concept collapse (rsbench): 1 minus the mean over columns of the best row share.

    Cls_soft = 1 - (1/K) sum_j min(1, max_i Mhat_ij), Mhat_ij = M_ij / sum_j' M_ij' (row-normalised;
    a row with no samples stays 0).

    Args:
        matrix: confusion matrix M of counts, shape (K, K), rows = true, cols = predicted.

    Returns:
        Collapse in [0, 1 - 1/K]; 0 for any permutation of a perfect classifier.
    """
    m = count_matrix(matrix)  # (K, K)
    support = m.sum(axis=1, keepdims=True)  # (K, 1)
    m_hat = np.divide(m, support, out=np.zeros_like(m), where=support > 0)  # (K, K) Mhat
    return float(1.0 - np.minimum(1.0, m_hat.max(axis=0)).sum() / m.shape[1])


def concept_ece(probs: Any, true: Any, n_bins: int = 10) -> float:
    """Expected calibration error of the concept predictions, with equal-width bins.

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, where the prediction is argmax_k p_k, its
    confidence max_k p_k, and bin b holds confidences in (b/n_bins, (b+1)/n_bins] (bin 0 also
    holds 0).

    Args:
        probs: concept probabilities, shape (N, K), rows summing to 1.
        true: true concept labels, shape (N,), values in [0, K).
        n_bins: number of equal-width confidence bins over [0, 1].

    Returns:
        ECE in [0, 1].
    """
    p = prob_rows(probs)  # (N, K)
    t = label_array("true", true, p.shape[1])
    if t.size != p.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows but true has {t.size} labels; pass one each")
    n_bins = positive_count("n_bins", n_bins)
    conf = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == t).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # (n_bins + 1,)
    bins = np.searchsorted(edges[1:-1], conf, side="left")  # (N,) b with conf in (e_b, e_b+1]
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)  # (n_bins,) |B_b| acc(B_b)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)  # (n_bins,) |B_b| conf(B_b)
    # |B_b|/N * |acc(B_b) - conf(B_b)| = |sum_{n in B_b} correct_n - sum_{n in B_b} conf_n| / N
    return float(np.abs(acc_sum - conf_sum).sum() / t.size)


def mean_normalized_entropy(probs: Any) -> float:
    """Mean normalised entropy of the concept distributions: mean_n H(p_n) / log K.

    Args:
        probs: concept probabilities, shape (N, K) with K >= 2, rows summing to 1.

    Returns:
        Value in [0, 1]; 0 for one-hot predictions, 1 for uniform ones.
    """
    p = prob_rows(probs)  # (N, K)
    if p.shape[1] < 2:
        raise ValueError(f"entropy needs K >= 2 concept values, got probs of shape {p.shape}")
    h = entr(p).sum(axis=1)  # (N,) H(p_n) in nats, 0 log 0 = 0
    return float(np.mean(h / np.log(p.shape[1])))


def implemented_concept_map(matrix: Any) -> tuple[int, ...]:
    """The deterministic concept map the model implements: argmax of each true class's row.

    Ties go to the lowest predicted value; a true class with no samples maps to -1.

    Args:
        matrix: confusion matrix M, shape (K, K), rows = true, cols = predicted.

    Returns:
        Tuple of K ints: entry i is the value most often predicted for true value i.
    """
    m = count_matrix(matrix)  # (K, K)
    best = np.where(m.sum(axis=1) > 0, m.argmax(axis=1), -1)  # (K,)
    return tuple(int(v) for v in best)


def is_intended_map(implemented: Sequence[int], intended: Sequence[int] | None = None) -> bool:
    """Whether an implemented concept map equals the intended one.

    Args:
        implemented: map from :func:`implemented_concept_map`, length K.
        intended: the intended map, length K; defaults to the identity (0, 1, ..., K-1).

    Returns:
        True when the two maps agree on every true value.
    """
    target = tuple(range(len(implemented))) if intended is None else tuple(intended)
    if len(target) != len(implemented):
        raise ValueError(
            f"intended map has {len(target)} entries but implemented has {len(implemented)}; "
            "pass one target value per concept value"
        )
    return tuple(int(v) for v in implemented) == tuple(int(v) for v in target)


def rs_rate(
    task_acc_id: Any,
    concept_acc: Any,
    *,
    task_threshold: float = 0.9,
    concept_threshold: float = 0.9,
) -> float:
    """Reasoning-shortcut rate across seeds (ours; no field standard).

    The fraction of seeds with ID Acc(Y) >= task_threshold and raw Acc(C) < concept_threshold.

    Args:
        task_acc_id: in-distribution task accuracy of each seed, shape (S,), values in [0, 1].
        concept_acc: raw concept accuracy of each seed, shape (S,), values in [0, 1].
        task_threshold: Acc(Y) at or above which the task counts as solved.
        concept_threshold: Acc(C) below which the concepts count as wrong.

    Returns:
        Fraction of seeds in [0, 1].
    """
    acc_y = score_array("task_acc_id", task_acc_id)  # (S,)
    acc_c = score_array("concept_acc", concept_acc)  # (S,)
    if acc_y.shape != acc_c.shape:
        raise ValueError(
            f"task_acc_id has {acc_y.size} seeds but concept_acc has {acc_c.size}; "
            "pass one value per seed in both"
        )
    if min(acc_y.min(), acc_c.min()) < 0.0 or max(acc_y.max(), acc_c.max()) > 1.0:
        raise ValueError("accuracies must lie in [0, 1]; pass fractions, not percentages")
    return float(np.mean((acc_y >= task_threshold) & (acc_c < concept_threshold)))


def concept_report(
    true: Any,
    pred: Any,
    probs: Any,
    k: int,
    *,
    intended: Sequence[int] | None = None,
) -> dict[str, float | list]:
    """All concept metrics of one evaluation, with stable key names (see ``docs/metrics.md``).

    Args:
        true: true concept labels, positions pooled, shape (N,), values in [0, k).
        pred: predicted concept labels, shape (N,), values in [0, k).
        probs: concept probabilities, shape (N, k); used for ECE and entropy.
        k: number of concept values.
        intended: intended concept map for ``concept_map_is_intended``; default identity.

    Returns:
        Dict with floats ``acc_c``, ``acc_c_matched``, ``nmi_c``, ``f1_c_macro``,
        ``f1_c_weighted``, ``acc_c_per_class_mean``, ``collapse_hard``, ``collapse_soft``,
        ``ece_c``, ``ece_c_matched`` (ECE with the concept values renamed by
        :func:`hungarian_mapping`, for tasks that admit several bijective maps), ``entropy_c``,
        ``concept_map_is_intended`` (1.0 or 0.0), and lists
        ``acc_c_per_class`` (k floats, NaN for absent classes) and ``concept_map`` (k ints).
    """
    m = confusion_matrix(true, pred, k, k)  # (k, k)
    p = prob_rows(probs)  # (N, k)
    if p.shape != (m.sum(), k):
        raise ValueError(f"probs must have shape ({m.sum()}, {k}), got {p.shape}")
    concept_map = implemented_concept_map(m)
    matched = hungarian_mapping(true, pred, k, k)  # (k,): the true value of each predicted value
    return {
        "acc_c": accuracy(true, pred),
        "acc_c_matched": mapped_accuracy(true, pred, matched),  # clustering_accuracy
        "nmi_c": nmi(true, pred),
        "f1_c_macro": macro_f1(true, pred),
        "f1_c_weighted": weighted_f1(true, pred),
        "acc_c_per_class": per_class_accuracy(m).tolist(),
        "acc_c_per_class_mean": mean_per_class_accuracy(m),
        "collapse_hard": hard_concept_collapse(m),
        "collapse_soft": soft_concept_collapse(m),
        "ece_c": concept_ece(p, true),
        "ece_c_matched": concept_ece(p[:, np.argsort(matched)], true),
        "entropy_c": mean_normalized_entropy(p),
        "concept_map": list(concept_map),
        "concept_map_is_intended": float(is_intended_map(concept_map, intended)),
    }
