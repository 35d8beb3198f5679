"""Standalone GEDI training on MNIST and its evaluation (clustering, OOD, samples).

``train_gedi`` is what ``gedi-nesy gedi CONFIG`` runs: a :class:`GediTrainer` fitted by the
shared loop (:func:`gedi_nesy.train.loop.fit`, no validation), then evaluated. The method
(``gedi``, ``jem``, ``swav``, or ``gedi`` with ``w_gen: 0``) is a config value, so all of them
run on one budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gedi_nesy.config import GediRunConfig
from gedi_nesy.data import load_images
from gedi_nesy.gedi.losses import active_parts, weighted_total
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.gedi.objective import GediObjective
from gedi_nesy.plots import save_image_grid
from gedi_nesy.schema import to_dict
from gedi_nesy.shortcuts.metrics import clustering_report, ood_auroc
from gedi_nesy.train.checkpoint import read_checkpoint
from gedi_nesy.train.loop import Batches, backward_step, check_finite, fit
from gedi_nesy.train.runtime import atomic_write_json, make_run_dir, prepare_run, torch_threads


def _first(x: torch.Tensor, n: int | None) -> torch.Tensor:
    return x if n is None else x[:n]


class GediTrainer:
    """One GEDI network, its objective and its optimiser: what the loop trains in a standalone
    run.

    Args:
        net: the network.
        cfg: the run config (``gedi``, ``sgld``, ``augment``, ``optim``).
        device: where the network, the sampler and the images live.
    """

    def __init__(self, net: GEDINet, cfg: GediRunConfig, device: torch.device) -> None:
        self.cfg, self.net = cfg, net.to(device)
        self.objective = GediObjective(
            self.net, cfg.gedi, cfg.sgld, cfg.augment,
            image_shape=(1, 28, 28), device=device, seed=cfg.optim.seed,
        )  # fmt: skip
        o = cfg.optim
        self.optimizer = torch.optim.Adam(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.step = 0

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimiser step on images ``x`` (B, C, H, W); returns the loss parts and the
        total."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.objective(x)
        total = weighted_total(parts, self.objective.weights)
        values = active_parts(parts, self.objective.weights)
        values["total"] = float(total.detach())
        check_finite(values, self.step)
        backward_step(self.optimizer, self.net.parameters(), total, self.cfg.optim.grad_clip)
        self.step += 1
        return values

    def state_dict(self) -> dict[str, Any]:
        """The network, the optimiser, the sampler's buffer and generator, the step."""
        return {
            "step": self.step,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.step = state["step"]
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])


def train_gedi(
    cfg: GediRunConfig, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a GEDI network unsupervised on MNIST-train, evaluate it, write the run folder.

    Everything runs with ``optim.threads`` torch threads; the count before is restored.

    Args:
        cfg: the run configuration.
        resume: continue from ``<out_dir>/<name>/checkpoint.pt``.
        progress: show a progress bar.

    Returns:
        The metrics written to ``metrics.json``.
    """
    o = cfg.optim
    run_dir, device = prepare_run(cfg.out_dir, cfg.name, device=o.device, seed=o.seed)
    with torch_threads(o.threads):
        images, _ = load_images("mnist", "train", cfg.data.root)
        images = _first(images, cfg.data.n_train)  # (N, 1, 28, 28)
        trainer = GediTrainer(GEDINet.from_config(cfg.model), cfg, device)
        batches = Batches(len(images), lambda idx, _: (images[idx].to(device),), unit="images")
        if resume:
            read_checkpoint(run_dir / "checkpoint.pt", cfg)
        make_run_dir(run_dir, to_dict(cfg))
        done = fit(trainer, batches, cfg, run_dir, resume=resume, progress=progress)
        metrics = evaluate_gedi(trainer.net, trainer.objective, cfg, run_dir)
    metrics.update(
        steps=done.steps,
        train_seconds=round(done.seconds, 2),
        seconds_per_step=round(done.seconds / max(1, done.steps - done.first_step), 4),
        device=str(device),
    )
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def predict(
    net: nn.Module, images: torch.Tensor, objective: GediObjective, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster predictions and energies of ``images``, in eval mode, batch by batch.

    Returns:
        (pred (N,) int64, energies (N,) float), on the CPU.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    preds, energies = [], []
    for chunk in images.split(batch_size):
        logits = net(chunk.to(device))  # (b, K)
        preds.append(logits.argmax(-1).cpu())
        energies.append(objective.energy(logits).cpu())
    net.train(was_training)
    return torch.cat(preds), torch.cat(energies)


def evaluate_gedi(
    net: nn.Module, objective: GediObjective, cfg: GediRunConfig, run_dir: Path
) -> dict[str, Any]:
    """Clustering on MNIST-test, energy OOD AUROC vs Fashion-MNIST-test, and a sample grid."""
    images, labels = load_images("mnist", "test", cfg.data.root)
    images, labels = _first(images, cfg.data.n_test), _first(labels, cfg.data.n_test)
    ood, _ = load_images("fashion_mnist", "test", cfg.data.root)
    ood = _first(ood, cfg.data.n_ood)
    pred, e_in = predict(net, images, objective)
    _, e_out = predict(net, ood, objective)
    metrics: dict[str, Any] = {"method": cfg.gedi.method}
    metrics.update(clustering_report(labels.numpy(), pred.numpy(), cfg.model.k))
    metrics["ood_auroc"] = ood_auroc((-e_in).numpy(), (-e_out).numpy())
    metrics["energy_in_mean"] = float(e_in.mean())
    metrics["energy_out_mean"] = float(e_out.mean())
    if objective.buffer is not None:
        save_image_grid(objective.buffer.samples[:64].cpu(), run_dir / "samples.png", nrow=8)
    return metrics
