"""minigen.diffusion against the formulas of /work/shared/conventions.md ("Diffusion"),
recomputed here independently in float64 with numpy and plain Python (no minigen code in
the references). Fresh random inputs every run; tolerances 1e-6."""

import math

import numpy as np
import pytest
import torch

from minigen import diffusion as D

pytestmark = pytest.mark.usefixtures("one_thread")


T = 1000
TOL = 1e-6


# -- references (float64, numpy / python) ------------------------------------------------


def ref_betas(name, T, b0=None, b1=None):
    if name == "linear":
        b0, b1 = b0 or 1e-4, b1 or 0.02
        return np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)])
    if name == "scaled_linear":
        b0, b1 = b0 or 0.00085, b1 or 0.012
        return np.array([(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (T - 1)) ** 2 for i in range(T)])
    if name == "cosine":
        f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    raise AssertionError(name)


def ref_abar(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return np.array(out)


def fresh(*shape, rng):
    return rng.standard_normal(shape)


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


def as_t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def bc(v):
    return v[:, None, None, None]


# -- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedules(name):
    betas = D.make_beta_schedule(name, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    rb = ref_betas(name, T)
    np.testing.assert_allclose(betas.numpy(), rb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(D.alphas_cumprod(betas).numpy(), ref_abar(rb), rtol=0, atol=1e-12)
    # the wrapper's float32 buffers agree to 1e-6
    model = D.GaussianDiffusion(lambda x, t: x, D.DiffusionConfig(beta_schedule=name))
    np.testing.assert_allclose(model.alphas_cumprod.double().numpy(), ref_abar(rb), rtol=0, atol=TOL)


def test_known_values():
    ab = D.alphas_cumprod(D.make_beta_schedule("linear", 1000))
    assert abs(float(ab[999]) - 4.04e-5) < 0.005e-5  # DDPM's alphabar_999 ~= 4.04e-5
    cos = D.make_beta_schedule("cosine", 1000)
    assert float(cos.max()) == 0.999  # clipped at the end
    ab_c = D.alphas_cumprod(cos)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abs(float(ab_c[499]) - f(0.5) / f(0.0)) < 1e-9  # abar_t = f(t+1)/f(0)
    sl = D.make_beta_schedule("scaled_linear", 1000)
    assert abs(float(sl[0]) - 0.00085) < 1e-12 and abs(float(sl[-1]) - 0.012) < 1e-12
    custom = D.make_beta_schedule("linear", 10, 1e-3, 0.5)
    assert abs(float(custom[0]) - 1e-3) < 1e-15 and abs(float(custom[-1]) - 0.5) < 1e-15


# -- forward process, posterior ------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample(name, rng):
    ab = ref_abar(ref_betas(name, T))
    x0, noise = fresh(6, 3, 5, 4, rng=rng), fresh(6, 3, 5, 4, rng=rng)
    t = np.concatenate([[0, T - 1], rng.integers(0, T, 4)])
    ref = np.stack([math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * noise[i] for i, ti in enumerate(t)])
    out = D.q_sample(as_t(x0), as_t(t), as_t(noise), as_t(ab))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=TOL)
    # float32 images with the float64 schedule
    out32 = D.q_sample(as_t(x0).float(), as_t(t), as_t(noise).float(), as_t(ab))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.double().numpy(), ref, rtol=0, atol=1e-5)


def test_x0_eps_v_conversions(rng):
    ab = ref_abar(ref_betas("linear", T))
    x0, eps = fresh(5, 2, 3, 3, rng=rng), fresh(5, 2, 3, 3, rng=rng)
    t = rng.integers(0, T, 5)
    a = ab[t]
    xt = bc(np.sqrt(a)) * x0 + bc(np.sqrt(1 - a)) * eps
    v = bc(np.sqrt(a)) * eps - bc(np.sqrt(1 - a)) * x0
    args = (as_t(xt), as_t(t))
    np.testing.assert_allclose(D.predict_x0_from_eps(*args, as_t(eps), as_t(ab)).numpy(), x0, atol=TOL)
    np.testing.assert_allclose(D.predict_x0_from_v(*args, as_t(v), as_t(ab)).numpy(), x0, atol=TOL)
    np.testing.assert_allclose(D.predict_eps_from_x0(*args, as_t(x0), as_t(ab)).numpy(), eps, atol=TOL)
    np.testing.assert_allclose(D.get_velocity(as_t(x0), as_t(eps), as_t(t), as_t(ab)).numpy(), v, atol=TOL)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_posterior_mean_variance(name, rng):
    betas = ref_betas(name, T)
    ab = ref_abar(betas)
    x0, xt = fresh(6, 2, 4, 4, rng=rng), fresh(6, 2, 4, 4, rng=rng)
    t = np.concatenate([[0, 1, T - 1], rng.integers(0, T, 3)])
    for i, ti in enumerate(t):
        ab_t, ab_prev, beta = ab[ti], (ab[ti - 1] if ti > 0 else 1.0), betas[ti]
        ref_mean = (math.sqrt(ab_prev) * beta / (1 - ab_t) * x0[i]
                    + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * xt[i])
        ref_var = (1 - ab_prev) / (1 - ab_t) * beta
        mean, var, logvar = D.q_posterior_mean_variance(as_t(x0[i : i + 1]), as_t(xt[i : i + 1]), int(ti), as_t(ab))
        np.testing.assert_allclose(mean[0].numpy(), ref_mean, rtol=0, atol=TOL)
        assert abs(float(var) - ref_var) < TOL
        assert abs(float(logvar) - math.log(max(ref_var, 1e-20))) < TOL  # beta~_0 = 0 -> log 1e-20
    # batched over mixed t gives the same
    mean, var, _ = D.q_posterior_mean_variance(as_t(x0), as_t(xt), as_t(t), as_t(ab))
    assert mean.shape == x0.shape and var.shape == (6, 1, 1, 1)


# -- DDPM step --------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step(variance_type, prediction_type, clip, rng):
    betas = ref_betas("linear", T)
    ab = ref_abar(betas)
    n = 6
    xt, out, z = (fresh(n, 3, 4, 4, rng=rng) for _ in range(3))
    xt *= 1.5  # so that some x0 predictions fall outside [-1, 1] and clipping matters
    t = np.concatenate([[0, 1, T - 1], rng.integers(1, T, n - 3)])
    res = D.p_sample(as_t(xt), as_t(t), as_t(out), as_t(ab), noise=as_t(z), prediction_type=prediction_type,
                     variance_type=variance_type, clip_denoised=clip)
    for i, ti in enumerate(t):
        a, ap, b = ab[ti], (ab[ti - 1] if ti > 0 else 1.0), betas[ti]
        if prediction_type == "epsilon":
            x0 = (xt[i] - math.sqrt(1 - a) * out[i]) / math.sqrt(a)
        else:
            x0 = math.sqrt(a) * xt[i] - math.sqrt(1 - a) * out[i]
        if clip:
            x0 = np.clip(x0, -1, 1)
        mean = math.sqrt(ap) * b / (1 - a) * x0 + math.sqrt(1 - b) * (1 - ap) / (1 - a) * xt[i]
        var = (1 - ap) / (1 - a) * b if variance_type == "fixed_small" else b
        ref = mean + (math.sqrt(var) * z[i] if ti > 0 else 0.0)  # no noise at t = 0
        np.testing.assert_allclose(res[i].numpy(), ref, rtol=0, atol=TOL, err_msg=f"t={ti}")


# -- DDIM -------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddim_step(eta, prediction_type, rng):
    ab = ref_abar(ref_betas("cosine", T))
    for t, t_prev in [(999, 979), (519, 499), (19, -1), (5, 0), (980, 960)]:
        xt, out, z = (fresh(3, 2, 4, 4, rng=rng) for _ in range(3))
        a, ap = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)
        if prediction_type == "epsilon":
            x0_raw = (xt - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:
            x0_raw = math.sqrt(a) * xt - math.sqrt(1 - a) * out
        # eps from the UNclipped prediction (diffusers' default use_clipped_model_output=False);
        # only x0 is clipped. Re-deriving eps from the clipped x0 left sampling noise in the images.
        eps = (xt - math.sqrt(a) * x0_raw) / math.sqrt(1 - a)
        if prediction_type == "epsilon":
            np.testing.assert_allclose(eps, out, rtol=0, atol=1e-9)
        x0 = np.clip(x0_raw, -1, 1)
        assert (x0 != x0_raw).any() or t < 100  # clipping is exercised at the noisy steps
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        ref = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps + sigma * z
        res = D.ddim_step(as_t(xt), t, t_prev, as_t(out), as_t(ab), eta=eta, noise=as_t(z),
                          prediction_type=prediction_type)
        np.testing.assert_allclose(res.numpy(), ref, rtol=0, atol=TOL, err_msg=f"t={t}->{t_prev}")
        if t_prev == -1:  # the last step lands on x0_hat exactly (abar_prev = 1)
            np.testing.assert_allclose(res.numpy(), x0, rtol=0, atol=TOL)


def test_ddim_eta1_is_ddpm_on_consecutive_steps(rng):
    # exact without clipping; with clipping DDPM's posterior mean sees only the clipped x0
    # while DDIM keeps the network's unclipped eps, so the two differ by design
    ab = ref_abar(ref_betas("linear", T))
    xt, out, z = (fresh(2, 1, 3, 3, rng=rng) for _ in range(3))
    for t in (1, 400, 999):
        a = D.ddim_step(as_t(xt), t, t - 1, as_t(out), as_t(ab), eta=1.0, noise=as_t(z), clip_denoised=False)
        b = D.p_sample(as_t(xt), t, as_t(out), as_t(ab), noise=as_t(z), clip_denoised=False)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=TOL)


# -- timestep spacing ----------------------------------------------------------------------


def test_spacings_T1000_N50():
    assert D.ddim_timesteps(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    trailing = D.ddim_timesteps(1000, 50, "trailing").tolist()
    assert trailing == list(range(999, 18, -20)) and trailing[0] == 999 and trailing[-1] == 19
    lin = D.ddim_timesteps(1000, 50, "linspace").tolist()
    assert lin == [round(i * 999 / 49) for i in range(49, -1, -1)] and lin[0] == 999 and lin[-1] == 0
    assert D.ddim_timesteps(1000, 50).tolist() == trailing  # trailing is the default


@pytest.mark.parametrize("T_,N", [(1000, 7), (1000, 1000), (100, 30), (10, 3), (1000, 1)])
def test_spacings_general(T_, N):
    lead = [i * (T_ // N) for i in range(N)][::-1]
    trail = [round(T_ - i * T_ / N) - 1 for i in range(N)]
    lin = [round(i * (T_ - 1) / (N - 1)) if N > 1 else 0 for i in range(N)][::-1]
    assert D.ddim_timesteps(T_, N, "leading").tolist() == lead
    assert D.ddim_timesteps(T_, N, "trailing").tolist() == trail
    assert D.ddim_timesteps(T_, N, "linspace").tolist() == lin
    for sp in ("leading", "trailing", "linspace"):
        ts = D.ddim_timesteps(T_, N, sp)
        assert ts.dtype == torch.int64 and len(ts) == N and ts.min() >= 0 and ts.max() < T_


# -- training targets ----------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_training_loss_value(prediction_type, rng):
    ab = ref_abar(ref_betas("linear", T))
    x0, noise, out = (fresh(4, 1, 3, 3, rng=rng) for _ in range(3))
    t = rng.integers(0, T, 4)
    a = bc(ab[t])
    target = {"epsilon": noise, "x0": x0, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0}[prediction_type]
    xt_ref = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return as_t(out)

    loss = D.training_losses(model, as_t(x0), as_t(ab), t=as_t(t), noise=as_t(noise), prediction_type=prediction_type)
    assert abs(float(loss) - float(np.mean((out - target) ** 2))) < TOL
    np.testing.assert_allclose(seen["x"].numpy(), xt_ref, atol=TOL)
    assert seen["t"].tolist() == t.tolist()
