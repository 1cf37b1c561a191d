"""Exact "networks" for data x0 ~ N(mu, s^2) (independent per channel): the optimal eps-,
v- and flow-predictions have closed forms, and the probability-flow ODE maps the noise to
the data by the affine map x0 = mu + s z. Used by test_samplers.py and test_flow.py."""

import math

import torch
import torch.nn as nn


def posterior(x, alpha, sigma, mu, s):
    """E[eps | x_t] and E[x0 | x_t] for x_t = alpha x0 + sigma eps, x0 ~ N(mu, s^2)."""
    var = alpha**2 * s**2 + sigma**2
    r = (x - alpha * mu) / var
    return sigma * r, mu + alpha * s**2 * r


def per_channel(v, x):
    return torch.as_tensor(v, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


class GaussianModel(nn.Module):
    """The exact network of a class-conditional Gaussian: class c has mean mus[c], the null
    class (id num_classes) mean null_mu; all share the std s. kind: "epsilon", "v" (VP
    diffusion on log_sigmas, time = fractional timestep) or "flow" (time = 1000 t)."""

    def __init__(self, kind, mus, s, null_mu=None, log_sigmas=None, time_scale=1000.0):
        super().__init__()
        self.kind, self.s, self.log_sigmas, self.time_scale = kind, s, log_sigmas, time_scale
        self.mus = [list(m) for m in mus]
        self.null_mu = list(null_mu if null_mu is not None else mus[0])

        class Cfg:
            num_classes = len(mus)

        self.config = Cfg()

    def alpha_sigma(self, t):
        if self.kind == "flow":
            tf = t.double() / self.time_scale
            return 1 - tf, tf
        # log sigma linear between the integer timesteps (as minigen.samplers.VPSchedule.timestep)
        T = len(self.log_sigmas)
        t = t.double().clamp(0, T - 1)
        lo = t.floor().long().clamp(max=T - 2)
        w = t - lo
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]
        ve = log_s.exp()
        a = 1 / (1 + ve**2).sqrt()
        return a, ve * a

    def forward(self, x, t, y=None, context=None):
        t = torch.as_tensor(t).expand(x.shape[0])
        a, sg = (v.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) for v in self.alpha_sigma(t))
        ids = y.tolist() if y is not None else [len(self.mus)] * x.shape[0]
        mu = torch.stack([per_channel(self.mus[i] if i < len(self.mus) else self.null_mu, x)[0] for i in ids])
        s = per_channel(self.s, x)
        eps, x0 = posterior(x, a, sg, mu, s)
        if self.kind == "epsilon":
            return eps
        if self.kind == "v":
            return a * eps - sg * x0
        return eps - x0  # flow velocity


def moments(x):
    """Per-channel mean and std of samples (N, C, ...)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(1), flat.std(1)


def close_moments(x, mu, s, n_sigma=5.0, bias=0.02):
    """Mean and std per channel within n_sigma standard errors plus a discretisation bias."""
    m, sd = moments(x)
    n = x.shape[0] * math.prod(x.shape[2:])
    mu, s = torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    ok_m = ((m - mu).abs() <= n_sigma * s / math.sqrt(n) + bias).all()
    ok_s = ((sd - s).abs() <= n_sigma * s / math.sqrt(2 * n) + bias).all()
    return bool(ok_m and ok_s), (m.tolist(), sd.tolist())
