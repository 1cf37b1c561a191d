"""Every lesson-05 check: correct answers pass, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import CheckFailed
from minigen.course.checks import l05 as check

from _check_helpers import stub, fails


def col(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------- 5.1
def test_alphas_cumprod_correct(capsys):
    check.alphas_cumprod(lambda b: torch.cumprod(1 - b, dim=0))
    check.alphas_cumprod(lambda b: torch.exp(torch.cumsum(torch.log1p(-b), 0)))

    def loop(b):  # an explicit loop is fine too
        out, acc = torch.empty_like(b), torch.ones((), dtype=b.dtype)
        for i in range(len(b)):
            acc = acc * (1 - b[i])
            out[i] = acc
        return out
    check.alphas_cumprod(loop)
    assert capsys.readouterr().out.count("✓ Exercise 5.1 alphas_cumprod: passed") == 3


def test_alphas_cumprod_stub():
    fails(check.alphas_cumprod, stub, "Exercise 5.1 (alphas_cumprod) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda b: torch.cumsum(1 - b, 0), "cumulative *product*"),
    (lambda b: torch.cumprod(b, 0), "alpha_s = 1 - beta_s"),
    (lambda b: 1 - torch.cumsum(b, 0), "first-order approximation"),
    (lambda b: 1 - b, "that is alpha_t"),
    (lambda b: torch.cat([b.new_ones(1), torch.cumprod(1 - b, 0)[:-1]]), "shifted by one"),
    (lambda b: torch.cumprod(1 - b, 0).sqrt(), "sqrt(abar_t)"),
])
def test_alphas_cumprod_mistakes(answer, fragment):
    fails(check.alphas_cumprod, answer, "Exercise 5.1", "Likely mistake", fragment)


def test_alphas_cumprod_dtype_and_inplace():
    fails(check.alphas_cumprod, lambda b: torch.cumprod(1 - b.double(), 0), "dtype")

    def inplace(b):
        b.neg_().add_(1)
        return torch.cumprod(b, 0)
    fails(check.alphas_cumprod, inplace, "in place")


# ---------------------------------------------------------------------------- 5.2
def good_q_sample(x0, t, noise, ab):
    a = col(ab[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def test_q_sample_correct(capsys):
    check.q_sample(good_q_sample)
    check.q_sample(lambda x0, t, noise, ab: torch.lerp(noise * 0, x0, 1) * col(ab[t].sqrt(), x0)
                   + col((1 - ab[t]).sqrt(), x0) * noise)
    assert capsys.readouterr().out.count("✓ Exercise 5.2 q_sample: passed") == 2


def test_q_sample_stub():
    fails(check.q_sample, stub, "Exercise 5.2 (q_sample) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda x0, t, e, ab: col(ab[t].sqrt(), x0) * x0 + col(1 - ab[t], x0) * e, "not the variance"),
    (lambda x0, t, e, ab: col(ab[t], x0) * x0 + col((1 - ab[t]).sqrt(), x0) * e, "scaled by sqrt(abar_t)"),
    (lambda x0, t, e, ab: x0 + col((1 - ab[t]).sqrt(), x0) * e, "must shrink"),  # the seed article's form
    (lambda x0, t, e, ab: col((1 - ab[t]).sqrt(), x0) * x0 + col(ab[t].sqrt(), x0) * e, "swapped"),
    (lambda x0, t, e, ab: good_q_sample(x0, t + 1, e, ab), "alphas_cumprod[t + 1]"),
    (lambda x0, t, e, ab: good_q_sample(x0, t - 1, e, ab), "alphas_cumprod[t - 1]"),
])
def test_q_sample_mistakes(answer, fragment):
    fails(check.q_sample, answer, "Exercise 5.2", "Likely mistake", fragment)


def test_q_sample_broadcast_hint():
    fails(check.q_sample, lambda x0, t, e, ab: ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * e,
          "Exercise 5.2", "RuntimeError", "one 1 per remaining axis")


def test_q_sample_float64_output():
    fails(check.q_sample, lambda x0, t, e, ab: good_q_sample(x0, t, e, ab.double()), "float64")


# ---------------------------------------------------------------------------- 5.3
def make_loss(q_sample=good_q_sample, draw_t=None, draw_noise=torch.randn_like, target="noise",
              reduce=lambda d: (d ** 2).mean()):
    def training_loss(model, x0, ab):
        T = len(ab)
        t = draw_t(x0, T) if draw_t else torch.randint(0, T, (x0.shape[0],), device=x0.device)
        noise = draw_noise(x0)
        x_t = q_sample(x0, t, noise, ab)
        out = model(x_t, t)
        tgt = {"noise": noise, "x0": x0, "x_t": x_t}[target]
        return reduce(out - tgt)
    return training_loss


def test_training_loss_correct(capsys):
    check.training_loss(make_loss())

    def with_mse(model, x0, ab):
        t = torch.randint(0, len(ab), (len(x0),))
        noise = torch.randn_like(x0)
        return F.mse_loss(model(good_q_sample(x0, t, noise, ab), t), noise)
    check.training_loss(with_mse)
    assert capsys.readouterr().out.count("✓ Exercise 5.3 training_loss: passed") == 2


def test_training_loss_stub():
    fails(check.training_loss, stub, "Exercise 5.3 (training_loss) is not done yet")


@pytest.mark.parametrize("draw_t, fragment", [
    (lambda x0, T: torch.randint(0, T - 1, (len(x0),)), "upper bound is exclusive"),
    (lambda x0, T: torch.randint(0, 999, (len(x0),)), "randint(0, 999)"),
    (lambda x0, T: torch.randint(1, T, (len(x0),)), "0-based"),
    (lambda x0, T: torch.randint(0, T, (1,)), "one timestep per image"),
    (lambda x0, T: torch.randint(0, T, ()).expand(len(x0)), "one timestep per image"),
    (lambda x0, T: torch.randint(0, T, (len(x0),)).float(), "indices must be long"),
    (lambda x0, T: (torch.randn(len(x0)) * T / 6 + T / 2).round().long().clamp(0, T - 1), "uniform"),
])
def test_training_loss_timestep_mistakes(draw_t, fragment):
    fails(check.training_loss, make_loss(draw_t=draw_t), "Exercise 5.3", fragment)


def test_training_loss_off_by_one_upper_bound_t_equals_T():
    msg = fails(check.training_loss, make_loss(
        q_sample=lambda x0, t, e, ab: good_q_sample(x0, t.clamp(max=len(ab) - 1), e, ab),
        draw_t=lambda x0, T: torch.randint(0, T + 1, (len(x0),))), "Exercise 5.3", "[0, 999]")
    assert "excludes its upper bound" in msg


def test_training_loss_hard_coded_T():
    fails(check.training_loss, make_loss(draw_t=lambda x0, T: torch.randint(0, 1000, (len(x0),))),
          "Exercise 5.3", "T = 10", "len(alphas_cumprod)")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target="x0"), "not x0"),
    (dict(target="x_t"), "not x_t"),
    (dict(reduce=lambda d: (d ** 2).sum()), "not the sum"),
    (dict(reduce=lambda d: (d ** 2).flatten(1).sum(1).mean()), "sum per image"),
    (dict(reduce=lambda d: d.abs().mean()), "L1"),
    (dict(reduce=lambda d: (d ** 2).flatten(1).mean(1)), "scalar"),
    (dict(draw_noise=torch.rand_like), "uniform"),
])
def test_training_loss_mistakes(kwargs, fragment):
    fails(check.training_loss, make_loss(**kwargs), "Exercise 5.3", fragment)


def test_training_loss_wrong_forward_process():
    bad_q = lambda x0, t, e, ab: col(ab[t].sqrt(), x0) * x0 + col(1 - ab[t], x0) * e  # noqa: E731
    fails(check.training_loss, make_loss(q_sample=bad_q), "Exercise 5.3", "the noise in the model's input")


def test_training_loss_detached_and_clean_input():
    fails(check.training_loss, make_loss(reduce=lambda d: (d.detach() ** 2).mean()), "requires_grad")

    def clean(model, x0, ab):
        t = torch.randint(0, len(ab), (len(x0),))
        noise = torch.randn_like(x0)
        return F.mse_loss(model(x0, t), noise)
    fails(check.training_loss, clean, "clean images")


# ---------------------------------------------------------------------------- 5.4
def make_p_sample(variance="small", noise_at_0=False, clip=True, wrap=False, std_is_var=False,
                  swap=False, own_noise=False, sqrt_alpha=True):
    def p_sample(x_t, t, eps, ab, noise):
        a = col(ab[t], x_t)
        if wrap:
            ap = col(ab[t - 1], x_t)
        else:
            ap = col(torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones_like(ab[t])), x_t)
        beta = 1 - a / ap
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        c0 = ap.sqrt() * beta / (1 - a)
        ct = ((1 - beta).sqrt() if sqrt_alpha else (1 - beta)) * (1 - ap) / (1 - a)
        if swap:
            c0, ct = ct, c0
        mean = c0 * x0 + ct * x_t
        var = beta if variance == "large" else (1 - ap) / (1 - a) * beta
        std = var if std_is_var else var.sqrt()
        if own_noise:
            noise = torch.randn_like(x_t)
        mask = torch.ones_like(a) if noise_at_0 else col((t > 0).float(), x_t)
        return mean + mask * std * noise
    return p_sample


def test_p_sample_correct(capsys):
    check.p_sample(make_p_sample())
    check.p_sample(make_p_sample(noise_at_0=True))  # beta~_0 = 0: noise at t = 0 adds nothing

    def float64_inside(x_t, t, eps, ab, noise):  # computing in float64 and casting back is fine
        return make_p_sample()(x_t.double(), t, eps.double(), ab.double(), noise.double()).float()
    check.p_sample(float64_inside)
    assert capsys.readouterr().out.count("✓ Exercise 5.4 p_sample: passed") == 3


def test_p_sample_stub():
    fails(check.p_sample, stub, "Exercise 5.4 (p_sample) is not done yet")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(variance="large"), "fixed_large"),
    (dict(variance="large", noise_at_0=True), "no noise at t = 0"),
    (dict(std_is_var=True), "standard deviation is its square root"),
    (dict(clip=False), "clip x0_hat"),
    (dict(wrap=True), "wraps around"),
    (dict(swap=True), "swapped"),
    (dict(sqrt_alpha=False), "sqrt(alpha_t), not alpha_t"),
    (dict(own_noise=True), "use the `noise` you are given"),
])
def test_p_sample_mistakes(kwargs, fragment):
    fails(check.p_sample, make_p_sample(**kwargs), "Exercise 5.4", "Likely mistake", fragment)


def test_p_sample_mean_only_and_x0():
    fails(check.p_sample, lambda x_t, t, eps, ab, noise: make_p_sample()(x_t, t, eps, ab, noise * 0),
          "Exercise 5.4", "only the posterior mean")

    def returns_x0(x_t, t, eps, ab, noise):
        a = col(ab[t], x_t)
        return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1) + noise * 0.1 * col(t > 0, x_t)
    fails(check.p_sample, returns_x0, "Exercise 5.4", "x0_hat itself")


# ---------------------------------------------------------------------------- 5.5
def make_loop(step=make_p_sample(), order="down", start=None, feed=True, noise_once=False, ret="x"):
    def p_sample_loop(model_fn, x_T, ab):
        T = len(ab)
        ts = {"down": range(T - 1, -1, -1), "up": range(T), "stop1": range(T - 1, 0, -1),
              "fromT": range(T, -1, -1)}[order]
        x = x_T
        z0 = torch.randn_like(x_T)
        for i in ts:
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            src = x if feed else x_T
            eps = model_fn(src, t)
            last_in = src
            x = step(src, t, eps, ab, z0 if noise_once else torch.randn_like(x))
        return x if ret == "x" else last_in
    return p_sample_loop


def test_p_sample_loop_correct(capsys):
    check.p_sample_loop(make_loop())

    @torch.no_grad()
    def written_differently(model_fn, x_T, ab):
        x = x_T.clone()
        for i in reversed(range(len(ab))):
            t = torch.tensor([i] * len(x))
            x = make_p_sample()(x, t, model_fn(x, t), ab, torch.randn(x.shape))
        return x
    check.p_sample_loop(written_differently)
    assert capsys.readouterr().out.count("✓ Exercise 5.5 p_sample_loop: passed") == 2


def test_p_sample_loop_stub():
    fails(check.p_sample_loop, stub, "Exercise 5.5 (p_sample_loop) is not done yet")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(order="up"), "backwards in time"),
    (dict(order="stop1"), "the last step is t = 0"),
    (dict(order="fromT"), "reversed(range(T))"),
    (dict(feed=False), "feed each step's output"),
    (dict(noise_once=True), "draw fresh noise inside the loop"),
    (dict(ret="last_in"), "return x after the last step"),
    (dict(step=make_p_sample(variance="large", noise_at_0=True)), "t = 0"),
])
def test_p_sample_loop_mistakes(kwargs, fragment):
    fails(check.p_sample_loop, make_loop(**kwargs), "Exercise 5.5", fragment)


def test_p_sample_loop_int_timestep():
    def int_t(model_fn, x_T, ab):
        x = x_T
        for i in reversed(range(len(ab))):
            x = make_p_sample()(x, torch.full((len(x),), i), model_fn(x, i), ab, torch.randn_like(x))
        return x
    fails(check.p_sample_loop, int_t, "Exercise 5.5", "torch.full((N,), i, dtype=torch.long)")


def test_only_four_dimensional_inputs_refused():
    def q_sample_4d(x0, t, noise, ab):
        a = ab[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    fails(check.q_sample, q_sample_4d, "Exercise 5.2", "(7, 12)", "fits only 4-D image batches")

    def p_sample_4d(x_t, t, eps, ab, noise):
        if x_t.dim() != 4:
            x_t = x_t.view(x_t.shape[0], 1, 1, -1)
        return make_p_sample()(x_t, t, eps.view(x_t.shape), ab, noise.view(x_t.shape))

    fails(check.p_sample, p_sample_4d, "Exercise 5.4", "fits only 4-D image batches")
