"""Shared blocks of minigen.nn against independent references (float64 einsum / math)."""

import math

import numpy as np
import pytest
import torch

from minigen.nn import (
    AttnBlock,
    CrossAttention,
    Downsample,
    Normalize,
    ResnetBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- time embedding --------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 33, 128])
def test_timestep_embedding_matches_formula(dim):
    t = torch.tensor([0, 1, 17, 999, 523])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    half = dim // 2
    ref = np.zeros((5, dim))
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000) * j / half)
            ref[i, j] = math.cos(ti * freq)  # [cos, sin] order (CompVis / openai)
            ref[i, half + j] = math.sin(ti * freq)
    np.testing.assert_allclose(emb.numpy(), ref, atol=2e-4)  # float32 args up to ~1000 rad
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_timestep_embedding_t0_and_max_period_and_errors():
    emb = timestep_embedding(torch.zeros(3), 16)
    assert torch.equal(emb[:, :8], torch.ones(3, 8)) and torch.equal(emb[:, 8:], torch.zeros(3, 8))
    a = timestep_embedding(torch.tensor([5.0]), 16, max_period=100)
    b = timestep_embedding(torch.tensor([5.0]), 16, max_period=10000)
    assert not torch.allclose(a, b)
    # fractional timesteps work too
    assert timestep_embedding(torch.tensor([0.5, 1.5]), 8).shape == (2, 8)
    with pytest.raises(ValueError, match="shape"):
        timestep_embedding(torch.zeros(2, 3), 16)


# -- normalisation and conv blocks ------------------------------------------------------


@pytest.mark.parametrize("ch,groups", [(64, 32), (32, 32), (48, 24), (3, 3), (20, 20), (96, 32)])
def test_normalize_groups_and_eps(ch, groups):
    n = Normalize(ch)
    assert n.num_groups == groups and n.eps == 1e-6 and ch % n.num_groups == 0


def test_resnet_block_shapes_and_skip():
    x = torch.randn(2, 16, 8, 8)
    assert ResnetBlock(16, 32)(x).shape == (2, 32, 8, 8)
    blk = ResnetBlock(16, 16)
    assert blk.nin_shortcut is None
    # zero second conv -> the block is exactly the identity (pure residual)
    torch.nn.init.zeros_(blk.conv2.weight), torch.nn.init.zeros_(blk.conv2.bias)
    assert torch.equal(blk(x), x)


def test_resnet_block_scale_shift_conditioning():
    x, temb = torch.randn(3, 8, 6, 6), torch.randn(3, 20)
    cond = ResnetBlock(8, 16, temb_channels=20)
    plain = ResnetBlock(8, 16)
    plain.load_state_dict({k: v for k, v in cond.state_dict().items() if not k.startswith("temb_proj")})
    assert not torch.allclose(cond(x, temb), plain(x), atol=1e-4)  # the embedding matters
    with pytest.raises(ValueError, match="temb"):
        cond(x)
    # FiLM check: with a projection giving scale = s, shift = b for every example, the block
    # equals the plain one with norm2's affine replaced by (1 + s) * gamma, (1 + s) * beta + b
    s, b = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        cond.temb_proj.weight.zero_()
        cond.temb_proj.bias.copy_(torch.cat([s, b]))
        plain.norm2.weight.mul_(1 + s)
        plain.norm2.bias.mul_(1 + s).add_(b)
    torch.testing.assert_close(cond(x, temb), plain(x), atol=1e-5, rtol=1e-5)


def test_down_and_upsample():
    x = torch.randn(2, 4, 8, 8)
    assert Downsample(4)(x).shape == (2, 4, 4, 4)
    assert Downsample(4)(torch.randn(1, 4, 7, 7)).shape == (1, 4, 4, 4)
    up = Upsample(4)
    assert up(x).shape == (2, 4, 16, 16)
    assert up(torch.randn(1, 4, 4, 4), size=(7, 7)).shape == (1, 4, 7, 7)
    # the interpolation is nearest: with an identity-centred conv, each pixel is repeated 2x2
    with torch.no_grad():
        up.conv.weight.zero_(), up.conv.bias.zero_()
        for c in range(4):
            up.conv.weight[c, c, 1, 1] = 1.0
    torch.testing.assert_close(up(x), x.repeat_interleave(2, -1).repeat_interleave(2, -2))


# -- attention --------------------------------------------------------------------------


def _attention_ref(q, k, v, scale):
    """Plain float64 softmax attention, (N, heads, L, d)."""
    w = torch.einsum("nhld,nhmd->nhlm", q.double(), k.double()) * scale
    return torch.einsum("nhlm,nhmd->nhld", w.softmax(-1), v.double())


@pytest.mark.parametrize("heads", [1, 4])
def test_attn_block_matches_reference(heads):
    blk = AttnBlock(32, num_heads=heads)
    x = torch.randn(2, 32, 5, 6)
    out = blk(x)
    # reference: norm -> per-position q, k, v -> softmax attention per head -> proj -> residual
    h = blk.norm(x).double().flatten(2).transpose(1, 2)  # (N, L, C)
    W, bias = blk.qkv.weight.double(), blk.qkv.bias.double()
    q, k, v = (h @ W.T + bias).chunk(3, dim=-1)
    split = lambda z: z.reshape(2, 30, heads, 32 // heads).transpose(1, 2)
    a = _attention_ref(split(q), split(k), split(v), (32 // heads) ** -0.5)
    a = a.transpose(1, 2).reshape(2, 30, 32)
    ref = x.double() + (a @ blk.proj_out.weight.double().T + blk.proj_out.bias.double()).transpose(1, 2).reshape(2, 32, 5, 6)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_attn_block_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        AttnBlock(30, num_heads=4)


def test_cross_attention_matches_reference():
    heads, dim_head = 3, 8
    attn = CrossAttention(query_dim=24, context_dim=10, heads=heads, dim_head=dim_head)
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 5, 10)
    out = attn(x, ctx)
    assert out.shape == (2, 7, 24)
    split = lambda z: z.reshape(2, -1, heads, dim_head).transpose(1, 2)
    q = split(x.double() @ attn.to_q.weight.double().T)
    k = split(ctx.double() @ attn.to_k.weight.double().T)
    v = split(ctx.double() @ attn.to_v.weight.double().T)
    a = _attention_ref(q, k, v, dim_head**-0.5).transpose(1, 2).reshape(2, 7, heads * dim_head)
    lin = attn.to_out[0]
    ref = a @ lin.weight.double().T + lin.bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        attn(x, torch.randn(2, 5, 11))


def test_spatial_transformer_is_identity_at_init_then_uses_context():
    st = SpatialTransformer(16, heads=2, dim_head=8, depth=2, context_dim=12)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12)
    assert torch.equal(st(x, ctx), x)  # zero-initialised proj_out
    with torch.no_grad():
        st.proj_out.weight.normal_(0, 0.1)
    y1, y2 = st(x, ctx), st(x, torch.randn(2, 3, 12))
    assert y1.shape == x.shape and not torch.allclose(y1, x) and not torch.allclose(y1, y2)
    # gradients reach the context
    ctx.requires_grad_(True)
    st(x, ctx).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_blocks_accept_channels_last():
    x = torch.randn(2, 32, 8, 8)
    xl = x.contiguous(memory_format=torch.channels_last)
    for blk in (ResnetBlock(32, 64), AttnBlock(32, 2), Downsample(32), Upsample(32)):
        torch.testing.assert_close(blk(xl), blk(x), atol=1e-5, rtol=1e-4)
    st = SpatialTransformer(32, 2, 8, context_dim=6)
    with torch.no_grad():
        st.proj_out.weight.normal_()
    ctx = torch.randn(2, 3, 6)
    torch.testing.assert_close(st(xl, ctx), st(x, ctx), atol=1e-5, rtol=1e-4)
