"""Checks for lesson 04 (the transformer prior): causal attention, top-k sampling, the KV cache.

Each check calls the learner's function on fresh seeded random inputs and compares it with
a reference written here in float64 (never minigen.transformer's own code). Wrong answers
that match a typical mistake get a "Likely mistake" line.
"""

from __future__ import annotations

import math

import torch

from minigen.course.checks._framework import Exercise, seeded, checker, show_hint

__all__ = ["hint", "causal_attention", "sample_next", "attend_with_cache", "causal_attention_hidden"]


# ---------------------------------------------------------------------------- references
def _attention64(q, k, v, *, offset=0, mask="causal", scale=None, softmax_dim=-1):
    """softmax(q kᵀ · scale + mask) v in float64. Query i sits at absolute position offset + i
    and may see key j when j <= offset + i ("causal"); other masks give the wrong variants."""
    q, k, v = (z.detach().double() for z in (q, k, v))
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    tq, tk = s.shape[-2], s.shape[-1]
    i = torch.arange(tq)[:, None] + offset
    j = torch.arange(tk)[None, :]
    allowed = {"causal": j <= i, "none": torch.ones_like(j <= i), "future": j >= i,
               "top_left": j <= i - offset}[mask]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=softmax_dim) @ v


# ---------------------------------------------------------------------------- 4.1
@checker
def causal_attention(fn) -> None:
    """Exercise 4.1: softmax(q kᵀ/√d + causal mask) v for q, k, v (N, n_head, T, head_dim)."""
    ex = Exercise("4.1", "causal_attention")
    g = torch.Generator().manual_seed(41)
    for shape in [(2, 3, 7, 8), (1, 2, 5, 16), (3, 1, 1, 4)]:
        q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
        before = [z.detach().clone() for z in (q, k, v)]
        out = ex.call(fn, q, k, v)
        out = ex.tensor(out, shape=shape, dtype=torch.float32)
        if any(not torch.equal(z.detach(), b) for z, b in zip((q, k, v), before)):
            ex.fail("your function changed q, k or v in place; use out-of-place operations")
        if not torch.isfinite(out).all():
            rows = sorted({int(r) for r in (~torch.isfinite(out)).nonzero()[:, 2]})
            hint = None
            if 0 in rows:
                hint = ("position 0 attends to nothing: your mask hides the diagonal too (e.g. "
                        "torch.tril(..., diagonal=-1) or `j >= i` masked). A position must see itself: "
                        "mask only keys j > i")
            ex.fail(f"the output has NaN/inf at positions {rows} (dim 2)", mistake=hint)
        d = shape[-1]
        ref = _attention64(q, k, v)
        ex.close(out, ref, atol=1e-5, rtol=1e-4, mistakes=[
            (_attention64(q, k, v, mask="none"),
             "no mask: every position sees the future. Set scores[j > i] to -inf before the softmax"),
            (_attention64(q, k, v, mask="future"),
             "the mask is flipped (triu kept instead of tril): position i must see keys j <= i, "
             "not j >= i. Keep torch.tril(torch.ones(T, T)), mask where it is 0"),
            (_attention64(q, k, v, scale=1.0),
             "missing the 1/√d scaling: scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)"),
            (_attention64(q, k, v, scale=1.0 / d),
             "you divided by d; the scaling is 1/√d (head_dim ** -0.5)"),
            (_attention64(q, k, v, scale=math.sqrt(d)),
             "you multiplied by √d; divide the scores by √d"),
            (_attention64(q, k, v, softmax_dim=-2),
             "softmax over the wrong dimension: each query's weights over the keys must sum to 1, "
             "softmax(dim=-1)"),
        ])
        # causality, directly: changing the future must not change the past
        t = shape[2]
        if t > 2:
            p = t // 2
            k2, v2 = k.detach().clone(), v.detach().clone()
            k2[:, :, p:] += 3 * torch.randn(k2[:, :, p:].shape, generator=g)
            v2[:, :, p:] += 3 * torch.randn(v2[:, :, p:].shape, generator=g)
            out2 = ex.call(fn, q.detach(), k2, v2)
            if not torch.allclose(out2[:, :, :p], out[:, :, :p].detach(), atol=1e-5):
                ex.fail(f"changing keys/values at positions >= {p} changed the outputs at positions < {p}: "
                        "information leaks from the future", mistake="check the mask")
        if t > 1:  # with one position the weights are always 1: no gradient reaches q or k
            ex.gradients_flow(out, {"q": q, "k": k, "v": v})
    ex.passed("values vs float64 reference, causality, 1/√d scaling, gradients")


# ---------------------------------------------------------------------------- 4.2
def _probs64(logits, temperature, top_k):
    z = logits.double() / temperature
    if top_k is not None:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.softmax(z, dim=-1)


@checker
def sample_next(fn) -> None:
    """Exercise 4.2: one token per row, temperature -> top-k -> softmax -> multinomial."""
    ex = Exercise("4.2", "sample_next")
    g = torch.Generator().manual_seed(42)
    groups, reps, vocab = 3, 4000, 10
    base = torch.randn(groups, vocab, generator=g) * 1.5       # continuous: no ties
    logits = base.repeat_interleave(reps, dim=0)                # (groups * reps, vocab)
    # every way of passing the arguments: the defaults (temperature 1, no top-k, the global
    # RNG), by position, by keyword; top_k = 1 (greedy) and top_k = vocab (no cut)
    cases = [(1.0, None, "default"), (1.0, 3, "positional"), (0.5, 4, "keyword"), (2.0, 5, "positional"),
             (0.7, 1, "keyword"), (1.3, vocab, "keyword")]
    for temperature, top_k, style in cases:
        x = logits.clone()
        with seeded(420):
            if style == "default":
                out = ex.call(fn, x)
            elif style == "positional":
                out = ex.call(fn, x, temperature, top_k, torch.Generator().manual_seed(7))
            else:
                out = ex.call(fn, x, temperature=temperature, top_k=top_k,
                              generator=torch.Generator().manual_seed(7))
        what = f"the sampled tokens (temperature={temperature}, top_k={top_k})"
        if isinstance(out, torch.Tensor) and out.shape == (len(x), 1):
            ex.fail(f"{what} have shape {tuple(out.shape)}, expected ({len(x)},)",
                    mistake="torch.multinomial returns (N, 1): .squeeze(-1)")
        out = ex.tensor(out, shape=(len(x),), dtype=torch.long, what=what)
        if not torch.equal(x, logits):
            ex.fail("your function changed the logits in place (e.g. logits /= temperature); "
                    "use out-of-place operations")
        if int(out.min()) < 0 or int(out.max()) >= vocab:
            ex.fail(f"{what} must lie in [0, {vocab}), got [{int(out.min())}, {int(out.max())}]")
        if top_k is not None:
            rank = (logits > logits.gather(1, out[:, None])).sum(1)  # 0 = the best token
            bad = int((rank >= top_k).sum())
            if bad:
                smallest = bool((rank >= vocab - top_k).all())
                ex.fail(f"{bad} of {len(out)} {what} are not among the {top_k} most likely tokens",
                        mistake="you kept the k *smallest* logits: torch.topk(..., largest=True) "
                                "(the default) and mask logits below the k-th largest" if smallest else
                        "mask every logit below the k-th largest with -inf before the softmax")
        freq = torch.stack([torch.bincount(out[i * reps:(i + 1) * reps], minlength=vocab)
                            for i in range(groups)]).double() / reps
        expected = _probs64(base, temperature, top_k)

        def z_max(p):  # largest deviation in standard errors; impossible tokens must never appear
            if bool(((p == 0) & (freq > 0)).any()):
                return math.inf
            return float(((freq - p).abs() / (p * (1 - p) / reps).sqrt().clamp_min(1e-12)).max())

        if z_max(expected) <= 6.0:
            continue
        msg = (f"{what} do not follow softmax(top_k(logits / temperature)): the frequencies of "
               f"{reps} draws per row are off by up to {z_max(expected):.1f} standard errors")
        greedy = torch.zeros_like(expected).scatter(1, base.argmax(1, keepdim=True), 1.0)
        candidates = [
            (_probs64(base, 1.0, top_k), "temperature is ignored: divide the logits by it *before* "
                                         "the softmax (dividing probabilities by it changes nothing, "
                                         "multinomial renormalises)"),
            (_probs64(base, 1.0 / temperature, top_k), "you multiplied by the temperature; divide: "
                                                       "logits / temperature"),
            (greedy, "you took the argmax; sample with torch.multinomial(probs, 1)"),
        ]
        if top_k is not None:
            candidates.append((_probs64(base, temperature, None) * (expected > 0),
                               "the top-k mask was applied but the softmax was taken before it; "
                               "mask the logits with -inf, then softmax (or renormalise the kept probabilities)"))
            kth = torch.topk(base, top_k, dim=-1).values[..., -1:]
            uni = (base >= kth).double() / top_k
            candidates.append((uni, "the k best tokens are drawn uniformly: keep their logits "
                                    "(set only the others to -inf), not 1/k each"))
        for p, explanation in candidates:
            p = p / p.sum(-1, keepdim=True)
            if z_max(p) <= 6.0:
                ex.fail(msg, mistake=explanation)
        ex.fail(msg)

    # reproducibility: the draw comes from the generator passed in, not from the global RNG
    x = base * 0.3  # flat enough that two different draws differ
    x = x.repeat(20, 1)

    def draw(seed, global_seed):
        with seeded(global_seed):
            return ex.tensor(ex.call(fn, x.clone(), 1.0, None, torch.Generator().manual_seed(seed)),
                             shape=(len(x),), what="the sampled tokens")

    a, b, c = draw(3, 1), draw(3, 2), draw(4, 1)
    if not torch.equal(a, b):
        ex.fail("the same `generator` gave different tokens (the global RNG decided them)",
                mistake="pass the generator on: torch.multinomial(probs, 1, generator=generator)")
    if torch.equal(a, c):
        ex.fail("generators with different seeds gave the same tokens: the draw must use the generator "
                "passed in")
    ex.passed("never outside the top k, frequencies match temperature/top-k over 12,000 draws, "
              "defaults and keywords, draws from the generator passed in")


# ---------------------------------------------------------------------------- 4.3
@checker
def attend_with_cache(fn) -> None:
    """Exercise 4.3: append new k, v to the cache and attend the new queries over all of it."""
    ex = Exercise("4.3", "attend_with_cache")
    g = torch.Generator().manual_seed(43)
    # one step at a time, as in sampling: s cached positions, t new ones; batch, heads and head
    # size vary too (a single head, an odd head size)
    for s, t, n, h, d in [(0, 4, 2, 3, 8), (5, 1, 2, 3, 8), (4, 3, 3, 1, 5), (7, 2, 1, 2, 16)]:
        q, k_new, v_new = (torch.randn(n, h, t, d, generator=g) for _ in range(3))
        past_k, past_v = (torch.randn(n, h, s, d, generator=g) for _ in range(2))
        before = [z.clone() for z in (q, k_new, v_new, past_k, past_v)]
        out = ex.call(fn, q, k_new, v_new, past_k, past_v)
        case = f" (cache of {s} positions, {t} new)"
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            ex.fail("return three things: (y, k_all, v_all)" + case)
        y, k_all, v_all = out
        if any(not torch.equal(a, b) for a, b in zip((q, k_new, v_new, past_k, past_v), before)):
            ex.fail("your function changed its inputs in place; build new tensors with torch.cat")
        for name, z, new, past in [("k_all", k_all, k_new, past_k), ("v_all", v_all, v_new, past_v)]:
            if isinstance(z, torch.Tensor) and tuple(z.shape) == tuple(new.shape) and s > 0:
                ex.fail(f"{name} has shape {tuple(z.shape)}, expected {(n, h, s + t, d)}" + case,
                        mistake="the cache was overwritten with the new keys/values; append them: "
                                "torch.cat([past_k, k_new], dim=2)")
            z = ex.tensor(z, shape=(n, h, s + t, d), dtype=torch.float32, what=name + case)
            ex.close(z, torch.cat([past, new], dim=2), atol=0.0, what=name + case, mistakes=[
                (torch.cat([new, past], dim=2), "the new positions go at the end: torch.cat([past, new], dim=2)"),
            ])
        y = ex.tensor(y, shape=(n, h, t, d), dtype=torch.float32, what="y" + case)
        k_ref, v_ref = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
        mistakes = [
            (_attention64(q, k_new, v_new), "you attended only to the new tokens; the queries must see "
                                            "every cached position too (use k_all, v_all)"),
            (_attention64(q, k_ref, v_ref, offset=s, scale=1.0), "missing the 1/√d scaling"),
        ]
        if s > 0:
            mistakes.append((_attention64(q, k_ref, v_ref, offset=s, mask="top_left"),
                             "the causal mask is aligned to the top-left corner: new query i sits at "
                             "position s + i and may see keys j <= s + i"))
        if t > 1:
            mistakes.append((_attention64(q, k_ref, v_ref, offset=s, mask="none"),
                             "with several new positions the mask is still needed: new query i "
                             "must not see the new keys after it"))
        ex.close(y, _attention64(q, k_ref, v_ref, offset=s), atol=1e-5, rtol=1e-4,
                 what="y" + case, mistakes=mistakes)

    # the real test: a whole sequence fed in pieces equals one uncached causal pass
    T = 9
    q, k, v = (torch.randn(n, h, T, d, generator=g) for _ in range(3))
    ks, vs = k[:, :, :0], v[:, :, :0]
    ys = []
    for a, b in [(0, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9)]:
        y, ks, vs = ex.call(fn, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ks, vs)
        ys.append(y)
    ex.close(torch.cat(ys, dim=2), _attention64(q, k, v), atol=1e-5, rtol=1e-4,
             what="the outputs of a 9-token sequence fed in 6 pieces through your cache")
    ex.passed("appends, attends over every cached position, equals uncached attention")


# ---------------------------------------------------------------------------- hidden tests
@checker
def causal_attention_hidden(fn) -> None:
    """Hidden test of 4.1: one position (the output is v), head size 1, float64 kept."""
    ex = Exercise("4.1", "causal_attention", hidden=True)
    g = torch.Generator().manual_seed(410)
    q, k, v = (torch.randn(2, 3, 1, 4, generator=g) for _ in range(3))
    out = ex.tensor(ex.call(fn, q, k, v), shape=(2, 3, 1, 4), what="the output for a single position")
    ex.close(out, v, atol=1e-6, what="the output for a single position (it can only attend to itself: v)")
    q, k, v = (torch.randn(1, 2, 6, 1, generator=g, dtype=torch.float64) for _ in range(3))
    out = ex.tensor(ex.call(fn, q, k, v), shape=(1, 2, 6, 1), dtype=torch.float64, what="the float64 output")
    ex.close(out, _attention64(q, k, v), atol=1e-10, what="the output with head size 1 (float64)")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '4.1': (
        'Scaled dot-product attention where position i may only look at positions 0..i: the '
        'scores of future positions are removed before the softmax.',
        'Scores: queries times transposed keys, divided by the square root of the head size. Set '
        'the scores above the diagonal (key index greater than query index) to minus infinity, '
        'softmax over the keys (last axis), multiply by the values.',
    ),
    '4.2': (
        'Temperature rescales the logits before the softmax; top-k keeps only the k most likely '
        'tokens. Then draw one token per row, using the generator you were given.',
        "Divide the logits by the temperature. If top_k is given, find each row's k-th largest "
        'logit and set every logit below it to minus infinity. Softmax over the vocabulary, then '
        "draw one sample per row with torch's multinomial sampler, passing the generator; return "
        'the indices as a 1-D int64 tensor.',
    ),
    '4.3': (
        'With a cache, the t new queries attend over the s cached positions and the t new ones. '
        'New query i sits at absolute position s + i, so it sees every cached key and the new '
        'keys up to itself.',
        'Append the new keys and values after the cached ones along the sequence axis. Compute '
        'scaled scores of the new queries against all s + t keys; mask key j for query i when j >'
        ' s + i; softmax over the keys, multiply by the values. Return the output and the two '
        'grown caches.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
