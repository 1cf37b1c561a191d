"""The denoising U-Net: shapes, conditioning paths, errors, memory format."""

import pytest
import torch

from minigen.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small(**kw):
    base = dict(channels=16, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(2,))
    return UNet(UNetConfig(**{**base, **kw}))


def _wake(model):
    """The output conv starts at zero; give it weights so the output depends on the input."""
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)
        for m in model.modules():  # and switch on SpatialTransformers (zero proj_out)
            if hasattr(m, "transformer_blocks"):
                m.proj_out.weight.normal_(0, 0.05)
    return model


def test_default_size_and_shapes():
    model = UNet()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.2e6 < n_params < 2.0e6, n_params  # the small default (~1.7M)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (2, 3, 28, 28)]:
            out = model(torch.randn(shape), t)
            assert out.shape == shape
            assert torch.all(out == 0)  # zero-initialised output layer


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (27, 2)])
@pytest.mark.parametrize("cond", ["none", "class", "context", "both"])
def test_output_shapes_with_conditioning(size, channels, cond):
    kw = dict(in_channels=channels)
    if cond in ("class", "both"):
        kw["num_classes"] = 10
    if cond in ("context", "both"):
        kw["context_dim"] = 12
    model = _wake(_small(**kw))
    x = torch.randn(3, channels, size, size)
    y = torch.tensor([0, 9, 10]) if "num_classes" in kw else None
    ctx = torch.randn(3, 4, 12) if "context_dim" in kw else None
    out = model(x, torch.tensor([1, 500, 999]), y=y, context=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_out_channels():
    model = _small(in_channels=3, out_channels=6)
    assert model(torch.randn(1, 3, 16, 16), 5).shape == (1, 6, 16, 16)


def test_every_input_changes_the_output():
    model = _wake(_small(num_classes=5, context_dim=8)).eval()
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8)
    t, y = torch.tensor([10, 10]), torch.tensor([1, 1])
    base = model(x, t, y, ctx)
    assert not torch.allclose(base, model(x, torch.tensor([700, 700]), y, ctx))
    assert not torch.allclose(base, model(x, t, torch.tensor([2, 2]), ctx))
    assert not torch.allclose(base, model(x, t, y, torch.randn(2, 3, 8)))
    # y=None is the null class, context=None is the zero ("empty") context
    torch.testing.assert_close(model(x, t, None, ctx), model(x, t, torch.tensor([5, 5]), ctx))
    torch.testing.assert_close(model(x, t, y, None), model(x, t, y, torch.zeros(2, 7, 8)))
    # examples do not leak into each other (GroupNorm, attention are per example)
    torch.testing.assert_close(model(x[:1], t[:1], y[:1], ctx[:1]), base[:1], atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter():
    model = _wake(_small(num_classes=3, context_dim=4, pooled_context=True))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 3]), torch.randn(2, 2, 4))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_pooled_context_adds_the_projected_mean_context_to_the_time_embedding():
    a = _wake(_small(context_dim=8, pooled_context=True)).eval()
    b = _small(context_dim=8).eval()
    state = a.state_dict()
    b.load_state_dict({k: v for k, v in state.items() if not k.startswith("context_embed.")})
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), torch.randn(2, 5, 8)
    # reference: the plain U-Net with emb = time_embed(...) + W mean_m(context_m) + bias
    pooled = a.context_embed(ctx.mean(dim=1))
    hook = b.time_embed.register_forward_hook(lambda mod, inp, out: out + pooled)
    torch.testing.assert_close(a(x, t, context=ctx), b(x, t, context=ctx))
    hook.remove()
    assert not torch.allclose(a(x, t, context=ctx), b(x, t, context=ctx))
    # the pooled path alone carries the condition (cross-attention switched off)
    with torch.no_grad():
        for m in a.modules():
            if hasattr(m, "transformer_blocks"):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
    assert not torch.allclose(a(x, t, context=ctx), a(x, t, context=torch.randn(2, 5, 8)))
    with pytest.raises(ValueError, match="pooled_context needs context_dim"):
        UNetConfig(pooled_context=True)


def test_channels_last_matches_contiguous():
    a = _wake(_small(channels_last=True))
    b = _small(channels_last=False)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    torch.testing.assert_close(a(x, t), b(x, t), atol=1e-5, rtol=1e-4)


def test_bad_inputs_give_clear_errors():
    model = _small(num_classes=4, context_dim=8)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="N, C, H, W"):
        model(torch.randn(3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="t of shape"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        model(x, torch.tensor([1, 2]), y=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="int64"):
        model(x, torch.tensor([1, 2]), y=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, torch.tensor([1, 2]), context=torch.randn(2, 3, 7))
    plain = _small()
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cross-attention"):
        plain(x, torch.tensor([1, 2]), context=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="channel_mult"):
        UNetConfig(channel_mult=())
