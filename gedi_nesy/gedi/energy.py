"""Energy of a GEDI network from its cluster logits (JEM form).

With cluster logits ``z(x)`` of shape (B, K), GEDI defines ``p(x, y) ∝ exp(z_y(x))`` and hence the
marginal energy ``E(x) = -logsumexp_y z_y(x)`` and the class-conditional energy
``E(x, y) = -z_y(x)``.
"""

from __future__ import annotations

import torch


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Marginal energy ``E(x) = -logsumexp_y z_y(x)``.

    Args:
        logits: cluster logits ``z(x)``, shape (B, K).

    Returns:
        Energies, shape (B,). Lower means more likely under the model.
    """
    return -torch.logsumexp(logits, dim=-1)  # (B, K) -> (B,)


def class_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class-conditional energy ``E(x, y) = -z_y(x)``.

    Args:
        logits: cluster logits, shape (B, K).
        y: cluster indices, shape (B,), integer.

    Returns:
        Energies, shape (B,).
    """
    return -logits.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)  # (B, K) -> (B,)
