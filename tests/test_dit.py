"""minigen.dit: patchify/unpatchify, positional embeddings, adaLN-Zero, the U-Net's
contract (shapes, conditioning, errors) and the backbone="dit" option of the models."""

import math

import pytest
import torch

from minigen import diffusion, flow
from minigen.dit import DiT, DiTBlock, DiTConfig, modulate, patchify, sincos_pos_embed_2d, unpatchify
from minigen.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=32, depth=2, num_heads=2)


@pytest.mark.parametrize("c,h,w,p", [(3, 32, 32, 4), (4, 8, 8, 1), (4, 8, 8, 2), (1, 12, 20, 4)])
def test_patchify_roundtrip(c, h, w, p):
    x = torch.randn(3, c, h, w)
    tok = patchify(x, p)
    assert tok.shape == (3, (h // p) * (w // p), p * p * c)
    # token k is the patch at row k // (w/p), column k % (w/p), flattened (p, p, C)
    k = int(torch.randint(0, tok.shape[1], ()))
    r, col = divmod(k, w // p)
    patch = x[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p].permute(0, 2, 3, 1).reshape(3, -1)
    torch.testing.assert_close(tok[:, k], patch, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(tok, p, h // p, w // p), x, rtol=0, atol=0)
    t2 = torch.randn_like(tok)
    torch.testing.assert_close(patchify(unpatchify(t2, p, h // p, w // p), p), t2, rtol=0, atol=0)


def test_patchify_errors():
    with pytest.raises(ValueError, match="patches"):
        patchify(torch.randn(1, 3, 10, 10), 4)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.randn(1, 5, 12), 2, 2, 2)


def test_sincos_pos_embed_values():
    dim, h, w = 16, 3, 5
    emb = sincos_pos_embed_2d(dim, h, w)
    assert emb.shape == (h * w, dim)
    i, j = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    q = dim // 4
    row = emb[i * w + j]
    for k in range(q):
        f = 1.0 / 10000 ** (k / q)
        assert abs(row[k] - math.sin(i * f)) < 1e-6 and abs(row[q + k] - math.cos(i * f)) < 1e-6
        assert abs(row[2 * q + k] - math.sin(j * f)) < 1e-6 and abs(row[3 * q + k] - math.cos(j * f)) < 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_modulate():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    ref = torch.stack([x[b] * (1 + scale[b]) + shift[b] for b in range(2)])
    torch.testing.assert_close(modulate(x, shift, scale), ref)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_adaln_zero_block_is_identity_at_init(context_dim):
    model = DiT(DiTConfig(in_channels=2, input_size=8, patch_size=2, context_dim=context_dim,
                          pooled_context=context_dim is not None, **SMALL))
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    ctx = torch.randn(3, 5, 12) if context_dim else None
    for block in model.blocks:
        torch.testing.assert_close(block(x, c, ctx), x, rtol=0, atol=0)
    # ... because of the zero init, not by construction: perturb the modulation and it is not
    block = model.blocks[0]
    with torch.no_grad():
        block.adaLN_modulation[-1].bias.normal_()
    assert (block(x, c, ctx) - x).abs().max() > 1e-3
    # the untrained network outputs exactly 0 (zero final layer), for any input and condition
    out = model(torch.randn(3, 2, 8, 8), torch.rand(3) * 999, context=ctx[:, :2] if ctx is not None else None)
    assert out.shape == (3, 2, 8, 8) and out.abs().max() == 0


def test_one_step_leaves_zero_init():
    """The zero-initialised layers receive gradients: after one step the output is not 0."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=3, input_size=8, patch_size=2, num_classes=4, **SMALL))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 4, (4,))
    loss = (model(x, t, y) - x).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().max() > 0
    opt.step()
    assert model(x, t, y).abs().max() > 0


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, input_size=32, patch_size=4, num_classes=10),
    dict(in_channels=4, input_size=8, patch_size=1, context_dim=16, pooled_context=True),
    dict(in_channels=4, input_size=8, patch_size=2, context_dim=16, cross_attention=False, pooled_context=True,
         pos_embed="learned"),
    dict(in_channels=1, input_size=(8, 12), patch_size=4, out_channels=2),
])
def test_shapes_and_unet_contract(kw):
    cfg = DiTConfig(**kw, **SMALL)
    model = DiT(cfg)
    with torch.no_grad():  # leave the identity start so that conditioning shows in the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = 3
    x = torch.randn(n, cfg.in_channels, *cfg.input_size)
    y = torch.randint(0, cfg.num_classes, (n,)) if cfg.num_classes else None
    ctx = torch.randn(n, 5, cfg.context_dim) if cfg.context_dim else None
    out = model(x, torch.rand(n) * 999, y=y, context=ctx)
    assert out.shape == (n, cfg.out_channels or cfg.in_channels, *cfg.input_size)
    out_int = model(x, 500, y=y, context=ctx)  # scalar int timestep, broadcast
    assert out_int.shape == out.shape
    if cfg.num_classes:  # the label matters, and None is the null class
        assert (model(x, 500, y=(y + 1) % cfg.num_classes) - out_int).abs().max() > 1e-5
        torch.testing.assert_close(model(x, 500), model(x, 500, y=torch.full((n,), cfg.num_classes)))
    if cfg.context_dim:  # the context matters, and None is the zero context
        assert (model(x, 500, context=ctx + 1) - out_int).abs().max() > 1e-5
        torch.testing.assert_close(model(x, 500), model(x, 500, context=torch.zeros(n, 1, cfg.context_dim)))


def test_same_signature_as_unet():
    """UNet and DiT answer the same call with the same shapes: a drop-in backbone."""
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])
    ctx = torch.randn(2, 4, 8)
    unet = UNet(UNetConfig(in_channels=3, channels=8, channel_mult=(1, 2), num_classes=3, context_dim=8))
    dit = DiT(DiTConfig(in_channels=3, input_size=16, patch_size=4, num_classes=3, context_dim=8, **SMALL))
    assert unet(x, t, y=y, context=ctx).shape == dit(x, t, y=y, context=ctx).shape == x.shape


def test_errors():
    model = DiT(DiTConfig(in_channels=3, input_size=8, patch_size=2, **SMALL))
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 16, 16), 0)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 8, 8), 0, y=torch.tensor([0]))
    with pytest.raises(ValueError, match="context_dim"):
        model(torch.randn(1, 3, 8, 8), 0, context=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(2, 3, 8, 8), torch.zeros(3))
    cond = DiT(DiTConfig(in_channels=3, input_size=8, patch_size=2, num_classes=2, **SMALL))
    with pytest.raises(ValueError, match="class ids"):
        cond(torch.randn(1, 3, 8, 8), 0, y=torch.tensor([3]))
    for bad, match in [(dict(input_size=10, patch_size=4), "divisible"), (dict(hidden_size=30, num_heads=4), "divide"),
                       (dict(pos_embed="rope"), "pos_embed"), (dict(context_dim=8, cross_attention=False), "ignored"),
                       (dict(pooled_context=True), "needs context_dim"), (dict(depth=0), "depth")]:
        with pytest.raises(ValueError, match=match):
            DiTConfig(**bad)


def test_backbone_option_in_the_models():
    """backbone="dit" builds a DiT in GaussianDiffusion and FlowMatching; both train a step
    and sample; the config survives the plain-dict round trip of a checkpoint."""
    import dataclasses

    for build in (diffusion.build, flow.build):
        model = build(dict(backbone="dit", hidden_size=32, depth=1, num_heads=2, patch_size=4,
                           sample_steps=2), image_shape=(3, 16, 16), num_classes=3)
        assert isinstance(model.model, DiT) and model.model.config.input_size == (16, 16)
        assert model.num_classes == 3
        loss = model.training_loss((torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 3, (4,))))["loss"]
        loss.backward()
        assert torch.isfinite(loss)
        assert model.sample_images(2).shape == (2, 3, 16, 16)
        cfg = dataclasses.asdict(model.config)
        rebuilt = type(model)(type(model.config)(**cfg))
        assert isinstance(rebuilt.model, DiT)
        rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="unknown"):
        diffusion.build(dict(backbone="dit", channel_mult=(1, 2)), image_shape=(3, 16, 16))
    with pytest.raises(ValueError, match="backbone"):
        flow.build(dict(backbone="vit"))


def test_cross_attention_learns_from_zero_init():
    """Cross-attention to the text starts as a no-op (zero output projection) yet receives
    gradients: after one step the tokens change the output, without the pooled path."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=2, input_size=4, patch_size=2, context_dim=6, cross_attention=True,
                          pooled_context=False, **SMALL))
    x, t = torch.randn(3, 2, 4, 4), torch.randint(0, 1000, (3,))
    ctx_a, ctx_b = torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    with torch.no_grad():
        h = torch.randn(3, 4, SMALL["hidden_size"])
        c = torch.randn(3, SMALL["hidden_size"])
        block = model.blocks[0]
        torch.testing.assert_close(block.cross(block.norm_cross(h), ctx_a), torch.zeros_like(h), rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # step 1 wakes the final layer and adaLN; step 2 reaches the cross-attention output
        opt.zero_grad()
        loss = (model(x, t, context=ctx_a) - x).pow(2).mean()
        loss.backward()
        opt.step()
    assert all(b.cross.to_out[0].weight.grad.abs().max() > 0 for b in model.blocks)
    with torch.no_grad():
        assert (model(x, t, context=ctx_a) - model(x, t, context=ctx_b)).abs().max() > 1e-6
