"""Checks for lesson 06 (DDIM, classifier-free guidance, inpainting).

Each check calls the learner's function on fresh seeded random inputs and compares it with
a reference written here in float64 (never minigen.diffusion's own implementation). Wrong
answers that match a typical mistake get a "Likely mistake" line.

Conventions checked (minigen, diffusers, improved-diffusion; v from Salimans & Ho 2022):

    epsilon-prediction:  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),  eps_hat = the output
    v-prediction:        x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
                         eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    clip_denoised clamps x0_hat to [-1, 1]; eps_hat stays as derived from the output (diffusers)
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,  abar_{-1} = 1
    guided = out_uncond + w (out_cond - out_uncond)
"""

from __future__ import annotations

import math

import torch

from minigen.course.checks._framework import Exercise, seeded, checker, show_hint

__all__ = ["hint", "ddim_step", "classifier_free_guidance", "inpaint", "classifier_free_guidance_hidden"]


# ---------------------------------------------------------------------------- references
def _linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """float32 abar_t of DDPM's linear schedule, as GaussianDiffusion stores it."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def _cosine_alphas_cumprod(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    """float32 abar_t of the cosine schedule (improved-diffusion), betas capped at 0.999."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def _as_index(t, n) -> torch.Tensor:
    t = torch.as_tensor(t).long()
    return t.expand(n) if t.ndim == 0 else t


def _abar64(alphas_cumprod, t, n) -> torch.Tensor:
    """abar_t as float64 (n, 1, 1, 1); t = -1 means the clean image, abar = 1."""
    t = _as_index(t, n)
    ab = alphas_cumprod.double()
    out = torch.where(t >= 0, ab[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
    return out.view(-1, 1, 1, 1)


def _x0_eps64(x, out, ab, prediction_type):
    """(x0_hat, eps_hat) in float64 from the network output, before any clipping."""
    if prediction_type == "epsilon":
        return (x - (1 - ab).sqrt() * out) / ab.sqrt(), out
    if prediction_type == "v":
        return ab.sqrt() * x - (1 - ab).sqrt() * out, ab.sqrt() * out + (1 - ab).sqrt() * x
    raise ValueError(f"internal: unknown prediction_type {prediction_type!r}")


def _ddim64(x_t, t, t_prev, out, alphas_cumprod, *, eta=0.0, noise=None, clip_denoised=False,
            prediction_type="epsilon", recompute_eps=False, abar_prev=None, sigma=None, direction=None,
            x0_fn=None, eps_fn=None):
    """The reference DDIM step in float64. The keyword "hooks" build the known wrong variants:
    x0_fn(x, out, abar) and eps_fn(x, out, abar) replace the conversion of the network output."""
    n = x_t.shape[0]
    x, o = x_t.double(), out.double()
    ab = _abar64(alphas_cumprod, t, n)
    abp = _abar64(alphas_cumprod, t_prev, n) if abar_prev is None else abar_prev
    x0, e = _x0_eps64(x, o, ab, prediction_type)
    if x0_fn is not None:
        x0 = x0_fn(x, o, ab)
    if eps_fn is not None:
        e = eps_fn(x, o, ab)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        if recompute_eps:
            e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    s = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt() if sigma is None else sigma(ab, abp)
    d = (1 - abp - s**2).clamp(min=0).sqrt() if direction is None else direction(ab, abp, s)
    res = abp.sqrt() * x0 + d * e
    if noise is not None:
        res = res + s * noise.double()
    return res


def _reference_ddim_step(x_t, t, t_prev, model_output, alphas_cumprod, *, eta=0.0, noise=None,
                         clip_denoised=True, generator=None, prediction_type="epsilon", **unused):
    """The reference step with the learner's signature (handed to the learner's inpainting loop)."""
    if eta > 0 and noise is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
    return _ddim64(x_t, t, t_prev, model_output, alphas_cumprod, eta=eta, noise=noise if eta > 0 else None,
                   clip_denoised=clip_denoised, prediction_type=prediction_type).to(x_t.dtype)


def _reference_q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (minigen's q_sample signature)."""
    ab = _abar64(alphas_cumprod, t, x0.shape[0])
    return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).to(x0.dtype)


def _ddim_inputs(g, n, t, *, x0_range=1.0):
    """Realistic inputs: x_t = q_sample(x0, t, eps_true), model output = eps_true + error."""
    ab = _linear_alphas_cumprod()
    x0 = (torch.rand(n, 3, 6, 6, generator=g) * 2 - 1) * x0_range
    eps_true = torch.randn(n, 3, 6, 6, generator=g)
    a = _abar64(ab, t, n)
    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps_true.double()).float()
    eps = eps_true + 0.3 * torch.randn(n, 3, 6, 6, generator=g)
    return x_t, eps, ab


def _v_inputs(g, n, t, *, x0_range=1.0):
    """The same for v-prediction on the cosine schedule: output = v_true + error, with
    v_true = sqrt(abar_t) eps_true - sqrt(1 - abar_t) x0."""
    ab = _cosine_alphas_cumprod()
    x0 = ((torch.rand(n, 3, 6, 6, generator=g) * 2 - 1) * x0_range).double()
    eps_true = torch.randn(n, 3, 6, 6, generator=g).double()
    a = _abar64(ab, t, n)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps_true).float()
    v = (a.sqrt() * eps_true - (1 - a).sqrt() * x0).float() + 0.3 * torch.randn(n, 3, 6, 6, generator=g)
    return x_t, v, ab


def _v_mistakes(x_t, t, t_prev, v, ab, **kw):
    """The typical wrong conversions of a v output, as (wrong x_prev, explanation)."""
    def wrong(**hooks):
        return _ddim64(x_t, t, t_prev, v, ab, prediction_type="v", **kw, **hooks)

    return [
        (_ddim64(x_t, t, t_prev, v, ab, prediction_type="epsilon", **kw),
         "with prediction_type='v' the network output is v, not eps: convert it first, "
         "x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t"),
        (wrong(x0_fn=lambda x, o, a: a.sqrt() * x + (1 - a).sqrt() * o),
         "sign error in x0_hat: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, so "
         "x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (minus, not plus)"),
        (wrong(x0_fn=lambda x, o, a: (1 - a).sqrt() * x - a.sqrt() * o),
         "the coefficients of x0_hat are swapped: x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v"),
        (wrong(eps_fn=lambda x, o, a: (1 - a).sqrt() * o + a.sqrt() * x),
         "the coefficients of eps_hat are swapped: eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t "
         "(at t = T, where abar is ~0, eps_hat must be ~x_t: the image is pure noise)"),
        (wrong(eps_fn=lambda x, o, a: a.sqrt() * o - (1 - a).sqrt() * x),
         "sign error in eps_hat: eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (plus, not minus)"),
        (wrong(eps_fn=lambda x, o, a: o),
         "x0_hat is right, but the direction term uses v itself; it needs the noise estimate "
         "eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t"),
        (wrong(x0_fn=lambda x, o, a: (x - (1 - a).sqrt() * o) / a.sqrt()),
         "x0_hat comes from the epsilon formula applied to v; for v-prediction "
         "x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (no division)"),
    ]


# ---------------------------------------------------------------------------- 6.1
@checker
def ddim_step(fn) -> None:
    """Exercise 6.1: one DDIM step x_t -> x_{t_prev} (t_prev = -1: the clean image, abar = 1),
    for epsilon- and v-prediction; other prediction types raise ValueError."""
    ex = Exercise("6.1", "ddim_step")
    g = torch.Generator().manual_seed(61)
    T = 1000

    def run(x_t, t, t_prev, eps, ab, **kw):
        before = (x_t.clone(), eps.clone(), ab.clone())
        out = ex.call(fn, x_t, t, t_prev, eps, ab, **kw)
        if isinstance(out, tuple):
            ex.fail("your function returned a tuple; return only x_prev, a tensor shaped like x_t")
        out = ex.tensor(out, shape=x_t.shape, dtype=torch.float32, what="x_prev")
        if not (torch.equal(x_t, before[0]) and torch.equal(eps, before[1]) and torch.equal(ab, before[2])):
            ex.fail("your function changed one of its inputs in place (x_t, eps or alphas_cumprod); "
                    "compute new tensors instead (no add_, clamp_, mul_ on the inputs)")
        return out

    # (a) eta = 0 between two interior timesteps, no clipping: the deterministic DDIM update
    t = torch.tensor([999, 870, 640, 505, 999, 733])
    t_prev = 480
    x_t, eps, ab = _ddim_inputs(g, len(t), t)
    out = run(x_t, t, t_prev, eps, ab, eta=0.0, clip_denoised=False)
    n = len(t)
    ab_t, ab_p = _abar64(ab, t, n), _abar64(ab, t_prev, n)
    case = " (eta = 0, t_prev = 480, clip_denoised=False)"
    ex.close(out, _ddim64(x_t, t, t_prev, eps, ab), atol=1e-4, rtol=1e-4, what="x_prev" + case, mistakes=[
        (x_t, "your step returns x_t unchanged: you used abar_t where abar_prev belongs. x0_hat is "
              "re-noised to t_prev: sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps"),
        (_ddim64(x_t, t, t_prev, eps, ab, abar_prev=ab_t, direction=lambda a, ap, s: (1 - ab_p).sqrt()),
         "the x0_hat term uses sqrt(abar_t); it must be sqrt(abar_prev): x0_hat is re-noised to t_prev"),
        (_ddim64(x_t, t, t_prev, eps, ab, direction=lambda a, ap, s: (1 - a).sqrt()),
         "the direction term uses sqrt(1 - abar_t); it must be sqrt(1 - abar_prev - sigma^2)"),
        (_ddim64(x_t, t, t_prev, eps, ab, x0_fn=lambda x, e, a: (x - (1 - a) * e) / a.sqrt()),
         "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the noise coefficient is a square root"),
        (_ddim64(x_t, t, t_prev, eps, ab, x0_fn=lambda x, e, a: (x - (1 - a).sqrt() * e) / a),
         "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): divide by the square root of abar_t"),
        (_ddim64(x_t, t, t_prev, eps, ab, x0_fn=lambda x, e, a: x - (1 - a).sqrt() * e),
         "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): you forgot to divide by sqrt(abar_t)"),
        (_ddim64(x_t, t, t_prev, eps, ab, sigma=lambda a, ap: ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()),
         "sigma must be scaled by eta (sigma = eta * ...): at eta = 0, sigma = 0 and the "
         "direction term is sqrt(1 - abar_prev) * eps"),
        (_ddim64(x_t, t, t_prev, eps, ab, abar_prev=_abar64(ab, t - 1, n)),
         "abar_prev is alphas_cumprod[t_prev] (the next timestep of the sampling grid), not alphas_cumprod[t - 1]"),
    ])

    # (b) eta > 0 with given noise: sigma and the sigma^2 inside the direction term
    for eta in (1.0, 0.5):
        t = torch.tensor([950, 700, 455, 999, 610, 820])
        t_prev = 400
        x_t, eps, ab = _ddim_inputs(g, len(t), t)
        z = torch.randn(x_t.shape, generator=g)
        out = run(x_t, t, t_prev, eps, ab, eta=eta, noise=z, clip_denoised=False)
        n = len(t)

        def sig(factor=1.0, f=None):
            return lambda a, ap: factor * (((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt() if f is None else f(a, ap))

        beta_t = 1 - _abar64(ab, t, n) / _abar64(ab, t - 1, n)  # one step of the full schedule
        case = f" (eta = {eta}, t_prev = {t_prev}, noise given, clip_denoised=False)"
        mistakes = [
            (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z,
                     direction=lambda a, ap, s: (1 - ap).sqrt()),
             "the direction term is sqrt(1 - abar_prev - sigma^2) * eps: you left out the - sigma^2. "
             "The noise sigma*z already carries variance sigma^2; the total must stay 1 - abar_prev"),
            (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=None),
             "with eta > 0 the step adds sigma * noise at the end; your result has no noise term"),
            (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z,
                     sigma=sig(f=lambda a, ap: ((1 - a) / (1 - ap)).sqrt() * (1 - a / ap).sqrt())),
             "sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev): "
             "the first ratio is upside down"),
            (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z,
                     sigma=sig(f=lambda a, ap: ((1 - ap) / (1 - a)).sqrt() * beta_t.sqrt())),
             "sigma uses 1 - abar_t / abar_prev, the beta of the *jump* from t to t_prev; "
             "betas[t] (one step of the full schedule) is too small when steps are skipped"),
            (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z,
                     sigma=sig(f=lambda a, ap: ((1 - ap) / (1 - a)) * (1 - a / ap))),
             "sigma is a standard deviation: take the square root of both factors, "
             "sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)"),
        ]
        if eta != 1.0:
            mistakes += [
                (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z, sigma=sig(math.sqrt(eta))),
                 "eta multiplies sigma, not sigma^2: sigma = eta * sqrt(...) * sqrt(...), "
                 "not sqrt(eta * ...)"),
                (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z, sigma=sig(eta**2)),
                 "eta multiplies sigma once: sigma = eta * sqrt(...) * sqrt(...)"),
                (_ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z, sigma=sig(1.0)),
                 "sigma must be scaled by eta (sigma = eta * ...); you used the eta = 1 value"),
            ]
        if not torch.isfinite(out).all():
            ex.fail(f"x_prev{case} contains NaN/inf",
                    mistake="1 - abar_prev - sigma^2 came out negative, so sigma is too large: "
                            "sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev) "
                            "(is a ratio upside down?)")
        ex.close(out, _ddim64(x_t, t, t_prev, eps, ab, eta=eta, noise=z), atol=1e-4, rtol=1e-4,
                 what="x_prev" + case, mistakes=mistakes)

    # (c) the last step, t_prev = -1: abar_prev = 1, the result is x0_hat with no noise
    for eta in (0.0, 0.5):
        t = torch.tensor([19, 99, 42, 7, 60])
        x_t, eps, ab = _ddim_inputs(g, len(t), t)
        z = torch.randn(x_t.shape, generator=g)
        out = ex.call(fn, x_t, t, -1, eps, ab, eta=eta, noise=z, clip_denoised=False)
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            ex.fail(f"x_prev at the last step (t_prev = -1, eta = {eta}) contains NaN/inf",
                    mistake="alphas_cumprod[-1] is the *last* entry of the schedule (abar_{T-1}, "
                            "almost 0), not the clean image: for t_prev = -1 use abar_prev = 1")
        out = run(x_t, t, -1, eps, ab, eta=eta, noise=z, clip_denoised=False)
        n = len(t)
        last = torch.full((n, 1, 1, 1), float(ab[-1]), dtype=torch.float64)
        first = torch.full((n, 1, 1, 1), float(ab[0]), dtype=torch.float64)
        zero = lambda a, ap: 0 * a  # noqa: E731 (eta * sqrt(negative) would be NaN)
        mistakes = [
            (_ddim64(x_t, t, -1, eps, ab, abar_prev=last, sigma=zero),
             "alphas_cumprod[-1] is the *last* entry of the schedule (abar_{T-1}, almost 0), not "
             "the clean image: for t_prev = -1 use abar_prev = 1"),
            (_ddim64(x_t, t, -1, eps, ab, eta=eta, noise=z, abar_prev=first),
             "at the last step use abar_prev = 1, not alphas_cumprod[0]: abar_0 < 1 leaves a little "
             "noise in the final sample (the original DDIM code does this; diffusers fixed it with "
             "set_alpha_to_one)"),
        ]
        ex.close(out, _ddim64(x_t, t, -1, eps, ab), atol=1e-4, rtol=1e-4,
                 what=f"x_prev at the last step (t_prev = -1, eta = {eta})", mistakes=mistakes)

    # (d) clip_denoised: clamp x0_hat to [-1, 1]; eps stays the network's estimate
    t = torch.tensor([300, 120, 450, 200, 80, 350])
    t_prev = 60
    x_t, eps, ab = _ddim_inputs(g, len(t), t, x0_range=1.5)
    out = run(x_t, t, t_prev, eps, ab, eta=0.0, clip_denoised=True)
    ref = _ddim64(x_t, t, t_prev, eps, ab, clip_denoised=True)
    x0_unclipped = _ddim64(x_t, t, -1, eps, ab)
    ex.close(out, ref, atol=1e-4, rtol=1e-4, what="x_prev (eta = 0, t_prev = 60, clip_denoised=True)", mistakes=[
        (_ddim64(x_t, t, t_prev, eps, ab, clip_denoised=False),
         "with clip_denoised=True clamp x0_hat to [-1, 1]"),
        (_ddim64(x_t, t, t_prev, eps, ab, clip_denoised=True, recompute_eps=True),
         "keep the network's eps after clamping x0_hat; recomputing eps from the clamped x0_hat "
         "(GLIDE's variant) feeds the clipped-off part back into x_prev as noise at every step, "
         "and the samples stay noisy (minigen and diffusers keep the raw eps)"),
        (_ddim64(x_t, t, t_prev, eps, ab).clamp(-1, 1),
         "clamp x0_hat, the predicted clean image, not x_prev (a noisy image may leave [-1, 1])"),
    ])
    if float((x0_unclipped.abs() > 1).double().mean()) < 0.05:  # the test must exercise clipping
        raise AssertionError("internal: clipping inputs do not leave [-1, 1]")

    # (e) eta > 0 without given noise: the function draws z ~ N(0, I) itself
    t = torch.full((64,), 500)
    x_t, eps, ab = _ddim_inputs(g, 64, t)
    run(x_t, t, 250, eps, ab, eta=0.0, clip_denoised=False)  # eta = 0 needs no noise
    with seeded(616):
        out = run(x_t, t, 250, eps, ab, eta=1.0, clip_denoised=False)
    n = 64
    ab_t, ab_p = _abar64(ab, t, n), _abar64(ab, 250, n)
    sigma = ((1 - ab_p) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_p).sqrt()
    z = (out.double() - _ddim64(x_t, t, 250, eps, ab, eta=1.0)) / sigma
    if float(z.std()) < 1e-3:
        ex.fail("with eta = 1 and noise=None your step added no noise",
                mistake="with noise=None and eta > 0, draw z ~ N(0, I) yourself "
                        "(torch.randn_like(x_t), or torch.randn with the generator)")
    ex.mean_std(z, 0.0, 1.0, what="(x_prev - mean) / sigma with eta = 1 and noise=None")

    # (e2) ... drawn from the `generator` passed in: the same generator seed gives the same step
    # whatever the global RNG holds, another seed another step
    t = torch.tensor([640, 300, 905])
    x_t, eps, ab = _ddim_inputs(g, 3, t)

    def with_generator(seed, global_seed):
        with seeded(global_seed):
            return run(x_t, t, 200, eps, ab, eta=0.8, clip_denoised=False,
                       generator=torch.Generator().manual_seed(seed))

    a, b, c = with_generator(5, 1), with_generator(5, 2), with_generator(6, 1)
    if not torch.equal(a, b):
        ex.fail("with eta > 0, noise=None and the same `generator`, two calls gave different x_prev "
                "(the global RNG decided the noise)",
                mistake="draw the noise from the generator you were given: torch.randn(x_t.shape, "
                        "generator=generator, ...) (torch.randn_like takes no generator)")
    if torch.equal(a, c):
        ex.fail("generators with different seeds gave the same x_prev: the noise must come from the "
                "generator passed in")

    # (e3) the defaults: eta = 0 and clip_denoised=True when the caller passes neither
    t = torch.tensor([300, 120, 450])
    x_t, eps, ab = _ddim_inputs(g, 3, t, x0_range=1.5)
    out = run(x_t, t, 60, eps, ab)
    ex.close(out, _ddim64(x_t, t, 60, eps, ab, clip_denoised=True), atol=1e-4, rtol=1e-4,
             what="x_prev with the default arguments (eta = 0, clip_denoised=True)", mistakes=[
                 (_ddim64(x_t, t, 60, eps, ab, clip_denoised=False),
                  "clip_denoised defaults to True: keep the defaults of the exercise's signature")])

    # (f) v-prediction (cosine schedule): interior steps with eta = 0 and eta = 0.5. The
    # timesteps avoid abar = 1/2, where swapped coefficients would give the right answer.
    for eta in (0.0, 0.5):
        t = torch.tensor([999, 900, 760, 610, 420, 300])
        t_prev = 150
        x_t, v, ab = _v_inputs(g, len(t), t)
        z = torch.randn(x_t.shape, generator=g) if eta > 0 else None
        kw = dict(eta=eta, noise=z) if eta > 0 else dict(eta=eta)
        out = run(x_t, t, t_prev, v, ab, prediction_type="v", clip_denoised=False, **kw)
        ex.close(out, _ddim64(x_t, t, t_prev, v, ab, prediction_type="v", **kw), atol=1e-4, rtol=1e-4,
                 what=f"x_prev with prediction_type='v' (eta = {eta}, t_prev = {t_prev}, clip_denoised=False)",
                 mistakes=_v_mistakes(x_t, t, t_prev, v, ab, **kw))

    # (g) v-prediction, last step: x_prev = x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    t = torch.tensor([19, 99, 42, 7, 60])
    x_t, v, ab = _v_inputs(g, len(t), t)
    out = run(x_t, t, -1, v, ab, prediction_type="v", clip_denoised=False)
    ex.close(out, _ddim64(x_t, t, -1, v, ab, prediction_type="v"), atol=1e-4, rtol=1e-4,
             what="x_prev with prediction_type='v' at the last step (t_prev = -1)",
             mistakes=_v_mistakes(x_t, t, -1, v, ab))

    # (h) v-prediction with clipping: clamp x0_hat only; eps_hat is derived from v as before
    t = torch.tensor([300, 120, 450, 200, 80, 350])
    t_prev = 60
    x_t, v, ab = _v_inputs(g, len(t), t, x0_range=1.5)
    out = run(x_t, t, t_prev, v, ab, prediction_type="v", clip_denoised=True)
    x0_unclipped = _ddim64(x_t, t, -1, v, ab, prediction_type="v")
    ex.close(out, _ddim64(x_t, t, t_prev, v, ab, prediction_type="v", clip_denoised=True), atol=1e-4, rtol=1e-4,
             what="x_prev with prediction_type='v' (eta = 0, t_prev = 60, clip_denoised=True)", mistakes=[
        (_ddim64(x_t, t, t_prev, v, ab, prediction_type="v"),
         "with clip_denoised=True clamp x0_hat to [-1, 1] (for v-prediction too)"),
        (_ddim64(x_t, t, t_prev, v, ab, prediction_type="v", clip_denoised=True, recompute_eps=True),
         "derive eps_hat from v and x_t (sqrt(abar_t) v + sqrt(1 - abar_t) x_t), not from the clamped "
         "x0_hat: recomputing it after clamping (GLIDE's variant) feeds the clipped-off part back "
         "into x_prev as noise at every step"),
        (_ddim64(x_t, t, t_prev, v, ab, prediction_type="v").clamp(-1, 1),
         "clamp x0_hat, the predicted clean image, not x_prev (a noisy image may leave [-1, 1])"),
        *_v_mistakes(x_t, t, t_prev, v, ab, clip_denoised=True),
    ])
    if float((x0_unclipped.abs() > 1).double().mean()) < 0.05:  # the test must exercise clipping
        raise AssertionError("internal: clipping inputs (v) do not leave [-1, 1]")

    # (i) any other prediction_type is refused with a ValueError, not silently treated as eps
    x_t, eps, ab = _ddim_inputs(g, 2, torch.tensor([500, 400]))
    ex.callable(fn)
    try:
        fn(x_t, torch.tensor([500, 400]), 300, eps, ab, eta=0.0, clip_denoised=False, prediction_type="sample")
    except ValueError:
        pass
    except NotImplementedError:
        ex.fail("with prediction_type='sample' your function raised NotImplementedError; raise ValueError "
                "for a prediction type it does not handle (NotImplementedError means 'exercise not done')")
    except Exception as e:  # noqa: BLE001 (report whatever the learner's function raised)
        ex.fail(f"with prediction_type='sample' your function raised {type(e).__name__}: {e}; "
                "raise a ValueError that names the supported types ('epsilon', 'v')")
    else:
        ex.fail("with prediction_type='sample' your function returned a result",
                mistake="a prediction type other than 'epsilon' or 'v' must raise ValueError; treating "
                        "an unknown output as eps gives silently wrong samples")
    ex.passed("epsilon and v, values for eta = 0, 0.5, 1, the last step, clipping, noise")


# ---------------------------------------------------------------------------- 6.2
@checker
def classifier_free_guidance(fn) -> None:
    """Exercise 6.2: eps = eps_uncond + w (eps_cond - eps_uncond)."""
    ex = Exercise("6.2", "classifier_free_guidance")
    g = torch.Generator().manual_seed(62)
    # random scales (not only the usual 7.5), 0 and 1 exactly, a negative one; any shape; the
    # scale passed by position and by keyword
    w_random = [round(float(v), 3) for v in torch.rand(3, generator=g) * 9 + 0.2]
    cases = [(w_random[0], (4, 3, 5, 5)), (7.5, (2, 1, 4, 6)), (0.0, (3, 3, 4, 4)), (1.0, (3, 3, 4, 4)),
             (w_random[1], (6, 16)), (-0.5, (2, 4, 3, 3)), (w_random[2], (2, 3, 2, 4, 4)), (4, (5, 4, 3, 3))]
    for k, (w, shape) in enumerate(cases):
        u = torch.randn(shape, generator=g)
        c = torch.randn(shape, generator=g)
        u0, c0 = u.clone(), c.clone()
        out = ex.call(fn, u, c, w) if k % 2 == 0 else ex.call(fn, u, c, guidance_scale=w)
        out = ex.tensor(out, shape=shape, dtype=torch.float32, what=f"the guided output (w = {w})")
        if not (torch.equal(u, u0) and torch.equal(c, c0)):
            ex.fail("your function changed out_uncond or out_cond in place; return a new tensor")
        ud, cd = u.double(), c.double()
        ex.close(out, ud + w * (cd - ud), atol=1e-5, rtol=1e-5, what=f"the guided output (w = {w})", mistakes=[
            (cd + w * (cd - ud),
             "eps_cond + w (eps_cond - eps_uncond) is the parametrisation of Ho & Salimans' paper, "
             "whose w is our w - 1. Here w = 1 must give exactly eps_cond and w = 0 eps_uncond: "
             "eps_uncond + w (eps_cond - eps_uncond)"),
            (cd + w * (ud - cd),
             "the roles are swapped: start from the *unconditional* output and move towards the "
             "conditional one, eps_uncond + w (eps_cond - eps_uncond)"),
            (ud + w * (ud - cd),
             "the sign of the difference is flipped: eps_uncond + w (eps_cond - eps_uncond) pushes "
             "*towards* the condition"),
            (w * cd, "you dropped the unconditional output: eps_uncond + w (eps_cond - eps_uncond)"),
            (ud + w * cd, "the difference is eps_cond - eps_uncond: eps_uncond + w (eps_cond - eps_uncond)"),
            ((ud + cd) * w / 2, "guidance extrapolates, it is not an average: eps_uncond + w (eps_cond - eps_uncond)"),
            (ud + 7.5 * (cd - ud), "the guidance scale is fixed at 7.5: use the guidance_scale argument"),
            (ud + 3.0 * (cd - ud), "the guidance scale is fixed at 3: use the guidance_scale argument"),
        ])
    ex.passed("values for random scales, 0, 1 and a negative one, any shape, positional and keyword")


# ---------------------------------------------------------------------------- 6.3
def _trailing(T: int, S: int) -> list[int]:
    return [int(round(T - i * T / S)) - 1 for i in range(S)]


@checker
def inpaint(fn) -> None:
    """Exercise 6.3: the DDIM inpainting loop. Checked through the model calls it makes:
    every call sees the known region re-noised to that call's timestep, the unknown region
    follows DDIM steps, and the result equals x0 where mask == 1. Run twice: with the default
    (epsilon) and with prediction_type="v", which the loop must pass on to ddim_step."""
    ex = Exercise("6.3", "inpaint")
    g = torch.Generator().manual_seed(63)
    _inpaint_case(ex, fn, g, "epsilon", seed=630)
    _inpaint_case(ex, fn, g, "v", seed=631)
    ex.passed("timesteps, re-noised known region at every step, DDIM updates for epsilon and v, "
              "exact known pixels")


def _inpaint_case(ex, fn, g, prediction_type, *, seed):
    T, S, n = 40, 8, 8
    betas = torch.linspace(1e-3, 0.3, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0).float()  # abar_{T-1} ~ 1e-3: x_{T-1} is almost pure noise
    x0 = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    mask = (torch.rand(n, 1, 16, 16, generator=g) < 0.5).float()
    mask[:, :, :4, :] = 1.0  # a solid known band, as an image mask would have
    field = torch.randn(n, 3, 16, 16, generator=g)
    calls = []

    def model_fn(x, t):
        if not isinstance(x, torch.Tensor) or x.shape != x0.shape:
            ex.fail(f"your loop called model_fn with x of shape {tuple(getattr(x, 'shape', ()))}; "
                    f"expected the whole batch {tuple(x0.shape)}")
        tt = torch.as_tensor(t)
        tv = tt.expand(n) if tt.ndim == 0 else tt
        out = 0.4 * x + 0.6 * field * (1 + tv.float().view(-1, 1, 1, 1) / T)
        calls.append((x.detach().clone(), tv.detach().clone(), out.detach().clone()))
        return out

    x0_before, mask_before = x0.clone(), mask.clone()
    kw = dict(prediction_type="v") if prediction_type == "v" else {}  # epsilon: the default
    case = " (prediction_type='v')" if prediction_type == "v" else ""
    with seeded(seed):
        out = ex.call(fn, model_fn, x0, mask, ab, steps=S, ddim_step=_reference_ddim_step,
                      q_sample=_reference_q_sample, **kw)
    out = ex.tensor(out, shape=x0.shape, dtype=torch.float32, what="the inpainted images" + case)
    if not (torch.equal(x0, x0_before) and torch.equal(mask, mask_before)):
        ex.fail("your loop changed x0 or mask in place; build new tensors instead")
    grid = _trailing(T, S)
    if len(calls) != S:
        ex.fail(f"your loop called the model {len(calls)} times; with steps={S} it should call it "
                f"once per timestep of the DDIM grid {grid}",
                mistake="loop over ddim_timesteps(T, steps) and call model_fn once per step"
                if len(calls) in (T, T - 1) else None)
    seen = [c[1].tolist() for c in calls]
    for k, (ts, want) in enumerate(zip(seen, grid)):
        if ts != [want] * n:
            ex.fail(f"model call {k} got timesteps {ts[:3]}...; expected {want} for every image "
                    f"(the grid is {grid})")

    keep, fill = mask.expand_as(x0).bool(), ~mask.expand_as(x0).bool()
    # the result equals x0 where mask == 1 (checked after the DDIM updates below)
    if not torch.allclose(out[keep], x0[keep], atol=1e-5) and torch.allclose(out[fill], x0[fill], atol=1e-5):
        ex.fail("the known region (mask == 1) of your result is not x0, but the region to fill "
                "(mask == 0) is", mistake="the mask convention is inverted: mask == 1 marks the "
                "pixels to keep, x = mask * known + (1 - mask) * x")
    # the region to fill follows the DDIM steps (the check's own step function)
    nxt = [c[0] for c in calls[1:]] + [out]
    for k in range(S):
        t_prev = grid[k + 1] if k + 1 < S else -1
        want = _reference_ddim_step(calls[k][0], calls[k][1], t_prev, calls[k][2], ab,
                                    prediction_type=prediction_type)
        got = nxt[k]
        if not torch.allclose(got[fill], want[fill], atol=1e-4, rtol=1e-4):
            where = f"model call {k + 1}" if k + 1 < S else "your result"
            mistake = None
            if torch.allclose(got[fill], calls[k][0][fill], atol=1e-6):
                mistake = "x is not updated: assign x = ddim_step(x, t, t_prev, eps, ...) in the loop"
            elif prediction_type == "v" and torch.allclose(
                    got[fill], _reference_ddim_step(calls[k][0], calls[k][1], t_prev, calls[k][2], ab)[fill],
                    atol=1e-4, rtol=1e-4):
                mistake = ("the loop dropped prediction_type: pass prediction_type=prediction_type on to "
                           "ddim_step, or the network's v output is treated as eps")
            elif t_prev >= 0 and torch.allclose(
                    got[fill], _reference_ddim_step(calls[k][0], calls[k][1], grid[k] - 1, calls[k][2], ab,
                                                    prediction_type=prediction_type)[fill],
                    atol=1e-4, rtol=1e-4):
                mistake = "t_prev is the next timestep of the grid, not t - 1"
            elif k + 1 == S and torch.allclose(got[fill], _reference_ddim_step(
                    calls[k][0], calls[k][1], 0, calls[k][2], ab, prediction_type=prediction_type)[fill],
                    atol=1e-4, rtol=1e-4):
                mistake = "after the last grid timestep, step to t_prev = -1 (the clean image), not 0"
            elif k + 1 == S and torch.allclose(got[fill], calls[k][0][fill], atol=1e-6):
                mistake = "the loop stops one step early: take the last step to t_prev = -1 as well"
            ex.fail(f"the region to fill (mask == 0) at {where}{case} is not the DDIM step from timestep "
                    f"{grid[k]} to {t_prev} of the previous x (max abs error "
                    f"{float((got - want)[fill].abs().max()):.3g})", mistake=mistake)

    # the result equals x0 where mask == 1
    last_step = _reference_ddim_step(calls[-1][0], calls[-1][1], -1, calls[-1][2], ab,
                                     prediction_type=prediction_type)
    if not torch.allclose(out[keep], x0[keep], atol=1e-5):
        if torch.allclose(out[fill], x0[fill], atol=1e-5):
            ex.fail("the known region (mask == 1) of your result is not x0, but the region to fill "
                    "(mask == 0) is", mistake="the mask convention is inverted: mask == 1 marks the "
                    "pixels to keep, x = mask * known + (1 - mask) * x")
        if torch.allclose(out[keep], last_step[keep], atol=1e-4):
            ex.fail("the known region (mask == 1) of your result is the model's reconstruction, not x0",
                    mistake="paste the known region after the last step too: at t_prev = -1 it is "
                            "x0 itself (no noise)")
        ex.fail("the known region (mask == 1) of your result differs from x0 "
                f"(max abs error {float((out - x0)[keep].abs().max()):.3g})")

    # every model call sees the known region noised to *its* timestep: x_t ~ q(x_t | x0)
    for k in range(S):
        x_in, t = calls[k][0], grid[k]
        if torch.allclose(x_in[keep], x0[keep], atol=1e-6):
            ex.fail(f"at the model call for timestep {t} the known region (mask == 1) is the clean x0",
                    mistake="paste the known region *re-noised* to the current timestep, "
                            "q_sample(x0, t_prev, fresh noise, alphas_cumprod); only after the last "
                            "step is it x0 itself. The model expects an image noised to level t everywhere")
        a = float(ab[t])
        z = (x_in[keep].double() - math.sqrt(a) * x0[keep].double()) / math.sqrt(1 - a)
        m, sd, cnt = float(z.mean()), float(z.std()), z.numel()
        if abs(m) <= 6 / math.sqrt(cnt) and abs(sd - 1) <= 6 / math.sqrt(2 * cnt):
            continue
        mistake = None
        if k > 0:
            b = float(ab[grid[k - 1]])
            zb = (x_in[keep].double() - math.sqrt(b) * x0[keep].double()) / math.sqrt(1 - b)
            if abs(float(zb.mean())) <= 6 / math.sqrt(cnt) and abs(float(zb.std()) - 1) <= 6 / math.sqrt(2 * cnt):
                mistake = (f"the known region is noised to the previous timestep {grid[k - 1]}: after the "
                           f"step from t to t_prev, re-noise x0 to t_prev")
        if sd < 1e-6:
            mistake = "the known region has no noise: q_sample needs fresh noise, torch.randn_like(x0)"
        ex.fail(f"at the model call for timestep {t} the known region (mask == 1), standardised as "
                f"(x - sqrt(abar_t) x0) / sqrt(1 - abar_t), has mean {m:.3g} and std {sd:.3g} over "
                f"{cnt} pixels; it should be N(0, 1): x0 re-noised with q_sample to timestep {t}",
                mistake=mistake)
    x_first = calls[0][0][fill].double()
    if abs(float(x_first.mean())) > 6 / math.sqrt(x_first.numel()) or abs(float(x_first.std()) - 1) > 6 / math.sqrt(2 * x_first.numel()):
        ex.fail(f"at the first model call (timestep {grid[0]}) the region to fill has mean "
                f"{float(x_first.mean()):.3g} and std {float(x_first.std()):.3g}; start from pure noise N(0, I)")


# ---------------------------------------------------------------------------- hidden tests
@checker
def classifier_free_guidance_hidden(fn) -> None:
    """Hidden test of 6.2: w = 0 gives out_uncond, w = 1 out_cond; float64 kept; one element."""
    ex = Exercise("6.2", "classifier_free_guidance", hidden=True)
    g = torch.Generator().manual_seed(620)
    u, c = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                  dtype=torch.float64)
    ex.close(ex.tensor(ex.call(fn, u, c, 0.0), shape=u.shape, dtype=torch.float64, what="the output for w = 0"),
             u, atol=1e-12, what="the output for w = 0 (must be out_uncond)")
    ex.close(ex.tensor(ex.call(fn, u, c, 1.0), shape=u.shape, dtype=torch.float64, what="the output for w = 1"),
             c, atol=1e-12, what="the output for w = 1 (must be out_cond)")
    one = ex.tensor(ex.call(fn, torch.tensor([2.0]), torch.tensor([3.0]), 2.5), shape=(1,), what="one element")
    ex.close(one, torch.tensor([4.5]), atol=1e-6, what="the output for 2 + 2.5 (3 - 2)")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '6.1': (
        "DDIM predicts x0 and eps from the network's output, then jumps to any earlier t_prev "
        "along a deterministic path (eta = 0) or with some fresh noise (eta > 0).",
        "abar_prev is alphas_cumprod at t_prev, or 1 when t_prev is -1. From an eps output, the "
        "estimate of x0 is x_t minus sqrt(1 - abar) times eps, all over sqrt(abar); from a v output, "
        "rotate (x_t, v) back to (x0, eps) as the text shows. Clip the x0 estimate only if "
        "clip_denoised. sigma is eta times sqrt((1 - abar_prev) / (1 - abar)) times sqrt(1 - abar / "
        "abar_prev). x_prev is sqrt(abar_prev) times the x0 estimate plus sqrt(1 - abar_prev - "
        "sigma^2) times eps, plus sigma times noise when eta > 0 (the noise given, or drawn with "
        "the generator given).",
    ),
    '6.2': (
        'Guidance extrapolates from the unconditional prediction past the conditional one: scale '
        '0 is unconditional, scale 1 is conditional, larger scales exaggerate the condition.',
        'Take the difference between the conditional and the unconditional output, multiply it by'
        ' the guidance scale, and add it to the unconditional output.',
    ),
    '6.3': (
        'Run the DDIM sampler from noise, and after every step overwrite the known pixels with '
        'the original image noised to the same timestep, so the generated part has to agree with '
        'what is kept.',
        'Start from standard normal noise shaped like x0. For each timestep t (and the next one, '
        't_prev, which is -1 after the last): call the network, take a DDIM step to t_prev '
        'passing eta, clip_denoised, prediction_type and generator on; then noise x0 to t_prev '
        'with q_sample (or use x0 itself after the last step) and keep it where mask is 1, the '
        'sample where mask is 0.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
