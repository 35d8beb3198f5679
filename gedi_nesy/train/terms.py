"""The terms of the joint loss, as functions: the logic loss (from probabilities, or from
log-probabilities for chains below float range) and the optional extra terms the config switches
on (L_H, concept supervision). :class:`~gedi_nesy.train.joint.JointTrainer` weights and sums them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gedi_nesy.config import JointConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.losses import marginal_entropy_loss

__all__ = [
    "LOGIC_EPS",
    "ExtraLoss",
    "concept_supervision",
    "extra_losses",
    "log_logic_loss",
    "logic_loss",
    "marginal_entropy",
]

LOGIC_EPS = 1e-12  # DeepProbLog's cross_entropy adds this inside the log
Logits = Mapping[str, torch.Tensor]  # network name -> (n, K) logits of the batch's images


def logic_loss(probs: torch.Tensor, provable: torch.Tensor) -> torch.Tensor:
    """``mean_q -log(P(q) + eps)`` over provable queries (DeepProbLog's cross-entropy, target 1).

    Args:
        probs: query probabilities, shape (Q,).
        provable: which queries have at least one proof, shape (Q,), bool.

    Returns:
        A scalar; 0 (with no gradient path) when no query is provable: the caller logs the count.
    """
    provable = provable.to(probs.device)
    if not provable.any():
        return probs.new_zeros(())
    return -torch.log(probs[provable] + LOGIC_EPS).mean()  # (Q',) -> ()


def log_logic_loss(log_probs: torch.Tensor, provable: torch.Tensor) -> torch.Tensor:
    """``mean_q -log P(q)`` over provable queries, from log-probabilities: no eps, so a chain
    whose probability is far below 1e-12 (N = 100 digits early in training) keeps its gradient;
    a provable query of probability exactly 0 counts ``-log(eps)``, as in :func:`logic_loss`,
    with no gradient.

    Args:
        log_probs: query log-probabilities, shape (Q,); ``-inf`` where P is 0.
        provable: which queries have at least one proof, shape (Q,), bool.

    Returns:
        A scalar; 0 (with no gradient path) when no query is provable: the caller logs the count.
    """
    provable = provable.to(log_probs.device)
    if not provable.any():
        return log_probs.new_zeros(())
    kept = log_probs[provable]  # (Q',)
    floor = torch.full_like(kept, math.log(LOGIC_EPS))  # (Q',): DeepProbLog's value at P = 0
    return -torch.where(torch.isfinite(kept), kept, floor).mean()  # (Q',) -> ()


def marginal_entropy(logits: Logits) -> torch.Tensor:
    """L_H, the marginal-entropy baseline of the shortcut literature: ``1 - H(mean_i p(y|x_i)) /
    log K`` of each network on the images the logic sees, summed over networks.

    Args:
        logits: network name -> (n, K) logits of the step's images.
    """
    return sum(marginal_entropy_loss(z) for z in logits.values())


def concept_supervision(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[Logits], torch.Tensor]:
    """The concept-supervision baseline: a term giving the cross-entropy of ``net`` on a few
    labelled images.

    Args:
        net: the network the labels are concepts of.
        images: labelled images (m, C, H, W), on the network's device.
        labels: their concepts (m,), on the same device.
        view: draws a fresh random view of the images per call; None: the images themselves.

    Returns:
        A term: ``term(logits) -> scalar`` (the batch logits are not used).
    """

    def term(_: Logits) -> torch.Tensor:
        x = images if view is None else view(images)  # (m, C, H, W)
        return F.cross_entropy(net(x), labels)  # (m, K) -> ()

    return term


class ExtraLoss(NamedTuple):
    """An optional term of the joint loss: ``weight * fn(logits)``, logged as ``name``."""

    name: str
    weight: float
    fn: Callable[[Logits], torch.Tensor]


def extra_losses(
    cfg: JointConfig,
    nets: Mapping[str, nn.Module],
    labelled: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    view: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> list[ExtraLoss]:
    """The extra terms the config switches on, in the order the loss adds them: L_H
    (``gedi.w_marginal_entropy`` > 0), then concept supervision of each labelled network
    (``supervision.weight``; on a fresh random view per step with ``supervision.augment``).

    Args:
        cfg: the joint config.
        nets: the trainer's networks.
        labelled: network name -> (images (m, C, H, W), concepts (m,)); may be empty.
        view: draws a random view of images (the trainer's view generator).
        device: where the networks run.

    Raises:
        ConfigError: ``labelled`` names a network the trainer does not have.
    """
    terms = []
    if cfg.gedi.w_marginal_entropy != 0.0:
        terms.append(ExtraLoss("marginal_entropy", cfg.gedi.w_marginal_entropy, marginal_entropy))
    for name, (x, y) in labelled.items():
        if name not in nets:
            raise ConfigError(
                f"labelled images name network {name!r}; the trainer has {sorted(nets)}"
            )
        term = concept_supervision(nets[name], x.to(device), y.to(device),
                                   view if cfg.supervision.augment else None)  # fmt: skip
        key = "concept_ce" if len(nets) == 1 else f"{name}.concept_ce"
        terms.append(ExtraLoss(key, cfg.supervision.weight, term))
    return terms
