"""Pieces shared by the training loops: data order, schedules, step logs, finiteness checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from gedi_nesy.errors import TrainingError


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the minibatch of global ``step``: epochs of seeded permutations of ``range(n)``.

    The order depends only on (n, batch_size, seed, step), so a resumed run sees exactly the
    batches an uninterrupted run would. The last batch of an epoch may be smaller.

    Args:
        n: data set size.
        batch_size: minibatch size.
        seed: data-order seed.
        step: global step (0-based).

    Returns:
        Indices, shape (<= batch_size,), int64.
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)  # (n,)
    return perm[i * batch_size : (i + 1) * batch_size]


def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, final_frac: float = 0.1
) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``final_frac``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of a step: linear warm-up, then constant or cosine decay."""
    if schedule == "cosine":
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def check_finite(parts: dict[str, float], step: int) -> None:
    """Stop with a message naming the step and the part when a loss part is not finite."""
    for name, value in parts.items():
        if not math.isfinite(value):
            raise TrainingError(
                f"step {step}: loss part {name} is {value}; lower optim.lr, raise "
                "gedi.energy_reg or lower the weight of that part"
            )


class StepLog:
    """Append-only JSONL log of per-step values; on resume, lines past the resumed step are dropped.

    Args:
        path: the ``.jsonl`` file.
        resume_step: keep only lines with ``step <= resume_step``, the steps the checkpoint holds
            (None: start a new file).
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
