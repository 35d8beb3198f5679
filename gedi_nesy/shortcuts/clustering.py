"""Clustering metrics (standalone GEDI, and the matched concept accuracy) and OOD detection.

Every function is pure and takes numpy arrays or torch tensors (checked by
:mod:`gedi_nesy.shortcuts.checks`). Formulas and report keys are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from gedi_nesy.shortcuts.checks import label_array, label_pair, positive_count, score_array

__all__ = [
    "ari",
    "cluster_usage",
    "clustering_accuracy",
    "clustering_report",
    "confusion_matrix",
    "hungarian_mapping",
    "mapped_accuracy",
    "n_used_clusters",
    "nmi",
    "ood_auroc",
]


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
    n_true, n_pred = positive_count("n_true", n_true), positive_count("n_pred", n_pred)
    t, p = label_pair(true, pred, n_true, n_pred)
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
    return mapped_accuracy(true, pred, hungarian_mapping(true, pred, n_true, n_pred))


def mapped_accuracy(true: Any, pred: Any, mapping: np.ndarray) -> float:
    """Accuracy after renaming each cluster id ``c`` to ``mapping[c]`` (e.g. the map of
    :func:`hungarian_mapping`, computed once by a caller that also needs it).

    Args:
        true: true labels, shape (N,).
        pred: cluster ids, shape (N,), values in [0, len(mapping)).
        mapping: the label of each cluster, shape (n_pred,); -1 never counts correct.

    Returns:
        Fraction of samples whose mapped cluster label equals the true label, in [0, 1].
    """
    t, p = label_pair(true, pred)
    return float(np.mean(mapping[p] == t))


def nmi(true: Any, pred: Any) -> float:
    """Normalised mutual information (arithmetic normalisation, sklearn's default).

    Args:
        true: true labels, shape (N,).
        pred: predicted labels or cluster ids, shape (N,).

    Returns:
        NMI in [0, 1]; invariant to relabelling of either side.
    """
    t, p = label_pair(true, pred)
    return float(skm.normalized_mutual_info_score(t, p))


def ari(true: Any, pred: Any) -> float:
    """Adjusted Rand index.

    Args:
        true: true labels, shape (N,).
        pred: predicted labels or cluster ids, shape (N,).

    Returns:
        ARI in [-0.5, 1]; 1 for identical partitions, about 0 for random ones.
    """
    t, p = label_pair(true, pred)
    return float(skm.adjusted_rand_score(t, p))


def cluster_usage(pred: Any, k: int) -> np.ndarray:
    """Fraction of samples assigned to each cluster.

    Args:
        pred: cluster ids, shape (N,), values in [0, k).
        k: number of clusters.

    Returns:
        Float array, shape (k,), summing to 1.
    """
    k = positive_count("k", k)
    p = label_array("pred", pred, k)
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
    s_in, s_out = score_array("score_in", score_in), score_array("score_out", score_out)
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
