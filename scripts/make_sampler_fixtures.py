"""Record diffusers' sampler trajectories with a fixed fake model: the fixtures of
tests/test_samplers.py (conformance of minigen.samplers and minigen.flow's samplers with
the published update rules as diffusers implements them).

diffusers is NOT a dependency of minigen: run this from a separate environment,

    python -m venv /work/venv-diffusers
    /work/venv-diffusers/bin/pip install torch==2.13.0 numpy diffusers==0.31.0
    /work/venv-diffusers/bin/python scripts/make_sampler_fixtures.py   # -> tests/fixtures/

Each case starts from fixed N(0, I) noise, runs the scheduler's own loop
(scale_model_input -> fake model -> step) and records every network call (its input and
timestep), the scheduler's sigmas/timesteps and the final sample. The fake model is a
fixed smooth nonlinear function of (x, t), defined once in tests/_fake_sampler_model.py
and imported from there by this script and by the test. Nothing of minigen is imported.
"""

import json
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
OUT = TESTS / "fixtures" / "sampler_trajectories.json"
sys.path.insert(0, str(TESTS))
from _fake_sampler_model import fake_model  # noqa: E402 - the one definition, shared with the test
SHAPE = (2, 1, 3, 3)


def rounded(x):
    """float32 values, written with the 9 significant digits that restore them exactly."""
    return [float(f"{v:.9g}") for v in torch.as_tensor(x).float().double().flatten()]


def run(scheduler, steps, noise, kind):
    scheduler.set_timesteps(steps)
    init = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow schedulers start at t = 1: 1
    sample = noise * init
    calls = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        out = fake_model(inp, t).float()
        calls.append(dict(t=float(t), x=rounded(inp)))
        sample = scheduler.step(out, t, sample).prev_sample
    return dict(
        kind=kind, steps=steps, shape=list(SHAPE), noise=rounded(noise),
        init_noise_sigma=init,
        timesteps=rounded(scheduler.timesteps), sigmas=rounded(scheduler.sigmas),
        calls=calls, final=rounded(sample),
        alphas_cumprod=rounded(scheduler.alphas_cumprod) if hasattr(scheduler, "alphas_cumprod") else None,
        config={k: v for k, v in scheduler.config.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))},
    )


def main():
    import diffusers
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler)

    g = torch.Generator().manual_seed(0)
    cases = {}

    def noise():
        return torch.randn(SHAPE, generator=g)

    # beta_start/end spelled out: DPMSolverMultistep's defaults are DDPM's, Heun's Stable Diffusion's
    beta = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "cosine": dict(beta_schedule="squaredcos_cap_v2"),
            "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}
    pred = {"epsilon": "epsilon", "v": "v_prediction"}
    for name, sched, pt, spacing, steps in [
        ("dpm_eps_linear_linspace_10", "linear", "epsilon", "linspace", 10),
        ("dpm_eps_linear_trailing_20", "linear", "epsilon", "trailing", 20),
        ("dpm_v_cosine_trailing_7", "cosine", "v", "trailing", 7),
        ("dpm_v_scaled_leading_12", "scaled_linear", "v", "leading", 12),
    ]:
        s = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                        solver_type="midpoint", lower_order_final=True, prediction_type=pred[pt],
                                        timestep_spacing=spacing, thresholding=False, **beta[sched])
        cases[name] = run(s, steps, noise(), "dpmsolver++") | dict(beta_schedule=sched, prediction_type=pt,
                                                                  spacing=spacing)
    for name, sched, pt, steps in [
        ("heun_eps_linear_10", "linear", "epsilon", 10),
        ("heun_v_cosine_6", "cosine", "v", 6),
        ("heun_eps_scaled_4", "scaled_linear", "epsilon", 4),
    ]:
        s = HeunDiscreteScheduler(num_train_timesteps=1000, prediction_type=pred[pt], use_karras_sigmas=True,
                                  timestep_spacing="linspace", **beta[sched])
        cases[name] = run(s, steps, noise(), "heun") | dict(beta_schedule=sched, prediction_type=pt)
    for name, cls, shift, steps in [
        ("flow_euler_shift3_8", FlowMatchEulerDiscreteScheduler, 3.0, 8),
        ("flow_euler_shift1_5", FlowMatchEulerDiscreteScheduler, 1.0, 5),
        ("flow_heun_shift3_6", FlowMatchHeunDiscreteScheduler, 3.0, 6),
    ]:
        s = cls(num_train_timesteps=1000, shift=shift)
        cases[name] = run(s, steps, noise(), "flow_" + ("heun" if cls is FlowMatchHeunDiscreteScheduler else "euler"))
        cases[name]["shift"] = shift
    payload = dict(source=f"diffusers {diffusers.__version__}, torch {torch.__version__}",
                   script="scripts/make_sampler_fixtures.py", cases=cases)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, separators=(',', ':')))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
