"""The joint trainer: DeepProbLog's logic loss plus GEDI's generative and clustering losses.

Per step: collect the images the minibatch's queries refer to, run ONE batched forward of each
network over them, hand the probability rows to the logic engine as lookup tables, and minimise

    L = L_logic + w_gen L_GEN + w_inv L_INV + w_prior L_PRIOR   (+ energy_reg, swav)

with L_logic = mean over provable queries of -log P(query) (as DeepProbLog's own cross-entropy,
eps = 1e-12); during the first ``optim.gedi_only_steps`` steps L_logic is logged but not
trained (a warm-up of the GEDI terms alone). One backward, one optimiser step: the backward of
a joint step is in this file.
Unprovable queries are counted and logged, never turned into a silent zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gedi_nesy.config import AugmentConfig, GediConfig, NesyOptimConfig, SGLDConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.augment import augment as random_view
from gedi_nesy.gedi.losses import GediLoss, active_parts, marginal_entropy_loss, weighted_total
from gedi_nesy.gedi.objective import GediObjective
from gedi_nesy.logic.program import ProbabilityTable, tensor_keys
from gedi_nesy.shortcuts.relabel import (
    Relabelling,
    find_relabelling,
    permute_units,
    relabel_layer,
)
from gedi_nesy.train.loop import check_finite, lr_factor

if TYPE_CHECKING:
    from deepproblog.query import Query
    from problog.logic import Term

LOGIC_EPS = 1e-12  # DeepProbLog's cross_entropy adds this inside the log


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


class JointTrainer:
    """Trains the networks of a logic program on its queries, with the GEDI terms.

    Args:
        logic: engine with ``query_probs(queries, tables) -> (probs (Q,), provable (Q,))`` and
            ``best_answers(queries, tables)``: :class:`gedi_nesy.logic.compiled.CompiledLogic` or
            :class:`gedi_nesy.logic.dpl.LogicModel`.
        nets: network name -> module returning logits (B, K) (a :class:`GEDINet` or any module).
        sources: tensor-source name -> images (N, C, H, W); ``tensor(src(i))`` is
            ``sources[src][i]``.
        gedi: GEDI objective config; with every weight 0 only the logic loss is trained.
        sgld: sampler config.
        augment: augmentation config.
        optim: optimiser and loop config.
        device: where the networks and the GEDI terms run.
        logic_device: where probabilities are handed to the logic engine (CPU is fastest for
            DeepProbLog's scalar ops; gradients still flow back to the networks' device).
        eval_batch: queries per logic call when predicting answers.
        total_steps: steps of the whole run, for the cosine learning-rate schedule.
        supervised: (images (m, C, H, W), concept labels (m,)) of the concept-supervision
            baseline, trained with cross-entropy in every step; needs exactly one network.
        supervision_weight: weight of that cross-entropy.
        supervision_augment: train that cross-entropy on a fresh random view of each labelled
            image per step (the ``augment`` ranges) instead of the images themselves.
    """

    def __init__(
        self,
        logic: Any,
        nets: Mapping[str, nn.Module],
        sources: Mapping[str, torch.Tensor],
        *,
        gedi: GediConfig,
        sgld: SGLDConfig,
        augment: AugmentConfig,
        optim: NesyOptimConfig,
        device: torch.device,
        logic_device: torch.device | str = "cpu",
        eval_batch: int = 64,
        total_steps: int = 1,
        supervised: tuple[torch.Tensor, torch.Tensor] | None = None,
        supervision_weight: float = 1.0,
        supervision_augment: bool = False,
    ) -> None:
        self.logic, self.sources, self.optim_cfg = logic, dict(sources), optim
        self.device, self.logic_device = device, torch.device(logic_device)
        self.eval_batch = eval_batch
        self.nets = {name: net.to(device) for name, net in nets.items()}
        params = [p for net in self.nets.values() for p in net.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(lr_factor, schedule=optim.schedule, warmup_steps=optim.warmup_steps,
                    total_steps=total_steps),
        )  # fmt: skip
        image_shape = tuple(next(iter(self.sources.values())).shape[1:])
        self.objectives = {
            name: GediObjective(net, gedi, sgld, augment, image_shape=image_shape,
                                device=device, seed=optim.seed + i)
            for i, (name, net) in enumerate(self.nets.items())
        }  # fmt: skip
        self.w_marginal_entropy = gedi.w_marginal_entropy
        if supervised is not None and len(self.nets) != 1:
            raise ConfigError(
                f"concept supervision needs exactly one network, the program has "
                f"{sorted(self.nets)}; set supervision.labels_per_class: 0"
            )
        self.supervised, self.supervision_weight = supervised, supervision_weight
        self.augment_cfg, self.supervision_augment = augment, supervision_augment
        # draws the random views of optim.logic_view and supervision_augment
        self.view_generator = torch.Generator(device=device).manual_seed(optim.seed + 7)
        self.step = 0
        self.n_unprovable = 0  # training queries without a proof, summed over steps
        self.uses_gedi = any(w != 0.0 for w in next(iter(self.objectives.values())).weights)
        if optim.gedi_only_steps < 0 or (optim.gedi_only_steps > 0 and not self.uses_gedi):
            raise ConfigError(
                f"optim.gedi_only_steps = {optim.gedi_only_steps}: it must be >= 0, and > 0 only "
                "with a GEDI weight > 0 (otherwise those steps train nothing); set it to 0"
            )
        if optim.relabel_every < 0 or (optim.relabel_every > 0 and not self._relabel_head()):
            raise ConfigError(
                f"optim.relabel_every = {optim.relabel_every}: it must be >= 0, and > 0 only with "
                f"exactly one network that has an output layer `head` (a GEDINet; the program "
                f"has {sorted(self.nets)}); set it to 0"
            )
        if not 0.0 <= optim.relabel_min_share <= 1.0:
            raise ConfigError(
                f"optim.relabel_min_share = {optim.relabel_min_share}; it must be in [0, 1] (a "
                "share of the uniform 1/K; 0 lets the logic alone choose the cluster map)"
            )
        if self.uses_gedi and not all(hasattr(n, "tau") for n in self.nets.values()):
            raise ConfigError(
                "the GEDI terms need networks with a temperature `tau` (GEDINet); set every "
                "gedi.w_* to 0 to train other networks with the logic loss alone"
            )

    def images(self, keys: Sequence[Term]) -> torch.Tensor:
        """Stack the images of ``tensor(src(i))`` keys, shape (n, C, H, W), on the device."""
        rows = []
        for key in keys:
            inner = key.args[0]
            if inner.functor not in self.sources or inner.arity != 1:
                raise ConfigError(
                    f"query refers to {key}, but the tensor sources are "
                    f"{sorted(self.sources)}; write queries with tensor(source(index))"
                )
            rows.append(self.sources[inner.functor][int(inner.args[0])])
        return torch.stack(rows).to(self.device)

    def forward_tables(
        self, keys: Sequence[Term], images: torch.Tensor
    ) -> tuple[dict[str, ProbabilityTable], dict[str, torch.Tensor]]:
        """One batched forward per network; returns the lookup tables and the logits."""
        logits = {name: net(images) for name, net in self.nets.items()}  # name -> (n, K)
        tables = {
            name: ProbabilityTable(list(keys), F.softmax(z, -1).to(self.logic_device))
            for name, z in logits.items()
        }
        return tables, logits

    def gedi_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted GEDI loss summed over networks, and its logged parts."""
        total = images.new_zeros(())
        logged: dict[str, float] = {}
        for name, objective in self.objectives.items():
            parts: GediLoss = objective(images)
            total = total + weighted_total(parts, objective.weights)
            prefix = "" if len(self.objectives) == 1 else f"{name}."
            logged.update(
                {prefix + k: v for k, v in active_parts(parts, objective.weights).items()}
            )
        return total, logged

    def loss(
        self, queries: Sequence[Query], extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The joint loss of a minibatch: batched forward, logic loss, GEDI parts.

        Args:
            queries: the minibatch's queries.
            extra: unlabelled images (m, C, H, W) for the GEDI terms only, or None.

        Returns:
            (total loss, logged values: ``logic``, ``marginal_entropy`` and ``concept_ce`` when
            those baselines are on, each active GEDI part, ``total``, ``unprovable``).
        """
        keys = tensor_keys(queries)
        images = self.images(keys)  # (n, C, H, W)
        seen = images
        if self.optim_cfg.logic_view == "augmented":
            seen = random_view(images, self.augment_cfg, self.view_generator)  # (n, C, H, W)
        tables, logits = self.forward_tables(keys, seen)
        probs, provable = self.logic.query_probs(queries, tables)  # (Q,), (Q,)
        l_logic = logic_loss(probs, provable)
        values: dict[str, float] = {"logic": float(l_logic.detach())}
        logic_on = self.step >= self.optim_cfg.gedi_only_steps
        total = l_logic.to(self.device) if logic_on else l_logic.new_zeros((), device=self.device)
        if self.w_marginal_entropy != 0.0:
            l_h = sum(marginal_entropy_loss(z) for z in logits.values())  # baseline L_H
            total = total + self.w_marginal_entropy * l_h
            values["marginal_entropy"] = float(l_h.detach())
        if self.supervised is not None:
            x, y = self.supervised
            x = x.to(self.device)
            if self.supervision_augment:
                x = random_view(x, self.augment_cfg, self.view_generator)  # (m, C, H, W)
            net = next(iter(self.nets.values()))
            l_sup = F.cross_entropy(net(x), y.to(self.device))  # (m, K) -> ()
            total = total + self.supervision_weight * l_sup
            values["concept_ce"] = float(l_sup.detach())
        if self.uses_gedi:
            gedi_images = images if extra is None else torch.cat([images, extra.to(self.device)])
            l_gedi, logged = self.gedi_parts(gedi_images)
            total = total + l_gedi
            values.update(logged)
        values["total"] = float(total.detach())
        values["unprovable"] = int((~provable).sum())
        return total, values

    def train_step(
        self, queries: Sequence[Query], extra: torch.Tensor | None = None
    ) -> dict[str, float]:
        """zero_grad, :meth:`loss`, one backward, gradient clipping, one optimiser step.

        Args:
            queries: the minibatch's queries.
            extra: unlabelled images for the GEDI terms only, or None.

        Returns:
            The logged values of :meth:`loss`.
        """
        for net in self.nets.values():
            net.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, values = self.loss(queries, extra)
        check_finite(values, self.step)
        total.backward()
        if self.optim_cfg.grad_clip > 0:
            params = [p for net in self.nets.values() for p in net.parameters()]
            nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.n_unprovable += values["unprovable"]
        return values

    @torch.no_grad()
    def predict_answers(self, queries: Sequence[Query]) -> list[Term | None]:
        """The most probable answer of each query's output argument (None: none is provable)."""
        for net in self.nets.values():
            net.eval()
        predictions: list[Term | None] = []
        for start in range(0, len(queries), self.eval_batch):
            chunk = list(queries[start : start + self.eval_batch])
            keys = tensor_keys(chunk)
            tables, _ = self.forward_tables(keys, self.images(keys))
            predictions.extend(self.logic.best_answers(chunk, tables))
        return predictions

    def task_accuracy(self, queries: Sequence[Query]) -> float:
        """Fraction of queries whose most probable answer equals the query's own output value."""
        if not queries:
            raise ConfigError("no queries to evaluate; check the task's split sizes")
        predicted = self.predict_answers(queries)
        truth = [q.output_values()[0] for q in queries]
        return sum(p == t for p, t in zip(predicted, truth)) / len(queries)

    @torch.no_grad()
    def relabel(self, queries: Sequence[Query], max_nodes: int = 200_000) -> Relabelling:
        """Rename the network's output units by the naming under which the program proves the
        most of ``queries`` with the predicted (argmax) units; see
        :mod:`gedi_nesy.shortcuts.relabel`.

        With one unit per value the naming is a permutation: it moves the rows of the output
        layer (``head``) and of their optimiser state, so the network computes the same
        clusters under the new names. With more clusters than values (an overclustered
        :class:`~gedi_nesy.gedi.nets.GEDINet`) it re-assigns each cluster a value
        (``value_of_cluster``) by the map that proves the most among those that predict every
        value for at least ``optim.relabel_min_share / K`` of the images. Needs exactly one
        network with a ``head`` linear layer.

        Returns:
            The :class:`~gedi_nesy.shortcuts.relabel.Relabelling`, already applied; scores count
            queries.
        """
        head = self._relabel_head()
        if head is None:
            raise ConfigError(
                f"relabelling needs exactly one network with an output layer `head` (a "
                f"GEDINet); the program has {sorted(self.nets)}; set optim.relabel_every: 0"
            )
        name, net = next(iter(self.nets.items()))
        value_of_cluster = getattr(net, "value_of_cluster", None)  # None: units are the values
        keys = tensor_keys(queries)
        images = self.images(keys)
        net.eval()
        logits = getattr(net, "cluster_logits", net)
        units = torch.cat([logits(x).argmax(-1).cpu() for x in images.split(1000)])  # (n,)
        found = find_relabelling(
            self.logic, name, dict(zip(keys, units.tolist())), queries,
            head.out_features if value_of_cluster is None else net.k,
            current=None if value_of_cluster is None else value_of_cluster.tolist(),
            min_share=self.optim_cfg.relabel_min_share, max_nodes=max_nodes,
            device=self.logic_device,
        )  # fmt: skip
        if value_of_cluster is None:
            if found.changed:
                self._permute_head(head, found.mapping)
        else:
            value_of_cluster.copy_(torch.tensor(found.mapping))
        return found

    def _relabel_head(self) -> nn.Linear | None:
        """The output layer relabelling permutes: the ``head`` of the only network, or None."""
        return relabel_layer(self.nets)

    def _permute_head(self, head: nn.Linear, perm: Sequence[int]) -> None:
        """Output unit ``c`` becomes unit ``perm[c]``: rows of the weights, bias and Adam state."""
        permute_units(head, perm, self.optimizer)

    @torch.no_grad()
    def concept_probs(self, name: str, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """``p(y|x)`` of network ``name`` on ``images`` (N, C, H, W) -> (N, K), on the CPU."""
        net = self.nets[name]
        net.eval()
        out = [F.softmax(net(x.to(self.device)), -1).cpu() for x in images.split(batch)]
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "n_unprovable": self.n_unprovable,
            "nets": {name: net.state_dict() for name, net in self.nets.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objectives": {name: o.state_dict() for name, o in self.objectives.items()},
            "view_generator": self.view_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.n_unprovable = state["n_unprovable"]
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, objective in self.objectives.items():
            objective.load_state_dict(state["objectives"][name])
        if "view_generator" in state:  # absent from checkpoints of earlier versions
            self.view_generator.set_state(state["view_generator"])
