"""Checks for lesson 01 (the variational autoencoder): the reparameterisation trick, the
Gaussian KL, the negative ELBO with a Bernoulli decoder, and latent interpolation.

Each check calls the learner's function on fresh seeded random inputs and compares it with
a reference written here in float64 (random functions: statistics over many draws, with the
global RNG seeded so a correct answer passes deterministically). Wrong answers that match a
typical mistake get a "Likely mistake" line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigen.course.checks._framework import Exercise, seeded, checker, show_hint

__all__ = ["hint", "reparameterize", "gaussian_kl", "vae_loss", "interpolate", "gaussian_kl_hidden", "interpolate_hidden"]


# ---------------------------------------------------------------------------- 1.1
_NO_GRAD = ("sampling with torch.normal(mu, std) or torch.distributions.Normal(...).sample() blocks "
            "the gradient. Write z = mu + sigma * eps with eps = torch.randn_like(mu): the noise is "
            "an input, so gradients flow to mu and logvar (the reparameterisation trick)")


@checker
def reparameterize(fn) -> None:
    """Exercise 1.1: z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) with the shape of mu."""
    ex = Exercise("1.1", "reparameterize")

    # 1. independent noise per element (per example and per latent dimension), not broadcast
    g = torch.Generator().manual_seed(1102)
    n, d = 4000, 6
    mu = torch.randn(n, d, generator=g)
    logvar = torch.randn(n, d, generator=g)
    with seeded(1103):
        z1 = ex.call(fn, mu, logvar)
        z2 = ex.call(fn, mu, logvar)
    for z in (z1, z2):
        if isinstance(z, torch.Tensor) and tuple(z.shape) != (n, d):
            ex.fail(f"z has shape {tuple(z.shape)}, expected {(n, d)} (the shape of mu)",
                    mistake="draw the noise with torch.randn_like(mu): one independent N(0, 1) number "
                            "per element of mu")
        ex.tensor(z, shape=(n, d), dtype=torch.float32, what="z")
    eps = (z1.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    if bool((eps.std(0) < 0.01).all()):
        ex.fail("every example got the same noise: for each latent dimension, (z - mu) / sigma is "
                "constant over the batch",
                mistake="torch.randn(latent_dim) or torch.randn(1) is broadcast over the batch; use "
                        "torch.randn_like(mu), one draw per element")
    if bool((eps.std(1) < 0.01).all()):
        ex.fail("every latent dimension got the same noise: (z - mu) / sigma is constant along each row",
                mistake="torch.randn(batch, 1) is broadcast over the latent dims; use torch.randn_like(mu)")
    if torch.equal(z1, z2):
        ex.fail("two calls returned the same z: the noise must be fresh on every call",
                mistake="don't call torch.manual_seed (or reuse a stored eps) inside the function")
    # the noise comes from torch's global RNG, so torch.manual_seed makes a run reproducible
    with seeded(1103):
        z3 = ex.tensor(ex.call(fn, mu, logvar), shape=(n, d), what="z")
    if not torch.equal(z1, z3):
        ex.fail("after the same torch.manual_seed, your function drew different noise: it does not use "
                "torch's random number generator",
                mistake="draw the noise with torch.randn_like(mu) (numpy or Python's random ignore "
                        "torch.manual_seed, so training runs would not be reproducible)")

    # 2. the distribution of z for one known mu and sigma, over many draws
    mu0, sigma0 = 0.8, 1.5
    var0, lv0 = sigma0 ** 2, 2 * math.log(sigma0)
    shape = (20000, 8)
    with seeded(1101):
        z = ex.call(fn, torch.full(shape, mu0), torch.full(shape, lv0))
    z = ex.tensor(z, shape=shape, dtype=torch.float32, what="z")
    ex.mean_std(z, mu0, sigma0, what=f"z for mu = {mu0}, sigma = {sigma0} (logvar = {lv0:.3f})", mistakes=[
        (mu0, var0, "exp(logvar) is the variance sigma^2, not the standard deviation: "
                    "sigma = exp(0.5 * logvar)"),
        (mu0, 0.5 * var0, "0.5 * exp(logvar) is half the variance; the standard deviation is "
                          "exp(0.5 * logvar)"),
        (mu0, lv0, "logvar is the log of the variance; the standard deviation is exp(0.5 * logvar)"),
        (mu0, 1 / sigma0, "exp(-0.5 * logvar) is 1/sigma; the sign of the exponent is flipped"),
        (mu0, 1.0, "the noise is not scaled: multiply eps by sigma = exp(0.5 * logvar)"),
        (0.0, sigma0, "you forgot to add mu: z = mu + sigma * eps"),
        (mu0 + 0.5 * sigma0, sigma0 / math.sqrt(12), "torch.rand_like draws uniform noise in [0, 1); "
                                                      "the trick needs Gaussian noise, torch.randn_like"),
    ])

    # 3. for element-wise different mu and logvar, (z - mu) / sigma is N(0, 1), independent across dims
    ex.mean_std(eps, 0.0, 1.0, what="the standardised noise (z - mu) / sigma for random mu, logvar")
    tol = 6 / math.sqrt(2 * n)
    for j in range(d):
        if abs(float(eps[:, j].std()) - 1) > tol:
            ex.fail(f"for random mu and logvar, (z - mu) / sigma has std {float(eps[:, j].std()):.3f} in "
                    f"latent dimension {j}, expected 1: each element's noise must be scaled by its own sigma")
    corr = torch.corrcoef(eps[:, :2].T)[0, 1]
    if abs(float(corr)) > 6 / math.sqrt(n):
        ex.fail(f"the noise of latent dimensions 0 and 1 is correlated ({float(corr):.2f}); draws must be "
                "independent: torch.randn_like(mu)")

    # 4. gradients: dz/dmu = 1 and dz/dlogvar = 0.5 * sigma * eps = 0.5 * (z - mu)
    g = torch.Generator().manual_seed(1104)
    for shape in [(8, 4), (3, 16)]:
        mu = torch.randn(shape, generator=g).requires_grad_()
        logvar = torch.randn(shape, generator=g).requires_grad_()
        mu_before, lv_before = mu.detach().clone(), logvar.detach().clone()
        with seeded(1105):
            z = ex.call(fn, mu, logvar)
        z = ex.tensor(z, shape=shape, dtype=torch.float32, what="z")
        if not torch.equal(mu.detach(), mu_before) or not torch.equal(logvar.detach(), lv_before):
            ex.fail("your function changed mu or logvar in place; return a new tensor")
        if not z.requires_grad:
            ex.fail("z does not depend differentiably on mu and logvar (requires_grad is False)",
                    mistake=_NO_GRAD)
        w = torch.randn(shape, generator=g)
        gmu, glv = torch.autograd.grad((z * w).sum(), [mu, logvar], allow_unused=True)
        for name, grad in (("mu", gmu), ("logvar", glv)):
            if grad is None or not torch.any(grad != 0):
                ex.fail(f"no gradient reaches `{name}`: z must be a differentiable function of mu and logvar",
                        mistake=_NO_GRAD)
        zd, mud = z.detach().double(), mu.detach().double()
        ex.close(gmu, w, atol=1e-5, what="the gradient of z with respect to mu (should be 1 per element)")
        ex.close(glv, 0.5 * w * (zd - mud), atol=1e-4, rtol=1e-4,
                 what="the gradient of z with respect to logvar", mistakes=[
                     (w * (zd - mud), "exp(logvar) is the variance; sigma = exp(0.5 * logvar)"),
                 ])
    ex.passed("distribution, independent noise, shapes, gradients")


# ---------------------------------------------------------------------------- 1.2
def _kl_inputs(g, n, d):
    mu = torch.randn(n, d, generator=g) * 1.5
    logvar = torch.randn(n, d, generator=g) * 1.2
    mu[0] = 0.0          # a posterior equal to the prior: KL exactly 0
    logvar[0] = 0.0
    return mu, logvar


@checker
def gaussian_kl(fn) -> None:
    """Exercise 1.2: KL(N(mu, exp(logvar)) || N(0, I)) per example, summed over latent dims -> (N,)."""
    ex = Exercise("1.2", "gaussian_kl")
    g = torch.Generator().manual_seed(12)
    for n, d in [(6, 5), (4, 16), (7, 1)]:
        mu, logvar = _kl_inputs(g, n, d)
        mu.requires_grad_()
        logvar.requires_grad_()
        out = ex.call(fn, mu, logvar)
        m, lv = mu.detach().double(), logvar.detach().double()
        per_dim = 0.5 * (m ** 2 + lv.exp() - 1 - lv)
        ref = per_dim.sum(1)
        if isinstance(out, torch.Tensor) and tuple(out.shape) != (n,):
            got = tuple(out.shape)
            hint = None
            if got == ():
                o = float(out.detach())
                if math.isclose(o, float(ref.mean()), rel_tol=1e-4, abs_tol=1e-4):
                    hint = "you averaged over the batch; return one KL per example, shape (N,)"
                elif math.isclose(o, float(ref.sum()), rel_tol=1e-4, abs_tol=1e-4):
                    hint = "you summed over the batch too; sum over the latent dims only: .sum(dim=1)"
                else:
                    hint = "return one KL per example (N,), summed over the latent dims: .sum(dim=1)"
            elif got == (n, d) and d > 1:
                hint = "sum the per-dimension KL over the latent dims: .sum(dim=1)"
            elif got == (d,):
                hint = "you reduced over the batch (dim 0); sum over the latent dims (dim=1) instead"
            ex.fail(f"the KL has shape {got}, expected {(n,)} (one value per example)", mistake=hint)
        out = ex.tensor(out, shape=(n,), dtype=torch.float32, what="the KL")
        var = lv.exp()
        reverse = 0.5 * (lv + (1 + m ** 2) / var - 1).sum(1)
        ex.close(out, ref, atol=1e-4, rtol=1e-5, what=f"the KL (N={n}, latent_dim={d})", mistakes=[
            (-ref, "the sign is flipped: KL(q || p) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) >= 0"),
            (ref + 0.5 * d, "you forgot the -1: 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)"),
            (ref + d, "the constant is -1 per dimension, not +1: "
                      "0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)"),
            (ref / d, "you averaged over the latent dims; the KL of independent dims is their sum"),
            (2 * ref, "you forgot the factor 0.5"),
            (0.5 * (m ** 2 + var - 1 + lv).sum(1), "the log-variance term has the wrong sign: "
                                                  "... - 1 - logvar"),
            (0.5 * (m ** 2 + (0.5 * lv).exp() - 1 - lv).sum(1),
             "exp(0.5 * logvar) is sigma; the formula needs the variance sigma^2 = exp(logvar)"),
            (0.5 * (m ** 2 + (2 * lv).exp() - 1 - lv).sum(1),
             "exp(2 * logvar) is sigma^4; the formula needs the variance sigma^2 = exp(logvar)"),
            (0.5 * (m ** 2 + var - 1 - 0.5 * lv).sum(1),
             "the last term is log sigma^2 = logvar itself, not 0.5 * logvar"),
            (0.5 * (var - 1 - lv).sum(1), "you left out the mu^2 term"),
            (0.5 * (m + var - 1 - lv).sum(1), "mu must be squared: mu^2 (mu.pow(2))"),
            (reverse, "that is KL(p || q), the reverse direction; the ELBO needs KL(q(z|x) || p(z)) = "
                      "0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)"),
        ])
        if d > 1:  # gradients in closed form: dKL/dmu = mu, dKL/dlogvar = 0.5 * (exp(logvar) - 1)
            if not out.requires_grad:
                ex.fail("the KL does not depend differentiably on mu and logvar (requires_grad is False): "
                        "avoid .detach(), .item(), numpy or torch.no_grad() inside your function")
            w = torch.randn(n, generator=g)
            gmu, glv = torch.autograd.grad((out * w).sum(), [mu, logvar], allow_unused=True)
            for name, grad in (("mu", gmu), ("logvar", glv)):
                if grad is None:
                    ex.fail(f"no gradient reaches `{name}`")
            ex.close(gmu, w[:, None].double() * m, atol=1e-4, rtol=1e-4, what="the gradient with respect to mu")
            ex.close(glv, w[:, None].double() * 0.5 * (var - 1), atol=1e-4, rtol=1e-4,
                     what="the gradient with respect to logvar")
    ex.passed("values, KL = 0 at the prior, shape (N,), gradients")


# ---------------------------------------------------------------------------- 1.3
def _vae_inputs(g, n, c, h, w, d, extreme=False):
    logits = torch.randn(n, c, h, w, generator=g) * 3
    x = torch.rand(n, c, h, w, generator=g) * 2 - 1
    x[torch.rand(n, c, h, w, generator=g) < 0.4] = -1.0   # like real digits: background exactly -1
    x[torch.rand(n, c, h, w, generator=g) < 0.15] = 1.0
    if extreme:  # a decoder that is confidently wrong on a few pixels: |logit| ~ 30
        sel = torch.rand(n, c, h, w, generator=g) < 0.05
        logits[sel] = 30.0 * torch.where(x[sel] > 0, -1.0, 1.0)
    mu = torch.randn(n, d, generator=g)
    logvar = torch.randn(n, d, generator=g)
    return logits, x, mu, logvar


def _bce_logits64(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE with logits in float64: softplus(l) - t * l, written out stably."""
    l, t = logits.double(), target.double()
    return l.clamp(min=0) - l * t + torch.log1p(torch.exp(-l.abs()))


@checker
def vae_loss(fn) -> None:
    """Exercise 1.3: mean over the batch of  sum_pixels BCE(logits, (x+1)/2) + beta * KL  (a scalar)."""
    ex = Exercise("1.3", "vae_loss")
    g = torch.Generator().manual_seed(13)
    cases = [(6, 1, 8, 8, 5, 1.0, False), (4, 1, 7, 9, 3, 0.25, False), (5, 3, 4, 4, 8, 4.0, False),
             (6, 1, 6, 6, 4, 2.0, True)]
    for k, (n, c, h, w, d, beta, extreme) in enumerate(cases):
        logits, x, mu, logvar = _vae_inputs(g, n, c, h, w, d, extreme)
        for t in (logits, mu, logvar):
            t.requires_grad_()
        # beta by default (1.0), by keyword and by position
        if k == 0:
            out = ex.call(fn, logits, x, mu, logvar)
        elif k == 1:
            out = ex.call(fn, logits, x, mu, logvar, beta=beta)
        else:
            out = ex.call(fn, logits, x, mu, logvar, beta)
        case = f" (N={n}, C={c}, H={h}, W={w}, latent_dim={d}, beta={beta})"
        lt, m, lv = logits.detach(), mu.detach().double(), logvar.detach().double()
        target = (x.double() + 1) / 2
        recon = _bce_logits64(lt, target).flatten(1).sum(1)                      # (N,) nats per image
        kl = (0.5 * (m ** 2 + lv.exp() - 1 - lv)).sum(1)                          # (N,)
        ref = (recon + beta * kl).mean()
        if isinstance(out, torch.Tensor) and out.dim() != 0:
            hint = ("you return one value per image; average over the batch: .mean()"
                    if tuple(out.shape) == (n,) else "sum over pixels and latent dims, then average over the batch")
            ex.fail(f"the loss has shape {tuple(out.shape)}; a loss must be a single number (shape ())" + case,
                    mistake=hint)
        out = ex.tensor(out, shape=(), dtype=torch.float32, what="the loss")
        if not torch.isfinite(out):
            if extreme:
                ex.fail(f"the loss is {float(out.detach())} when a few logits are about +-30{case}",
                        mistake="log(sigmoid(logits)) underflows to log(0) for large |logits|: use "
                                "F.binary_cross_entropy_with_logits(logits, target, reduction='none'), "
                                "which is computed stably from the logits")
            ex.fail(f"the loss is {float(out.detach())}{case}")
        p = c * h * w
        recon_unmapped = _bce_logits64(lt, x.double()).flatten(1).sum(1)
        recon_double_sigmoid = _bce_logits64(torch.sigmoid(lt), target).flatten(1).sum(1)
        recon_probs = F.binary_cross_entropy(torch.sigmoid(lt), target.float(), reduction="none").double()
        recon_probs = recon_probs.flatten(1).sum(1)
        mistakes = [
            ((recon / p + beta * kl).mean(), "you averaged the reconstruction term over the pixels; "
                                             "log p(x|z) of an image is the SUM over its pixels "
                                             "(reduction='none', then .sum over C, H, W)"),
            ((recon_unmapped + beta * kl).mean(), "the Bernoulli target must be in [0, 1]: map the images "
                                                  "with (x + 1) / 2 before the cross-entropy"),
            ((beta * recon + kl).mean(), "beta multiplies the wrong term: loss = recon + beta * KL"),
            ((recon + beta * kl).sum(), "you summed over the batch; average over it (nats per image)"),
            (-ref, "the sign is flipped: return the NEGATIVE ELBO (a loss to minimise), recon + beta * KL"),
            ((recon - beta * kl).mean(), "the KL is subtracted; the loss (-ELBO) ADDS it: recon + beta * KL"),
            ((recon_double_sigmoid + beta * kl).mean(), "you applied a sigmoid before a *_with_logits "
                                                        "loss: pass the raw logits"),
            ((recon_probs + beta * kl).mean(), "sigmoid followed by F.binary_cross_entropy saturates for "
                                               "large |logits| (log 0 is clamped to -100): use "
                                               "F.binary_cross_entropy_with_logits on the raw logits"),
            ((recon + beta * kl / d).mean(), "the KL is averaged over latent dims; sum it (your gaussian_kl)"),
            ((recon + beta * kl).mean() / p, "the loss is divided by the number of pixels; keep nats per image"),
        ]
        if beta != 1.0:
            mistakes.append(((recon + kl).mean(), "beta is not used: loss = recon + beta * KL"))
        ex.close(out, ref, atol=1e-3, rtol=1e-5, what="the loss" + case, mistakes=mistakes)
        ex.gradients_flow(out, {"logits": logits, "mu": mu, "logvar": logvar}, what="the loss")
    ex.passed("values, beta, scalar shape, stable for large logits, gradients")


# ---------------------------------------------------------------------------- 1.4
@checker
def interpolate(fn) -> None:
    """Exercise 1.4: `steps` points on the straight line from z1 to z2, both ends included -> (steps, D)."""
    ex = Exercise("1.4", "interpolate")
    g = torch.Generator().manual_seed(14)
    for d, steps in [(2, 5), (16, 8), (3, 2), (4, 11)]:
        z1 = torch.randn(d, generator=g)
        z2 = torch.randn(d, generator=g)
        b1, b2 = z1.clone(), z2.clone()
        out = ex.call(fn, z1, z2, steps)
        case = f" (latent_dim={d}, steps={steps})"
        if isinstance(out, torch.Tensor) and tuple(out.shape) != (steps, d):
            got = tuple(out.shape)
            hint = None
            if got == (d, steps):
                hint = "the result is transposed: one row per step, shape (steps, latent_dim)"
            elif len(got) == 2 and got[1] == d and got[0] in (steps - 1, steps + 1):
                hint = f"you return {got[0]} points; `steps` counts both endpoints: torch.linspace(0, 1, steps)"
            elif got == (steps,):
                hint = "t must broadcast over the latent dims: t[:, None] (shape (steps, 1))"
            elif len(got) == 3 and got[0] == steps and 1 in got[1:]:
                hint = "an extra axis of size 1: use t[:, None] with 1-D z1 and z2"
            ex.fail(f"the result has shape {got}, expected {(steps, d)}" + case, mistake=hint)
        out = ex.tensor(out, shape=(steps, d), dtype=torch.float32, what="the interpolation")
        if not (torch.equal(z1, b1) and torch.equal(z2, b2)):
            ex.fail("your function changed z1 or z2 in place")
        a, b = z1.double(), z2.double()

        def line(t):
            return (1 - t)[:, None] * a + t[:, None] * b

        t = torch.linspace(0, 1, steps, dtype=torch.float64)
        ex.close(out, line(t), atol=1e-5, what="the interpolation" + case, mistakes=[
            (line(torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1]),
             "the last point must be exactly z2: t = torch.linspace(0, 1, steps) includes both ends "
             "(torch.arange(steps) / steps stops one step short)"),
            (line(torch.linspace(0, 1, steps + 1, dtype=torch.float64)[1:]),
             "the first point must be exactly z1: t starts at 0"),
            (line(torch.linspace(0, 1, steps + 2, dtype=torch.float64)[1:-1]),
             "both endpoints belong to the path: t = torch.linspace(0, 1, steps)"),
            (line(1 - t), "the path runs backwards (or the weights are swapped): it must start at z1 (t = 0) and end "
                          "at z2 (t = 1), (1 - t) * z1 + t * z2"),
            (a + t[:, None] * b, "z1 + t * z2 is not the straight line; use (1 - t) * z1 + t * z2"),
        ])
    ex.passed("endpoints, even spacing, shape (steps, latent_dim)")


# ---------------------------------------------------------------------------- hidden tests
@checker
def gaussian_kl_hidden(fn) -> None:
    """Hidden test of 1.2: KL(prior || prior) = 0 exactly, KL >= 0, float64 kept, one example."""
    ex = Exercise("1.2", "gaussian_kl", hidden=True)
    zero = ex.tensor(ex.call(fn, torch.zeros(3, 4), torch.zeros(3, 4)), shape=(3,), what="KL(prior || prior)")
    ex.close(zero, torch.zeros(3), atol=0.0, what="KL(N(0, 1) || N(0, 1)), which must be exactly 0")
    g = torch.Generator().manual_seed(102)
    mu = torch.randn(1, 7, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(1, 7, generator=g, dtype=torch.float64) * 2
    out = ex.tensor(ex.call(fn, mu, logvar), shape=(1,), dtype=torch.float64, what="the KL of float64 inputs")
    ex.close(out, 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1), atol=1e-12, rtol=1e-12,
             what="the KL of one float64 example")
    if float(out) < 0:
        ex.fail("the KL is negative; a KL divergence is never below 0")


@checker
def interpolate_hidden(fn) -> None:
    """Hidden test of 1.4: steps = 1 gives z1 alone; the ends are exact; float64 kept."""
    ex = Exercise("1.4", "interpolate", hidden=True)
    g = torch.Generator().manual_seed(114)
    z1, z2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    out = ex.tensor(ex.call(fn, z1, z2, 7), shape=(7, 6), dtype=torch.float64, what="the path of float64 latents")
    ex.close(out[0], z1, atol=1e-12, what="the first point (must be z1)")
    ex.close(out[-1], z2, atol=1e-12, what="the last point (must be z2)")
    one = ex.tensor(ex.call(fn, z1, z2, 1), shape=(1, 6), what="the path with steps=1")
    ex.close(one[0], z1, atol=1e-12, what="the path with steps=1 (torch.linspace(0, 1, 1) is [0])")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '1.1': (
        'Sampling z ~ N(mu, sigma^2) directly has no gradient with respect to mu and sigma. Write'
        ' the sample as a deterministic function of mu, sigma and noise drawn from N(0, 1).',
        'The network gives the log-variance, so sigma is the exponential of half of it. Draw '
        "standard normal noise with the same shape as mu (from torch's global generator), scale "
        'it by sigma and shift it by mu.',
    ),
    '1.2': (
        'KL(N(mu, sigma^2) || N(0, 1)) has a closed form per latent dimension; the KL of the '
        'whole diagonal Gaussian is the sum over dimensions. One value per example.',
        'Per dimension: one half of (mu squared + variance - 1 - log-variance), where the '
        'variance is the exponential of logvar. Sum over the latent dimension (dim 1), keep the '
        'batch dimension.',
    ),
    '1.3': (
        'The negative ELBO: how badly the decoder explains x (a Bernoulli likelihood per pixel) '
        'plus beta times the KL of exercise 1.2, averaged over the batch.',
        'Targets for the Bernoulli likelihood live in [0, 1]: map x from [-1, 1]. Use binary '
        "cross entropy on the logits without reduction, sum it over each image's pixels, add beta"
        ' times your KL per image, then average over the batch.',
    ),
    '1.4': (
        'A straight line between two latent vectors, walked in `steps` evenly spaced points, from'
        ' z1 (the first row) to z2 (the last row).',
        "Make `steps` weights evenly spaced from 0 to 1 (in z1's dtype), one per output row. Row "
        'i mixes (1 - weight_i) of z1 with weight_i of z2; broadcasting a column of weights '
        'against the vectors gives all rows at once.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
