"""minigen.samplers (DPM-Solver++ 2M, Heun on Karras sigmas) and minigen.flow's samplers:

* conformance with diffusers' DPMSolverMultistepScheduler, HeunDiscreteScheduler and
  FlowMatchEuler/HeunDiscreteScheduler: trajectories of a fixed fake model recorded by
  scripts/make_sampler_fixtures.py in a separate environment (tests/fixtures/);
* the formulas on fresh inputs: Karras sigmas, spacings, Heun's order, exactness on a
  Gaussian toy for eps-, v- and flow-models, guidance;
* the models' sampler= option.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _fake_sampler_model import fake_model  # the "network" the fixtures were recorded with

from minigen import diffusion as D
from minigen import flow as F
from minigen import samplers as S

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "sampler_trajectories.json").read_text())["cases"]
EPS32 = float(torch.finfo(torch.float32).eps)


def recording(calls):
    def model_fn(x, t):
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        calls.append((x.detach().double().clone(), float(t[0])))
        return fake_model(x, t[0]).to(x.dtype)
    return model_fn


def tensor(case, key):
    # the fixtures hold float32 values in 9 digits: round back to float32 first, so that
    # 1 - abar near t = 0 sees diffusers' exact abar (the decimal's 5e-10 would be 5e-6 of it)
    return torch.tensor(case[key], dtype=torch.float32).double()


def flow_times(name, case):
    # diffusers' FlowMatchEuler grid runs linspace(1, t_min) with t_min = shift(1/T) and
    # shifts that once more; ours is uniform in t down to 0. The update rule is what the
    # fixture checks, on diffusers' own times (Heun lists inner times twice).
    sig = case["sigmas"]
    return sig[:-1] if "euler" in name else sig[:1] + sig[1:-1:2]


def run_case(name, case, dtype=torch.float64):
    """minigen's trajectory for a fixture: (network calls [(x, t)], final sample)."""
    calls = []
    x_T = tensor(case, "noise").view(case["shape"]).to(dtype)
    if name.startswith("dpm_"):
        sched = S.VPSchedule(tensor(case, "alphas_cumprod"), case["prediction_type"])
        out = S.dpm_solver_pp_2m(recording(calls), x_T, sched.spaced(case["steps"], case["spacing"]), sched.to_x0)
    elif name.startswith("heun_"):
        sched = S.VPSchedule(tensor(case, "alphas_cumprod"), case["prediction_type"])
        out = S.heun(recording(calls), x_T, sched.karras(case["steps"]), sched.to_x0)
    else:
        grid = S.FlowSchedule(1000.0, case["shift"]).from_times(flow_times(name, case))
        out = F.flow_sample(recording(calls), x_T, grid, sampler="heun" if "heun" in name else "euler")
    return calls, out.double()


def float32_tolerance(name, case):
    """diffusers runs its solvers in float32 (state and schedule); we compare with our
    float64 run. The float32 rounding's effect on *this* trajectory is measured by running
    minigen itself in float32: diffusers must agree within a few times that (it also
    rounds its coefficients), plus a few ulps. With eps-prediction at high noise the
    x0 = (x - sigma eps) / alpha conversion amplifies rounding by 1/alpha (~157), which is
    why the tolerance is measured per case rather than fixed."""
    calls64, out64 = run_case(name, case)
    calls32, out32 = run_case(name, case, torch.float32)
    e32 = max([float((a[0] - b[0]).abs().max()) for a, b in zip(calls64, calls32)] + [float((out64 - out32).abs().max())])
    return 10 * e32 + 16 * EPS32, calls64, out64


def check_against_fixture(name):
    case = FIXTURES[name]
    tol, calls, out = float32_tolerance(name, case)
    # measured, but bounded: an unstable implementation must not loosen its own test
    assert tol < 2e-3, f"float32 sensitivity {tol:.1e} of this trajectory is implausibly large"
    ref = case["calls"]
    assert len(calls) == len(ref), f"{len(calls)} network evaluations, diffusers made {len(ref)}"
    shape = case["shape"]
    for i, ((x, t), r) in enumerate(zip(calls, ref)):
        # timesteps to a few float32 ulps of their size
        assert abs(t - r["t"]) <= 8 * EPS32 * max(1.0, abs(r["t"])), f"call {i}: t = {t}, diffusers {r['t']}"
        err = float((x - torch.tensor(r["x"], dtype=torch.float32).double().view(shape)).abs().max())
        assert err <= tol, f"call {i} (t={r['t']:.3f}): input differs by {err:.2e} > {tol:.1e}"
    err = float((out - tensor(case, "final").view(shape)).abs().max())
    assert err <= tol, f"final sample differs by {err:.2e} > {tol:.1e}"


DPM_CASES = [k for k in FIXTURES if k.startswith("dpm_")]
HEUN_CASES = [k for k in FIXTURES if k.startswith("heun_")]
FLOW_CASES = [k for k in FIXTURES if k.startswith("flow_")]


@pytest.mark.parametrize("name", DPM_CASES)
def test_dpm_solver_matches_diffusers(name):
    case = FIXTURES[name]
    sched = S.VPSchedule(tensor(case, "alphas_cumprod"), case["prediction_type"])
    grid = sched.spaced(case["steps"], case["spacing"])
    assert grid.times.tolist() == case["timesteps"]
    np.testing.assert_allclose(grid.ve_sigmas.numpy(), case["sigmas"], rtol=4 * EPS32, atol=0)
    check_against_fixture(name)


@pytest.mark.parametrize("name", HEUN_CASES)
def test_heun_karras_matches_diffusers(name):
    case = FIXTURES[name]
    grid = S.VPSchedule(tensor(case, "alphas_cumprod"), case["prediction_type"]).karras(case["steps"])
    # diffusers' sigmas list every inner point twice (predictor and corrector); ours once
    ref_sigmas = case["sigmas"][:1] + case["sigmas"][1:-1:2] + case["sigmas"][-1:]
    np.testing.assert_allclose(grid.ve_sigmas.numpy(), ref_sigmas, rtol=8 * EPS32, atol=0)
    assert abs(case["init_noise_sigma"] - float(grid.ve_sigmas[0])) <= 8 * EPS32 * case["init_noise_sigma"]
    check_against_fixture(name)


@pytest.mark.parametrize("name", FLOW_CASES)
def test_flow_samplers_match_diffusers(name):
    check_against_fixture(name)


def test_conformance_detects_a_wrong_rule():
    """The tolerance is tight enough: DDIM (DPM-Solver's first order) on the same grid, or
    Heun without its correction, leaves the fixture by far more than it."""
    for name, solver in (("dpm_eps_linear_linspace_10", "ddim"), ("heun_eps_linear_10", "euler")):
        case = FIXTURES[name]
        tol, _, _ = float32_tolerance(name, case)
        sched = S.VPSchedule(tensor(case, "alphas_cumprod"), case["prediction_type"])
        x_T = tensor(case, "noise").view(case["shape"])
        if solver == "ddim":
            out = _first_order(sched, sched.spaced(case["steps"], case["spacing"]), x_T)
        else:
            out = S.heun(lambda x, t: fake_model(x, t[0]), x_T, sched.karras(case["steps"]), sched.to_x0, euler=True)
        err = float((out - tensor(case, "final").view(case["shape"])).abs().max())
        assert err > 100 * tol, f"{solver}: {err:.2e} vs tolerance {tol:.1e}"


def _first_order(sched, grid, x):
    """DDIM / DPM-Solver-1 on a grid, written out: x' = (sigma'/sigma) x + alpha' (1 - e^-h) x0_hat."""
    a, s = grid.alphas.tolist(), grid.sigmas.tolist()
    for i in range(len(grid)):
        x0 = sched.to_x0(fake_model(x, grid.times[i]), x, a[i], s[i])
        x = (s[i + 1] / s[i]) * x + a[i + 1] * (1 - s[i + 1] * a[i] / (a[i + 1] * s[i])) * x0
    return x


def test_fixture_schedules_are_minigens():
    """The fixtures' alphas_cumprod (diffusers, float32) are minigen's schedules."""
    names = {"linear": "linear", "cosine": "cosine", "scaled_linear": "scaled_linear"}
    for case in FIXTURES.values():
        if case.get("alphas_cumprod") is None:
            continue
        ours = D.alphas_cumprod(D.make_beta_schedule(names[case["beta_schedule"]], 1000))
        # float32 cumprod over 1000 factors: relative error up to ~1000 EPS32 in the worst case
        np.testing.assert_allclose(ours.numpy(), case["alphas_cumprod"], rtol=1000 * EPS32, atol=1e-12)


# -- formulas on fresh inputs ---------------------------------------------------------------

from _gaussian_toy import GaussianModel, close_moments, per_channel  # noqa: E402


def test_karras_sigmas_formula():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n = int(torch.randint(2, 40, (), generator=g))
    lo = float(torch.empty(()).uniform_(1e-3, 0.1, generator=g))
    hi = float(torch.empty(()).uniform_(1.0, 200.0, generator=g))
    rho = float(torch.empty(()).uniform_(1.0, 9.0, generator=g))
    s = S.karras_sigmas(n, lo, hi, rho)
    ref = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)
    assert abs(float(s[0]) - hi) < 1e-9 * hi and abs(float(s[-1]) - lo) < 1e-12 and bool((s[1:] < s[:-1]).all())
    for bad in [(0, lo, hi), (n, 0.0, hi), (n, hi, lo), (n, lo, math.inf)]:
        with pytest.raises(ValueError):
            S.karras_sigmas(*bad)


@pytest.mark.parametrize("T,N", [(1000, 10), (1000, 7), (1000, 50), (100, 13), (10, 10)])
def test_dpm_spacings(T, N):
    lin = [round(i * (T - 1) / N) for i in range(N + 1)][::-1][:-1]
    lead = [i * (T // (N + 1)) for i in range(N + 1)][::-1][:-1]
    trail = [round(T - i * T / N) - 1 for i in range(N)]
    assert S.dpm_timesteps(T, N, "linspace").tolist() == lin
    assert S.dpm_timesteps(T, N, "leading").tolist() == lead
    assert S.dpm_timesteps(T, N, "trailing").tolist() == trail == D.ddim_timesteps(T, N, "trailing").tolist()
    with pytest.raises(ValueError, match="spacing"):
        S.dpm_timesteps(T, N, "uniform")
    with pytest.raises(ValueError, match="steps"):
        S.dpm_timesteps(T, T + 1)


def test_vp_schedule_timestep_interpolation():
    ab = D.alphas_cumprod(D.make_beta_schedule("cosine", 1000))
    sched = S.VPSchedule(ab)
    t = torch.randint(0, 1000, (20,))
    np.testing.assert_allclose(sched.timestep(sched.sigmas[t]).numpy(), t.double().numpy(), atol=1e-9)
    # between two training steps: linear in log sigma
    k, w = int(torch.randint(0, 999, ())), float(torch.rand(()))
    log_s = (1 - w) * sched.log_sigmas[k] + w * sched.log_sigmas[k + 1]
    assert abs(float(sched.timestep(log_s.exp())) - (k + w)) < 1e-9
    # outside the trained range: clamped to [0, T - 1]
    assert float(sched.timestep(torch.tensor(1e-6))) == 0 and float(sched.timestep(torch.tensor(1e9))) == 999
    # the grids' coefficients: alpha^2 + sigma^2 = 1 at every noisy point, clean point last
    for grid in (sched.spaced(12, "linspace"), sched.karras(9)):
        np.testing.assert_allclose((grid.alphas**2 + grid.sigmas**2).numpy(), 1.0, atol=1e-12)
        assert float(grid.alphas[-1]) == 1 and float(grid.sigmas[-1]) == 0


def test_to_x0_conversions_on_fresh_inputs():
    x0, eps = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    phi = float(torch.rand(())) * math.pi / 2 * 0.98 + 0.01
    a, s = math.cos(phi), math.sin(phi)
    x = a * x0 + s * eps
    ab = torch.tensor([0.5, 0.4])
    torch.testing.assert_close(S.VPSchedule(ab, "epsilon").to_x0(eps, x, a, s), x0)
    torch.testing.assert_close(S.VPSchedule(ab, "v").to_x0(a * eps - s * x0, x, a, s), x0)
    torch.testing.assert_close(S.VPSchedule(ab, "x0").to_x0(x0, x, a, s), x0)
    t = float(torch.rand(()))
    torch.testing.assert_close(S.FlowSchedule.to_x0(eps - x0, (1 - t) * x0 + t * eps, 1 - t, t), x0)


MU, SD = [1.5, -0.5], [0.3, 0.8]


def exact_solution(x_start, alpha, sigma, mu=MU, s=SD):
    """Where the probability-flow ODE of N(mu, s^2) data takes x_start at (alpha, sigma)."""
    m, sd = per_channel(mu, x_start), per_channel(s, x_start)
    return m + sd * (x_start - alpha * m) / (alpha**2 * sd**2 + sigma**2).sqrt()


def error_vs_exact(solver, grid, fn, to_x0, x_T):
    if solver == "dpm":
        out = S.dpm_solver_pp_2m(fn, x_T, grid, to_x0)
        start = x_T
    elif solver in ("heun", "euler"):
        out = S.heun(fn, x_T, grid, to_x0, euler=solver == "euler")
        start = x_T * float(grid.sigmas[0])  # heun starts at x~ = s_0 x_T, i.e. x_t = sigma_0 x_T
    ref = exact_solution(start, float(grid.alphas[0]), float(grid.sigmas[0]))
    return float((out - ref).abs().max())


def lambda_uniform_flow_grid(n, lam_min=-6.0, lam_max=6.0):
    """n flow points uniform in lambda = log(alpha / sigma) = logit(1 - t)."""
    return S.FlowSchedule()._grid(torch.sigmoid(-torch.linspace(lam_min, lam_max, n, dtype=torch.float64)))


def test_orders_of_the_solvers():
    """Halving the step size divides the error by ~2^order: Euler (= DDIM) 2, Heun and
    DPM-Solver++(2M) 4, measured against the exact ODE solution of a Gaussian toy."""
    x_T = torch.randn(300, 2, 1, 1, dtype=torch.float64)
    sched = S.VPSchedule(D.alphas_cumprod(D.make_beta_schedule("linear", 1000)), "epsilon")
    eps_model = GaussianModel("epsilon", [MU], SD, log_sigmas=sched.log_sigmas)
    flow_model = GaussianModel("flow", [MU], SD)
    cases = [("heun", sched.karras, eps_model, sched.to_x0, (16, 32), 4),
             ("euler", sched.karras, eps_model, sched.to_x0, (16, 32), 2),
             ("dpm", lambda_uniform_flow_grid, flow_model, S.FlowSchedule.to_x0, (32, 64), 4)]
    for solver, make_grid, model, to_x0, (n1, n2), expected in cases:
        e1 = error_vs_exact(solver, make_grid(n1), model, to_x0, x_T)
        e2 = error_vs_exact(solver, make_grid(n2), model, to_x0, x_T)
        assert 0.75 * expected <= e1 / e2 <= 1.4 * expected, f"{solver}: error ratio {e1 / e2:.2f}, expected ~{expected}"


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("sampler,steps", [("dpmsolver++", 15), ("heun", 20)])
def test_samplers_land_on_the_gaussian(kind, sampler, steps):
    """Through GaussianDiffusion.sample, with the exact network of a Gaussian: the samples
    have the data's mean and std (guidance off, then on: w = 3 moves the mean to
    mu_null + 3 (mu_c - mu_null), the Gaussian whose denoiser is the guided one)."""
    torch.manual_seed(0)
    # Heun on the linear schedule: the cosine schedule's last beta (0.999) puts its Karras
    # grid's top at s = 2e4, and 10-20 points spread from there to 0.016 step over the
    # data's scale too coarsely (std 0.85 for 0.3 with 10 points; ~40 are needed). Even on
    # the linear schedule this sharp toy (std 0.3) needs ~20 Karras points (10: std 0.39).
    schedule = "cosine" if sampler == "dpmsolver++" else "linear"
    cfg = D.DiffusionConfig(image_shape=(2, 4, 4), beta_schedule=schedule, prediction_type=kind,
                            clip_denoised=False)
    sched = S.VPSchedule(D.alphas_cumprod(D.make_beta_schedule(schedule, 1000)))
    mu_null = [0.5, 0.0]
    net = GaussianModel("epsilon" if kind == "x0" else kind, [MU], SD, null_mu=mu_null, log_sigmas=sched.log_sigmas)
    if kind == "x0":
        eps_net = net

        class X0(torch.nn.Module):  # the same Gaussian, answering with x0_hat
            config = eps_net.config

            def forward(self, x, t, y=None, context=None):
                a, sg = (v.view(-1, 1, 1, 1) for v in eps_net.alpha_sigma(torch.as_tensor(t).expand(len(x))))
                return (x - sg * eps_net(x, t, y)) / a
        net = X0()
    model = D.GaussianDiffusion(net, cfg)
    x = model.sample(500, y=0, sampler=sampler, steps=steps, guidance_scale=1.0)
    ok, got = close_moments(x, MU, SD)
    assert ok, f"{sampler} on the {kind} model: mean/std {got}, want {MU}/{SD}"
    w = 3.0
    x = model.sample(500, y=0, sampler=sampler, steps=steps, guidance_scale=w)
    mu_w = [n + w * (m - n) for m, n in zip(MU, mu_null)]
    ok, got = close_moments(x, mu_w, SD)
    assert ok, f"guided {sampler} on the {kind} model: mean/std {got}, want {mu_w}/{SD}"


def test_sampler_option_everywhere():
    """sampler= reaches the ODE solvers through GaussianDiffusion.sample / sample_images and
    diffusion.sample_loop; unsupported combinations say why."""
    from minigen.unet import UNetConfig

    model = D.GaussianDiffusion(None, D.DiffusionConfig(image_shape=(1, 8, 8), sample_steps=3,
                                                        unet=UNetConfig(in_channels=1, channels=8, channel_mult=(1,),
                                                                        attention_resolutions=(), num_classes=2)))
    calls = []
    inner = model.model.forward
    model.model.forward = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
    for sampler, expected in (("dpmsolver++", 3), ("heun", 5), ("ddim", 3)):
        calls.clear()
        x = model.sample_images(2, sampler=sampler)
        assert x.shape == (2, 1, 8, 8) and len(calls) == expected == S.nfe(sampler, 3)
    with pytest.raises(ValueError, match="ddim"):
        model.img2img(torch.zeros(1, 1, 8, 8), 0.5, sampler="heun")
    with pytest.raises(ValueError, match="eta"):
        model.sample(1, sampler="dpmsolver++", eta=0.5)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(1, sampler="dpm")
    with pytest.raises(ValueError, match="sampler"):
        D.DiffusionConfig(sampler="euler_a")
    assert D.DiffusionConfig(sampler="heun").sampler == "heun"


def test_grid_errors():
    with pytest.raises(ValueError, match="clean image"):
        S.Grid(torch.tensor([0.5, 0.9]), torch.tensor([0.8, 0.1]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="K network times"):
        S.Grid(torch.tensor([0.5, 1.0]), torch.tensor([0.8, 0.0]), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="alpha > 0"):  # Heun's VE view cannot start at t = 1
        S.heun(lambda x, t: x, torch.zeros(1, 1), S.FlowSchedule().uniform(4), S.FlowSchedule.to_x0)
    with pytest.raises(ValueError, match="prediction_type"):
        S.VPSchedule(torch.tensor([0.9, 0.5]), "flow")
    with pytest.raises(ValueError, match="does not match"):
        S.dpm_solver_pp_2m(lambda x, t: x[:, :1], torch.zeros(2, 3), S.FlowSchedule().uniform(2), S.FlowSchedule.to_x0)


def test_heun_caps_the_karras_top_for_diffusion_models():
    """diffusion_sample's Heun starts at min(80, the schedule's top): the cosine schedule's
    top (s = 2e4 from its 0.999 last beta) is skipped, the linear one's (157) too; with
    sigma_max=None it starts at the top, as diffusers does."""
    for name in ("cosine", "linear"):
        ab = D.alphas_cumprod(D.make_beta_schedule(name, 1000))
        sched = S.VPSchedule(ab)
        for cap, want in ((S.KARRAS_SIGMA_MAX, min(S.KARRAS_SIGMA_MAX, sched.sigma_max)), (None, sched.sigma_max)):
            calls = []
            x_T = torch.randn(2, 1, 2, 2, dtype=torch.float64)
            S.diffusion_sample(recording(calls), x_T, ab, sampler="heun", steps=3, sigma_max=cap, clip_denoised=False)
            assert len(calls) == 5
            assert abs(calls[0][1] - float(sched.timestep(torch.tensor(want)))) < 1e-3
            # the network's first input is sigma_0 x_T: x~ = s_0 x_T scaled by alpha_0
            s0 = want
            torch.testing.assert_close(calls[0][0], x_T * s0 / math.sqrt(1 + s0**2))
