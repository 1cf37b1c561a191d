"""Flow matching (rectified flow): the training objective of Stable Diffusion 3 and Flux.

Instead of a noise schedule and a Markov chain, flow matching (Lipman et al. 2023;
Liu et al. 2023, "rectified flow"; Albergo & Vanden-Eijnden 2023) draws a straight line
from every data point x0 to its own noise eps and learns the velocity along it:

    x_t = (1 - t) x0 + t eps,   t in [0, 1]          (t = 0: data, t = 1: pure noise)
    v   = dx_t/dt = eps - x0                          (the regression target)
    loss = || v_theta(x_t, t) - (eps - x0) ||^2

(the convention of Stable Diffusion 3 and diffusers; Lipman et al. run time the other
way). v_theta learns E[eps - x0 | x_t], the velocity field of an ODE that carries the
noise distribution to the data; sampling integrates it from t = 1 to 0,

    Euler   x_{t'} = x_t + (t' - t) v_theta(x_t, t),  t' < t.

How it relates to the diffusion of lesson 06. Any Gaussian path x_t = alpha_t x0 + sigma_t eps
has the velocity dx_t/dt = alpha'_t x0 + sigma'_t eps. On the straight path alpha = 1 - t,
sigma = t, so v = eps - x0 and alpha_t + sigma_t = 1. The VP paths of DDPM have
alpha_t^2 + sigma_t^2 = 1 (alpha = sqrt(abar), sigma = sqrt(1 - abar)); write
alpha = cos(phi), sigma = sin(phi) and the velocity in phi is

    dx/dphi = -sin(phi) x0 + cos(phi) eps = alpha eps - sigma x0 = v,

exactly the v-prediction target of Salimans & Ho (2022): v-prediction is flow matching on
the circular path, with time phi. The paths differ only by a rescaling of x_t: dividing a
VP point by alpha + sigma,

    x_t / (alpha_t + sigma_t) = (1 - t) x0 + t eps,   t = sigma_t / (alpha_t + sigma_t),

puts it on the straight path at the same signal-to-noise ratio alpha/sigma = (1 - t)/t;
conversely the straight path divided by sqrt((1 - t)^2 + t^2) is a VP path. So every
schedule of lesson 06 is a reparametrised straight path: what differs is the weighting
of noise levels in the loss, the distribution of training times (SD3 samples t
logit-normally, concentrating training on the middle of the path) and the time grid of
the sampler. In the VE view of minigen.samplers (s = sigma / alpha) the straight path
has s = t / (1 - t), and because alpha + sigma = 1 an Euler step in t is exactly a DDIM
step: both set x_{t'} = (1 - t') x0_hat + t' eps_hat. The conversions from the velocity:

    x0_hat = x_t - t v,        eps_hat = x_t + (1 - t) v.

Stable Diffusion 3 shifts the sampling times towards the noise for large images,
t' = s t / (1 + (s - 1) t) (config.shift, 1 = no shift).

The network sees time_scale * t (1000 t, as Stable Diffusion 3), so the sinusoidal time
embedding of minigen.nn has the resolution it has for DDPM's integer timesteps.

    model = FlowMatching(unet, FlowConfig(image_shape=(3, 32, 32)))   # or build(...)
    fit(model, shapes, steps=...)
    images = model.sample(16, y=labels, sampler="heun", steps=10, guidance_scale=2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen import samplers
from minigen.diffusion import (BACKBONES, _eval_mode, build_backbone, cfg_dropout, check_backbone,
                               classifier_free_guidance, guided_model_fn, split_backbone_overrides)
from minigen.unet import UNetConfig

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("euler", "heun", "dpmsolver++")
FLOW_GRIDS = ("flow", "karras")

# --------------------------------------------------------------------------------------
# the path, the target, the loss


def flow_path(x0, noise, t):
    """x_t = (1 - t) x0 + t noise, t: (N,) in [0, 1]."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def flow_target(x0, noise):
    """The velocity of the straight path: d/dt [(1 - t) x0 + t noise] = noise - x0."""
    return noise - x0


def sample_timesteps(n, method="logit_normal", *, mean=0.0, std=1.0, generator=None, device=None):
    """n training times in (0, 1). "uniform": U(0, 1). "logit_normal": sigmoid(mean + std z),
    z ~ N(0, 1) (Esser et al. 2024, eq. 19: more weight on the middle of the path, where
    the velocity is hardest to predict; SD3 uses mean 0, std 1)."""
    if method == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if method == "logit_normal":
        if not std > 0:
            raise ValueError(f"logit_std must be > 0, got {std}")
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown timestep sampling {method!r}: use one of {TIMESTEP_SAMPLING}")


def flow_matching_loss(model, x0, *, t=None, noise=None, timestep_sampling="logit_normal", logit_mean=0.0,
                       logit_std=1.0, time_scale=1000.0, model_kwargs=None, generator=None):
    """The conditional flow-matching loss: mean of (model(x_t, time_scale t) - (noise - x0))^2.

    t ~ timestep_sampling per image unless given, noise ~ N(0, I) unless given.
    model(x, t, **model_kwargs) is the velocity network.
    """
    n = x0.shape[0]
    if t is None:
        t = sample_timesteps(n, timestep_sampling, mean=logit_mean, std=logit_std, generator=generator,
                             device=x0.device)
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,) or not t.is_floating_point():
        raise ValueError(f"t must be float times of shape ({n},) in [0, 1], got {t.dtype} {tuple(t.shape)}")
    if n and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(f"flow times must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    x_t = flow_path(x0, noise, t.to(x0.dtype))
    out = model(x_t, t * time_scale, **(model_kwargs or {}))
    target = flow_target(x0, noise)
    if out.shape != target.shape:
        raise ValueError(f"model output {tuple(out.shape)} does not match its target {tuple(target.shape)}")
    return F.mse_loss(out.float(), target.float())


def velocity_to_x0(v, x_t, t):
    """x0_hat = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def velocity_to_eps(v, x_t, t):
    """eps_hat = x_t + (1 - t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


def _bcast(t, x):
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t
    return t.view(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------
# sampling: Euler and Heun in t (diffusers' FlowMatchEuler/HeunDiscreteScheduler)


def euler_step(x, t, t_next, v):
    """x_{t_next} = x_t + (t_next - t) v."""
    return x + (t_next - t) * v


@torch.no_grad()
def flow_sample(model_fn, x_T, grid: samplers.Grid, *, sampler="euler", clip_denoised=False, euler_step=euler_step,
                progress=False, callback=None):
    """Integrate the velocity ODE from x_T (noise at the grid's first time) to t = 0.

    grid: a samplers.Grid of the straight path (FlowSchedule.uniform / karras / from_times);
    model_fn(x, time_scale t) -> velocity (guided or not). "euler": one evaluation per step.
    "heun": Euler to t_next, then the average of the slopes at t and t_next (the trapezoidal
    rule, second order); the last step, to t = 0, stays Euler, so N steps cost 2N - 1
    evaluations. clip_denoised clamps the final sample to [-1, 1].
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"flow_sample integrates with 'euler' or 'heun', got {sampler!r}")
    ts = grid.sigmas.tolist()  # sigma = t on the straight path
    times = grid.times.tolist()

    def velocity(x, i):
        tt = torch.full((x.shape[0],), times[i], dtype=torch.float32, device=x.device)
        v = model_fn(x, tt)
        if v.shape != x.shape:
            raise ValueError(f"the velocity {tuple(v.shape)} does not match x {tuple(x.shape)}")
        return v

    x = x_T
    it = range(len(grid))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"flow {sampler}", leave=False)
    for i in it:
        v = velocity(x, i)
        x_next = euler_step(x, ts[i], ts[i + 1], v)
        if sampler == "heun" and ts[i + 1] > 0:
            x_next = euler_step(x, ts[i], ts[i + 1], 0.5 * (v + velocity(x_next, i + 1)))
        x = x_next
        if callback is not None:
            callback(i, x)
    return x.clamp(-1, 1) if clip_denoised else x


# --------------------------------------------------------------------------------------
# the nn.Module for training, sampling and the CLI


@dataclass
class FlowConfig:
    image_shape: tuple = (3, 32, 32)  # (C, H, W) of what flows (pixels or latents)
    timestep_sampling: str = "logit_normal"  # "uniform" | "logit_normal" (SD3)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0  # the network sees time_scale * t
    shift: float = 1.0  # SD3's time shift of the sampling grid (1 = none)
    cond_drop_prob: float = 0.1  # classifier-free guidance: P(condition -> null) in training
    sampler: str = "euler"  # "euler" | "heun" | "dpmsolver++"
    grid: str = "flow"  # "flow": uniform in t, shifted; "karras": Karras sigmas of the VE view
    # steps=None means sample_steps for every sampler (as in GaussianDiffusion and LatentDiffusion)
    sample_steps: int = 20  # Euler / DPM-Solver++ evaluations; Heun points (2 steps - 1 evaluations)
    guidance_scale: float = 1.0
    clip_denoised: bool = True  # clamp samples (and DPM-Solver++'s x0_hat) to [-1, 1]; False for latents
    backbone: str = "unet"  # "unet" | "dit": which config below build() uses
    unet: UNetConfig | None = None
    dit: object | None = None  # a minigen.dit.DiTConfig

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if isinstance(self.unet, dict):  # rebuilt from a checkpoint's plain dict
            self.unet = UNetConfig(**self.unet)
        if isinstance(self.dit, dict):
            from minigen.dit import DiTConfig

            self.dit = DiTConfig(**self.dit)
        check_backbone(self.backbone)
        for name, allowed in (("timestep_sampling", TIMESTEP_SAMPLING), ("sampler", FLOW_SAMPLERS),
                              ("grid", FLOW_GRIDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"FlowConfig.{name} = {getattr(self, name)!r}: use one of {allowed}")
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if not self.shift > 0 or not self.time_scale > 0 or not self.logit_std > 0:
            raise ValueError("FlowConfig: shift, time_scale and logit_std must be > 0")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}")


FlowMatchingConfig = FlowConfig  # the <Class>Config name minigen.cli.load_model looks for


class FlowMatching(nn.Module):
    """A velocity network trained by flow matching: the counterpart of
    minigen.diffusion.GaussianDiffusion, with the same interface (training_loss,
    sample, sample_images, the same batches and conditioning: class labels y, a context
    sequence, classifier-free guidance).

    model(x_t, time_scale * t, y=None, context=None) predicts the velocity eps - x0; None
    builds config.backbone from config.unet / config.dit. flow_loss and euler_step replace
    the algorithm's pieces (a lesson passes the learner's own).
    """

    def __init__(self, model=None, config: FlowConfig | None = None, *, flow_loss=flow_matching_loss,
                 euler_step=euler_step, guidance=classifier_free_guidance):
        super().__init__()
        if isinstance(model, FlowConfig):
            model, config = None, model
        self.config = config = config or FlowConfig()
        if model is None:
            model = build_backbone(config.backbone, config.unet, config.dit)
        self.model = model
        self.flow_loss_fn, self.euler_step_fn, self.guidance_fn = flow_loss, euler_step, guidance
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to(device)

    @property
    def num_classes(self):
        return getattr(getattr(self.model, "config", None), "num_classes", None)

    @property
    def schedule(self) -> samplers.FlowSchedule:
        return samplers.FlowSchedule(self.config.time_scale, self.config.shift)

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

    def loss(self, x0, model_kwargs=None, *, t=None, noise=None, generator=None):
        """The flow-matching loss of the network on clean x0 (conditioning already dropped)."""
        c = self.config
        return self.flow_loss_fn(self.model, x0, t=t, noise=noise, timestep_sampling=c.timestep_sampling,
                                 logit_mean=c.logit_mean, logit_std=c.logit_std, time_scale=c.time_scale,
                                 model_kwargs=model_kwargs, generator=generator)

    def training_loss(self, batch, step=None):
        x, y, context = self._unpack(batch)
        if tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(f"images of shape {tuple(x.shape[1:])} given to a flow model "
                             f"configured for {self.config.image_shape}")
        y, context = cfg_dropout(self.config.cond_drop_prob if self.training else 0.0, y, context,
                                 null_y=self.num_classes)
        kwargs = {k: v for k, v in (("y", y), ("context", context)) if v is not None}
        return dict(loss=self.loss(x, kwargs))

    # -- sampling -----------------------------------------------------------------------

    def denoiser(self, y=None, context=None, guidance_scale=None, null_context=None):
        """model_fn(x, time) -> the (guided) velocity v_u + w (v_c - v_u)."""
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        return guided_model_fn(self.model, y=y, context=context, guidance_scale=w, null_y=self.num_classes,
                               null_context=null_context, guidance=self.guidance_fn)

    def make_grid(self, steps=None, grid=None) -> samplers.Grid:
        """The sampling grid: config.grid ("flow": uniform in t, shifted; "karras") of
        `steps` points (config.sample_steps by default), then t = 0."""
        c = self.config
        steps = steps or c.sample_steps
        grid = grid or c.grid
        if grid == "flow":
            return self.schedule.uniform(steps)
        if grid == "karras":
            return self.schedule.karras(steps)
        raise ValueError(f"unknown flow grid {grid!r}: use one of {FLOW_GRIDS}")

    @torch.no_grad()
    def sample_from(self, model_fn, x_T, *, sampler=None, steps=None, grid=None, clip_denoised=None,
                    generator=None, progress=False):
        """Run `sampler` on model_fn (a velocity function, e.g. self.denoiser(...)) from x_T.

        "euler" / "heun" integrate in t (on a Karras grid, "heun" is Karras et al.'s Heun in
        the VE view instead); "dpmsolver++" is DPM-Solver++(2M) on the same grid. All are
        deterministic (generator is accepted for the same call as GaussianDiffusion's).
        """
        c = self.config
        sampler = sampler or c.sampler
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampler!r}: use one of {FLOW_SAMPLERS}")
        clip = c.clip_denoised if clip_denoised is None else clip_denoised
        g = self.make_grid(steps, grid)
        kind = grid or c.grid
        if sampler == "dpmsolver++":
            # the state at the first point is x = (1 - t0) x0 + t0 eps: t0 x_T (exact at t0 = 1;
            # on a Karras grid, t0 = 0.988, taking x_T itself left the samples' std 4% too large)
            return samplers.dpm_solver_pp_2m(model_fn, x_T * float(g.sigmas[0]), g, self.schedule.to_x0,
                                             clip_denoised=clip, progress=progress)
        if kind == "karras":
            # Karras et al.'s Euler/Heun in the VE view; it starts from x~ = s_max x_T
            return samplers.heun(model_fn, x_T, g, self.schedule.to_x0, euler=sampler == "euler",
                                 clip_denoised=clip, progress=progress)
        return flow_sample(model_fn, x_T, g, sampler=sampler, clip_denoised=clip, euler_step=self.euler_step_fn,
                           progress=progress)

    def _labels(self, n, y):
        if y is None:
            return None
        if not torch.is_tensor(y):
            y = torch.full((n,), int(y), dtype=torch.long)
        return y.to(self._anchor.device)

    @torch.no_grad()
    def sample(self, n, y=None, context=None, *, guidance_scale=None, steps=None, sampler=None, grid=None,
               x_T=None, generator=None, progress=False):
        """n samples, shape (n, *config.image_shape). y: (n,) class ids or one int; context:
        (n, M, D). Defaults (sampler, steps, grid, guidance) come from the config."""
        c = self.config
        if x_T is None:
            x_T = torch.randn((n, *c.image_shape), generator=generator,
                              device=self._anchor.device if generator is None else generator.device)
        if tuple(x_T.shape) != (n, *c.image_shape):
            raise ValueError(f"x_T must have shape {(n, *c.image_shape)}, got {tuple(x_T.shape)}")
        with _eval_mode(self):
            return self.sample_from(self.denoiser(self._labels(n, y), context, guidance_scale),
                                    x_T.to(self._anchor.device), sampler=sampler, steps=steps, grid=grid,
                                    progress=progress)

    def sample_images(self, n, guidance=None, steps=None, sampler=None):
        """Samples cycling through the classes: fit's periodic grids and `minigen sample`."""
        y = torch.arange(n) % self.num_classes if self.num_classes else None
        return self.sample(n, y=y, guidance_scale=guidance, steps=steps, sampler=sampler)


def build(config_overrides=None, image_shape=(3, 32, 32), num_classes=None):
    """The CLI's constructor: a FlowMatching model for images of image_shape.

    config_overrides: a flat dict of FlowConfig fields and the fields of the backbone's
    config (UNetConfig, or DiTConfig with backbone="dit"), e.g. {"backbone": "dit",
    "hidden_size": 96, "timestep_sampling": "uniform"}; num_classes (from the dataset) makes
    the model class-conditional with classifier-free guidance.
    """
    backbone, fargs, bconfig = split_backbone_overrides(
        config_overrides, {f.name for f in fields(FlowConfig)}, image_shape=image_shape,
        num_classes=num_classes, what="flow")
    fargs.setdefault("image_shape", tuple(image_shape))
    config = FlowConfig(**fargs, backbone=backbone, **{backbone: bconfig})
    return FlowMatching(None, config)


__all__ = ["FlowConfig", "FlowMatching", "build", "build_backbone", "flow_path", "flow_target",
           "flow_matching_loss", "sample_timesteps", "velocity_to_x0", "velocity_to_eps", "euler_step",
           "flow_sample", "TIMESTEP_SAMPLING", "FLOW_SAMPLERS"]
