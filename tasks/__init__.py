"""Benchmark tasks. The only place task names live; the CLI resolves them lazily by name.

Each task module has ``build(params: dict, data_root: str | None) -> gedi_nesy.task.TaskData``.
"""

from __future__ import annotations

TASKS = {
    "mnist_addition": "tasks.mnist_addition:build",
    "mnist_evenodd": "tasks.mnist_evenodd:build",
    "mnist_half": "tasks.mnist_half:build",
}
