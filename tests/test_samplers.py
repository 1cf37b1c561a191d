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

from minigen import diffusion as D
from minigen import flow as F
from minigen import samplers as S

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "sampler_trajectories.json").read_text())["cases"]
EPS32 = float(torch.finfo(torch.float32).eps)


def fake_model(x, t):
    """The fixed "network" of scripts/make_sampler_fixtures.py (the same formula)."""
    x = x.double()
    phase = torch.arange(x[0].numel(), dtype=torch.float64).view(x.shape[1:]) * 0.37
    t = float(t)
    return (0.7 + 0.2 * math.cos(t / 300.0)) * torch.tanh(x) + 0.3 * torch.cos(t / 250.0 + phase)


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
