"""A convolutional variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

An autoencoder maps an image to one code. A VAE maps it to a *distribution* over codes,
q(z|x) = N(mu(x), diag(exp(logvar(x)))), and trains encoder and decoder together by
maximising the evidence lower bound (ELBO), a lower bound on log p(x):

    ELBO(x) = E_{z~q(z|x)}[ log p(x|z) ]  -  KL( q(z|x) || p(z) ),      p(z) = N(0, I)
              \\______ reconstruction ____/    \\______ regulariser _____/

The KL term pulls every q(z|x) towards the prior, so decoding z ~ N(0, I) gives images:
the VAE is a generative model. Three pieces make it trainable, and each is a plain
function a lesson can replace through the constructor:

- `reparameterize(mu, logvar)`: z = mu + sigma * eps, eps ~ N(0, I). The noise is outside
  the network, so gradients flow to mu and logvar (the "reparameterisation trick").
- `gaussian_kl(mu, logvar)`: the KL between two Gaussians has a closed form, no sampling.
- the decoder likelihood p(x|z): `bernoulli_nll` (grey images in [0, 1], decoder outputs
  logits) or `gaussian_nll` (decoder outputs the mean, a fixed or learned scalar variance).

Units. Every loss here is in nats *per image* (summed over pixels and latent dims, averaged
over the batch), so `-elbo(x)` is directly an upper bound on -log p(x). `beta` scales the
KL term (beta-VAE, Higgins et al. 2017); beta = 1 is the true ELBO and the only value for
which the numbers are a likelihood bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.data import check_images

# ----------------------------------------------------------------------------- pieces

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw z ~ N(mu, exp(logvar)) as a differentiable function of mu and logvar.

    z = mu + exp(logvar / 2) * eps with eps ~ N(0, I): the randomness lives in eps, so
    dz/dmu = 1 and dz/dlogvar = eps * sigma / 2 are ordinary gradients.
    """
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


_default_reparameterize = reparameterize  # VAE's argument of the same name shadows it


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, exp(logvar)) || N(0, I) ) per example, in nats, summed over latent dims.

    Closed form per dimension: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2). Always >= 0, and
    0 exactly when mu = 0 and logvar = 0. Input (N, ...) -> output (N,).
    """
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) under independent Bernoulli pixels, per image, in nats.

    `x` is an image batch in [-1, 1] (minigen's convention); it is mapped to [0, 1] and used
    as the Bernoulli target. `logits` are the decoder's raw outputs (never apply a sigmoid
    first: BCE-with-logits is the numerically stable form). Summed over C, H, W -> (N,).

    The value is an exact log-likelihood only for binary images. For grey levels in [0, 1]
    it is the cross-entropy commonly used for MNIST-like data, not a normalised density
    over 256 grey levels, so its bits/dim is not comparable to an 8-bit model's.
    """
    target = (x + 1) / 2
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


def gaussian_nll(mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-log N(x; mean, exp(logvar)) per image, in nats, with every constant kept.

    Per pixel: 0.5 * (log(2 pi) + logvar + (x - mean)^2 / exp(logvar)). With the
    0.5*log(2 pi) and logvar terms this is a proper density on R^D (in the units of x, i.e.
    the [-1, 1] scale), so the result is a real negative log-density; dropping them (as a
    plain MSE loss does) changes the optimum of a learned variance and the reported nats.
    `logvar` is a scalar (float or 0-dim tensor) or broadcastable to `mean`.
    """
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    nll = 0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))
    return nll.expand_as(mean).flatten(1).sum(1)


def _bits_per_dim(nll_nats, num_dims: int):
    """nats per image -> bits per dimension. Uses minigen.metrics.bits_per_dim when present."""
    try:
        from minigen.metrics import bits_per_dim
    except ImportError:  # metrics.py is optional for this module; same formula
        return nll_nats / (num_dims * math.log(2))
    return bits_per_dim(nll_nats, num_dims)


# ----------------------------------------------------------------------------- model


@dataclass
class VAEConfig:
    in_channels: int = 1
    image_size: int = 28
    latent_dim: int = 16
    hidden_channels: tuple = (32, 64)   # one stride-2 conv per entry: 28 -> 14 -> 7
    likelihood: str = "bernoulli"       # "bernoulli" (decoder gives logits) | "gaussian" (decoder gives the mean)
    sigma: float = 0.1                  # gaussian only: decoder std on the [-1, 1] scale (initial value if learned)
    learn_sigma: bool = False           # gaussian only: learn one scalar log-variance
    beta: float = 1.0                   # weight of the KL term; 1 = the ELBO

    def __post_init__(self):
        self.hidden_channels = tuple(int(c) for c in self.hidden_channels)
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        if not self.hidden_channels or min(self.hidden_channels) < 1:
            raise ValueError(f"hidden_channels must be a non-empty list of positive ints, got {self.hidden_channels}")
        factor = 2 ** len(self.hidden_channels)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{len(self.hidden_channels)} = {factor} "
                f"(one stride-2 conv per entry of hidden_channels); use fewer hidden_channels or resize the images")
        if self.latent_dim < 1 or self.in_channels < 1:
            raise ValueError(f"latent_dim and in_channels must be >= 1, got {self.latent_dim}, {self.in_channels}")
        if self.sigma <= 0 or self.beta < 0:
            raise ValueError(f"need sigma > 0 and beta >= 0, got sigma={self.sigma}, beta={self.beta}")

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size * self.image_size


class Encoder(nn.Module):
    """x (N, C, H, W) -> (mu, logvar), each (N, latent_dim): the parameters of q(z|x)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        layers, c_in = [], config.in_channels
        for c in config.hidden_channels:  # k4 s2 p1 halves H and W exactly
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        s = config.image_size // 2 ** len(config.hidden_channels)
        # one linear layer gives both heads: mu and logvar
        self.fc = nn.Linear(c_in * s * s, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.fc(self.conv(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z (N, latent_dim) -> (N, C, H, W): Bernoulli logits or the Gaussian mean."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        chs = config.hidden_channels[::-1]
        self.s = config.image_size // 2 ** len(chs)
        self.c0 = chs[0]
        self.fc = nn.Linear(config.latent_dim, chs[0] * self.s * self.s)
        layers = [nn.SiLU()]
        for c_in, c_out in zip(chs, chs[1:] + (chs[-1],)):  # k4 s2 p1 transposed conv doubles H and W
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        # no output activation: logits (Bernoulli) and an unbounded mean (Gaussian) are both on R
        layers.append(nn.Conv2d(chs[-1], config.in_channels, 3, padding=1))
        self.conv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(self.fc(z).view(-1, self.c0, self.s, self.s))


class VAE(nn.Module):
    """Convolutional VAE with a Bernoulli or Gaussian decoder.

    `reparameterize(mu, logvar) -> z` and `kl(mu, logvar) -> (N,)` default to this module's
    functions; a lesson passes its own. `nll(decoder_output, x) -> (N,)` optionally replaces
    the reconstruction term (default: `bernoulli_nll`, or `gaussian_nll` with the model's
    variance).
    """

    def __init__(self, config: VAEConfig | None = None, reparameterize=None, kl=None, nll=None,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = encoder if encoder is not None else Encoder(config)
        self.decoder = decoder if decoder is not None else Decoder(config)
        self.reparameterize = reparameterize if reparameterize is not None else _default_reparameterize
        self.kl = kl if kl is not None else gaussian_kl
        self.nll = nll
        if config.likelihood == "gaussian":
            logvar = torch.tensor(2 * math.log(config.sigma))
            if config.learn_sigma:
                self.decoder_logvar = nn.Parameter(logvar)
            else:
                self.register_buffer("decoder_logvar", logvar)

    # -- the three terms

    def reconstruction_nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image in nats, from the decoder output `out`."""
        if self.nll is not None:
            return self.nll(out, x)
        if self.config.likelihood == "bernoulli":
            return bernoulli_nll(out, x)
        return gaussian_nll(out, x, self.decoder_logvar)

    def forward(self, x: torch.Tensor) -> dict:
        """One pass: encode, sample z, decode. Returns per-image recon and kl (N,) plus the parts."""
        mu, logvar = self.encoder(x)
        z = self.reparameterize(mu, logvar)
        out = self.decoder(z)
        return dict(recon=self.reconstruction_nll(out, x), kl=self.kl(mu, logvar), out=out, mu=mu, logvar=logvar, z=z)

    def training_loss(self, batch, step: int = 0) -> dict:
        """Negative beta-ELBO averaged over the batch (nats per image), with its two terms."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name="VAE input")
        r = self(x)
        recon, kl = r["recon"].mean(), r["kl"].mean()
        # Loss in nats per image: large numbers (hundreds), which Adam does not mind.
        return dict(loss=recon + self.config.beta * kl, recon=recon.detach(), kl=kl.detach())

    # -- likelihood evaluation

    def _elbo_terms(self, x: torch.Tensor, n_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl) per image, recon averaged over n_samples draws of z ~ q(z|x); no checks."""
        mu, logvar = self.encoder(x)
        recon = torch.stack([self.reconstruction_nll(self.decoder(self.reparameterize(mu, logvar)), x)
                             for _ in range(n_samples)]).mean(0)
        return recon, self.kl(mu, logvar)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, n_samples: int = 1) -> torch.Tensor:
        """ELBO(x) per image in nats, (N,): a lower bound on log p(x) (beta is *not* applied).

        Averages `n_samples` draws of z ~ q(z|x) (each an unbiased estimate of the ELBO).
        For the Gaussian decoder this is a continuous log-*density* on the [-1, 1] scale;
        see `evaluate` for bits/dim comparable with 8-bit models.
        """
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name="VAE.elbo input")
        recon, kl = self._elbo_terms(x, n_samples)
        return -(recon + kl)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch_size: int = 500, n_samples: int = 1) -> dict:
        """Test-set figures: mean ELBO (nats/image), its terms, and bits per dimension.

        bits/dim means different things per likelihood; "bpd_kind" says which:
        - gaussian: "dequantized 8-bit". A density's bits/dim is not comparable with a
          discrete model's, so we add uniform noise u over each 8-bit bin (width 2/255 on
          the [-1, 1] scale) and use -log P(bin) <= -E_u[log p(x+u)] - log(2/255) per dim
          (Jensen), with -ELBO in place of -log p: an upper bound on the discrete 8-bit NLL.
          "elbo" itself is the continuous density's ELBO on the data as given.
        - bernoulli: "bernoulli cross-entropy", -ELBO / (D ln 2); a likelihood bound only for
          binary pixels, not comparable with 8-bit figures.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        D = self.config.num_dims
        sums = dict(elbo=0.0, recon=0.0, kl=0.0, nll_bound=0.0)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            check_images(xb, channels=self.config.in_channels, size=self.config.image_size, name="VAE.evaluate input")
            recon, kl = self._elbo_terms(xb, n_samples)
            sums["elbo"] += float(-(recon + kl).sum())
            sums["recon"] += float(recon.sum())
            sums["kl"] += float(kl.sum())
            if self.config.likelihood == "gaussian":
                u = (torch.rand_like(xb) - 0.5) * (2 / 255)  # uniform over the 8-bit bin
                recon_u, kl_u = self._elbo_terms(xb + u, n_samples)
                sums["nll_bound"] += float((recon_u + kl_u).sum()) + xb.shape[0] * D * math.log(255 / 2)
            else:
                sums["nll_bound"] += float((recon + kl).sum())
        self.train(was_training)
        out = {k: v / x.shape[0] for k, v in sums.items()}
        out["bits_per_dim"] = float(_bits_per_dim(out["nll_bound"], D))
        out["bpd_kind"] = "dequantized 8-bit" if self.config.likelihood == "gaussian" else "bernoulli cross-entropy"
        return out

    # -- generation

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) on the [-1, 1] scale (sigmoid of the logits, mapped, for Bernoulli)."""
        out = self.decoder(z)
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(out) * 2 - 1
        return out

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, z: torch.Tensor | None = None) -> torch.Tensor:
        """Generate n images: z ~ N(0, I), then the mean of p(x|z) (or a draw, mean=False).

        Means are what papers show; a Bernoulli draw is speckled binary noise around it.
        Returns (n, C, H, W) on the [-1, 1] scale (a Gaussian draw can leave it; see sample_images).
        """
        device = next(self.parameters()).device
        if z is None:
            z = torch.randn(n, self.config.latent_dim, device=device)
        m = self.decode_mean(z)
        if mean:
            return m
        if self.config.likelihood == "bernoulli":
            return torch.bernoulli((m + 1) / 2) * 2 - 1
        return m + torch.exp(0.5 * self.decoder_logvar) * torch.randn_like(m)

    @torch.no_grad()
    def sample_images(self, n: int) -> torch.Tensor:
        """n generated images in [-1, 1] (decoder means, clamped) for sample grids."""
        return self.sample(n).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean z = mu(x): the deterministic reconstruction, in [-1, 1]."""
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name="VAE.reconstruct input")
        mu, _ = self.encoder(x)
        return self.decode_mean(mu).clamp(-1, 1)

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode straight lines between the posterior means of x1 and x2.

        x1, x2: (C, H, W) or (N, C, H, W). Returns (N * steps, C, H, W) in [-1, 1], one row
        of `steps` images per pair, so plot.image_grid(out, nrow=steps) shows one pair a row.
        """
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (the two endpoints), got {steps}")
        x1 = x1.unsqueeze(0) if x1.dim() == 3 else x1
        x2 = x2.unsqueeze(0) if x2.dim() == 3 else x2
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        check_images(torch.cat([x1, x2]), channels=self.config.in_channels, size=self.config.image_size,
                     name="VAE.interpolate input")
        mu1, _ = self.encoder(x1)
        mu2, _ = self.encoder(x2)
        t = torch.linspace(0, 1, steps, device=mu1.device).view(1, steps, 1)
        z = (1 - t) * mu1[:, None] + t * mu2[:, None]          # (N, steps, latent)
        return self.decode_mean(z.flatten(0, 1)).clamp(-1, 1)


def build(overrides: dict | None, image_shape, num_classes: int | None = None) -> VAE:
    """Build a VAE for images of shape (C, H, W) with config overrides (the CLI's --set)."""
    from minigen.cli import image_config

    c, h, _ = image_shape
    defaults = {}
    if c > 1:
        defaults["likelihood"] = "gaussian"  # Bernoulli pixels only make sense for grey images
    if h % 4 and h % 2 == 0:  # 28 and 32 take the default two stride-2 convs; 2 mod 4 sizes get one
        defaults["hidden_channels"] = (32,)
    return VAE(image_config(VAEConfig, overrides, image_shape, **defaults))


__all__ = ["VAEConfig", "Encoder", "Decoder", "VAE", "reparameterize", "gaussian_kl", "bernoulli_nll",
           "gaussian_nll", "build"]
