"""Checks for lesson 09 (flow matching, ODE steps, adaLN-Zero, DPM-Solver++(2M)).

Each check calls the learner's function or class on fresh seeded random inputs and compares
it with a reference written here in float64 (never minigen.flow, minigen.dit or
minigen.samplers). Wrong answers that match a typical mistake get a "Likely mistake" line.

Conventions checked (Stable Diffusion 3 / diffusers; minigen.flow, minigen.samplers):

    x_t = (1 - t) x0 + t eps,  target = eps - x0,  loss = mean (model(x_t, time_scale t) - target)^2
    t ~ sigmoid(logit_mean + logit_std z) ("logit_normal") or U(0, 1) ("uniform")
    Euler   x_next = x + (t_next - t) v(x, t)
    Heun    x_e = Euler;  x_next = x + (t_next - t) (v(x, t) + v(x_e, t_next)) / 2;  Euler when t_next = 0
    adaLN-Zero block  x += gate_msa * attn(LN(x) (1 + scale_msa) + shift_msa)
                      x += gate_mlp * mlp(LN(x) (1 + scale_mlp) + shift_mlp)
                      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = Linear(SiLU(c)),
                      that Linear zero-initialised
    DPM-Solver++(2M)  lambda = log(alpha / sigma), h = lambda_next - lambda, r = h_prev / h
                      D = x0_pred (first step, last step) or x0_pred + (x0_pred - prev_x0_pred) / (2 r)
                      x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D
"""

from __future__ import annotations

import math

import torch

from minigen.course.checks._framework import CheckFailed, Exercise, checker, seeded, show_hint

__all__ = ["hint", "flow_matching_loss", "euler_step", "heun_step", "dit_block", "dpm_solver_pp_2m_step",
           "flow_matching_loss_hidden", "euler_step_hidden", "dpm_solver_pp_2m_step_hidden"]


def _b(t, x):
    """(N,) times as float64 (N, 1, ..., 1) for broadcasting against x."""
    return t.double().view(-1, *([1] * (x.dim() - 1)))


class _Recorder:
    """A stand-in velocity network: out = w * x + 0.3 sin(time / 300), with one learnable
    scalar w (so the loss has a gradient); it records every call."""

    def __init__(self, ex, g):
        self.ex = ex
        self.w = torch.tensor(0.7, requires_grad=True)
        self.calls = []

    def __call__(self, x, time, **kwargs):
        if not isinstance(x, torch.Tensor):
            self.ex.fail(f"your loss called the model with x of type {type(x).__name__}; pass the noisy images x_t")
        time_t = torch.as_tensor(time)
        self.calls.append((x.detach().clone(), time_t.detach().clone(), kwargs))
        tb = time_t.float().reshape(-1, *([1] * (x.dim() - 1))) if time_t.dim() else time_t.float()
        return self.w * x + 0.3 * torch.sin(tb / 300.0)

    def out64(self, x, time):
        return 0.7 * x.double() + 0.3 * torch.sin(_b(torch.as_tensor(time), x) / 300.0)


# ---------------------------------------------------------------------------- 9.1
@checker
def flow_matching_loss(fn) -> None:
    """Exercise 9.1: the conditional flow-matching loss, with given and with sampled t and noise."""
    ex = Exercise("9.1", "flow_matching_loss")
    g = torch.Generator().manual_seed(91)

    # (a) t and noise given: x_t, the time the network sees, the target, the mean square; any x0 shape
    for shape, time_scale in (((6, 3, 8, 8), 1000.0), ((5, 2, 7), 500.0), ((7, 1, 5, 6), 1.0)):
        n = shape[0]
        x0 = torch.rand(shape, generator=g) * 2 - 1
        noise = torch.randn(shape, generator=g)
        t = torch.rand(n, generator=g) * 0.9 + 0.05
        y = torch.randint(0, 18, (n,), generator=g)
        rec = _Recorder(ex, g)
        before = (x0.clone(), noise.clone(), t.clone())
        loss = ex.call(fn, rec, x0, t=t, noise=noise, time_scale=time_scale, model_kwargs={"y": y})
        case = f" (x0 {tuple(shape)}, t and noise given, time_scale={time_scale:g})"
        loss = ex.tensor(loss, what="the loss" + case)
        if loss.dim() != 0:
            ex.fail(f"the loss{case} has shape {tuple(loss.shape)}; return one number (a 0-dim tensor), "
                    "the mean over every image and pixel", mistake="average with .mean() (or F.mse_loss)")
        if not (torch.equal(x0, before[0]) and torch.equal(noise, before[1]) and torch.equal(t, before[2])):
            ex.fail("your function changed x0, noise or t in place; compute new tensors instead")
        if len(rec.calls) != 1:
            ex.fail(f"your loss called the model {len(rec.calls)} times{case}; call it once, on x_t")
        x_in, time_in, kw = rec.calls[0]
        if "y" not in kw or not torch.equal(torch.as_tensor(kw["y"]), y):
            ex.fail("the model did not receive model_kwargs: call model(x_t, time, **model_kwargs) "
                    "(the class labels travel in model_kwargs)")
        tb = _b(t, x0)
        x_t = (1 - tb) * x0.double() + tb * noise.double()
        ex.close(ex.tensor(x_in, shape=shape, what="the x_t your loss gave the model" + case), x_t, atol=1e-5,
                 what="the x_t your loss gave the model" + case, mistakes=[
                     (tb * x0.double() + (1 - tb) * noise.double(),
                      "the time runs the wrong way: in this convention (Stable Diffusion 3) t = 0 is the data "
                      "and t = 1 pure noise, x_t = (1 - t) x0 + t eps"),
                     ((1 - tb).sqrt() * x0.double() + tb.sqrt() * noise.double(),
                      "that is a variance-preserving path with square roots; flow matching's path is the "
                      "straight line x_t = (1 - t) x0 + t eps"),
                     (x0.double() + tb * noise.double(), "the data term must shrink as t grows: x_t = (1 - t) x0 + t eps"),
                 ])
        time_in = torch.as_tensor(time_in).double().reshape(-1)
        if time_in.numel() == 1:
            time_in = time_in.expand(n)
        ex.close(ex.tensor(time_in, shape=(n,), what="the time your loss gave the model" + case),
                 t.double() * time_scale, atol=1e-4, rtol=1e-5, what="the time your loss gave the model" + case,
                 mistakes=[(t.double(), "the network sees time_scale * t (the sinusoidal embedding needs "
                                        "DDPM-like magnitudes): pass t * time_scale"),
                           (t.double() * 1000.0, "the time scale is fixed at 1000: use the time_scale argument"),
                           ((1 - t.double()) * time_scale, "the time runs the wrong way: pass t * time_scale")])
        out = rec.out64(x_t, t.double() * time_scale)
        target = noise.double() - x0.double()

        def mse(o, tg):
            return ((o - tg) ** 2).mean()

        ex.close(loss, mse(out, target), atol=1e-5, rtol=1e-5, what="the loss" + case, mistakes=[
            (mse(out, -target), "the target has the wrong sign: the velocity of x_t = (1 - t) x0 + t eps is "
                                "d x_t / dt = eps - x0, not x0 - eps"),
            (mse(out, noise.double()), "the target is eps (DDPM's); flow matching regresses the velocity eps - x0"),
            (mse(out, x0.double()), "the target is x0; flow matching regresses the velocity eps - x0"),
            (((out - target) ** 2).sum(), "the loss is summed; take the mean over every image and pixel"),
            ((out - target).abs().mean(), "that is an L1 loss; flow matching uses the mean squared error"),
        ])
        if loss.requires_grad:
            ex.call(loss.backward)
        if not loss.requires_grad or rec.w.grad is None or not torch.isfinite(rec.w.grad) or float(rec.w.grad) == 0:
            ex.fail("no gradient reaches the model's parameters through your loss: avoid .detach(), .item() "
                    "or torch.no_grad() on the model's output")

    # (b) t drawn: logit-normal with the given mean and std, or uniform; noise drawn N(0, I)
    n = 4000
    x0 = torch.rand(n, 1, 2, 2, generator=g) * 2 - 1
    for method, m, s in (("logit_normal", 0.4, 0.8), ("logit_normal", -0.3, 1.3), ("uniform", 0.0, 1.0)):
        rec = _Recorder(ex, g)
        kw = dict(timestep_sampling=method, time_scale=1000.0)
        if method == "logit_normal":
            kw.update(logit_mean=m, logit_std=s)
        with seeded(910):
            ex.call(fn, rec, x0, **kw)
        case = f" (t=None, timestep_sampling={method!r}" + (f", logit_mean={m}, logit_std={s})" if method != "uniform" else ")")
        if len(rec.calls) != 1:
            ex.fail(f"your loss called the model {len(rec.calls)} times{case}; call it once, on the whole batch")
        x_in, time_in, _ = rec.calls[0]
        tt = torch.as_tensor(time_in).double().reshape(-1) / 1000.0
        if tt.numel() != n:
            ex.fail(f"with t=None your loss gave the model {tt.numel()} times for {n} images; draw one t per image")
        if bool((tt <= 0).any() or (tt >= 1).any()):
            ex.fail(f"the times drawn{case} should lie strictly inside (0, 1); got [{float(tt.min()):.3g}, "
                    f"{float(tt.max()):.3g}]")
        logit = torch.log(tt / (1 - tt))
        lm, ls = float(logit.mean()), float(logit.std())
        u_mean, u_std = float(tt.mean()), float(tt.std())
        if method == "logit_normal":
            wrong = [(0.0, math.pi / math.sqrt(3), "you drew t uniformly; with timestep_sampling='logit_normal' "
                      "draw t = sigmoid(logit_mean + logit_std * z), z ~ N(0, 1)")]
            if (m, s) != (0.0, 1.0):
                wrong.append((0.0, 1.0, "logit_mean and logit_std are ignored (you used 0 and 1): "
                                        "t = sigmoid(logit_mean + logit_std * z)"))
            ex.statistic(ls, s, s / math.sqrt(2 * n), n=n, what="the std of logit(t)" + case,
                         mistakes=[(b, e) for _, b, e in wrong])
            ex.statistic(lm, m, s / math.sqrt(n), n=n, what="the mean of logit(t)" + case,
                         mistakes=[(a, e) for a, _, e in wrong])
        else:
            ex.statistic(u_std, 1 / math.sqrt(12), 0.3 / math.sqrt(n), n=n, what="the std of t" + case,
                         mistakes=[(0.21, "you drew t logit-normally; with timestep_sampling='uniform' draw "
                                          "t = torch.rand(N)")])
            ex.statistic(u_mean, 0.5, 0.29 / math.sqrt(n), n=n, what="the mean of t" + case)
        # the noise the loss drew: eps = (x_t - (1 - t) x0) / t
        eps = (x_in.double() - (1 - _b(tt, x0)) * x0.double()) / _b(tt, x0)
        ex.mean_std(eps, 0.0, 1.0, what="the noise your loss drew (recovered from x_t and t)" + case)

    # (c) the generator: the same seeded generator gives the same t and noise, whatever the global RNG
    draws = []
    for global_seed in (1, 2):
        rec = _Recorder(ex, g)
        with seeded(global_seed):
            ex.call(fn, rec, x0[:64], generator=torch.Generator().manual_seed(5))
        draws.append(rec.calls[0][:2])
    if not (torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])):
        ex.fail("with the same generator= your loss drew different t or noise (it used the global random "
                "state)", mistake="pass generator=generator to torch.randn / torch.rand")
    ex.passed("x_t, the network's time, the target eps - x0, the mean square, logit-normal and uniform t, "
              "the noise, the generator")


@checker
def flow_matching_loss_hidden(fn) -> None:
    """Hidden test of 9.1: the end points t = 0 (x_t = x0) and t = 1 (x_t = noise), time_scale 1."""
    ex = Exercise("9.1", "flow_matching_loss", hidden=True)
    g = torch.Generator().manual_seed(911)
    x0, noise = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    rec = _Recorder(ex, g)
    loss = ex.tensor(ex.call(fn, rec, x0, t=t, noise=noise, time_scale=1.0), what="the loss")
    x_in = rec.calls[0][0]
    want = torch.where(_b(t, x0) > 0.5, noise, x0)
    ex.close(x_in, want, atol=1e-6, what="x_t at t = 0 (must be x0) and t = 1 (must be the noise)")
    out = rec.out64(want, t.double())
    ex.close(loss, ((out - (noise.double() - x0.double())) ** 2).mean(), atol=1e-5, rtol=1e-5,
             what="the loss at t in {0, 1}")


# ---------------------------------------------------------------------------- 9.2
def _euler64(x, t, t_next, v):
    return x.double() + (t_next - t) * v.double()


@checker
def euler_step(fn) -> None:
    """Exercise 9.2: x_next = x + (t_next - t) v, from t down to t_next < t."""
    ex = Exercise("9.2", "euler_step")
    g = torch.Generator().manual_seed(92)
    cases = [((4, 3, 8, 8), 1.0, 0.8), ((3, 2, 5), 0.55, 0.3), ((5, 1, 4, 4), 0.2, 0.0), ((2, 6), 0.9, 0.85)]
    for shape, t, t_next in cases:
        x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x0, v0 = x.clone(), v.clone()
        out = ex.tensor(ex.call(fn, x, t, t_next, v), shape=shape, dtype=torch.float32, what="x_next")
        if not (torch.equal(x, x0) and torch.equal(v, v0)):
            ex.fail("your step changed x or v in place; return a new tensor")
        case = f" (t = {t}, t_next = {t_next})"
        ex.close(out, _euler64(x, t, t_next, v), atol=1e-5, rtol=1e-5, what="x_next" + case, mistakes=[
            (_euler64(x, t_next, t, v), "the step goes the wrong way: from t to t_next < t the step is "
                                        "(t_next - t) v, a negative multiple of the velocity eps - x0"),
            (x.double() + t_next * v.double(), "the step size is t_next - t, not t_next"),
            (x.double() - t * v.double(), "x - t v is the x0 estimate, not a step to t_next: "
                                          "x_next = x + (t_next - t) v"),
            (x.double() + v.double(), "the velocity must be scaled by the step size t_next - t"),
        ])
    ex.passed("values for several step sizes and shapes, the last step to t = 0")


@checker
def euler_step_hidden(fn) -> None:
    """Hidden test of 9.2: float64 stays float64; a step of size 0 changes nothing."""
    ex = Exercise("9.2", "euler_step", hidden=True)
    g = torch.Generator().manual_seed(921)
    x, v = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    out = ex.tensor(ex.call(fn, x, 0.6, 0.25, v), shape=x.shape, dtype=torch.float64, what="x_next (float64)")
    ex.close(out, _euler64(x, 0.6, 0.25, v), atol=1e-12, what="x_next in float64")
    ex.close(ex.tensor(ex.call(fn, x, 0.5, 0.5, v), shape=x.shape, what="a step of size 0"), x, atol=1e-12,
             what="x_next for t_next = t (must be x)")


# ---------------------------------------------------------------------------- 9.3
class _Field:
    """A smooth, nonlinear velocity field v(x, t) = tanh(a x) (1 + t) + b t^2; records calls."""

    def __init__(self, ex, g, shape):
        self.ex = ex
        self.a = 0.5 + torch.rand(shape[1:], generator=g)
        self.b = torch.randn(shape[1:], generator=g)
        self.calls = []

    def __call__(self, x, t):
        if not isinstance(x, torch.Tensor):
            self.ex.fail(f"your step called velocity with x of type {type(x).__name__}")
        tf = float(t) if not isinstance(t, torch.Tensor) or t.numel() == 1 else None
        if tf is None:
            self.ex.fail("call velocity(x, t) with t a Python float (the flow time of that point), "
                         f"not a tensor of shape {tuple(t.shape)}")
        self.calls.append((x.detach().clone(), tf))
        return (torch.tanh(self.a * x) * (1 + tf) + self.b * tf**2).to(x.dtype)

    def v64(self, x, t):
        return torch.tanh(self.a.double() * x) * (1 + t) + self.b.double() * t**2


@checker
def heun_step(fn) -> None:
    """Exercise 9.3: one Heun step (Euler predictor, trapezoidal corrector; Euler alone to t = 0)."""
    ex = Exercise("9.3", "heun_step")
    g = torch.Generator().manual_seed(93)
    cases = [((4, 3, 6, 6), 1.0, 0.75), ((3, 5, 4), 0.6, 0.2), ((2, 2, 3, 3), 0.35, 0.3), ((3, 4, 4), 0.25, 0.0)]
    for shape, t, t_next in cases:
        field = _Field(ex, g, shape)
        x = torch.randn(shape, generator=g)
        x_before = x.clone()
        out = ex.tensor(ex.call(fn, field, x, t, t_next), shape=shape, dtype=torch.float32, what="x_next")
        if not torch.equal(x, x_before):
            ex.fail("your step changed x in place; return a new tensor")
        case = f" (t = {t}, t_next = {t_next})"
        xd, h = x.double(), t_next - t
        v1 = field.v64(xd, t)
        x_e = xd + h * v1
        if t_next == 0:
            if len(field.calls) != 1:
                ex.fail(f"your step called velocity {len(field.calls)} times on the last step{case}",
                        mistake="the last step, to t_next = 0, stays an Euler step (one evaluation; EDM's "
                                "Algorithm 1 never evaluates the network at the clean end point)"
                        if len(field.calls) == 2 else None)
            ex.close(out, x_e, atol=1e-5, rtol=1e-5, what="x_next on the last step" + case)
            continue
        v2 = field.v64(x_e, t_next)
        want = xd + h * 0.5 * (v1 + v2)
        mistakes = [
            (x_e, "that is an Euler step; Heun corrects it with the velocity at the Euler point: "
                  "x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2"),
            (xd + h * 0.5 * (v1 + field.v64(xd, t_next)),
             "the second velocity is taken at x, not at the Euler predictor x_euler = x + (t_next - t) v(x, t)"),
            (xd + h * field.v64(x_e, t_next), "the two slopes must be averaged: (v(x, t) + v(x_euler, t_next)) / 2"),
            (x_e + h * 0.5 * (v1 + v2), "the corrected step starts from x, not from the Euler point"),
            (xd + h * 0.5 * (v1 + field.v64(x_e, t)), "the second velocity is evaluated at time t_next, "
                                                       "where the Euler point lies"),
            (xd + h * field.v64(xd + 0.5 * h * v1, t + 0.5 * h), "that is the midpoint method; Heun's method "
                                                                  "averages the slopes at both ends"),
        ]
        if len(field.calls) != 2:
            ex.fail(f"your step called velocity {len(field.calls)} times{case}; Heun evaluates it twice: at "
                    "(x, t) and at the Euler point (x_euler, t_next)",
                    mistake="that is an Euler step; Heun corrects it with the velocity at the Euler point"
                    if len(field.calls) == 1 and torch.allclose(out.double(), x_e, atol=1e-5) else None)
        ex.close(out, want, atol=1e-5, rtol=1e-5, what="x_next" + case, mistakes=mistakes)
    ex.passed("predictor, trapezoidal corrector, two evaluations per step and one on the last")


# ---------------------------------------------------------------------------- 9.4
def _dit_keys(dim, mlp_ratio):
    hidden = int(dim * mlp_ratio)
    return {"attn.to_q.weight": (dim, dim), "attn.to_k.weight": (dim, dim), "attn.to_v.weight": (dim, dim),
            "attn.to_out.0.weight": (dim, dim), "attn.to_out.0.bias": (dim,),
            "mlp.0.weight": (hidden, dim), "mlp.0.bias": (hidden,), "mlp.3.weight": (dim, hidden),
            "mlp.3.bias": (dim,), "adaLN_modulation.1.weight": (6 * dim, dim), "adaLN_modulation.1.bias": (6 * dim,)}


def _ln64(x):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def _attn64(x, sd, heads):
    n, length, d = x.shape
    dh = d // heads

    def split(z):
        return z.view(n, length, heads, dh).transpose(1, 2)

    q, k, v = (split(x @ sd[f"attn.to_{c}.weight"].double().T) for c in "qkv")
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(n, length, d)
    return out @ sd["attn.to_out.0.weight"].double().T + sd["attn.to_out.0.bias"].double()


def _mlp64(x, sd):
    h = x @ sd["mlp.0.weight"].double().T + sd["mlp.0.bias"].double()
    h = torch.nn.functional.gelu(h, approximate="tanh")
    return h @ sd["mlp.3.weight"].double().T + sd["mlp.3.bias"].double()


def _block64(x, c, sd, heads, *, one_plus=True, gates=True, swap=False, residual=True, norm=True):
    c = c.double()
    mod = torch.nn.functional.silu(c) @ sd["adaLN_modulation.1.weight"].double().T + sd["adaLN_modulation.1.bias"].double()
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=1))
    if swap:
        sh1, sc1, sh2, sc2 = sc1, sh1, sc2, sh2

    def modulate(z, shift, scale):
        z = _ln64(z) if norm else z.double()
        return z * ((1 + scale) if one_plus else scale) + shift

    x = x.double()
    a = _attn64(modulate(x, sh1, sc1), sd, heads)
    x = (x if residual else 0) + (g1 if gates else 1) * a
    m = _mlp64(modulate(x, sh2, sc2), sd)
    return (x if residual else 0) + (g2 if gates else 1) * m


@checker
def dit_block(cls) -> None:
    """Exercise 9.4: the adaLN-Zero transformer block (zero-initialised modulation, 1 + scale, gates)."""
    ex = Exercise("9.4", "DiTBlock")
    ex.callable(cls)
    g = torch.Generator().manual_seed(94)
    for dim, heads, mlp_ratio, n, length in ((32, 4, 4.0, 3, 10), (24, 3, 2.0, 2, 7)):
        case = f" (dim={dim}, num_heads={heads}, mlp_ratio={mlp_ratio})"
        block = ex.call(cls, dim, heads, mlp_ratio=mlp_ratio)
        sd = ex.call(block.state_dict)
        want = _dit_keys(dim, mlp_ratio)
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != want:
            extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            ex.fail(f"the block's parameters{case} are not the ones the exercise's __init__ builds "
                    f"(extra: {extra or 'none'}, missing: {missing or 'none'}, or other shapes); keep the given "
                    "layers and only add the zero initialisation")
        w, b = sd["adaLN_modulation.1.weight"], sd["adaLN_modulation.1.bias"]
        if bool(w.any()) or bool(b.any()):
            ex.fail(f"a freshly built block{case} has a non-zero adaLN_modulation Linear",
                    mistake="adaLN-Zero: initialise the weight and the bias of adaLN_modulation's Linear to zero "
                            "(nn.init.zeros_) in __init__, so every shift, scale and gate starts at 0")
        others = [k for k in want if not k.startswith("adaLN") and k.endswith("weight")]
        if not all(bool(sd[k].any()) for k in others):
            ex.fail(f"a freshly built block{case} has zero attention or MLP weights",
                    mistake="zero-initialise only adaLN_modulation's Linear: with the attention and the MLP at zero "
                            "no gradient would reach the gates and the block could never leave the identity")
        ex.call(block.eval)
        x = torch.randn(n, length, dim, generator=g)
        c = torch.randn(n, dim, generator=g)
        x_before = x.clone()
        out = ex.tensor(ex.call(block, x, c), shape=(n, length, dim), dtype=torch.float32,
                        what="the output of a fresh block" + case)
        if not torch.equal(x, x_before):
            ex.fail("your forward changed x in place; use x = x + ..., not x += ...")
        ex.close(out, x, atol=1e-5, what="the output of a fresh block" + case + " (adaLN-Zero: must be x itself)",
                 mistakes=[(_block64(x, c, sd, heads, gates=False), "at initialisation every gate is 0, so the block must return x: multiply "
                                          "the attention and the MLP outputs by gate_msa and gate_mlp")])
        # random weights, modulation included
        new = {}
        for k, shp in want.items():
            fan_in = shp[1] if len(shp) == 2 else 1
            scale = 0.3 if k.startswith("adaLN") else (1 / math.sqrt(fan_in) if len(shp) == 2 else 0.1)
            new[k] = torch.randn(shp, generator=g) * scale
        ex.call(block.load_state_dict, new)
        out = ex.tensor(ex.call(block, x, c), shape=(n, length, dim), dtype=torch.float32,
                        what="the output with random weights" + case)
        ref = _block64(x, c, new, heads)
        ex.close(out, ref, atol=1e-4, rtol=1e-4, what="the output with random weights" + case, mistakes=[
            (_block64(x, c, new, heads, one_plus=False), "the scale enters as x * (1 + scale) + shift: a zero "
                                                           "scale must leave the normalised x unchanged"),
            (_block64(x, c, new, heads, gates=False), "the gates are not applied: x = x + gate * branch(...)"),
            (_block64(x, c, new, heads, swap=True), "shift and scale are swapped: the chunks come in the order "
                                                      "shift, scale, gate (attention), shift, scale, gate (MLP)"),
            (_block64(x, c, new, heads, residual=False), "the residual connections are missing: x = x + gate * ..."),
            (_block64(x, c, new, heads, norm=False), "normalise before modulating: modulate(norm1(x), shift, scale)"),
        ])
    ex.passed("zero-initialised modulation (a fresh block is the identity), 1 + scale, shift, gates, "
              "residuals, two sizes")


# ---------------------------------------------------------------------------- 9.5
def _dpm64(x, d0, prev, a, s, a_n, s_n, a_p=None, s_p=None, *, ratio="right", half=True, eps_form=False,
           first=False):
    """Reference DPM-Solver++(2M) step in float64, with hooks for the wrong variants."""
    x, d0 = x.double(), d0.double()
    exp_neg_h = (s_n * a) / (a_n * s)
    d = d0
    if prev is not None and s_n > 0 and not first:
        lam, lam_p, lam_n = math.log(a / s), math.log(a_p / s_p), math.log(a_n / s_n)
        r = (lam - lam_p) / (lam_n - lam)
        if ratio == "inverse":
            r = 1 / r
        elif ratio == "one":
            r = 1.0
        d = d0 + (0.5 if half else 1.0) * (d0 - prev.double()) / r
    if eps_form:  # DPM-Solver's noise-prediction update applied to the data prediction
        return (a_n / a) * x - s_n * (1 / exp_neg_h - 1) * d
    return (s_n / s) * x + a_n * (1 - exp_neg_h) * d


def _vp_points(g, k):
    """k + 1 consecutive points of a cosine-schedule grid at random timesteps (descending)."""
    ts = torch.sort(torch.randperm(990, generator=g)[:k] + 5, descending=True).values.double()
    ab = torch.cos((ts / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    return [(float(a.sqrt()), float((1 - a).sqrt())) for a in ab]


@checker
def dpm_solver_pp_2m_step(fn) -> None:
    """Exercise 9.5: one DPM-Solver++(2M) update (data prediction; first order at the first and last steps)."""
    ex = Exercise("9.5", "dpm_solver_pp_2m_step")
    g = torch.Generator().manual_seed(95)

    def call(x, d0, prev, p, q, pp=None, what=""):
        args = (x, d0, prev, p[0], p[1], q[0], q[1]) + ((pp[0], pp[1]) if pp is not None else (None, None))
        snap = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:3]]
        try:
            out = ex.call(fn, *args)
        except Exception as e:  # a CheckFailed for the learner's error: say what the case was
            if prev is None and "NoneType" in str(e):
                ex.refail(e, "at the first step there is no previous x0 prediction (prev_x0_pred is None): "
                             "take the first-order step, D = x0_pred")
            if q[1] == 0 and ("division" in str(e) or "domain" in str(e)):
                ex.refail(e, "on the last step sigma_next = 0, so lambda_next = +inf: take the first-order step "
                             "and write e^-h = (sigma_next alpha) / (alpha_next sigma), which is 0 there")
            raise
        for a, b in zip(args[:3], snap):
            if isinstance(a, torch.Tensor) and not torch.equal(a, b):
                ex.fail("your step changed x, x0_pred or prev_x0_pred in place; return a new tensor")
        return ex.tensor(out, shape=x.shape, dtype=torch.float32, what="x_next" + what)

    for shape, kind in (((4, 3, 6, 6), "vp"), ((3, 2, 5), "flow"), ((5, 1, 4, 4), "vp")):
        if kind == "vp":
            pts = _vp_points(g, 4)
        else:
            ts = sorted((0.05 + 0.9 * torch.rand(4, generator=g)).tolist(), reverse=True)
            pts = [(1 - t, t) for t in ts]
        x, d0, prev = (torch.randn(shape, generator=g) for _ in range(3))
        d0, prev = d0.clamp(-1, 1), prev.clamp(-1, 1)
        (pa, ps), (a, s), (an, sn) = pts[0], pts[1], pts[2]
        # first step: no history
        case = f" ({kind} grid, first step: prev_x0_pred=None)"
        out = call(x, d0, None, (a, s), (an, sn), what=case)
        ex.close(out, _dpm64(x, d0, None, a, s, an, sn), atol=1e-5, rtol=1e-5, what="x_next" + case, mistakes=[
            (_dpm64(x, d0, None, a, s, an, sn, eps_form=True),
             "that is DPM-Solver's noise-prediction update (alpha_next / alpha) x - sigma_next (e^h - 1) D; "
             "DPM-Solver++ works with the data prediction: x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D"),
            (_dpm64(x, d0, None, a, s, an, sn) - 2 * an * (1 - (sn * a) / (an * s)) * d0.double(),
             "the sign of the x0 term is flipped: + alpha_next (1 - e^-h) D with h = lambda_next - lambda > 0"),
        ])
        # second order
        case = f" ({kind} grid, second order, (alpha, sigma) = ({a:.3f}, {s:.3f}) -> ({an:.3f}, {sn:.3f}))"
        out = call(x, d0, prev, (a, s), (an, sn), (pa, ps), what=case)
        full = (x, d0, prev, a, s, an, sn, pa, ps)
        ex.close(out, _dpm64(*full), atol=1e-5, rtol=1e-5, what="x_next" + case, mistakes=[
            (_dpm64(*full, first=True), "the step ignores the previous x0 prediction: with history, "
                                        "D = x0_pred + (x0_pred - prev_x0_pred) / (2 r)"),
            (_dpm64(*full, ratio="inverse"), "r is upside down: r = h_prev / h = (lambda - lambda_prev) / "
                                             "(lambda_next - lambda)"),
            (_dpm64(*full, ratio="one"), "the step sizes are assumed equal (r = 1); on an uneven grid in lambda "
                                         "use r = h_prev / h"),
            (_dpm64(*full, half=False), "the correction is (x0_pred - prev_x0_pred) / (2 r): you left out the 1/2"),
            (_dpm64(*full, eps_form=True),
             "that is DPM-Solver's noise-prediction update; DPM-Solver++ uses the data prediction: "
             "x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D"),
        ])
        # last step: sigma_next = 0, alpha_next = 1, history present -> first order, x_next = D = x0_pred
        case = f" ({kind} grid, last step: sigma_next = 0, history given)"
        out = call(x, d0, prev, (a, s), (1.0, 0.0), (pa, ps), what=case)
        if not torch.isfinite(out).all():
            ex.fail(f"x_next{case} contains NaN/inf",
                    mistake="on the last step lambda_next = +inf: take the first-order step and write "
                            "e^-h = (sigma_next alpha) / (alpha_next sigma), which is 0 there")
        ex.close(out, _dpm64(x, d0, prev, a, s, 1.0, 0.0, pa, ps), atol=1e-5, rtol=1e-5, what="x_next" + case,
                 mistakes=[(d0.double() + 0.5 * (d0.double() - prev.double()),
                            "the last step is first order (lower_order_final): x_next = x0_pred")])
    ex.passed("first-order first and last steps, the second-order update on VP and flow grids, r = h_prev / h")


@checker
def dpm_solver_pp_2m_step_hidden(fn) -> None:
    """Hidden test of 9.5: the flow grid's first point t = 1 (alpha = 0, lambda = -inf)."""
    ex = Exercise("9.5", "dpm_solver_pp_2m_step", hidden=True)
    g = torch.Generator().manual_seed(951)
    x, d0 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g).clamp(-1, 1)
    mistake = "write e^-h = (sigma_next alpha) / (alpha_next sigma) instead of taking log(alpha): alpha = 0 there"
    try:
        out = ex.call(fn, x, d0, None, 0.0, 1.0, 0.3, 0.7, None, None)
    except CheckFailed as e:
        ex.refail(e, mistake)
    out = ex.tensor(out, shape=x.shape, what="x_next from alpha = 0 (t = 1)")
    if not torch.isfinite(out).all():
        ex.fail("x_next from the flow's first point (alpha = 0, sigma = 1) contains NaN/inf",
                mistake=mistake)
    ex.close(out, _dpm64(x, d0, None, 0.0, 1.0, 0.3, 0.7), atol=1e-5, rtol=1e-5,
             what="x_next from alpha = 0 (must be sigma_next x + alpha_next x0_pred)")


# ---------------------------------------------------------------------------- hints
HINTS = {
    "9.1": (
        "Draw a time and a noise image per example, mix data and noise along the straight line, and "
        "regress the network's output onto the direction of that line.",
        "If t is None, draw it: uniform, or the sigmoid of logit_mean plus logit_std times a standard "
        "normal draw (use the generator). Draw the noise likewise if it is None. Reshape t so it "
        "broadcasts over every dimension of x0 but the first. x_t is (1 - t) times x0 plus t times the "
        "noise. Call the model on x_t and t times time_scale, passing model_kwargs on. The loss is the "
        "mean squared difference between the output and the noise minus x0.",
    ),
    "9.2": (
        "The velocity is dx/dt; a step from t to t_next moves x by the elapsed time times the velocity.",
        "Multiply v by (t_next - t), which is negative when sampling towards the data, and add it to x.",
    ),
    "9.3": (
        "Heun's method takes a trial Euler step, measures the slope where it lands, and redoes the step "
        "with the average of the two slopes.",
        "Get the velocity at (x, t), take an Euler step to t_next. If t_next is 0, return that. Otherwise "
        "get the velocity at the Euler point and t_next, and step from x (not from the Euler point) with "
        "the mean of the two velocities.",
    ),
    "9.4": (
        "adaLN replaces the LayerNorm's learned scale and shift by ones computed from the conditioning; "
        "a gate scales each branch before it is added back. Starting all of them at zero makes the block "
        "start as the identity.",
        "In __init__ set the weight and the bias of the last layer of adaLN_modulation to zeros. In forward "
        "split adaLN_modulation(c) into six (N, dim) chunks in the order shift, scale, gate for the "
        "attention, then the same for the MLP. For each branch: normalise x, multiply by one plus the "
        "scale, add the shift (unsqueeze the chunks to (N, 1, dim)), run the branch, multiply by the "
        "gate and add it to x.",
    ),
    "9.5": (
        "DPM-Solver++ integrates the ODE exactly in the log of alpha over sigma for a constant x0 "
        "prediction, and improves the constant with a finite difference of the last two predictions.",
        "e^-h is sigma_next times alpha, divided by alpha_next times sigma. Without a previous prediction, or "
        "when sigma_next is 0, D is the current x0 prediction. Otherwise compute the log of alpha over sigma at the previous, "
        "current and next points; r is the previous step in it divided by the current one, and D is the "
        "current prediction plus the difference of the current and previous predictions divided by 2 r. "
        "x_next is sigma_next over sigma times x, plus alpha_next times one minus e^-h times D.",
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
