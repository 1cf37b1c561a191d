"""The denoising U-Net: eps_theta(x_t, t [, class] [, context]).

A small version of the DDPM / diffusers UNet2DModel architecture, built from the blocks in
minigen.nn:

    conv_in -> [ResnetBlock (+ attention)] x layers_per_block, Downsample   per level
            -> ResnetBlock, attention, ResnetBlock                          middle
            -> [concat skip, ResnetBlock (+ attention)] x (layers+1), Upsample per level
            -> GroupNorm, SiLU, conv_out

Every ResnetBlock is conditioned on one embedding vector: the sinusoidal time embedding
through a 2-layer MLP, plus a learned class embedding when num_classes is set (plus a
projection of the mean context vector with pooled_context). Class id
`num_classes` is the extra "null" class used for classifier-free guidance. With
context_dim set, the attention levels use latent diffusion's SpatialTransformer
(self-attention + cross-attention to a context sequence, e.g. encoded text) instead of
the plain AttnBlock.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.nn import (
    AttnBlock,
    Downsample,
    Normalize,
    ResnetBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int | None = None  # None -> in_channels (an eps, v or x0 prediction)
    channels: int = 32  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # (32, 64, 64): three levels, two downsamplings
    layers_per_block: int = 2
    # downsampling factors that get attention (openai/LDM convention): 4 -> the 8x8 maps of
    # a 32x32 input (7x7 for 28x28). The middle block always has attention.
    attention_resolutions: tuple = (4,)
    num_heads: int = 1  # heads of AttnBlock
    dropout: float = 0.0
    num_classes: int | None = None  # class-conditional; id num_classes = "null" class
    context_dim: int | None = None  # cross-attention to a (N, M, context_dim) context
    # also add a projection of the context's mean over its M positions to the time
    # embedding (Imagen's "pooled text embedding"; SDXL's text_embeds): a global path for
    # the condition into every ResnetBlock, besides the cross-attention
    pooled_context: bool = False
    transformer_heads: int = 4
    transformer_dim_head: int = 16
    transformer_depth: int = 1
    # channels_last memory format: off by default because on CPU (torch 2.13) GroupNorm in
    # channels_last ran 3-10x slower and cancelled the convolutions' gain; try it on a GPU
    channels_last: bool = False

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.in_channels < 1 or self.channels < 1 or self.layers_per_block < 1:
            raise ValueError("UNetConfig: in_channels, channels and layers_per_block must be >= 1")
        if not self.channel_mult:
            raise ValueError("UNetConfig: channel_mult needs at least one level, e.g. (1, 2, 2)")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"UNetConfig: num_classes must be >= 1 or None, got {self.num_classes}")
        if self.pooled_context and self.context_dim is None:
            raise ValueError("UNetConfig: pooled_context needs context_dim (the context it pools)")


class UNet(nn.Module):
    """forward(x, t, y=None, context=None) -> a tensor shaped like x (out_channels).

    x: (N, in_channels, H, W); t: (N,) or scalar timesteps (int or float);
    y: (N,) int64 class ids in [0, num_classes] (num_classes = null class; None -> all null);
    context: (N, M, context_dim) (None -> a zero context, the "empty" condition).
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        config = config or UNetConfig()
        if overrides:
            config = UNetConfig(**{**config.__dict__, **overrides})
        self.config = config
        c = config
        ch = [c.channels * m for m in c.channel_mult]
        temb_ch = 4 * c.channels
        self.temb_channels = temb_ch

        self.time_embed = nn.Sequential(
            nn.Linear(c.channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch)
        )
        # one extra row: the null class of classifier-free guidance
        self.class_embed = nn.Embedding(c.num_classes + 1, temb_ch) if c.num_classes else None
        self.context_embed = nn.Linear(c.context_dim, temb_ch) if c.pooled_context else None

        def attention(channels):
            if c.context_dim is not None:
                return SpatialTransformer(
                    channels, c.transformer_heads, c.transformer_dim_head,
                    c.transformer_depth, c.context_dim, c.dropout,
                )
            return AttnBlock(channels, c.num_heads)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        # down path; skip_ch records the channels of every tensor pushed onto the skip stack
        self.down = nn.ModuleList()
        skip_ch, cur = [ch[0]], ch[0]
        for level, out in enumerate(ch):
            blocks = nn.ModuleList()
            attns = nn.ModuleList()
            for _ in range(c.layers_per_block):
                blocks.append(ResnetBlock(cur, out, temb_ch, c.dropout))
                attns.append(attention(out) if 2**level in c.attention_resolutions else nn.Identity())
                cur = out
                skip_ch.append(cur)
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != len(ch) - 1:
                stage.downsample = Downsample(cur)
                skip_ch.append(cur)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cur, cur, temb_ch, c.dropout)
        self.mid.attn_1 = attention(cur)
        self.mid.block_2 = ResnetBlock(cur, cur, temb_ch, c.dropout)

        # up path, deepest level first; each block eats one skip
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            out = ch[level]
            blocks = nn.ModuleList()
            attns = nn.ModuleList()
            for _ in range(c.layers_per_block + 1):
                blocks.append(ResnetBlock(cur + skip_ch.pop(), out, temb_ch, c.dropout))
                attns.append(attention(out) if 2**level in c.attention_resolutions else nn.Identity())
                cur = out
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != 0:
                stage.upsample = Upsample(cur)
            self.up.append(stage)
        assert not skip_ch

        self.norm_out = Normalize(cur)
        self.conv_out = nn.Conv2d(cur, c.out_channels or c.in_channels, 3, padding=1)
        # zero output layer (improved-diffusion): the untrained net predicts 0, a calm start
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------------

    def _check_inputs(self, x, t, y, context):
        c = self.config
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"UNet expects x of shape (N, C, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != c.in_channels:
            raise ValueError(
                f"UNet was built for {c.in_channels}-channel input but x has {x.shape[1]} "
                f"channels (shape {tuple(x.shape)}); set UNetConfig(in_channels={x.shape[1]})"
            )
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"UNet expects t of shape ({n},) or a scalar, got {tuple(t.shape)}")
        if y is not None:
            if self.class_embed is None:
                raise ValueError("y was given but the UNet is unconditional: set UNetConfig(num_classes=...)")
            if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"y must be int64 class ids of shape ({n},), got {y.dtype} {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) > c.num_classes:
                raise ValueError(
                    f"class ids must lie in [0, {c.num_classes}] ({c.num_classes} = null class), "
                    f"got [{int(y.min())}, {int(y.max())}]"
                )
        if context is not None:
            if c.context_dim is None:
                raise ValueError("context was given but the UNet has no cross-attention: set UNetConfig(context_dim=...)")
            if context.ndim != 3 or context.shape[0] != n or context.shape[2] != c.context_dim:
                raise ValueError(
                    f"context must have shape ({n}, M, {c.context_dim}), got {tuple(context.shape)}"
                )
        return t

    def forward(self, x, t, y=None, context=None):
        t = self._check_inputs(x, t, y, context)
        c = self.config
        emb = self.time_embed(timestep_embedding(t, c.channels).to(x.dtype))
        if self.class_embed is not None:
            if y is None:  # unconditional = the null class
                y = torch.full((x.shape[0],), c.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        if c.context_dim is not None and context is None:
            context = x.new_zeros(x.shape[0], 1, c.context_dim)
        if self.context_embed is not None:
            emb = emb + self.context_embed(context.mean(dim=1))
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def attend(attn, h):
            return attn(h, context) if isinstance(attn, SpatialTransformer) else attn(h)

        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            for block, attn in zip(stage.block, stage.attn):
                h = attend(attn, block(h, emb))
                hs.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                hs.append(h)

        h = self.mid.block_1(h, emb)
        h = attend(self.mid.attn_1, h)
        h = self.mid.block_2(h, emb)

        for stage in self.up:
            for block, attn in zip(stage.block, stage.attn):
                h = attend(attn, block(torch.cat([h, hs.pop()], dim=1), emb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h, size=hs[-1].shape[-2:])  # odd sizes: 7 -> 4 -> 7
        return self.conv_out(F.silu(self.norm_out(h)))
