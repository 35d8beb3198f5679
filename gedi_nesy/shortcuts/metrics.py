"""Evaluation metrics: clustering quality (standalone GEDI) and reasoning shortcuts (NeSy tasks).

Every function is pure and takes numpy arrays; torch tensors are accepted too (moved to the CPU and
converted with ``np.asarray``). Label arrays are 1-D integer arrays; concept labels of several
positions (e.g. both digits of a pair) are pooled by the caller with ``.reshape(-1)``. Bad input
(empty arrays, mismatched shapes, labels out of range) raises ``ValueError`` with a one-line
message.

Definitions follow ``shortcuts.md`` ("Metrics") and rsbench (Bortolotti et al., 2024); formulas,
function names and report keys are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import entr
from sklearn import metrics as skm

# float32 softmax rows sum to 1 within ~1e-6; this tolerance only rejects non-probabilities
_PROB_SUM_ATOL = 1e-3


def _as_array(x: Any) -> np.ndarray:
    """Returns ``x`` as a numpy array; a torch tensor is detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


def _labels(name: str, x: Any, n: int | None = None) -> np.ndarray:
    """Validates a 1-D, non-empty integer label array, with values in [0, n) when n is given."""
    a = _as_array(x)
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


def _pair(
    true: Any, pred: Any, n_true: int | None = None, n_pred: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validates a (true, pred) pair of label arrays of equal length."""
    t = _labels("true", true, n_true)
    p = _labels("pred", pred, n_pred)
    if t.shape != p.shape:
        raise ValueError(
            f"true and pred differ in length ({t.shape[0]} vs {p.shape[0]}); "
            "pass one prediction per label"
        )
    return t, p


def _count(name: str, n: int) -> int:
    """Validates a class or cluster count."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)


def _scores(name: str, x: Any) -> np.ndarray:
    """Validates a 1-D, non-empty, finite array of real values."""
    a = _as_array(x).astype(np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; pass finite values")
    return a


def _probs(probs: Any) -> np.ndarray:
    """Validates an (N, K) array of probability rows."""
    p = _as_array(probs).astype(np.float64)
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


def _matrix(matrix: Any) -> np.ndarray:
    """Validates a square, non-empty, non-negative confusion matrix (rows = true)."""
    m = _as_array(matrix).astype(np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[0] != m.shape[1]:
        raise ValueError(
            f"matrix must be a square (K, K) confusion matrix, got shape {m.shape}; "
            "build it with confusion_matrix(true, pred, k, k)"
        )
    if not np.isfinite(m).all() or m.min() < 0.0:
        raise ValueError("matrix has NaN, inf or negative entries; pass counts")
    return m


# ---------------------------------------------------------------------------------------------
# Clustering (standalone GEDI)
# ---------------------------------------------------------------------------------------------


def confusion_matrix(true: Any, pred: Any, n_true: int, n_pred: int) -> np.ndarray:
    """Counts of each (true label, predicted label or cluster) pair.

    Args:
        true: true labels, shape (N,), values in [0, n_true).
        pred: predicted labels or cluster ids, shape (N,), values in [0, n_pred).
        n_true: number of true classes (rows).
        n_pred: number of predicted classes or clusters (columns).

    Returns:
        Integer matrix M, shape (n_true, n_pred); M[i, j] = #{n : true_n = i and pred_n = j}.
    """
    n_true, n_pred = _count("n_true", n_true), _count("n_pred", n_pred)
    t, p = _pair(true, pred, n_true, n_pred)
    flat = np.bincount(t * n_pred + p, minlength=n_true * n_pred)  # (n_true * n_pred,)
    return flat.reshape(n_true, n_pred).astype(np.int64)  # (n_true, n_pred)


def hungarian_mapping(true: Any, pred: Any, n_true: int, n_pred: int) -> np.ndarray:
    """One-to-one cluster -> label assignment that maximises the number of matches.

    Solved with ``scipy.optimize.linear_sum_assignment`` on the confusion matrix. With more
    clusters than labels, the clusters left without a label map to -1 (never counted correct);
    with fewer, some labels receive no cluster.

    Args:
        true: true labels, shape (N,), values in [0, n_true).
        pred: cluster ids, shape (N,), values in [0, n_pred).
        n_true: number of true classes.
        n_pred: number of clusters.

    Returns:
        Integer array, shape (n_pred,): the label of each cluster, or -1 for unmatched clusters.
    """
    m = confusion_matrix(true, pred, n_true, n_pred)  # (n_true, n_pred)
    clusters, labels = linear_sum_assignment(m.T, maximize=True)  # min(n_true, n_pred) pairs
    mapping = np.full(n_pred, -1, dtype=np.int64)  # (n_pred,)
    mapping[clusters] = labels
    return mapping


def clustering_accuracy(true: Any, pred: Any, n_true: int, n_pred: int | None = None) -> float:
    """Accuracy after relabelling clusters with :func:`hungarian_mapping` (Hungarian-matched Acc).

    Args:
        true: true labels, shape (N,), values in [0, n_true).
        pred: cluster ids, shape (N,), values in [0, n_pred).
        n_true: number of true classes.
        n_pred: number of clusters; defaults to ``n_true``.

    Returns:
        Fraction of samples whose matched cluster label equals the true label, in [0, 1].
    """
    n_pred = n_true if n_pred is None else n_pred
    mapping = hungarian_mapping(true, pred, n_true, n_pred)  # (n_pred,)
    t, p = _pair(true, pred)
    return float(np.mean(mapping[p] == t))


def nmi(true: Any, pred: Any) -> float:
    """Normalised mutual information (arithmetic normalisation, sklearn's default).

    Args:
        true: true labels, shape (N,).
        pred: predicted labels or cluster ids, shape (N,).

    Returns:
        NMI in [0, 1]; invariant to relabelling of either side.
    """
    t, p = _pair(true, pred)
    return float(skm.normalized_mutual_info_score(t, p))


def ari(true: Any, pred: Any) -> float:
    """Adjusted Rand index.

    Args:
        true: true labels, shape (N,).
        pred: predicted labels or cluster ids, shape (N,).

    Returns:
        ARI in [-0.5, 1]; 1 for identical partitions, about 0 for random ones.
    """
    t, p = _pair(true, pred)
    return float(skm.adjusted_rand_score(t, p))


def cluster_usage(pred: Any, k: int) -> np.ndarray:
    """Fraction of samples assigned to each cluster.

    Args:
        pred: cluster ids, shape (N,), values in [0, k).
        k: number of clusters.

    Returns:
        Float array, shape (k,), summing to 1.
    """
    k = _count("k", k)
    p = _labels("pred", pred, k)
    return np.bincount(p, minlength=k) / p.size  # (k,)


def n_used_clusters(pred: Any, k: int) -> int:
    """Number of clusters that receive at least one sample.

    Args:
        pred: cluster ids, shape (N,), values in [0, k).
        k: number of clusters.

    Returns:
        Count in [1, k].
    """
    return int(np.count_nonzero(cluster_usage(pred, k)))


def ood_auroc(score_in: Any, score_out: Any) -> float:
    """AUROC of telling in-distribution from out-of-distribution samples by a score.

    Args:
        score_in: scores of in-distribution samples, shape (N_in,); higher = more in-distribution
            (e.g. the negative energy, logsumexp of the logits).
        score_out: scores of out-of-distribution samples, shape (N_out,).

    Returns:
        AUROC in [0, 1] (``sklearn.metrics.roc_auc_score``, in = positive class); 1 when every
        in-distribution score is above every out-of-distribution score, 0.5 for chance.
    """
    s_in, s_out = _scores("score_in", score_in), _scores("score_out", score_out)
    y = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])  # (N_in + N_out,)
    return float(skm.roc_auc_score(y, np.concatenate([s_in, s_out])))


def clustering_report(true: Any, pred: Any, k: int) -> dict[str, float | list]:
    """Clustering metrics of k clusters against k true classes, with stable key names.

    Args:
        true: true labels, shape (N,), values in [0, k).
        pred: cluster ids, shape (N,), values in [0, k).
        k: number of classes and of clusters.

    Returns:
        Dict with ``cluster_acc`` (Hungarian-matched), ``cluster_nmi``, ``cluster_ari``,
        ``cluster_usage`` (list of k fractions) and ``n_used_clusters``.
    """
    return {
        "cluster_acc": clustering_accuracy(true, pred, k, k),
        "cluster_nmi": nmi(true, pred),
        "cluster_ari": ari(true, pred),
        "cluster_usage": cluster_usage(pred, k).tolist(),
        "n_used_clusters": n_used_clusters(pred, k),
    }


# ---------------------------------------------------------------------------------------------
# Reasoning shortcuts (shortcuts.md, "Metrics")
# ---------------------------------------------------------------------------------------------


def accuracy(true: Any, pred: Any) -> float:
    """Raw accuracy: Acc(Y) for task labels, Acc(C) for pooled concept labels (no matching).

    Args:
        true: true labels, shape (N,).
        pred: predicted labels, shape (N,).

    Returns:
        Fraction of positions where pred equals true, in [0, 1].
    """
    t, p = _pair(true, pred)
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
    t, p = _pair(true, pred)
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
    t, p = _pair(true, pred)
    return float(skm.f1_score(t, p, average="weighted", zero_division=0))


def per_class_accuracy(matrix: Any) -> np.ndarray:
    """Per-class concept accuracy (recall of each true class) from a confusion matrix.

    Args:
        matrix: confusion matrix M, shape (K, K), rows = true, cols = predicted.

    Returns:
        Float array, shape (K,): M_ii / sum_j M_ij, NaN for classes with no true sample.
    """
    m = _matrix(matrix)  # (K, K)
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
    m = _matrix(matrix)
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
    m = _matrix(matrix)  # (K, K)
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
    m = _matrix(matrix)  # (K, K)
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
    p = _probs(probs)  # (N, K)
    t = _labels("true", true, p.shape[1])
    if t.size != p.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows but true has {t.size} labels; pass one each")
    n_bins = _count("n_bins", n_bins)
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
    p = _probs(probs)  # (N, K)
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
    m = _matrix(matrix)  # (K, K)
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
    acc_y = _scores("task_acc_id", task_acc_id)  # (S,)
    acc_c = _scores("concept_acc", concept_acc)  # (S,)
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
        ``ece_c``, ``entropy_c``, ``concept_map_is_intended`` (1.0 or 0.0), and lists
        ``acc_c_per_class`` (k floats, NaN for absent classes) and ``concept_map`` (k ints).
    """
    m = confusion_matrix(true, pred, k, k)  # (k, k)
    p = _probs(probs)  # (N, k)
    if p.shape != (m.sum(), k):
        raise ValueError(f"probs must have shape ({m.sum()}, {k}), got {p.shape}")
    concept_map = implemented_concept_map(m)
    return {
        "acc_c": accuracy(true, pred),
        "acc_c_matched": clustering_accuracy(true, pred, k, k),
        "nmi_c": nmi(true, pred),
        "f1_c_macro": macro_f1(true, pred),
        "f1_c_weighted": weighted_f1(true, pred),
        "acc_c_per_class": per_class_accuracy(m).tolist(),
        "acc_c_per_class_mean": mean_per_class_accuracy(m),
        "collapse_hard": hard_concept_collapse(m),
        "collapse_soft": soft_concept_collapse(m),
        "ece_c": concept_ece(p, true),
        "entropy_c": mean_normalized_entropy(p),
        "concept_map": list(concept_map),
        "concept_map_is_intended": float(is_intended_map(concept_map, intended)),
    }
