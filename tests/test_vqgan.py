"""Tests for minigen.vqgan (VQGAN: PatchGAN, GAN losses, adaptive weight, two-optimizer
training) and minigen.perceptual (the offline deep-feature distance and the LPIPS wrapper)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from minigen import perceptual as P
from minigen import vqgan as G
from minigen.judge import load_judge
from minigen.train import TrainConfig, fit


def tiny_config(**kw):
    """A VQGAN small enough for a CPU test: 32x32 -> 16x16 latent, a few thousand weights."""
    base = dict(in_channels=3, image_size=32, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                code_dim=8, num_codes=32, disc_ndf=8, disc_start=0, dead_code_threshold=0.0)
    base.update(kw)
    return G.VQGANConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: on a busy 2-core machine, two OpenMP threads spend most of
    # their time waiting for each other (100x slower here). Restored after the module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes_judge():
    return load_judge("shapes")


@pytest.fixture(scope="module")
def shapes_images():
    from minigen.data import load_dataset

    x, _ = load_dataset("shapes", split="test", n=16).tensors()
    return x


def rand_images(n, c=3, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, s, s, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- GAN losses


def test_hinge_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 1.5] -> mean 5/6
    assert G.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    # a confident, correct discriminator pays nothing
    assert G.hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0
    assert G.generator_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_vanilla_loss_hand_values():
    z = torch.zeros(5)
    assert G.vanilla_d_loss(z, z).item() == pytest.approx(math.log(2))  # D undecided: log 2
    real, fake = torch.tensor([1.0, -2.0]), torch.tensor([3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((sp(-1.0) + sp(2.0)) / 2 + sp(3.0))
    assert G.vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_d_losses_match_python_reference_on_random_maps():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(3, 1, 6, 6, generator=g) * 2, torch.randn(3, 1, 5, 5, generator=g) * 2
    r, f = real.double().flatten().tolist(), fake.double().flatten().tolist()
    hinge = 0.5 * (sum(max(0.0, 1 - v) for v in r) / len(r) + sum(max(0.0, 1 + v) for v in f) / len(f))
    vanilla = 0.5 * (sum(math.log1p(math.exp(-v)) for v in r) / len(r) + sum(math.log1p(math.exp(v)) for v in f) / len(f))
    assert G.hinge_d_loss(real, fake).item() == pytest.approx(hinge, rel=1e-5)
    assert G.vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-5)


# ----------------------------------------------------------------------------- adaptive weight


def _two_losses(seed):
    """A last layer W shared by two different losses, as in the decoder."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
    h = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 3, 8, 8, generator=g)
    critic = torch.randn(2, 3, 8, 8, generator=g)
    out = layer(h)
    rec = (out - target).abs().mean()
    gan = -(out * critic).mean() * 0.01  # a much weaker gradient than rec's
    return layer.weight, rec, gan, layer, h, target, critic


def test_adaptive_weight_matches_direct_gradient_norms():
    W, rec, gan, layer, h, target, critic = _two_losses(0)
    lam = G.adaptive_weight(rec, gan, W, disc_weight=0.8)
    assert not lam.requires_grad and lam.dim() == 0

    # independent reference: each loss on a fresh graph, backward into .grad, norms in float64
    def grad_norm(loss_of_out):
        layer.zero_grad()
        loss_of_out(layer(h)).backward()
        return layer.weight.grad.double().norm().item()

    n_rec = grad_norm(lambda o: (o - target).abs().mean())
    n_gan = grad_norm(lambda o: -(o * critic).mean() * 0.01)
    expected = min(max(n_rec / (n_gan + 1e-4), 0.0), 1e4) * 0.8
    assert lam.item() == pytest.approx(expected, rel=1e-5)
    assert lam.item() > 1  # the weak GAN gradient is scaled up
    # the graph was retained: the losses can still be backpropagated
    (rec + lam * gan).backward()


def test_adaptive_weight_clamps_and_scales():
    W, rec, _, *_ = _two_losses(1)
    dead_gan = (W * 0.0).sum()  # zero gradient: ratio ||grad rec|| / 1e-4
    n_rec = torch.autograd.grad(rec, W, retain_graph=True)[0].double().norm().item()
    assert n_rec / 1e-4 < 1e4  # below the clamp here...
    assert G.adaptive_weight(rec, dead_gan, W, 0.5).item() == pytest.approx(0.5 * n_rec / 1e-4, rel=1e-5)
    # ...and clamped at 1e4 for a 100x larger reconstruction gradient
    assert G.adaptive_weight(100 * rec, dead_gan, W, disc_weight=0.5).item() == pytest.approx(0.5 * 1e4)
    W, rec, gan, *_ = _two_losses(2)
    a = G.adaptive_weight(rec, gan, W, disc_weight=1.0)
    b = G.adaptive_weight(rec, gan, W, disc_weight=0.25)
    assert b.item() == pytest.approx(0.25 * a.item(), rel=1e-6)


# ----------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size,n_layers,expected", [(32, 2, 6), (32, 3, 2), (64, 3, 6), (64, 2, 14), (28, 2, 5)])
def test_patchgan_output_shape(size, n_layers, expected):
    d = G.NLayerDiscriminator(3, ndf=8, n_layers=n_layers)
    out = d(rand_images(2, s=size))
    assert out.shape == (2, 1, expected, expected)
    assert G.NLayerDiscriminator.output_size(size, n_layers) == expected


def test_patchgan_structure_and_init():
    torch.manual_seed(0)
    d = G.NLayerDiscriminator(3, ndf=64, n_layers=3)
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    kinds = [type(m).__name__ for m in d.main]
    assert kinds[:2] == ["Conv2d", "LeakyReLU"]  # no norm after the first conv
    assert kinds.count("BatchNorm2d") == 3  # after the s2, s2 and s1 convs
    assert all(m.negative_slope == 0.2 for m in d.main if isinstance(m, nn.LeakyReLU))
    w = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert w.mean().abs() < 2e-3 and w.std().item() == pytest.approx(0.02, rel=0.03)
    bn = torch.cat([m.weight for m in d.main if isinstance(m, nn.BatchNorm2d)])
    assert bn.mean().item() == pytest.approx(1.0, abs=5e-3) and bn.std().item() == pytest.approx(0.02, rel=0.2)


def test_config_picks_fewer_disc_layers_for_small_images():
    assert G.VQGANConfig(perceptual="none").discriminator_layers == 2
    assert G.VQGANConfig(image_size=64, perceptual="none").discriminator_layers == 3
    with pytest.raises(ValueError, match="too small"):
        G.VQGANConfig(image_size=16, ch_mult=(1, 2), disc_layers=4)


# ----------------------------------------------------------------------------- perceptual distance


def test_perceptual_matches_reference_formula(shapes_judge, shapes_images):
    loss = P.PerceptualLoss(3)
    x = shapes_images[:6]
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = loss(x, y)
    # reference: the judge's own feature_maps API, LPIPS formula in float64 numpy
    with torch.no_grad():
        fx, fy = shapes_judge.feature_maps(x), shapes_judge.feature_maps(y)
    ref = np.zeros(len(x))
    for a, b in zip(fx, fy):
        a, b = a.double().numpy(), b.double().numpy()
        na = a / np.maximum(np.sqrt((a ** 2).sum(1, keepdims=True)), 1e-10)
        nb = b / np.maximum(np.sqrt((b ** 2).sum(1, keepdims=True)), 1e-10)
        ref += ((na - nb) ** 2).sum(1).mean((1, 2)) / len(fx)
    np.testing.assert_allclose(d.detach().double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_perceptual_zero_for_identical_and_grows_with_noise(shapes_images):
    loss = P.PerceptualLoss(3)
    x = shapes_images[:8]
    assert loss(x, x.clone()).abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    d = [loss(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.6)]
    assert 0 < d[0] < d[1] < d[2], d


def test_perceptual_gradients_reach_input_not_judge(shapes_images):
    loss = P.PerceptualLoss(3)
    loss.train()  # e.g. called by fit on the model around it
    assert not loss.net.training  # the judge stays in eval mode
    buffers = {k: v.clone() for k, v in loss.net.named_buffers()}
    x = shapes_images[:4]
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)  # slightly outside [-1, 1]: allowed
    loss(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.net.parameters())
    for k, v in loss.net.named_buffers():  # BatchNorm running statistics untouched
        assert torch.equal(v, buffers[k]), k


def test_perceptual_no_nan_gradient_where_features_vanish(shapes_judge):
    # a constant image gives all-zero ReLU feature vectors at many positions
    loss = P.PerceptualLoss(3, judge=shapes_judge)
    x = torch.full((2, 3, 32, 32), -1.0, requires_grad=True)
    loss(x, torch.zeros(2, 3, 32, 32)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_perceptual_sizes_channels_and_errors(shapes_images):
    loss = P.PerceptualLoss(3)
    big = torch.nn.functional.interpolate(shapes_images[:2], size=64, mode="nearest")
    assert torch.isfinite(loss(big, big.flip(0))).all()  # resized to 32x32
    with pytest.raises(ValueError, match="32x32"):
        P.PerceptualLoss(3, resize=False)(big, big)
    with pytest.raises(ValueError, match="channel"):
        loss(shapes_images[:2, :1], shapes_images[:2, :1])
    with pytest.raises(ValueError, match="same shape"):
        loss(shapes_images[:2], shapes_images[:3])
    with pytest.raises(ValueError, match="no built-in judge"):
        P.PerceptualLoss(2)
    gray = P.PerceptualLoss(1)  # the digits judge
    assert gray.image_size == 28
    z = rand_images(2, c=1, s=28)
    assert gray(z, z).abs().max() < 1e-6


def test_lpips_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        P.LPIPS(tmp_path / "missing.pt")
    try:
        import lpips  # noqa: F401
    except ImportError:
        f = tmp_path / "w.pt"
        f.write_bytes(b"x")
        with pytest.raises(ImportError, match="pip install lpips"):
            P.LPIPS(f)


# ----------------------------------------------------------------------------- the model


class CountingDiscriminator(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d, self.calls = d, 0

    def forward(self, x):
        self.calls += 1
        return self.d(x)


def test_disc_start_switches_gan_terms():
    torch.manual_seed(0)
    calls = []

    def spy_weight(rec, g, last_layer, disc_weight):
        calls.append(last_layer)
        return G.adaptive_weight(rec, g, last_layer, disc_weight)

    disc = CountingDiscriminator(G.NLayerDiscriminator(3, 8, 2))
    m = G.VQGAN(tiny_config(disc_start=5), discriminator=disc, adaptive_weight_fn=spy_weight)
    x = rand_images(4, seed=1)

    out = m.training_loss((x, None), step=4, name="g")
    assert disc.calls == 0 and not calls
    assert out["g_gan"].item() == 0 and out["d_weight"].item() == 0
    expected = out["l1"] + m.config.perceptual_weight * out["perceptual"] + out["vq"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["perceptual"].item() > 0

    d_out = m.training_loss(x, step=4, name="d")
    assert d_out["loss"].item() == 0 and d_out["loss"].requires_grad and disc.calls == 0
    d_out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in disc.parameters())

    out = m.training_loss(x, step=5, name="g")
    assert disc.calls == 1 and len(calls) == 1 and calls[0] is m.decoder.conv_out.weight
    assert out["d_weight"].item() > 0
    total = out["rec"] + out["vq"] + out["d_weight"] * out["g_gan"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)

    d_out = m.training_loss(x, step=5, name="d")
    assert disc.calls == 3 and d_out["loss"].item() > 0  # D on real and on the reconstruction


def test_d_loss_uses_handed_in_function_on_real_and_detached_fake():
    torch.manual_seed(0)
    seen = {}

    def my_d_loss(real, fake):
        seen["real"], seen["fake"] = real, fake
        return G.vanilla_d_loss(real, fake)

    m = G.VQGAN(tiny_config(), d_loss_fn=my_d_loss)
    x = rand_images(4, seed=2)
    out = m.training_loss(x, step=0, name="d")
    assert out["loss"].item() == pytest.approx(G.vanilla_d_loss(seen["real"], seen["fake"]).item())
    out["loss"].backward()
    assert all(p.grad is None for p in m.generator_parameters())  # x_hat was detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.discriminator.parameters())


def test_encode_decode_roundtrip_and_no_codebook_updates():
    torch.manual_seed(0)
    m = G.VQGAN(tiny_config(dead_code_threshold=1.0))
    m.train()
    x = rand_images(3, seed=4)
    before = m.quantize.cluster_size.clone()
    z_q, idx = m.encode(x)
    assert z_q.shape == (3, 8, 16, 16) and idx.shape == (3, 16, 16) and idx.dtype == torch.int64
    torch.testing.assert_close(m.decode_indices(idx), m.decode(z_q))
    r = m.reconstruct(x)
    assert r.shape == x.shape and r.min() >= -1 and r.max() <= 1
    assert torch.equal(before, m.quantize.cluster_size)


def test_norm_groups_keep_several_channels():
    # 32 groups (taming) at 16 channels would be InstanceNorm; we keep >= 4 channels per group
    for ch, expected in ((16, {16: 4, 32: 8}), (128, {128: 32, 256: 32})):
        enc = G.Encoder(3, ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=8)
        dec = G.Decoder(3, ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=8)
        norms = [m for net in (enc, dec) for m in net.modules() if isinstance(m, nn.GroupNorm)]
        assert len(norms) > 10
        assert {m.num_channels: m.num_groups for m in norms} == expected
        assert all(m.eps == 1e-6 for m in norms)


def test_configure_optimizers_split_parameters():
    m = G.VQGAN(tiny_config())
    opts = m.configure_optimizers(TrainConfig(lr=3e-4))
    assert list(opts) == ["g", "d"]
    ids = lambda o: {id(p) for grp in o.param_groups for p in grp["params"]}  # noqa: E731
    gen = {id(p) for mod in (m.encoder, m.quant_conv, m.quantize, m.post_quant_conv, m.decoder)
           for p in mod.parameters()}
    assert ids(opts["g"]) == gen
    assert ids(opts["d"]) == {id(p) for p in m.discriminator.parameters()}
    assert not ids(opts["g"]) & {id(p) for p in m.perceptual.parameters()}
    for o in opts.values():
        assert isinstance(o, torch.optim.Adam) and o.defaults["betas"] == (0.5, 0.9) and o.defaults["lr"] == 3e-4


def test_fit_two_optimizers_each_changes_only_its_own(shapes_images):
    torch.manual_seed(0)
    m = G.VQGAN(tiny_config(disc_start=1))
    names = {id(p): n for n, p in m.named_parameters()}
    log = []

    orig = m.configure_optimizers

    def configure(config):
        opts = orig(config)
        for name, opt in opts.items():
            own = {id(p) for g in opt.param_groups for p in g["params"]}
            snap = {}

            def pre(o, args, kwargs, snap=snap):
                snap.clear()
                snap.update({n: p.detach().clone() for n, p in m.named_parameters()})

            def post(o, args, kwargs, name=name, own=own, snap=snap):
                changed = {n for n, p in m.named_parameters() if not torch.equal(p, snap[n])}
                log.append((name, changed, {names[i] for i in own}))

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)
        return opts

    m.configure_optimizers = configure
    judge_state = {k: v.clone() for k, v in m.perceptual.net.state_dict().items()}
    res = fit(m, shapes_images[:8], steps=2, batch_size=4, lr=1e-3, progress=False, log_every=1)

    assert [name for name, *_ in log] == ["g", "d", "g", "d"]
    for i, (name, changed, own) in enumerate(log):
        assert changed <= own, f"optimizer {name} changed parameters it does not own: {changed - own}"
        if name == "g" or i >= 2:  # "d" before disc_start (step 0) gets zero gradients
            assert changed, f"optimizer {name} changed nothing at call {i}"
    assert not log[1][1]  # step 0 < disc_start: the discriminator did not move
    for k, v in m.perceptual.net.state_dict().items():
        assert torch.equal(v, judge_state[k]), f"the frozen judge changed: {k}"
    assert m.training and not m.perceptual.net.training
    assert {"loss_g", "loss_d", "d_weight", "logits_real"} <= set(res.history[-1])
    assert all(math.isfinite(v) for v in res.history[-1].values())


def test_bad_inputs_raise_clear_errors():
    m = G.VQGAN(tiny_config())
    with pytest.raises(ValueError, match="channel"):
        m.training_loss(rand_images(2, c=1), 0, "g")
    with pytest.raises(ValueError, match="32x32"):
        m.reconstruct(rand_images(2, s=16))
    with pytest.raises(ValueError, match="'g' or 'd'"):
        m.training_loss(rand_images(2), 0, "gen")
    with pytest.raises(ValueError, match="divisible"):
        G.VQGANConfig(image_size=30, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="disc_loss"):
        G.VQGANConfig(disc_loss="wgan")
    from minigen.vq import VectorQuantizer

    with pytest.raises(ValueError, match="code_dim"):
        G.VQGAN(tiny_config(), quantizer=VectorQuantizer(16, 4))
    with pytest.raises(TypeError, match="unknown VQGAN option"):
        G.build({"nope": 1}, (3, 32, 32))
    with pytest.raises(ValueError, match="channel"):
        G.NLayerDiscriminator(3, 8, 2)(rand_images(1, c=1))


def test_build_for_cli_datasets():
    m = G.build({"ch": 8, "ch_mult": [1, 2, 2], "z_channels": 8, "code_dim": 8, "disc_ndf": 8}, (1, 28, 28))
    assert m.config.latent_size == 7 and m.perceptual.image_size == 28
    x = rand_images(2, c=1, s=28)
    assert m.reconstruct(x).shape == x.shape
    assert m.discriminator(x).shape == (2, 1, 5, 5)
    m4 = G.build({"ch": 8, "z_channels": 8, "code_dim": 8, "disc_ndf": 8}, (4, 32, 32))
    assert m4.perceptual is None  # no offline judge for 4 channels


@pytest.mark.parametrize("disc_weight", [0.0, 0.3, 2.5])
def test_fixed_weight_uses_disc_weight_and_skips_adaptive_fn(disc_weight):
    # adaptive_weight=False: lambda is the constant disc_weight, the adaptive function is never
    # called, and the GAN gradient reaches the decoder scaled by exactly that constant
    torch.manual_seed(int(10 * disc_weight))
    calls = []

    def spy_weight(rec, g, last_layer, dw):
        calls.append(dw)
        return G.adaptive_weight(rec, g, last_layer, dw)

    m = G.VQGAN(tiny_config(disc_start=3, adaptive_weight=False, disc_weight=disc_weight),
                adaptive_weight_fn=spy_weight)
    x = rand_images(4, seed=7)
    before = m.training_loss(x, step=2, name="g")
    assert before["d_weight"].item() == 0 and before["g_gan"].item() == 0  # still off before disc_start
    out = m.training_loss(x, step=3, name="g")
    assert not calls
    assert out["d_weight"].item() == pytest.approx(disc_weight)
    total = out["rec"] + out["vq"] + disc_weight * out["g_gan"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5, abs=1e-6)

    # the decoder's last-layer gradient: rec + vq part plus disc_weight x the GAN part
    W = m.get_last_layer()
    torch.manual_seed(1)
    out = m.training_loss(x, step=3, name="g")
    g_total = torch.autograd.grad(out["loss"], W)[0]
    x_hat, vq_loss, _ = m(x)
    rec = (x - x_hat).abs().mean() + m.config.perceptual_weight * m.perceptual(x, x_hat).mean()
    g_rec = torch.autograd.grad(rec + vq_loss, W, retain_graph=True)[0]
    g_gan = torch.autograd.grad(G.generator_loss(m.discriminator(x_hat)), W)[0]
    tol = 1e-5 * (g_rec.abs().max() + disc_weight * g_gan.abs().max()).item()
    torch.testing.assert_close(g_total, g_rec + disc_weight * g_gan, rtol=0, atol=tol)

    # the adaptive default, same model: the adaptive function is called with disc_weight
    m.config.adaptive_weight = True
    m.training_loss(x, step=3, name="g")
    assert calls == [disc_weight]


def test_negative_disc_weight_is_rejected():
    with pytest.raises(ValueError, match="disc_weight must be >= 0"):
        tiny_config(disc_weight=-0.1)
