"""GEDI's objective and the SwAV-style baseline loss, as pure functions.

Notation follows ../docs/gedi-spec.md: cluster logits ``z(x)`` (B, K), posterior ``p(y|x) =
softmax(z(x))``, energy ``E(x) = -logsumexp_y z_y(x)``. Each function returns one term; the caller
weights them, sums them and logs every part (:class:`GediLoss`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gedi_nesy.gedi.sinkhorn import sinkhorn


class GediLoss(NamedTuple):
    """Unweighted parts of the GEDI objective (each a scalar tensor; 0 when switched off)."""

    gen: torch.Tensor  # L_GEN: mean E(x) - mean E(x~)
    energy_reg: torch.Tensor  # mean E(x)^2 + mean E(x~)^2
    inv: torch.Tensor  # L_INV: cross-entropy between the two views' posteriors
    prior: torch.Tensor  # L_PRIOR: -sum_y pi_y log(mean_i p(y|x_i)), scaled to K * CE
    swav: torch.Tensor  # SwAV swapped-prediction loss (baseline only)


class GediWeights(NamedTuple):
    """Weights of the parts of :class:`GediLoss`."""

    gen: float = 1.0
    energy_reg: float = 0.0
    inv: float = 1.0
    prior: float = 1.0
    swav: float = 0.0


def weighted_total(parts: GediLoss, weights: GediWeights) -> torch.Tensor:
    """``sum_k w_k * L_k`` over the parts; parts with weight 0 are skipped (even if NaN)."""
    total = parts.gen.new_zeros(())
    for value, w in zip(parts, weights):
        if w != 0.0:
            total = total + w * value
    return total


def active_parts(parts: GediLoss, weights: GediWeights) -> dict[str, float]:
    """The values of the parts with a non-zero weight, as floats for logging."""
    return {
        name: float(value.detach())
        for name, value, w in zip(GediLoss._fields, parts, weights)
        if w != 0.0
    }


def generative_loss(e_data: torch.Tensor, e_sample: torch.Tensor) -> torch.Tensor:
    """L_GEN, contrastive-divergence estimate of the energy model's negative log-likelihood.

    Args:
        e_data: energies of data points E(x_i), shape (B,).
        e_sample: energies of (detached) SGLD samples E(x~_j), shape (M,).

    Returns:
        ``mean_i E(x_i) - mean_j E(x~_j)``, a scalar.
    """
    return e_data.mean() - e_sample.mean()


def energy_penalty(e_data: torch.Tensor, e_sample: torch.Tensor) -> torch.Tensor:
    """Energy-magnitude penalty ``mean E(x)^2 + mean E(x~)^2``; stabilises JEM-style runs."""
    return e_data.pow(2).mean() + e_sample.pow(2).mean()


def invariance_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, *, symmetric: bool = False
) -> torch.Tensor:
    """L_INV: ``mean_i CE(target = softmax(z(x''_i)), pred = log_softmax(z(x'_i)))``.

    Gradients flow through both views (no stop-gradient).

    Args:
        logits_a: logits of the first view z(x'), shape (B, K).
        logits_b: logits of the second view z(x''), shape (B, K).
        symmetric: average with the loss of the views swapped.

    Returns:
        A scalar.
    """
    ce = -(F.softmax(logits_b, -1) * F.log_softmax(logits_a, -1)).sum(-1).mean()  # (B, K) -> ()
    if not symmetric:
        return ce
    ce_ba = -(F.softmax(logits_a, -1) * F.log_softmax(logits_b, -1)).sum(-1).mean()
    return 0.5 * (ce + ce_ba)


def log_batch_marginal(logits: torch.Tensor) -> torch.Tensor:
    """``log mean_i p(y|x_i)`` of a batch of logits (B, K), shape (K,), computed in log space."""
    return torch.logsumexp(F.log_softmax(logits, -1), dim=0) - math.log(len(logits))


def prior_loss(logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """L_PRIOR: ``-K sum_y pi_y log(mean_i p(y|x_i))``; with a uniform pi this is the spec's
    ``-sum_y log(mean_i p(y|x_i))``, minimal (``K log K``) iff the batch marginal is uniform.

    Args:
        logits: cluster logits, shape (B, K).
        target: the marginal pi to match, shape (K,), summing to 1; None for uniform.

    Returns:
        A scalar; ``K * KL(pi || batch marginal) + K * H(pi)``.
    """
    k = logits.shape[-1]
    log_marginal = log_batch_marginal(logits)  # (K,)
    if target is None:
        return -log_marginal.sum()
    return -k * (target.to(log_marginal) * log_marginal).sum()


def marginal_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_H of the reasoning-shortcut literature: ``1 - H(mean_i p(y|x_i)) / log K``.

    A baseline mitigation (not part of GEDI): 0 when the batch marginal is uniform, 1 when every
    sample puts all its mass on one class.

    Args:
        logits: concept logits of the (clean) batch, shape (B, K).

    Returns:
        A scalar in [0, 1].
    """
    k = logits.shape[-1]
    log_marginal = log_batch_marginal(logits)  # (K,)
    entropy = -(log_marginal.exp() * log_marginal).sum()  # H of the batch marginal
    return 1.0 - entropy / math.log(k)


def swav_loss(
    scores_a: torch.Tensor,
    scores_b: torch.Tensor,
    *,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    n_iters: int = 3,
) -> torch.Tensor:
    """SwAV swapped prediction: each view predicts the other's Sinkhorn codes.

    Args:
        scores_a: prototype scores of view 1 (cosine similarities), shape (B, K).
        scores_b: prototype scores of view 2, shape (B, K).
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn entropic regularisation (codes computed without gradient).
        n_iters: Sinkhorn iterations.

    Returns:
        ``-1/2 mean_i [q_b . log p_a + q_a . log p_b]``, a scalar.
    """
    q_a = sinkhorn(scores_a, epsilon=epsilon, n_iters=n_iters)  # (B, K), no grad
    q_b = sinkhorn(scores_b, epsilon=epsilon, n_iters=n_iters)  # (B, K), no grad
    log_p_a = F.log_softmax(scores_a / temperature, -1)  # (B, K)
    log_p_b = F.log_softmax(scores_b / temperature, -1)  # (B, K)
    return -0.5 * ((q_b * log_p_a).sum(-1) + (q_a * log_p_b).sum(-1)).mean()
