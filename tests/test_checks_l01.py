"""Every lesson-01 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import CheckFailed
from minigen.course.checks import l01 as check

from _check_helpers import stub, fails


# ---------------------------------------------------------------------------- 1.1
def test_reparameterize_correct(capsys):
    check.reparameterize(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
    # a different correct formulation: torch.distributions' reparameterised sample
    check.reparameterize(lambda mu, logvar: torch.distributions.Normal(mu, logvar.mul(0.5).exp()).rsample())
    check.reparameterize(lambda mu, logvar: mu + logvar.exp().sqrt() * torch.randn(mu.shape))
    out = capsys.readouterr().out
    assert out.count("✓ Exercise 1.1 reparameterize: passed") == 3 and out.count("\n") == 3


def test_reparameterize_leaves_notebook_rng_alone():
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    check.reparameterize(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
    assert torch.equal(torch.rand(4), a)


def test_reparameterize_stub():
    fails(check.reparameterize, stub, "Exercise 1.1 (reparameterize) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda mu, lv: mu + torch.exp(lv) * torch.randn_like(mu), "exp(logvar) is the variance"),
    (lambda mu, lv: mu + lv * torch.randn_like(mu), "logvar is the log of the variance"),
    (lambda mu, lv: mu + torch.exp(-0.5 * lv) * torch.randn_like(mu), "sign of the exponent"),
    (lambda mu, lv: torch.exp(0.5 * lv) * torch.randn_like(mu), "forgot to add mu"),
    (lambda mu, lv: mu + torch.randn_like(mu), "not scaled"),
    (lambda mu, lv: mu + torch.exp(0.5 * lv) * torch.rand_like(mu), "uniform"),
    (lambda mu, lv: mu + torch.exp(0.5 * lv) * torch.randn(mu.shape[1]), "same noise"),
    (lambda mu, lv: mu + torch.exp(0.5 * lv) * torch.randn(mu.shape[0], 1), "every latent dimension"),
    (lambda mu, lv: torch.normal(mu, torch.exp(0.5 * lv)), "blocks the gradient"),
    (lambda mu, lv: torch.distributions.Normal(mu, torch.exp(0.5 * lv)).sample(), "blocks the gradient"),
    (lambda mu, lv: (mu + torch.exp(0.5 * lv) * torch.randn_like(mu)).detach(), "requires_grad is False"),
])
def test_reparameterize_mistakes(answer, fragment):
    fails(check.reparameterize, answer, "Exercise 1.1", fragment)


def test_reparameterize_fixed_noise_and_shape():
    def seeded_inside(mu, lv):
        torch.manual_seed(0)
        return mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
    fails(check.reparameterize, seeded_inside, "same z", "manual_seed")
    fails(check.reparameterize, lambda mu, lv: (mu + torch.exp(0.5 * lv) * torch.randn_like(mu))[0], "shape")
    fails(check.reparameterize, lambda mu, lv: None, "return")


# ---------------------------------------------------------------------------- 1.2
def good_kl(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)


def test_gaussian_kl_correct(capsys):
    check.gaussian_kl(good_kl)

    def with_distributions(mu, logvar):  # an independent correct formulation
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
        return torch.distributions.kl_divergence(q, p).sum(-1)
    check.gaussian_kl(with_distributions)
    assert capsys.readouterr().out.count("✓ Exercise 1.2 gaussian_kl: passed") == 2


def test_gaussian_kl_stub():
    fails(check.gaussian_kl, stub, "Exercise 1.2 (gaussian_kl) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda mu, lv: -good_kl(mu, lv), "sign is flipped"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - lv).sum(1), "forgot the -1"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() + 1 - lv).sum(1), "not +1"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv).mean(1), "averaged over the latent dims"),
    (lambda mu, lv: (mu ** 2 + lv.exp() - 1 - lv).sum(1), "factor 0.5"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 + lv).sum(1), "wrong sign"),
    (lambda mu, lv: 0.5 * (mu ** 2 + (0.5 * lv).exp() - 1 - lv).sum(1), "exp(0.5 * logvar) is sigma"),
    (lambda mu, lv: 0.5 * (lv.exp() - 1 - lv).sum(1), "mu^2 term"),
    (lambda mu, lv: 0.5 * (lv + (1 + mu ** 2) / lv.exp() - 1).sum(1), "reverse direction"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(1).mean(), "averaged over the batch"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv), "sum the per-dimension KL"),
    (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(0), "reduced over the batch"),
    (lambda mu, lv: good_kl(mu, lv).detach(), "requires_grad is False"),
])
def test_gaussian_kl_mistakes(answer, fragment):
    fails(check.gaussian_kl, answer, "Exercise 1.2", fragment)


def test_gaussian_kl_unknown_mistake_has_no_hint():
    msg = fails(check.gaussian_kl, lambda mu, lv: good_kl(mu, lv) * 1.1, "wrong values")
    assert "Likely mistake" not in msg


# ---------------------------------------------------------------------------- 1.3
def good_loss(logits, x, mu, logvar, beta=1.0):
    recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    return (recon + beta * good_kl(mu, logvar)).mean()


def test_vae_loss_correct(capsys):
    check.vae_loss(good_loss)

    def per_pixel_formula(logits, x, mu, logvar, beta=1.0):  # softplus form, summed per image
        t = (x + 1) / 2
        recon = (F.softplus(logits) - t * logits).sum(dim=(1, 2, 3))
        return recon.mean() + beta * good_kl(mu, logvar).mean()
    check.vae_loss(per_pixel_formula)
    assert capsys.readouterr().out.count("✓ Exercise 1.3 vae_loss: passed") == 2


def test_vae_loss_stub():
    fails(check.vae_loss, stub, "Exercise 1.3 (vae_loss) is not done yet")


def bce(logits, x, reduction="none"):
    return F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction=reduction)


@pytest.mark.parametrize("answer, fragment", [
    (lambda l, x, mu, lv, beta=1.0: (bce(l, x).flatten(1).mean(1) + beta * good_kl(mu, lv)).mean(), "SUM over its pixels"),
    (lambda l, x, mu, lv, beta=1.0: bce(l, x, "mean") + beta * good_kl(mu, lv).mean(), "SUM over its pixels"),
    (lambda l, x, mu, lv, beta=1.0: (F.binary_cross_entropy_with_logits(l, x, reduction="none").flatten(1).sum(1)
                              + beta * good_kl(mu, lv)).mean(), "(x + 1) / 2"),
    (lambda l, x, mu, lv, beta=1.0: (beta * bce(l, x).flatten(1).sum(1) + good_kl(mu, lv)).mean(), "wrong term"),
    (lambda l, x, mu, lv, beta=1.0: (bce(l, x).flatten(1).sum(1) + good_kl(mu, lv)).mean(), "beta is not used"),
    (lambda l, x, mu, lv, beta=1.0: (bce(l, x).flatten(1).sum(1) + beta * good_kl(mu, lv)).sum(), "summed over the batch"),
    (lambda l, x, mu, lv, beta=1.0: -good_loss(l, x, mu, lv, beta), "NEGATIVE ELBO"),
    (lambda l, x, mu, lv, beta=1.0: (bce(l, x).flatten(1).sum(1) - beta * good_kl(mu, lv)).mean(), "KL is subtracted"),
    (lambda l, x, mu, lv, beta=1.0: good_loss(torch.sigmoid(l), x, mu, lv, beta), "sigmoid before"),
    (lambda l, x, mu, lv, beta=1.0: (F.binary_cross_entropy(torch.sigmoid(l), (x + 1) / 2, reduction="none")
                              .flatten(1).sum(1) + beta * good_kl(mu, lv)).mean(), "saturates"),
    (lambda l, x, mu, lv, beta=1.0: bce(l, x).flatten(1).sum(1) + beta * good_kl(mu, lv), "average over the batch"),
    (lambda l, x, mu, lv, beta=1.0: good_loss(l.detach(), x, mu, lv, beta), "no gradient"),
])
def test_vae_loss_mistakes(answer, fragment):
    fails(check.vae_loss, answer, "Exercise 1.3", fragment)


def test_vae_loss_beta_default_and_keyword():
    fails(check.vae_loss, lambda l, x, mu, lv, beta=0.5: good_loss(l, x, mu, lv, beta), "Exercise 1.3", "beta=1.0")
    fails(check.vae_loss, lambda l, x, mu, lv, b=1.0: good_loss(l, x, mu, lv, b), "keyword argument `beta`")


def test_vae_loss_unstable_formula_is_caught():
    def by_hand(l, x, mu, lv, beta=1.0):
        t, p = (x + 1) / 2, torch.sigmoid(l)
        recon = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).flatten(1).sum(1)
        return (recon + beta * good_kl(mu, lv)).mean()
    fails(check.vae_loss, by_hand, "Exercise 1.3", "binary_cross_entropy_with_logits")


# ---------------------------------------------------------------------------- 1.4
def good_interp(z1, z2, steps):
    t = torch.linspace(0, 1, steps)[:, None]
    return (1 - t) * z1 + t * z2


def test_interpolate_correct(capsys):
    check.interpolate(good_interp)
    check.interpolate(lambda z1, z2, steps: torch.stack([torch.lerp(z1, z2, i / (steps - 1)) for i in range(steps)]))
    assert capsys.readouterr().out.count("✓ Exercise 1.4 interpolate: passed") == 2


def test_interpolate_stub():
    fails(check.interpolate, stub, "Exercise 1.4 (interpolate) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda z1, z2, s: good_interp(z1, z2, s + 1)[:-1], "exactly z2"),
    (lambda z1, z2, s: z1 + (torch.arange(s) / s)[:, None] * (z2 - z1), "exactly z2"),
    (lambda z1, z2, s: good_interp(z1, z2, s + 1)[1:], "exactly z1"),
    (lambda z1, z2, s: good_interp(z1, z2, s + 2)[1:-1], "both endpoints"),
    (lambda z1, z2, s: good_interp(z2, z1, s), "backwards"),
    (lambda z1, z2, s: z1 + torch.linspace(0, 1, s)[:, None] * z2, "not the straight line"),
    (lambda z1, z2, s: good_interp(z1, z2, s).T, "transposed"),
    (lambda z1, z2, s: good_interp(z1, z2, s + 1), "counts both endpoints"),
    (lambda z1, z2, s: torch.linspace(0, 1, s) * (z2 - z1).sum(), "broadcast"),
])
def test_interpolate_mistakes(answer, fragment):
    fails(check.interpolate, answer, "Exercise 1.4", fragment)


def test_reparameterize_noise_from_torch_rng():
    import random

    def python_random(mu, logvar):
        eps = torch.tensor([[random.gauss(0, 1) for _ in range(mu.shape[1])] for _ in range(mu.shape[0])])
        return mu + torch.exp(0.5 * logvar) * eps

    fails(check.reparameterize, python_random, "Exercise 1.1", "torch's random number generator",
          "torch.randn_like")
