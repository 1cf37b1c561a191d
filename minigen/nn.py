"""Shared building blocks: the pieces the U-Net (diffusion) and the VQGAN encoder/decoder
are made of.

Names follow taming-transformers / latent-diffusion (`Normalize`, `ResnetBlock`,
`AttnBlock`, `Downsample`, `Upsample`, `CrossAttention`, `SpatialTransformer`) so the
code reads the same when you later open those repositories.

Every block takes and returns (N, C, H, W) tensors and works in either memory format
(contiguous or channels_last); nothing here forces a copy into one or the other.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# normalisation and time embedding


def Normalize(channels, num_groups=32, eps=1e-6):
    """GroupNorm with `num_groups` groups, or the largest divisor of `channels` below it.

    eps = 1e-6 follows CompVis (taming-transformers, latent-diffusion); diffusers uses 1e-5.
    The difference is invisible after training but matters when comparing activations.
    """
    if channels < 1:
        raise ValueError(f"Normalize needs channels >= 1, got {channels}")
    groups = min(num_groups, channels)
    while channels % groups:  # e.g. 48 channels -> 24 groups, 3 channels -> 3 groups
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N,) -> (N, dim).

    Frequencies are max_period^(-i/half) for i = 0..half-1 and the output is ordered
    [cos, sin] as in CompVis / openai (diffusers' default is [sin, cos], which it calls
    flip_sin_to_cos=False). An odd `dim` gets one zero column at the end.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (N,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------
# convolutional blocks


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (pre-activation: norm -> SiLU -> conv).

    With temb_channels > 0 the block is conditioned on an embedding (time, or time + class)
    by scale-shift ("FiLM", improved-diffusion's use_scale_shift_norm): the embedding is
    projected to (scale, shift) per channel and applied after the second normalisation,
    h = norm(h) * (1 + scale) + shift. With temb_channels = 0 it is the plain block of the
    VQGAN encoder/decoder.
    """

    def __init__(self, in_channels, out_channels=None, temb_channels=0, dropout=0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, 2 * out_channels) if temb_channels > 0 else None
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv on the skip path only where the channel count changes
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock was built with temb_channels > 0: pass temb")
            scale, shift = self.temb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)  # h * (1 + scale) + shift, one pass
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (padding 1: ceil(H/2) for odd H)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 convolution (no checkerboard artefacts of a
    transposed conv). `size` overrides the 2x factor, e.g. to return to an odd size."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# --------------------------------------------------------------------------------------
# attention


def _split_heads(x, heads):
    """(N, L, heads*d) -> (N, heads, L, d)"""
    n, length, inner = x.shape
    return x.view(n, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x):
    """(N, heads, L, d) -> (N, L, heads*d)"""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class AttnBlock(nn.Module):
    """Spatial self-attention over the H*W positions of a feature map, with a residual.

    GroupNorm -> q, k, v (one 1x1 projection) -> softmax(q k^T / sqrt(d)) v -> 1x1 proj_out.
    num_heads = 1 is taming's / DDPM's block; more heads split the channels evenly.
    """

    def __init__(self, channels, num_heads=1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttnBlock: channels ({channels}) must divide by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = Normalize(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x):
        n, c, hgt, wid = x.shape
        # tokens (N, HW, C): a 1x1 conv on a map is a Linear on its tokens
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (_split_heads(z, self.num_heads) for z in self.qkv(h).chunk(3, dim=-1))
        h = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # scale = d^-1/2
        h = self.proj_out(h).transpose(1, 2).reshape(n, c, hgt, wid)
        return x + h


class CrossAttention(nn.Module):
    """Multi-head attention from `x` (N, L, query_dim) to `context` (N, M, context_dim).

    As in latent diffusion: q, k, v projections without bias, scale dim_head^-1/2, an output
    Linear (with bias). With context=None it attends to x itself (self-attention).
    """

    def __init__(self, query_dim, context_dim=None, heads=4, dim_head=32, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head, self.context_dim = heads, dim_head, context_dim
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"CrossAttention expects context with last dim {self.context_dim}, "
                f"got shape {tuple(context.shape)}"
            )
        q = _split_heads(self.to_q(x), self.heads)
        k = _split_heads(self.to_k(context), self.heads)
        v = _split_heads(self.to_v(context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(_merge_heads(out))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): Linear to 2*dim_out, out = a * gelu(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP of latent diffusion: GEGLU to mult*dim, dropout, Linear back."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens: self-attention, cross-attention to the
    context, feed-forward, each added back to the residual stream."""

    def __init__(self, dim, heads, dim_head, context_dim=None, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)  # self-attention
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)  # context=None -> self-attention
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Latent diffusion's transformer on a feature map, conditioned on a context sequence.

    GroupNorm -> 1x1 proj_in to heads*dim_head -> `depth` BasicTransformerBlocks on the H*W
    tokens -> 1x1 proj_out back to `channels` -> + input. proj_out starts at zero, so at
    initialisation the whole block is the identity and the U-Net trains as if it were not
    there until the gradient switches it on.
    """

    def __init__(self, channels, heads=4, dim_head=32, depth=1, context_dim=None, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = Normalize(channels)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context=None):
        n, _, hgt, wid = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.flatten(2).transpose(1, 2)  # (N, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(n, inner, hgt, wid)
        return x + self.proj_out(h)
