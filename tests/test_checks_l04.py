"""Every lesson-04 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import CheckFailed
from minigen.course.checks import l04 as check

from _check_helpers import stub, fails


# ---------------------------------------------------------------------------- 4.1
def attention(q, k, v, *, scale=None, keep=lambda T: torch.ones(T, T).tril().bool(), dim=-1):
    d = q.shape[-1]
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(d) if scale is None else scale)
    T = q.shape[-2]
    s = s.masked_fill(~keep(T), float("-inf"))
    return torch.softmax(s, dim=dim) @ v


def test_causal_attention_correct(capsys):
    check.causal_attention(attention)
    check.causal_attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and out.startswith("✓ Exercise 4.1 causal_attention: passed")


def test_causal_attention_stub():
    fails(check.causal_attention, stub, "Exercise 4.1 (causal_attention) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda q, k, v: attention(q, k, v, keep=lambda T: torch.ones(T, T).bool()), "no mask"),
    (lambda q, k, v: attention(q, k, v, keep=lambda T: torch.ones(T, T).triu().bool()), "flipped"),
    (lambda q, k, v: attention(q, k, v, keep=lambda T: torch.ones(T, T).tril(-1).bool()), "hides the diagonal"),
    (lambda q, k, v: attention(q, k, v, scale=1.0), "1/√d"),
    (lambda q, k, v: attention(q, k, v, scale=1 / q.shape[-1]), "divided by d"),
    (lambda q, k, v: attention(q, k, v, dim=-2), "wrong dimension"),
])
def test_causal_attention_mistakes(answer, fragment):
    fails(check.causal_attention, answer, "Exercise 4.1", fragment)


def test_causal_attention_future_leak_and_gradients():
    # a "mask" off by one towards the future (sees j <= i + 1) is caught as wrong values
    msg = fails(check.causal_attention,
                lambda q, k, v: attention(q, k, v, keep=lambda T: torch.ones(T, T).tril(1).bool()),
                "wrong values")
    assert "Likely mistake" not in msg
    fails(check.causal_attention, lambda q, k, v: attention(q, k, v).detach(), "requires_grad")
    fails(check.causal_attention, lambda q, k, v: attention(q, k, v).double(), "dtype")


# ---------------------------------------------------------------------------- 4.2
def good_sample(logits, temperature=1.0, top_k=None, generator=None):
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def signature(f):
    """A positional (logits, t, k, g) answer with the exercise's signature and defaults."""
    def sample_next(logits, temperature=1.0, top_k=None, generator=None):
        return f(logits, temperature, top_k, generator)
    return sample_next


def gumbel_max(logits, temperature=1.0, top_k=None, generator=None):
    """Another valid formulation: argmax of logits + Gumbel noise samples the softmax."""
    z = logits / temperature
    if top_k is not None:
        z = z.masked_fill(z < torch.topk(z, top_k, dim=-1).values[..., -1:], float("-inf"))
    u = torch.rand(z.shape, generator=generator).clamp(1e-20, 1)
    return (z - (-u.log()).log()).argmax(-1)


def test_sample_next_correct(capsys):
    check.sample_next(good_sample)
    check.sample_next(gumbel_max)
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and out.startswith("✓ Exercise 4.2 sample_next: passed")


def test_sample_next_generator_and_defaults():
    # the global RNG instead of the generator passed in
    fails(check.sample_next, signature(lambda l, t, k, g: good_sample(l, t, k, None)), "same `generator`",
          "generator=generator")

    def wrong_default(logits, temperature=0.5, top_k=None, generator=None):
        return good_sample(logits, temperature, top_k, generator)

    fails(check.sample_next, wrong_default, "temperature=1.0, top_k=None")
    fails(check.sample_next, lambda l, t, k, g: good_sample(l, t, k, g), "no default in your signature")


def test_sample_next_stub():
    fails(check.sample_next, stub, "Exercise 4.2 (sample_next) is not done yet")


def smallest_k(logits, temperature=1.0, top_k=None, generator=None):
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1, largest=False).values[..., -1:]
        logits = logits.masked_fill(logits > kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def temperature_after_softmax(logits, temperature=1.0, top_k=None, generator=None):
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1) / temperature
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def uniform_top_k(logits, temperature=1.0, top_k=None, generator=None):
    logits = logits / temperature
    if top_k is None:
        return good_sample(logits, 1.0, None, generator)
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return torch.multinomial((logits >= kth).float(), 1, generator=generator).squeeze(-1)


def in_place(logits, temperature=1.0, top_k=None, generator=None):
    logits /= temperature
    return good_sample(logits, 1.0, top_k, generator)


@pytest.mark.parametrize("answer, fragment", [
    (smallest_k, "*smallest*"),
    (temperature_after_softmax, "temperature is ignored"),
    (signature(lambda l, t, k, g: good_sample(l, 1 / t, k, g)), "multiplied by the temperature"),
    (signature(lambda l, t, k, g: l.argmax(-1)), "argmax"),
    (uniform_top_k, "drawn uniformly"),
    (signature(lambda l, t, k, g: good_sample(l, t, k, g)[:, None]), ".squeeze(-1)"),
    (in_place, "in place"),
])
def test_sample_next_mistakes(answer, fragment):
    fails(check.sample_next, answer, "Exercise 4.2", fragment)


# ---------------------------------------------------------------------------- 4.3
def good_cache(q, k_new, v_new, past_k, past_v):
    k_all, v_all = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
    s, t = past_k.shape[2], q.shape[2]
    keep = torch.arange(s + t)[None, :] <= torch.arange(s, s + t)[:, None]
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=keep)
    return y, k_all, v_all


def test_attend_with_cache_correct(capsys):
    check.attend_with_cache(good_cache)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ Exercise 4.3 attend_with_cache: passed")


def test_attend_with_cache_stub():
    fails(check.attend_with_cache, stub, "Exercise 4.3 (attend_with_cache) is not done yet")


def overwrite(q, k_new, v_new, past_k, past_v):
    return attention(q, k_new, v_new), k_new, v_new


def only_new(q, k_new, v_new, past_k, past_v):
    _, k_all, v_all = good_cache(q, k_new, v_new, past_k, past_v)
    return attention(q, k_new, v_new), k_all, v_all


def top_left(q, k_new, v_new, past_k, past_v):
    k_all, v_all = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
    return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True), k_all, v_all


def no_mask(q, k_new, v_new, past_k, past_v):
    k_all, v_all = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
    return F.scaled_dot_product_attention(q, k_all, v_all), k_all, v_all


def prepend(q, k_new, v_new, past_k, past_v):
    y, _, _ = good_cache(q, k_new, v_new, past_k, past_v)
    return y, torch.cat([k_new, past_k], 2), torch.cat([v_new, past_v], 2)


@pytest.mark.parametrize("answer, fragment", [
    (overwrite, "overwritten"),
    (only_new, "only to the new tokens"),
    (top_left, "top-left"),
    (no_mask, "mask is still needed"),
    (prepend, "go at the end"),
    (lambda *a: good_cache(*a)[0], "three things"),
])
def test_attend_with_cache_mistakes(answer, fragment):
    fails(check.attend_with_cache, answer, "Exercise 4.3", fragment)
