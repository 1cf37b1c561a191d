"""Fast ODE samplers for every minigen model: DPM-Solver++ (2M) and Heun on Karras sigmas.

DDPM needs ~1000 network evaluations and DDIM ~50. Both are (stochastic or deterministic)
discretisations of one probability-flow ODE; higher-order solvers of that ODE reach the
same quality in 10-20 evaluations. This module holds two of them, written once for every
kind of model minigen trains:

    an eps-, v- or x0-predicting diffusion model  (minigen.diffusion, minigen.ldm)
    a flow-matching model predicting eps - x0      (minigen.flow)

Every such model defines a path x_t = alpha_t x0 + sigma_t eps and, through its output, a
denoiser x0_hat(x_t, t). The solvers only need, at each point of a time grid, the pair
(alpha, sigma), the network's time input and the conversion output -> x0_hat:

    VP diffusion   alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t); network time = t (0..T-1)
    flow (SD3)     alpha = 1 - t,        sigma = t;                 network time = 1000 t

In the "VE view" (Karras et al. 2022) the state is x~ = x_t / alpha and the noise level is
s = sigma / alpha; every path above is then x~ = x0 + s eps, the same ODE

    dx~/ds = (x~ - x0_hat(x~, s)) / s                                   (EDM eq. 3)

and a model differs from another only in how s maps to its network time. A `Grid` holds
the points a sampler visits: alphas, sigmas (the last point is alpha = 1, sigma = 0, the
clean image) and the network times of all but the last point.

Solvers (both deterministic):

* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
  Diffusion Probabilistic Models", Algorithm 2), with lambda = log(alpha / sigma) and
  h = lambda_next - lambda:
      first order   x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D0
      second order  x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (D0 + D1 / 2),
                    D0 = x0_hat now, D1 = (x0_hat now - x0_hat before) / r, r = h_prev / h
  ("midpoint" form, diffusers' solver_type="midpoint"). The first step has no history and
  is first order (which is exactly DDIM); so is the last step to sigma = 0, where h = inf
  and the second-order term diverges -- diffusers' lower_order_final / final_sigmas_type
  "zero". One network evaluation per step.
* Heun (Karras et al. 2022, Algorithm 1 with S_churn = 0) on the VE view: an Euler step
  from s to s_next with d = (x~ - x0_hat) / s, then the trapezoidal correction with the
  slope at s_next, except on the last step (s_next = 0), which stays Euler. 2 steps - 1
  network evaluations. Its default grid is Karras et al.'s
      s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,   rho = 7,
  denser at low noise, followed by 0.

Both are guidance-aware in the simplest way: they call a guided model_fn (e.g.
minigen.diffusion.guided_model_fn). Classifier-free guidance combines the network's
outputs linearly, and x0_hat is affine in the output with the same coefficients for both
halves, so guiding eps, v or the velocity is guiding x0_hat.

Conventions follow diffusers' DPMSolverMultistepScheduler (algorithm_type="dpmsolver++",
solver_order=2) and HeunDiscreteScheduler (use_karras_sigmas=True); tests/
test_samplers.py checks both against trajectories recorded from diffusers
(scripts/make_sampler_fixtures.py). DDIM stays in minigen.diffusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLERS = ("dpmsolver++", "heun")  # the ODE solvers of this module (DDPM/DDIM: minigen.diffusion)
DPM_SPACINGS = ("linspace", "leading", "trailing")
DEFAULT_STEPS = {"dpmsolver++": 20, "heun": 10}
# Heun's Karras grid for a diffusion model starts at min(the schedule's largest noise level,
# this) -- Karras et al.'s sigma_max. The cosine schedule's last beta (0.999) puts its
# largest s at 2e4: a 3-point Karras grid from there visits 2e4, 378, 0.016, and the
# reference DDPM and LDM (both cosine) came out as noise (FD 100 against DDIM's 15 at 5
# evaluations, benchmarks/sampler_nfe.py). diffusers' HeunDiscreteScheduler starts at the
# schedule's top; VPSchedule.karras(sigma_max=None) does too (the conformance fixtures).
KARRAS_SIGMA_MAX = 80.0


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of `steps` steps of `sampler` (Heun: 2 per step but the last)."""
    if sampler == "heun":
        return 2 * steps - 1
    if sampler in ("dpmsolver++", "ddim", "euler", "ddpm"):
        return steps
    raise ValueError(f"unknown sampler {sampler!r}")


# --------------------------------------------------------------------------------------
# grids


@dataclass
class Grid:
    """The points a sampler visits, noisiest first; float64 tensors.

    alphas, sigmas: (K + 1,), the last point alpha = 1, sigma = 0 (the clean image);
    times: (K,) the network's time input at the first K points.
    """

    alphas: torch.Tensor
    sigmas: torch.Tensor
    times: torch.Tensor

    def __post_init__(self):
        if not (len(self.alphas) == len(self.sigmas) == len(self.times) + 1 >= 2):
            raise ValueError("a Grid needs K + 1 >= 2 alphas and sigmas and K network times")
        if float(self.sigmas[-1]) != 0.0 or float(self.alphas[-1]) != 1.0:
            raise ValueError("a Grid must end at the clean image (alpha = 1, sigma = 0)")
        if bool((self.alphas[:-1] < 0).any()) or bool((self.sigmas[:-1] <= 0).any()):
            raise ValueError("a Grid's noisy points need alpha >= 0 and sigma > 0")

    def __len__(self):
        return len(self.times)

    @property
    def ve_sigmas(self) -> torch.Tensor:
        """s = sigma / alpha (inf where alpha = 0): the noise level of the VE view."""
        return self.sigmas / self.alphas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, uniform in s^(1/rho) (Karras et al.
    2022, eq. 5), float64. rho = 7 spends most steps at low noise."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"the number of Karras sigmas must be an int >= 1, got {n!r}")
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class VPSchedule:
    """A discrete VP diffusion model (alphas_cumprod of its T training steps) in the view
    the solvers need. Its VE noise levels are s_t = sqrt((1 - abar_t) / abar_t); a
    continuous s is mapped to a fractional timestep by linear interpolation of log s
    between the two neighbouring training steps (diffusers' _sigma_to_t, k-diffusion)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v", "x0"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'v' or 'x0'")
        ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if ab.ndim != 1 or len(ab) < 2:
            raise ValueError("alphas_cumprod must be a 1-d tensor of at least 2 steps")
        self.alphas_cumprod = ab
        self.prediction_type = prediction_type
        self.sigmas = ((1 - ab) / ab).sqrt()  # increasing with t
        self.log_sigmas = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, s: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps of VE noise levels s (float64)."""
        log_s = torch.as_tensor(s, dtype=torch.float64).clamp(min=1e-10).log()
        T = self.num_timesteps
        low = (torch.searchsorted(self.log_sigmas, log_s, right=True) - 1).clamp(0, T - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_s) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def _grid_from_ve(self, s: torch.Tensor, times: torch.Tensor) -> Grid:
        alphas = 1 / (1 + s**2).sqrt()
        return Grid(torch.cat([alphas, alphas.new_ones(1)]), torch.cat([s * alphas, s.new_zeros(1)]),
                    times.to(torch.float64))

    def spaced(self, steps: int, spacing: str = "trailing") -> Grid:
        """The grid of `steps` training timesteps (DPM-Solver++), then the clean image."""
        t = dpm_timesteps(self.num_timesteps, steps, spacing)
        ab = self.alphas_cumprod[t]
        return Grid(torch.cat([ab.sqrt(), ab.new_ones(1)]), torch.cat([(1 - ab).sqrt(), ab.new_zeros(1)]),
                    t.to(torch.float64))

    def karras(self, steps: int, rho: float = 7.0, sigma_min: float | None = None,
               sigma_max: float | None = None) -> Grid:
        """Karras sigmas between the training schedule's smallest and largest noise
        levels (unless given), at fractional timesteps (HeunDiscreteScheduler's grid)."""
        s = karras_sigmas(steps, sigma_min or self.sigma_min, sigma_max or self.sigma_max, rho)
        return self._grid_from_ve(s, self.timestep(s))

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """x0_hat from the network's output at x_t = alpha x0 + sigma eps."""
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        if self.prediction_type == "v":  # v = alpha eps - sigma x0
            return alpha * x - sigma * out
        return out


class FlowSchedule:
    """The straight path of flow matching, x_t = (1 - t) x0 + t eps (minigen.flow), in the
    view the solvers need: alpha = 1 - t, sigma = t, VE noise level s = t / (1 - t), and
    the network sees time_scale * t. The output is the velocity v = eps - x0, so
    x0_hat = x_t - t v."""

    def __init__(self, time_scale: float = 1000.0, shift: float = 1.0):
        if not shift > 0:
            raise ValueError(f"the time shift must be > 0, got {shift}")
        self.time_scale, self.shift = float(time_scale), float(shift)

    # Karras et al.'s range for images in [-1, 1] (t = 0.002 ... 0.988): a wider one (s up
    # to 999) spread 20 points so thinly over the data's scale that a Gaussian toy came out
    # with a 10% too large std; starting at t = 0.988 ignores only 0.012 x0 of the path
    sigma_min, sigma_max = 0.002, 80.0

    def _grid(self, t: torch.Tensor) -> Grid:
        t = t.to(torch.float64)
        return Grid(torch.cat([1 - t, t.new_ones(1)]), torch.cat([t, t.new_zeros(1)]), t * self.time_scale)

    def uniform(self, steps: int, t_max: float = 1.0) -> Grid:
        """`steps` points t_i = shift(t_max (1 - i/steps)), i < steps, then t = 0: uniform in
        t before Stable Diffusion 3's shift t' = s t / (1 + (s - 1) t)."""
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"the number of flow steps must be an int >= 1, got {steps!r}")
        t = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)[:-1]
        return self._grid(shift_time(t, self.shift))

    def from_times(self, t) -> Grid:
        """A grid of explicit flow times (descending, in (0, 1], without the final 0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim != 1 or not len(t) or bool((t <= 0).any() or (t > 1).any()) or bool((t[1:] >= t[:-1]).any()):
            raise ValueError("flow times must be a descending 1-d sequence in (0, 1] (the final 0 is added)")
        return self._grid(t)

    def karras(self, steps: int, rho: float = 7.0, sigma_min: float | None = None,
               sigma_max: float | None = None) -> Grid:
        """Karras sigmas of the VE view, s in [0.002, 80] unless given (t in [0.002, 0.988])."""
        s = karras_sigmas(steps, sigma_min or self.sigma_min, sigma_max or self.sigma_max, rho)
        return self._grid(s / (1 + s))

    @staticmethod
    def to_x0(out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        return x - sigma * out  # sigma = t on the straight path


def shift_time(t, shift: float):
    """Stable Diffusion 3's time shift t' = s t / (1 + (s - 1) t): s > 1 spends more of the
    grid at high noise (t' >= t), s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def dpm_timesteps(T: int, N: int, spacing: str = "trailing") -> torch.Tensor:
    """The N training timesteps (descending, int64) DPM-Solver++ evaluates the network at,
    as diffusers' DPMSolverMultistepScheduler spaces them; the clean image follows.

    "trailing": round(arange(T, 0, -T/N)) - 1, e.g. 999, 979, ..., 19 (as DDIM's trailing);
    "linspace": round(linspace(0, T-1, N+1)) reversed, without the final 0;
    "leading":  arange(N+1) * (T // (N+1)) reversed, without the final 0.
    (DDIM's "linspace" and "leading" take N points ending at 0 instead: DDIM steps to
    abar_prev = 1 from the last one, DPM-Solver++ appends sigma = 0 itself.)
    """
    if not (isinstance(N, int) and 1 <= N <= T):
        raise ValueError(f"number of sampling steps must be an int in [1, {T}], got {N!r}")
    if spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / N, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, T - 1, N + 1, dtype=torch.float64)).flip(0)[:-1]
    elif spacing == "leading":
        ts = (torch.arange(N + 1, dtype=torch.float64) * (T // (N + 1))).flip(0)[:-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {DPM_SPACINGS}")
    return ts.long()


# --------------------------------------------------------------------------------------
# the solvers


def _progress(it, progress, desc):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


def _call(model_fn, x, time):
    out = model_fn(x, torch.full((x.shape[0],), float(time), dtype=torch.float32, device=x.device))
    if out.shape != x.shape:
        raise ValueError(f"the model's output {tuple(out.shape)} does not match its input {tuple(x.shape)}")
    return out


def _x0(model_fn, to_x0, x, grid, i, clip):
    a, s = grid.alphas[i].item(), grid.sigmas[i].item()
    x0 = to_x0(_call(model_fn, x, grid.times[i]), x, a, s)
    return x0.clamp(-1, 1) if clip else x0


def dpm_solver_pp_2m_step(x, x0_pred, prev_x0_pred, alpha, sigma, alpha_next, sigma_next, alpha_prev=None,
                          sigma_prev=None):
    """One DPM-Solver++(2M) update from the point (alpha, sigma) to (alpha_next, sigma_next).

    x0_pred: the denoiser's x0_hat at x; prev_x0_pred: its x0_hat at the previous point
    (alpha_prev, sigma_prev), or None. With lambda = log(alpha / sigma), h = lambda_next -
    lambda and r = h_prev / h = (lambda - lambda_prev) / h:

        D = x0_pred                                          (first order: no history, or sigma_next = 0)
        D = x0_pred + (x0_pred - prev_x0_pred) / (2 r)      (second order)
        x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D

    e^-h = (sigma_next alpha) / (alpha_next sigma) is 0 at the last step (sigma_next = 0),
    where x_next = alpha_next D, without inf - inf. Scalars are Python floats.
    """
    exp_neg_h = (sigma_next * alpha) / (alpha_next * sigma)
    d = x0_pred
    if prev_x0_pred is not None and sigma_next > 0:
        lam, lam_prev, lam_next = (math.log(alpha / sigma), math.log(alpha_prev / sigma_prev),
                                   math.log(alpha_next / sigma_next))
        r = (lam - lam_prev) / (lam_next - lam)  # h_prev / h
        d = x0_pred + 0.5 * (x0_pred - prev_x0_pred) / r
    return (sigma_next / sigma) * x + alpha_next * (1 - exp_neg_h) * d


@torch.no_grad()
def dpm_solver_pp_2m(model_fn, x_T, grid: Grid, to_x0, *, clip_denoised=False, progress=False, callback=None,
                     step=dpm_solver_pp_2m_step):
    """DPM-Solver++(2M) from x_T (the state at grid point 0, e.g. N(0, I) noise) to the
    clean sample. to_x0(out, x, alpha, sigma) turns the network's output into x0_hat
    (VPSchedule.to_x0, FlowSchedule.to_x0); clip_denoised clamps x0_hat to [-1, 1]
    (static thresholding, pixel space only). The first step (no history) and the last
    (to sigma = 0) are first order. callback(i, x) sees the state after every step.
    step: the update (dpm_solver_pp_2m_step's signature; a lesson passes the learner's own).
    It gets no history after a point with alpha = 0 (flow at t = 1, lambda = -inf).
    """
    a, s = grid.alphas.tolist(), grid.sigmas.tolist()
    K = len(grid)
    x, prev = x_T, None
    for i in _progress(range(K), progress, "dpmsolver++"):
        d0 = _x0(model_fn, to_x0, x, grid, i, clip_denoised)
        has_history = prev is not None and a[i - 1] > 0
        x = step(x, d0, prev if has_history else None, a[i], s[i], a[i + 1], s[i + 1],
                 a[i - 1] if has_history else None, s[i - 1] if has_history else None)
        prev = d0
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def heun(model_fn, x_T, grid: Grid, to_x0, *, clip_denoised=False, euler=False, progress=False, callback=None):
    """Heun's method on the VE view (Karras et al. 2022, Algorithm 1, S_churn = 0); euler=True
    drops the correction (then one evaluation per step; equal to DDIM).

    x_T is N(0, I) noise; the VE state starts at x~ = s_0 x_T (EDM, and diffusers'
    init_noise_sigma for this grid). The network sees x_t = alpha x~ at each point.
    Returns the clean sample x~ at s = 0. Needs alpha > 0 at every grid point.
    """
    if bool((grid.alphas <= 0).any()):
        raise ValueError("Heun on the VE view needs alpha > 0 at every point (s < inf): use a Karras grid")
    s = grid.ve_sigmas.tolist()
    a = grid.alphas.tolist()
    K = len(grid)

    def slope(x, i):
        x0 = _x0(model_fn, to_x0, a[i] * x, grid, i, clip_denoised)
        return (x - x0) / s[i]

    x = x_T * s[0]
    for i in _progress(range(K), progress, "heun" if not euler else "euler"):
        d = slope(x, i)
        x_next = x + (s[i + 1] - s[i]) * d
        if not euler and s[i + 1] > 0:
            x_next = x + (s[i + 1] - s[i]) * 0.5 * (d + slope(x_next, i + 1))
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


# --------------------------------------------------------------------------------------
# one entry point for the diffusion models


@torch.no_grad()
def diffusion_sample(model_fn, x_T, alphas_cumprod, *, sampler="dpmsolver++", steps=None,
                     prediction_type="epsilon", clip_denoised=True, spacing="trailing", rho=7.0,
                     sigma_max=KARRAS_SIGMA_MAX, progress=False):
    """Sample a VP diffusion model (model_fn(x_t, t) -> eps / v / x0, guided or not) with
    "dpmsolver++" (`steps` evaluations on the `spacing` grid) or "heun" (`steps` Karras
    sigmas from min(sigma_max, the schedule's top) down to its bottom, 2 steps - 1
    evaluations; sigma_max=None: the schedule's top, as diffusers). Returns the sample,
    shaped like x_T."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown ODE sampler {sampler!r}: use one of {SAMPLERS}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    sched = VPSchedule(alphas_cumprod, prediction_type)
    if sampler == "dpmsolver++":
        return dpm_solver_pp_2m(model_fn, x_T, sched.spaced(steps, spacing), sched.to_x0,
                                clip_denoised=clip_denoised, progress=progress)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"the number of Heun steps must be an int >= 1, got {steps!r}")
    top = sched.sigma_max if sigma_max is None else min(float(sigma_max), sched.sigma_max)
    return heun(model_fn, x_T, sched.karras(steps, rho, sigma_max=top), sched.to_x0, clip_denoised=clip_denoised,
                progress=progress)


__all__ = ["SAMPLERS", "DEFAULT_STEPS", "KARRAS_SIGMA_MAX", "Grid", "VPSchedule", "FlowSchedule", "shift_time", "karras_sigmas", "dpm_timesteps",
           "dpm_solver_pp_2m", "dpm_solver_pp_2m_step", "heun", "diffusion_sample", "nfe"]
