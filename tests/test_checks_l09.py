"""Every lesson-09 check: a correct answer passes with one line, the stub fails naming the
exercise, and the typical wrong answers fail with the helpful "Likely mistake" message."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.course.checks import l09 as check
from minigen.nn import CrossAttention

from _check_helpers import fails, stub


# ---------------------------------------------------------------------------- 9.1
def make_loss(*, sign=1.0, reversed_t=False, uniform_always=False, ignore_logit=False, scale_time=True,
              target="velocity", reduce="mean", use_generator=True, pass_kwargs=True, detach=False):
    def flow_matching_loss(model, x0, *, t=None, noise=None, timestep_sampling="logit_normal", logit_mean=0.0,
                           logit_std=1.0, time_scale=1000.0, model_kwargs=None, generator=None):
        n = x0.shape[0]
        gen = generator if use_generator else None
        if t is None:
            if timestep_sampling == "uniform" or uniform_always:
                t = torch.rand(n, generator=gen)
            else:
                m, s = (0.0, 1.0) if ignore_logit else (logit_mean, logit_std)
                t = torch.sigmoid(m + s * torch.randn(n, generator=gen))
        if noise is None:
            noise = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = tb * x0 + (1 - tb) * noise if reversed_t else (1 - tb) * x0 + tb * noise
        out = model(x_t, t * time_scale if scale_time else t, **((model_kwargs or {}) if pass_kwargs else {}))
        if detach:
            out = out.detach()
        tgt = {"velocity": sign * (noise - x0), "eps": noise}[target]
        return F.mse_loss(out, tgt) if reduce == "mean" else ((out - tgt) ** 2).sum()

    return flow_matching_loss


def test_flow_loss_correct(capsys):
    check.flow_matching_loss(make_loss())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ Exercise 9.1 flow_matching_loss: passed")


def test_flow_loss_minigen_passes():
    from minigen.flow import flow_matching_loss
    check.flow_matching_loss(flow_matching_loss)
    check.flow_matching_loss_hidden(flow_matching_loss)


@pytest.mark.parametrize("kw, fragments", [
    (dict(sign=-1.0), ["wrong sign", "eps - x0"]),
    (dict(reversed_t=True), ["time runs the wrong way", "(1 - t) x0 + t eps"]),
    (dict(uniform_always=True), ["you drew t uniformly"]),
    (dict(ignore_logit=True), ["logit_mean and logit_std are ignored"]),
    (dict(scale_time=False), ["time_scale * t"]),
    (dict(target="eps"), ["target is eps"]),
    (dict(reduce="sum"), ["summed"]),
    (dict(use_generator=False), ["generator=generator"]),
    (dict(pass_kwargs=False), ["model_kwargs"]),
    (dict(detach=True), ["no gradient"]),
])
def test_flow_loss_mistakes(kw, fragments):
    fails(check.flow_matching_loss, make_loss(**kw), "Exercise 9.1", *fragments)


def test_flow_loss_logit_normal_when_uniform_asked():
    def lognormal_always(model, x0, *, timestep_sampling="logit_normal", **kw):
        return make_loss()(model, x0, timestep_sampling="logit_normal", **kw)
    fails(check.flow_matching_loss, lognormal_always, "Exercise 9.1", "'uniform'", "logit-normally")


@pytest.mark.filterwarnings("ignore:Using a target size")  # the wrong answer broadcasts
def test_flow_loss_fixed_view_shape():
    def four_d_only(model, x0, *, t=None, noise=None, time_scale=1000.0, model_kwargs=None, **kw):
        if t is not None:
            t = t.view(-1, 1, 1, 1)[:, 0, 0, 0]
        return make_loss()(model, x0, t=t, noise=noise, time_scale=time_scale, model_kwargs=model_kwargs, **kw)
    check.flow_matching_loss(four_d_only)  # a correct answer written differently still passes

    def hard_coded_4d(model, x0, *, t=None, noise=None, time_scale=1000.0, model_kwargs=None, **kw):
        tb = t.view(-1, 1, 1, 1)
        return F.mse_loss(model((1 - tb) * x0 + tb * noise, t * time_scale, **(model_kwargs or {})), noise - x0)
    fails(check.flow_matching_loss, hard_coded_4d, "Exercise 9.1")


def test_flow_loss_stub_and_hidden():
    fails(check.flow_matching_loss, stub, "Exercise 9.1 (flow_matching_loss) is not done yet")
    check.flow_matching_loss_hidden(make_loss())
    fails(check.flow_matching_loss_hidden, make_loss(reversed_t=True), "hidden test", "t = 0")


# ---------------------------------------------------------------------------- 9.2
def test_euler_correct(capsys):
    check.euler_step(lambda x, t, t_next, v: x + (t_next - t) * v)
    assert capsys.readouterr().out.startswith("✓ Exercise 9.2 euler_step: passed")
    from minigen.flow import euler_step
    check.euler_step(euler_step)
    check.euler_step_hidden(euler_step)


@pytest.mark.parametrize("fn, fragment", [
    (lambda x, t, t_next, v: x + (t - t_next) * v, "wrong way"),
    (lambda x, t, t_next, v: x + t_next * v, "t_next - t, not t_next"),
    (lambda x, t, t_next, v: x - t * v, "x0 estimate"),
    (lambda x, t, t_next, v: x + v, "scaled by the step size"),
])
def test_euler_mistakes(fn, fragment):
    fails(check.euler_step, fn, "Exercise 9.2", fragment)


def test_euler_in_place_stub_hidden():
    def in_place(x, t, t_next, v):
        return x.add_((t_next - t) * v)
    fails(check.euler_step, in_place, "in place")
    fails(check.euler_step, stub, "Exercise 9.2 (euler_step) is not done yet")
    fails(check.euler_step_hidden, lambda x, t, t_next, v: (x + (t_next - t) * v).float(), "hidden test", "float64")


# ---------------------------------------------------------------------------- 9.3
def make_heun(*, predictor=True, average=True, from_euler_point=False, last_euler=True, time2="next"):
    def heun_step(velocity, x, t, t_next):
        v1 = velocity(x, t)
        x_e = x + (t_next - t) * v1
        if t_next == 0 and last_euler:
            return x_e
        v2 = velocity(x_e if predictor else x, t_next if time2 == "next" else t)
        slope = 0.5 * (v1 + v2) if average else v2
        return (x_e if from_euler_point else x) + (t_next - t) * slope

    return heun_step


def test_heun_correct(capsys):
    check.heun_step(make_heun())
    assert capsys.readouterr().out.startswith("✓ Exercise 9.3 heun_step: passed")


@pytest.mark.parametrize("kw, fragment", [
    (dict(predictor=False), "Euler predictor"),
    (dict(average=False), "averaged"),
    (dict(from_euler_point=True), "starts from x"),
    (dict(last_euler=False), "stays an Euler step"),
    (dict(time2="t"), "time t_next"),
])
def test_heun_mistakes(kw, fragment):
    fails(check.heun_step, make_heun(**kw), "Exercise 9.3", fragment)


def test_heun_euler_only_and_stub():
    fails(check.heun_step, lambda velocity, x, t, t_next: x + (t_next - t) * velocity(x, t), "Exercise 9.3",
          "that is an Euler step")
    fails(check.heun_step, stub, "Exercise 9.3 (heun_step) is not done yet")


# ---------------------------------------------------------------------------- 9.4
def make_block(*, zero=True, zero_all=False, one_plus=True, gates=True, swap=False, residual=True):
    class DiTBlock(nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio=4.0):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.attn = CrossAttention(dim, None, num_heads, dim // num_heads)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(0.0),
                                     nn.Linear(hidden, dim))
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            if zero:
                nn.init.zeros_(self.adaLN_modulation[-1].weight)
                nn.init.zeros_(self.adaLN_modulation[-1].bias)
            if zero_all:
                for p in self.parameters():
                    nn.init.zeros_(p)

        def forward(self, x, c, context=None):
            sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
            if swap:
                sh1, sc1, sh2, sc2 = sc1, sh1, sc2, sh2

            def mod(z, shift, scale):
                return z * ((1 + scale[:, None]) if one_plus else scale[:, None]) + shift[:, None]

            a = self.attn(mod(self.norm1(x), sh1, sc1))
            x = (x if residual else 0) + (g1[:, None] if gates else 1) * a
            m = self.mlp(mod(self.norm2(x), sh2, sc2))
            return (x if residual else 0) + (g2[:, None] if gates else 1) * m

    return DiTBlock


def test_dit_block_correct(capsys):
    check.dit_block(make_block())
    assert capsys.readouterr().out.startswith("✓ Exercise 9.4 DiTBlock: passed")


def test_dit_block_minigen_passes():
    from minigen.dit import DiTBlock

    def build(dim, num_heads, mlp_ratio=4.0):
        b = DiTBlock(dim, num_heads, mlp_ratio)
        nn.init.zeros_(b.adaLN_modulation[-1].weight)
        nn.init.zeros_(b.adaLN_modulation[-1].bias)
        return b
    check.dit_block(build)


@pytest.mark.parametrize("kw, fragment", [
    (dict(zero=False), "initialise the weight and the bias of adaLN_modulation"),
    (dict(zero_all=True), "zero-initialise only adaLN_modulation"),
    (dict(one_plus=False), "(1 + scale)"),
    (dict(gates=False), "gate"),
    (dict(swap=True), "shift and scale are swapped"),
])
def test_dit_block_mistakes(kw, fragment):
    fails(check.dit_block, make_block(**kw), "Exercise 9.4", fragment)


def test_dit_block_other_layers_and_stub():
    base = make_block()

    class Bigger(base):
        def __init__(self, dim, num_heads, mlp_ratio=4.0):
            super().__init__(dim, num_heads, mlp_ratio)
            self.extra = nn.Linear(dim, dim)
    fails(check.dit_block, Bigger, "keep the given layers")

    class Stub(base):
        def __init__(self, dim, num_heads, mlp_ratio=4.0):
            super().__init__(dim, num_heads, mlp_ratio)
            raise NotImplementedError("Exercise 9.4: DiTBlock — read section 3")
    fails(check.dit_block, Stub, "Exercise 9.4 (DiTBlock) is not done yet")


# ---------------------------------------------------------------------------- 9.5
def make_dpm(*, eps_form=False, ratio="right", half=True, first_order_start=True, last_first_order=True,
             log_alpha=False):
    def step(x, x0_pred, prev_x0_pred, alpha, sigma, alpha_next, sigma_next, alpha_prev=None, sigma_prev=None):
        if log_alpha or (sigma_next == 0 and not last_first_order):
            lam, lam_next = math.log(alpha / sigma), math.log(alpha_next / sigma_next)
            exp_neg_h = math.exp(-(lam_next - lam))
        else:
            exp_neg_h = (sigma_next * alpha) / (alpha_next * sigma)
        d = x0_pred
        use_history = prev_x0_pred is not None or not first_order_start
        if use_history and (sigma_next > 0 or not last_first_order):
            lam, lam_p, lam_n = (math.log(alpha / sigma), math.log(alpha_prev / sigma_prev),
                                 math.log(alpha_next / sigma_next))
            r = (lam - lam_p) / (lam_n - lam)
            r = {"right": r, "inverse": 1 / r, "one": 1.0}[ratio]
            d = x0_pred + (0.5 if half else 1.0) * (x0_pred - prev_x0_pred) / r
        if eps_form:
            return (alpha_next / alpha) * x - sigma_next * (1 / exp_neg_h - 1) * d
        return (sigma_next / sigma) * x + alpha_next * (1 - exp_neg_h) * d

    return step


def test_dpm_correct(capsys):
    check.dpm_solver_pp_2m_step(make_dpm())
    assert capsys.readouterr().out.startswith("✓ Exercise 9.5 dpm_solver_pp_2m_step: passed")
    check.dpm_solver_pp_2m_step_hidden(make_dpm())
    from minigen.samplers import dpm_solver_pp_2m_step
    check.dpm_solver_pp_2m_step(dpm_solver_pp_2m_step)
    check.dpm_solver_pp_2m_step_hidden(dpm_solver_pp_2m_step)


@pytest.mark.parametrize("kw, fragment", [
    (dict(eps_form=True), "noise-prediction update"),
    (dict(ratio="inverse"), "r is upside down"),
    (dict(ratio="one"), "r = 1"),
    (dict(half=False), "1/2"),
    (dict(first_order_start=False), "first step there is no previous"),
    (dict(last_first_order=False), "last step"),
])
def test_dpm_mistakes(kw, fragment):
    fails(check.dpm_solver_pp_2m_step, make_dpm(**kw), "Exercise 9.5", fragment)


def test_dpm_stub_and_hidden():
    fails(check.dpm_solver_pp_2m_step, stub, "Exercise 9.5 (dpm_solver_pp_2m_step) is not done yet")
    fails(check.dpm_solver_pp_2m_step_hidden, make_dpm(log_alpha=True), "hidden test", "alpha = 0")


def test_library_dpm_hook_uses_the_step():
    """minigen.samplers.dpm_solver_pp_2m runs the step it is given (the lesson passes the learner's)."""
    from minigen import samplers

    sched = samplers.VPSchedule(torch.linspace(0.9999, 0.001, 1000, dtype=torch.float64), "epsilon")
    grid = sched.spaced(6)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def model_fn(x, t):
        return 0.5 * x

    ref = samplers.dpm_solver_pp_2m(model_fn, x_T, grid, sched.to_x0)
    mine = samplers.dpm_solver_pp_2m(model_fn, x_T, grid, sched.to_x0, step=make_dpm())
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    wrong = samplers.dpm_solver_pp_2m(model_fn, x_T, grid, sched.to_x0, step=make_dpm(ratio="one"))
    assert not torch.allclose(wrong, ref, atol=1e-4)
