"""VQGAN (Esser, Rombach, Ommer 2021, "Taming Transformers for High-Resolution Image Synthesis").

A VQ-VAE trained with only a pixel loss makes blurry images: when the decoder is unsure
about a detail, the average of the candidates minimises L1/L2. VQGAN keeps the VQ-VAE's
encoder -> codebook -> decoder but trains the decoder against two more critics:

- a perceptual loss (LPIPS in the paper; minigen.perceptual offline), which compares
  feature maps of a trained network instead of pixels, and
- a patch discriminator D (PatchGAN, Isola et al. 2017), which scores every patch of the
  reconstruction as real or fake; the decoder is rewarded for fooling it.

The generator (encoder + quantizer + decoder) minimises

    L_G = |x - x_hat| + perceptual_weight * P(x, x_hat)        (L_rec)
          + codebook_weight * L_VQ                            (codebook + beta * commitment)
          + lambda * disc_factor * (-mean D(x_hat))            (L_GAN, once step >= disc_start)

and D minimises the hinge loss 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))).

The GAN weight lambda is *adaptive*: lambda = ||grad_W L_rec|| / (||grad_W L_GAN|| + 1e-4)
with W the decoder's last layer, clamped to [0, 1e4], detached and times disc_weight (0.8).
It balances the two gradients where they meet, so the GAN term can neither be drowned out
nor take over, whatever the scale of either loss (`adaptive_weight=False` replaces it with the
constant lambda = disc_weight, to measure what the adaptive part contributes). The discriminator
is switched on only at step disc_start: a GAN on top of a random autoencoder mostly adds noise.

A lesson hands in its own pieces: `VQGAN(cfg, d_loss_fn=my_hinge, adaptive_weight_fn=my_weight,
discriminator=my_patchgan, ...)`. Defaults follow taming-transformers; conventions.md lists
the choices (paper's VQ losses, hinge loss, Adam betas (0.5, 0.9)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.data import check_images
from minigen.nn import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from minigen.vq import VectorQuantizer

# ----------------------------------------------------------------------------- GAN losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))).

    D is pushed to output >= 1 on real patches and <= -1 on fake ones, and is no longer
    pushed once it is that sure (the margin keeps it from growing without bound).
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The original GAN's discriminator loss with logits: 1/2 (mean softplus(-D(x)) + mean softplus(D(x_hat))).

    softplus(-l) = -log sigmoid(l): the binary cross-entropy of "real" for a real patch.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's GAN loss, -mean D(x_hat) (taming uses it with both D losses)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 0.8, eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_W rec_loss|| / (||grad_W g_loss|| + eps), clamped to [0, max_weight], detached, x disc_weight.

    W = `last_layer`, the weight of the decoder's last convolution: the one parameter both
    losses reach through the same path, so comparing their gradients there compares how hard
    each pulls on the image. retain_graph=True keeps the graph for the backward pass that
    follows. The result is a constant for the optimizer (detached).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}

# ----------------------------------------------------------------------------- networks


def _weights_init(m: nn.Module) -> None:
    """PatchGAN init (pix2pix / taming): conv weights N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)  # conv biases keep PyTorch's default, as in taming
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: a map of real/fake logits, one per overlapping image patch.

    conv k4 s2 (no norm) -> (n_layers - 1) x [conv k4 s2, BatchNorm] -> conv k4 s1, BatchNorm
    -> conv k4 s1 to 1 channel; LeakyReLU(0.2) after every conv but the last; channels
    ndf * min(2^i, 8). With padding 1, a stride-2 conv halves an even size and a stride-1 conv
    takes one pixel off, so an S x S image gives (S / 2^n_layers - 2)^2 logits: taming's
    n_layers = 3 turns 256 px into 30 x 30 patches, but 32 px into only 2 x 2, hence
    n_layers = 2 (6 x 6 logits) for small images.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.in_channels, self.n_layers = in_channels, n_layers
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):  # the stride-2 stack; no conv bias in front of a BatchNorm
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    @staticmethod
    def output_size(image_size: int, n_layers: int) -> int:
        """Side of the logit map for a square image (0 or less: the image is too small)."""
        s = image_size
        for _ in range(n_layers):
            s = (s + 2 - 4) // 2 + 1
        return s - 2  # two stride-1 k4 p1 convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"NLayerDiscriminator expects {self.in_channels}-channel images "
                             f"(N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if self.output_size(min(x.shape[-2:]), self.n_layers) < 1:
            raise ValueError(f"{x.shape[-2]}x{x.shape[-1]} images are too small for a {self.n_layers}-layer "
                             f"PatchGAN; use fewer layers (disc_layers)")
        return self.main(x)


def _levels(ch: int, ch_mult) -> list[int]:
    return [ch * m for m in ch_mult]


def _widen_norm_groups(module: nn.Module, min_group_channels: int) -> None:
    """Give every GroupNorm in `module` at least `min_group_channels` channels per group.

    minigen.nn.Normalize uses 32 groups (taming's choice, made for 128+ channels). At our
    CPU widths (16, 32) that is one channel per group, i.e. InstanceNorm, which removes each
    image's per-channel mean: a flat red background and a flat blue one look alike to the
    next layer, and colours come back wrong. Measured on shapes, 240 steps, L1 only: PSNR
    15.1 dB with 1 channel per group, 19.2 dB with 4. At taming's widths (>= 128 channels)
    this changes nothing: 32 groups of >= 4 channels.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                c = child.num_channels
                groups = max(1, min(child.num_groups, c // min_group_channels))
                setattr(parent, name, Normalize(c, num_groups=groups, eps=child.eps))


class Encoder(nn.Module):
    """Image (N, C, S, S) -> features (N, z_channels, S / 2^(L-1), ...) for L = len(ch_mult) levels.

    conv_in; per level num_res_blocks ResnetBlocks (+ AttnBlock at the resolutions in
    attn_resolutions) and a Downsample except after the last level; a middle ResnetBlock,
    AttnBlock, ResnetBlock at the lowest resolution; GroupNorm, SiLU, conv_out. Every
    GroupNorm keeps >= min_group_channels channels per group (see _widen_norm_groups).
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions=(8,), resolution: int = 32, z_channels: int = 64, dropout: float = 0.0,
                 min_group_channels: int = 4):
        super().__init__()
        self.out_channels = z_channels
        widths = _levels(ch, ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, resolution
        for i, block_out in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                level.attn.append(AttnBlock(block_out) if res in attn_resolutions else nn.Identity())
                block_in = block_out
            if i != len(widths) - 1:
                level.downsample = Downsample(block_in)
                res = (res + 1) // 2
            self.down.append(level)
        self.mid_block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid_attn_1 = AttnBlock(block_in)
        self.mid_block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)
        _widen_norm_groups(self, min_group_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (N, z_channels, s, s) -> image (N, C, s * 2^(L-1), ...), unbounded output.

    The encoder mirrored: conv_in, middle block, then the levels from the lowest resolution
    up, each with num_res_blocks + 1 ResnetBlocks (+ attention) and an Upsample except after
    the top level; GroupNorm, SiLU, conv_out. conv_out.weight is the "last layer" of the
    adaptive GAN weight.
    """

    def __init__(self, out_channels: int = 3, ch: int = 64, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions=(8,), resolution: int = 32, z_channels: int = 64, dropout: float = 0.0,
                 min_group_channels: int = 4):
        super().__init__()
        self.in_channels = z_channels
        widths = _levels(ch, ch_mult)
        sizes = [resolution]  # the resolution of every level, top to bottom (ceil halving, as the encoder)
        for _ in widths[1:]:
            sizes.append((sizes[-1] + 1) // 2)
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid_block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid_attn_1 = AttnBlock(block_in)
        self.mid_block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.up = nn.ModuleList()  # stored top level first (index = level), run bottom up
        levels = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, widths[i], dropout=dropout))
                level.attn.append(AttnBlock(widths[i]) if sizes[i] in attn_resolutions else nn.Identity())
                block_in = widths[i]
            if i != 0:
                level.upsample = Upsample(block_in)
                level.out_size = sizes[i - 1]
            levels.insert(0, level)
        self.up.extend(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        _widen_norm_groups(self, min_group_channels)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(h)))
        for level in reversed(self.up):
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            if hasattr(level, "upsample"):
                h = level.upsample(h, size=(level.out_size, level.out_size))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the model


@dataclass
class VQGANConfig:
    in_channels: int = 3
    image_size: int = 32
    # encoder / decoder: 32x32 -> 8x8 latent with ch_mult of length 3. Small enough to train
    # on a laptop CPU (taming: ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2 at 256 px)
    ch: int = 16
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple | None = None   # None: attention at the lowest resolution only
    dropout: float = 0.0
    min_group_channels: int = 4             # GroupNorm: at least this many channels per group
    z_channels: int = 32
    # quantizer (minigen.vq.VectorQuantizer)
    code_dim: int = 32
    num_codes: int = 512
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    dead_code_threshold: float = 1.0
    kmeans_init: bool = False
    # losses
    codebook_weight: float = 1.0
    perceptual: str = "judge"               # "judge" (offline, minigen.perceptual) | "lpips" | "none"
    perceptual_weight: float = 1.0
    lpips_path: str | None = None
    disc_loss: str = "hinge"                # "hinge" | "vanilla"
    disc_start: int = 500                   # GAN terms switch on at this step
    disc_weight: float = 0.8                # x the adaptive weight (or the weight itself, see below)
    adaptive_weight: bool = True            # False: lambda = disc_weight, a constant (an ablation)
    disc_factor: float = 1.0
    disc_layers: int | None = None          # None: 2 for images up to 32 px, else 3
    disc_ndf: int = 32                      # taming: 64; halved for CPU budgets at 32 px
    betas: tuple = (0.5, 0.9)               # Adam betas of both optimizers (taming)

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.betas = tuple(float(b) for b in self.betas)
        if self.attn_resolutions is not None:
            self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one level, e.g. (1, 2, 2)")
        f = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**(len(ch_mult) - 1) = {f}; "
                             f"use fewer levels in ch_mult or resize the images")
        if self.disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {self.disc_loss!r}")
        if self.perceptual not in ("judge", "lpips", "none"):
            raise ValueError(f"perceptual must be 'judge', 'lpips' or 'none', got {self.perceptual!r}")
        if self.disc_weight < 0:
            raise ValueError(f"disc_weight must be >= 0, got {self.disc_weight}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")
        n = self.discriminator_layers
        if NLayerDiscriminator.output_size(self.image_size, n) < 1:
            raise ValueError(f"{self.image_size}px images are too small for a {n}-layer discriminator; "
                             f"set disc_layers lower")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def discriminator_layers(self) -> int:
        if self.disc_layers is not None:
            return self.disc_layers
        return 2 if self.image_size <= 32 else 3


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder, plus a
    discriminator and a perceptual loss for training (see the module docstring).

    Every part can be handed in: encoder, decoder, quantizer, discriminator, the
    discriminator loss `d_loss_fn(logits_real, logits_fake)`, the generator's GAN loss
    `g_loss_fn(logits_fake)`, `adaptive_weight_fn(rec_loss, g_loss, last_layer, disc_weight)`
    and `perceptual` (a module (x, y) -> per-image distances; by default the one the config
    names). A handed-in decoder should expose its last layer's weight as `conv_out.weight`
    or through `get_last_layer()`.
    """

    def __init__(self, config: VQGANConfig | None = None, encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, quantizer: nn.Module | None = None,
                 discriminator: nn.Module | None = None, d_loss_fn=None, adaptive_weight_fn=None,
                 perceptual: nn.Module | None = None, g_loss_fn=None):
        super().__init__()
        self.config = cfg = config or VQGANConfig()
        attn = cfg.attn_resolutions if cfg.attn_resolutions is not None else (cfg.latent_size,)
        net = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, attn_resolutions=attn,
                   resolution=cfg.image_size, z_channels=cfg.z_channels, dropout=cfg.dropout,
                   min_group_channels=cfg.min_group_channels)
        self.encoder = encoder if encoder is not None else Encoder(cfg.in_channels, **net)
        self.decoder = decoder if decoder is not None else Decoder(cfg.in_channels, **net)
        self.quantize = quantizer if quantizer is not None else VectorQuantizer(
            cfg.num_codes, cfg.code_dim, cfg.beta, ema=cfg.ema, decay=cfg.decay,
            dead_code_threshold=cfg.dead_code_threshold, kmeans_init=cfg.kmeans_init)
        q_dim = getattr(self.quantize, "code_dim", cfg.code_dim)
        if q_dim != cfg.code_dim:
            raise ValueError(f"the quantizer has code_dim={q_dim} but VQGANConfig.code_dim={cfg.code_dim}; "
                             f"make them equal")
        enc_out = getattr(self.encoder, "out_channels", None) or self._probe_encoder()
        dec_in = getattr(self.decoder, "in_channels", None) or cfg.z_channels
        self.quant_conv = nn.Conv2d(enc_out, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, dec_in, 1)
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator(
            cfg.in_channels, cfg.disc_ndf, cfg.discriminator_layers)
        if perceptual is None and cfg.perceptual_weight > 0:
            from minigen.perceptual import build_perceptual

            perceptual = build_perceptual(cfg.perceptual, cfg.in_channels, cfg.lpips_path)
        self.perceptual = perceptual
        if self.perceptual is not None:
            self.perceptual.requires_grad_(False)  # frozen: never trained, never in an optimizer
        self.d_loss_fn = d_loss_fn or D_LOSSES[cfg.disc_loss]
        self.g_loss_fn = g_loss_fn or generator_loss
        self.adaptive_weight_fn = adaptive_weight_fn or adaptive_weight
        self._check_shapes()

    # -- construction helpers

    @staticmethod
    def _eval_call(module: nn.Module, x):
        was = module.training
        module.eval()  # a probe must not update BatchNorm statistics
        try:
            return module(x)
        finally:
            module.train(was)

    def _probe_encoder(self) -> int:
        c, s = self.config.in_channels, self.config.image_size
        with torch.no_grad():
            return self._eval_call(self.encoder, torch.zeros(1, c, s, s)).shape[1]

    def _check_shapes(self) -> None:
        cfg = self.config
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            try:
                h = self.quant_conv(self._eval_call(self.encoder, x))
            except RuntimeError as e:
                raise ValueError(f"the encoder cannot take images of shape {tuple(x.shape[1:])}: {e}") from None
            s = cfg.latent_size
            if tuple(h.shape[-2:]) != (s, s):
                raise ValueError(f"the encoder maps {cfg.image_size}px images to {h.shape[-2]}x{h.shape[-1]} "
                                 f"latents; VQGANConfig(ch_mult={cfg.ch_mult}) expects {s}x{s}")
            try:
                y = self._eval_call(self.decoder, self.post_quant_conv(h))
            except RuntimeError as e:
                raise ValueError(f"the decoder cannot take ({self.post_quant_conv.out_channels}, {s}, {s}) "
                                 f"features: {e}") from None
            if y.shape != x.shape:
                raise ValueError(f"the decoder returns {tuple(y.shape[1:])} images, expected {tuple(x.shape[1:])}")
        self.get_last_layer()  # fails now, not at disc_start, if there is none

    def get_last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer: W in the adaptive GAN weight."""
        if callable(getattr(self.decoder, "get_last_layer", None)):
            return self.decoder.get_last_layer()
        conv_out = getattr(self.decoder, "conv_out", None)
        if isinstance(conv_out, nn.Module) and isinstance(getattr(conv_out, "weight", None), torch.Tensor):
            return conv_out.weight
        raise TypeError(f"cannot find the last layer of {type(self.decoder).__name__}: name its final conv "
                        f"`conv_out` or give it a get_last_layer() method returning that layer's weight")

    def _check_input(self, x, name: str) -> None:
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name=name)

    # -- the autoencoder

    def encode(self, x: torch.Tensor):
        """x in [-1, 1] -> (z_q (N, code_dim, h, w), indices (N, h, w)).

        Codebook statistics are never updated here (the quantizer runs in eval mode).
        """
        was = self.quantize.training
        self.quantize.eval()
        try:
            z_q, _, info = self.quantize(self.quant_conv(self.encoder(x)))
        finally:
            self.quantize.train(was)
        return z_q, info["indices"]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised features -> images (unclamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids (N, h, w) -> images, e.g. tokens sampled from a transformer prior."""
        return self.decode(self.quantize.get_codebook_entry(indices))

    def forward(self, x: torch.Tensor):
        """x -> (x_hat, vq_loss, info); updates codebook statistics in training mode."""
        z_q, vq_loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decode(z_q), vq_loss, info

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, quantise, decode; clamped to [-1, 1]. Updates no codebook statistics."""
        self._check_input(x, "VQGAN.reconstruct input")
        return self.decode(self.encode(x)[0]).clamp(-1, 1)

    # -- training

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at `step` (taming's adopt_weight: off until disc_start)."""
        return step >= self.config.disc_start and self.config.disc_factor > 0

    def training_loss(self, batch, step: int = 0, name: str = "g") -> dict:
        """The loss of optimizer `name` ("g": encoder/quantizer/decoder, "d": discriminator).

        minigen.train.fit calls it with "g" then "d" on the same batch every step.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._check_input(x, "VQGAN input")
        if name == "g":
            return self._generator_loss(x, step)
        if name == "d":
            return self._discriminator_loss(x, step)
        raise ValueError(f"VQGAN.training_loss: name must be 'g' or 'd' (the optimizers of "
                         f"configure_optimizers), got {name!r}")

    def _generator_loss(self, x: torch.Tensor, step: int) -> dict:
        cfg = self.config
        x_hat, vq_loss, info = self(x)
        l1 = (x - x_hat).abs().mean()
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p_loss = self.perceptual(x, x_hat).mean()
        else:
            p_loss = torch.zeros((), device=x.device)
        rec_loss = l1 + cfg.perceptual_weight * p_loss
        loss = rec_loss + cfg.codebook_weight * vq_loss

        zero = torch.zeros((), device=x.device)
        g_loss, d_weight = zero, zero
        if self.gan_active(step):
            g_loss = self.g_loss_fn(self.discriminator(x_hat))  # no detach: G learns through D
            if not cfg.adaptive_weight:
                d_weight = torch.tensor(cfg.disc_weight, device=x.device)  # a fixed lambda
            elif torch.is_grad_enabled():
                d_weight = self.adaptive_weight_fn(rec_loss, g_loss, self.get_last_layer(), cfg.disc_weight)
            # (adaptive, under no_grad, e.g. a validation pass: no gradient to balance, weight 0)
            loss = loss + d_weight * cfg.disc_factor * g_loss
        return dict(loss=loss, l1=l1.detach(), perceptual=p_loss.detach(), rec=rec_loss.detach(),
                    vq=vq_loss.detach(), g_gan=g_loss.detach(), d_weight=d_weight.detach(),
                    perplexity=info["perplexity"].detach(), usage=info["usage"].detach())

    def _discriminator_loss(self, x: torch.Tensor, step: int) -> dict:
        cfg = self.config
        if not self.gan_active(step):
            # D is not even run before disc_start; the zero loss is still attached to its
            # parameters so that the training loop can backpropagate it (all grads are 0).
            zero = sum(p.sum() for p in self.discriminator.parameters() if p.requires_grad) * 0.0
            return dict(loss=zero, d_loss=zero.detach(), logits_real=zero.detach(), logits_fake=zero.detach())
        # The reconstruction is recomputed without a graph, with the quantizer in eval mode so
        # that its codebook statistics are updated once per step (in the "g" pass). fit runs
        # this after the generator's update, so D sees the current generator's output (as in
        # taming's Lightning loop). Caching the "g" pass's x_hat would save this forward but
        # breaks with gradient accumulation.
        with torch.no_grad():
            x_hat = self.decode(self.encode(x)[0])
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        return dict(loss=cfg.disc_factor * d_loss, d_loss=d_loss.detach(),
                    logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())

    def generator_parameters(self):
        """Parameters of encoder, quant_conv, quantizer, post_quant_conv and decoder (trainable ones)."""
        mods = (self.encoder, self.quant_conv, self.quantize, self.post_quant_conv, self.decoder)
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def configure_optimizers(self, config) -> dict:
        """{"g": Adam(autoencoder), "d": Adam(discriminator)}, both lr = config.lr, betas (0.5, 0.9).

        The perceptual network is in neither. Weight decay is not used (taming's choice).
        """
        lr = config.lr
        betas = self.config.betas
        return {"g": torch.optim.Adam(self.generator_parameters(), lr=lr, betas=betas),
                "d": torch.optim.Adam([p for p in self.discriminator.parameters() if p.requires_grad],
                                      lr=lr, betas=betas)}


def build(overrides: dict | None, image_shape, num_classes: int | None = None) -> VQGAN:
    """Build a VQGAN for images of shape (C, H, W) with config overrides (the CLI's --set)."""
    from minigen.cli import image_config

    overrides = dict(overrides or {})
    defaults = {}
    if image_shape[0] not in (1, 3) and "perceptual_weight" not in overrides:
        defaults["perceptual"] = "none"  # the offline judges exist for 1- and 3-channel images only
    return VQGAN(image_config(VQGANConfig, overrides, image_shape, **defaults))


__all__ = ["hinge_d_loss", "vanilla_d_loss", "generator_loss", "adaptive_weight", "NLayerDiscriminator",
           "Encoder", "Decoder", "VQGANConfig", "VQGAN", "build"]
