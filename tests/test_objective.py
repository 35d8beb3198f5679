"""The GEDI objective as a whole (gedi_nesy/gedi/objective.py): L_GEN's direction, the replay
buffer's write-back of the SGLD chains, and finite energies over a short run of the defaults."""

from __future__ import annotations

import math

import torch

from gedi_nesy.config import AugmentConfig, GediConfig, SGLDConfig
from gedi_nesy.gedi.losses import generative_loss, weighted_total
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.gedi.objective import GediObjective

SHAPE = (1, 28, 28)


def _objective(gedi: GediConfig, sgld: SGLDConfig, seed: int = 0) -> GediObjective:
    torch.manual_seed(seed)
    net = GEDINet(10, width=4, feature_dim=16, proj_dim=8)
    return GediObjective(net, gedi, sgld, AugmentConfig(), image_shape=SHAPE,
                         device=torch.device("cpu"), seed=seed)  # fmt: skip


def _images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen) * 2 - 1  # (n, 1, 28, 28) in [-1, 1]


def test_a_step_on_l_gen_lowers_the_energy_of_data_relative_to_samples():
    objective = _objective(GediConfig(w_gen=1.0, w_inv=0.0, w_prior=0.0), SGLDConfig(n_steps=2))
    net = objective.net
    data = _images(16, seed=1)  # (16, 1, 28, 28)
    samples = objective.samples(16)  # (16, 1, 28, 28), detached SGLD chains

    def gap() -> float:  # E(data) - E(samples), what L_GEN minimises
        with torch.no_grad():
            energy = objective.energy(net.cluster_logits(torch.cat([data, samples])))  # (32,)
        return float(energy[:16].mean() - energy[16:].mean())

    before = gap()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    energy = objective.energy(net.cluster_logits(torch.cat([data, samples])))  # (32,)
    generative_loss(energy[:16], energy[16:]).backward()
    optimizer.step()
    assert gap() < before  # the data went down relative to the samples, never up


def test_the_sgld_chains_are_written_back_to_the_slots_they_came_from():
    objective = _objective(GediConfig(w_gen=1.0), SGLDConfig(buffer_size=40, n_steps=3))
    before = objective.buffer.samples.clone()  # (40, 1, 28, 28)
    state = objective.generator.get_state()
    samples = objective.samples(8)  # (8, 1, 28, 28)
    objective.generator.set_state(state)  # the same draw again, to learn which slots it used
    _, slots = objective.buffer.sample(8, objective.generator)  # (8,)
    after = objective.buffer.samples
    assert torch.equal(after[slots], samples)  # each chain's last state went back to its slot
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(after[untouched], before[untouched])  # no other slot changed
    assert not torch.equal(after[slots], before[slots])  # the chains moved


def test_the_default_objective_keeps_finite_energies_over_a_short_run():
    cfg, sgld = GediConfig(), SGLDConfig(buffer_size=64)  # every term on at default weights
    objective = _objective(cfg, sgld)
    net = objective.net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(12):
        parts = objective(_images(16, seed=100 + step))
        total = weighted_total(parts, objective.weights)
        assert all(math.isfinite(float(p.detach())) for p in parts), f"step {step}: {parts}"
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        energy = objective.energy(net.cluster_logits(_images(64, seed=7)))  # (64,)
        chains = objective.energy(net.cluster_logits(objective.buffer.samples))  # (64,)
    assert torch.isfinite(energy).all() and torch.isfinite(chains).all()
    assert energy.abs().max() < sgld.max_abs_energy and chains.abs().max() < sgld.max_abs_energy
