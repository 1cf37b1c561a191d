"""Vector quantisation and the VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

A VQ-VAE replaces the VAE's Gaussian code by a grid of *tokens*: the encoder's output
z_e (N, D, h, w) is snapped, position by position, to the nearest of K learned vectors
e_1..e_K (the codebook), and the decoder rebuilds the image from those vectors. The image
becomes h*w integers in [0, K), which a transformer can later model (minigen.transformer).

Nearest-neighbour lookup has no gradient, so three tricks make it trainable:

- straight-through estimator: z_q = z + sg[z_q - z]. The forward value is the codebook
  vector; the backward pass copies the decoder's gradient onto z unchanged.
- codebook loss ||sg[z] - e||^2 moves the chosen codes towards the encoder outputs.
- commitment loss beta * ||z - sg[e]||^2 keeps the encoder close to its codes (beta = 0.25).

The two losses have the same *value* (the same squared distance); they differ only in
which side gets the gradient. A codebook can also be learned without gradients, as an
exponential moving average (EMA) of the vectors assigned to each code (paper, appendix).

Codebook collapse, where most codes are never chosen, is the classic failure. We track
each code's usage with an EMA and replace codes whose usage falls below a threshold by
random encoder outputs of the current batch ("dead-code replacement"); optionally we
initialise the codebook with k-means on the first batch.

The pieces a lesson replaces are plain functions (`quantize`, `vq_losses`,
`straight_through`, `ema_update`, `perplexity`); `VectorQuantizer` and `VQVAE` take the
learner's versions as constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minigen.data import check_images

# ----------------------------------------------------------------------------- pieces


def quantize(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook vector for every row of z_flat: (M, D), (K, D) -> (M,) int64.

    Squared distances are expanded as ||z||^2 + ||e||^2 - 2 z.e^T, one matrix product instead
    of an (M, K, D) difference tensor. Always computed in float32: under bf16/fp16 autocast
    the rounding of 2 z.e^T is large next to the gaps between nearby codes and flips argmins.
    """
    with torch.autocast(device_type=z_flat.device.type, enabled=False):
        z, e = z_flat.float(), codebook.float()
        d = torch.addmm(z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1), z, e.t(), beta=1.0, alpha=-2.0)
        return d.argmin(1)


def vq_losses(z: torch.Tensor, z_q: torch.Tensor, beta: float = 0.25):
    """The VQ-VAE paper's two terms: (loss, codebook_loss, commitment_loss).

    codebook_loss = mean ||sg[z] - z_q||^2  (gradient reaches the codebook only)
    commitment_loss = mean ||z - sg[z_q]||^2 (gradient reaches the encoder only)
    loss = codebook_loss + beta * commitment_loss

    Note: taming-transformers' VectorQuantizer with legacy=True (and diffusers' VQModel)
    computes mean((z_q - sg z)^2) + beta * mean((sg z_q - z)^2) with the roles swapped,
    i.e. beta on the *codebook* term. We follow the paper.
    """
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment_loss = F.mse_loss(z, z_q.detach())
    return codebook_loss + beta * commitment_loss, codebook_loss, commitment_loss


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward: z_q. Backward: the identity onto z (dL/dz := dL/dz_q); z_q gets no gradient."""
    return z + (z_q - z).detach()


def ema_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z_flat: torch.Tensor,
               indices: torch.Tensor, decay: float = 0.99, eps: float = 1e-5):
    """One EMA codebook step (VQ-VAE paper, appendix A.1). Pure: returns new tensors.

    N_i <- decay * N_i + (1 - decay) * n_i          n_i = #vectors assigned to code i
    m_i <- decay * m_i + (1 - decay) * sum_{z -> i} z
    e_i  = m_i / N~_i,  N~_i = (N_i + eps) / (n + K eps) * n,  n = sum_i N_i
    The Laplace smoothing N~_i keeps e_i finite when a code is never chosen.

    Args: cluster_size (K,), embed_sum (K, D), z_flat (M, D), indices (M,).
    Returns: (cluster_size, embed_sum, codebook), shapes (K,), (K, D), (K, D).
    """
    K = cluster_size.shape[0]
    z_flat = z_flat.to(embed_sum.dtype)
    counts = torch.bincount(indices, minlength=K).to(cluster_size.dtype)
    sums = torch.zeros_like(embed_sum).index_add_(0, indices, z_flat)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the code histogram: K when all codes are equally used, 1 at collapse."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    return _perplexity_from_counts(counts)


def _perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0


def kmeans(z_flat: torch.Tensor, num_codes: int, iters: int = 10, quantize_fn=quantize) -> torch.Tensor:
    """k-means on the rows of z_flat (M, D) -> centroids (num_codes, D).

    k-means++ seeding (each new centre drawn with probability proportional to its squared
    distance from the centres so far, so seeds spread over the clusters), then `iters`
    Lloyd steps (assign, move each centre to its mean; an empty cluster keeps its centre).
    """
    z = z_flat.detach().float()
    M = z.shape[0]
    c = torch.empty(num_codes, z.shape[1], device=z.device)
    zz = (z * z).sum(1)

    def sq_dist(i):  # squared distances from every row to row i, as one matrix-vector product
        return (zz - 2 * (z @ z[i]) + zz[i]).clamp_min(0)

    first = int(torch.randint(0, M, (1,)))
    c[0] = z[first]
    d2 = sq_dist(first)
    for k in range(1, num_codes):
        # clamp: when every point is already a centre (M < num_codes) draw uniformly, no error
        pick = int(torch.multinomial(d2.clamp_min(1e-30), 1))
        c[k] = z[pick]
        d2 = torch.minimum(d2, sq_dist(pick))
    for _ in range(iters):
        a = quantize_fn(z, c)
        counts = torch.bincount(a, minlength=num_codes).float()
        sums = torch.zeros_like(c).index_add_(0, a, z)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------- the layer


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (N, code_dim, H, W) feature maps to a learned codebook.

    Args:
        num_codes, code_dim: codebook size K and vector length D.
        beta: commitment weight (0.25 as in the paper).
        ema: learn the codebook by EMA instead of the codebook loss (then loss = beta * commitment).
        decay, eps: EMA decay (0.99, paper) and Laplace smoothing constant.
        dead_code_threshold: replace codes whose EMA usage (vectors per batch) falls below
            this by random encoder outputs of the current batch; None or 0 turns it off.
            Runs in both modes (an EMA of cluster sizes is kept in either).
        kmeans_init: set the codebook by k-means (kmeans_iters Lloyd steps) on the first
            training batch.
        quantize_fn, vq_losses_fn, straight_through_fn, ema_update_fn: replacements for the
            module's functions of the same names (same signatures), e.g. a learner's.

    forward(z) -> (z_q, loss, info); info holds "indices" (N, H, W), "perplexity", "usage"
    (fraction of codes used in the batch), "codebook_loss", "commitment_loss" (unweighted)
    and "replaced" (number of codes revived in this step, a tensor).
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: float | None = 1.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, *, quantize_fn=None,
                 vq_losses_fn=None, straight_through_fn=None, ema_update_fn=None):
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.use_ema, self.decay, self.eps = ema, decay, eps
        self.dead_code_threshold = dead_code_threshold or 0.0
        self.kmeans_iters = kmeans_iters
        self.quantize_fn = quantize_fn or quantize
        self.vq_losses_fn = vq_losses_fn or vq_losses
        self.straight_through_fn = straight_through_fn or straight_through
        self.ema_update_fn = ema_update_fn or ema_update

        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)  # taming's init
        if ema:
            self.embedding.weight.requires_grad_(False)  # learned by EMA, not by the optimizer
        # EMA of how many batch vectors pick each code. Starting at 1 with embed_sum = codebook
        # keeps embed_sum / cluster_size equal to the initial codebook for a code never chosen
        # (zeros would divide ~0 by eps and blow the code up).
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._maybe_uninitialised = kmeans_init

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, ema={self.use_ema}, "
                f"dead_code_threshold={self.dead_code_threshold}")

    def forward(self, z: torch.Tensor):
        if z.dim() != 4:
            raise ValueError(f"VectorQuantizer expects (N, C, H, W) feature maps, got shape {tuple(z.shape)}")
        if z.shape[1] != self.code_dim:
            raise ValueError(
                f"VectorQuantizer has code_dim={self.code_dim} but the input has {z.shape[1]} channels; "
                f"project the encoder output to {self.code_dim} channels with a 1x1 conv (quant_conv) "
                f"or build the quantizer with code_dim={z.shape[1]}")
        N, D, H, W = z.shape
        z32 = z.float()  # losses and distances in float32 even under autocast
        z_flat = z32.permute(0, 2, 3, 1).reshape(-1, D)

        if self.training and self._maybe_uninitialised:
            if not bool(self.initted):  # a buffer, so a loaded checkpoint is not re-initialised
                self._kmeans_init(z_flat)
            self._maybe_uninitialised = False  # read the buffer once, not every step

        with torch.no_grad():  # argmin has no gradient; don't build a graph through the distances
            indices = self.quantize_fn(z_flat, self.embedding.weight)
        z_q = self.embedding(indices).view(N, H, W, D).permute(0, 3, 1, 2)

        loss, codebook_loss, commitment_loss = self.vq_losses_fn(z32, z_q, self.beta)
        if self.use_ema:  # the codebook learns by EMA; only the encoder's commitment term remains
            loss = self.beta * commitment_loss
        z_q = self.straight_through_fn(z32, z_q).to(z.dtype)

        counts = torch.bincount(indices, minlength=self.num_codes)
        replaced = torch.zeros((), dtype=torch.long, device=z.device)
        if self.training:
            replaced = self._update_codebook(z_flat.detach(), indices, counts)
        info = dict(
            indices=indices.view(N, H, W),
            perplexity=_perplexity_from_counts(counts.float()),
            usage=(counts > 0).float().mean(),
            codebook_loss=codebook_loss.detach(),
            commitment_loss=commitment_loss.detach(),
            replaced=replaced,
        )
        return z_q, loss, info

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        c = kmeans(z_flat, self.num_codes, self.kmeans_iters, self.quantize_fn)
        if _distributed():
            dist.broadcast(c, src=0)  # every rank starts from rank 0's codebook
        self.embedding.weight.copy_(c)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(c)
        self.initted.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, z_flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA statistics (both modes), the EMA codebook (ema mode), dead-code replacement."""
        if self.use_ema:
            cluster_size, embed_sum, codebook = self.ema_update_fn(
                self.cluster_size, self.embed_sum, z_flat, indices, self.decay, self.eps)
        else:  # only the usage statistic, for dead-code detection
            cluster_size = self.decay * self.cluster_size + (1 - self.decay) * counts.float()
            embed_sum = codebook = None
        if _distributed():
            # Every rank applied the same linear EMA to its own batch: averaging the results
            # is the EMA of the per-rank-batch averages, identical on every rank.
            world = dist.get_world_size()
            tensors = [cluster_size] + ([embed_sum] if self.use_ema else [])
            for t in tensors:
                dist.all_reduce(t)
                t /= world
            if self.use_ema:
                n = cluster_size.sum()
                smoothed = (cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
                codebook = embed_sum / smoothed[:, None]
        self.cluster_size.copy_(cluster_size)
        if self.use_ema:
            self.embed_sum.copy_(embed_sum)
            self.embedding.weight.copy_(codebook)

        if self.dead_code_threshold <= 0:
            return torch.zeros((), dtype=torch.long, device=z_flat.device)
        dead = self.cluster_size < self.dead_code_threshold
        # One random batch vector per code, used where the code is dead: torch.where instead
        # of `if dead.any()` keeps the step free of GPU->CPU synchronisation.
        pick = torch.randint(0, z_flat.shape[0], (self.num_codes,), device=z_flat.device)
        new = z_flat[pick].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(new, src=0)  # the dead set is the same on every rank; use rank 0's vectors
        # A revived code starts exactly at the threshold: if no vector picks it in the next
        # step it is replaced again at once, so stranded codes keep following the (moving)
        # encoder outputs. Starting it at the average usage instead kept codes stranded for
        # ~100 steps: 49% vs 94.5% of test-set codes used after 200 steps on `shapes` (non-EMA, K=512).
        # (The optimizer's Adam moments for these rows are left as they are.)
        reset = self.dead_code_threshold
        self.embedding.weight.copy_(torch.where(dead[:, None], new, self.embedding.weight))
        self.cluster_size.masked_fill_(dead, reset)
        self.embed_sum.copy_(torch.where(dead[:, None], new.to(self.embed_sum.dtype) * reset, self.embed_sum))
        return dead.sum()

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Token ids -> quantised feature map (N, code_dim, H, W) for the decoder.

        indices: (N, H, W), or flat with shape = (N, H, W) or (N, H, W, code_dim) (taming's form).
        """
        if shape is not None:
            indices = indices.reshape(tuple(shape)[:3])
        if indices.dim() != 3:
            raise ValueError(f"indices must have shape (N, H, W) (or pass shape=(N, H, W)), got {tuple(indices.shape)}")
        if indices.is_floating_point():
            raise TypeError(f"indices must be integer token ids, got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}), got [{int(indices.min())}, {int(indices.max())}]")
        return self.embedding(indices.long()).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- VQ-VAE


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the VQ-VAE paper's residual block."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """x (N, C, S, S) -> features (N, hidden, S / 2**num_downsamples, ...): strided convs, residual stack."""

    def __init__(self, in_channels: int, hidden_channels: int = 64, res_channels: int = 32,
                 num_res_blocks: int = 2, num_downsamples: int = 2):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(num_downsamples):  # k4 s2 p1 halves the size exactly
            layers += [nn.Conv2d(c, hidden_channels, 4, stride=2, padding=1), nn.ReLU()]
            c = hidden_channels
        layers.append(nn.Conv2d(c, hidden_channels, 3, padding=1))
        layers += [ResidualBlock(hidden_channels, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_channels = hidden_channels

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """features (N, hidden, s, s) -> image (N, C, s * 2**num_upsamples, ...), unbounded output."""

    def __init__(self, out_channels: int, hidden_channels: int = 64, res_channels: int = 32,
                 num_res_blocks: int = 2, num_upsamples: int = 2):
        super().__init__()
        layers = [nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1)]
        layers += [ResidualBlock(hidden_channels, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        for i in range(num_upsamples):
            last = i == num_upsamples - 1
            layers.append(nn.ConvTranspose2d(hidden_channels, out_channels if last else hidden_channels,
                                             4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
        if num_upsamples == 0:
            layers.append(nn.Conv2d(hidden_channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.in_channels = hidden_channels

    def forward(self, h):
        return self.net(h)


@dataclass
class VQVAEConfig:
    in_channels: int = 3
    image_size: int = 32
    hidden_channels: int = 64
    res_channels: int = 32
    num_res_blocks: int = 2
    num_downsamples: int = 2     # 32 -> 8: 64 tokens per image
    code_dim: int = 32
    num_codes: int = 512
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    dead_code_threshold: float = 1.0   # 0 turns dead-code replacement off
    kmeans_init: bool = False
    recon_loss: str = "mse"            # "mse" | "l1", mean over pixels on the [-1, 1] scale

    def __post_init__(self):
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")
        if self.image_size % 2 ** self.num_downsamples:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**num_downsamples = "
                             f"{2 ** self.num_downsamples}; lower num_downsamples or resize the images")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** self.num_downsamples


class VQVAE(nn.Module):
    """Encoder -> 1x1 quant_conv -> VectorQuantizer -> 1x1 post_quant_conv -> Decoder.

    Any part can be handed in (a learner's encoder, quantizer or decoder). The shapes are
    checked once at construction, so a channel mismatch fails here and not mid-training.
    """

    def __init__(self, config: VQVAEConfig | None = None, encoder: nn.Module | None = None,
                 quantizer: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.config = cfg = config or VQVAEConfig()
        self.encoder = encoder if encoder is not None else Encoder(
            cfg.in_channels, cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks, cfg.num_downsamples)
        self.decoder = decoder if decoder is not None else Decoder(
            cfg.in_channels, cfg.hidden_channels, cfg.res_channels, cfg.num_res_blocks, cfg.num_downsamples)
        self.quantize = quantizer if quantizer is not None else VectorQuantizer(
            cfg.num_codes, cfg.code_dim, cfg.beta, ema=cfg.ema, decay=cfg.decay,
            dead_code_threshold=cfg.dead_code_threshold, kmeans_init=cfg.kmeans_init)
        q_dim = getattr(self.quantize, "code_dim", cfg.code_dim)
        if q_dim != cfg.code_dim:
            raise ValueError(f"the quantizer has code_dim={q_dim} but VQVAEConfig.code_dim={cfg.code_dim}; "
                             f"set VQVAEConfig(code_dim={q_dim}) or build the quantizer with code_dim={cfg.code_dim}")
        enc_out = getattr(self.encoder, "out_channels", None) or self._probe_encoder()
        dec_in = getattr(self.decoder, "in_channels", None) or cfg.hidden_channels
        self.quant_conv = nn.Conv2d(enc_out, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, dec_in, 1)
        self._check_shapes()

    def _probe_encoder(self) -> int:
        c, s = self.config.in_channels, self.config.image_size
        with torch.no_grad():
            h = self._eval_call(self.encoder, torch.zeros(1, c, s, s))
        return h.shape[1]

    @staticmethod
    def _eval_call(module: nn.Module, x):
        was = module.training
        module.eval()  # no BatchNorm statistics updates from a probe
        try:
            return module(x)
        finally:
            module.train(was)

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
                raise ValueError(f"the encoder maps {cfg.image_size}x{cfg.image_size} images to "
                                 f"{h.shape[-2]}x{h.shape[-1]} latents; VQVAEConfig(num_downsamples="
                                 f"{cfg.num_downsamples}) expects {s}x{s}")
            try:
                y = self._eval_call(self.decoder, self.post_quant_conv(h))
            except RuntimeError as e:
                raise ValueError(f"the decoder cannot take ({self.post_quant_conv.out_channels}, {s}, {s}) "
                                 f"features from post_quant_conv: {e}") from None
            if y.shape != x.shape:
                raise ValueError(f"the decoder returns {tuple(y.shape[1:])} images, expected {tuple(x.shape[1:])}")

    # -- the pipeline

    def encode(self, x: torch.Tensor):
        """x in [-1, 1] -> (z_q (N, code_dim, h, w), indices (N, h, w)).

        Never updates codebook statistics (the quantizer runs in eval mode here); gradients
        flow as in training, through the straight-through estimator.
        """
        was = self.quantize.training
        self.quantize.eval()
        try:
            z_q, _, info = self.quantize(self.quant_conv(self.encoder(x)))
        finally:
            self.quantize.train(was)
        return z_q, info["indices"]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised features -> images (unclamped; the [-1, 1] range is learned)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids (N, h, w) -> images, e.g. for tokens sampled from a prior."""
        return self.decode(self.quantize.get_codebook_entry(indices))

    def forward(self, x: torch.Tensor):
        """x -> (x_hat, vq_loss, info)."""
        z_q, vq_loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decode(z_q), vq_loss, info

    def training_loss(self, batch, step: int = 0) -> dict:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name="VQVAE input")
        x_hat, vq_loss, info = self(x)
        recon = F.mse_loss(x_hat, x) if self.config.recon_loss == "mse" else F.l1_loss(x_hat, x)
        return dict(loss=recon + vq_loss, recon=recon.detach(), vq=vq_loss.detach(),
                    perplexity=info["perplexity"].detach(), usage=info["usage"].detach())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, quantise and decode; clamped to [-1, 1]. Updates no codebook statistics."""
        check_images(x, channels=self.config.in_channels, size=self.config.image_size, name="VQVAE.reconstruct input")
        return self.decode(self.encode(x)[0]).clamp(-1, 1)


def build(overrides: dict | None, image_shape, num_classes: int | None = None) -> VQVAE:
    """Build a VQVAE for images of shape (C, H, W) with config overrides (the CLI's --set)."""
    from minigen.cli import image_config

    return VQVAE(image_config(VQVAEConfig, overrides, image_shape))


__all__ = ["quantize", "vq_losses", "straight_through", "ema_update", "perplexity", "kmeans",
           "VectorQuantizer", "ResidualBlock", "Encoder", "Decoder", "VQVAEConfig", "VQVAE", "build"]
