"""Tests of minigen.vae against independent references (torch.distributions, float64 formulas)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from minigen import vae
from minigen.vae import VAE, VAEConfig, bernoulli_nll, gaussian_kl, gaussian_nll, reparameterize

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw):
    base = dict(in_channels=1, image_size=16, latent_dim=6, hidden_channels=(8, 16))
    base.update(kw)
    return VAEConfig(**base)


def images(n=4, c=1, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, s, s, generator=g) * 2 - 1


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu, logvar = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    got = gaussian_kl(mu, logvar)
    assert got.shape == (5,)
    torch.testing.assert_close(got, ref)
    # any trailing shape is summed per example
    mu4, lv4 = mu.view(5, 7, 1, 1), logvar.view(5, 7, 1, 1)
    torch.testing.assert_close(gaussian_kl(mu4, lv4), ref)
    assert float(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max()) == 0.0


def test_reparameterize_statistics_and_gradients():
    torch.manual_seed(2)
    n = 200_000
    mu0, logvar0 = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([0.0, -1.5, 1.0])
    mu = mu0.expand(n, 3).clone().requires_grad_(True)
    logvar = logvar0.expand(n, 3).clone().requires_grad_(True)
    z = reparameterize(mu, logvar)
    std = (0.5 * logvar0).exp()
    # mean within 5 standard errors, std within 2%
    assert torch.all((z.mean(0) - mu0).abs() < 5 * std / math.sqrt(n)), (z.mean(0), mu0)
    torch.testing.assert_close(z.std(0), std, rtol=0.02, atol=0)
    z.sum().backward()
    # dz/dmu = 1; dz/dlogvar = 0.5 * sigma * eps = 0.5 * (z - mu)
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach(), rtol=1e-5, atol=1e-6)
    # fresh noise each call
    assert not torch.equal(reparameterize(mu0, logvar0), reparameterize(mu0, logvar0))


def test_bernoulli_elbo_equals_hand_computation():
    torch.manual_seed(3)
    eps = {}

    def fixed_noise(mu, logvar):  # deterministic reparameterisation, so we can recompute it
        if "e" not in eps:
            eps["e"] = torch.randn_like(mu)
        return mu + (0.5 * logvar).exp() * eps["e"]

    model = VAE(small_config(), reparameterize=fixed_noise)
    x = images(3, seed=4)
    got = model.elbo(x)

    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encoder(x))
        z = mu + (0.5 * logvar).exp() * eps["e"].double()
        p = torch.sigmoid(model.decoder(z.float()).double())
        t = (x.double() + 1) / 2
        log_px = (t * p.log() + (1 - t) * (1 - p).log()).flatten(1).sum(1)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        ref = log_px - kl
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)

    # training loss = -ELBO averaged, with beta on the KL only
    out = model.training_loss((x, torch.zeros(3)), step=0)
    torch.testing.assert_close(out["loss"].double(), -ref.mean(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["kl"].double(), kl.mean(), rtol=1e-5, atol=1e-4)
    model.config.beta = 4.0
    out = model.training_loss(x, step=0)
    torch.testing.assert_close(out["loss"].double(), (-log_px + 4 * kl).mean(), rtol=1e-5, atol=1e-3)

    # evaluate() reports the same ELBO and bits/dim = -ELBO / (D ln 2) for Bernoulli
    model.config.beta = 1.0
    ev = model.evaluate(x)
    assert ev["bpd_kind"] == "bernoulli cross-entropy"
    assert ev["elbo"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert ev["bits_per_dim"] == pytest.approx(float(-ref.mean()) / (16 * 16 * math.log(2)), rel=1e-5)


def test_gaussian_nll_is_a_normalised_density():
    torch.manual_seed(5)
    mean, x = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for logvar in (0.0, -3.0, 1.7):
        ref = -Normal(mean, math.exp(0.5 * logvar)).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_nll(mean, x, logvar), ref)
    logits = torch.randn(4, 1, 5, 5)
    t = torch.randint(0, 2, (4, 1, 5, 5)).float()
    ref = -torch.distributions.Bernoulli(logits=logits).log_prob(t).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, t * 2 - 1), ref)


def test_gaussian_bits_per_dim_matches_exact_discrete_likelihood():
    # Decoder and encoder zeroed: p(x|z) = N(0, sigma^2) per pixel and q(z|x) = N(0, I), so
    # KL = 0 and the exact 8-bit likelihood is a sum of Gaussian CDF differences over bins
    # of width 2/255 centred on the pixel values. The dequantised bound must agree up to the
    # Jensen gap (~1e-5 relative here); pixels in [0.5, 1] make a misplaced bin visible (~6e-3).
    sigma = 0.2
    model = VAE(small_config(likelihood="gaussian", sigma=sigma, in_channels=3))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(6)
    x = torch.randint(191, 256, (8, 3, 16, 16), generator=g).double() / 127.5 - 1
    half = 1 / 255
    normal = Normal(torch.tensor(0.0, dtype=torch.float64), sigma)
    exact = -(normal.cdf(x + half) - normal.cdf(x - half)).log().flatten(1).sum(1).mean()
    ev = model.evaluate(x.float())
    assert ev["bpd_kind"] == "dequantized 8-bit"
    assert ev["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev["nll_bound"] == pytest.approx(float(exact), rel=5e-4)
    assert ev["bits_per_dim"] == pytest.approx(float(exact) / (3 * 16 * 16 * math.log(2)), rel=5e-4)
    # the continuous ELBO is a density on the [-1, 1] scale: no bin-width term
    dens = -Normal(0.0, sigma).log_prob(x).flatten(1).sum(1).mean()
    assert ev["elbo"] == pytest.approx(-float(dens), rel=1e-5)
    # draws from p(x|z) have the decoder's spread; means do not
    torch.manual_seed(0)
    draws = model.sample(64, mean=False)
    assert float(draws.std()) == pytest.approx(sigma, rel=0.03)
    assert float(model.sample(4).abs().max()) == 0.0


def test_learned_sigma_gets_gradient():
    model = VAE(small_config(likelihood="gaussian", learn_sigma=True, sigma=0.3))
    assert float(model.decoder_logvar.detach()) == pytest.approx(2 * math.log(0.3))
    model.training_loss(images())["loss"].backward()
    assert model.decoder_logvar.grad is not None and model.decoder_logvar.grad.abs() > 0
    fixed = VAE(small_config(likelihood="gaussian"))
    assert "decoder_logvar" not in dict(fixed.named_parameters())


def test_custom_pieces_are_used():
    calls = []

    def my_kl(mu, logvar):
        calls.append("kl")
        return gaussian_kl(mu, logvar)

    def my_reparam(mu, logvar):
        calls.append("reparam")
        return mu

    model = VAE(small_config(), reparameterize=my_reparam, kl=my_kl)
    model.training_loss(images(), 0)
    assert calls == ["reparam", "kl"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_falls_and_generation_shapes(likelihood):
    torch.manual_seed(7)
    model = VAE(small_config(likelihood=likelihood, learn_sigma=True))
    # structured data: bright squares at random places
    x = -torch.ones(32, 1, 16, 16)
    for i in range(32):
        r, c = torch.randint(0, 10, (2,))
        x[i, :, r:r + 6, c:c + 6] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        out = model.training_loss((x, None), step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses[::5]

    model.eval()
    s = model.sample_images(5)
    assert s.shape == (5, 1, 16, 16) and s.min() >= -1 and s.max() <= 1
    draws = model.sample(3, mean=False)
    assert draws.shape == (3, 1, 16, 16)
    if likelihood == "bernoulli":
        assert set(draws.unique().tolist()) <= {-1.0, 1.0}
    rec = model.reconstruct(x[:4])
    assert rec.shape == x[:4].shape and rec.min() >= -1 and rec.max() <= 1
    path = model.interpolate(x[0], x[1], steps=6)
    assert path.shape == (6, 1, 16, 16)
    torch.testing.assert_close(path[0], rec[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], rec[1], atol=1e-5, rtol=0)
    assert model.interpolate(x[:3], x[3:6], steps=4).shape == (12, 1, 16, 16)


def test_bad_inputs_give_clear_errors():
    model = VAE(small_config())
    with pytest.raises(ValueError, match="channel"):
        model.training_loss(images(c=3))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.training_loss((images() + 1) * 127.5)
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig(likelihood="laplace")
    with pytest.raises(ValueError, match="divisible"):
        VAEConfig(image_size=30, hidden_channels=(8, 16))
    with pytest.raises(ValueError, match="steps"):
        model.interpolate(images()[0], images()[1], steps=1)


def test_build_for_the_cli():
    m = vae.build({"latent_dim": 4, "hidden_channels": [8, 8]}, (1, 28, 28), 10)
    assert isinstance(m, VAE) and m.config.latent_dim == 4 and m.config.hidden_channels == (8, 8)
    assert m.config.likelihood == "bernoulli"
    rgb = vae.build({}, (3, 32, 32), 18)
    assert rgb.config.likelihood == "gaussian" and rgb.config.in_channels == 3
    with pytest.raises(TypeError, match="latent_size"):
        vae.build({"latent_size": 3}, (1, 28, 28), 10)
    # a checkpoint stores asdict(config); rebuilding from it gives the same model
    import dataclasses
    again = VAE(VAEConfig(**dataclasses.asdict(m.config)))
    again.load_state_dict(m.state_dict())
