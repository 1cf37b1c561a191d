"""Checks for lesson 05 (DDPM): the noise schedule, the forward process, the training loss,
one ancestral sampling step and the sampling loop.

Each check calls the learner's function on fresh seeded random inputs and compares it with
a reference written here in float64 (never minigen.diffusion). Timesteps are 0-based, as in
diffusers and minigen: t in {0, ..., T-1}, alphas_cumprod[t] = prod_{s<=t} (1 - beta_s) and
abar_{-1} = 1 ("the clean image"). Wrong answers that match a typical mistake get a
"Likely mistake" line.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minigen.course.checks._framework import CheckFailed, Exercise, seeded, checker, show_hint

__all__ = ["hint", "alphas_cumprod", "q_sample", "training_loss", "p_sample", "p_sample_loop", "alphas_cumprod_hidden", "q_sample_hidden"]


# ---------------------------------------------------------------------------- references
def _linear_betas(T=1000, start=1e-4, end=0.02) -> torch.Tensor:
    """DDPM's linear schedule, float64 (written here, not imported from minigen)."""
    return torch.linspace(start, end, T, dtype=torch.float64)


def _ref_abar(betas) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def _col(v, ndim) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) to broadcast over an image batch."""
    return v.view(-1, *([1] * (ndim - 1)))


def _abar_prev(ab, t) -> torch.Tensor:
    """abar_{t-1} per image, with abar_{-1} = 1."""
    return torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones((), dtype=ab.dtype))


def _call(ex: Exercise, fn, *args, broadcast_hint=None):
    """ex.call, adding a hint when the learner's code fails on shapes that do not broadcast."""
    try:
        return ex.call(fn, *args)
    except CheckFailed as e:
        cause = e.__cause__
        if broadcast_hint and isinstance(cause, RuntimeError) and "size of tensor" in str(cause):
            raise CheckFailed(f"{e}\n  Likely mistake: {broadcast_hint}",
                              learner_traceback=e.learner_traceback) from cause
        raise


def _rank(ex: Exercise, out, shape, what):
    """The output must keep x's shape for any number of axes, not only (N, C, H, W)."""
    if isinstance(out, torch.Tensor) and tuple(out.shape) != tuple(shape) and len(shape) != 4 and out.dim() == 4:
        ex.fail(f"{what} has shape {tuple(out.shape)} for an input of shape {tuple(shape)}",
                mistake="you reshaped alphas_cumprod[t] to (N, 1, 1, 1), which fits only 4-D image batches; "
                        "reshape it to N followed by one 1 per remaining axis of the input, so any shape works")
    return ex.tensor(out, shape=shape, dtype=torch.float32, what=what)


def _unchanged(ex: Exercise, before: dict, after: dict) -> None:
    for name in before:
        if not torch.equal(before[name], after[name]):
            ex.fail(f"your function changed its input `{name}` in place; return a new tensor instead")


_BROADCAST = ("alphas_cumprod[t] has shape (N,); reshape it to N followed by one 1 per remaining axis "
              "(N, 1, 1, 1 for an (N, C, H, W) batch) before multiplying, so it broadcasts over each image")


# ---------------------------------------------------------------------------- 5.1
@checker
def alphas_cumprod(fn) -> None:
    """Exercise 5.1: betas (T,) -> abar (T,), abar_t = prod_{s<=t} (1 - beta_s), same dtype."""
    ex = Exercise("5.1", "alphas_cumprod")
    g = torch.Generator().manual_seed(51)
    cases = [(_linear_betas(1000), 1e-12), (_linear_betas(1000).float(), 2e-4)]
    for T in (10, 37):
        b = torch.sort(torch.rand(T, generator=g, dtype=torch.float64) * 0.2 + 1e-3).values
        cases += [(b, 1e-12), (b.float(), 2e-5)]
    for betas, rtol in cases:
        before = betas.clone()
        out = ex.call(fn, betas)
        T = len(betas)
        out = ex.tensor(out, shape=(T,), dtype=betas.dtype, what="alphas_cumprod")
        _unchanged(ex, {"betas": before}, {"betas": betas})
        b = betas.double()
        ref = _ref_abar(b)
        ex.close(out, ref, atol=1e-12, rtol=rtol, what=f"alphas_cumprod (T = {T})", mistakes=[
            (torch.cumsum(1 - b, 0), "cumsum adds the alphas; abar_t is their cumulative *product*: "
                                     "torch.cumprod(1 - betas, dim=0)"),
            (torch.cumprod(b, 0), "you multiplied the betas; the product runs over alpha_s = 1 - beta_s"),
            (1 - torch.cumsum(b, 0), "1 - sum(beta) is only the first-order approximation of "
                                     "prod(1 - beta): use torch.cumprod(1 - betas, dim=0)"),
            (1 - torch.cumprod(b, 0), "take the product of (1 - beta_s), not 1 - the product of beta_s"),
            (1 - b, "that is alpha_t = 1 - beta_t; abar_t is the cumulative product of the alphas"),
            (torch.cat([b.new_ones(1), ref[:-1]]), "shifted by one step: abar_t includes s = t, so "
                                                   "abar_0 = 1 - beta_0 (not 1)"),
            (ref.sqrt(), "you returned sqrt(abar_t); return abar_t itself (q_sample takes the roots)"),
            (torch.cumprod((1 - b).sqrt(), 0), "you returned sqrt(abar_t); return abar_t itself"),
        ])
    ex.passed("values, shape, dtype, T = 10, 37, 1000")


# ---------------------------------------------------------------------------- 5.2
@checker
def q_sample(fn) -> None:
    """Exercise 5.2: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, abar_t = alphas_cumprod[t] per image."""
    ex = Exercise("5.2", "q_sample")
    g = torch.Generator().manual_seed(52)
    ab1000 = _ref_abar(_linear_betas(1000)).float()  # what GaussianDiffusion passes: float32
    ab10 = _ref_abar(torch.linspace(0.05, 0.5, 10, dtype=torch.float64)).float()
    # case 1 leaves out t = T-1 so that an alphas_cumprod[t + 1] answer gives values to recognise
    # image batches, and other ranks: (N, D) vectors and (N, C, F, H, W) clips
    cases = [((6, 3, 5, 7), ab1000, False), ((9, 1, 4, 4), ab1000, True), ((5, 2, 3, 3), ab10, True),
             ((7, 12), ab10, True), ((3, 2, 3, 4, 4), ab1000, True)]
    for shape, ab, ends in cases:
        n, T = shape[0], len(ab)
        t = torch.randint(0, T - 1, (n,), generator=g)
        if ends:
            t[0], t[1] = 0, T - 1
        x0 = torch.rand(shape, generator=g) * 2 - 1
        noise = torch.randn(shape, generator=g)
        before = {"x0": x0.clone(), "t": t.clone(), "noise": noise.clone(), "alphas_cumprod": ab.clone()}
        out = _call(ex, fn, x0, t, noise, ab, broadcast_hint=_BROADCAST)
        out = _rank(ex, out, shape, "x_t")
        _unchanged(ex, before, {"x0": x0, "t": t, "noise": noise, "alphas_cumprod": ab})
        abd = ab.double()
        a = _col(abd[t], len(shape))
        x, e = x0.double(), noise.double()
        ref = a.sqrt() * x + (1 - a).sqrt() * e
        mistakes = [
            (a.sqrt() * x + (1 - a) * e, "the noise is scaled by the standard deviation sqrt(1 - abar_t), "
                                         "not the variance 1 - abar_t"),
            (a * x + (1 - a).sqrt() * e, "x0 is scaled by sqrt(abar_t), not abar_t"),
            (a * x + (1 - a) * e, "both coefficients need square roots: sqrt(abar_t) and sqrt(1 - abar_t)"),
            (x + (1 - a).sqrt() * e, "x0 must shrink by sqrt(abar_t) while the noise grows, otherwise "
                                     "x_t never becomes pure noise (and its variance keeps growing)"),
            (x + e, "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: both terms depend on t"),
            ((1 - a).sqrt() * x + a.sqrt() * e, "the coefficients are swapped: sqrt(abar_t) goes with x0"),
        ]
        for am in (_col(abd[(t - 1) % T], len(shape)), _col(_abar_prev(abd, t), len(shape))):
            mistakes.append((am.sqrt() * x + (1 - am).sqrt() * e,
                             "off by one: use alphas_cumprod[t], not alphas_cumprod[t - 1]"))
        if not ends:
            a1 = _col(abd[t + 1], len(shape))
            mistakes.append((a1.sqrt() * x + (1 - a1).sqrt() * e,
                             "off by one: use alphas_cumprod[t], not alphas_cumprod[t + 1] "
                             "(timesteps are 0-based: t = 0 is the first noising step)"))
        ex.close(out, ref, atol=2e-6, rtol=1e-5, what=f"x_t (T = {T}, t = {t.tolist()})", mistakes=mistakes)
    ex.passed("values, shapes of rank 2 to 5, per-image timesteps including 0 and T-1")


# ---------------------------------------------------------------------------- 5.3
class _RecordingDenoiser(nn.Module):
    """A stand-in for the U-Net: records (x_t, t) and returns w * x_t with a learnable w."""

    def __init__(self, ex: Exercise):
        super().__init__()
        self.ex = ex
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t, *args, **kwargs):
        if not isinstance(x_t, torch.Tensor) or not isinstance(t, torch.Tensor):
            self.ex.fail(f"the model must be called as model(x_t, t) with two tensors, got "
                         f"({type(x_t).__name__}, {type(t).__name__})")
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.w * x_t


def _loss_run(ex: Exercise, fn, x0, ab, *, seed, T_hint=""):
    model = _RecordingDenoiser(ex)
    x_before, ab_before = x0.clone(), ab.clone()
    with seeded(seed):
        try:
            loss = _call(ex, fn, model, x0, ab, broadcast_hint=_BROADCAST)
        except CheckFailed as e:
            if T_hint and isinstance(e.__cause__, IndexError):
                raise CheckFailed(f"{e}\n  Likely mistake: {T_hint}") from e.__cause__
            raise
    _unchanged(ex, {"x0": x_before, "alphas_cumprod": ab_before}, {"x0": x0, "alphas_cumprod": ab})
    if not model.calls:
        ex.fail("your loss never called the model: the network must predict the noise, model(x_t, t)")
    if len(model.calls) > 1:
        ex.fail(f"your loss called the model {len(model.calls)} times; one call on the whole batch "
                "model(x_t, t) is enough")
    x_t, t = model.calls[0]
    return model, loss, x_t, t


def _check_timesteps(ex: Exercise, t, n, T, *, need_ends: bool):
    if t.is_floating_point() or t.dtype == torch.bool:
        ex.fail(f"the timesteps given to the model have dtype {t.dtype}; draw integers with "
                f"torch.randint(0, T, (N,))")
    if tuple(t.shape) != (n,):
        mistake = ("draw one timestep per image: torch.randint(0, T, (N,)), not a single t for the batch"
                   if t.numel() == 1 else None)
        ex.fail(f"the model got t of shape {tuple(t.shape)}, expected ({n},) (one per image)", mistake)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > T - 1:
        ex.fail(f"timesteps must lie in [0, T-1] = [0, {T - 1}], yours span [{lo}, {hi}]",
                mistake="t = T is out of range: torch.randint(0, T, ...) already excludes its upper bound"
                if hi == T else None)
    if len(torch.unique(t)) == 1:
        ex.fail(f"every image got the same timestep t = {lo}",
                mistake="draw one timestep per image: torch.randint(0, T, (N,))")
    if need_ends:
        if hi < T - 1:
            ex.fail(f"over {n} draws with T = {T}, the largest timestep was {hi}, never T-1 = {T - 1}",
                    mistake="torch.randint's upper bound is exclusive: randint(0, T) draws 0, ..., T-1; "
                            "randint(0, T - 1) (or a hard-coded randint(0, 999)) never trains the noisiest step")
        if lo > 0:
            ex.fail(f"over {n} draws the smallest timestep was {lo}, never 0",
                    mistake="timesteps are 0-based here: draw torch.randint(0, T, ...), not randint(1, ...)")
    # uniformity: each of the T values has probability 1/T
    counts = torch.bincount(t, minlength=T).double()
    p = 1.0 / T
    expected, sd = n * p, math.sqrt(n * p * (1 - p))
    worst = int((counts - expected).abs().argmax())
    if abs(counts[worst] - expected) > 6 * sd:
        ex.fail(f"timesteps are not uniform on {{0, ..., {T - 1}}}: t = {worst} was drawn "
                f"{int(counts[worst])} times out of {n}, expected {expected:.0f} ± {6 * sd:.0f}",
                mistake="draw t with torch.randint(0, T, (N,)) (uniform), not from a normal or a rounded float")


@checker
def training_loss(fn) -> None:
    """Exercise 5.3: t ~ U{0..T-1} per image, noise ~ N(0, I), x_t = q_sample(...),
    loss = mean((model(x_t, t) - noise)^2), a scalar with gradients into the model."""
    ex = Exercise("5.3", "training_loss")
    g = torch.Generator().manual_seed(53)
    ab1000 = _ref_abar(_linear_betas(1000)).float()
    ab10 = _ref_abar(torch.linspace(0.05, 0.5, 10, dtype=torch.float64)).float()
    hint10 = ("the check also uses a schedule with T = 10 steps: take T from len(alphas_cumprod) "
              "instead of hard-coding 1000")
    for ab, n, shape, seed in [(ab1000, 16384, (1, 2, 2), 530), (ab10, 4000, (2, 2, 2), 531)]:
        T = len(ab)
        x0 = torch.rand((n, *shape), generator=g) * 2 - 1
        model, loss, x_t, t = _loss_run(ex, fn, x0, ab, seed=seed, T_hint=hint10 if T == 10 else "")
        _check_timesteps(ex, t, n, T, need_ends=True)
        if tuple(x_t.shape) != tuple(x0.shape):
            ex.fail(f"the model got x_t of shape {tuple(x_t.shape)}, expected {tuple(x0.shape)}")
        # the noise the learner drew, recovered from x_t: it must be standard normal
        a = _col(ab.double()[t], x0.dim())
        eps = (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        if torch.allclose(x_t.double(), x0.double()):
            ex.fail("the model got the clean images x0; it must get the noised x_t = q_sample(x0, t, noise, ...)")
        ex.mean_std(eps, 0.0, 1.0,
                    what="the noise in the model's input, (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t),",
                    mistakes=[(0.5, math.sqrt(1 / 12), "torch.rand_like draws uniform noise on [0, 1); "
                                                       "diffusion uses Gaussian noise: torch.randn_like")])
        # the loss: the model's output against that noise
        if not isinstance(loss, torch.Tensor):
            ex.tensor(loss, what="the loss")
        if loss.dim() != 0:
            mistake = ("average over the batch too: a loss is one number" if loss.shape[:1] == (n,)
                       else "reduce with .mean() over every element")
            ex.fail(f"the loss has shape {tuple(loss.shape)}; it must be a scalar (shape ())", mistake)
        ex.tensor(loss, shape=(), dtype=torch.float32, what="the loss")
        out = 0.5 * x_t.double()
        ref = ((out - eps) ** 2).mean()
        ex.close(loss, ref, atol=1e-6, rtol=1e-4, what=f"the loss (T = {T})", mistakes=[
            (((out - x0.double()) ** 2).mean(), "with epsilon-prediction the target is the noise you added, "
                                                "not x0: F.mse_loss(model(x_t, t), noise)"),
            (((out - x_t.double()) ** 2).mean(), "the target is the noise you added, not x_t"),
            (((out - eps) ** 2).sum(), "take the mean of the squared error, not the sum"),
            (((out - eps) ** 2).flatten(1).sum(1).mean(), "average over every element (the 'simple' loss "
                                                          "of Ho et al.), not the sum per image"),
            ((out - eps).abs().mean(), "that is the L1 error; the simple loss is the mean squared error"),
            (((out - eps) ** 2).mean().sqrt(), "you took the square root (RMSE); use the plain MSE"),
        ])
        ex.gradients_flow(loss, {"the model's parameters": model.w}, what="the loss")
    ex.passed("timesteps uniform on 0..T-1, Gaussian noise, MSE to the noise, gradients")


# ---------------------------------------------------------------------------- 5.4
def _ref_step_parts(x_t, t, eps, ab):
    """Reference posterior mean (with clipped x0_hat), the unclipped mean, and the pieces
    needed to build the typical wrong answers. All float64."""
    x, e, abd = x_t.double(), eps.double(), ab.double()
    nd = x.dim()
    a = _col(abd[t], nd)
    ap = _col(_abar_prev(abd, t), nd)
    beta = 1 - a / ap
    alpha = 1 - beta
    x0_raw = (x - (1 - a).sqrt() * e) / a.sqrt()
    x0 = x0_raw.clamp(-1, 1)

    def mean(x0_hat, c_x0=None, c_xt=None):
        c_x0 = ap.sqrt() * beta / (1 - a) if c_x0 is None else c_x0
        c_xt = alpha.sqrt() * (1 - ap) / (1 - a) if c_xt is None else c_xt
        return c_x0 * x0_hat + c_xt * x

    beta_tilde = (1 - ap) / (1 - a) * beta
    return dict(x=x, e=e, a=a, ap=ap, beta=beta, alpha=alpha, x0=x0, x0_raw=x0_raw, mean=mean,
                beta_tilde=beta_tilde, nonzero=_col((t > 0).double(), nd))


def _step_inputs(g, n, shape, T):
    t = torch.randint(1, T, (n,), generator=g)
    t[:5] = torch.tensor([0, 1, 2, T - 1, T - 2])[: min(5, n)]
    t[5] = 0
    x_t = torch.randn((n, *shape), generator=g)
    eps = torch.randn((n, *shape), generator=g)
    noise = torch.randn((n, *shape), generator=g)
    return x_t, t, eps, noise


@checker
def p_sample(fn) -> None:
    """Exercise 5.4: one DDPM ancestral step with epsilon-prediction, x0_hat clipped to
    [-1, 1], the posterior mean, fixed_small variance beta~_t and no noise at t = 0."""
    ex = Exercise("5.4", "p_sample")
    g = torch.Generator().manual_seed(54)
    ab = _ref_abar(_linear_betas(1000)).float()  # what GaussianDiffusion passes: float32
    T = len(ab)
    for n, shape in [(12, (3, 4, 5)), (8, (1, 6, 6)), (10, (16,)), (6, (2, 3, 4, 4))]:
        x_t, t, eps, noise = _step_inputs(g, n, shape, T)
        before = {"x_t": x_t.clone(), "t": t.clone(), "model_output": eps.clone(), "noise": noise.clone(),
                  "alphas_cumprod": ab.clone()}
        out_z = _call(ex, fn, x_t, t, eps, ab, torch.zeros_like(noise), broadcast_hint=_BROADCAST)
        out_z = _rank(ex, out_z, x_t.shape, "x_{t-1}")
        out = _call(ex, fn, x_t, t, eps, ab, noise, broadcast_hint=_BROADCAST)
        out = _rank(ex, out, x_t.shape, "x_{t-1}")
        _unchanged(ex, before, {"x_t": x_t, "t": t, "model_output": eps, "noise": noise, "alphas_cumprod": ab})
        case = f" (t = {t.tolist()})"
        # NaN/inf first: the usual cause is abar_{t-1} at t = 0
        for o in (out_z, out):
            bad = ~torch.isfinite(o)
            if bad.any():
                rows = sorted({int(i) for i in bad.nonzero()[:, 0]})
                at_zero = all(int(t[r]) == 0 for r in rows)
                ex.fail(f"x_{{t-1}} contains NaN/inf in the images with t = {sorted({int(t[r]) for r in rows})}",
                        mistake="at t = 0, abar_{t-1} must be 1 (the clean image): alphas_cumprod[t - 1] "
                                "with t = 0 wraps around to alphas_cumprod[-1], the *last* entry; use "
                                "torch.where(t > 0, alphas_cumprod[t - 1], 1.0)" if at_zero else
                                "a square root of a negative number or a division by zero?")
        r = _ref_step_parts(x_t, t, eps, ab)
        nz = t > 0
        # 1) the noise argument: x(noise) - x(0) must be a multiple of `noise` in every image with t > 0
        diff = (out.double() - out_z.double())[nz]
        if diff.abs().max() < 1e-8:
            ex.fail("the `noise` argument has no effect for t > 0: x_{t-1} = mean + sqrt(beta~_t) * noise",
                    mistake="you returned only the posterior mean; add sqrt(beta~_t) * noise for t > 0")
        z = noise.double()[nz].flatten(1)
        diff = diff.flatten(1)
        # per image (each has its own sigma_t): diff must point along that image's noise
        cos = (diff * z).sum(1) / (diff.norm(dim=1) * z.norm(dim=1)).clamp(min=1e-30)
        if float(cos.min()) < 0.9:
            ex.fail("x_{t-1} does not use the `noise` argument as its random part",
                    mistake="use the `noise` you are given (don't draw torch.randn_like yourself): then a "
                            "step is reproducible, and the check can compare it")
        # 2) the mean: the output when noise = 0
        m = r["mean"]
        x, x0, x0_raw, a, ap, beta, alpha = r["x"], r["x0"], r["x0_raw"], r["a"], r["ap"], r["beta"], r["alpha"]
        ref_mean = m(x0)
        ex.close(out_z, ref_mean, atol=1e-3, rtol=1e-4, what="the mean of x_{t-1} (your output with noise = 0)" + case,
                 mistakes=[
            (m(x0_raw), "clip x0_hat to [-1, 1] before the posterior mean (x0_hat.clamp(-1, 1)); without "
                        "clipping, early steps predict x0 far outside the image range"),
            (m(x0, c_x0=alpha.sqrt() * (1 - ap) / (1 - a), c_xt=ap.sqrt() * beta / (1 - a)),
             "the two coefficients are swapped: sqrt(abar_{t-1}) beta_t / (1 - abar_t) multiplies x0_hat"),
            (m(x0, c_xt=alpha * (1 - ap) / (1 - a)), "the x_t coefficient has sqrt(alpha_t), not alpha_t"),
            (m(x0, c_x0=ap * beta / (1 - a)), "the x0_hat coefficient has sqrt(abar_{t-1}), not abar_{t-1}"),
            (m(((x - (1 - a) * r["e"]) / a.sqrt()).clamp(-1, 1)),
             "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the noise term needs the square root"),
            (m(((x - (1 - a).sqrt() * r["e"]) / a).clamp(-1, 1)),
             "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): divide by the square root of abar_t"),
            (m(x0, c_x0=ap.sqrt() * (ap - a) / (1 - a), c_xt=(1 - (ap - a)).sqrt() * (1 - ap) / (1 - a)),
             "beta_t = 1 - abar_t / abar_{t-1} (so alpha_t = abar_t / abar_{t-1}), not abar_{t-1} - abar_t"),
            (x0, "you returned x0_hat itself; one step goes to x_{t-1}, the posterior mean between x0_hat and x_t"),
            ((x - beta / (1 - a).sqrt() * r["e"]) / alpha.sqrt(),
             "this is the mean written with eps and no clipping; the exercise asks for the posterior mean "
             "with the clipped x0_hat (they differ whenever x0_hat leaves [-1, 1])"),
        ])
        # 3) the noise scale: fixed_small sigma_t = sqrt(beta~_t), zero at t = 0
        zn, nonzero = noise.double(), r["nonzero"]
        mean_l = out_z.double()  # the learner's mean, already checked
        bt = r["beta_tilde"]
        ex.close(out, ref_mean + nonzero * bt.sqrt() * zn, atol=1e-3, rtol=1e-4,
                 what="x_{t-1} = mean + sqrt(beta~_t) * noise" + case, mistakes=[
            (mean_l + nonzero * beta.sqrt() * zn, "that is the fixed_large variance beta_t; this exercise "
             "asks for fixed_small, the posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t"),
            (mean_l + beta.sqrt() * zn, "that is the fixed_large variance beta_t, and noise was added at t = 0 "
             "too; use beta~_t, and no noise at t = 0"),
            (mean_l + nonzero * bt * zn, "you scaled the noise by the variance beta~_t; the standard "
                                        "deviation is its square root"),
            (mean_l + nonzero * beta * zn, "you scaled the noise by the variance beta_t; use the standard "
                                          "deviation sqrt(beta~_t)"),
            (mean_l + nonzero * zn, "scale the noise by the standard deviation sqrt(beta~_t)"),
            (mean_l + zn, "scale the noise by sqrt(beta~_t), and add none at t = 0"),
            (mean_l + nonzero * (1 - a).sqrt() * zn, "the noise scale of a reverse step is sqrt(beta~_t), "
                                                    "not the forward process's sqrt(1 - abar_t)"),
        ])
    ex.passed("posterior mean with clipped x0_hat, sqrt(beta~_t) noise, none at t = 0")


# ---------------------------------------------------------------------------- 5.5
class _RecordingFn:
    """model_fn(x, t) for the loop check: a deterministic fake eps that records its inputs."""

    def __init__(self, ex: Exercise, n: int, T: int):
        self.ex, self.n, self.T = ex, n, T
        self.inputs, self.ts = [], []

    @staticmethod
    def output(x, t):
        return 0.3 * x + 0.2 * torch.cos(_col(t.to(x.dtype), x.dim()))

    def __call__(self, x, t):
        ex = self.ex
        if not isinstance(x, torch.Tensor) or not isinstance(t, torch.Tensor):
            ex.fail(f"model_fn must be called as model_fn(x, t) with two tensors, got "
                    f"({type(x).__name__}, {type(t).__name__})",
                    mistake="make t a tensor: torch.full((N,), i, dtype=torch.long)" if isinstance(t, int) else None)
        if x.dim() == 1 and t.dim() == 4:
            ex.fail("model_fn takes the images first, then the timesteps: model_fn(x, t)")
        if t.is_floating_point() or tuple(t.shape) != (self.n,):
            ex.fail(f"model_fn got t with shape {tuple(t.shape)} and dtype {t.dtype}; pass one int64 "
                    f"timestep per image, shape ({self.n},): torch.full((N,), i, dtype=torch.long)")
        if len(torch.unique(t)) != 1:
            ex.fail("all images of a sampling step share one timestep")
        ti = int(t[0])
        if not 0 <= ti < self.T:
            ex.fail(f"model_fn was called with t = {ti}; with T = {self.T} the timesteps are 0 ... {self.T - 1}",
                    mistake="the loop runs over reversed(range(T)): T-1, ..., 0" if ti == self.T else None)
        if len(self.ts) >= 2 * self.T:
            ex.fail(f"your loop called model_fn more than 2T = {2 * self.T} times; it needs exactly T calls")
        self.inputs.append(x.detach().clone())
        self.ts.append(ti)
        return self.output(x, t)


@checker
def p_sample_loop(fn) -> None:
    """Exercise 5.5: x = x_T; for t = T-1, ..., 0: x = p_sample(x, t, model_fn(x, t), abar, fresh noise)."""
    ex = Exercise("5.5", "p_sample_loop")
    g = torch.Generator().manual_seed(55)
    T, n, shape = 20, 256, (1, 4, 4)
    ab = _ref_abar(torch.linspace(1e-3, 0.3, T, dtype=torch.float64)).float()
    x_T = torch.randn((n, *shape), generator=g)
    x_T_before = x_T.clone()
    rec = _RecordingFn(ex, n, T)
    with seeded(550):
        out = _call(ex, fn, rec, x_T, ab)
    if not torch.equal(x_T, x_T_before):
        ex.fail("your loop changed x_T in place; start with x = x_T and assign x = p_sample(...) each step")
    want = list(range(T - 1, -1, -1))
    if rec.ts != want:
        got = rec.ts if len(rec.ts) <= 8 else rec.ts[:4] + ["..."] + rec.ts[-3:]
        mistake = None
        if rec.ts == list(range(T)):
            mistake = "the reverse process runs backwards in time: for i in reversed(range(T))"
        elif rec.ts == want[:-1]:
            mistake = "the loop stops at t = 1; the last step is t = 0: reversed(range(T)) (or range(T - 1, -1, -1))"
        elif rec.ts == want[1:]:
            mistake = "the loop skips t = T-1; start at the noisiest step: reversed(range(T))"
        elif not rec.ts:
            mistake = "your loop never called model_fn"
        ex.fail(f"with T = {T} the model must be called at t = {T - 1}, {T - 2}, ..., 0 (one call per step); "
                f"your loop called it at t = {got}", mistake)
    out = ex.tensor(out, shape=x_T.shape, dtype=torch.float32, what="the sample")
    if not torch.allclose(rec.inputs[0], x_T):
        ex.fail("the first step must start from x_T itself (the Gaussian noise you were given)")
    for i in range(1, T):
        if torch.equal(rec.inputs[i], x_T):
            ex.fail(f"step {i + 1} (t = {rec.ts[i]}) started from x_T again",
                    mistake="feed each step's output into the next: x = p_sample(x, t, ...), not p_sample(x_T, ...)")
    # recover the noise of every step: x_{t-1} = mean(x_t) + sqrt(beta~_t) z_t
    nexts = rec.inputs[1:] + [out]
    zs = []
    for i, ti in enumerate(want):
        x_in = rec.inputs[i]
        tt = torch.full((n,), ti, dtype=torch.long)
        eps = rec.output(x_in, tt)
        r = _ref_step_parts(x_in, tt, eps, ab)
        mean = r["mean"](r["x0"])
        if ti == 0:
            ex.close(nexts[i], mean, atol=1e-4, rtol=1e-4, what="the final sample (the output of the step at t = 0)",
                     mistakes=[(rec.inputs[i], "return x after the last step, not the input of the last step")])
        else:
            z = (nexts[i].double() - mean) / r["beta_tilde"].sqrt()
            if (z.abs() > 50).any():
                ex.fail(f"the step at t = {ti} does not match a DDPM step from the model's input at that step "
                        "(is Exercise 5.4 passing?). Each step is x = p_sample(x, t, model_fn(x, t), "
                        "alphas_cumprod, torch.randn_like(x))")
            zs.append(z)
    for i in range(len(zs) - 1):
        if torch.allclose(zs[i], zs[i + 1], atol=1e-3):
            ex.fail("every step adds the same noise",
                    mistake="draw fresh noise inside the loop (torch.randn_like(x) at every step), not once before it")
    ex.mean_std(torch.stack(zs), 0.0, 1.0, what="the noise added at the steps t > 0",
                mistakes=[(0.5, math.sqrt(1 / 12), "torch.rand_like is uniform on [0, 1); use torch.randn_like")])
    ex.passed(f"order T-1 ... 0, {T} model calls, fresh Gaussian noise, final step without noise")


# ---------------------------------------------------------------------------- hidden tests
@checker
def alphas_cumprod_hidden(fn) -> None:
    """Hidden test of 5.1: T = 1, betas of zero (abar stays 1), float64 kept."""
    ex = Exercise("5.1", "alphas_cumprod", hidden=True)
    out = ex.tensor(ex.call(fn, torch.tensor([0.3], dtype=torch.float64)), shape=(1,), dtype=torch.float64,
                    what="alphas_cumprod for T = 1")
    ex.close(out, torch.tensor([0.7], dtype=torch.float64), atol=1e-15, what="alphas_cumprod for T = 1")
    out = ex.tensor(ex.call(fn, torch.zeros(5)), shape=(5,), dtype=torch.float32, what="alphas_cumprod of zero betas")
    ex.close(out, torch.ones(5), atol=0.0, what="alphas_cumprod of zero betas (nothing is noised)")


@checker
def q_sample_hidden(fn) -> None:
    """Hidden test of 5.2: t = 0 with abar = 1 returns x0; abar = 0 returns the noise."""
    ex = Exercise("5.2", "q_sample", hidden=True)
    g = torch.Generator().manual_seed(520)
    ab = torch.tensor([1.0, 0.5, 0.0])
    x0, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = ex.tensor(ex.call(fn, x0, torch.tensor([0, 2]), noise, ab), shape=(2, 3, 4), what="x_t")
    ex.close(out, torch.stack([x0[0], noise[1]]), atol=1e-6,
             what="x_t for abar = 1 (must be x0) and abar = 0 (must be the noise)")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '5.1': (
        "abar_t is the fraction of the original signal's variance left after t noising steps: the"
        ' running product of (1 - beta).',
        'Compute alpha = 1 - beta elementwise, then its cumulative product along the time axis. '
        'The result keeps the shape and dtype of betas.',
    ),
    '5.2': (
        'The forward process has a closed form: x_t is a mix of x0 and Gaussian noise whose '
        'weights come from abar_t, a different t for each image.',
        "Pick abar for each image's t, reshape it so it broadcasts over every other axis of x0 "
        '(any number of them), then weight x0 by the square root of abar and the noise by the '
        'square root of (1 - abar), and add.',
    ),
    '5.3': (
        'Train the network to predict the noise that was mixed into a clean image at a random '
        'timestep.',
        'T is the length of the schedule. Draw one integer timestep per image uniformly from 0 to'
        ' T - 1 and Gaussian noise shaped like x0 (both from the global generator), noise the '
        'images with your q_sample, ask the model for its prediction at (x_t, t), and return the '
        'mean squared error between prediction and noise.',
    ),
    '5.4': (
        "One reverse step: estimate x0 from the predicted noise, clip it to the data range, and "
        "sample from the Gaussian posterior q(x_{t-1} | x_t, x0) (no noise at t = 0).",
        "abar_prev is 1 at t = 0 and abar at t - 1 otherwise, and beta_t is 1 - abar / abar_prev. "
        "The estimate of x0 is x_t minus sqrt(1 - abar) times eps, all over sqrt(abar), clipped to "
        "[-1, 1]. The posterior mean weighs that estimate by sqrt(abar_prev) beta_t / (1 - abar) "
        "and x_t by sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar); the posterior variance is "
        "(1 - abar_prev) / (1 - abar) times beta_t. Add the noise scaled by the standard deviation, "
        "for images with t > 0 only.",
    ),
    '5.5': (
        'Start from pure noise and apply your p_sample for every timestep from T - 1 down to 0.',
        'Loop over the timesteps in decreasing order; at each, build a long tensor holding that '
        'timestep for every image, ask model_fn for eps, and take one p_sample step with fresh '
        'standard normal noise. Return the final x.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
