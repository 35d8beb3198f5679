"""The GEDI network: a small CNN encoder, a projector and a cluster head with temperature.

``GEDINet(x)`` returns value logits ``z(x)`` of shape (B, K); ``concept_probs`` is the softmax,
the output a DeepProbLog neural predicate sees. With one cluster per value (the default) the
values are the clusters. With more (overclustering, ``clusters_per_value > 1``) the head has
``M = K * clusters_per_value`` prototypes, ``cluster_logits`` returns their (B, M) logits (what
the GEDI terms train) and a value's probability is the sum of its clusters' probabilities, by
the buffer ``value_of_cluster`` (cluster ``c`` starts on value ``c mod K``; relabelling may
re-assign it, :mod:`gedi_nesy.shortcuts.relabel`). No BatchNorm: batch statistics make SGLD and
per-query evaluation inconsistent, so the encoder uses no normalisation or GroupNorm.

:class:`ClusterNet` is what the GEDI terms need of a network; ``GEDINet`` is one, and
:func:`check_cluster_net` tells a foreign network why it is not.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gedi_nesy.config import ModelConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.energy import energy


@runtime_checkable
class ClusterNet(Protocol):
    """What the GEDI terms train (:class:`~gedi_nesy.gedi.objective.GediObjective`).

    Attributes:
        tau: the temperature dividing the head's scores (the energy may undo it, and SwAV's
            Sinkhorn works on the scores before it).
        n_clusters: M, the number of clusters the terms see (K, or more when overclustered).
    """

    tau: float
    n_clusters: int

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits, (B, C, H, W) -> (B, M)."""
        ...


@runtime_checkable
class RelabelNet(Protocol):
    """What the logic-guided relabelling renames (``JointTrainer.relabel``).

    Attributes:
        k: K, the number of concept values (the nn/4 domain).
        head: the output layer whose rows are the clusters, (M, D) weights.
        value_of_cluster: (M,) the value of each cluster when M > K (overclustered), else None:
            the clusters are the values.
    """

    k: int
    head: nn.Module
    value_of_cluster: torch.Tensor | None

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits, (B, C, H, W) -> (B, M)."""
        ...


def check_cluster_net(net: nn.Module, name: str) -> ClusterNet:
    """``net`` itself, once it is known to keep :class:`ClusterNet`.

    Args:
        net: a network the GEDI terms are to train.
        name: its name in the program, for the message.

    Raises:
        ConfigError: the network lacks ``cluster_logits``, ``n_clusters`` or ``tau``.
    """
    if not isinstance(net, ClusterNet):
        raise ConfigError(
            f"network {name!r} ({type(net).__name__}) has no cluster_logits(x), n_clusters and "
            "tau, which the GEDI terms train; use a GEDINet, or set every gedi.w_* to 0 to "
            "train it with the logic loss alone"
        )
    return net


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels) if kind == "group" else nn.Identity()


class Encoder(nn.Module):
    """Four conv layers with SiLU (smooth, so SGLD gets useful input gradients), for 28x28 images.

    Args:
        in_channels: image channels.
        width: channels of the first layer; later layers use 2x width.
        feature_dim: output feature size.
        norm: "none" or "group".
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = ModelConfig.width,
        feature_dim: int = ModelConfig.feature_dim,
        norm: str = ModelConfig.norm,
    ) -> None:
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), _norm(norm, w), nn.SiLU(),  # (B, w, 28, 28)
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), _norm(norm, 2 * w), nn.SiLU(),  # 14x14
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), _norm(norm, 2 * w), nn.SiLU(),  # 14x14
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), _norm(norm, 4 * w), nn.SiLU(),  # 7x7
        )  # fmt: skip
        self.fc = nn.Linear(4 * w * 7 * 7, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x)  # (B, 1, 28, 28) -> (B, 4w, 7, 7)
        return F.silu(self.fc(h.flatten(1)))  # (B, feature_dim)


class GEDINet(nn.Module):
    """Encoder -> projector -> cluster head; logits divided by the temperature tau.

    The defaults are :class:`~gedi_nesy.config.ModelConfig`'s, so ``GEDINet(k)`` is the network
    the CLI builds from ``model: {k: k}``; :meth:`from_config` builds one from a config.

    Args:
        k: number of values (the neural predicate's domain size).
        in_channels: image channels.
        width: encoder width.
        feature_dim: encoder output size.
        proj_dim: projector output size.
        tau: temperature dividing the head's scores.
        head: "cosine" (scores are cosine similarities to K prototypes, so |z| <= 1/tau and the
            energy stays bounded) or "linear".
        norm: encoder normalisation, "none" or "group".
        clusters_per_value: prototypes per value; more than 1 overclusters (see the module).

    Raises:
        ConfigError: a setting out of range (checked by ``ModelConfig``).
    """

    def __init__(
        self,
        k: int = ModelConfig.k,
        *,
        in_channels: int = 1,
        width: int = ModelConfig.width,
        feature_dim: int = ModelConfig.feature_dim,
        proj_dim: int = ModelConfig.proj_dim,
        tau: float = ModelConfig.tau,
        head: str = ModelConfig.head,
        norm: str = ModelConfig.norm,
        clusters_per_value: int = ModelConfig.clusters_per_value,
    ) -> None:
        super().__init__()
        self.config = ModelConfig(
            k=k, width=width, feature_dim=feature_dim, proj_dim=proj_dim, tau=tau, head=head,
            norm=norm, clusters_per_value=clusters_per_value,
        )  # fmt: skip
        self.k, self.tau, self.head_kind = k, tau, head
        self.encoder = Encoder(in_channels, width, feature_dim, norm)
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.SiLU(), nn.Linear(feature_dim, proj_dim)
        )
        self.n_clusters = k * clusters_per_value
        self.head = nn.Linear(proj_dim, self.n_clusters, bias=(head == "linear"))
        if clusters_per_value > 1:
            self.register_buffer("value_of_cluster", torch.arange(self.n_clusters) % k)  # (M,)
        else:
            self.value_of_cluster = None

    @classmethod
    def from_config(cls, cfg: ModelConfig, in_channels: int = 1) -> GEDINet:
        """The network a ``model`` config section describes.

        Args:
            cfg: the settings (``k`` included).
            in_channels: image channels.
        """
        return cls(**dataclasses.asdict(cfg), in_channels=in_channels)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Head scores before the temperature, shape (B, M)."""
        h = self.projector(self.encoder(x))  # (B, proj_dim)
        if self.head_kind == "linear":
            return self.head(h)  # (B, M)
        prototypes = F.normalize(self.head.weight, dim=-1)  # (M, proj_dim)
        return F.normalize(h, dim=-1) @ prototypes.t()  # (B, M), cosine in [-1, 1]

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits ``scores(x) / tau``, shape (B, M)."""
        return self.scores(x) / self.tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Value logits, shape (B, K): the cluster logits, or with overclustering
        ``log sum_{c -> v} exp z_c`` per value ``v`` (-inf for a value without clusters)."""
        return pool_values(self.cluster_logits(x), self.value_of_cluster, self.k)

    def concept_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Value posterior ``p(y|x) = softmax(z(x))``, shape (B, K)."""
        return F.softmax(self(x), dim=-1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x) = -logsumexp_c z_c(x)`` (the same over clusters or values), shape (B,)."""
        return energy(self.cluster_logits(x))


def pool_values(z: torch.Tensor, value_of_cluster: torch.Tensor | None, k: int) -> torch.Tensor:
    """Value logits ``log sum_{c: value_of_cluster[c] = v} exp z_c`` from cluster logits.

    Args:
        z: cluster logits, shape (B, M).
        value_of_cluster: value of each cluster, (M,) integers in 0..k-1; None: clusters are
            the values (z is returned as it is).
        k: number of values.

    Returns:
        (B, k) logits; the softmax of them sums each value's cluster probabilities. A value no
        cluster maps to gets -inf (probability 0).
    """
    if value_of_cluster is None:
        return z
    values = torch.arange(k, device=z.device)
    members = value_of_cluster.unsqueeze(0) == values.unsqueeze(1)  # (k, M)
    # each value's own logsumexp stays finite, with finite gradients, however far apart the
    # logits are (a shared shift would underflow one value's mass to 0 with a linear head)
    return z.unsqueeze(1).masked_fill(~members, float("-inf")).logsumexp(-1)  # (B, k, M) -> (B, k)
