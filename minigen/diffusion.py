"""Denoising diffusion: DDPM training and sampling, DDIM, classifier-free guidance,
inpainting, image-to-image (SDEdit) and bits/dim.

Notation (Ho et al. 2020; the same names as diffusers and improved-diffusion):

    t in {0, ..., T-1}                       integer timesteps, training draws randint(0, T)
    betas[t], alphas[t] = 1 - betas[t]
    alphas_cumprod[t] = prod_{s<=t} alphas[s] (abar_t); abar_{-1} = 1 ("the clean image")
    forward   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I)
    reverse   x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I), down to x_{-1} = the sample

Every step of the algorithm is a plain function of tensors (q_sample, p_sample, ddim_step,
classifier_free_guidance, inpaint, ...): the schedule is passed in as `alphas_cumprod`,
the network as `model_fn(x, t) -> output`. `GaussianDiffusion` wraps a denoiser and a
schedule into an nn.Module for minigen.train.fit and the CLI, and takes any of those
functions as keyword arguments, so a lesson can run the whole pipeline on the learner's
own piece:

    diffusion = GaussianDiffusion(unet, config, p_sample=my_p_sample)

Prediction types: "epsilon" (the noise, DDPM), "v" (v = sqrt(abar) eps - sqrt(1-abar) x0,
Salimans & Ho 2022) and "x0" (the clean image); diffusers calls them "epsilon",
"v_prediction" and "sample".
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen import samplers
from minigen.unet import UNet, UNetConfig

PREDICTION_TYPES = ("epsilon", "v", "x0")
BACKBONES = ("unet", "dit")  # the denoising networks every model family can build (build_backbone)
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "heun")  # the last two: ODE solvers in minigen.samplers
SPACINGS = ("trailing", "leading", "linspace")

# --------------------------------------------------------------------------------------
# noise schedules (computed in float64; callers cast)


def make_beta_schedule(name, T=1000, beta_start=None, beta_end=None):
    """betas (T,) float64 for schedule `name`, named as in diffusers:

    "linear"         linspace(beta_start, beta_end, T), default 1e-4 -> 0.02 (DDPM);
                     with T=1000, alphas_cumprod[999] ~= 4.04e-5.
    "scaled_linear"  linspace(sqrt(beta_start), sqrt(beta_end), T)^2, default
                     0.00085 -> 0.012 (Stable Diffusion). latent-diffusion calls this "linear".
    "cosine"         improved-diffusion: abar(s) = cos^2((s/T + 0.008)/1.008 * pi/2),
                     beta_t = min(1 - abar(t+1)/abar(t), 0.999).
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of timesteps T must be a positive int, got {T!r}")
    if name == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if name == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    if name == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}: use 'linear', 'scaled_linear' or 'cosine'")


def alphas_cumprod(betas):
    """abar_t = prod_{s<=t} (1 - beta_s), same dtype as betas."""
    return torch.cumprod(1.0 - betas, dim=0)


# --------------------------------------------------------------------------------------
# small helpers: timesteps and per-sample coefficients


def _check_t(t, n, T, name="t"):
    """t as an int64 tensor of shape (n,) with values in [0, T); a Python int or a 0-d
    tensor is broadcast to the batch. Clear errors for floats, wrong shapes, out of range."""
    if isinstance(t, int):
        t = torch.tensor(t)
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be an int or an int64 tensor of shape ({n},), got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer timesteps in [0, {T}), got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one timestep per image) or be a scalar, got {tuple(t.shape)}")
    if n and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"{name} must lie in [0, {T - 1}] (T = {T} steps), got [{int(t.min())}, {int(t.max())}]")
    return t.long()


def _bcast(coef, x):
    """(N,) coefficient -> (N, 1, 1, ...) in x's dtype and device, to multiply x."""
    return coef.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _abar(alphas_cumprod, t):
    """abar_t with abar_{-1} = 1 (t may contain -1: "the clean image")."""
    ab = alphas_cumprod.to(t.device)
    return torch.where(t >= 0, ab[t.clamp(min=0)], torch.ones((), dtype=ab.dtype, device=t.device))


def _noise_like(x, generator=None):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------
# forward process and the conversions between eps, v and x0


def q_sample(x0, t, noise, alphas_cumprod):
    """Sample x_t ~ q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    t = _check_t(t, x0.shape[0], len(alphas_cumprod))
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    ab = _abar(alphas_cumprod, t)
    return _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise


def predict_x0_from_eps(x_t, t, eps, alphas_cumprod):
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)"""
    ab = _abar(alphas_cumprod, _check_t(t, x_t.shape[0], len(alphas_cumprod)))
    return (x_t - _bcast((1 - ab).sqrt(), x_t) * eps) / _bcast(ab.sqrt(), x_t)


def predict_x0_from_v(x_t, t, v, alphas_cumprod):
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v"""
    ab = _abar(alphas_cumprod, _check_t(t, x_t.shape[0], len(alphas_cumprod)))
    return _bcast(ab.sqrt(), x_t) * x_t - _bcast((1 - ab).sqrt(), x_t) * v


def predict_eps_from_x0(x_t, t, x0, alphas_cumprod):
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)"""
    ab = _abar(alphas_cumprod, _check_t(t, x_t.shape[0], len(alphas_cumprod)))
    return (x_t - _bcast(ab.sqrt(), x_t) * x0) / _bcast((1 - ab).sqrt(), x_t)


def get_velocity(x0, noise, t, alphas_cumprod):
    """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    ab = _abar(alphas_cumprod, _check_t(t, x0.shape[0], len(alphas_cumprod)))
    return _bcast(ab.sqrt(), x0) * noise - _bcast((1 - ab).sqrt(), x0) * x0


def pred_x0_and_eps(model_output, x_t, t, alphas_cumprod, prediction_type="epsilon", clip_denoised=True):
    """Turn the network's output into (x0_hat, eps_hat).

    clip_denoised clamps x0_hat to [-1, 1], the range of pixel-space images (diffusers'
    clip_sample=True). eps_hat is always the network's own noise estimate, taken before
    clipping (for "v" and "x0" it is derived from the unclipped x0_hat), as diffusers does
    by default (use_clipped_model_output=False). Re-deriving eps from the clipped x0_hat
    (GLIDE / guided-diffusion) pushes the clipped-off part of x0_hat back into x_t as
    "noise" at every DDIM step; with a small U-Net on `shapes` that kept ~8% of pixels
    clipped down to the last step and left strong high-frequency noise in the samples
    (benchmarks/ddpm_vs_diffusers.py). Latent models must pass clip_denoised=False:
    latents are not in [-1, 1].
    """
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model output {tuple(model_output.shape)} does not match x_t {tuple(x_t.shape)}: "
            "the denoiser must return a tensor shaped like its input"
        )
    if prediction_type == "epsilon":
        x0 = predict_x0_from_eps(x_t, t, model_output, alphas_cumprod)
        eps = model_output
    elif prediction_type == "v":
        x0 = predict_x0_from_v(x_t, t, model_output, alphas_cumprod)
        eps = predict_eps_from_x0(x_t, t, x0, alphas_cumprod)
    elif prediction_type == "x0":
        x0 = model_output
        eps = predict_eps_from_x0(x_t, t, x0, alphas_cumprod)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
    if clip_denoised:
        x0 = x0.clamp(-1, 1)  # eps stays the unclipped estimate (see the docstring)
    return x0, eps


# --------------------------------------------------------------------------------------
# training


def training_losses(model, x0, alphas_cumprod, *, t=None, noise=None, prediction_type="epsilon",
                    model_kwargs=None, generator=None, q_sample=q_sample):
    """The simple DDPM loss: MSE between the network's output and its target, averaged.

    t ~ randint(0, T) per image unless given; noise ~ N(0, I) unless given. The target is
    eps ("epsilon"), v ("v") or x0 ("x0"). model(x_t, t, **model_kwargs) is the denoiser.
    """
    n, T = x0.shape[0], len(alphas_cumprod)
    if t is None:
        t = torch.randint(0, T, (n,), device=x0.device, generator=generator)
    t = _check_t(t, n, T)
    if noise is None:
        noise = _noise_like(x0, generator)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v":
        target = get_velocity(x0, noise, t, alphas_cumprod)
    elif prediction_type == "x0":
        target = x0
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
    out = model(x_t, t, **(model_kwargs or {}))
    if out.shape != target.shape:
        raise ValueError(f"model output {tuple(out.shape)} does not match its target {tuple(target.shape)}")
    # the loss in float32 even when the forward pass ran in bf16/fp16
    return F.mse_loss(out.float(), target.float())


def cfg_dropout(p, y=None, context=None, *, null_y=None, null_context=None, generator=None):
    """Classifier-free guidance training: replace the condition of each example with the
    "null" condition with probability p (the same draw for y and context).

    y -> null_y (the null class id, an int); context -> null_context (default: zeros, the
    U-Net's "empty" context). Returns (y, context).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition drop probability must lie in [0, 1], got {p}")
    ref = y if y is not None else context
    if ref is None or p == 0:
        return y, context
    n = ref.shape[0]
    drop = torch.rand(n, generator=generator, device=ref.device) < p
    if y is not None:
        if null_y is None:
            raise ValueError("cfg_dropout needs null_y (the null class id) to drop class labels")
        y = torch.where(drop, torch.full_like(y, null_y), y)
    if context is not None:
        null = torch.zeros_like(context) if null_context is None else null_context.expand_as(context)
        context = torch.where(drop[:, None, None], null.to(context.dtype), context)
    return y, context


# --------------------------------------------------------------------------------------
# the reverse process: posterior, DDPM step, DDIM step


def q_posterior_mean_variance(x0, x_t, t, alphas_cumprod):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

    With beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1):
        mean     = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        variance = beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    beta~_0 = 0, so the log-variance is log(max(beta~_t, 1e-20)) (diffusers' clip).
    Variance and log-variance are returned with shape (N, 1, 1, ...).
    """
    t = _check_t(t, x_t.shape[0], len(alphas_cumprod))
    ab = _abar(alphas_cumprod, t)
    ab_prev = _abar(alphas_cumprod, t - 1)
    beta = 1 - ab / ab_prev
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
    coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    var = (1 - ab_prev) / (1 - ab) * beta
    mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
    return mean, _bcast(var, x_t), _bcast(var.clamp(min=1e-20).log(), x_t)


def p_sample(x_t, t, model_output, alphas_cumprod, *, noise=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_denoised=True, generator=None):
    """One DDPM ancestral step x_t -> x_{t-1} given the network's output at (x_t, t).

    mean = posterior mean with x0 replaced by the prediction x0_hat (clipped to [-1, 1]
    when clip_denoised); variance beta~_t ("fixed_small") or beta_t ("fixed_large");
    no noise is added at t = 0, where the result is the final sample.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}: use one of {VARIANCE_TYPES}")
    t = _check_t(t, x_t.shape[0], len(alphas_cumprod))
    x0, _ = pred_x0_and_eps(model_output, x_t, t, alphas_cumprod, prediction_type, clip_denoised)
    mean, var, log_var = q_posterior_mean_variance(x0, x_t, t, alphas_cumprod)
    if variance_type == "fixed_large":
        ab = _abar(alphas_cumprod, t)
        log_var = _bcast((1 - ab / _abar(alphas_cumprod, t - 1)).log(), x_t)
    if noise is None:
        noise = _noise_like(x_t, generator)
    nonzero = _bcast((t > 0).to(x_t.dtype), x_t)
    return mean + nonzero * (0.5 * log_var).exp() * noise


def ddim_timesteps(T, N, spacing="trailing"):
    """The N timesteps (descending, int64) a DDIM/respaced sampler visits out of T.

    "trailing" (default, diffusers): round(arange(T, 0, -T/N)) - 1, e.g. 999, 979, ..., 19
               for T=1000, N=50 -- starts at the noisiest step.
    "leading"  (DDIM paper, Stable Diffusion with steps_offset=0): arange(N) * (T // N),
               reversed: 980, 960, ..., 0.
    "linspace": round(linspace(0, T-1, N)), reversed: 999, ..., 0.
    """
    if not (isinstance(N, int) and 1 <= N <= T):
        raise ValueError(f"number of sampling steps must be an int in [1, {T}], got {N!r}")
    if spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / N, dtype=torch.float64)) - 1
    elif spacing == "leading":
        ts = (torch.arange(N, dtype=torch.float64) * (T // N)).flip(0)
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, T - 1, N, dtype=torch.float64)).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {SPACINGS}")
    return ts.long()


def ddim_step(x_t, t, t_prev, model_output, alphas_cumprod, *, eta=0.0, noise=None,
              prediction_type="epsilon", clip_denoised=True, generator=None):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12), t_prev = -1 at the end.

    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
    eta = 0 is deterministic; eta = 1 is DDPM's ancestral step (fixed_small) on the
    respaced schedule. The last step uses abar_prev = 1 (diffusers' set_alpha_to_one), so
    it returns x0_hat with no noise left in it. With clip_denoised only x0_hat is clipped;
    eps_hat is the network's unclipped estimate (see pred_x0_and_eps for why), so with
    clipping active eta = 1 differs from p_sample, whose posterior mean uses only x0_hat.
    """
    n, T = x_t.shape[0], len(alphas_cumprod)
    t = _check_t(t, n, T)
    t_prev = _check_t(t_prev + 1, n, T + 1, "t_prev + 1") - 1  # allow -1
    if bool((t_prev >= t).any()):
        raise ValueError("ddim_step goes backwards in time: t_prev must be < t")
    x0, eps = pred_x0_and_eps(model_output, x_t, t, alphas_cumprod, prediction_type, clip_denoised)
    ab, ab_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = _bcast(ab_prev.sqrt(), x_t) * x0 + _bcast(dir_coef, x_t) * eps
    if eta > 0:
        if noise is None:
            noise = _noise_like(x_t, generator)
        x_prev = x_prev + _bcast(sigma, x_t) * noise
    return x_prev


# --------------------------------------------------------------------------------------
# classifier-free guidance


def classifier_free_guidance(out_uncond, out_cond, guidance_scale):
    """eps = eps_u + w (eps_c - eps_u). w = 1: plain conditional; w = 0: unconditional."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def guided_model_fn(model, *, y=None, context=None, guidance_scale=1.0, null_y=None,
                    null_context=None, guidance=classifier_free_guidance):
    """Wrap a conditional denoiser model(x, t, y=..., context=...) into model_fn(x, t).

    With guidance_scale != 1 each call runs one batched forward on [uncond, cond] (twice
    the batch, one network call) and combines the halves with `guidance`. The
    unconditional half uses null_y (the null class id) and null_context (default zeros).
    """
    kwargs = {k: v for k, v in (("y", y), ("context", context)) if v is not None}
    if not kwargs or guidance_scale == 1.0:
        return lambda x, t: model(x, t, **kwargs)
    if y is not None and null_y is None:
        raise ValueError("classifier-free guidance with class labels needs null_y (the null class id)")

    def model_fn(x, t):
        uncond = {}
        if y is not None:
            uncond["y"] = torch.full_like(y, null_y)
        if context is not None:
            uncond["context"] = (torch.zeros_like(context) if null_context is None
                                 else null_context.expand_as(context).to(context.dtype))
        both = {k: torch.cat([uncond[k], kwargs[k]]) for k in kwargs}
        out = model(torch.cat([x, x]), torch.cat([t, t]), **both)
        out_uncond, out_cond = out.chunk(2)
        return guidance(out_uncond, out_cond, guidance_scale)

    return model_fn


# --------------------------------------------------------------------------------------
# sampling loops


def _timestep_grid(T, sampler, steps, spacing):
    """Descending timesteps a sampler visits, followed by -1 (the clean image)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    if sampler == "ddpm":
        if steps not in (None, T):
            raise ValueError(f"the DDPM sampler walks all T={T} steps; use sampler='ddim' for steps={steps}")
        ts = torch.arange(T - 1, -1, -1)
    else:
        ts = ddim_timesteps(T, steps or 50, spacing)
    return torch.cat([ts, ts.new_tensor([-1])])


def _denoise_step(model_fn, x, t, t_prev, alphas_cumprod, sampler, *, eta, generator,
                  p_sample, ddim_step, step_kwargs):
    """One step of either sampler from timestep t to t_prev, with one network call."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    out = model_fn(x, tt)
    if sampler == "ddpm":
        return p_sample(x, tt, out, alphas_cumprod, generator=generator, **step_kwargs)
    return ddim_step(x, tt, int(t_prev), out, alphas_cumprod, eta=eta, generator=generator, **step_kwargs)


def _progress(it, progress, desc):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


@torch.no_grad()
def sample_loop(model_fn, x_T, alphas_cumprod, *, sampler="ddpm", steps=None, eta=0.0,
                spacing="trailing", t_start=None, generator=None, progress=False,
                p_sample=p_sample, ddim_step=ddim_step, **step_kwargs):
    """Denoise x_T down to a sample with DDPM (all T steps), DDIM (`steps` steps) or one of
    minigen.samplers' ODE solvers: "dpmsolver++" (`steps` evaluations) or "heun" (`steps`
    Karras sigmas, 2 steps - 1 evaluations); `steps=None` takes each one's default.

    t_start (optional) starts from a partially noised x at that timestep instead of
    T - 1: only grid timesteps <= t_start are visited (img2img). step_kwargs
    (prediction_type, clip_denoised, variance_type for DDPM) go to the step function.
    """
    if sampler in samplers.SAMPLERS:  # DPM-Solver++ / Heun on Karras sigmas
        if t_start is not None or eta:
            raise ValueError(f"sampler {sampler!r} is a deterministic ODE solver from pure noise: img2img, "
                             f"inpainting and eta > 0 need sampler='ddim' or 'ddpm'")
        return samplers.diffusion_sample(
            model_fn, x_T, alphas_cumprod, sampler=sampler, steps=steps, spacing=spacing, progress=progress,
            prediction_type=step_kwargs.get("prediction_type", "epsilon"),
            clip_denoised=step_kwargs.get("clip_denoised", True))
    T = len(alphas_cumprod)
    grid = _timestep_grid(T, sampler, steps, spacing)
    if t_start is not None:
        grid = grid[grid <= t_start]
    if sampler == "ddim":
        step_kwargs.pop("variance_type", None)
    x = x_T
    for i in _progress(range(len(grid) - 1), progress, sampler):
        x = _denoise_step(model_fn, x, grid[i], grid[i + 1], alphas_cumprod, sampler, eta=eta,
                          generator=generator, p_sample=p_sample, ddim_step=ddim_step,
                          step_kwargs=step_kwargs)
    return x


def p_sample_loop(model_fn, x_T, alphas_cumprod, **kwargs):
    """DDPM ancestral sampling through all T steps from x_T (N(0, I) noise)."""
    return sample_loop(model_fn, x_T, alphas_cumprod, sampler="ddpm", **kwargs)


def ddim_sample(model_fn, x_T, alphas_cumprod, *, steps=50, eta=0.0, spacing="trailing", **kwargs):
    """DDIM sampling with `steps` network calls from x_T (N(0, I) noise)."""
    return sample_loop(model_fn, x_T, alphas_cumprod, sampler="ddim", steps=steps, eta=eta,
                       spacing=spacing, **kwargs)


@torch.no_grad()
def img2img(model_fn, x, strength, alphas_cumprod, *, noise=None, generator=None, **kwargs):
    """SDEdit (Meng et al. 2022): noise the image to t = strength * T, then denoise it.

    strength 0 returns x unchanged, strength 1 starts from (almost) pure noise. The start
    timestep is int(strength * T) - 1; with DDIM only the grid steps at or below it run.
    kwargs go to sample_loop (sampler, steps, eta, spacing, prediction_type, ...).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img strength must lie in [0, 1], got {strength}")
    T = len(alphas_cumprod)
    t_start = int(strength * T) - 1
    if t_start < 0:
        return x.clone()
    grid = _timestep_grid(T, kwargs.get("sampler", "ddpm"), kwargs.get("steps"), kwargs.get("spacing", "trailing"))
    t0 = int(grid[grid <= t_start][0])
    if t0 < 0:  # strength too small to reach any step of a coarse DDIM grid
        return x.clone()
    noise = _noise_like(x, generator) if noise is None else noise
    x_t = q_sample(x, t0, noise, alphas_cumprod)
    return sample_loop(model_fn, x_t, alphas_cumprod, t_start=t0, generator=generator, **kwargs)


def repaint_schedule(num_steps, jump_length=10, jump_n_sample=10):
    """Indices into a descending timestep grid of length num_steps + 1 (the last entry is
    the clean image) visited by RePaint (Lugmayr et al. 2022) resampling.

    Every `jump_length` steps the sampler goes back up `jump_length` grid points by
    re-noising and denoises them again, jump_n_sample - 1 extra times. jump_n_sample = 1
    is plain descent 0, 1, ..., num_steps.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be >= 1")
    path, i = [0], 0
    while i < num_steps:
        i += 1
        path.append(i)
        if jump_n_sample > 1 and i % jump_length == 0 and jump_length <= i < num_steps:
            for _ in range(jump_n_sample - 1):
                path.extend(range(i - jump_length, i + 1))
    return path


@torch.no_grad()
def inpaint(model_fn, x0, mask, alphas_cumprod, *, sampler="ddpm", steps=None, eta=0.0,
            spacing="trailing", jump_length=10, jump_n_sample=1, x_T=None, generator=None,
            progress=False, q_sample=q_sample, p_sample=p_sample, ddim_step=ddim_step, **step_kwargs):
    """Fill the region where mask == 0 so that it agrees with the known pixels (mask == 1).

    After every denoising step to timestep s, the known region is replaced by x0 noised
    to s with q_sample (by x0 itself at the end), so the sample ends equal to x0 exactly
    where mask == 1. jump_n_sample > 1 turns on RePaint resampling: go back up
    jump_length steps by re-noising, x_b = sqrt(abar_b/abar_a) x_a + sqrt(1 - abar_b/abar_a) z,
    and denoise again, which lets the filled region harmonise with the known one.
    """
    if mask.ndim != x0.ndim:
        raise ValueError(f"mask must have {x0.ndim} dims (e.g. (N, 1, H, W)), got shape {tuple(mask.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, x0.shape)
    except RuntimeError:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the images {tuple(x0.shape)}") from None
    mask = mask.to(device=x0.device, dtype=x0.dtype)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 (fill in) and 1 (keep)")
    T = len(alphas_cumprod)
    grid = _timestep_grid(T, sampler, steps, spacing)
    if sampler == "ddim":
        step_kwargs.pop("variance_type", None)
    ab = alphas_cumprod.to(x0.device)

    def known_at(i):
        s = int(grid[i])
        return x0 if s < 0 else q_sample(x0, s, _noise_like(x0, generator), ab)

    x = _noise_like(x0, generator) if x_T is None else x_T
    x = mask * known_at(0) + (1 - mask) * x
    path = repaint_schedule(len(grid) - 1, jump_length, jump_n_sample)
    for a, b in _progress(list(zip(path[:-1], path[1:])), progress, "inpaint"):
        if b == a + 1:  # denoise one grid step, then paste the known region back
            x = _denoise_step(model_fn, x, grid[a], grid[b], ab, sampler, eta=eta, generator=generator,
                              p_sample=p_sample, ddim_step=ddim_step, step_kwargs=step_kwargs)
            x = mask * known_at(b) + (1 - mask) * x
        else:  # RePaint jump: re-noise from grid[a] up to the noisier grid[b]
            ratio = ab[grid[b]] / _abar(ab, grid[a : a + 1])[0]
            x = ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * _noise_like(x, generator)
    return x


# --------------------------------------------------------------------------------------
# likelihood: bits per dimension from the variational bound


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) for x on the 256 levels of [-1, 1] under N(mean, exp(log_scale)^2)
    integrated over the pixel's bin [x - 1/255, x + 1/255]; the edge bins extend to
    -inf (x < -0.999) and +inf (x > 0.999). In nats, elementwise."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255)
    lower = inv_std * (x - mean - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower)
    log_bin = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


@torch.no_grad()
def bits_per_dim(model_fn, x0, alphas_cumprod, *, num_timesteps=None, prediction_type="epsilon",
                 variance_type="fixed_small", clip_denoised=True, generator=None, progress=False):
    """Negative variational bound of each image in bits per dimension (Ho et al. 2020):

        L = KL(q(x_{T-1}|x0) || N(0, I))                            prior
          + sum_{t=1}^{T-1} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))  vb terms
          - log p(x0 | x_0noisy)                                     decoder (t = 0)

    each summed over dimensions, divided by (number of dims * ln 2). The decoder is the
    discretised Gaussian on [-1, 1] with mean x0_hat; its variance is beta~_1 for both
    variance types (beta~_0 = 0), as in Ho et al.'s and improved-diffusion's code.
    num_timesteps = K < T - 1 estimates the vb sum from K timesteps drawn without
    replacement, scaled by (T - 1) / K: unbiased, faster, noisier. The prior and decoder
    terms are always exact. Returns a dict of (N,) tensors: total, prior, vb, decoder.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}: use one of {VARIANCE_TYPES}")
    n, T = x0.shape[0], len(alphas_cumprod)
    ab = alphas_cumprod.to(x0.device)
    dims = x0[0].numel()
    to_bits = 1.0 / (dims * math.log(2.0))

    def per_image(z):
        return z.flatten(1).sum(1) * to_bits

    # prior: q(x_{T-1} | x0) = N(sqrt(abar) x0, 1 - abar) against N(0, I)
    abT = ab[-1].to(x0.dtype)
    prior = per_image(normal_kl(abT.sqrt() * x0, (1 - abT).log(), torch.zeros_like(x0), torch.zeros_like(x0)))

    def model_mean_logvar(x_t, t):
        tt = torch.full((n,), t, dtype=torch.long, device=x0.device)
        x0_hat, _ = pred_x0_and_eps(model_fn(x_t, tt), x_t, tt, ab, prediction_type, clip_denoised)
        mean, _, log_var = q_posterior_mean_variance(x0_hat, x_t, tt, ab)
        if t == 0 or (variance_type == "fixed_large" and T > 1):
            # beta~_1 at t = 0 (see docstring); beta_t for fixed_large
            beta = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
            v = ((1 - ab[0]) / (1 - ab[1]) * beta[1]) if t == 0 else beta[t]
            log_var = torch.full_like(log_var, float(v.log()))
        return mean, log_var

    ts = torch.arange(1, T)
    scale = 1.0
    if num_timesteps is not None and num_timesteps < T - 1:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        ts = ts[torch.randperm(T - 1, generator=generator)[:num_timesteps]].sort().values
        scale = (T - 1) / num_timesteps
    vb = torch.zeros(n, dtype=torch.float64, device=x0.device)
    for t in _progress(ts.tolist(), progress, "bits/dim"):
        x_t = q_sample(x0, t, _noise_like(x0, generator), ab)
        true_mean, _, true_logvar = q_posterior_mean_variance(x0, x_t, t, ab)
        mean, log_var = model_mean_logvar(x_t, t)
        vb += per_image(normal_kl(true_mean, true_logvar, mean, log_var)).double()
    vb = (vb * scale).to(x0.dtype)

    x_0noisy = q_sample(x0, 0, _noise_like(x0, generator), ab)
    mean, log_var = model_mean_logvar(x_0noisy, 0)
    decoder = -per_image(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return dict(total=prior + vb + decoder, prior=prior, vb=vb, decoder=decoder)


# --------------------------------------------------------------------------------------
# the nn.Module for training, sampling and the CLI


@dataclass
class DiffusionConfig:
    image_shape: tuple = (3, 32, 32)  # (C, H, W) of what is diffused (pixels or latents)
    timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "cosine"
    beta_start: float | None = None  # None -> the schedule's default
    beta_end: float | None = None
    prediction_type: str = "epsilon"  # "epsilon" | "v" | "x0"
    variance_type: str = "fixed_small"  # "fixed_small" (beta~) | "fixed_large" (beta)
    clip_denoised: bool = True  # clamp x0_hat to [-1, 1]; False for latent diffusion
    cond_drop_prob: float = 0.1  # classifier-free guidance: P(condition -> null) in training
    sampler: str = "ddim"  # default sampler of sample() / sample_images()
    # steps=None in sample() means sample_steps for every sampler (the same rule in FlowMatching and
    # LatentDiffusion): DDIM / DPM-Solver++ steps, Heun's Karras sigmas; DDPM always takes all T
    sample_steps: int = 50
    eta: float = 0.0
    spacing: str = "trailing"
    guidance_scale: float = 1.0  # 1 = plain conditional sampling
    unet: UNetConfig | None = None  # the denoiser build() makes (None: bring your own)
    backbone: str = "unet"  # "unet" | "dit": which of config.unet / config.dit is built
    dit: object | None = None  # a minigen.dit.DiTConfig, for backbone="dit"

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if isinstance(self.unet, dict):  # rebuilt from a checkpoint's plain dict
            self.unet = UNetConfig(**self.unet)
        if isinstance(self.dit, dict):
            from minigen.dit import DiTConfig

            self.dit = DiTConfig(**self.dit)
        check_backbone(self.backbone)
        for name, allowed in (("beta_schedule", ("linear", "scaled_linear", "cosine")),
                              ("prediction_type", PREDICTION_TYPES), ("variance_type", VARIANCE_TYPES),
                              ("sampler", SAMPLERS), ("spacing", SPACINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DiffusionConfig.{name} = {getattr(self, name)!r}: use one of {allowed}")
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")


# the name minigen.cli.load_model looks for first (<Class>Config): without it a checkpoint's
# config is matched to a dataclass by its exact field set, so a checkpoint saved before a
# field was added (backbone, dit) would no longer load
GaussianDiffusionConfig = DiffusionConfig


class GaussianDiffusion(nn.Module):
    """A denoiser plus a noise schedule: training loss, samplers, guidance, inpainting,
    img2img and bits/dim.

    model(x_t, t, y=None, context=None) predicts eps / v / x0 (config.prediction_type);
    None builds a UNet from config.unet. Keyword arguments replace the algorithm's pieces
    (a lesson passes the learner's function): q_sample, p_sample, ddim_step, guidance
    (the CFG combination), inpaint (the inpainting loop).
    """

    def __init__(self, model=None, config: DiffusionConfig | None = None, *, q_sample=q_sample,
                 p_sample=p_sample, ddim_step=ddim_step, guidance=classifier_free_guidance,
                 inpaint=inpaint):
        super().__init__()
        if isinstance(model, DiffusionConfig):  # GaussianDiffusion(config): rebuild from config.unet
            model, config = None, model
        self.config = config = config or DiffusionConfig()
        if model is None:
            model = build_backbone(config.backbone, config.unet, config.dit)
        self.model = model
        self.q_sample_fn, self.p_sample_fn, self.ddim_step_fn = q_sample, p_sample, ddim_step
        self.guidance_fn, self.inpaint_fn = guidance, inpaint
        betas = make_beta_schedule(config.beta_schedule, int(config.timesteps), config.beta_start, config.beta_end)
        # float32 buffers (like diffusers): float64 would not move to MPS
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod(betas).float(), persistent=False)

    @property
    def num_timesteps(self):
        return len(self.alphas_cumprod)

    @property
    def num_classes(self):
        return getattr(getattr(self.model, "config", None), "num_classes", None)

    # -- training -----------------------------------------------------------------------

    def _unpack(self, batch):
        """batch: images, (images,), (images, labels) or a dict(image=, label=, context=)."""
        y = context = None
        if isinstance(batch, dict):
            x, y, context = batch["image"], batch.get("label"), batch.get("context")
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
            y = batch[1] if len(batch) > 1 else None
        else:
            x = batch
        if not self.num_classes:
            y = None  # an unconditional model ignores the dataset's labels
        return x, y, context

    def training_loss(self, batch, step=None):
        x, y, context = self._unpack(batch)
        if tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(f"images of shape {tuple(x.shape[1:])} given to a diffusion model "
                             f"configured for {self.config.image_shape}")
        y, context = cfg_dropout(self.config.cond_drop_prob if self.training else 0.0, y, context,
                                 null_y=self.num_classes)
        kwargs = {k: v for k, v in (("y", y), ("context", context)) if v is not None}
        return dict(loss=self.loss(x, kwargs))

    def loss(self, x0, model_kwargs=None, *, t=None, noise=None):
        """The objective on clean x0 with the condition already dropped: the simple DDPM loss
        for config.prediction_type, at timesteps t and noise drawn unless given.
        (minigen.flow.FlowMatching.loss is its flow-matching twin, so a wrapper such as
        latent diffusion can hold either objective.)"""
        return training_losses(self.model, x0, self.alphas_cumprod, t=t, noise=noise,
                               prediction_type=self.config.prediction_type, model_kwargs=model_kwargs,
                               q_sample=self.q_sample_fn)

    # -- sampling -----------------------------------------------------------------------

    def denoiser(self, y=None, context=None, guidance_scale=None, null_context=None):
        """model_fn(x, t) for the samplers, with classifier-free guidance if asked (the
        unconditional half uses the null class and null_context, default zeros)."""
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        return guided_model_fn(self.model, y=y, context=context, guidance_scale=w,
                               null_y=self.num_classes, null_context=null_context, guidance=self.guidance_fn)

    def _step_kwargs(self):
        c = self.config
        return dict(prediction_type=c.prediction_type, clip_denoised=c.clip_denoised,
                    variance_type=c.variance_type)

    def _labels(self, n, y):
        """y as (n,) int64 on the model's device; one int means the same class for all."""
        if y is None:
            return None
        if not torch.is_tensor(y):
            y = torch.full((n,), int(y), dtype=torch.long)
        return y.to(self.alphas_cumprod.device)

    @torch.no_grad()
    def sample(self, n, y=None, context=None, *, guidance_scale=None, steps=None, sampler=None,
               eta=None, spacing=None, x_T=None, generator=None, progress=False):
        """n samples, shape (n, *config.image_shape). y: (n,) class ids or one int; context:
        (n, M, D). Defaults (sampler, steps, eta, guidance) come from the config."""
        c = self.config
        sampler = sampler or c.sampler
        device = self.alphas_cumprod.device
        if x_T is None:
            x_T = torch.randn((n, *c.image_shape), generator=generator, device=device)
        with _eval_mode(self):
            return self.sample_from(self.denoiser(self._labels(n, y), context, guidance_scale), x_T,
                                    sampler=sampler, steps=steps, eta=eta, spacing=spacing, generator=generator,
                                    progress=progress)

    @torch.no_grad()
    def sample_from(self, model_fn, x_T, *, sampler=None, steps=None, eta=None, spacing=None,
                    clip_denoised=None, generator=None, progress=False):
        """Run `sampler` (config's by default) on model_fn (e.g. self.denoiser(...)) from x_T:
        the sampling half of the objective, twin of minigen.flow.FlowMatching.sample_from."""
        c = self.config
        sampler = sampler or c.sampler
        kwargs = self._step_kwargs()
        if clip_denoised is not None:
            kwargs["clip_denoised"] = clip_denoised
        return sample_loop(model_fn, x_T, self.alphas_cumprod, sampler=sampler,
                           steps=(steps or c.sample_steps) if sampler != "ddpm" else steps,
                           eta=(c.eta if sampler == "ddim" else 0.0) if eta is None else eta,
                           spacing=spacing or c.spacing, generator=generator, progress=progress,
                           p_sample=self.p_sample_fn, ddim_step=self.ddim_step_fn, **kwargs)

    def sample_images(self, n, guidance=None, steps=None, sampler=None):
        """Samples cycling through the classes: fit's periodic grids and `minigen sample`
        (--guidance, --steps, --sampler; None keeps the config's guidance_scale,
        sample_steps and sampler)."""
        y = torch.arange(n) % self.num_classes if self.num_classes else None
        return self.sample(n, y=y, guidance_scale=guidance, steps=steps, sampler=sampler)

    @torch.no_grad()
    def inpaint(self, x, mask, y=None, context=None, *, guidance_scale=None, sampler="ddpm", steps=None,
                eta=None, jump_length=10, jump_n_sample=1, generator=None, progress=False):
        """Fill in x where mask == 0 (mask == 1 is kept exactly). See `inpaint`."""
        c = self.config
        with _eval_mode(self):
            return self.inpaint_fn(
                self.denoiser(self._labels(len(x), y), context, guidance_scale), x, mask,
                self.alphas_cumprod, sampler=sampler, steps=steps, eta=c.eta if eta is None else eta,
                spacing=c.spacing, jump_length=jump_length, jump_n_sample=jump_n_sample,
                generator=generator, progress=progress, q_sample=self.q_sample_fn,
                p_sample=self.p_sample_fn, ddim_step=self.ddim_step_fn, **self._step_kwargs())

    @torch.no_grad()
    def img2img(self, x, strength, y=None, context=None, *, guidance_scale=None, sampler=None,
                steps=None, eta=None, generator=None, progress=False):
        """SDEdit: noise x to t = strength * T and denoise it. See `img2img`."""
        c = self.config
        sampler = sampler or c.sampler
        with _eval_mode(self):
            return img2img(
                self.denoiser(self._labels(len(x), y), context, guidance_scale), x, strength,
                self.alphas_cumprod, sampler=sampler,
                steps=(steps or c.sample_steps) if sampler == "ddim" else steps,
                eta=c.eta if eta is None else eta, spacing=c.spacing, generator=generator,
                progress=progress, p_sample=self.p_sample_fn, ddim_step=self.ddim_step_fn,
                **self._step_kwargs())

    @torch.no_grad()
    def bits_per_dim(self, x, y=None, *, num_timesteps=None, batch_size=256, generator=None):
        """Mean negative variational bound in bits/dim over the images x (N, C, H, W).
        num_timesteps < T - 1 gives the unbiased subsampled estimate (see `bits_per_dim`)."""
        c = self.config
        totals = []
        with _eval_mode(self):
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(self.alphas_cumprod.device)
                yb = None if y is None else y[i : i + batch_size].to(xb.device)
                out = bits_per_dim(self.denoiser(yb, guidance_scale=1.0), xb, self.alphas_cumprod,
                                   num_timesteps=num_timesteps, prediction_type=c.prediction_type,
                                   variance_type=c.variance_type, clip_denoised=c.clip_denoised,
                                   generator=generator)
                totals.append(out["total"])
        return float(torch.cat(totals).mean())


class _eval_mode:
    """Switch a module to eval() for sampling and restore its previous mode afterwards."""

    def __init__(self, module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


# --------------------------------------------------------------------------------------
# the backbone: a U-Net or a DiT, shared by diffusion, flow matching and latent diffusion


def check_backbone(backbone) -> str:
    """`backbone` if it is one of BACKBONES, else a ValueError naming them."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: use one of {BACKBONES}")
    return backbone


def backbone_config_class(backbone) -> type:
    """The config dataclass of a backbone: UNetConfig or minigen.dit.DiTConfig."""
    if check_backbone(backbone) == "dit":
        from minigen.dit import DiTConfig

        return DiTConfig
    return UNetConfig


def build_backbone(backbone, unet=None, dit=None) -> nn.Module:
    """The denoising network a model config names: a UNet or a DiT (same forward signature)."""
    config = {"unet": unet, "dit": dit}[check_backbone(backbone)]
    if config is None:
        name = "UNetConfig" if backbone == "unet" else "DiTConfig"
        raise ValueError(f"backbone {backbone!r} needs a {name} (config.{backbone}) or a model passed in")
    if backbone == "dit":
        from minigen.dit import DiT

        return DiT(config)
    return UNet(config)


def split_backbone_overrides(overrides, model_fields, *, image_shape, num_classes=None, what="diffusion"):
    """Split the CLI's flat overrides into (backbone, model fields, backbone config).

    overrides: fields of the model's config (model_fields, e.g. DiffusionConfig's) mixed with
    those of its backbone's config ("backbone": "unet" (default) or "dit" picks UNetConfig or
    DiTConfig). The backbone takes in_channels (and a DiT its input_size) from image_shape
    unless given; num_classes (the dataset's, or an override; 0/None: unconditional) is set.
    Unknown keys raise a ValueError listing the valid ones for that backbone.
    """
    overrides = dict(overrides or {})
    backbone = check_backbone(overrides.pop("backbone", "unet"))
    bcls = backbone_config_class(backbone)
    bfields = {f.name for f in fields(bcls)}
    model_fields = set(model_fields) - {"backbone", "unet", "dit"}
    unknown = set(overrides) - model_fields - bfields
    if unknown:
        raise ValueError(f"unknown {what} option(s) {sorted(unknown)} for backbone {backbone!r}; "
                         f"valid: {sorted(model_fields | bfields | {'backbone'})}")
    image_shape = tuple(image_shape)
    if "num_classes" in overrides:
        num_classes = overrides.pop("num_classes")
    bargs = {k: v for k, v in overrides.items() if k in bfields}
    bargs.setdefault("in_channels", image_shape[0])
    bargs["num_classes"] = num_classes or None
    if backbone == "dit":
        bargs.setdefault("input_size", image_shape[1:])
    margs = {k: v for k, v in overrides.items() if k in model_fields}
    return backbone, margs, bcls(**bargs)


def build(config_overrides=None, image_shape=(3, 32, 32), num_classes=None):
    """The CLI's constructor: a GaussianDiffusion with a UNet (or a DiT, backbone="dit") for
    images of image_shape.

    config_overrides: a flat dict of DiffusionConfig fields and the backbone config's fields
    (UNetConfig, or DiTConfig with backbone="dit"), e.g. {"beta_schedule": "cosine",
    "channels": 64}; num_classes (from the dataset) makes the model class-conditional with
    classifier-free guidance; override num_classes=0 (or None) to train an unconditional
    model on a labelled dataset.
    """
    backbone, dargs, bconfig = split_backbone_overrides(
        config_overrides, {f.name for f in fields(DiffusionConfig)}, image_shape=image_shape,
        num_classes=num_classes, what="diffusion")
    dargs.setdefault("image_shape", tuple(image_shape))
    config = DiffusionConfig(**dargs, backbone=backbone, **{backbone: bconfig})
    return GaussianDiffusion(None, config)
