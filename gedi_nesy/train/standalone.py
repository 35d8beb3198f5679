"""Standalone GEDI training on MNIST and its evaluation (clustering, OOD, samples).

``train_gedi`` is what ``gedi-nesy gedi CONFIG`` runs. The method (``gedi``, ``jem``, ``swav``, or
``gedi`` with ``w_gen: 0``) is a config value, so all of them run on one budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from gedi_nesy.config import GediRunConfig, ModelConfig, to_dict, with_defaults
from gedi_nesy.data import load_images
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.losses import active_parts, weighted_total
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.gedi.objective import GediObjective
from gedi_nesy.plots import save_image_grid
from gedi_nesy.shortcuts.metrics import clustering_report, ood_auroc
from gedi_nesy.train.loop import StepLog, batch_indices, check_finite, warmup_cosine
from gedi_nesy.train.runtime import (
    atomic_write_json,
    check_resume_config,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
)


def build_net(cfg: ModelConfig) -> GEDINet:
    """A :class:`GEDINet` from its config."""
    return GEDINet(
        cfg.k,
        width=cfg.width,
        feature_dim=cfg.feature_dim,
        proj_dim=cfg.proj_dim,
        tau=cfg.tau,
        head=cfg.head,
        norm=cfg.norm,
        clusters_per_value=cfg.clusters_per_value,
    )


def _first(x: torch.Tensor, n: int | None) -> torch.Tensor:
    return x if n is None else x[:n]


class _Run:
    """Everything a standalone run holds; saved to and restored from one checkpoint."""

    def __init__(self, cfg: GediRunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.net = build_net(cfg.model).to(device)
        self.objective = GediObjective(
            self.net, cfg.gedi, cfg.sgld, cfg.augment,
            image_shape=(1, 28, 28), device=device, seed=cfg.optim.seed,
        )  # fmt: skip
        o = cfg.optim
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, warmup_steps=o.warmup_steps, total_steps=o.steps),
        )
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        set_rng_state(state["rng"])


def _train_step(run: _Run, x: torch.Tensor) -> dict[str, float]:
    """One optimiser step on images ``x``; returns the loss parts and the total."""
    run.optimizer.zero_grad(set_to_none=True)
    parts = run.objective(x)
    total = weighted_total(parts, run.objective.weights)
    values = active_parts(parts, run.objective.weights)
    values["total"] = float(total.detach())
    check_finite(values, run.step)
    total.backward()
    if run.cfg.optim.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.net.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return values


def train_gedi(
    cfg: GediRunConfig, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a GEDI network unsupervised on MNIST-train, evaluate it, write the run folder.

    Args:
        cfg: the run configuration.
        resume: continue from ``<out_dir>/<name>/checkpoint.pt``.
        progress: show a progress bar.

    Returns:
        The metrics written to ``metrics.json``.
    """
    o = cfg.optim
    if cfg.model.clusters_per_value != 1:
        raise ConfigError(
            f"model.clusters_per_value = {cfg.model.clusters_per_value}: standalone GEDI has no "
            "values to group clusters into; set it to 1 and model.k to the number of clusters"
        )
    run_dir, device = start_run(
        cfg.out_dir, cfg.name, to_dict(cfg), threads=o.threads, device=o.device, seed=o.seed
    )
    images, _ = load_images("mnist", "train", cfg.data.root)
    images = _first(images, cfg.data.n_train)  # (N, 1, 28, 28)
    run = _Run(cfg, device)
    ckpt = run_dir / "checkpoint.pt"
    if resume:
        saved = load_checkpoint(ckpt)
        check_resume_config(with_defaults(type(cfg), saved["config"]), to_dict(cfg), ckpt)
        run.load_state_dict(saved)
    log = StepLog(run_dir / "log.jsonl", resume_step=run.step if resume else None)
    bar = tqdm(total=o.steps, initial=run.step, disable=not progress, desc=cfg.name)
    start = time.perf_counter()
    first_step = run.step
    while run.step < o.steps:
        idx = batch_indices(len(images), o.batch_size, o.seed, run.step)
        values = _train_step(run, images[idx].to(device))
        run.step += 1
        bar.update(1)
        if run.step % o.log_every == 0 or run.step == o.steps:
            log.write({"step": run.step, "lr": run.scheduler.get_last_lr()[0], **values})
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
        if run.step % o.checkpoint_every == 0 or run.step == o.steps:
            save_checkpoint(ckpt, {**run.state_dict(), "config": to_dict(cfg)})
    bar.close()
    seconds = time.perf_counter() - start
    metrics = evaluate_gedi(run.net, run.objective, cfg, run_dir)
    metrics.update(
        steps=run.step,
        train_seconds=round(seconds, 2),
        seconds_per_step=round(seconds / max(1, run.step - first_step), 4),
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
