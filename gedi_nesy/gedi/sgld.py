"""Stochastic gradient Langevin dynamics with a persistent replay buffer (JEM recipe).

``sgld_sample`` is a pure function of its arguments; ``ReplayBuffer`` holds the persistent chains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gedi_nesy.errors import TrainingError


def sgld_sample(
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    n_steps: int,
    step_size: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    max_abs_energy: float = 1e4,
) -> torch.Tensor:
    """Run SGLD chains ``x <- x - step_size * dE/dx + noise_std * N(0, I)`` from ``x0``.

    Step size and noise are decoupled, as in JEM. Gradients are taken w.r.t. the samples only;
    the returned samples are detached.

    Args:
        energy_fn: maps samples (B, ...) to energies (B,).
        x0: initial samples, shape (B, ...).
        n_steps: number of Langevin steps (>= 0).
        step_size: gradient step size.
        noise_std: standard deviation of the Gaussian noise added at each step.
        generator: random generator for the noise (on x0's device), for reproducibility.
        clamp: range the samples are clipped to after each step, or None.
        max_abs_energy: abort when any |E| exceeds this (the chains have diverged).

    Returns:
        Samples after ``n_steps`` steps, shape (B, ...), detached.

    Raises:
        TrainingError: an energy is non-finite or exceeds ``max_abs_energy``.
    """
    x = x0.detach().clone()
    for step in range(n_steps):
        x.requires_grad_(True)
        e = energy_fn(x)  # (B,)
        _check_energies(e, step, max_abs_energy)
        (grad,) = torch.autograd.grad(e.sum(), x)  # (B, ...)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x.detach() - step_size * grad + noise_std * noise  # (B, ...)
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
    return x.detach()


def _check_energies(e: torch.Tensor, step: int, max_abs_energy: float) -> None:
    """Stop on energies that are not finite or exceed the bound. At step 0 no SGLD move has
    happened yet: the network itself diverged (a learning rate too high), not the sampler."""
    finite = bool(torch.isfinite(e).all())
    worst = e.detach().abs().max().item() if finite else math.inf
    if finite and worst <= max_abs_energy:
        return
    what = (
        f"|E| = {worst:.3g} exceeds sgld.max_abs_energy = {max_abs_energy:g}"
        if finite
        else ("non-finite energy")
    )
    if step == 0:
        raise TrainingError(
            f"SGLD step 0: {what} before any SGLD move, so the network's energies diverged, not "
            "the sampler; lower optim.lr, set gedi.energy_reg > 0 or lower gedi.w_gen"
        )
    raise TrainingError(
        f"SGLD step {step}: {what}; lower sgld.step_size, set gedi.energy_reg > 0 or lower "
        "gedi.w_gen"
    )


class ReplayBuffer:
    """Persistent SGLD chains: ``size`` samples of ``shape``, initialised U(low, high).

    Args:
        size: number of stored samples.
        shape: shape of one sample, e.g. (1, 28, 28).
        reinit_freq: probability that a drawn chain restarts from U(low, high).
        low: lower bound of the uniform initialisation (the data range).
        high: upper bound of the uniform initialisation.
        generator: random generator used to fill the buffer.
        device: where the samples live.
    """

    def __init__(
        self,
        size: int,
        shape: tuple[int, ...],
        *,
        reinit_freq: float,
        low: float = -1.0,
        high: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if size < 1:
            raise ValueError(f"replay buffer size must be >= 1, got {size}")
        if not 0.0 <= reinit_freq <= 1.0:
            raise ValueError(f"reinit_freq must be in [0, 1], got {reinit_freq}")
        self.shape = tuple(shape)
        self.reinit_freq = reinit_freq
        self.low, self.high = low, high
        self.samples = self._uniform(size, generator, torch.device(device))  # (size, *shape)

    def _uniform(self, n: int, generator: torch.Generator | None, device: torch.device):
        u = torch.rand((n, *self.shape), generator=generator, device=device)  # (n, *shape)
        return self.low + (self.high - self.low) * u

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` chains; each restarts from uniform noise with prob. ``reinit_freq``.

        Args:
            batch_size: number of chains.
            generator: random generator (on the buffer's device).

        Returns:
            (x0 (B, *shape), idx (B,)): start samples and their distinct buffer indices for
            ``update``.
        """
        device = self.samples.device
        if batch_size > len(self.samples):
            raise ValueError(
                f"cannot draw {batch_size} chains from a buffer of {len(self.samples)}; "
                "raise sgld.buffer_size to at least the batch size"
            )
        # distinct slots: a slot drawn twice would be written back twice, in no defined order
        idx = torch.randperm(len(self.samples), generator=generator, device=device)[:batch_size]
        x0 = self.samples[idx]  # (B, *shape)
        fresh = self._uniform(batch_size, generator, device)  # (B, *shape)
        restart = torch.rand(batch_size, generator=generator, device=device) < self.reinit_freq
        mask = restart.view(-1, *([1] * len(self.shape)))  # (B, 1, ..., 1)
        return torch.where(mask, fresh, x0), idx

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write the chains' final samples back to their slots."""
        self.samples[idx] = x.detach().to(self.samples.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["samples"].shape != self.samples.shape:
            raise TrainingError(
                f"checkpoint replay buffer has shape {tuple(state['samples'].shape)}, the config "
                f"asks for {tuple(self.samples.shape)}; use the config the checkpoint was made with"
            )
        self.samples = state["samples"].to(self.samples.device)
