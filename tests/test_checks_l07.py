"""Every lesson-07 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch
import torch.nn as nn

from minigen import diffusion
from minigen import nn as mnn
from minigen.course.checks import l07 as check

from _check_helpers import fails, stub


# ---------------------------------------------------------------------------- 7.1
def make_attention(*, scale="sqrt", softmax_dim=-1, kv_from_x=False, merge="right", split="right",
                   out_proj=True, qkv_bias=False, kv_in="context", no_tuple=False):
    """A learner-style CrossAttention class; the keyword arguments inject one typical mistake."""

    class CrossAttention(nn.Module):
        def __init__(self, query_dim, context_dim, heads=4, dim_head=16):
            super().__init__()
            inner = heads * dim_head
            self.heads, self.dim_head = heads, dim_head
            self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
            kv_dim = context_dim if kv_in == "context" else query_dim
            self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
            self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
            self.to_out = nn.Linear(inner, query_dim)

        def forward(self, x, context, return_attention=False):
            n, length, _ = x.shape
            src = x if kv_from_x else context
            h, d = self.heads, self.dim_head

            def sp(z):
                if split == "right":
                    return z.view(n, z.shape[1], h, d).transpose(1, 2)
                return z.reshape(n, h, z.shape[1], d)

            q, k, v = sp(self.to_q(x)), sp(self.to_k(src)), sp(self.to_v(src))
            s = {"sqrt": d**-0.5, "d": 1 / d, "none": 1.0}[scale]
            attn = torch.softmax(q @ k.transpose(-1, -2) * s, dim=softmax_dim)
            out = attn @ v
            out = out.transpose(1, 2).reshape(n, length, h * d) if merge == "right" else out.reshape(n, length, h * d)
            if out_proj:
                out = self.to_out(out)
            if return_attention and not no_tuple:
                return out, attn
            return out

    return CrossAttention


def test_cross_attention_correct(capsys):
    check.cross_attention(make_attention())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ Exercise 7.1 cross_attention: passed")


class SdpaAttention(mnn.CrossAttention):
    """minigen's own CrossAttention (an independent implementation: F.scaled_dot_product_attention),
    with the return_attention option the exercise asks for."""

    def forward(self, x, context=None, return_attention=False):
        out = super().forward(x, context)
        if not return_attention:
            return out
        q = self.to_q(x).view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(context.shape[0], context.shape[1], self.heads, -1).transpose(1, 2)
        return out, torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1)


def test_minigen_cross_attention_passes(capsys):
    check.cross_attention(SdpaAttention)
    assert "✓ Exercise 7.1" in capsys.readouterr().out


def test_cross_attention_stub():
    class Stub(nn.Module):
        def __init__(self, query_dim, context_dim, heads=4, dim_head=16):
            super().__init__()
            raise NotImplementedError("Exercise 7.1")

    fails(check.cross_attention, Stub, "Exercise 7.1 (cross_attention) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (make_attention(scale="d"), "divided by dim_head; divide by its square root"),
    (make_attention(scale="none"), "not scaled"),
    (make_attention(softmax_dim=-2), "over the keys (the text tokens"),
    (make_attention(kv_from_x=True), "that is self-attention"),
    (make_attention(merge="wrong"), "merged in the wrong order"),
    (make_attention(split="wrong"), "split in the wrong order"),
    (make_attention(out_proj=False), "output projection is missing"),
    (make_attention(qkv_bias=True), "has a bias"),
    (make_attention(kv_in="x"), "input size is context_dim"),
])
def test_cross_attention_mistakes(answer, fragment):
    fails(check.cross_attention, answer, "Exercise 7.1", fragment)


def test_cross_attention_return_attention_missing():
    fails(check.cross_attention, make_attention(no_tuple=True), "return (output, attention)")


def test_cross_attention_wrong_names():
    class Named(nn.Module):
        def __init__(self, query_dim, context_dim, heads=4, dim_head=16):
            super().__init__()
            self.q = nn.Linear(query_dim, heads * dim_head, bias=False)

        def forward(self, x, context, return_attention=False):
            return x

    fails(check.cross_attention, Named, "to_q, to_k, to_v and to_out")


# ---------------------------------------------------------------------------- 7.2
def good_fit(latents):
    return 1.0 / latents.std().item()


def good_encode(encode_fn, x, scale_factor):
    return encode_fn(x) * scale_factor


def good_decode(decode_fn, z, scale_factor):
    return decode_fn(z / scale_factor)


def test_latent_scaling_correct(capsys):
    check.latent_scaling(good_fit, good_encode, good_decode)
    check.latent_scaling(lambda z: 1 / z.std(), good_encode, good_decode)  # a 0-d tensor is fine
    check.latent_scaling(lambda z: 1 / z.std(unbiased=False).item(), good_encode, good_decode)
    out = capsys.readouterr().out
    assert out.count("✓ Exercise 7.2 latent_scaling: passed") == 3


def test_latent_scaling_stub():
    with pytest.raises(check.CheckFailed, match="Exercise 7.2 \\(latent_scaling\\) is not done yet"):
        check.latent_scaling(stub, stub, stub)
    with pytest.raises(check.CheckFailed, match="is not done yet"):
        check.latent_scaling(good_fit, stub, good_decode)


@pytest.mark.parametrize("fit, enc, dec, fragment", [
    (lambda z: z.std().item(), good_encode, good_decode, "its inverse"),
    (lambda z: 1 / z.var().item(), good_encode, good_decode, "1 / variance"),
    (lambda z: 1 / z.transpose(0, 1).reshape(z.shape[1], -1).std(1), good_encode, good_decode, "per channel"),
    (lambda z: 1 / z.transpose(0, 1).reshape(z.shape[1], -1).std(1).mean().item(), good_encode, good_decode,
     "averaged the per-channel stds"),
    (good_fit, lambda e, x, s: e(x), good_decode, "not scaled"),
    (good_fit, lambda e, x, s: e(x) / s, good_decode, "divided by scale_factor when encoding"),
    (good_fit, lambda e, x, s: e(x * s), good_decode, "scaled the image before encoding"),
    (good_fit, good_encode, lambda d, z, s: d(z), "forgot to divide by scale_factor before decoding"),
    (good_fit, good_encode, lambda d, z, s: d(z * s), "multiplied by scale_factor when decoding"),
    (good_fit, good_encode, lambda d, z, s: d(z) / s, "divided the decoded image"),
])
def test_latent_scaling_mistakes(fit, enc, dec, fragment):
    with pytest.raises(check.CheckFailed) as info:
        check.latent_scaling(fit, enc, dec)
    msg = str(info.value)
    assert "Exercise 7.2" in msg and fragment in msg, msg


def test_latent_scaling_in_place():
    def inplace(z):
        z -= z.mean()
        return 1 / z.std().item()

    fails(lambda f: check.latent_scaling(f, good_encode, good_decode), inplace, "in place")


# ---------------------------------------------------------------------------- 7.3
def make_t2i(*, null="empty", reverse=False, unscale="divide", clip=False, batched=True, grid=None,
             ignore_x_T=False, guide=True, pass_prediction_type=True, own_v_to_eps=False, fixed_w=None,
             global_noise=False):
    """A learner-style text-to-image sampler; the keyword arguments inject one typical mistake
    (own_v_to_eps: a correct variant that turns v into eps itself and steps with "epsilon")."""

    def text_to_image(prompts, *, tokenizer, text_encoder, unet, alphas_cumprod, scale_factor, decode_fn,
                      latent_shape, guidance_scale=5.0, steps=25, x_T=None, generator=None,
                      ddim_step=diffusion.ddim_step, prediction_type="epsilon"):
        n = len(prompts)
        context = text_encoder(tokenizer.encode(prompts))
        if null == "empty":
            null_context = text_encoder(tokenizer.encode([""] * n))
        else:
            null_context = torch.zeros_like(context)
        if fixed_w is not None:
            guidance_scale = fixed_w
        noise_from = None if global_noise else generator
        z = torch.randn((n, *latent_shape), generator=noise_from) if (x_T is None or ignore_x_T) else x_T
        ts = diffusion.ddim_timesteps(len(alphas_cumprod), steps).tolist() if grid is None else grid(steps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            tt = torch.full((n,), t, dtype=torch.long)
            if batched:
                e_u, e_c = unet(torch.cat([z, z]), torch.cat([tt, tt]),
                                context=torch.cat([null_context, context])).chunk(2)
            else:
                e_u, e_c = unet(z, tt, context=null_context), unet(z, tt, context=context)
            if not guide:
                eps = e_c
            elif reverse:
                eps = e_c + guidance_scale * (e_u - e_c)
            else:
                eps = e_u + guidance_scale * (e_c - e_u)
            kw = {} if clip else dict(clip_denoised=False)
            if own_v_to_eps and prediction_type == "v":
                ab = alphas_cumprod[tt].view(-1, 1, 1, 1)
                eps = (1 - ab).sqrt() * z + ab.sqrt() * eps  # eps from v (float32)
            elif pass_prediction_type:
                kw["prediction_type"] = prediction_type
            z = ddim_step(z, tt, t_prev, eps, alphas_cumprod, eta=0.0, **kw)
        z = {"divide": z / scale_factor, "none": z, "multiply": z * scale_factor}[unscale]
        return decode_fn(z)

    return text_to_image


def test_text_to_image_correct(capsys):
    check.text_to_image(make_t2i())
    check.text_to_image(make_t2i(batched=False))  # two U-Net calls per step: also right
    check.text_to_image(make_t2i(own_v_to_eps=True))  # converting v itself gives the same images
    assert capsys.readouterr().out.count("✓ Exercise 7.3 text_to_image: passed") == 3


def test_text_to_image_with_minigen_pieces(capsys):
    # minigen's guided_model_fn + sample_loop, with the encoded empty prompt as null_context
    def via_minigen(prompts, *, tokenizer, text_encoder, unet, alphas_cumprod, scale_factor, decode_fn,
                    latent_shape, guidance_scale=5.0, steps=25, x_T=None, generator=None, ddim_step=None,
                    prediction_type="epsilon"):
        n = len(prompts)
        ctx = text_encoder(tokenizer.encode(prompts))
        null = text_encoder(tokenizer.encode([""] * n))
        model_fn = diffusion.guided_model_fn(unet, context=ctx, null_context=null, guidance_scale=guidance_scale)
        x_T = torch.randn((n, *latent_shape), generator=generator) if x_T is None else x_T
        z = diffusion.sample_loop(model_fn, x_T, alphas_cumprod, sampler="ddim", steps=steps,
                                  ddim_step=ddim_step, clip_denoised=False, prediction_type=prediction_type)
        return decode_fn(z / scale_factor)

    check.text_to_image(via_minigen)
    assert "✓ Exercise 7.3" in capsys.readouterr().out


def test_text_to_image_stub():
    fails(check.text_to_image, stub, "Exercise 7.3 (text_to_image) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (make_t2i(reverse=True), "wrong way round"),
    (make_t2i(unscale="none"), "forgot to divide by scale_factor before decoding"),
    (make_t2i(unscale="multiply"), "multiplied by scale_factor before decoding"),
    (make_t2i(null="zeros"), "not a zero tensor"),
    (make_t2i(clip=True), "never clip x0_hat in latent space"),
    (make_t2i(grid=lambda s: list(range(999, 0, -1000 // s))[:s]), "ddim_timesteps"),
    (make_t2i(ignore_x_T=True), "x_T"),
    (make_t2i(pass_prediction_type=False), "ignores prediction_type"),
])
def test_text_to_image_mistakes(answer, fragment):
    fails(check.text_to_image, answer, "Exercise 7.3", fragment)


def test_text_to_image_no_guidance():
    def cond_only(prompts, *, tokenizer, text_encoder, unet, alphas_cumprod, scale_factor, decode_fn,
                  latent_shape, guidance_scale=5.0, steps=25, x_T=None, generator=None, ddim_step=None,
                  prediction_type="epsilon"):
        return make_t2i(guide=False)(prompts, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                                     alphas_cumprod=alphas_cumprod, scale_factor=scale_factor,
                                     decode_fn=decode_fn, latent_shape=latent_shape,
                                     guidance_scale=guidance_scale, steps=steps, x_T=x_T,
                                     generator=generator, ddim_step=ddim_step, prediction_type=prediction_type)

    fails(check.text_to_image, cond_only, "Exercise 7.3", "no guidance")


def test_text_to_image_v_treated_as_eps_message():
    msg = fails(check.text_to_image, make_t2i(pass_prediction_type=False), "Exercise 7.3", "prediction_type=\"v\"",
                "treats the U-Net's output as eps", "x0_hat = sqrt(abar) z_t - sqrt(1 - abar) v")
    assert "['epsilon']" in msg  # it names what ddim_step was told


def test_text_to_image_hardcoded_epsilon():
    # passing a fixed "epsilon" is the same mistake as dropping the keyword
    def hardcoded(prompts, *, prediction_type="epsilon", **kw):
        return make_t2i()(prompts, prediction_type="epsilon", **kw)

    fails(check.text_to_image, hardcoded, "Exercise 7.3", "ignores prediction_type")


def test_text_to_image_without_prediction_type_keyword():
    good = make_t2i()

    def old_signature(prompts, *, tokenizer, text_encoder, unet, alphas_cumprod, scale_factor, decode_fn,
                      latent_shape, guidance_scale=5.0, steps=25, x_T=None, generator=None, ddim_step=None):
        return good(prompts, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                    alphas_cumprod=alphas_cumprod, scale_factor=scale_factor, decode_fn=decode_fn,
                    latent_shape=latent_shape, guidance_scale=guidance_scale, steps=steps, x_T=x_T,
                    generator=generator, ddim_step=ddim_step)

    fails(check.text_to_image, old_signature, "Exercise 7.3", "does not accept the keyword argument `prediction_type`")


def test_text_to_image_arguments_used_as_given():
    fails(check.text_to_image, make_t2i(fixed_w=3.0), "Exercise 7.3", "guidance_scale=1.6 was ignored")
    fails(check.text_to_image, make_t2i(global_noise=True), "Exercise 7.3", "pass generator=generator")


def test_text_to_image_v_guidance_reversed_only_for_v():
    # right for eps, but for v it combines the outputs the wrong way round
    def v_reversed(prompts, *, prediction_type="epsilon", **kw):
        return make_t2i(reverse=prediction_type == "v")(prompts, prediction_type=prediction_type, **kw)

    fails(check.text_to_image, v_reversed, "Exercise 7.3", "wrong way round for v")


def test_text_to_image_no_context():
    def no_ctx(prompts, *, unet, alphas_cumprod, decode_fn, latent_shape, x_T=None, steps=25, **kw):
        z = x_T
        unet(z, torch.full((len(prompts),), 999))
        return decode_fn(z)

    fails(check.text_to_image, no_ctx, "without a context")

