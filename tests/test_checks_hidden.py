"""The hidden tests (nbgrader `### BEGIN HIDDEN TESTS`, run at grading time only): silent on a
right answer, and a failure names the exercise and says it is a hidden test."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import l00, l01, l02, l03, l04, l05, l06, l07, l08, l09

from _check_helpers import fails, stub


def _grid(images, nrow, padding=2):
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.full((rows * h + (rows + 1) * padding, ncol * w + (ncol + 1) * padding, c), 255, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def _attention(q, k, v):
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v


def _pareto(c, e):
    dom = (c[None, :] <= c[:, None]) & (e[None, :] <= e[:, None]) & ((c[None, :] < c[:, None]) | (e[None, :] < e[:, None]))
    return ~dom.any(1)


RIGHT = [
    (l00.to_minus_one_one_hidden, (lambda x: x.float() / 127.5 - 1,)),
    (l00.to_display_hidden, (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1),)),
    (l00.make_grid_hidden, (_grid,)),
    (l00.reconstruction_loss_hidden, (lambda a, b: F.mse_loss(a, b),)),
    (l01.gaussian_kl_hidden, (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(1),)),
    (l01.interpolate_hidden, (lambda z1, z2, s: torch.lerp(z1, z2, torch.linspace(0, 1, s, dtype=z1.dtype)[:, None]),)),
    (l02.quantize_hidden, (lambda z, e: torch.cdist(z, e).argmin(1),)),
    (l02.perplexity_hidden, (lambda i, k: torch.exp(torch.distributions.Categorical(
        probs=torch.bincount(i.flatten().long(), minlength=k).float()).entropy()),)),
    (l03.gan_losses_hidden, (lambda r, f: 0.5 * (F.relu(1 - r).mean() + F.relu(1 + f).mean()), lambda f: -f.mean())),
    (l04.causal_attention_hidden, (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),)),
    (l05.alphas_cumprod_hidden, (lambda b: torch.cumprod(1 - b, 0),)),
    (l05.q_sample_hidden, (lambda x0, t, n, ab: ab[t].view(-1, 1, 1).sqrt() * x0 + (1 - ab[t]).view(-1, 1, 1).sqrt() * n,)),
    (l06.classifier_free_guidance_hidden, (lambda u, c, w: torch.lerp(u, c, w),)),
    (l07.latent_scaling_hidden, (lambda z: 1 / float(z.std()), lambda f, x, s: f(x) * s, lambda f, z, s: f(z / s))),
    (l08.pareto_front_hidden, (_pareto,)),
    (l09.flow_matching_loss_hidden, (lambda model, x0, *, t, noise, time_scale=1000.0, **kw: F.mse_loss(
        model((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, t * time_scale), noise - x0),)),
    (l09.euler_step_hidden, (lambda x, t, t_next, v: torch.lerp(x, x + v, t_next - t),)),
    (l09.dpm_solver_pp_2m_step_hidden, (lambda x, d0, prev, a, s, an, sn, ap=None, sp=None:
                                        (sn / s) * x + an * (1 - sn * a / (an * s)) * d0,)),
]


@pytest.mark.parametrize("hidden, answers", RIGHT, ids=[h.__name__ for h, _ in RIGHT])
def test_hidden_tests_pass_right_answers_silently(hidden, answers, capsys):
    hidden(*answers)
    assert capsys.readouterr().out == ""


WRONG = [
    (l00.to_minus_one_one_hidden, (lambda x: (x.float() - x.float().min()) / 127.5 - 1,), "transposed view"),
    (l00.to_minus_one_one_hidden, (lambda x: x.view(-1).float().view(x.shape) / 127.5 - 1,), "view size is not compatible"),
    (l00.to_display_hidden, (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).movedim(-3, -1),), "-50"),
    (l00.make_grid_hidden, (lambda im, nrow, padding=2: _grid(im, nrow + 1, padding)[:, :-1],), "nrow"),
    (l00.reconstruction_loss_hidden, (lambda a, b: ((a - b) ** 2).mean().sqrt(),), "gradient"),
    (l01.gaussian_kl_hidden, (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - lv).sum(1),), "exactly 0"),
    (l01.gaussian_kl_hidden, (lambda mu, lv: 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(1).float(),), "float64"),
    (l01.interpolate_hidden, (lambda z1, z2, s: z1 + (z2 - z1) * (torch.arange(s, dtype=z1.dtype) / (s - 1))[:, None],), "steps=1"),
    (l02.quantize_hidden, (lambda z, e: torch.cdist(z, e).argmax(1),), "its own nearest code"),
    (l02.perplexity_hidden, (lambda i, k: torch.tensor(float(len(i.unique()))) * 1.5,), "single index"),
    (l03.gan_losses_hidden, (lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(), lambda f: -f.mean()), "d loss / d logits_real"),
    (l04.causal_attention_hidden, (lambda q, k, v: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True),), "float64"),
    (l05.alphas_cumprod_hidden, (lambda b: torch.cumprod(1 - b, 0).float(),), "float64"),
    (l05.q_sample_hidden, (lambda x0, t, n, ab: (1 - ab[t]).view(-1, 1, 1).sqrt() * x0 + ab[t].view(-1, 1, 1).sqrt() * n,), "must be x0"),
    (l06.classifier_free_guidance_hidden, (lambda u, c, w: c + w * (c - u),), "w = 0"),
    (l07.latent_scaling_hidden, (lambda z: 1 / float(z.abs().max()), lambda f, x, s: f(x) * s, lambda f, z, s: f(z / s)), "expected 0.25"),
    (l07.latent_scaling_hidden, (lambda z: 1 / float(z.std()), lambda f, x, s: f(x) * s, lambda f, z, s: f(z) / s), "decode(encode(x))"),
    (l08.pareto_front_hidden, (lambda c, e: torch.ones(len(c), dtype=torch.bool),), "[True, False]"),
    (l09.flow_matching_loss_hidden, (lambda model, x0, *, t, noise, time_scale=1000.0, **kw: F.mse_loss(
        model(t.view(-1, 1, 1, 1) * x0 + (1 - t.view(-1, 1, 1, 1)) * noise, t * time_scale), noise - x0),), "t = 0"),
    (l09.euler_step_hidden, (lambda x, t, t_next, v: (x + (t_next - t) * v).float(),), "float64"),
    (l09.dpm_solver_pp_2m_step_hidden, (lambda x, d0, prev, a, s, an, sn, ap=None, sp=None: (sn / s) * x + an * (
        1 - math.exp(math.log(a / s) - math.log(an / sn))) * d0,), "alpha = 0"),
]


@pytest.mark.parametrize("hidden, answers, fragment", WRONG, ids=[f"{h.__name__}-{i}" for i, (h, _, _) in enumerate(WRONG)])
def test_hidden_tests_refuse_wrong_answers(hidden, answers, fragment):
    msg = fails(hidden, *answers, ", hidden test", fragment, n_answers=len(answers))
    assert msg.startswith("Exercise ")


def test_hidden_tests_report_a_stub_as_not_done():
    fails(l01.gaussian_kl_hidden, stub, "Exercise 1.2 (gaussian_kl), hidden test is not done yet")
