"""Sinkhorn-Knopp balanced assignments, as used by the SwAV-style baseline (Caron et al., 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    *,
    epsilon: float = 0.05,
    n_iters: int = 3,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """Soft assignments of B samples to K prototypes with equal cluster mass (SwAV, Alg. 1).

    Solves the entropic optimal-transport problem ``max_Q Tr(Q^T S) + epsilon H(Q)`` with uniform
    marginals: every sample carries mass 1/B and every cluster 1/K. Computed in log space, so large
    scores or a small epsilon cannot overflow.

    Args:
        scores: prototype scores S, shape (B, K).
        epsilon: entropic regularisation; smaller is closer to a hard assignment.
        n_iters: number of row/column normalisation rounds.
        all_reduce: sums a tensor across workers (identity on one process).

    Returns:
        Assignments Q, shape (B, K); each row sums to 1 and each column to about B/K.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    log_q = (scores.float() / epsilon).t()  # (K, B); Q is K-by-B as in the SwAV paper
    b = torch.tensor(float(scores.shape[0]), device=scores.device)
    b = all_reduce(b)  # total number of samples across workers
    k = log_q.shape[0]
    log_q = log_q - _global_logsumexp(log_q, all_reduce)  # total mass 1
    for _ in range(n_iters):
        # rows: each prototype gets total mass 1/K
        row = _row_logsumexp(log_q, all_reduce)  # (K, 1)
        log_q = log_q - row - torch.log(torch.tensor(float(k), device=scores.device))
        # columns: each sample gets total mass 1/B
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - torch.log(b)
    return (log_q + torch.log(b)).exp().t()  # (B, K), rows sum to 1


def _global_logsumexp(
    log_q: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """logsumexp over all entries of ``log_q`` (K, B), summed over workers; a scalar."""
    m = log_q.max()
    return m + torch.log(all_reduce(torch.exp(log_q - m).sum()))


def _row_logsumexp(
    log_q: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Row-wise logsumexp of ``log_q`` (K, B), summed over workers; shape (K, 1)."""
    m = log_q.max(dim=1, keepdim=True).values  # (K, 1)
    s = all_reduce(torch.exp(log_q - m).sum(dim=1, keepdim=True))  # (K, 1)
    return m + torch.log(s)
