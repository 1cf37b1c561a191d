"""Diffusion behaviour: training, guidance, samplers, inpainting, img2img, bits/dim,
lesson overrides and clear errors. Formula-level checks are in test_diffusion_conformance."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from minigen import diffusion as D
from minigen.unet import UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


T = 1000


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ab():
    return D.alphas_cumprod(D.make_beta_schedule("linear", T)).float()


def oracle(x0, ab, prediction_type="epsilon"):
    """A perfect denoiser for a data set that is the single image batch x0."""

    def model_fn(x_t, t):
        a = ab[t].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]

    return model_fn


def small_model(num_classes=None, context_dim=None, image_shape=(1, 8, 8), **kw):
    ucfg = UNetConfig(in_channels=image_shape[0], channels=16, channel_mult=(1, 2), layers_per_block=1,
                      attention_resolutions=(2,), num_classes=num_classes, context_dim=context_dim)
    return D.GaussianDiffusion(None, D.DiffusionConfig(image_shape=image_shape, unet=ucfg, **kw))


# -- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_oracle_has_zero_loss(prediction_type, ab):
    x0 = torch.rand(4, 2, 5, 5) * 2 - 1
    loss = D.training_losses(oracle(x0, ab, prediction_type), x0, ab, prediction_type=prediction_type)
    assert float(loss) < 1e-8


def test_training_draws_t_over_the_full_range(ab):
    seen = []
    D.training_losses(lambda x, t: seen.append(t) or x, torch.zeros(20000, 1, 1, 1), ab)
    t = seen[0]
    assert t.min() == 0 and t.max() == T - 1 and abs(t.double().mean() - (T - 1) / 2) < 10


def test_loss_falls_on_a_few_steps(prediction_type="epsilon"):
    model = small_model(num_classes=3, prediction_type=prediction_type, timesteps=100)
    x = torch.rand(8, 1, 8, 8).round() * 2 - 1  # binary images
    y = torch.arange(8) % 3
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    fixed_t, fixed_noise = torch.randint(0, 100, (8,), generator=g), torch.randn(x.shape, generator=g)

    def eval_loss():  # same t and noise before and after, so the comparison is fair
        with torch.no_grad():
            return float(D.training_losses(model.model, x, model.alphas_cumprod, t=fixed_t, noise=fixed_noise,
                                           prediction_type=prediction_type, model_kwargs=dict(y=y)))

    before = eval_loss()
    for step in range(20):
        loss = model.training_loss((x, y), step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.85 * before


def test_cfg_dropout():
    y = torch.arange(1000) % 7
    same, _ = D.cfg_dropout(0.0, y, null_y=7)
    assert torch.equal(same, y)
    all_null, _ = D.cfg_dropout(1.0, y, null_y=7)
    assert torch.all(all_null == 7)
    some, _ = D.cfg_dropout(0.1, y, null_y=7)
    dropped = some == 7
    assert 0.06 < dropped.float().mean() < 0.14 and torch.equal(some[~dropped], y[~dropped])
    ctx = torch.randn(1000, 3, 4)
    y2, c2 = D.cfg_dropout(0.3, y, ctx, null_y=7)
    zero = (c2 == 0).all(dim=(1, 2))
    assert torch.equal(zero, y2 == 7)  # one draw for both conditions
    with pytest.raises(ValueError, match="null_y"):
        D.cfg_dropout(0.1, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.cfg_dropout(1.5, y, null_y=7)


def test_training_loss_checks_images_and_ignores_labels_when_unconditional():
    model = small_model()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.isfinite(model.training_loss((x, torch.tensor([3, 4])), 0)["loss"])
    with pytest.raises(ValueError, match="configured for"):
        model.training_loss(torch.rand(2, 3, 8, 8), 0)


# -- guidance ------------------------------------------------------------------------------


def test_cfg_combination():
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    for w in (0.0, 1.0, 7.5):
        torch.testing.assert_close(D.classifier_free_guidance(u, c, w), u + w * (c - u))
    torch.testing.assert_close(D.classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(D.classifier_free_guidance(u, c, 1.0), c)


def test_guided_model_fn_batches_uncond_then_cond():
    calls = []

    def model(x, t, y=None, context=None):
        calls.append((x.shape[0], y.clone(), context.clone()))
        return x * 0 + (y.float() + context.sum((1, 2)))[:, None, None, None]

    x, t = torch.randn(3, 1, 2, 2), torch.tensor([5, 5, 5])
    y, ctx = torch.tensor([0, 1, 2]), torch.ones(3, 2, 4)
    fn = D.guided_model_fn(model, y=y, context=ctx, guidance_scale=3.0, null_y=9)
    out = fn(x, t)
    assert len(calls) == 1 and calls[0][0] == 6  # one batched forward
    assert calls[0][1].tolist() == [9, 9, 9, 0, 1, 2]  # [uncond, cond]
    assert calls[0][2][:3].abs().sum() == 0 and torch.equal(calls[0][2][3:], ctx)
    uncond, cond = 9.0, y.float() + 8.0
    torch.testing.assert_close(out[:, 0, 0, 0], uncond + 3.0 * (cond - uncond))
    # guidance_scale 1 -> a single plain conditional call
    calls.clear()
    D.guided_model_fn(model, y=y, context=ctx, guidance_scale=1.0, null_y=9)(x, t)
    assert len(calls) == 1 and calls[0][0] == 3


def test_wrapper_uses_the_given_pieces():
    counts = {"p": 0, "ddim": 0, "g": 0, "q": 0}

    def my_p_sample(*a, **k):
        counts["p"] += 1
        return D.p_sample(*a, **k)

    def my_ddim_step(*a, **k):
        counts["ddim"] += 1
        return D.ddim_step(*a, **k)

    def my_guidance(u, c, w):
        counts["g"] += 1
        return D.classifier_free_guidance(u, c, w)

    def my_q_sample(*a):
        counts["q"] += 1
        return D.q_sample(*a)

    base = small_model(num_classes=2, timesteps=20, sample_steps=4)
    model = D.GaussianDiffusion(base.model, base.config, p_sample=my_p_sample, ddim_step=my_ddim_step,
                                guidance=my_guidance, q_sample=my_q_sample)
    model.sample(2, y=1, sampler="ddpm", guidance_scale=2.0)
    assert counts["p"] == 20 and counts["g"] == 20
    model.sample(2, y=torch.tensor([0, 1]), sampler="ddim", guidance_scale=1.0)
    assert counts["ddim"] == 4 and counts["g"] == 20  # no guidance call at w = 1
    model.training_loss(torch.zeros(2, 1, 8, 8))
    assert counts["q"] == 1
    seen = {}

    def my_inpaint(model_fn, x, mask, alphas_cumprod, **kw):
        seen.update(kw)
        return x

    model = D.GaussianDiffusion(base.model, base.config, inpaint=my_inpaint)
    model.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), jump_n_sample=3)
    assert seen["jump_n_sample"] == 3 and seen["clip_denoised"] is True


# -- samplers ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_samplers_with_a_perfect_denoiser_return_the_data(prediction_type, ab):
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    fn = oracle(x0, ab, prediction_type)
    kw = dict(prediction_type=prediction_type)
    out = D.ddim_sample(fn, torch.randn_like(x0), ab, steps=10, **kw)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    out = D.ddim_sample(fn, torch.randn_like(x0), ab, steps=7, eta=1.0, spacing="leading", **kw)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    out = D.p_sample_loop(fn, torch.randn_like(x0), ab[:50] / ab[49] * ab[49], **kw)  # a short T
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_clipping_changes_x0_only_never_the_noise_estimate(prediction_type, ab):
    # Regression: eps_hat used to be re-derived from the clipped x0_hat, which re-injected the
    # clipped-off signal into x_t at every DDIM step and left high-frequency noise in samples.
    # Now eps_hat is the network's unclipped estimate whatever the clipping.
    n = 5
    x_t, out = 1.5 * torch.randn(n, 3, 6, 6, dtype=torch.float64), torch.randn(n, 3, 6, 6, dtype=torch.float64)
    t = torch.tensor([999, 700, 400, 120, 30])
    ab64 = ab.double()
    x0_raw, eps_raw = D.pred_x0_and_eps(out, x_t, t, ab64, prediction_type, clip_denoised=False)
    x0, eps = D.pred_x0_and_eps(out, x_t, t, ab64, prediction_type, clip_denoised=True)
    assert bool((x0_raw.abs() > 1).any())  # clipping is exercised
    torch.testing.assert_close(x0, x0_raw.clamp(-1, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(eps, eps_raw, rtol=0, atol=1e-12)
    a = ab64[t].view(-1, 1, 1, 1)  # eps consistent with x_t and the UNclipped x0
    torch.testing.assert_close(eps, (x_t - a.sqrt() * x0_raw) / (1 - a).sqrt(), rtol=0, atol=1e-9)
    # so a DDIM step with clipping differs from one without only through sqrt(abar_prev) x0
    t_prev = 10
    d = D.ddim_step(x_t, t, t_prev, out, ab64, prediction_type=prediction_type, clip_denoised=True) - \
        D.ddim_step(x_t, t, t_prev, out, ab64, prediction_type=prediction_type, clip_denoised=False)
    torch.testing.assert_close(d, ab64[t_prev].sqrt() * (x0 - x0_raw), rtol=0, atol=1e-9)


def test_sampling_is_reproducible_and_ddim_eta0_deterministic():
    model = small_model(timesteps=20, sample_steps=5)
    with torch.no_grad():
        model.model.conv_out.weight.normal_(0, 0.1)
    xT = torch.randn(2, 1, 8, 8)
    a, b = model.sample(2, x_T=xT), model.sample(2, x_T=xT)
    assert torch.equal(a, b) and a.shape == (2, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c = model.sample(2, sampler="ddpm", generator=g1)
    d = model.sample(2, sampler="ddpm", generator=g2)
    assert torch.equal(c, d) and not torch.equal(c, model.sample(2, sampler="ddpm"))
    assert model.training  # sampling restores the module's mode


def test_sample_images_cycles_classes():
    model = small_model(num_classes=3, timesteps=10, sample_steps=2)
    seen = []
    inner = model.model.forward
    model.model.forward = lambda x, t, y=None, context=None: seen.append(y) or inner(x, t, y, context)
    assert model.sample_images(5).shape == (5, 1, 8, 8)
    assert seen[0].tolist() == [0, 1, 2, 0, 1]


# -- inpainting and img2img ---------------------------------------------------------------


@pytest.mark.parametrize("sampler,steps,jumps", [("ddpm", None, 1), ("ddpm", None, 3), ("ddim", 8, 2)])
def test_inpainting_keeps_known_region_exactly(sampler, steps, jumps):
    model = small_model(timesteps=30)
    with torch.no_grad():
        model.model.conv_out.weight.normal_(0, 0.1)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :, :4] = 1
    calls = []
    inner = model.model.forward
    model.model.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    out = model.inpaint(x, mask, sampler=sampler, steps=steps, jump_length=3, jump_n_sample=jumps)
    assert torch.equal(out[..., :4], x[..., :4])  # exactly
    assert not torch.allclose(out[..., 4:], x[..., 4:])
    n_steps = steps or 30
    path = D.repaint_schedule(n_steps, 3, jumps)
    assert len(calls) == sum(b == a + 1 for a, b in zip(path[:-1], path[1:]))
    assert len(calls) == n_steps + (jumps - 1) * 3 * ((n_steps - 1) // 3)


def test_inpainting_with_perfect_denoiser_recovers_the_image(ab):
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    mask = (torch.rand(1, 1, 4, 4) > 0.5).float()
    out = D.inpaint(oracle(x0, ab), x0, mask, ab[:40], jump_length=5, jump_n_sample=2)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_repaint_schedule():
    assert D.repaint_schedule(4, 2, 1) == [0, 1, 2, 3, 4]
    assert D.repaint_schedule(6, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        D.repaint_schedule(6, 0, 2)


def test_inpaint_mask_errors(ab):
    x0 = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="only 0"):
        D.inpaint(oracle(x0, ab), x0, torch.full((1, 1, 4, 4), 0.5), ab[:5])
    with pytest.raises(ValueError, match="broadcast"):
        D.inpaint(oracle(x0, ab), x0, torch.ones(1, 1, 3, 4), ab[:5])


def test_img2img(ab):
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    assert torch.equal(D.img2img(oracle(x0, ab), x0, 0.0, ab), x0)
    out = D.img2img(oracle(x0, ab), x0, 0.6, ab, sampler="ddim", steps=20)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # the start timestep: strength 0.5 of T=1000 -> 499 with DDPM, the grid's <= 499 with DDIM
    seen = []
    D.img2img(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x), x0, 0.5, ab[:100])
    assert seen[0] == 49 and seen[-1] == 0 and len(seen) == 50
    seen.clear()
    D.img2img(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x), x0, 0.5, ab, sampler="ddim", steps=10)
    assert seen == [499, 399, 299, 199, 99]
    with pytest.raises(ValueError, match="strength"):
        D.img2img(oracle(x0, ab), x0, 1.5, ab)


# -- bits per dim -----------------------------------------------------------------------


def test_discretized_gaussian_is_a_distribution():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.3, -3.0), (-0.99, -5.0), (0.0, 0.5), (1.2, -2.0)]:
        lp = D.discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                   torch.tensor(log_scale, dtype=torch.float64))
        assert abs(float(lp.exp().sum()) - 1.0) < 1e-9


def test_normal_kl_matches_torch_distributions():
    m1, m2, lv1, lv2 = (torch.randn(50, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(D.normal_kl(m1, lv1, m2, lv2), ref)


def _perfect_bpd_reference(x0, betas):
    """Independent float64: vb terms vanish, prior KL + decoder NLL with variance beta~_1."""
    ab = np.cumprod(1 - betas)
    x = x0.double().numpy()
    a = ab[-1]
    prior = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x**2)
    var1 = (1 - ab[0]) / (1 - ab[1]) * betas[1]
    half = (1 / 255) / math.sqrt(var1)
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    interior, edge = -math.log(Phi(half) - Phi(-half)), -math.log(Phi(half))
    dec = np.where(np.abs(x) > 0.999, edge, interior)
    dims = x[0].size
    to_bits = lambda z: z.reshape(len(x), -1).sum(1) / (dims * math.log(2))
    return to_bits(prior), to_bits(dec)


def test_bits_per_dim_of_a_perfect_denoiser():
    T_ = 200
    betas = D.make_beta_schedule("linear", T_, 1e-4, 0.1)
    ab = D.alphas_cumprod(betas).float()
    x0 = torch.randint(0, 256, (3, 1, 4, 4)).float() / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # edge bins
    out = D.bits_per_dim(oracle(x0, ab), x0, ab)
    prior, dec = _perfect_bpd_reference(x0, betas.numpy())
    assert torch.all(out["vb"].abs() < 1e-4)
    np.testing.assert_allclose(out["prior"].numpy(), prior, atol=1e-5)
    np.testing.assert_allclose(out["decoder"].numpy(), dec, rtol=1e-4)
    torch.testing.assert_close(out["total"], out["prior"] + out["vb"] + out["decoder"])
    # a worse denoiser costs more bits; the subsampled estimate is close for the oracle
    bad = D.bits_per_dim(lambda x, t: torch.zeros_like(x), x0, ab, num_timesteps=20)
    assert torch.all(bad["total"] > out["total"] + 1)
    sub = D.bits_per_dim(oracle(x0, ab), x0, ab, num_timesteps=10)
    torch.testing.assert_close(sub["total"], out["total"], atol=1e-4, rtol=0)


def test_bits_per_dim_subsample_is_unbiased():
    # eps_hat = eps + 0.3 (no clipping) makes every vb term a fixed number k_t, so the
    # estimate from one timestep is (T - 1) k_t, and the mean of those is the full sum
    ab = D.alphas_cumprod(D.make_beta_schedule("linear", 5, 1e-2, 0.3)).float()
    x0 = torch.rand(2, 1, 3, 3).round() * 2 - 1
    model = lambda x, t: oracle(x0, ab)(x, t) + 0.3
    full = D.bits_per_dim(model, x0, ab, clip_denoised=False)["vb"]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([D.bits_per_dim(model, x0, ab, num_timesteps=1, clip_denoised=False, generator=g)["vb"]
                         for _ in range(40)])
    values = torch.unique(draws[:, 0].round(decimals=4))
    assert len(values) == 4  # one per timestep t = 1..4
    assert abs(float(values.mean()) - float(full[0])) < 1e-3 * float(full[0])
    sub = D.bits_per_dim(model, x0, ab, num_timesteps=4, clip_denoised=False)["vb"]  # K = T - 1: exact
    torch.testing.assert_close(sub, full, atol=1e-5, rtol=1e-5)


def test_wrapper_bits_per_dim_runs():
    model = small_model(timesteps=20)
    x = torch.randint(0, 256, (5, 1, 8, 8)).float() / 127.5 - 1
    bpd = model.bits_per_dim(x, num_timesteps=4, batch_size=2)
    assert isinstance(bpd, float) and 0 < bpd < 50


# -- construction and errors ------------------------------------------------------------


def test_build_and_config_roundtrip():
    model = D.build({"beta_schedule": "cosine", "channels": 8, "timesteps": 50}, (1, 28, 28), 10)
    assert model.config.unet.num_classes == 10 and model.config.unet.in_channels == 1
    assert model.config.image_shape == (1, 28, 28) and len(model.alphas_cumprod) == 50
    uncond = D.build({"num_classes": 0}, (3, 32, 32), 18)
    assert uncond.num_classes is None
    # rebuild from the plain dict a checkpoint stores
    again = D.GaussianDiffusion(None, D.DiffusionConfig(**asdict(model.config)))
    again.load_state_dict(model.state_dict())
    again = D.GaussianDiffusion(D.DiffusionConfig(**asdict(model.config)))
    again.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="unknown diffusion option"):
        D.build({"chanels": 8}, (3, 32, 32), None)
    with pytest.raises(ValueError, match="beta_schedule"):
        D.DiffusionConfig(beta_schedule="quadratic")


def test_bad_inputs_give_clear_errors(ab):
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(TypeError, match="integer"):
        D.q_sample(x, torch.tensor([1.0, 2.0]), x, ab)
    with pytest.raises(ValueError, match="shape"):
        D.q_sample(x, torch.tensor([1, 2, 3]), x, ab)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        D.q_sample(x, torch.tensor([0, 1000]), x, ab)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        D.p_sample(x, torch.tensor([-1, 3]), x, ab)
    with pytest.raises(ValueError, match="noise"):
        D.q_sample(x, 3, torch.randn(2, 1, 4, 5), ab)
    with pytest.raises(ValueError, match="model output"):
        D.p_sample(x, 3, torch.randn(2, 3, 4, 4), ab)
    with pytest.raises(ValueError, match="prediction_type"):
        D.p_sample(x, 3, x, ab, prediction_type="noise")
    with pytest.raises(ValueError, match="backwards"):
        D.ddim_step(x, 10, 20, x, ab)
    with pytest.raises(ValueError, match="steps"):
        D.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps"):
        D.ddim_timesteps(100, 101)
    with pytest.raises(ValueError, match="spacing"):
        D.ddim_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="schedule"):
        D.make_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="DDPM sampler"):
        D.p_sample_loop(lambda x, t: x, x, ab, steps=10)
    model = small_model()
    with pytest.raises(ValueError, match="1-channel"):
        model.model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_sample_images_takes_the_cli_options():
    # `minigen sample CKPT --guidance 3 --steps 4` calls sample_images(n, guidance=, steps=)
    model = D.build(dict(channels=8, channel_mult=(1,), layers_per_block=1, attention_resolutions=(),
                         timesteps=20, sample_steps=5), image_shape=(1, 8, 8), num_classes=3)
    calls = []
    model.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = model.sample_images(5, guidance=3.0, steps=4)
    assert x.shape == (5, 1, 8, 8) and calls == [10] * 4  # 4 steps, guided: [uncond, cond] batch
    calls.clear()
    model.sample_images(2)
    assert calls == [2] * 5  # the config's defaults: guidance 1, sample_steps 5
