"""A plain convolutional autoencoder: the starting point of the course.

An autoencoder squeezes an image through a small code z = E(x) and rebuilds it, x̂ = D(z),
by minimising a reconstruction loss. It learns to compress, but it is not yet a generative
model: nothing tells us which codes are "valid", so decoding a random z gives garbage.
The VAE (minigen.vae) fixes exactly that.

The parts are constructor arguments so a lesson can hand in the learner's own encoder,
decoder or loss function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AutoEncoderConfig:
    in_channels: int = 3
    image_size: int = 32
    channels: int = 32       # width of the first conv layer; doubled at each downsampling
    latent_channels: int = 8  # channels of the spatial code (image_size/4 squared positions)


def conv_encoder(cfg: AutoEncoderConfig) -> nn.Module:
    """x (N, C, H, W) -> z (N, latent_channels, H/4, W/4)."""
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(cfg.in_channels, c, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),      # H/2
        nn.Conv2d(2 * c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),  # H/4
        nn.Conv2d(2 * c, cfg.latent_channels, 1),
    )


def conv_decoder(cfg: AutoEncoderConfig) -> nn.Module:
    """z (N, latent_channels, H/4, W/4) -> x̂ (N, C, H, W) in [-1, 1] (tanh output)."""
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(cfg.latent_channels, 2 * c, 3, padding=1), nn.SiLU(),
        nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),  # H/2
        nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.SiLU(),      # H
        nn.Conv2d(c, cfg.in_channels, 3, padding=1), nn.Tanh(),
    )


def mse_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every pixel of the batch."""
    return F.mse_loss(x_hat, x)


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig | None = None, encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, loss_fn=None):
        super().__init__()
        self.config = config or AutoEncoderConfig()
        if self.config.image_size % 4:
            raise ValueError(
                f"image_size must be divisible by 4 (two stride-2 downsamplings), got {self.config.image_size}"
            )
        self.encoder = encoder if encoder is not None else conv_encoder(self.config)
        self.decoder = decoder if decoder is not None else conv_decoder(self.config)
        self.loss_fn = loss_fn if loss_fn is not None else mse_loss

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[-2:] != (s, s):
            raise ValueError(
                f"AutoEncoder expects images of shape (N, {c}, {s}, {s}), got {tuple(x.shape)}; "
                f"build it with AutoEncoderConfig(in_channels=..., image_size=...) matching your data"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).clamp(-1, 1)

    def training_loss(self, batch, step: int = 0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return {"loss": self.loss_fn(self(x), x)}

    @property
    def compression(self) -> float:
        """How many times fewer numbers the code holds than the image."""
        c, s = self.config.in_channels, self.config.image_size
        return (c * s * s) / (self.config.latent_channels * (s // 4) ** 2)


def build(overrides: dict, image_shape, num_classes: int) -> AutoEncoder:
    """Build from the command line: image shape from the dataset, other fields from overrides."""
    from minigen.cli import image_config

    return AutoEncoder(image_config(AutoEncoderConfig, overrides, image_shape))
