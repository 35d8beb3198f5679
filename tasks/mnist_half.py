"""MNIST-Half (rsbench ``halfmnist``): pairs of MNIST digits 0-4 labelled with their sum.

Sampled as every world-sampled task (``tasks/worlds.py``), on digits 0-4 and a 5-valued digit
head: 420 train / 120 val / 60 test samples per world. Train, val and the ID test keep the 7
worlds of ``TRAIN_WORLDS`` (sums 0, 1, 5, 6): 2,940 / 840 / 420 queries; the OOD test holds the
other 18 worlds x 60 = 1,080. Program ``programs/half_addition.pl`` (network ``digit_net``,
K = 5, domain [0..4]).
"""

from __future__ import annotations

from typing import Any

from gedi_nesy.shortcuts.audit import AuditSpec
from gedi_nesy.task import TaskData
from tasks.worlds import PROGRAMS, WorldTask, build_world_task, world_audit_spec

TRAIN_WORLDS = [(0, 0), (0, 1), (1, 0), (2, 3), (3, 2), (2, 4), (4, 2)]
HALF = WorldTask("mnist_half", PROGRAMS / "half_addition.pl", tuple(range(5)), TRAIN_WORLDS)


def build(
    params: dict[str, Any], data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Build MNIST-Half from its config section.

    Args:
        params: the ``task:`` section of the run config (``tasks.worlds.WorldParams``).
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: check the MNIST files are the official release; False only for fakes.

    Returns:
        The task; ``test`` is the ID test (420 queries by default), ``ood_test`` the OOD test.
    """
    return build_world_task(HALF, params, data_root, verify_official=verify_official)


def audit_spec(params: dict[str, Any]) -> AuditSpec:
    """What ``gedi_nesy.shortcuts.audit.audit`` needs for MNIST-Half (its 7 worlds and their sums).

    Args:
        params: the ``task:`` section (checked; the audit does not depend on it).

    Returns:
        ``AuditSpec(programs/half_addition.pl, "digit_net", 5, worlds, sum_query)``.
    """
    return world_audit_spec(HALF, params)
