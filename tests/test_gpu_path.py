"""The GPU path of minigen.train.fit: bf16/fp16 autocast, channels_last, fused AdamW, pinned
memory with non-blocking copies, torch.compile.

Everything that can be checked on a CPU is checked here on a CPU (the decisions fit makes and
that each option trains correctly); the CUDA-only parts skip cleanly without a GPU. The full
torch.compile (inductor) run takes about a minute on 2 cores, so it runs only with
MINIGEN_SLOW_TESTS=1; the default run compiles with dynamo's "eager" backend, which traces
the same graph without generating C++.
"""

import functools
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen import optim
from minigen.batching import to_device as _to_device
from minigen.optim import LossModule
from minigen.runtime import cuda_bf16
from minigen.train import TrainConfig, _precision, default_optimizer, fit

QUIET = dict(progress=False, log_every=1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class ConvNet(nn.Module):
    """A conv autoencoder with GroupNorm, like the course's models, and a record of what it saw."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, 2, 1)
        self.norm = nn.GroupNorm(4, 8)
        self.dec = nn.ConvTranspose2d(8, 3, 4, 2, 1)
        self.seen = []  # (dtype of the activations, is the input channels_last, input device)

    def training_loss(self, batch, step):
        x, _ = batch
        h = self.enc(x)
        self.seen.append((h.dtype, x.is_contiguous(memory_format=torch.channels_last), x.device.type))
        return F.mse_loss(self.dec(F.silu(self.norm(h))).float(), x)


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=8, mode="bilinear").tanh()
    return torch.utils.data.TensorDataset(x, torch.arange(n) % 3)


def net():
    torch.manual_seed(0)
    return ConvNet()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, match", [
    ("compile", "yes", "compile must be True or False"),
    ("channels_last", 1, "channels_last must be True or False"),
    ("progress", None, "progress must be True or False"),
    ("precision", "bf32", "precision must be one of"),
    ("device", 0, "device must be a string"),
])
def test_config_rejects_bad_gpu_options(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_precision_on_the_cpu():
    cpu = torch.device("cpu")
    assert _precision(TrainConfig(), cpu) == (None, False)  # auto: fp32 on a CPU
    assert _precision(TrainConfig(precision="fp32"), cpu) == (None, False)
    assert _precision(TrainConfig(precision="bf16"), cpu) == (torch.bfloat16, False)
    assert _precision(TrainConfig(precision="fp16"), cpu) == (torch.float16, True)  # fp16 needs scaling


def test_fused_adamw_is_asked_for_only_on_cuda():
    model = net()
    cfg = TrainConfig(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.9))
    cpu_opt = default_optimizer(model, cfg, torch.device("cpu"))
    assert not cpu_opt.defaults["fused"]
    assert cpu_opt.defaults["lr"] == 3e-3 and cpu_opt.defaults["weight_decay"] == 0.1
    assert cpu_opt.defaults["betas"] == (0.8, 0.9)
    assert len(cpu_opt.param_groups[0]["params"]) == len(list(model.parameters()))
    # the CUDA decision, made on CPU tensors (torch's fused AdamW accepts them too, where built)
    try:
        cuda_opt = default_optimizer(model, cfg, torch.device("cuda"))
    except RuntimeError as e:
        pytest.skip(f"fused AdamW on CPU tensors is not available in this torch: {e}")
    assert cuda_opt.defaults["fused"] is True


def test_fit_builds_its_optimizer_with_default_optimizer(monkeypatch):
    calls = []
    real = optim.default_optimizer

    def spy(model, config, device):
        calls.append(device)
        return real(model, config, device)

    monkeypatch.setattr(optim, "default_optimizer", spy)
    fit(net(), data(), steps=1, batch_size=8, device="cpu", **QUIET)
    assert calls == [torch.device("cpu")]


# ----------------------------------------------------------------------------- precision


def flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# bf16 has an 8-bit significand: torch.finfo's eps is 2**-7, so a value carries 2-3 significant
# digits. Every bound below is a small multiple of it, not a figure read off one CPU: bf16
# kernels round differently on CPUs with and without AVX-512, so the bits differ between
# machines while the size of the error does not.
BF16_EPS = torch.finfo(torch.bfloat16).eps


def test_bf16_autocast_gradient_is_the_fp32_gradient_to_bf16_precision():
    x = data().tensors[0][:8]
    grads = []
    for enabled in (False, True):
        model = net()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model.training_loss((x, None), 0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref, res = grads
    # a few roundings of relative size eps/2 through three layers: well under 2 eps in norm
    assert 0 < (res - ref).norm() / ref.norm() < 2 * BF16_EPS


def test_bf16_autocast_runs_the_network_in_bf16_and_keeps_fp32_weights():
    lr, steps = 1e-2, 4
    init = net()
    ref = fit(net(), data(), steps=steps, batch_size=8, lr=lr, **QUIET)
    res = fit(net(), data(), steps=steps, batch_size=8, lr=lr, precision="bf16", **QUIET)
    assert {s[0] for s in res.model.seen} == {torch.bfloat16}
    assert {s[0] for s in ref.model.seen} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    # the same trajectory, not the same bits: losses agree to a few bf16 roundings
    for a, b in zip(ref.history, res.history):
        assert math.isclose(a["loss"], b["loss"], rel_tol=4 * BF16_EPS), (a, b)
    # Adam normalises every update to about lr, so a weight whose gradient is within bf16
    # rounding of zero may step the other way: per weight, nothing tighter than 2 * lr * steps
    # holds. What must hold is that the bulk of the update is the same.
    update, gap = flat(ref.model) - flat(init), flat(ref.model) - flat(res.model)
    assert 0 < gap.abs().max() <= 2 * lr * steps
    assert gap.norm() < 0.1 * update.norm()


def test_fp16_with_grad_scaler_trains_on_the_cpu():
    res = fit(net(), data(), steps=4, batch_size=8, lr=1e-2, precision="fp16", **QUIET)
    assert {s[0] for s in res.model.seen} == {torch.float16}
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


# ----------------------------------------------------------------------------- memory format, copies


def test_channels_last_trains_like_contiguous():
    ref = fit(net(), data(), steps=5, batch_size=8, lr=1e-2, **QUIET)
    res = fit(net(), data(), steps=5, batch_size=8, lr=1e-2, channels_last=True, **QUIET)
    assert all(s[1] for s in res.model.seen) and not any(s[1] for s in ref.model.seen)
    assert res.model.enc.weight.is_contiguous(memory_format=torch.channels_last)
    # Same maths in another memory layout: equal up to summation order. Each weight's gradient
    # sums batch x H x W = 8 * 8 * 8 = 512 products; another order (NHWC kernels, another CPU's
    # vector width) moves it by at most ~512 fp32 eps relative, and Adam's step (at most lr in
    # size, set by m / sqrt(v)) by about that much relative; 5 steps, x3 for the GroupNorm
    # statistics and the second moment. (Measured: 6.7e-8 with AVX2 kernels, 3.4e-8 without.)
    bound = 3 * 5 * 1e-2 * 512 * torch.finfo(torch.float32).eps
    assert max_diff(ref.model, res.model) < bound
    assert not torch.equal(res.model.enc.weight, net().enc.weight)  # it trained


def test_to_device_on_the_cpu_makes_no_copies():
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    out = _to_device((x, {"y": y, "s": "text"}), torch.device("cpu"), False, False)
    assert out[0] is x and out[1]["y"] is y and out[1]["s"] == "text"
    x_cl, y_cl = _to_device([x, y], torch.device("cpu"), False, True)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(x_cl, x)
    assert y_cl is y  # labels are not images: left alone


# ----------------------------------------------------------------------------- torch.compile


def test_compile_wraps_the_loss_and_trains_identically(monkeypatch):
    compiled = []
    real = torch.compile

    def eager_compile(module, **kwargs):  # dynamo traces the loss; no C++ code generation
        compiled.append(module)
        return real(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    ref = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, **QUIET)
    res = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, compile=True, **QUIET)
    assert len(compiled) == 1 and isinstance(compiled[0], LossModule)
    assert compiled[0].model is res.model  # the compiled wrapper never replaces the result
    assert max_diff(ref.model, res.model) < 1e-6
    assert [round(h["loss"], 6) for h in ref.history] == [round(h["loss"], 6) for h in res.history]


@pytest.mark.skipif(os.environ.get("MINIGEN_SLOW_TESTS") != "1",
                    reason="inductor compilation takes about a minute on 2 cores; set MINIGEN_SLOW_TESTS=1")
def test_compile_with_inductor_on_the_cpu():
    torch._dynamo.reset()
    ref = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, **QUIET)
    res = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, compile=True, **QUIET)
    assert max_diff(ref.model, res.model) < 1e-4


# ----------------------------------------------------------------------------- CUDA only


@cuda
def test_cuda_auto_precision_fused_adamw_and_pinned_copies(monkeypatch):
    kinds = []
    real = torch.optim.AdamW

    def spy(*args, **kwargs):
        kinds.append(kwargs.get("fused"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    res = fit(net(), data(), steps=3, batch_size=8, device="cuda", **QUIET)
    want = torch.bfloat16 if cuda_bf16() else torch.float16
    assert {s[0] for s in res.model.seen} == {want}
    assert {s[2] for s in res.model.seen} == {"cuda"}
    assert kinds == [True]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in res.model.parameters())

    x = torch.randn(4, 3, 8, 8)
    out = _to_device(x, torch.device("cuda"), True, True)
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu(), x)


@cuda
def test_cuda_matches_cpu_in_fp32():
    ref = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, device="cpu", **QUIET)
    res = fit(net(), data(), steps=3, batch_size=8, lr=1e-2, device="cuda", precision="fp32", **QUIET)
    # TF32 may be on for convolutions (cudnn's default): compare loosely
    assert max_diff(ref.model, res.model.cpu()) < 1e-3


@cuda
@pytest.mark.skipif(os.environ.get("MINIGEN_SLOW_TESTS") != "1", reason="set MINIGEN_SLOW_TESTS=1")
def test_cuda_compile_channels_last_bf16():
    torch._dynamo.reset()
    res = fit(net(), data(), steps=3, batch_size=8, device="cuda", compile=True, channels_last=True, **QUIET)
    assert all(math.isfinite(h["loss"]) for h in res.history)
