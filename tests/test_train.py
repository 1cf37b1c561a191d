"""Tests of minigen.train: the loop, its checkpoints and its errors.

Models are defined here (tiny, on 16x16 images) so the tests depend on nothing but the loop.
References are computed independently: by hand in float64 (EMA, LR schedule), by a plain
PyTorch loop written out here (the two-optimizer GAN step), or by a second run of fit with
another setting that must give the same numbers (grad accumulation, exact resume).
"""

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.train import (EMA, CheckpointError, TrainConfig, fit, load_checkpoint, lr_factor, read_log,
                           save_checkpoint, select_device, set_seed)


def structured_images(n, size=16, seed=0):
    """Smooth random images in [-1, 1]: upsampled 4x4 noise, so an autoencoder can learn them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).tanh()


@dataclass
class AEConfig:
    hidden: int = 8
    noise: float = 0.0  # input noise, drawn from torch, numpy and python RNGs


class TinyAE(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config or AEConfig()
        h = self.config.hidden
        self.encoder = nn.Sequential(nn.Conv2d(3, h, 3, 2, 1), nn.SiLU(), nn.Conv2d(h, h, 3, 1, 1))
        self.decoder = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(h, 3, 4, 2, 1))
        self.crash_at = None  # raise at this step, to simulate an interrupted run
        self.nan_at = None

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_loss(self, batch, step):
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated interruption at step {step}")
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x_in = x
        if self.config.noise:
            # every RNG the checkpoint restores is used, so resuming must restore all of them
            scale = self.config.noise * (1 + 0.1 * np.random.rand() + 0.1 * random.random())
            x_in = x + scale * torch.randn_like(x)
        loss = F.mse_loss(self(x_in), x)
        if step == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "l1": (self(x) - x).abs().mean().detach()}

    @torch.no_grad()
    def sample_images(self, n):
        return self.decoder(torch.randn(n, self.config.hidden, 8, 8)).clamp(-1, 1)


def make_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return TinyAE(AEConfig(**cfg))


def assert_same_weights(a, b, exact=True, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), f"{k} differs (max {(sa[k] - sb[k]).abs().max():.3g})"
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=f"{k} differs")


QUIET = dict(progress=False, log_every=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: one thread is fastest, and it avoids OpenMP spinning when the
    # machine's cores are shared with other work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- training works


def test_loss_falls_and_log_is_written(tmp_path):
    data = torch.utils.data.TensorDataset(structured_images(256), torch.zeros(256, dtype=torch.long))
    res = fit(make_model(), data, steps=80, batch_size=32, lr=3e-3, log_every=10,
              out_dir=str(tmp_path), progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 8 and res.step == 80
    assert losses[-1] < 0.3 * losses[0], losses
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10, 81, 10))
    assert set(lines[0]) >= {"step", "loss", "l1", "lr", "img_per_s", "elapsed"}
    assert lines == res.history
    assert (tmp_path / "checkpoint.pt").exists()
    assert not list(tmp_path.glob(".*tmp*")), "temporary checkpoint files left behind"


def test_tensor_data_and_overrides(capsys):
    x = structured_images(40)
    res = fit(make_model(), x, TrainConfig(steps=3, batch_size=8), lr=1e-3, log_every=1)
    assert "3/3" in capsys.readouterr().err  # the progress bar
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert res.history[0]["lr"] == 1e-3
    assert isinstance(res.model, TinyAE) and res.ema is None


# ---------------------------------------------------------------------------- schedule, EMA


def test_lr_factor_values():
    cfg = TrainConfig(steps=14, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    # warm-up 1/4 .. 4/4, then cosine over the remaining 10 steps, progress p = (s - 4) / 10
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 0.55,
                13: 0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi)), 14: 0.1}
    for step, want in expected.items():
        assert lr_factor(step, cfg) == pytest.approx(want, abs=1e-12), step
    lin = TrainConfig(steps=14, warmup_steps=4, lr_schedule="linear", min_lr_ratio=0.2)
    assert lr_factor(6, lin) == pytest.approx(0.2 + 0.8 * 0.8)
    assert lr_factor(100, TrainConfig(steps=14, warmup_steps=4)) == 1.0


def test_lr_schedule_applied_in_fit():
    cfg = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, lr_schedule="cosine",
                      min_lr_ratio=0.05, **QUIET)
    res = fit(make_model(), structured_images(32), cfg)
    for rec in res.history:  # the record of step s+1 reports the lr used by step s
        s = rec["step"] - 1
        w, p = 3, (s - 3) / 9
        want = 1e-2 * ((s + 1) / w if s < w else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))
        assert rec["lr"] == pytest.approx(want, rel=1e-12), s


def test_ema_class_against_hand_computation():
    torch.manual_seed(1)
    net = nn.Linear(5, 3)
    ema = EMA(net, decay=0.9, warmup=False)
    expected = {k: v.detach().double().clone() for k, v in net.named_parameters()}
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        for k, p in net.named_parameters():
            expected[k] = 0.9 * expected[k] + 0.1 * p.detach().double()
    for k in expected:
        torch.testing.assert_close(ema.shadow[k].double(), expected[k], rtol=0, atol=1e-6)
        assert ema.shadow[k].dtype == torch.float32
    other = nn.Linear(5, 3)
    ema2 = EMA(other, 0.5)
    ema2.load_state_dict(ema.state_dict())
    ema2.copy_to(other)
    for k, p in other.named_parameters():
        torch.testing.assert_close(p.double(), expected[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_ema_in_fit_against_hand_computation():
    seen = []  # parameters at the start of each step = after 0, 1, 2, ... updates

    def loss_fn(model, batch, step):
        seen.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
        return F.mse_loss(model(batch), batch)

    res = fit(make_model(), structured_images(32), steps=6, batch_size=8, lr=1e-2, ema_decay=0.8,
              loss_fn=loss_fn, **QUIET)
    final = {k: v.detach().double() for k, v in res.model.named_parameters()}
    snapshots = seen + [final]
    for k in final:
        want = snapshots[0][k]
        for n, snap in enumerate(snapshots[1:], start=1):
            d = min(0.8, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, ..., then 0.8
            want = d * want + (1 - d) * snap[k]
        torch.testing.assert_close(res.ema.shadow[k].double(), want, rtol=0, atol=1e-6)
    assert not torch.equal(res.ema.shadow["encoder.0.weight"], res.model.encoder[0].weight)


def test_ema_warmup_forgets_the_initial_weights():
    # with a fixed 0.999 the average keeps 0.999**1500 = 22% of the initial weights; the
    # warm-up (1 + n) / (10 + n) leaves a negligible share of them
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    plain, warm = EMA(net, 0.999, warmup=False), EMA(net, 0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(1500):
        plain.update(net)
        warm.update(net)
    assert plain.shadow["weight"].item() == pytest.approx(1 - 0.999**1500, rel=1e-3)
    assert warm.shadow["weight"].item() > 0.999
    assert warm.current_decay() == pytest.approx(1501 / 1510) and plain.current_decay() == 0.999
    restored = EMA(net, 0.5, warmup=False)
    restored.load_state_dict(warm.state_dict())
    assert restored.warmup and restored.num_updates == 1500


# ---------------------------------------------------------------------------- equivalences


def test_grad_accumulation_equals_one_big_batch():
    data = structured_images(64)
    kw = dict(steps=5, batch_size=32, lr=1e-2, grad_clip=0.5, **QUIET)
    one = fit(make_model(), data, grad_accum=1, **kw)
    four = fit(make_model(), data, grad_accum=4, **kw)
    assert_same_weights(one.model, four.model, exact=False, atol=1e-6)
    for a, b in zip(one.history, four.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # and the comparison can fail: a different global batch gives different weights
    other = fit(make_model(), data, grad_accum=1, **{**kw, "batch_size": 16})
    with pytest.raises(AssertionError):
        assert_same_weights(one.model, other.model, exact=False, atol=1e-6)


def test_worker_processes_load_the_same_batches():
    data = torch.utils.data.TensorDataset(structured_images(48), torch.zeros(48, dtype=torch.long))
    kw = dict(steps=4, batch_size=8, grad_accum=2, **QUIET)
    main = fit(make_model(noise=0.1), data, num_workers=0, **kw)
    workers = fit(make_model(noise=0.1), data, num_workers=2, **kw)
    assert_same_weights(main.model, workers.model, exact=True)


def test_data_order_is_a_function_of_seed_and_step():
    seen = {}

    def loss_fn(model, batch, step):
        seen.setdefault(step, []).append(batch.clone())
        return model(batch).square().mean()

    data = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    fit(make_model(), data, steps=7, batch_size=4, loss_fn=loss_fn, **QUIET)
    ids = [seen[s][0][:, 0, 0, 0].long().tolist() for s in range(7)]
    # 28 positions = epochs of 10: each epoch is a permutation; batches straddle epochs
    flat = sum(ids, [])
    for e in range(2):
        assert sorted(flat[10 * e:10 * e + 10]) == list(range(10))
    assert flat[:10] != flat[10:20]
    seen.clear()
    fit(make_model(), data, steps=7, batch_size=4, loss_fn=loss_fn, **QUIET)
    assert [seen[s][0][:, 0, 0, 0].long().tolist() for s in range(7)] == ids
    seen.clear()
    fit(make_model(), data, steps=7, batch_size=4, seed=1, loss_fn=loss_fn, **QUIET)
    assert [seen[s][0][:, 0, 0, 0].long().tolist() for s in range(7)] != ids


# ---------------------------------------------------------------------------- two optimizers


class ToyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2))
        self.D = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
        self.calls = []

    def configure_optimizers(self, config):
        return {"g": torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=(0.5, 0.9)),
                "d": torch.optim.Adam(self.D.parameters(), lr=2 * config.lr, betas=(0.5, 0.9))}

    def training_loss(self, batch, step, name):
        self.calls.append((step, name))
        return gan_loss(self, batch, name)


def gan_loss(model, x_real, name):
    z = torch.randn(len(x_real), 4)
    fake = model.G(z)
    if name == "g":
        return -model.D(fake).mean()  # generator: loss flows through D into G
    d_real, d_fake = model.D(x_real), model.D(fake.detach())
    return {"loss": 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()),
            "d_real": d_real.mean().detach()}


def test_two_optimizers_match_a_hand_written_gan_loop():
    torch.manual_seed(3)
    real = torch.randn(64, 2) * 0.3 + 1.0
    gan = ToyGAN()
    ref = ToyGAN()
    ref.load_state_dict(gan.state_dict())
    g0 = {k: v.clone() for k, v in gan.state_dict().items()}

    batches = []
    res = fit(gan, real, steps=5, batch_size=16, lr=1e-2, grad_clip=None, seed=7,
              loss_fn=lambda m, b, s, n: (batches.append(b) if n == "g" else None, gan_loss(m, b, n))[1],
              **QUIET)
    assert {"loss_g", "loss_d", "d_real", "lr_g", "lr_d"} <= set(res.history[0])
    assert res.history[0]["lr_d"] == pytest.approx(2e-2)

    # the same algorithm written out: each phase zeroes all grads and steps only its optimizer
    opts = ref.configure_optimizers(TrainConfig(lr=1e-2))
    torch.manual_seed(7)
    for b in batches:
        for name, opt in opts.items():
            ref.zero_grad(set_to_none=True)
            out = gan_loss(ref, b, name)
            (out["loss"] if isinstance(out, dict) else out).backward()
            opt.step()
    assert_same_weights(gan, ref, exact=False, atol=1e-6)
    for k in g0:  # both networks did train
        assert not torch.equal(g0[k], gan.state_dict()[k]), k

    # training_loss is called with the optimizer's name, "g" before "d", once each per step
    gan2 = ToyGAN()
    fit(gan2, real, steps=2, batch_size=16, **QUIET)
    assert gan2.calls == [(0, "g"), (0, "d"), (1, "g"), (1, "d")]


def test_each_optimizer_changes_only_its_own_params():
    torch.manual_seed(0)
    gan = ToyGAN()
    snaps = []  # (step, phase, G params, D params) at the start of each phase

    def loss_fn(model, batch, step, name):
        flat = lambda net: torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
        snaps.append((step, name, flat(model.G), flat(model.D)))
        return gan_loss(model, batch, name)

    fit(gan, torch.randn(32, 2), steps=3, batch_size=16, lr=1e-2, loss_fn=loss_fn, **QUIET)
    assert [(s, n) for s, n, _, _ in snaps] == [(0, "g"), (0, "d"), (1, "g"), (1, "d"), (2, "g"), (2, "d")]
    for (_, _, g0, d0), (_, _, g1, d1), (_, _, g2, d2) in zip(snaps[0::2], snaps[1::2], snaps[2::2]):
        assert not torch.equal(g0, g1) and torch.equal(d0, d1)  # the "g" phase moved only G
        assert torch.equal(g1, g2) and not torch.equal(d1, d2)  # the "d" phase moved only D


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    res = fit(make_model(hidden=6), structured_images(32), steps=4, batch_size=8, ema_decay=0.9,
              out_dir=str(tmp_path), **QUIET)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt", expected_model=TinyAE)
    assert {"minigen_version", "model_class", "model_config", "model", "ema", "optimizers", "step",
            "rng", "train_config"} <= set(ckpt)
    assert ckpt["model_class"].endswith("TinyAE") and ckpt["step"] == 4
    assert ckpt["model_config"] == {"hidden": 6, "noise": 0.0}
    assert ckpt["train_config"]["steps"] == 4 and ckpt["train_config"]["ema_decay"] == 0.9
    rebuilt = TinyAE(AEConfig(**ckpt["model_config"]))
    rebuilt.load_state_dict(ckpt["model"])
    assert_same_weights(rebuilt, res.model)
    for k, v in ckpt["ema"]["shadow"].items():
        assert torch.equal(v, res.ema.shadow[k])
    # save_checkpoint/load_checkpoint on their own
    save_checkpoint(tmp_path / "sub" / "c.pt", {**ckpt, "step": 99})
    assert load_checkpoint(tmp_path / "sub" / "c.pt")["step"] == 99


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"minigen_version": "x", "model_class": "a.B", "step": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"minigen_version": "x", "model_class": "a.B", "bad": lambda: 0})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_interrupted_run_resumes_exactly(tmp_path, grad_accum):
    data = torch.utils.data.TensorDataset(structured_images(40), torch.zeros(40, dtype=torch.long))
    cfg = TrainConfig(steps=12, batch_size=8, lr=5e-3, warmup_steps=3, lr_schedule="cosine",
                      ema_decay=0.7, grad_accum=grad_accum, ckpt_every=4, seed=5, **QUIET)
    full = fit(make_model(noise=0.3), data, cfg, out_dir=str(tmp_path / "a"))

    model = make_model(noise=0.3)
    model.crash_at = 9  # after the checkpoint at step 8, before the end
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, cfg, out_dir=str(tmp_path / "b"))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 8
    torch.manual_seed(123)  # a fresh process: nothing from the first run is left in memory
    np.random.seed(123)
    random.seed(123)
    resumed = fit(make_model(seed=99, noise=0.3), data, cfg, out_dir=str(tmp_path / "b"))

    assert resumed.step == 12
    assert_same_weights(full.model, resumed.model, exact=True)
    for k in full.ema.shadow:
        assert torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]), k
    # the log file is only appended to: the interrupted run's records, a resume marker at the
    # checkpoint's step, the redone steps; read_log gives each step once, with the same losses
    # as the uninterrupted run
    raw = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [*range(1, 10), 8, *range(9, 13)]
    assert raw[9]["event"] == "resume" and "loss" not in raw[9]
    log = read_log(tmp_path / "b")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert [r["loss"] for r in log] == [r["loss"] for r in full.history]
    assert [r["step"] for r in resumed.history] == list(range(1, 13))

    # and the test can fail: without restoring the RNG the weights differ
    (tmp_path / "b" / "checkpoint.pt").unlink()
    other = fit(make_model(noise=0.3), data, cfg, seed=6, out_dir=str(tmp_path / "b"))
    with pytest.raises(AssertionError):
        assert_same_weights(full.model, other.model, exact=True)


def test_resume_with_more_steps_continues(tmp_path):
    x = structured_images(32)
    fit(make_model(), x, steps=3, batch_size=8, out_dir=str(tmp_path), **QUIET)
    res = fit(make_model(), x, steps=5, batch_size=8, out_dir=str(tmp_path), **QUIET)
    assert res.step == 5 and [h["step"] for h in res.history] == [1, 2, 3, 4, 5]
    done = fit(make_model(), x, steps=5, batch_size=8, out_dir=str(tmp_path), **QUIET)
    assert done.step == 5
    assert_same_weights(done.model, res.model)


def test_sample_grids_do_not_change_the_run(tmp_path):
    x = structured_images(32)
    kw = dict(steps=4, batch_size=8, ema_decay=0.9, **QUIET)
    with_samples = fit(make_model(noise=0.2), x, out_dir=str(tmp_path), sample_every=2, **kw)
    without = fit(make_model(noise=0.2), x, **kw)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000002.png",
                                                                     "step_000004.png"]
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "samples" / "step_000002.png")
    assert img.shape[0] == 4 * 18 + 2 and img.shape[1] == 4 * 18 + 2
    assert_same_weights(with_samples.model, without.model, exact=True)


def test_callback_sees_every_step_and_does_not_change_the_run():
    x = structured_images(32)
    kw = dict(steps=5, batch_size=8, ema_decay=0.9, **QUIET)
    seen = []

    def callback(done, model, ema):
        seen.append((done, model.training, ema is not None))
        model.eval()  # fit puts the mode back
        torch.randn(100)  # and the RNG stream: the noise of the next steps stays the same

    with_cb = fit(make_model(noise=0.2), x, callback=callback, **kw)
    without = fit(make_model(noise=0.2), x, **kw)
    assert seen == [(d, True, True) for d in range(1, 6)]
    assert with_cb.model.training
    assert_same_weights(with_cb.model, without.model, exact=True)


# ---------------------------------------------------------------------------- clear errors


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")

    fit(make_model(), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path / "run"),
        **QUIET)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)

    bare = tmp_path / "bare.pt"
    torch.save(make_model().state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a minigen checkpoint.*state_dict"):
        load_checkpoint(bare)
    pickled = tmp_path / "pickled.pt"
    torch.save({"net": AEConfig()}, pickled)  # an arbitrary Python object
    with pytest.raises(CheckpointError, match="not a minigen checkpoint.*AEConfig.*weights_only"):
        load_checkpoint(pickled)

    with pytest.raises(CheckpointError, match="TinyAE.*not of.*ToyGAN"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt", expected_model=ToyGAN)
    with pytest.raises(CheckpointError, match="TinyAE.*not of.*ToyGAN"):
        fit(ToyGAN(), torch.randn(16, 2), steps=2, batch_size=8, out_dir=str(tmp_path / "run"), **QUIET)


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    model = make_model()
    model.nan_at = 6
    with pytest.raises(FloatingPointError, match=r"nan at step 6.*lower lr.*grad"):
        fit(model, structured_images(32), steps=10, batch_size=8, ckpt_every=5,
            out_dir=str(tmp_path), **QUIET)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.fn = fn

    def training_loss(self, batch, step):
        return self.fn(self.w, batch)


@pytest.mark.parametrize("fn, exc, match", [
    (lambda w, b: [w.sum()], TypeError, "scalar Tensor or a dict"),
    (lambda w, b: {"total": w.sum()}, TypeError, "without a 'loss' key"),
    (lambda w, b: w * 2, ValueError, r"scalar loss.*\.mean\(\)"),
    (lambda w, b: w.sum().detach(), ValueError, "does not require grad"),
    (lambda w, b: {"loss": w.sum(), "vec": w}, ValueError, "metric 'vec' must be a scalar"),
])
def test_bad_losses_give_clear_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fit(Returns(fn), torch.randn(8, 3), steps=1, batch_size=4, **QUIET)


def test_bad_inputs_give_clear_errors():
    x = structured_images(16)
    with pytest.raises(ValueError, match="empty"):
        fit(make_model(), torch.utils.data.TensorDataset(torch.zeros(0, 3, 16, 16)), steps=1, **QUIET)
    with pytest.raises(ValueError, match="empty"):
        fit(make_model(), torch.zeros(0, 3, 16, 16), steps=1, **QUIET)
    with pytest.raises(TypeError, match="not a DataLoader"):
        fit(make_model(), torch.utils.data.DataLoader(x), steps=1, **QUIET)
    with pytest.raises(TypeError, match="no training_loss"):
        fit(nn.Linear(3, 3), x, steps=1, **QUIET)
    with pytest.raises(TypeError, match="unknown TrainConfig field.*stepz"):
        fit(make_model(), x, stepz=3)
    with pytest.raises(ValueError, match="divisible"):
        fit(make_model(), x, steps=1, batch_size=10, grad_accum=4, **QUIET)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="CUDA is not available") if not torch.cuda.is_available() \
            else pytest.raises(ValueError, match="unknown device"):
        select_device("cuda" if not torch.cuda.is_available() else "tpu")


def test_select_device_and_set_seed():
    assert select_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device().type == want
    set_seed(4)
    a = (torch.rand(3), np.random.rand(), random.random())
    set_seed(4)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_bf16_autocast_on_cpu_trains():
    res = fit(make_model(), structured_images(32), steps=3, batch_size=8, precision="bf16", **QUIET)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # weights stay fp32
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_out_dir_may_be_a_path(tmp_path):
    # a pathlib.Path out_dir must not end up in the checkpoint (weights_only would refuse it)
    res = fit(make_model(), structured_images(16), steps=2, batch_size=8, out_dir=tmp_path / "run", **QUIET)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["train_config"]["out_dir"] == str(tmp_path / "run") and res.step == 2


# ----------------------------------------------------------------------------- the practitioner's path


def test_seed_fixes_the_starting_and_the_trained_weights():
    """fit(builder) builds the model after seeding: the global RNG's state before fit does not
    matter, the seed alone decides the initial weights, and then the trained ones, bitwise."""
    x = structured_images(32)
    inits, trained = [], []
    for junk in (1, 2):
        torch.manual_seed(1000 + junk)  # whatever ran before fit drew different numbers
        torch.rand(junk)
        inits.append(fit(lambda: TinyAE(AEConfig(noise=0.3)), x, steps=0, batch_size=8, seed=7, **QUIET).model)
        trained.append(fit(lambda: TinyAE(AEConfig(noise=0.3)), x, steps=3, batch_size=8, seed=7, **QUIET).model)
    assert_same_weights(*inits, exact=True)
    assert_same_weights(*trained, exact=True)
    other = fit(lambda: TinyAE(AEConfig(noise=0.3)), x, steps=0, batch_size=8, seed=8, **QUIET).model
    with pytest.raises(AssertionError):
        assert_same_weights(inits[0], other, exact=True)
    with pytest.raises(TypeError, match="builder passed to fit must return an nn.Module"):
        fit(lambda: 3, x, steps=1)


def test_nan_after_a_bad_update_keeps_a_checkpoint_that_resumes(tmp_path):
    """lr 1e30 makes update 4 finite but huge, so the loss of step 5 is inf. The checkpoint due
    after step 5 holds that update: it must not be written, and the one on disk (step 4) must
    resume cleanly at the lr that was fine before."""
    x = structured_images(32)
    kw = dict(batch_size=8, ckpt_every=1, out_dir=str(tmp_path), **QUIET)
    fit(make_model(), x, steps=4, lr=1e-3, **kw)
    with pytest.raises(FloatingPointError,
                       match=r"became (nan|inf) at step 5\. Try a lower lr \(now 1e\+30\).*from step 4.*resumes"):
        fit(make_model(), x, steps=10, lr=1e30, **kw)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 4
    res = fit(make_model(), x, steps=8, lr=1e-3, **kw)
    assert res.step == 8 and all(math.isfinite(r["loss"]) for r in res.history)
    # a NaN loss: the checkpoint whose weights gave it is not written either
    model = make_model()
    model.nan_at = 9
    with pytest.raises(FloatingPointError, match="nan at step 9.*from step 8"):
        fit(model, x, steps=10, lr=1e-3, **kw)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 8

    # the last step's checkpoint has no next loss: its weights are checked finite instead.
    # At step 9 the loss stays finite but its gradient is not (sqrt at 0), so update 9 is NaN.
    def finite_loss_nan_grad(model, batch, step):
        out = model.training_loss(batch, step)
        if step == 9:
            p = next(model.parameters())
            out["loss"] = out["loss"] + torch.sqrt((p - p.detach()).abs().sum())
        return out

    with pytest.raises(FloatingPointError, match=r"the last update \(step 9\) made model\.\S+ non-finite.*from step 9"):
        fit(make_model(), x, steps=10, lr=1e-3, loss_fn=finite_loss_nan_grad, **kw)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 9 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_changed_model_config_is_refused_on_resume(tmp_path):
    fit(make_model(hidden=8), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path), **QUIET)
    with pytest.raises(CheckpointError, match=r"other model settings \(hidden=8 there, 16 now\).*--set.*--out"):
        fit(make_model(hidden=16), structured_images(16), steps=2, batch_size=8, out_dir=str(tmp_path), **QUIET)


def test_log_is_appended_never_overwritten(tmp_path):
    x = structured_images(16)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 123.0}\n{"step": 2, "lo')  # an old run, cut short
    fit(make_model(), x, steps=2, batch_size=8, out_dir=str(tmp_path), **QUIET)
    raw = (tmp_path / "log.jsonl").read_text().splitlines()
    assert raw[0] == '{"step": 1, "loss": 123.0}' and raw[1] == '{"step": 2, "lo'  # kept as it was
    assert json.loads(raw[2])["event"] == "start" and "earlier run" in json.loads(raw[2])["note"]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2] and read_log(tmp_path)[0]["loss"] != 123.0
    fit(make_model(), x, steps=3, batch_size=8, out_dir=str(tmp_path), **QUIET)  # resume
    raw = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()[2:]]
    assert [r.get("event") for r in raw] == ["start", None, None, "resume", None]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_files_of_killed_writes_are_removed_by_the_next_run(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from minigen import checkpoint

    # atomic_save names its temp file with the writer's PID (seen here while it is fsynced)
    seen = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    checkpoint.atomic_save({"a": 1}, tmp_path / "x.pt")
    monkeypatch.undo()
    name = os.path.basename(seen[0])
    assert name.startswith(f".x.pt.tmp-{os.getpid()}-") and checkpoint._TEMP_WITH_PID.match(name)

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {f".checkpoint.pt.tmp-{_dead_pid()}-abcd1234": False,   # killed writer: removed
                 f".checkpoint.pt.tmp-{alive.pid}-efgh5678": True,      # a live writer: kept
                 ".checkpoint.pt.k3j4h5g6.tmp": False,                  # old naming, untouched for an hour
                 ".checkpoint.pt.a1b2c3d4.tmp": True,                   # old naming, being written now
                 "notes.tmp-123-x": True}                               # not ours
        for f in files:
            (tmp_path / f).write_bytes(b"partial")
        hour_ago = time.time() - 3600
        os.utime(tmp_path / ".checkpoint.pt.k3j4h5g6.tmp", (hour_ago, hour_ago))
        with pytest.warns(UserWarning, match="removed 2 temporary file"):
            fit(make_model(), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path), **QUIET)
        for f, kept in files.items():
            assert (tmp_path / f).exists() == kept, f
    finally:
        alive.kill()
        alive.wait()


_HOLDER = """
import sys, time, torch
from torch import nn
from minigen.train import fit

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
    def training_loss(self, batch, step):
        return (self.w * batch).pow(2).mean()

def hold(done, model, ema):
    print("holding", flush=True)
    time.sleep(300)

fit(M(), torch.randn(8, 1, 2, 2), steps=2, batch_size=4, out_dir=sys.argv[1], progress=False, callback=hold)
"""


def hold_run_dir(path):
    """A second process that holds `path`'s run lock (training, inside a callback) until killed."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def test_two_runs_cannot_share_an_out_dir(tmp_path):
    from minigen.train import RunLockedError

    other = hold_run_dir(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another run \(PID {other.pid}\).*kill {other.pid}"):
            fit(make_model(), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path), **QUIET)
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        other.kill()  # a crash (SIGKILL) releases the lock: no stale lock to clean by hand
        other.wait()
    res = fit(make_model(), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path), **QUIET)
    assert res.step == 1
    # released at the end of fit: the same process may train there again
    assert fit(make_model(), structured_images(16), steps=2, batch_size=8, out_dir=str(tmp_path), **QUIET).step == 2


def test_checkpoint_format_is_versioned(tmp_path):
    import minigen
    from minigen import checkpoint

    fit(make_model(), structured_images(16), steps=1, batch_size=8, out_dir=str(tmp_path), **QUIET)
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["format"] == checkpoint.FORMAT == 2
    newer = tmp_path / "newer.pt"
    torch.save({**raw, "format": 3, "minigen_version": "9.1.0"}, newer)
    with pytest.raises(CheckpointError, match=rf"written by minigen 9\.1\.0 \(checkpoint format 3\); this is "
                                              rf"minigen {minigen.__version__}.*upgrade minigen"):
        load_checkpoint(newer)
    unversioned = tmp_path / "v1.pt"  # minigen 0.1.0 before the field: format 1, migrated
    torch.save({k: v for k, v in raw.items() if k != "format"}, unversioned)
    assert load_checkpoint(unversioned)["format"] == 2
    bogus = tmp_path / "bogus.pt"
    torch.save({**raw, "format": 0}, bogus)
    with pytest.raises(CheckpointError, match="format 0, which no minigen writes"):
        load_checkpoint(bogus)


def test_a_pickle_that_could_run_code_is_refused_as_such(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this would have run",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"could run code.*system.*weights_only=False.*trusted source"):
        load_checkpoint(path)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_a_non_finite_or_non_positive_lr_is_refused_up_front(lr):
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainConfig(lr=lr)
    assert TrainConfig(lr=np.float32(1e-3)).lr == np.float32(1e-3)  # numpy numbers are numbers
