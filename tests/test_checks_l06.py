"""Every lesson-06 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch

from minigen import diffusion
from minigen.course.checks import CheckFailed
from minigen.course.checks import l06 as check

from _check_helpers import stub, fails


# ---------------------------------------------------------------------------- 6.1
def make_ddim(*, abar_prev_last=None, sigma_fn=None, dir_fn=None, x0_fn=None, prev_fn=None,
              clip="keep_eps", add_noise=True, draw_noise=True, v_x0_fn=None, v_eps_fn=None,
              v_as_eps=False, v_clip="keep_eps", unknown="raise", use_generator=True):
    """A learner-style ddim_step; the keyword arguments inject one typical mistake
    (v_*: in the conversion of a v output; unknown: what happens to other prediction types)."""

    def ddim_step(x_t, t, t_prev, model_output, alphas_cumprod, *, eta=0.0, noise=None, clip_denoised=True,
                  generator=None, prediction_type="epsilon"):
        if prediction_type not in ("epsilon", "v"):
            if unknown == "raise":
                raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {prediction_type!r}")
            if unknown == "notimplemented":
                raise NotImplementedError(prediction_type)
            prediction_type = "epsilon"  # unknown == "as_eps": silently treated as eps
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        if prev_fn is not None:
            ab_prev = prev_fn(alphas_cumprod, t, t_prev)
        elif t_prev >= 0:
            ab_prev = alphas_cumprod[t_prev]
        else:
            ab_prev = torch.tensor(1.0) if abar_prev_last is None else abar_prev_last(alphas_cumprod)
        mode = clip
        if prediction_type == "v" and not v_as_eps:
            v = model_output
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * v if v_x0_fn is None else v_x0_fn(x_t, v, ab)
            eps = ab.sqrt() * v + (1 - ab).sqrt() * x_t if v_eps_fn is None else v_eps_fn(x_t, v, ab)
            mode = v_clip
        else:
            eps = model_output
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt() if x0_fn is None else x0_fn(x_t, eps, ab)
        if clip_denoised and mode is not None:
            x0 = x0.clamp(-1, 1)
            if mode == "recompute":
                eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if sigma_fn is None:
            sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        else:
            sigma = sigma_fn(eta, ab, ab_prev, alphas_cumprod, t)
        d = (1 - ab_prev - sigma**2).sqrt() if dir_fn is None else dir_fn(ab, ab_prev, sigma)
        x_prev = ab_prev.sqrt() * x0 + d * eps
        if eta > 0 and add_noise:
            if noise is None:
                if not draw_noise:
                    noise = torch.zeros_like(x_t)
                elif use_generator:
                    noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
                else:
                    noise = torch.randn_like(x_t)
            x_prev = x_prev + sigma * noise
        return x_prev

    return ddim_step


def test_ddim_step_correct(capsys):
    check.ddim_step(make_ddim())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ Exercise 6.1 ddim_step: passed")


def test_ddim_step_generator_and_defaults():
    fails(check.ddim_step, make_ddim(use_generator=False), "Exercise 6.1", "same `generator`",
          "generator=generator")

    def clip_off_by_default(*args, clip_denoised=False, **kw):
        return make_ddim()(*args, clip_denoised=clip_denoised, **kw)

    fails(check.ddim_step, clip_off_by_default, "clip_denoised defaults to True")


def test_ddim_step_v_through_x0_passes(capsys):
    # eps_hat from the unclipped x0_hat, (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar), is the same
    # eps_hat written differently (minigen's route)
    def eps_from_x0(x, v, a):
        return (x - a.sqrt() * (a.sqrt() * x - (1 - a).sqrt() * v)) / (1 - a).sqrt()

    check.ddim_step(make_ddim(v_eps_fn=eps_from_x0))
    assert "✓ Exercise 6.1 ddim_step: passed (epsilon and v" in capsys.readouterr().out


def test_minigen_ddim_step_passes(capsys):
    # the package's own step, an independent implementation, agrees with the check
    check.ddim_step(diffusion.ddim_step)
    assert "✓ Exercise 6.1" in capsys.readouterr().out


def test_ddim_step_stub():
    fails(check.ddim_step, stub, "Exercise 6.1 (ddim_step) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    # sigma with eta misplaced, or the wrong beta
    (make_ddim(sigma_fn=lambda eta, a, ap, ac, t: (eta * (1 - ap) / (1 - a) * (1 - a / ap)).sqrt()),
     "eta multiplies sigma, not sigma^2"),
    (make_ddim(sigma_fn=lambda eta, a, ap, ac, t: ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()),
     "scaled by eta"),
    (make_ddim(sigma_fn=lambda eta, a, ap, ac, t: eta * ((1 - a) / (1 - ap)).sqrt() * (1 - a / ap).sqrt()),
     "sigma is too large"),
    (make_ddim(sigma_fn=lambda eta, a, ap, ac, t: eta * ((1 - ap) / (1 - a)).sqrt()
               * (1 - ac[t] / ac[t - 1]).view(-1, 1, 1, 1).sqrt()),
     "beta of the *jump*"),
    # the direction term
    (make_ddim(dir_fn=lambda a, ap, s: (1 - ap).sqrt()), "left out the - sigma^2"),
    (make_ddim(dir_fn=lambda a, ap, s: (1 - a).sqrt()), "sqrt(1 - abar_t)"),
    # abar_t where abar_prev belongs
    (make_ddim(prev_fn=lambda ac, t, tp: ac[t].view(-1, 1, 1, 1) if tp >= 0 else torch.tensor(1.0)),
     "returns x_t unchanged"),
    (make_ddim(prev_fn=lambda ac, t, tp: ac[t - 1].view(-1, 1, 1, 1) if tp >= 0 else torch.tensor(1.0)),
     "not alphas_cumprod[t - 1]"),
    # the last step
    (make_ddim(abar_prev_last=lambda ac: ac[-1]), "alphas_cumprod[-1] is the *last* entry"),
    (make_ddim(abar_prev_last=lambda ac: ac[0]), "not alphas_cumprod[0]"),
    # x0_hat
    (make_ddim(x0_fn=lambda x, e, a: (x - (1 - a) * e) / a.sqrt()), "is a square root"),
    (make_ddim(x0_fn=lambda x, e, a: x - (1 - a).sqrt() * e), "forgot to divide"),
    # noise and clipping
    (make_ddim(add_noise=False), "no noise term"),
    (make_ddim(draw_noise=False), "draw z ~ N(0, I) yourself"),
    (make_ddim(clip=None), "clamp x0_hat to [-1, 1]"),
    (make_ddim(clip="recompute"), "keep the network's eps"),
    # v-prediction
    (make_ddim(v_as_eps=True), "the network output is v, not eps"),
    (make_ddim(v_x0_fn=lambda x, v, a: a.sqrt() * x + (1 - a).sqrt() * v), "sign error in x0_hat"),
    (make_ddim(v_x0_fn=lambda x, v, a: (1 - a).sqrt() * x - a.sqrt() * v), "coefficients of x0_hat are swapped"),
    (make_ddim(v_eps_fn=lambda x, v, a: (1 - a).sqrt() * v + a.sqrt() * x), "coefficients of eps_hat are swapped"),
    (make_ddim(v_eps_fn=lambda x, v, a: a.sqrt() * v - (1 - a).sqrt() * x), "sign error in eps_hat"),
    (make_ddim(v_eps_fn=lambda x, v, a: v), "uses v itself"),
    (make_ddim(v_x0_fn=lambda x, v, a: (x - (1 - a).sqrt() * v) / a.sqrt()), "epsilon formula applied to v"),
    (make_ddim(v_clip=None), "for v-prediction too"),
    (make_ddim(v_clip="recompute"), "not from the clamped x0_hat"),
    # other prediction types
    (make_ddim(unknown="as_eps"), "must raise ValueError"),
    (make_ddim(unknown="notimplemented"), "raise ValueError for a prediction type"),
])
def test_ddim_step_mistakes(answer, fragment):
    fails(check.ddim_step, answer, "Exercise 6.1", fragment)


def test_ddim_step_last_step_nan_is_explained():
    # alphas_cumprod[-1] with eta > 0: sqrt(1 - abar_t / abar_{T-1}) is NaN
    def nan_last(x_t, t, t_prev, eps, ac, *, eta=0.0, noise=None, clip_denoised=True, **kw):
        ab, ab_prev = ac[t].view(-1, 1, 1, 1), ac[t_prev]
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        out = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps
        return out + sigma * (torch.randn_like(x_t) if noise is None else noise)

    fails(check.ddim_step, nan_last, "NaN", "abar_prev = 1")


def test_ddim_step_returns_wrong_dtype_or_modifies_input():
    good = make_ddim()
    fails(check.ddim_step, lambda *a, **k: good(*a, **k).double(), "dtype")

    def inplace(x_t, t, t_prev, eps, ac, **kw):
        out = good(x_t, t, t_prev, eps, ac, **kw)
        eps.mul_(1.0)
        x_t.add_(0.0)
        eps[0] += 1
        return out

    fails(check.ddim_step, inplace, "in place")


# ---------------------------------------------------------------------------- 6.2
def test_guidance_correct(capsys):
    check.classifier_free_guidance(lambda u, c, guidance_scale: u + guidance_scale * (c - u))
    # the same, rearranged
    check.classifier_free_guidance(lambda u, c, guidance_scale: guidance_scale * c + (1 - guidance_scale) * u)
    # Ho & Salimans' parametrisation written with our scale: also right
    check.classifier_free_guidance(lambda u, c, guidance_scale: c + (guidance_scale - 1) * (c - u))
    check.classifier_free_guidance(diffusion.classifier_free_guidance)
    assert capsys.readouterr().out.count("✓ Exercise 6.2 classifier_free_guidance: passed") == 4


def test_guidance_stub():
    fails(check.classifier_free_guidance, stub, "Exercise 6.2 (classifier_free_guidance) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda u, c, w: c + w * (c - u), "Ho & Salimans"),
    (lambda u, c, w: w * u + (1 - w) * c, "roles are swapped"),
    (lambda u, c, w: u + w * (u - c), "sign of the difference"),
    (lambda u, c, w: w * c, "dropped the unconditional"),
    (lambda u, c, w: u + w * c, "the difference is"),
    (lambda u, c, w: (u + c) * w / 2, "not an average"),
])
def test_guidance_mistakes(answer, fragment):
    def keyword(u, c, guidance_scale):
        return answer(u, c, guidance_scale)

    fails(check.classifier_free_guidance, keyword, "Exercise 6.2", fragment)


def test_guidance_scale_must_be_used():
    fails(check.classifier_free_guidance, lambda u, c, guidance_scale: u + 7.5 * (c - u), "fixed at 7.5")
    fails(check.classifier_free_guidance, lambda u, c, guidance_scale=1: u + abs(guidance_scale) * (c - u),
          "w = -0.5")
    fails(check.classifier_free_guidance, lambda u, c, w: u + w * (c - u), "keyword argument `guidance_scale`")


def test_guidance_in_place_and_type():
    def inplace(u, c, w):
        return u.add_(w * (c - u))

    fails(check.classifier_free_guidance, inplace, "in place")
    fails(check.classifier_free_guidance, lambda u, c, w: (u + w * (c - u)).numpy(), "numpy")
    fails(check.classifier_free_guidance, lambda u, c, w: (u + w * (c - u)).double(), "dtype")


# ---------------------------------------------------------------------------- 6.3
def make_inpaint(*, paste="renoised", invert=False, final_paste=True, t_prev_fn=None, steps_fix=None,
                 paste_before=False, forward_prediction_type=True):
    """A learner-style DDIM inpainting loop; the keyword arguments inject one typical mistake."""

    def inpaint(model_fn, x0, mask, alphas_cumprod, *, steps=50, eta=0.0, generator=None,
                ddim_step=diffusion.ddim_step, q_sample=diffusion.q_sample, clip_denoised=True,
                prediction_type="epsilon", **unused):
        step_kw = dict(prediction_type=prediction_type) if forward_prediction_type else {}
        n, T = x0.shape[0], len(alphas_cumprod)
        m = 1 - mask if invert else mask
        ts = diffusion.ddim_timesteps(T, steps).tolist()

        def known(s):
            if paste == "clean" or s < 0:
                return x0
            if paste == "no_noise":
                return q_sample(x0, s, torch.zeros_like(x0), alphas_cumprod)
            return q_sample(x0, s, torch.randn_like(x0), alphas_cumprod)

        x = torch.randn_like(x0)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            if t_prev_fn is not None:
                t_prev = t_prev_fn(t, t_prev)
            if paste_before:
                x = m * known(t) + (1 - m) * x
            tt = torch.full((n,), t, dtype=torch.long)
            x = ddim_step(x, tt, t_prev, model_fn(x, tt), alphas_cumprod, eta=eta,
                          clip_denoised=clip_denoised, generator=generator, **step_kw)
            if not paste_before and (final_paste or t_prev >= 0):
                target = t if paste == "previous" else t_prev
                x = m * known(target if t_prev >= 0 else -1) + (1 - m) * x
        if paste_before and final_paste:
            x = m * x0 + (1 - m) * x
        return x

    return inpaint


def test_inpaint_correct(capsys):
    check.inpaint(make_inpaint())
    check.inpaint(make_inpaint(paste_before=True))  # paste before each model call: also right
    assert capsys.readouterr().out.count("✓ Exercise 6.3 inpaint: passed") == 2


def test_minigen_inpaint_passes(capsys):
    def minigen_inpaint(model_fn, x0, mask, ab, *, steps, ddim_step, q_sample, prediction_type="epsilon"):
        return diffusion.inpaint(model_fn, x0, mask, ab, sampler="ddim", steps=steps, q_sample=q_sample,
                                 ddim_step=ddim_step, prediction_type=prediction_type)

    check.inpaint(minigen_inpaint)
    assert "✓ Exercise 6.3" in capsys.readouterr().out


def test_inpaint_stub():
    fails(check.inpaint, stub, "Exercise 6.3 (inpaint) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (make_inpaint(paste="clean"), "re-noised* to the current timestep"),
    (make_inpaint(invert=True), "mask convention is inverted"),
    (make_inpaint(final_paste=False), "after the last step too"),
    (make_inpaint(paste="previous"), "noised to the previous timestep"),
    (make_inpaint(paste="no_noise"), "fresh noise"),
    (make_inpaint(t_prev_fn=lambda t, tp: t - 1 if tp >= 0 else tp), "not t - 1"),
    (make_inpaint(t_prev_fn=lambda t, tp: max(tp, 0)), "not 0"),
    (make_inpaint(forward_prediction_type=False), "dropped prediction_type"),
])
def test_inpaint_mistakes(answer, fragment):
    fails(check.inpaint, answer, "Exercise 6.3", fragment)


def test_inpaint_wrong_number_of_steps():
    good = make_inpaint()
    fails(check.inpaint, lambda *a, steps=50, **k: good(*a, steps=steps + 2, **k), "called the model 10 times")
