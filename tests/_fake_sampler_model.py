"""The fixed fake "network" whose sampler trajectories diffusers recorded: written once, used
by scripts/make_sampler_fixtures.py (which records tests/fixtures/sampler_trajectories.json in
a separate environment with diffusers) and by tests/test_samplers.py (which replays them with
minigen's samplers). Only torch and math: nothing of minigen is imported."""

import math

import torch


def fake_model(x, t):
    """The fixed "network": smooth in x and t, different at every position (float64 math)."""
    x = x.double()
    phase = torch.arange(x[0].numel(), dtype=torch.float64).view(x.shape[1:]) * 0.37
    t = float(t)
    return (0.7 + 0.2 * math.cos(t / 300.0)) * torch.tanh(x) + 0.3 * torch.cos(t / 250.0 + phase)
