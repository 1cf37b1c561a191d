"""The diffusion transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): a drop-in replacement for the U-Net of minigen.unet.

    x (N, C, H, W) -> patchify: p x p patches, a linear map each -> (N, H/p * W/p, D) tokens
                   -> + positional embedding (fixed 2-d sin-cos, or learned)
                   -> depth x DiTBlock conditioned on c = emb(t) [+ emb(class)] [+ pooled text]
                   -> final adaLN + linear to p * p * C_out per token -> unpatchify

A DiTBlock is a pre-LayerNorm transformer block whose LayerNorms have no parameters of
their own: the conditioning vector c sets them instead, "adaptive LayerNorm" (adaLN),

    x = x + gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + CrossAttn(LN(x), text tokens)               (optional, zero-initialised output)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

with (shift, scale, gate) x 2 = Linear(SiLU(c)). "adaLN-Zero" initialises that Linear to
zero, so every gate starts at 0 and every block is the identity; the final layer is
zero-initialised too, so the untrained network outputs 0 (the paper's best variant; the
U-Net's zero conv_out does the same). Text conditioning can enter twice, as in minigen's
U-Net: the mean of the text tokens added to c (the pooled embedding, as SD3 adds CLIP's
pooled output to its timestep embedding) and cross-attention to the tokens (PixArt-alpha).

forward(x, t, y=None, context=None) is the U-Net's signature, so GaussianDiffusion,
FlowMatching and latent diffusion take either (config backbone="dit").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.nn import CrossAttention, timestep_embedding

POS_EMBEDS = ("sincos", "learned")


@dataclass
class DiTConfig:
    in_channels: int = 3
    out_channels: int | None = None  # None -> in_channels
    input_size: tuple = (32, 32)  # (H, W) of the input (an int means square)
    patch_size: int = 4  # 32x32 pixels -> 8x8 = 64 tokens; use 1 or 2 on 8x8 latents
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # "sincos" (fixed, DiT) | "learned"
    frequency_embedding_size: int = 128  # sinusoidal features of t before the MLP
    num_classes: int | None = None  # class-conditional; id num_classes = the null class
    context_dim: int | None = None  # text tokens (N, M, context_dim)
    cross_attention: bool = True  # with context_dim: cross-attention to the tokens in every block
    pooled_context: bool = False  # with context_dim: the tokens' mean added to the conditioning c
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.input_size, int):
            self.input_size = (self.input_size, self.input_size)
        self.input_size = tuple(int(s) for s in self.input_size)
        if len(self.input_size) != 2:
            raise ValueError(f"DiTConfig.input_size must be (H, W) or an int, got {self.input_size}")
        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        h, w = self.input_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"DiTConfig: input_size {self.input_size} must be divisible by patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"DiTConfig.pos_embed = {self.pos_embed!r}: use one of {POS_EMBEDS}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"DiTConfig: num_classes must be >= 1 or None, got {self.num_classes}")
        if self.context_dim is not None and not (self.cross_attention or self.pooled_context):
            raise ValueError("DiTConfig: with context_dim set, turn on cross_attention or pooled_context "
                             "(else the text would be ignored)")
        if self.pooled_context and self.context_dim is None:
            raise ValueError("DiTConfig: pooled_context needs context_dim (the context it pools)")


# --------------------------------------------------------------------------------------
# patches and positions


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, p * p * C): row-major patches, each flattened (p, p, C)."""
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: {h}x{w} images do not split into {p}x{p} patches")
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(N, h * w, p * p * C) -> (N, C, h * p, w * p), the inverse of patchify (h, w in patches)."""
    n, length, d = tokens.shape
    if length != h * w or d % (p * p):
        raise ValueError(f"unpatchify: {length} tokens of width {d} are not a {h}x{w} grid of {p}x{p} patches")
    c = d // (p * p)
    x = tokens.reshape(n, h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h * w, dim) fixed 2-d sin-cos embedding (MAE / DiT): half the channels encode the
    row, half the column, each as [sin, cos] of the position at dim/4 frequencies 10000^-k."""
    if dim % 4:
        raise ValueError(f"a 2-d sin-cos embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def one_axis(pos):
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([one_axis(rows.flatten()), one_axis(cols.flatten())], dim=1).float()


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per sample (shift, scale: (N, D); x: (N, L, D))."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------
# blocks


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (and optional cross-attention)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, context_dim=None, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(dim, None, heads, dim // heads, dropout)  # self-attention
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = CrossAttention(dim, context_dim, heads, dim // heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, context=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of every token to its p x p x C_out patch."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """forward(x, t, y=None, context=None) -> a tensor shaped like x (out_channels).

    The U-Net's contract: x (N, in_channels, H, W) with (H, W) = config.input_size;
    t (N,) or scalar timesteps (int or float); y (N,) class ids in [0, num_classes]
    (num_classes = null class; None -> all null); context (N, M, context_dim) (None -> a
    zero context, the "empty" condition).
    """

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        config = config or DiTConfig()
        if overrides:
            config = DiTConfig(**{**config.__dict__, **overrides})
        self.config = c = config
        D, p = c.hidden_size, c.patch_size
        self.grid_size = (c.input_size[0] // p, c.input_size[1] // p)
        self.x_embedder = nn.Conv2d(c.in_channels, D, kernel_size=p, stride=p)  # = Linear on each patch
        num_tokens = self.grid_size[0] * self.grid_size[1]
        if c.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed_2d(D, *self.grid_size)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D))
        self.t_embedder = nn.Sequential(nn.Linear(c.frequency_embedding_size, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Embedding(c.num_classes + 1, D) if c.num_classes else None  # + the null class
        self.context_embed = nn.Linear(c.context_dim, D) if c.pooled_context else None
        cross_dim = c.context_dim if (c.context_dim is not None and c.cross_attention) else None
        self.blocks = nn.ModuleList(DiTBlock(D, c.num_heads, c.mlp_ratio, cross_dim, c.dropout)
                                    for _ in range(c.depth))
        self.final_layer = FinalLayer(D, p, c.out_channels or c.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: xavier-uniform Linears with zero bias, N(0, 0.02) for the
        embeddings and the time MLP, and zeros for every adaLN modulation, the cross-attention
        outputs and the final layer (adaLN-Zero: the network starts as the identity map of
        its token stream and outputs 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross is not None:
                nn.init.zeros_(block.cross.to_out[0].weight)
                nn.init.zeros_(block.cross.to_out[0].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_inputs(self, x, t, y, context):
        c = self.config
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"DiT expects x of shape (N, C, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != c.in_channels or tuple(x.shape[2:]) != c.input_size:
            raise ValueError(f"DiT was built for ({c.in_channels}, {c.input_size[0]}, {c.input_size[1]}) inputs, got "
                             f"{tuple(x.shape[1:])}; set DiTConfig(in_channels=..., input_size=...)")
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"DiT expects t of shape ({n},) or a scalar, got {tuple(t.shape)}")
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("y was given but the DiT is unconditional: set DiTConfig(num_classes=...)")
            if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"y must be int64 class ids of shape ({n},), got {y.dtype} {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) > c.num_classes:
                raise ValueError(f"class ids must lie in [0, {c.num_classes}] ({c.num_classes} = null class), "
                                 f"got [{int(y.min())}, {int(y.max())}]")
        if context is not None:
            if c.context_dim is None:
                raise ValueError("context was given but the DiT takes none: set DiTConfig(context_dim=...)")
            if context.ndim != 3 or context.shape[0] != n or context.shape[2] != c.context_dim:
                raise ValueError(f"context must have shape ({n}, M, {c.context_dim}), got {tuple(context.shape)}")
        return t

    def forward(self, x, t, y=None, context=None):
        t = self._check_inputs(x, t, y, context)
        c = self.config
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, L, D)
        cond = self.t_embedder(timestep_embedding(t, c.frequency_embedding_size).to(h.dtype))
        if self.y_embedder is not None:
            if y is None:  # unconditional = the null class
                y = torch.full((x.shape[0],), c.num_classes, dtype=torch.long, device=x.device)
            cond = cond + self.y_embedder(y)
        if c.context_dim is not None and context is None:
            context = x.new_zeros(x.shape[0], 1, c.context_dim)
        if self.context_embed is not None:
            cond = cond + self.context_embed(context.mean(dim=1))
        for block in self.blocks:
            h = block(h, cond, context)
        return unpatchify(self.final_layer(h, cond), c.patch_size, *self.grid_size)


__all__ = ["DiTConfig", "DiT", "DiTBlock", "FinalLayer", "patchify", "unpatchify", "sincos_pos_embed_2d",
           "modulate"]
