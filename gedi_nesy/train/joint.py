"""The joint trainer: DeepProbLog's logic loss plus GEDI's generative and clustering losses.

Per step: route each network the inputs its nn/4 atoms name in the minibatch's queries
(:meth:`JointTrainer.route`), run ONE batched forward of each network over its own images, hand
the probability rows to the logic engine as lookup tables, and minimise

    L = L_logic + sum_extra w_e L_e + sum_nets (w_gen L_GEN + w_inv L_INV + w_prior L_PRIOR ...)

with L_logic = mean over provable queries of -log P(query) (as DeepProbLog's own cross-entropy,
eps = 1e-12; in log space and without eps when the engine gives log-probabilities, as the column
chain does for chains far below 1e-12); during the first ``optim.gedi_only_steps`` steps L_logic
is logged but not trained (a warm-up of the GEDI terms alone). The extra terms L_e are the
optional baselines the config switches on (:mod:`gedi_nesy.train.terms`: L_H,
``gedi.w_marginal_entropy``, and concept supervision, ``supervision``). Each network's
GEDI terms train on its own images only. One backward, one optimiser step per
:meth:`JointTrainer.train_step` (and, for a program with ``t(...)`` probabilities, DeepProbLog's
projected SGD step on them). Unprovable queries are counted and logged, never turned into a
silent zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gedi_nesy.config import JointConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.augment import augment as random_view
from gedi_nesy.gedi.losses import GediLoss, active_parts, weighted_total
from gedi_nesy.gedi.nets import RelabelNet
from gedi_nesy.gedi.objective import GediObjective
from gedi_nesy.logic.engine import LogicEngine, LogProbEngine
from gedi_nesy.logic.params import PARAMETER_NETWORK, ProjectedSGD
from gedi_nesy.logic.program import ProbabilityTable, argmax_tables, tensor_keys
from gedi_nesy.shortcuts.relabel import (
    Relabelling,
    find_relabelling,
    permute_units,
)
from gedi_nesy.train.loop import backward_step, check_finite
from gedi_nesy.train.runtime import pick_device, torch_threads
from gedi_nesy.train.terms import extra_losses, log_logic_loss, logic_loss

__all__ = ["JointTrainer", "logic_loss"]

if TYPE_CHECKING:
    from deepproblog.query import Query
    from problog.logic import Term


def _threaded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a trainer method with ``optim.threads`` torch threads (restored afterwards)."""

    @functools.wraps(method)
    def run(self: JointTrainer, *args: Any, **kwargs: Any) -> Any:
        with torch_threads(self.optim_cfg.threads):
            return method(self, *args, **kwargs)

    return run


class JointTrainer:
    """Trains the networks of a logic program on its queries, with the GEDI terms.

    Learning-rate schedules, validation and checkpoints belong to the loop
    (:func:`gedi_nesy.train.loop.fit`); a caller stepping the trainer itself trains at
    ``optim.lr``. Each method runs with ``optim.threads`` torch threads.

    Inputs are routed (:meth:`route`): a network sees only the images its nn/4 atoms name, in
    its forward and in its GEDI terms. Unlabelled images (``extra`` of :meth:`train_step`) are
    given per network; the joint run draws ``optim.extra_images`` of them for each network from
    the unlabelled pool of a source that network reads, and none for a network that reads no
    source with a pool (:func:`gedi_nesy.train.run.unlabelled_pools`).

    Args:
        logic: the engine (a :class:`~gedi_nesy.logic.engine.LogicEngine`); the program's
            ``t(...)`` probabilities (its ``parameters``, when it has them) are trained with the
            logic loss as DeepProbLog's ``SGD`` trains them (``ProjectedSGD`` at
            ``optim.param_lr``, after the networks' step), logged as ``t:NAME`` and kept in
            :meth:`state_dict`.
        nets: network name -> module returning logits (B, K); with a GEDI weight > 0 each must
            be a :class:`~gedi_nesy.gedi.nets.ClusterNet` (a :class:`GEDINet`).
        sources: tensor-source name -> images (N, C, H, W); ``tensor(src(i))`` is
            ``sources[src][i]``.
        cfg: the GEDI terms, sampler, augmentations, optimiser, concept supervision and
            ``logic.eval_batch``; None: ``JointConfig()``.
        device: where the networks and the GEDI terms run; None: ``optim.device``.
        logic_device: where the probability tables go; None: ``device`` (DeepProbLog's own
            engine is fastest on ``"cpu"``; gradients still flow back to the networks).
        labelled: network name -> (images (m, C, H, W), concepts (m,)) of the
            concept-supervision baseline, trained in every step; None: none.

    Raises:
        ConfigError: a GEDI weight > 0 and a network that is no ``ClusterNet``.
    """

    def __init__(
        self,
        logic: LogicEngine,
        nets: Mapping[str, nn.Module],
        sources: Mapping[str, torch.Tensor],
        cfg: JointConfig | None = None,
        *,
        device: torch.device | str | None = None,
        logic_device: torch.device | str | None = None,
        labelled: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.cfg = cfg = JointConfig() if cfg is None else cfg
        self.logic, self.sources, self.optim_cfg = logic, dict(sources), cfg.optim
        self.device = pick_device(cfg.optim.device) if device is None else torch.device(device)
        self.logic_device = self.device if logic_device is None else torch.device(logic_device)
        self.nets = {name: net.to(self.device) for name, net in nets.items()}
        params = [p for net in self.nets.values() for p in net.parameters()]
        self.optimizer = torch.optim.Adam(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        image_shape = tuple(next(iter(self.sources.values())).shape[1:])
        self.objectives = {
            name: GediObjective(net, cfg.gedi, cfg.sgld, cfg.augment, image_shape=image_shape,
                                device=self.device, seed=cfg.optim.seed + i, name=name)
            for i, (name, net) in enumerate(self.nets.items())
        } if cfg.gedi.trains_terms() else {}  # fmt: skip
        # draws the random views of optim.logic_view and supervision.augment
        self.view_generator = torch.Generator(device=self.device).manual_seed(cfg.optim.seed + 7)
        self.extra_losses = extra_losses(cfg, self.nets, labelled or {}, self.view, self.device)
        # the program's t(...) probabilities, when the engine has them
        self.parameters = getattr(logic, "parameters", None)
        self.param_optimizer = None if self.parameters is None else ProjectedSGD(
            self.parameters, cfg.optim.param_lr
        )  # fmt: skip
        self.step = 0
        self.n_unprovable = 0  # training queries without a proof, summed over steps

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """A fresh random view of each image (``augment``'s ranges), (n, C, H, W)."""
        return random_view(images, self.cfg.augment, self.view_generator)

    def route(self, queries: Sequence[Query]) -> dict[str, list[Term]]:
        """Network name -> the distinct inputs the queries ask it about, in first-seen order.

        With one network that is every ``tensor(...)`` term of the queries; with several, what
        the engine's ``referenced_keys`` names for each (a network the queries never reach is
        absent).
        """
        if len(self.nets) == 1:
            return {name: tensor_keys(queries) for name in self.nets}
        found = self.logic.referenced_keys(queries)
        return {name: list(found[name]) for name in self.nets if found.get(name)}

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
        self, routes: Mapping[str, Sequence[Term]], images: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, ProbabilityTable], dict[str, torch.Tensor]]:
        """One batched forward of each network over its own images; the lookup tables and the
        logits.

        Args:
            routes: network name -> its input keys (:meth:`route`).
            images: network name -> the images of those keys, (n, C, H, W).
        """
        logits = {name: self.nets[name](x) for name, x in images.items()}  # name -> (n, K)
        tables = {
            name: ProbabilityTable(list(routes[name]), F.softmax(z, -1).to(self.logic_device))
            for name, z in logits.items()
        }
        return tables, logits

    def gedi_parts(
        self, images: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted GEDI loss summed over networks, each on its own images (and its unlabelled
        ``extra`` images), and the logged parts (``NAME.`` before them with several networks)."""
        total = torch.zeros((), device=self.device)
        logged: dict[str, float] = {}
        for name, objective in self.objectives.items():
            batch = [
                x.to(self.device) for x in (images.get(name), extra.get(name)) if x is not None
            ]
            if not batch:
                continue  # the step's queries never reach this network
            parts: GediLoss = objective(torch.cat(batch))  # (n + m, C, H, W)
            total = total + weighted_total(parts, objective.weights)
            prefix = "" if len(self.nets) == 1 else f"{name}."
            logged.update(
                {prefix + k: v for k, v in active_parts(parts, objective.weights).items()}
            )
        return total, logged

    def loss(
        self, queries: Sequence[Query], extra: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The joint loss of a minibatch: routed forwards, logic loss, extra terms, GEDI parts.

        Args:
            queries: the minibatch's queries.
            extra: network name -> unlabelled images (m, C, H, W) for that network's GEDI terms
                only; None: none.

        Returns:
            (total loss, logged values: ``logic``, each extra term (``marginal_entropy``,
            ``concept_ce``), each active GEDI part, ``total``, ``unprovable``).
        """
        routes = self.route(queries)
        images = {name: self.images(keys) for name, keys in routes.items()}  # name -> (n, C, H, W)
        seen = images
        if self.optim_cfg.logic_view == "augmented":
            seen = {name: self.view(x) for name, x in images.items()}  # name -> (n, C, H, W)
        tables, logits = self.forward_tables(routes, seen)
        l_logic, provable = self.logic_loss(queries, tables)
        values: dict[str, float] = {"logic": float(l_logic.detach())}
        logic_on = self.step >= self.optim_cfg.gedi_only_steps
        total = l_logic.to(self.device) if logic_on else l_logic.new_zeros((), device=self.device)
        for term in self.extra_losses:
            value = term.fn(logits)
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        if self.objectives:
            l_gedi, logged = self.gedi_parts(images, extra or {})
            total = total + l_gedi
            values.update(logged)
        values["total"] = float(total.detach())
        values["unprovable"] = int((~provable).sum())
        if self.parameters is not None:  # the values this step's loss read
            values.update({f"t:{k}": v for k, v in self.parameters.values().items()})
        return total, values

    def logic_loss(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_logic and which queries are provable (Q,): in log space (:func:`log_logic_loss`)
        when the engine gives log-probabilities (a :class:`LogProbEngine`), else
        :func:`logic_loss` of its probabilities."""
        if isinstance(self.logic, LogProbEngine):
            log_probs, provable = self.logic.query_log_probs(queries, tables)  # (Q,), (Q,)
            return log_logic_loss(log_probs, provable), provable
        probs, provable = self.logic.query_probs(queries, tables)  # (Q,), (Q,)
        return logic_loss(probs, provable), provable

    @_threaded
    def train_step(
        self, queries: Sequence[Query], extra: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """zero_grad, :meth:`loss`, one backward, gradient clipping, one optimiser step.

        Args:
            queries: the minibatch's queries.
            extra: network name -> unlabelled images for its GEDI terms only, or None.

        Returns:
            The logged values of :meth:`loss`.
        """
        for net in self.nets.values():
            net.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.param_optimizer is not None:
            self.param_optimizer.zero_grad()
        total, values = self.loss(queries, extra)
        check_finite(values, self.step)
        params = [p for net in self.nets.values() for p in net.parameters()]
        backward_step(self.optimizer, params, total, self.optim_cfg.grad_clip)
        if self.param_optimizer is not None:
            self.param_optimizer.step()
        self.step += 1
        self.n_unprovable += values["unprovable"]
        return values

    def validated_modules(self) -> dict[str, nn.Module]:
        """What validation keeps at its best score and restores at the end: the networks and,
        when the program has them, the t(...) probabilities (under ``$t``)."""
        if self.parameters is None:
            return dict(self.nets)
        return {**self.nets, PARAMETER_NETWORK: self.parameters}

    @torch.no_grad()
    @_threaded
    def predict_answers(
        self,
        queries: Sequence[Query],
        concepts: Callable[[dict[str, ProbabilityTable]], dict[str, ProbabilityTable]]
        | None = None,
    ) -> list[Term | None]:
        """The most probable answer of each query's output argument (None: none is provable).

        Args:
            queries: the queries, evaluated ``logic.eval_batch`` at a time.
            concepts: replaces the networks' tables before the logic reads them (e.g.
                :func:`~gedi_nesy.logic.program.argmax_tables`); None: the tables as they are.
        """
        for net in self.nets.values():
            net.eval()
        predictions: list[Term | None] = []
        step = self.cfg.logic.eval_batch
        for start in range(0, len(queries), step):
            chunk = list(queries[start : start + step])
            routes = self.route(chunk)
            images = {name: self.images(keys) for name, keys in routes.items()}
            tables, _ = self.forward_tables(routes, images)
            tables = tables if concepts is None else concepts(tables)
            predictions.extend(self.logic.best_answers(chunk, tables))
        return predictions

    def task_accuracy(self, queries: Sequence[Query]) -> float:
        """Fraction of queries whose most probable answer equals the query's own output value."""
        return self._accuracy(queries, None)

    def argmax_task_accuracy(self, queries: Sequence[Query]) -> float:
        """Fraction of queries whose answer under each input's most probable concept (one-hot
        tables: for addition, the sum of the per-digit argmax numbers) is the query's own."""
        return self._accuracy(queries, argmax_tables)

    def _accuracy(
        self,
        queries: Sequence[Query],
        concepts: Callable[[dict[str, ProbabilityTable]], dict[str, ProbabilityTable]] | None,
    ) -> float:
        if not queries:
            raise ConfigError("no queries to evaluate; check the task's split sizes")
        predicted = self.predict_answers(queries, concepts)
        truth = [q.output_values()[0] for q in queries]
        return sum(p == t for p, t in zip(predicted, truth)) / len(queries)

    @torch.no_grad()
    @_threaded
    def relabel(self, queries: Sequence[Query], max_nodes: int = 200_000) -> Relabelling:
        """Rename the network's output units by the naming under which the program proves the
        most of ``queries`` with the predicted (argmax) units (:mod:`gedi_nesy.shortcuts.relabel`).

        With one cluster per value the naming is a permutation of the rows of the output layer
        ``head`` and of their Adam state, so the network computes the same clusters under new
        names; an overclustered :class:`~gedi_nesy.gedi.nets.GEDINet` gets a new
        ``value_of_cluster`` instead, among the maps that predict every value for at least
        ``optim.relabel_min_share / K`` of the images. Needs exactly one
        :class:`~gedi_nesy.gedi.nets.RelabelNet` (a GEDINet).

        Returns:
            The :class:`~gedi_nesy.shortcuts.relabel.Relabelling`, already applied; scores count
            queries.
        """
        head = self._relabel_head()
        if head is None:
            raise ConfigError(
                f"relabelling needs exactly one network with a linear head (a GEDINet); the "
                f"program has {sorted(self.nets)}; set optim.relabel_every: 0"
            )
        name, net = next(iter(self.nets.items()))
        keys = tensor_keys(queries)
        images = self.images(keys)
        net.eval()
        units = torch.cat([net.cluster_logits(x).argmax(-1).cpu() for x in images.split(1000)])
        value_of_cluster = net.value_of_cluster  # (M,), or None: the units are the values
        found = find_relabelling(
            self.logic, name, dict(zip(keys, units.tolist())), queries, net.k,
            current=None if value_of_cluster is None else value_of_cluster.tolist(),
            min_share=self.optim_cfg.relabel_min_share, max_nodes=max_nodes,
            device=self.logic_device,
        )  # fmt: skip
        if value_of_cluster is not None:
            value_of_cluster.copy_(torch.tensor(found.mapping))
        elif found.changed:
            self._permute_head(head, found.mapping)
        return found

    def _relabel_head(self) -> nn.Linear | None:
        """The output layer relabelling renames: the linear ``head`` of the only network when it
        keeps :class:`~gedi_nesy.gedi.nets.RelabelNet` (a GEDINet does), else None."""
        net = next(iter(self.nets.values()))
        if len(self.nets) != 1 or not isinstance(net, RelabelNet):
            return None
        return net.head if isinstance(net.head, nn.Linear) else None

    def _permute_head(self, head: nn.Linear, perm: Sequence[int]) -> None:
        """Output unit ``c`` becomes unit ``perm[c]``: rows of the weights, bias and Adam state."""
        permute_units(head, perm, self.optimizer)

    @torch.no_grad()
    @_threaded
    def concept_probs(self, name: str, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """``p(y|x)`` of network ``name`` on ``images`` (N, C, H, W) -> (N, K), on the CPU."""
        net = self.nets[name]
        net.eval()
        out = [F.softmax(net(x.to(self.device)), -1).cpu() for x in images.split(batch)]
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        """The networks, the optimiser, the GEDI terms' samplers and generators, the counters,
        and the program's t(...) probabilities with their optimiser (when it has them)."""
        return {
            "step": self.step,
            "n_unprovable": self.n_unprovable,
            "nets": {name: net.state_dict() for name, net in self.nets.items()},
            "optimizer": self.optimizer.state_dict(),
            "objectives": {name: o.state_dict() for name, o in self.objectives.items()},
            "view_generator": self.view_generator.get_state(),
            # the t(...) probabilities; nothing without them (checkpoints keep their form)
            **({} if self.param_optimizer is None else {"t": self.param_optimizer.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.step = state["step"]
        self.n_unprovable = state["n_unprovable"]
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, objective in self.objectives.items():
            objective.load_state_dict(state["objectives"][name])
        self.view_generator.set_state(state["view_generator"])
        if self.param_optimizer is not None:
            self.param_optimizer.load_state_dict(state["t"])
