"""The GEDI core: energy, Sinkhorn, SGLD and replay buffer, the loss parts, nets, augmentations."""

from __future__ import annotations

import math

import pytest
import torch

from gedi_nesy.config import AugmentConfig
from gedi_nesy.errors import TrainingError
from gedi_nesy.gedi.augment import augment
from gedi_nesy.gedi.energy import class_energy, energy
from gedi_nesy.gedi.losses import (
    GediLoss,
    GediWeights,
    active_parts,
    energy_penalty,
    generative_loss,
    invariance_loss,
    prior_loss,
    swav_loss,
    weighted_total,
)
from gedi_nesy.gedi.nets import GEDINet, pool_values
from gedi_nesy.gedi.sgld import ReplayBuffer, sgld_sample
from gedi_nesy.gedi.sinkhorn import sinkhorn


def test_energy_is_negative_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # E = -log(e^0 + e^0) = -log 2;  E = -log(3 + 1) = -log 4
    assert torch.allclose(energy(logits), torch.tensor([-math.log(2.0), -math.log(4.0)]))


def test_energy_shift_identity_and_class_energy():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    # logits + c shifts every energy by exactly -c
    assert torch.allclose(energy(logits + 2.5), energy(logits) - 2.5, atol=1e-6)
    y = torch.tensor([0, 1, 2, 3, 6])
    assert torch.equal(class_energy(logits, y), -logits[torch.arange(5), y])
    # p(y|x) = exp(-E(x,y)) / exp(-E(x))
    post = torch.exp(-class_energy(logits, y) + energy(logits))
    assert torch.allclose(post, torch.softmax(logits, -1)[torch.arange(5), y], atol=1e-6)


def test_sinkhorn_marginals_and_equivariance():
    scores = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    q = sinkhorn(scores, epsilon=0.5, n_iters=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each sample: mass 1
    assert torch.allclose(q.sum(0), torch.full((8,), 8.0), atol=1e-3)  # each cluster: B/K
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(sinkhorn(scores[perm], epsilon=0.5, n_iters=50), q[perm], atol=1e-5)


def test_sinkhorn_finite_for_large_scores():
    q = sinkhorn(torch.randn(32, 10) * 1e4, epsilon=0.01, n_iters=3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-4)


def test_sinkhorn_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(2, 2), epsilon=0.0)


def _quadratic(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.pow(2).flatten(1).sum(1)  # E(x) = |x|^2 / 2, a standard Gaussian


def test_sgld_lowers_a_gaussian_energy_and_is_reproducible():
    x0 = torch.full((16, 4), 3.0)
    kw = dict(n_steps=50, step_size=0.1, noise_std=0.01, clamp=None)
    out1 = sgld_sample(_quadratic, x0, generator=torch.Generator().manual_seed(0), **kw)
    out2 = sgld_sample(_quadratic, x0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out1, out2)
    assert _quadratic(out1).mean() < 0.05 * _quadratic(x0).mean()  # 3 * 0.9^50 ~ 0.015
    assert not out1.requires_grad


def test_sgld_without_noise_is_gradient_descent():
    x0 = torch.tensor([[2.0]])
    out = sgld_sample(_quadratic, x0, n_steps=3, step_size=0.5, noise_std=0.0, clamp=None)
    assert out.item() == pytest.approx(2.0 * 0.5**3)  # x <- x - 0.5 x, three times


def test_sgld_clamps_and_stops_on_non_finite_energy():
    out = sgld_sample(lambda x: -10 * x.sum(1), torch.zeros(4, 3), n_steps=2, step_size=1.0,
                      noise_std=0.0)  # fmt: skip
    assert out.max().item() == 1.0  # pushed up, clipped at the data range
    with pytest.raises(TrainingError, match="SGLD step 0: non-finite"):
        sgld_sample(lambda x: x.sum(1) / 0.0, torch.ones(2, 2), n_steps=1, step_size=1.0,
                    noise_std=0.0)  # fmt: skip
    with pytest.raises(TrainingError, match="SGLD step 1: .*exceeds"):
        sgld_sample(lambda x: 1e3 * x.sum(1), torch.zeros(2, 1), n_steps=3, step_size=10.0,
                    noise_std=0.0, clamp=None, max_abs_energy=100.0)  # fmt: skip


def test_replay_buffer_reinit_rate_and_update():
    gen = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(20000, (2,), reinit_freq=0.25, generator=gen)
    assert buf.samples.min() >= -1 and buf.samples.max() <= 1
    buf.samples.fill_(5.0)  # mark stored chains, so restarts are visible
    x0, idx = buf.sample(20000, generator=gen)
    restarted = (x0[:, 0] != 5.0).float().mean().item()
    assert abs(restarted - 0.25) < 0.015  # binomial std ~0.003
    assert len(set(idx.tolist())) == 20000  # distinct slots: write-back order cannot matter
    buf.update(idx[:3], torch.zeros(3, 2))
    assert torch.equal(buf.samples[idx[:3]], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reinit_freq"):
        ReplayBuffer(4, (1,), reinit_freq=1.5)
    with pytest.raises(ValueError, match="raise sgld.buffer_size"):
        ReplayBuffer(4, (1,), reinit_freq=0.0).sample(5)


def test_prior_minimal_at_uniform_marginal_and_larger_under_collapse():
    k = 4
    uniform = torch.eye(k).repeat(2, 1) * 20.0  # each cluster used by 2 of 8 samples
    collapsed = torch.zeros(8, k)
    collapsed[:, 0] = 20.0  # every sample in cluster 0
    assert prior_loss(uniform).item() == pytest.approx(k * math.log(k), abs=1e-4)  # K log K
    assert prior_loss(torch.zeros(8, k)).item() == pytest.approx(k * math.log(k), abs=1e-6)
    assert prior_loss(collapsed).item() > prior_loss(uniform).item() + 10.0
    # a non-uniform target: minimal when the marginal matches it
    target = torch.tensor([0.5, 0.5, 0.0, 0.0])
    half = torch.tensor([[20.0, 0, 0, 0], [0, 20.0, 0, 0]])
    assert prior_loss(half, target).item() < prior_loss(uniform, target).item()


def test_invariance_larger_when_views_disagree():
    logits = torch.eye(5) * 10.0
    same = invariance_loss(logits, logits)
    permuted = invariance_loss(logits, logits[[1, 2, 3, 4, 0]])
    assert permuted.item() > same.item() + 5.0
    sym = invariance_loss(logits, logits[[1, 2, 3, 4, 0]], symmetric=True)
    assert torch.isfinite(sym)


def test_invariance_gradients_flow_through_both_views():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    invariance_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_generative_loss_and_penalty_values():
    e_data, e_sample = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])
    assert generative_loss(e_data, e_sample).item() == 2.0  # mean 2 - mean 0
    assert energy_penalty(e_data, e_sample).item() == 6.0  # (1+9)/2 + (1+1)/2


def test_swav_loss_prefers_consistent_views():
    gen = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(32, 4, generator=gen), dim=-1)
    agree = swav_loss(scores, scores)
    disagree = swav_loss(scores, scores.roll(1, dims=0))
    assert agree.item() < disagree.item()


def test_weighted_total_skips_zero_weights_and_names_active_parts():
    one = torch.tensor(1.0)
    parts = GediLoss(one * 2, torch.tensor(float("nan")), one * 3, one * 5, one * 7)
    weights = GediWeights(gen=1.0, energy_reg=0.0, inv=0.5, prior=2.0, swav=0.0)
    assert weighted_total(parts, weights).item() == 2.0 + 1.5 + 10.0
    assert active_parts(parts, weights) == {"gen": 2.0, "inv": 3.0, "prior": 5.0}


@pytest.mark.parametrize("head", ["cosine", "linear"])
@pytest.mark.parametrize("norm", ["none", "group"])
def test_gedinet_shapes_and_outputs(head, norm):
    net = GEDINet(k=6, width=4, feature_dim=16, proj_dim=8, tau=0.1, head=head, norm=norm)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z = net(x)
    assert z.shape == (3, 6)
    assert torch.allclose(net.concept_probs(x).sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(net.energy(x), energy(z))
    if head == "cosine":
        assert z.abs().max().item() <= 1.0 / 0.1 + 1e-4  # |cos| <= 1, divided by tau


def test_gedinet_rejects_bad_arguments():
    from gedi_nesy.errors import ConfigError

    with pytest.raises(ConfigError, match="model.k = 1; it must be a finite number >= 2"):
        GEDINet(k=1)
    with pytest.raises(ConfigError, match="model.head = 'mlp' is not allowed"):
        GEDINet(head="mlp")
    with pytest.raises(ConfigError, match="model.clusters_per_value = 0; it must be .* >= 1"):
        GEDINet(k=3, clusters_per_value=0)


def test_gedinet_defaults_are_the_model_configs():
    from gedi_nesy.config import ModelConfig

    torch.manual_seed(0)
    plain = GEDINet(7)
    torch.manual_seed(0)
    configured = GEDINet.from_config(ModelConfig(k=7))
    assert plain.config == ModelConfig(k=7) == configured.config
    assert plain.encoder.fc.out_features == ModelConfig.feature_dim  # 128, as the CLI builds
    for (name, a), b in zip(plain.state_dict().items(), configured.state_dict().values()):
        assert torch.equal(a, b), name
    wide = GEDINet.from_config(ModelConfig(k=4, width=4, proj_dim=8, clusters_per_value=2))
    assert (wide.k, wide.n_clusters, wide.head.in_features) == (4, 8, 8)


def test_the_gedi_terms_refuse_a_network_without_clusters_in_one_line():
    from gedi_nesy.config import GediConfig, SGLDConfig
    from gedi_nesy.errors import ConfigError
    from gedi_nesy.gedi.objective import GediObjective

    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(ConfigError) as info:
        GediObjective(plain, GediConfig(), SGLDConfig(), AugmentConfig(), image_shape=(1, 28, 28),
                      device=torch.device("cpu"), seed=0, name="digit_net")  # fmt: skip
    message = str(info.value)
    assert message.startswith("network 'digit_net' (Sequential) has no cluster_logits(x)")
    assert "set every gedi.w_* to 0" in message and "\n" not in message


def test_pool_values_sums_cluster_probabilities():
    z = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])) + 7.0  # cluster probs 0.1 0.2 0.3 0.4
    p = torch.softmax(pool_values(z, torch.tensor([0, 1, 0, 1]), 2), -1)
    assert torch.allclose(p, torch.tensor([[0.4, 0.6]]))  # 0.1 + 0.3, 0.2 + 0.4
    p = torch.softmax(pool_values(z, torch.tensor([2, 2, 0, 2]), 3), -1)
    assert torch.allclose(p, torch.tensor([[0.3, 0.0, 0.7]]))  # value 1 has no cluster: 0
    assert pool_values(z, None, 4) is z
    far = torch.tensor([[0.0, -200.0, 300.0, -150.0]], requires_grad=True)  # a linear head's range
    pooled = pool_values(far, torch.tensor([0, 1, 0, 1]), 2)
    assert torch.allclose(pooled, torch.tensor([[300.0, -150.0 + math.log1p(math.exp(-50.0))]]))
    torch.log_softmax(pooled, -1)[0, 1].backward()
    assert torch.isfinite(far.grad).all()  # no underflow to log(0) for the far value


def test_an_overclustered_gedinet_trains_its_clusters_and_answers_in_values():
    from gedi_nesy.config import GediConfig, SGLDConfig
    from gedi_nesy.errors import ConfigError
    from gedi_nesy.gedi.objective import GediObjective

    torch.manual_seed(0)
    net = GEDINet(3, width=4, feature_dim=16, proj_dim=8, clusters_per_value=2)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    clusters = torch.softmax(net.cluster_logits(x), -1)  # (4, 6)
    assert clusters.shape == (4, 6) and net(x).shape == (4, 3)
    assert net.value_of_cluster.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.allclose(net.concept_probs(x), clusters[:, :3] + clusters[:, 3:], atol=1e-6)
    assert torch.allclose(net.energy(x), energy(net(x)), atol=1e-5)  # pooling keeps E(x)
    assert "value_of_cluster" in net.state_dict()  # a relabelled map is checkpointed
    gedi = GediConfig(w_gen=0.0, w_inv=1.0, w_prior=1.0, clean_view=True)
    objective = GediObjective(net, gedi, SGLDConfig(), AugmentConfig(), image_shape=(1, 28, 28),
                              device=torch.device("cpu"), seed=0)  # fmt: skip
    expected = prior_loss(net.cluster_logits(x))  # L_PRIOR over the 6 clusters, not 3 values
    assert objective(x).prior.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="holds 3 values; the network has K = 6 clusters"):
        GediObjective(net, GediConfig(prior_target=[1 / 3] * 3), SGLDConfig(), AugmentConfig(),
                      image_shape=(1, 28, 28), device=torch.device("cpu"), seed=0)  # fmt: skip


def test_two_views_differ_stay_in_range_and_are_seeded():
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    cfg = AugmentConfig()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1, b1 = augment(x, cfg, g1), augment(x, cfg, g1)  # two views from one generator
    a2, b2 = augment(x, cfg, g2), augment(x, cfg, g2)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == x.shape and a1.min() >= -1 and a1.max() <= 1
    assert not torch.allclose(a1, b1)


def test_identity_augmentation_keeps_the_image():
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    cfg = AugmentConfig(rotate_deg=0.0, scale=(1.0, 1.0), shear_deg=0.0, translate=0.0,
                        noise_std=0.0)  # fmt: skip
    assert torch.allclose(augment(x, cfg), x, atol=1e-5)


@pytest.mark.parametrize("field, value", [("w_gen", float("nan")), ("w_prior", -1.0)])
def test_gedi_weights_must_be_finite_and_non_negative(field, value):
    from gedi_nesy.config import GediConfig
    from gedi_nesy.errors import ConfigError
    from gedi_nesy.gedi.objective import gedi_weights

    with pytest.raises(ConfigError, match=f"gedi.{field} = .*finite number >= 0"):
        GediConfig(**{field: value})  # the config checks its weights when it is built
    # energy_reg belongs to L_GEN: off when w_gen is 0, so "GEDI without L_GEN" runs no SGLD
    assert gedi_weights(GediConfig(w_gen=0.0, energy_reg=0.5)).energy_reg == 0.0


def test_marginal_entropy_loss_is_0_at_uniform_and_1_under_collapse():
    from gedi_nesy.gedi.losses import marginal_entropy_loss

    uniform = torch.eye(4).repeat(2, 1) * 50.0  # each of 4 classes used by 2 of 8 samples
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 50.0
    assert marginal_entropy_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)  # H = log K
    assert marginal_entropy_loss(collapsed).item() == pytest.approx(1.0, abs=1e-6)  # H = 0
    half = torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0]])  # two classes: H = log 2
    assert marginal_entropy_loss(half).item() == pytest.approx(0.5, abs=1e-6)  # 1 - log2/log4


def test_clean_view_puts_the_prior_on_the_images_the_logic_sees():
    from gedi_nesy.config import GediConfig, SGLDConfig
    from gedi_nesy.gedi.objective import GediObjective

    torch.manual_seed(0)
    net = GEDINet(5, width=4, feature_dim=16, proj_dim=8)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    gedi = GediConfig(w_gen=0.0, w_inv=1.0, w_prior=1.0, clean_view=True)
    objective = GediObjective(net, gedi, SGLDConfig(), AugmentConfig(), image_shape=(1, 28, 28),
                              device=torch.device("cpu"), seed=0)  # fmt: skip
    parts = objective(x)
    assert parts.prior.item() == pytest.approx(prior_loss(net(x)).item(), rel=1e-6)
    plain = GediObjective(net, GediConfig(w_gen=0.0), SGLDConfig(), AugmentConfig(),
                          image_shape=(1, 28, 28), device=torch.device("cpu"), seed=0)  # fmt: skip
    assert plain(x).prior.item() != pytest.approx(parts.prior.item(), rel=1e-6)


def test_l_prior_alone_draws_and_forwards_one_view():
    from gedi_nesy.config import GediConfig, SGLDConfig
    from gedi_nesy.gedi.objective import GediObjective

    torch.manual_seed(0)
    net = GEDINet(5, width=4, feature_dim=16, proj_dim=8)
    x = torch.rand(6, 1, 28, 28) * 2 - 1  # (6, 1, 28, 28)
    rows: list[int] = []  # the batch size of each encoder forward
    net.encoder.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    for clean in (False, True):
        gedi = GediConfig(w_gen=0.0, w_inv=0.0, w_prior=1.0, clean_view=clean)
        objective = GediObjective(net, gedi, SGLDConfig(), AugmentConfig(), image_shape=(1, 28, 28),
                                  device=torch.device("cpu"), seed=3)  # fmt: skip
        twin = torch.Generator().set_state(objective.generator.get_state())
        view = x if clean else augment(x, AugmentConfig(), twin)  # the one view it may draw
        rows.clear()
        prior = objective(x).prior
        assert rows == [6]  # one forward of the 6 images' one view, no unused second view
        assert torch.equal(objective.generator.get_state(), twin.get_state())  # one draw at most
        assert prior.item() == pytest.approx(prior_loss(net(view)).item(), rel=1e-6)


def test_prior_target_sets_the_marginal_l_prior_matches():
    from gedi_nesy.config import GediConfig, SGLDConfig
    from gedi_nesy.errors import ConfigError
    from gedi_nesy.gedi.objective import GediObjective

    torch.manual_seed(0)
    net = GEDINet(5, width=4, feature_dim=16, proj_dim=8)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    target = [2 / 7, 1 / 7, 2 / 7, 1 / 7, 1 / 7]  # MNIST-Half's digit marginal
    gedi = GediConfig(w_gen=0.0, w_inv=0.0, w_prior=1.0, clean_view=True, prior_target=target)
    objective = GediObjective(net, gedi, SGLDConfig(), AugmentConfig(), image_shape=(1, 28, 28),
                              device=torch.device("cpu"), seed=0)  # fmt: skip
    expected = prior_loss(net(x), torch.tensor(target))
    assert objective(x).prior.item() == pytest.approx(expected.item(), rel=1e-6)
    for bad in ([], [0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0, 0.0]):  # the config's check
        with pytest.raises(ConfigError, match=r"gedi.prior_target = .* one value > 0 per cluster"):
            GediConfig(prior_target=bad)
    with pytest.raises(ConfigError, match=r"gedi.prior_target = .* the network has K = 5"):
        GediObjective(net, GediConfig(prior_target=[0.5, 0.5]), SGLDConfig(), AugmentConfig(),
                      image_shape=(1, 28, 28), device=torch.device("cpu"), seed=0)  # fmt: skip
