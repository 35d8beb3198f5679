"""MNIST-Half (rsbench ``halfmnist``): pairs of MNIST digits 0-4 labelled with their sum.

Built exactly as MNIST-EvenOdd (``tasks/mnist_evenodd.py``, whose helpers it uses), on digits
0-4 and a 5-valued digit head: every ordered world gets 420 train / 120 val / 60 test samples,
images drawn with replacement from the images of their digit (train and val from MNIST-train,
test from MNIST-test). Train, val and the ID test keep the 7 worlds of ``TRAIN_WORLDS`` (sums
0, 1, 5, 6): 2,940 / 840 / 420 queries; the OOD test holds the other 18 worlds x 60 = 1,080.
Program ``programs/half_addition.pl`` (network ``digit_net``, K = 5, domain [0..4]). Sources
``train``, ``idtest``, ``oodtest`` and the OOD split as for MNIST-EvenOdd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gedi_nesy.config import from_dict
from gedi_nesy.shortcuts.audit import AuditSpec
from gedi_nesy.task import TaskData
from tasks.mnist_evenodd import (
    PROGRAMS,
    EvenOddParams,
    OODSplit,
    WorldTask,
    build_world_task,
    check_params,
    ood_split,
    world_audit_spec,
)

DIGITS = tuple(range(5))
TRAIN_WORLDS = [(0, 0), (0, 1), (1, 0), (2, 3), (3, 2), (2, 4), (4, 2)]
HALF = WorldTask("mnist_half", PROGRAMS / "half_addition.pl", DIGITS, TRAIN_WORLDS)


@dataclass
class HalfParams(EvenOddParams):
    """The ``task:`` section of a config for ``name: mnist_half`` (fields as MNIST-EvenOdd)."""

    name: str = "mnist_half"


def build(
    params: dict[str, Any], data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Build MNIST-Half from its config section.

    Args:
        params: the ``task:`` section of the run config.
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: check the MNIST files are the official release; False only for fakes.

    Returns:
        The task; ``test`` is the ID test (420 queries by default), OOD: :func:`build_ood`.
    """
    p = from_dict(HalfParams, params, prefix="task.")
    return build_world_task(HALF, p, data_root, verify_official=verify_official)


def build_ood(params: dict[str, Any]) -> OODSplit:
    """The OOD test (18 worlds x ``n_test_per_world``) over the source ``oodtest`` of ``build``.

    Args:
        params: the same ``task:`` section given to :func:`build`.

    Returns:
        ``OODSplit(source, queries, concept_labels)``.
    """
    p = from_dict(HalfParams, params, prefix="task.")
    check_params(p)
    return ood_split(HALF, p)


def audit_spec(params: dict[str, Any]) -> AuditSpec:
    """What ``gedi_nesy.shortcuts.audit.audit`` needs for MNIST-Half (its 7 worlds and their sums).

    Args:
        params: the ``task:`` section (checked; the audit does not depend on it).

    Returns:
        ``AuditSpec(programs/half_addition.pl, "digit_net", 5, worlds, sum_query)``.
    """
    from_dict(HalfParams, params, prefix="task.")
    return world_audit_spec(HALF)
