"""What a task hands the trainer: a program, its networks, image sources and queries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deepproblog.query import Query


@dataclass
class TaskData:
    """A neuro-symbolic task, ready to train on.

    Attributes:
        name: task name.
        program: the ProbLog program file with the nn/4 declarations.
        networks: network name -> number of outputs K (the domain size of its nn/4).
        sources: tensor-source name -> images (N, C, H, W); a query's ``tensor(src(i))`` is
            ``sources[src][i]``.
        train: training queries (DeepProbLog ``Query`` objects, with their substitutions).
        val: validation queries (for early stopping).
        test: test queries.
        concept_images: source name used to measure the neural predicate's concept accuracy.
        concept_labels: true concept (e.g. digit) of every image of ``concept_images``, (N,).
        unlabelled: extra image indices per source, used only by the GEDI terms of the
            networks that read that source (``optim.extra_images``).
        info: free-form facts about the task, written to metrics.json.
        ood_test: out-of-distribution test queries (e.g. unseen worlds); empty when none.
        ood_concept_images: source name of the OOD test's images.
        ood_concept_labels: true concept of every image of ``ood_concept_images``, (N,).
        train_labels: true concept of every image of the training source(s), by source name;
            only the concept-supervision baseline reads it (``supervision.labels_per_class``).
    """

    name: str
    program: Path
    networks: dict[str, int]
    sources: dict[str, torch.Tensor]
    train: list[Query]
    val: list[Query]
    test: list[Query]
    concept_images: str
    concept_labels: torch.Tensor
    unlabelled: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    ood_test: list[Query] = field(default_factory=list)
    ood_concept_images: str | None = None
    ood_concept_labels: torch.Tensor | None = None
    train_labels: dict[str, torch.Tensor] = field(default_factory=dict)
