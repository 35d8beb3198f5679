"""The GEDI objective on a batch of images: augmentations, SGLD samples, one batched forward.

:class:`GediObjective` owns the state the pure loss functions need (the replay buffer and the random
generators) and returns the unweighted parts as a :class:`~gedi_nesy.gedi.losses.GediLoss`. Both the
standalone trainer and the joint DeepProbLog trainer call it.
"""

from __future__ import annotations

from typing import Any

import torch

from gedi_nesy.config import AugmentConfig, GediConfig, SGLDConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.augment import augment as random_view
from gedi_nesy.gedi.energy import energy
from gedi_nesy.gedi.losses import (
    GediLoss,
    GediWeights,
    energy_penalty,
    generative_loss,
    invariance_loss,
    prior_loss,
    swav_loss,
)
from gedi_nesy.gedi.nets import ClusterNet, check_cluster_net
from gedi_nesy.gedi.sgld import ReplayBuffer, sgld_sample


def gedi_weights(cfg: GediConfig) -> GediWeights:
    """The weights of the loss parts the method implies (:meth:`GediConfig.part_weights`).

    Args:
        cfg: the objective config (its values are checked when it is built).
    """
    return GediWeights(**cfg.part_weights())


def prior_target(values: list[float] | None, k: int, device: torch.device) -> torch.Tensor | None:
    """``gedi.prior_target`` as a (K,) tensor, renormalised exactly; None stays None (uniform).

    Args:
        values: the config's target, positive and summing to 1 (checked by ``GediConfig``).
        k: the number of clusters the terms see; ``values`` must hold that many.
        device: where the tensor goes.

    Raises:
        ConfigError: ``values`` holds another number of values than ``k``.
    """
    if values is None:
        return None
    if len(values) != k:
        raise ConfigError(
            f"gedi.prior_target = {values} holds {len(values)} values; the network has K = {k} "
            "clusters: give one value per cluster, or null for uniform"
        )
    target = torch.tensor(values, dtype=torch.float64)
    return (target / target.sum()).to(device=device, dtype=torch.float32)


class GediObjective:
    """Computes the GEDI loss parts for a batch of images.

    Args:
        net: the network, a :class:`~gedi_nesy.gedi.nets.ClusterNet` (a ``GEDINet``): the terms
            train its ``cluster_logits(x)`` (B, M), M = ``n_clusters``.
        gedi: objective config.
        sgld: sampler config.
        augment: augmentation config.
        image_shape: shape of one image, e.g. (1, 28, 28).
        device: where the network and the buffer live.
        seed: seeds the generators of the sampler and the augmentations.
        name: the network's name, for the message when it is no ``ClusterNet``.

    Raises:
        ConfigError: the network is no ``ClusterNet``, or ``gedi.prior_target`` has not M values.
    """

    def __init__(
        self,
        net: ClusterNet,
        gedi: GediConfig,
        sgld: SGLDConfig,
        augment: AugmentConfig,
        *,
        image_shape: tuple[int, ...],
        device: torch.device,
        seed: int,
        name: str = "net",
    ) -> None:
        self.net = check_cluster_net(net, name)
        self.gedi, self.sgld, self.augment = gedi, sgld, augment
        self.weights = gedi_weights(gedi)
        self.logits = self.net.cluster_logits  # x -> (B, M) logits the terms train
        self.prior_target = prior_target(gedi.prior_target, self.net.n_clusters, device)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.buffer = None
        if self.weights.gen != 0.0 or self.weights.energy_reg != 0.0:
            self.buffer = ReplayBuffer(
                sgld.buffer_size,
                image_shape,
                reinit_freq=sgld.reinit_freq,
                generator=self.generator,
                device=device,
            )

    def energy(self, logits: torch.Tensor) -> torch.Tensor:
        """``E(x)`` from logits; with ``tau_in_energy: false`` the temperature is undone first."""
        if self.gedi.tau_in_energy:
            return energy(logits)  # (B, K) -> (B,)
        return energy(logits * self.net.tau)

    def samples(self, batch_size: int) -> torch.Tensor:
        """Run persistent SGLD chains from the buffer (network in eval mode meanwhile)."""
        assert self.buffer is not None
        x0, idx = self.buffer.sample(batch_size, self.generator)  # (B, C, H, W), (B,)
        was_training = self.net.training
        self.net.eval()
        try:
            x = sgld_sample(
                lambda v: self.energy(self.logits(v)),
                x0,
                n_steps=self.sgld.n_steps,
                step_size=self.sgld.step_size,
                noise_std=self.sgld.noise_std,
                generator=self.generator,
                max_abs_energy=self.sgld.max_abs_energy,
            )
        finally:
            self.net.train(was_training)
        self.buffer.update(idx, x)
        return x

    def __call__(self, x: torch.Tensor) -> GediLoss:
        """Unweighted loss parts on images ``x`` (B, C, H, W); parts of weight 0 are skipped."""
        w = self.weights
        zero = x.new_zeros(())
        use_pair = w.inv != 0.0 or w.swav != 0.0  # terms that compare two views
        use_views = use_pair or w.prior != 0.0
        use_gen = w.gen != 0.0 or w.energy_reg != 0.0
        batches, b = [], len(x)
        if use_views:  # L_PRIOR alone reads the first view only: the second is not drawn
            first = x if self.gedi.clean_view else random_view(x, self.augment, self.generator)
            batches.append(first)  # (B, C, H, W)
            if use_pair:
                batches.append(random_view(x, self.augment, self.generator))  # (B, C, H, W)
        if use_gen:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device)
            batches += [x + self.sgld.data_noise * noise, self.samples(b)]  # 2 x (B, C, H, W)
        if not batches:
            return GediLoss(zero, zero, zero, zero, zero)
        logits = self.logits(torch.cat(batches)).split(b)  # one forward: n_batches x (B, M)
        gen = reg = inv = prior = swav = zero
        if w.prior != 0.0:  # the first view, clean or random
            prior = prior_loss(logits[0], self.prior_target)
        if use_pair:
            za, zb = logits[0], logits[1]
            if w.inv != 0.0:
                inv = invariance_loss(za, zb, symmetric=self.gedi.symmetric_inv)
            if w.swav != 0.0:
                swav = swav_loss(
                    za * self.net.tau,
                    zb * self.net.tau,
                    temperature=self.gedi.swav_temperature,
                    epsilon=self.gedi.sinkhorn_epsilon,
                    n_iters=self.gedi.sinkhorn_iters,
                )
        if use_gen:
            e_data, e_sample = self.energy(logits[-2]), self.energy(logits[-1])  # (B,), (B,)
            gen = generative_loss(e_data, e_sample)
            reg = energy_penalty(e_data, e_sample)
        return GediLoss(gen, reg, inv, prior, swav)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
