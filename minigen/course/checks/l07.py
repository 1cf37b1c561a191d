"""Checks for lesson 07 (latent diffusion with text prompts).

Each check calls the learner's code on fresh seeded inputs and compares it with a reference
written here (float64 formulas, small fake components), never minigen.nn / minigen.ldm.
Wrong answers that match a typical mistake get a "Likely mistake" line.

Conventions checked (latent-diffusion / Stable Diffusion, diffusers):

    cross-attention   q = x W_q,  k = c W_k,  v = c W_v          (no biases; c = the text context)
                      per head: softmax(q k^T / sqrt(dim_head)) v  (softmax over the text tokens)
                      heads split as (N, L, heads, dim_head), merged back, then an output Linear
    latent scaling    scale_factor = 1 / std(latents)  (one number over all elements)
                      encode: z = scale_factor * E(x);  decode: x = D(z / scale_factor)
    text-to-image     context = text_encoder(tokenizer(prompts)), null = text_encoder(tokenizer(""))
                      out = out_uncond + w (out_cond - out_uncond), DDIM (eta = 0, no clipping in
                      latent space), then decode(z / scale_factor). The U-Net's output is eps or v
                      (prediction_type); guidance combines either linearly, and the DDIM step turns
                      it into x0_hat, eps_hat:  eps: x0 = (z_t - sqrt(1-ab) eps) / sqrt(ab)
                                                 v:   x0 = sqrt(ab) z_t - sqrt(1-ab) v,
                                                      eps = sqrt(1-ab) z_t + sqrt(ab) v
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minigen.course.checks._framework import CheckFailed, Exercise, _fmt_shape, seeded, checker, show_hint

__all__ = ["hint", "cross_attention", "latent_scaling", "text_to_image", "latent_scaling_hidden"]


# ---------------------------------------------------------------------------- 7.1
def _attention64(x, context, wq, wk, wv, w_out, b_out, heads, *, scale="dim_head", softmax_dim=-1,
                 kv_from_x=False, split="right", merge="right", out_proj=True, one_head=False):
    """Reference multi-head cross-attention in float64; the keywords build the wrong variants.

    Returns (output (N, L, D_q), attention (N, heads, L, M))."""
    x, c = x.double(), (x if kv_from_x else context).double()
    wq, wk, wv = wq.double(), wk.double(), wv.double()
    n, length, _ = x.shape
    m = c.shape[1]
    inner = wq.shape[0]
    h = 1 if one_head else heads
    d = inner // heads  # dim_head (the learner's scale uses this even in the one-head variant)
    q, k, v = x @ wq.T, c @ wk.T, c @ wv.T  # (N, L|M, inner)

    def split_heads(z, length_):
        if split == "right":  # (N, L, h, d) -> (N, h, L, d)
            return z.view(n, length_, h, inner // h).transpose(1, 2)
        return z.reshape(n, h, length_, inner // h)  # wrong: reshape without the transpose

    q, k, v = split_heads(q, length), split_heads(k, m), split_heads(v, m)
    s = {"dim_head": d**-0.5, "d": 1.0 / d, "none": 1.0, "inner": inner**-0.5}[scale]
    attn = torch.softmax(q @ k.transpose(-1, -2) * s, dim=softmax_dim)  # (N, h, L, M)
    out = attn @ v  # (N, h, L, d)
    if merge == "right":
        out = out.transpose(1, 2).reshape(n, length, inner)
    else:  # wrong: reshape (N, h, L, d) straight to (N, L, h*d)
        out = out.reshape(n, length, inner)
    if out_proj:
        out = out @ w_out.double().T + (0 if b_out is None else b_out.double())
    return out, attn


def _projection_keys(ex, sd):
    """The state_dict keys of the four projections: to_q, to_k, to_v and to_out (to_out.0 when
    to_out is an nn.Sequential(Linear, Dropout), as in latent diffusion)."""
    keys = {}
    for name in ("to_q", "to_k", "to_v", "to_out"):
        for prefix in (name, f"{name}.0"):
            if isinstance(sd.get(f"{prefix}.weight"), torch.Tensor) and sd[f"{prefix}.weight"].dim() == 2:
                keys[name] = prefix
                break
        else:
            ex.fail(f"your module has no Linear layer called `{name}` (its parameters are "
                    f"{sorted(sd) or 'none'}); name the projections to_q, to_k, to_v and to_out as "
                    "latent diffusion and diffusers do, so the trained weights can be loaded into your module")
    return keys


def _build_attention(ex, cls, query_dim, context_dim, heads, dim_head, g):
    """Instantiate the learner's class, check its parameter shapes and load seeded random weights.

    Black box: only state_dict() (names and shapes) and load_state_dict() are used.
    Returns the module and the weights loaded: {name: (weight, bias or None)}.
    """
    ex.callable(cls)
    m = ex.call(cls, query_dim=query_dim, context_dim=context_dim, heads=heads, dim_head=dim_head)
    sd = ex.call(m.state_dict)
    if not isinstance(sd, dict):
        ex.fail("CrossAttention(...) should build an nn.Module (its state_dict() gave "
                f"{type(sd).__name__})")
    inner = heads * dim_head
    keys = _projection_keys(ex, sd)
    want = {"to_q": (query_dim, inner), "to_k": (context_dim, inner), "to_v": (context_dim, inner),
            "to_out": (inner, query_dim)}
    for name, (fan_in, fan_out) in want.items():
        out_f, in_f = sd[f"{keys[name]}.weight"].shape
        if (in_f, out_f) != (fan_in, fan_out):
            mistake = None
            if name in ("to_k", "to_v") and in_f == query_dim:
                mistake = ("keys and values are projections of the *context* (the text), so their "
                           "input size is context_dim, not query_dim")
            elif fan_out == inner and out_f != inner:
                mistake = "the projections map to heads * dim_head features (all heads side by side)"
            ex.fail(f"`{name}` is Linear({in_f}, {out_f}); with query_dim="
                    f"{query_dim}, context_dim={context_dim}, heads={heads}, dim_head={dim_head} it "
                    f"should be Linear({fan_in}, {fan_out})", mistake=mistake)
    for name in ("to_q", "to_k", "to_v"):
        if f"{keys[name]}.bias" in sd:
            ex.fail(f"`{name}` has a bias; latent diffusion's q, k, v projections have none",
                    mistake=f"use nn.Linear(..., bias=False) for {name} (the output projection to_out "
                            "keeps its bias)")
    # seeded weights, large enough that the attention is far from uniform: the scale matters
    new_sd, weights = {k: v.clone() for k, v in sd.items()}, {}
    for name, (fan_in, fan_out) in want.items():
        gain = 2.0 if name in ("to_q", "to_k") else 1.0
        w = torch.randn(fan_out, fan_in, generator=g) * gain / math.sqrt(fan_in)
        new_sd[f"{keys[name]}.weight"] = w
        b = None
        if f"{keys[name]}.bias" in sd:
            b = torch.randn(fan_out, generator=g) * 0.1
            new_sd[f"{keys[name]}.bias"] = b
        weights[name] = (w, b)
    ex.call(m.load_state_dict, new_sd)
    ex.call(m.eval)
    return m, weights


@checker
def cross_attention(cls) -> None:
    """Exercise 7.1: multi-head cross-attention, from image tokens (queries) to text tokens."""
    ex = Exercise("7.1", "cross_attention")
    g = torch.Generator().manual_seed(71)
    # case 1: query_dim == context_dim (so attending to x itself runs and can be recognised)
    # and heads * dim_head == query_dim (so a missing output projection keeps the shape)
    # case 2: all sizes different
    cases = [dict(query_dim=32, context_dim=32, heads=4, dim_head=8, n=3, length=10, m=7),
             dict(query_dim=24, context_dim=40, heads=3, dim_head=10, n=2, length=9, m=5)]
    for cs in cases:
        qd, cd, heads, dh = cs["query_dim"], cs["context_dim"], cs["heads"], cs["dim_head"]
        n, length, m = cs["n"], cs["length"], cs["m"]
        module, layers = _build_attention(ex, cls, qd, cd, heads, dh, g)
        x = torch.randn(n, length, qd, generator=g).requires_grad_()
        context = torch.randn(n, m, cd, generator=g).requires_grad_()
        case = f" (query_dim={qd}, context_dim={cd}, heads={heads}, dim_head={dh}, {length} queries, {m} text tokens)"
        out = ex.call(module, x, context)
        if isinstance(out, tuple):
            ex.fail("module(x, context) returned a tuple; return only the output tensor "
                    "(and (output, attention) only when return_attention=True)")
        out = ex.tensor(out, shape=(n, length, qd), dtype=torch.float32, what="the output" + case)
        w = dict(wq=layers["to_q"][0], wk=layers["to_k"][0], wv=layers["to_v"][0], w_out=layers["to_out"][0],
                 b_out=layers["to_out"][1])
        xd, cdt = x.detach(), context.detach()

        def ref(**kw):
            return _attention64(xd, cdt, heads=heads, **w, **kw)[0]

        mistakes = [
            (ref(scale="d"), "the scores are divided by dim_head; divide by its square root: "
                             "softmax(q k^T / sqrt(dim_head))"),
            (ref(scale="none"), "the scores are not scaled: softmax(q k^T / sqrt(dim_head)) keeps "
                                "their variance near 1 so the softmax does not saturate"),
            (ref(scale="inner"), "the scale uses the full width heads * dim_head; each head is a "
                                 "separate attention of size dim_head, so scale by dim_head^-1/2"),
            (ref(softmax_dim=-2), "the softmax runs over the queries (image positions); it must run "
                                  "over the keys (the text tokens, the last axis of q k^T), so each "
                                  "image position's weights over the prompt sum to 1"),
            (ref(merge="wrong"), "the heads are merged in the wrong order: (N, heads, L, d) must be "
                                 "transposed to (N, L, heads, d) before the reshape to (N, L, heads*d)"),
            (ref(split="wrong"), "the heads are split in the wrong order: view (N, L, heads*d) as "
                                 "(N, L, heads, d) and then transpose to (N, heads, L, d); a plain "
                                 "reshape to (N, heads, L, d) mixes positions and features"),
            (ref(split="wrong", merge="wrong"), "the heads are split and merged with plain reshapes: "
                                                "view as (N, L, heads, d) and transpose(1, 2), and undo "
                                                "it the same way"),
            (ref(one_head=True), "all features attend as one head; split them into `heads` heads of "
                                 "dim_head each, attend per head, then merge"),
        ]
        if qd == cd:
            mistakes.append((ref(kv_from_x=True), "keys and values come from x: that is self-attention. "
                                                  "In cross-attention q comes from the image tokens x, "
                                                  "k and v from the text context"))
        if heads * dh == qd:
            mistakes.append((ref(out_proj=False), "the output projection is missing: the merged heads go "
                                                  "through to_out (a Linear back to query_dim)"))
        expected, expected_attn = _attention64(xd, cdt, heads=heads, **w)
        ex.close(out, expected, atol=1e-5, rtol=1e-4, what="the output" + case, mistakes=mistakes)

        # the attention map, for the notebook's pictures
        res = ex.call(module, x, context, return_attention=True)
        if not (isinstance(res, tuple) and len(res) == 2):
            ex.fail("module(x, context, return_attention=True) should return (output, attention)")
        out2, attn = res
        ex.tensor(out2, shape=(n, length, qd), what="the output with return_attention=True")
        attn = ex.tensor(attn, shape=(n, heads, length, m), what="the attention weights" + case)
        sums = attn.detach().double().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            mistake = None
            over_queries = attn.detach().double().sum(-2)
            if torch.allclose(over_queries, torch.ones_like(over_queries), atol=1e-4):
                mistake = "the softmax runs over the queries; it must run over the text tokens (dim=-1)"
            ex.fail("the attention weights of each query (the last axis, over the text tokens) should "
                    f"sum to 1; they sum to values between {float(sums.min()):.3g} and {float(sums.max()):.3g}",
                    mistake=mistake)
        ex.close(attn, expected_attn, atol=1e-5, rtol=1e-4, what="the attention weights" + case,
                 mistakes=[(_attention64(xd, cdt, heads=heads, scale="d", **w)[1],
                            "the scores are divided by dim_head; divide by its square root")])
        ex.close(out2, expected, atol=1e-5, rtol=1e-4, what="the output with return_attention=True")
        ex.gradients_flow(out, {"x": x, "context": context}, what="the output")
    ex.passed("projections without bias, scale dim_head^-1/2, softmax over text tokens, heads, gradients")


# ---------------------------------------------------------------------------- 7.2
def _fake_encoder(g, c_in=3, c_lat=4):
    """A small nonlinear 'encoder' E: images (N, 3, 16, 16) -> latents (N, 4, 4, 4)."""
    conv = nn.Conv2d(c_in, c_lat, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    conv.requires_grad_(False)
    return lambda x: 3.0 * torch.tanh(conv(x))


def _fake_decoder(g, c_lat=4, c_out=3):
    """A small nonlinear 'decoder' D: latents (N, 4, 4, 4) -> images (N, 3, 16, 16) in (-1, 1)."""
    conv = nn.ConvTranspose2d(c_lat, c_out, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.4)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.2)
    conv.requires_grad_(False)
    return lambda z: torch.tanh(conv(z))


def _as_number(ex, value, what):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            ex.fail(f"{what} has shape {_fmt_shape(value.shape)}; it should be one number for all latents",
                    mistake="you computed one std per channel (or per image); Stable Diffusion uses a single "
                            "global factor: 1 / latents.std() over every element")
        value = float(value.detach())
    if not isinstance(value, (int, float)):
        ex.fail(f"{what} should be a Python float (or a one-element tensor), got {type(value).__name__}")
    return float(value)


@checker
def latent_scaling(fit_scale_factor, encode, decode) -> None:
    """Exercise 7.2: the scale factor 1/std, and scaling on the way in and out of latent space."""
    ex = Exercise("7.2", "latent_scaling")
    for fn in (fit_scale_factor, encode, decode):
        ex.callable(fn)
    g = torch.Generator().manual_seed(72)

    # (a) fit_scale_factor: 1 / std over all elements
    ch_std = torch.tensor([0.6, 2.5, 5.0, 1.2]).view(1, 4, 1, 1)
    ch_mean = torch.tensor([0.3, -0.8, 1.1, 0.0]).view(1, 4, 1, 1)
    lat = torch.randn(128, 4, 8, 8, generator=g) * ch_std + ch_mean
    before = lat.clone()
    s = _as_number(ex, ex.call(fit_scale_factor, lat), "the scale factor")
    if not torch.equal(lat, before):
        ex.fail("fit_scale_factor changed the latents in place; compute the statistic without modifying them")
    lat64 = lat.double()
    std = float(lat64.std())
    expected = 1.0 / std
    per_ch = lat64.transpose(0, 1).reshape(4, -1).std(1)
    wrong = [
        (std, "that is the std itself; the scale factor is its inverse, 1 / std, so that scaled latents "
              "have unit variance like the noise"),
        (1.0 / std**2, "that is 1 / variance; the scale factor is 1 / std (a standard deviation)"),
        (1.0 / float(per_ch.mean()), "you averaged the per-channel stds; take the std over every element "
                                     "at once (it also counts the differences between the channel means)"),
        (1.0 / float(lat64.abs().mean()), "that is 1 / mean(|z|); the scale factor is 1 / std"),
        (1.0 / float(lat64.abs().max()), "that is 1 / max|z|; the scale factor is 1 / std"),
    ]
    tol = 2e-3 * expected  # the unbiased and the biased std both pass
    if abs(s - expected) > tol:
        msg = f"the scale factor is {s:.6g}, expected 1 / std = {expected:.6g}"
        for value, explanation in wrong:
            if abs(s - value) <= 2e-3 * abs(value):
                ex.fail(msg, mistake=explanation)
        ex.fail(msg)

    # (b) encode: z = scale_factor * E(x)
    enc, dec = _fake_encoder(g), _fake_decoder(g)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    sf = 0.37
    z = ex.tensor(ex.call(encode, enc, x, sf), shape=(6, 4, 4, 4), what="encode(E, x, scale_factor)")
    ex.close(z, enc(x) * sf, atol=1e-5, rtol=1e-5, what="encode(E, x, scale_factor)", mistakes=[
        (enc(x), "the latents are not scaled: multiply the autoencoder's latents by scale_factor"),
        (enc(x) / sf, "you divided by scale_factor when encoding; encoding multiplies (z = scale_factor * E(x)), "
                      "decoding divides"),
        (enc(x * sf), "you scaled the image before encoding; scale the *latents*: scale_factor * E(x)"),
    ])

    # (c) decode: x = D(z / scale_factor)
    z = torch.randn(6, 4, 4, 4, generator=g)
    out = ex.tensor(ex.call(decode, dec, z, sf), shape=(6, 3, 16, 16), what="decode(D, z, scale_factor)")
    ex.close(out, dec(z / sf), atol=1e-5, rtol=1e-5, what="decode(D, z, scale_factor)", mistakes=[
        (dec(z), "you forgot to divide by scale_factor before decoding: the decoder expects the "
                 "autoencoder's own latents, D(z / scale_factor) (a public pipeline shipped this bug "
                 "and produced garbage images)"),
        (dec(z * sf), "you multiplied by scale_factor when decoding; divide: D(z / scale_factor)"),
        (dec(z) / sf, "you divided the decoded image; undo the scaling on the latents before decoding: "
                      "D(z / scale_factor)"),
        (dec(z) * sf, "you scaled the decoded image; divide the latents before decoding: D(z / scale_factor)"),
    ])

    # (d) round trip and gradients (the training loss backpropagates through nothing here,
    # but a sampler guided by a pixel loss would need them)
    xr = x.clone().requires_grad_()
    zr = ex.call(encode, enc, xr, sf)
    ex.gradients_flow(zr, {"x": xr}, what="encode(E, x, scale_factor)")
    back = ex.call(decode, dec, ex.call(encode, enc, x, sf), sf)
    ex.close(back, dec(enc(x)), atol=1e-5, rtol=1e-5, what="decode(D, encode(E, x, s), s)")
    ex.passed("1/std over all elements, multiply after encoding, divide before decoding")


# ---------------------------------------------------------------------------- 7.3
_VOCAB = ["<pad>", "<unk>", "a", "small", "large", "red", "green", "blue", "circle", "square", "triangle",
          "on", "white", "black", "background"]


class _FakeTokenizer:
    """Word-level tokens, padded with 0 to max_length (like minigen.text.Tokenizer); records calls."""

    pad_id, unk_id = 0, 1

    def __init__(self, max_length=8):
        self.vocab = list(_VOCAB)
        self.max_length = max_length
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.calls = []

    def __call__(self, texts):
        return self.encode(texts)

    def encode(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.index.get(w, self.unk_id) for w in t.lower().split()]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class _FakeTextEncoder(nn.Module):
    """Token + position embeddings through a tanh: the empty prompt (all pads) encodes to a
    non-zero context, as in a real text encoder."""

    def __init__(self, g, vocab_size, max_length, dim=6):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.pos = nn.Parameter(torch.randn(max_length, dim, generator=g) * 0.5)
        self.requires_grad_(False)

    def forward(self, tokens):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError("the text encoder takes the tokenizer's int64 token ids, shape (N, max_length)")
        return torch.tanh(self.tok[tokens] + self.pos[: tokens.shape[1]])


class _FakeUNet(nn.Module):
    """eps(x, t, context): per sample (batching is free), depends on every argument; records calls."""

    def __init__(self, g, channels, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels, channels, generator=g) * 0.4)
        self.c = nn.Parameter(torch.randn(dim, channels, generator=g) * 0.8)
        self.requires_grad_(False)
        self.calls = []

    def forward(self, x, t, y=None, context=None):
        if context is None:
            raise CheckFailed("Exercise 7.3 (text_to_image): the U-Net was called without a context; "
                              "call unet(x, t, context=context) with the encoded prompts "
                              "(and the encoded empty prompt for the unconditional half)")
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.calls.append((x.detach().clone(), t.detach().clone(), context.detach().clone()))
        mix = torch.einsum("nchw,cd->ndhw", x, self.w)
        # the context's pooled vector and its first token both matter (word order, padding)
        cond = context.mean(1) @ self.c + 0.5 * context[:, 0] @ self.c
        return torch.tanh(mix + cond[:, :, None, None] + torch.sin(t.float() / 150.0)[:, None, None, None])


def _trailing(T, steps):
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def _linear_abar(T=1000):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def _make_ddim_step(log):
    """The DDIM step handed to the learner (written here; eps or v output, optional clipping)."""

    def ddim_step(x_t, t, t_prev, model_output, alphas_cumprod, *, eta=0.0, noise=None, clip_denoised=True,
                  generator=None, prediction_type="epsilon"):
        n = x_t.shape[0]
        t = torch.as_tensor(t).long()
        t = t.expand(n) if t.ndim == 0 else t
        t_prev = int(t_prev)
        log.append(dict(t=t.clone(), t_prev=t_prev, eta=eta, clip=bool(clip_denoised),
                        prediction_type=prediction_type))
        ab = alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        abp = torch.tensor(1.0, dtype=torch.float64) if t_prev < 0 else alphas_cumprod.double()[t_prev]
        x, out = x_t.double(), model_output.double()
        if prediction_type == "epsilon":
            e = out
            x0 = (x - (1 - ab).sqrt() * e) / ab.sqrt()
        elif prediction_type == "v":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
            e = (1 - ab).sqrt() * x + ab.sqrt() * out
        else:
            raise ValueError(f"this check's ddim_step knows prediction_type 'epsilon' and 'v', got {prediction_type!r}")
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
        out = abp.sqrt() * x0 + (1 - abp - sigma**2).clamp(min=0).sqrt() * e
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator) if noise is None else noise
            out = out + sigma * z.double()
        return out.to(x_t.dtype)

    return ddim_step


def _reference_pipeline(prompts, tok, enc, unet, ab, sf, dec, x_T, w, steps, *, prediction_type="epsilon",
                        null="empty", reverse=False, unscale="divide", clip=False, guide=True):
    """The reference text-to-image sampler; the keywords build the wrong variants.

    Guidance combines the U-Net's outputs linearly whatever they are (eps or v): at a fixed
    z_t, eps_hat and x0_hat are affine in the output, so guiding v is guiding eps.

    Returns (images, final latents before unscaling)."""
    step = _make_ddim_step([])
    n = len(prompts)
    cond = enc(tok.encode(list(prompts)))
    null_ctx = enc(tok.encode([""] * n)) if null == "empty" else torch.zeros_like(cond)
    z = x_T.clone()
    ts = _trailing(len(ab), steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((n,), t, dtype=torch.long)
        e_u, e_c = unet(z, tt, context=null_ctx), unet(z, tt, context=cond)
        if not guide:
            eps = e_c
        elif reverse:
            eps = e_c + w * (e_u - e_c)
        else:
            eps = e_u + w * (e_c - e_u)
        z = step(z, tt, t_prev, eps, ab, eta=0.0, clip_denoised=clip, prediction_type=prediction_type)
    z_in = {"divide": z / sf, "none": z, "multiply": z * sf}[unscale]
    return dec(z_in), z


@checker
def text_to_image(fn) -> None:
    """Exercise 7.3: tokenize, encode, DDIM with classifier-free guidance, unscale, decode;
    the U-Net's output is eps or v (prediction_type, passed on to ddim_step)."""
    ex = Exercise("7.3", "text_to_image")
    ex.callable(fn)
    g = torch.Generator().manual_seed(73)
    latent_shape = (4, 4, 4)
    tok = _FakeTokenizer(max_length=8)
    enc = _FakeTextEncoder(g, len(tok.vocab), tok.max_length)
    unet = _FakeUNet(g, latent_shape[0], 6)
    dec_conv = _fake_decoder(g)
    decoded = []

    def decode_fn(z):
        decoded.append(z.detach().clone())
        return dec_conv(z)

    ab = _linear_abar()
    prompts = ["a small red circle on a blue background", "a large green square on a white background",
               "a blue triangle"]
    n, w, steps, sf = len(prompts), 3.0, 6, 0.45
    x_T = torch.randn(n, *latent_shape, generator=g) * 1.0
    step_log = []

    def run(**kw):
        unet.calls.clear(), decoded.clear(), step_log.clear(), tok.calls.clear()
        args = dict(tokenizer=tok, text_encoder=enc, unet=unet, alphas_cumprod=ab.clone(), scale_factor=sf,
                    decode_fn=decode_fn, latent_shape=latent_shape, guidance_scale=w, steps=steps,
                    ddim_step=_make_ddim_step(step_log))
        args.update(kw)
        with torch.no_grad():
            return ex.call(fn, list(prompts), **args)

    out = run(x_T=x_T.clone())
    out = ex.tensor(out, shape=(n, 3, 16, 16), dtype=torch.float32, what="the images")
    calls, steps_taken, dec_in = list(unet.calls), list(step_log), list(decoded)

    # the empty prompt must be tokenized and encoded for the unconditional half
    if not any(all(t == "" for t in texts) for texts in tok.calls):
        zero_null = any(torch.count_nonzero(c) == 0 or bool((c == 0).all(-1).all(-1).any()) for _, _, c in calls)
        ex.fail("the tokenizer never saw the empty prompt \"\"",
                mistake="the null condition of classifier-free guidance is the *encoded empty prompt*, "
                        "text_encoder(tokenizer.encode([\"\"] * n)), not a zero tensor: the model was "
                        "trained with captions dropped to \"\", whose encoding is not zero"
                if zero_null else "encode the empty prompt \"\" (one per image) for the unconditional half")

    # timesteps: the trailing DDIM grid, one step per grid point, the last one to t_prev = -1
    grid = _trailing(len(ab), steps)
    got_ts = [int(s["t"][0]) for s in steps_taken]
    if got_ts != grid or [s["t_prev"] for s in steps_taken] != grid[1:] + [-1]:
        ex.fail(f"ddim_step was called at timesteps {got_ts} (t_prev {[s['t_prev'] for s in steps_taken]}); "
                f"with steps={steps} expected {grid} (t_prev {grid[1:] + [-1]})",
                mistake="use ddim_timesteps(len(alphas_cumprod), steps) and step to the next grid "
                        "timestep, to -1 after the last one")
    if any(s["clip"] for s in steps_taken):
        ex.fail("ddim_step was called with clip_denoised=True",
                mistake="never clip x0_hat in latent space: latents are not confined to [-1, 1] "
                        "(pass clip_denoised=False; pixel-space models clip, latent ones do not)")
    if any(s["eta"] != 0 for s in steps_taken):
        ex.fail("ddim_step was called with eta != 0; this sampler is deterministic DDIM, eta = 0")

    # the first U-Net call starts from x_T
    if calls and not torch.allclose(calls[0][0][:n], x_T) and not torch.allclose(calls[0][0][-n:], x_T):
        ex.fail("the first U-Net call does not see x_T; start the loop from the given x_T")

    ref, z_final = _reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps)
    ex.close(out, ref, atol=1e-4, rtol=1e-4, what="the images", mistakes=[
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, reverse=True)[0],
         "guidance is applied the wrong way round: eps = eps_uncond + w (eps_cond - eps_uncond). If you "
         "batch [uncond, cond], the *first* half of the output is the unconditional one"),
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, unscale="none")[0],
         "you forgot to divide by scale_factor before decoding: decode_fn(z / scale_factor)"),
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, unscale="multiply")[0],
         "you multiplied by scale_factor before decoding; divide: decode_fn(z / scale_factor)"),
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, null="zeros")[0],
         "the null condition is a zero tensor; classifier-free guidance uses the *encoded empty prompt*, "
         "text_encoder(tokenizer.encode([\"\"] * n)), the condition the model saw when captions were dropped"),
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, guide=False)[0],
         "no guidance: combine eps_uncond + guidance_scale * (eps_cond - eps_uncond) at every step"),
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, clip=True)[0],
         "x0_hat was clipped to [-1, 1]: pass clip_denoised=False, latents are not confined to [-1, 1]"),
    ])
    if not dec_in or not torch.allclose(dec_in[-1], z_final / sf, atol=1e-4, rtol=1e-4):
        ex.fail("decode_fn did not receive the final latents divided by scale_factor")

    # another guidance scale and number of steps: both arguments must be used as given
    w2, steps2 = 1.6, 4
    out2 = ex.tensor(run(x_T=x_T.clone(), guidance_scale=w2, steps=steps2), shape=(n, 3, 16, 16),
                     dtype=torch.float32, what=f"the images (guidance_scale={w2}, steps={steps2})")
    ref2 = _reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w2, steps2)[0]
    ex.close(out2, ref2, atol=1e-4, rtol=1e-4, what=f"the images with guidance_scale={w2}, steps={steps2}",
             mistakes=[
                 (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps2)[0],
                  f"guidance_scale={w2} was ignored (your pipeline used {w}): combine the outputs with the "
                  "guidance_scale argument, not a fixed number"),
                 (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w2, steps)[0],
                  f"steps={steps2} was ignored: build the timestep grid from the steps argument"),
             ])

    # the same pipeline for a v-predicting U-Net: guidance is the same linear combination of
    # the two outputs, and ddim_step must be told that they are v
    out_v = run(x_T=x_T.clone(), prediction_type="v")
    out_v = ex.tensor(out_v, shape=(n, 3, 16, 16), dtype=torch.float32, what="the images (prediction_type=\"v\")")
    told = [s["prediction_type"] for s in step_log]
    ref_v = _reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, prediction_type="v")[0]
    as_eps = ("with prediction_type=\"v\" your pipeline treats the U-Net's output as eps (ddim_step was told "
              f"{sorted(set(told)) or 'nothing'}): it ignores prediction_type. Pass it on, "
              "ddim_step(..., prediction_type=prediction_type): the step turns v into "
              "x0_hat = sqrt(abar) z_t - sqrt(1 - abar) v and eps_hat = sqrt(1 - abar) z_t + sqrt(abar) v")
    ex.close(out_v, ref_v, atol=1e-4, rtol=1e-4, what="the images with prediction_type=\"v\"", mistakes=[
        (out, as_eps),  # identical to the eps run: prediction_type was dropped on the way
        (_reference_pipeline(prompts, tok, enc, unet, ab, sf, dec_conv, x_T, w, steps, prediction_type="v",
                             reverse=True)[0],
         "guidance is applied the wrong way round for v as well: out = out_uncond + w (out_cond - out_uncond)"),
    ])

    # without x_T: draw the starting noise N(0, I) of shape (n, *latent_shape) yourself
    many = ["a red circle"] * 64
    unet.calls.clear()
    with seeded(730), torch.no_grad():
        out = ex.call(fn, many, tokenizer=tok, text_encoder=enc, unet=unet, alphas_cumprod=ab.clone(),
                      scale_factor=sf, decode_fn=decode_fn, latent_shape=latent_shape, guidance_scale=w,
                      steps=2, ddim_step=_make_ddim_step([]), generator=torch.Generator().manual_seed(7))
    ex.tensor(out, shape=(64, 3, 16, 16), what="the images (x_T not given)")
    first = unet.calls[0][0]
    first = first[:64] if first.shape[0] == 128 else first
    if tuple(first.shape) != (64, *latent_shape):
        ex.fail(f"the first U-Net call got latents of shape {_fmt_shape(first.shape)}, "
                f"expected (64, {', '.join(map(str, latent_shape))}) (or twice the batch with guidance)")
    ex.mean_std(first, 0.0, 1.0, what="the starting latents x_T (not given)")

    # ... drawn with the generator passed in: the same generator seed gives the same start
    # whatever the global RNG holds, another seed another start
    def start(seed, global_seed):
        unet.calls.clear()
        with seeded(global_seed), torch.no_grad():
            ex.call(fn, ["a red circle", "a blue square"], tokenizer=tok, text_encoder=enc, unet=unet,
                    alphas_cumprod=ab.clone(), scale_factor=sf, decode_fn=decode_fn, latent_shape=latent_shape,
                    guidance_scale=w, steps=1, ddim_step=_make_ddim_step([]),
                    generator=torch.Generator().manual_seed(seed))
        return unet.calls[0][0][:2].clone()

    a, b, c = start(11, 1), start(11, 2), start(12, 1)
    if not torch.equal(a, b):
        ex.fail("with x_T not given, the same `generator` gave different starting latents (the global "
                "RNG decided them)", mistake="draw the starting noise from the generator you were given: "
                "pass generator=generator to torch.randn")
    if torch.equal(a, c):
        ex.fail("generators with different seeds gave the same starting latents: the noise must come "
                "from the generator passed in")
    ex.passed("empty-prompt null condition, CFG direction, DDIM grid without clipping, eps and v, "
              "unscale before decode")


# ---------------------------------------------------------------------------- hidden tests
@checker
def latent_scaling_hidden(fit_scale_factor, encode, decode) -> None:
    """Hidden test of 7.2: the fitted factor of latents with std 4 is 1/4; decode undoes encode."""
    ex = Exercise("7.2", "latent_scaling", hidden=True)
    g = torch.Generator().manual_seed(720)
    z = torch.randn(64, 4, 8, 8, generator=g)
    z = (z - z.mean()) / z.std() * 4.0 + 1.5
    sf = _as_number(ex, ex.call(fit_scale_factor, z), "the scale factor")
    if abs(sf - 0.25) > 1e-4:
        ex.fail(f"for latents whose standard deviation is 4 the scale factor is {sf:.6g}, expected 0.25")
    x = torch.randn(2, 3, 8, 8, generator=g)
    scaled = ex.tensor(ex.call(encode, _cube, x, 0.3), shape=x.shape, what="encode with the encoder x -> x^3")
    ex.close(scaled, x.double() ** 3 * 0.3, atol=1e-5, rtol=1e-5, what="encode with the encoder x -> x^3")
    back = ex.tensor(ex.call(decode, _cube_root, scaled, 0.3), shape=x.shape, what="decode(encode(x))")
    ex.close(back, x, atol=1e-4, rtol=1e-4, what="decode(encode(x)) with the decoder z -> z^(1/3)")


def _cube(x):
    """A trusted, nonlinear stand-in encoder (so scaling before and after it differ)."""
    return x ** 3


def _cube_root(z):
    """The inverse of _cube: a stand-in decoder."""
    return z.sign() * z.abs() ** (1 / 3)


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '7.1': (
        'Queries come from the image tokens, keys and values from the text tokens; several heads '
        'attend in parallel, each over dim_head features.',
        'Linear maps without bias: to_q from query_dim, to_k and to_v from context_dim, each to '
        'heads times dim_head; to_out maps back to query_dim (with bias). In forward: project, '
        'split the features into heads and move the head axis before the token axis, scale the '
        'scores by dim_head to the power -1/2, softmax over the text tokens, weight the values, '
        'merge the heads back and apply to_out.',
    ),
    '7.2': (
        'Diffusion works best when the latents have unit variance, so scale them by one number '
        'fitted on a sample of latents; undo the scale before decoding.',
        'The scale factor is 1 over the standard deviation of all the latent values together, as '
        "a Python float. encode: the autoencoder's latents times the factor. decode: divide by "
        'the factor first, then call the decoder.',
    ),
    '7.3': (
        'Encode the prompts and an empty prompt, then run DDIM in latent space with classifier-'
        'free guidance, and decode the final latents.',
        'Context: the text encoder applied to the tokenized prompts; null context: the same for n'
        ' empty strings. Start from x_T (or noise drawn with the generator). For each DDIM '
        'timestep: run the U-Net on both contexts, combine the outputs with the guidance scale, '
        'take a ddim_step with eta 0, no clipping, and prediction_type passed on. Finally undo '
        'the latent scale and decode.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
