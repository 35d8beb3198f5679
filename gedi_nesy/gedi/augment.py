"""Two-view augmentations for small grey images (28x28 digits), batched and seedable.

Each image gets its own random affine transform (rotation, scale, shear, translation), applied with
``affine_grid``/``grid_sample`` in one batched call, plus optional pixel noise. Horizontal flips are
not used: they change a digit's identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gedi_nesy.config import AugmentConfig


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def random_affine(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One random affine transform per image; background value -1 (black) outside the image.

    Args:
        x: images, shape (B, C, H, W), in [-1, 1].
        cfg: transform ranges.
        generator: random generator on x's device.

    Returns:
        Transformed images, shape (B, C, H, W), in [-1, 1].
    """
    b, dev = x.shape[0], x.device
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, generator, dev) * math.pi / 180  # (B,)
    shear = _uniform(b, -cfg.shear_deg, cfg.shear_deg, generator, dev) * math.pi / 180  # (B,)
    scale = _uniform(b, cfg.scale[0], cfg.scale[1], generator, dev)  # (B,)
    shift = _uniform(2 * b, -cfg.translate, cfg.translate, generator, dev).view(b, 2)  # (B, 2)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # theta maps output coordinates to input coordinates: rotation @ shear, divided by the zoom
    row0 = torch.stack([cos, cos * tan - sin, shift[:, 0] * scale], -1) / scale[:, None]  # (B, 3)
    row1 = torch.stack([sin, sin * tan + cos, shift[:, 1] * scale], -1) / scale[:, None]  # (B, 3)
    theta = torch.stack([row0, row1], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    shifted = x + 1.0  # background 0 so zero padding means black
    out = F.grid_sample(shifted, grid, padding_mode="zeros", align_corners=False)  # (B, C, H, W)
    return out - 1.0


def augment(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random view of each image: random affine, then Gaussian pixel noise, clipped to [-1, 1]."""
    out = random_affine(x, cfg, generator)  # (B, C, H, W)
    if cfg.noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + cfg.noise_std * noise
    return out.clamp(-1.0, 1.0)
