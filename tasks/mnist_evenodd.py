"""MNIST-EvenOdd (rsbench ``shortmnist``): ordered pairs of MNIST digits labelled with their sum.

Sampled as every world-sampled task (``tasks/worlds.py``): 420 train / 120 val / 60 test samples
per world. Train, val and the in-distribution (ID) test keep the 16 worlds of ``TRAIN_WORLDS``
(sums 6, 10, 12): 6,720 / 1,920 / 960 queries; the out-of-distribution (OOD) test holds the other
84 worlds x 60 = 5,040 queries. Program ``programs/addition.pl`` (network ``digit_net``, K = 10).
"""

from __future__ import annotations

from typing import Any

from gedi_nesy.shortcuts.audit import AuditSpec
from gedi_nesy.task import TaskData
from tasks.worlds import PROGRAMS, WorldTask, build_world_task, world_audit_spec

TRAIN_WORLDS = [
    (0, 6), (6, 0), (2, 8), (8, 2), (4, 6), (6, 4), (4, 8), (8, 4),
    (1, 5), (5, 1), (3, 7), (7, 3), (1, 9), (9, 1), (3, 9), (9, 3),
]  # fmt: skip
EVENODD = WorldTask("mnist_evenodd", PROGRAMS / "addition.pl", tuple(range(10)), TRAIN_WORLDS)


def build(
    params: dict[str, Any], data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Build MNIST-EvenOdd from its config section.

    Args:
        params: the ``task:`` section of the run config (``tasks.worlds.WorldParams``).
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: check the MNIST files are the official release; False only for fakes.

    Returns:
        The task; ``test`` is the ID test (960 queries by default), ``ood_test`` the OOD test.
    """
    return build_world_task(EVENODD, params, data_root, verify_official=verify_official)


def audit_spec(params: dict[str, Any]) -> AuditSpec:
    """What ``gedi_nesy.shortcuts.audit.audit`` needs for MNIST-EvenOdd (its 16 worlds and their
    sums).

    Args:
        params: the ``task:`` section (checked; the audit does not depend on it).

    Returns:
        ``AuditSpec(programs/addition.pl, "digit_net", 10, worlds, sum_query)``.
    """
    return world_audit_spec(EVENODD, params)
