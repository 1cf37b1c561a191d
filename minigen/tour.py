"""`minigen tour`: train every model family briefly on built-in data and write a report.

The tour is the project's main job and its smoke test on a new machine: each stage trains
one family through `minigen.train.fit`, draws samples (or reconstructions) into a PNG and
measures what can be measured in a few seconds. The report (`report.md`) collects the
figures in one table. A family whose module is not in this version of minigen is listed as
missing rather than failing the tour.

Budgets: about 10 minutes in all on a 2-core CPU by default; `--quick` (or MINIGEN_QUICK=1)
shrinks every stage to seconds, for tests.
"""

from __future__ import annotations

import json
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minigen
from minigen import data, plot, train
from minigen.course import budget


@dataclass
class StageResult:
    family: str
    dataset: str
    params: int = 0
    steps: int = 0
    train_s: float = 0.0
    sample_s_per_image: float | None = None
    metrics: dict = field(default_factory=dict)
    image: str | None = None
    note: str = ""


def _train_set(name: str):
    """The training split; in quick mode only its first images, so a fresh machine need not
    generate (and cache) the full split just to smoke-test the tour."""
    return data.load_dataset(name, split="train", n=budget(None, quick=2048))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _fit(model, ds, steps, out_dir, device, seed, **cfg):
    config = train.TrainConfig(steps=steps, device=device, seed=seed, out_dir=None,
                               progress=True, log_every=max(1, steps // 10), **cfg)
    t0 = time.perf_counter()
    result = train.fit(model, ds, config)
    return result, time.perf_counter() - t0


def _reconstruction_metrics(model, x) -> dict:
    from minigen import metrics

    model.eval()
    with torch.no_grad():
        x_hat = model.reconstruct(x).clamp(-1, 1)
    return {
        "PSNR (dB)": float(metrics.psnr(x_hat, x).mean()),
        "SSIM": float(metrics.ssim(x_hat, x).mean()),
    }, x_hat


def stage_autoencoder(out: Path, device, seed) -> StageResult:
    from minigen.autoencoder import AutoEncoder, AutoEncoderConfig

    ds = _train_set("shapes")
    model = AutoEncoder(AutoEncoderConfig(in_channels=3, image_size=32, channels=32, latent_channels=8))
    steps = budget(300, quick=20, gpu=3000)
    _, secs = _fit(model, ds, steps, out, device, seed, batch_size=64, lr=2e-3)
    x, _ = data.load_dataset("shapes", split="test").tensors(256)
    m, x_hat = _reconstruction_metrics(model.cpu(), x)
    path = out / "autoencoder_reconstructions.png"
    plot.save_grid(torch.cat([x[:16], x_hat[:16]]), path, nrow=16, scale=2)
    return StageResult("autoencoder", "shapes", _params(model), steps, secs, None, m, path.name,
                       "top row: test images; bottom row: reconstructions (not a generative model)")


def _sample_quality(name: str, x: torch.Tensor, y: torch.Tensor | None, n_real: int) -> dict:
    """FD in the judge's feature space against the test split, beside the real-vs-real FD at
    the same n (FD is biased upwards at small n, so only the pair can be read), and the
    judge's accuracy on the requested classes."""
    from minigen import judge as judges
    from minigen import metrics

    n = min(len(x), n_real)
    real_train, _ = data.load_dataset(name, split="train", n=n).tensors()
    out = {f"FD-{name}": judges.fd_score(name, x[:n], n=n),
           f"FD real-vs-real (n={n})": judges.fd_score(name, real_train, n=n)}
    if y is not None:
        out["class accuracy"] = metrics.conditional_accuracy(judges.load_judge(name), x, y)
    return out


def _timed_samples(fn, n):
    t0 = time.perf_counter()
    with torch.no_grad():
        x = fn(n)
    return x.clamp(-1, 1).cpu(), (time.perf_counter() - t0) / n


def stage_vae(out: Path, device, seed) -> StageResult:
    from minigen.vae import VAE, VAEConfig

    ds = _train_set("digits")
    model = VAE(VAEConfig(in_channels=1, image_size=28, latent_dim=16, likelihood="bernoulli"))
    steps = budget(800, quick=20, gpu=5000)
    _, secs = _fit(model, ds, steps, out, device, seed, batch_size=128, lr=1e-3)
    model = model.cpu().eval()
    x_test, _ = data.load_dataset("digits", split="test", n=budget(2000, quick=200)).tensors()
    ev = model.evaluate(x_test)
    n = budget(1000, quick=64)
    x, per_image = _timed_samples(model.sample_images, n)
    m = {"test ELBO (nats/image)": ev["elbo"], "bits/dim (Bernoulli)": ev["bits_per_dim"]}
    m |= _sample_quality("digits", x, None, n)
    path = out / "vae_samples.png"
    plot.save_grid(x[:64], path, nrow=16, scale=2)
    return StageResult("VAE", "digits", _params(model), steps, secs, per_image, m, path.name,
                       "samples from the prior p(z) = N(0, I), decoded (mean of the Bernoulli decoder)")


def stage_vqvae_and_prior(out: Path, device, seed) -> list[StageResult]:
    from minigen import metrics
    from minigen.transformer import GPT, GPTConfig, PriorDataset
    from minigen.vq import VQVAE, VQVAEConfig

    ds = _train_set("shapes")
    vq = VQVAE(VQVAEConfig(num_codes=128, code_dim=32, hidden_channels=64))
    steps = budget(400, quick=20, gpu=4000)
    _, secs = _fit(vq, ds, steps, out, device, seed, batch_size=64, lr=1e-3)
    vq = vq.cpu().eval()
    x_test, _ = data.load_dataset("shapes", split="test", n=budget(1000, quick=128)).tensors()
    m, x_hat = _reconstruction_metrics(vq, x_test)
    with torch.no_grad():
        idx_test = vq.encode(x_test)[1]
    usage = metrics.codebook_usage(idx_test, vq.config.num_codes)
    m |= {"codebook perplexity": usage.perplexity, "codes used": usage.fraction_used}
    path = out / "vqvae_reconstructions.png"
    plot.save_grid(torch.cat([x_test[:16], x_hat[:16]]), path, nrow=16, scale=2)
    results = [StageResult("VQ-VAE", "shapes", _params(vq), steps, secs, None, m, path.name,
                           "top row: test images; bottom row: reconstructions through 8x8 codes")]

    # The prior: a class-conditional transformer over the 8x8 code maps of the training set.
    n_train = budget(10000, quick=512)
    x_train, y_train = ds.tensors(n_train)
    with torch.no_grad():
        codes = torch.cat([vq.encode(x_train[i:i + 500])[1] for i in range(0, n_train, 500)])
    gpt = GPT(GPTConfig(vocab_size=vq.config.num_codes, block_size=codes[0].numel(),
                        n_layer=4, n_head=4, n_embd=128, num_classes=len(ds.classes)))
    steps = budget(600, quick=20, gpu=5000)
    _, secs = _fit(gpt, PriorDataset(codes, y_train), steps, out, device, seed, batch_size=64, lr=1e-3)
    gpt = gpt.cpu().eval()
    n = budget(360, quick=36)
    y = torch.arange(n) % len(ds.classes)
    h = w = vq.config.latent_size

    def sample(k):
        tokens = gpt.generate(y[:k], num_tokens=h * w, temperature=1.0, top_k=32)
        return vq.decode_indices(tokens[:, -h * w:].reshape(k, h, w))

    x, per_image = _timed_samples(sample, n)
    path = out / "vqvae_prior_samples.png"
    plot.save_grid(x[:72], path, nrow=18, scale=2)
    results.append(StageResult("VQ-VAE + transformer prior", "shapes", _params(gpt), steps, secs, per_image,
                               _sample_quality("shapes", x, y, n), path.name,
                               "class-conditional samples (one column per class: 3 shapes x 6 colours), top-k 32"))
    return results


def stage_ddpm(out: Path, device, seed) -> StageResult:
    from minigen import diffusion

    ds = _train_set("shapes")
    # A small U-Net: the tour has minutes, not hours (lesson 05/06 train longer).
    model = diffusion.build({"beta_schedule": "cosine", "channels": 32}, ds.image_shape, len(ds.classes))
    steps = budget(400, quick=10, gpu=20000)
    _, secs = _fit(model, ds, steps, out, device, seed, batch_size=64, lr=5e-4, ema_decay=None)
    model = model.to(device).eval()
    n = budget(180, quick=18)
    y = torch.arange(n) % len(ds.classes)
    x, per_image = _timed_samples(
        lambda k: model.sample(k, y=y[:k].to(device), guidance_scale=3.0, steps=budget(50, quick=5)), n)
    path = out / "ddpm_samples.png"
    plot.save_grid(x[:72], path, nrow=18, scale=2)
    return StageResult("DDPM (DDIM sampler)", "shapes", _params(model), steps, secs, per_image,
                       _sample_quality("shapes", x, y, n), path.name,
                       "class-conditional samples, DDIM 50 steps, classifier-free guidance 3")


# Each stage: (family name, function). Stages whose module is missing are reported as such.
STAGES = [
    ("autoencoder", stage_autoencoder),
    ("VAE", stage_vae),
    ("VQ-VAE + prior", stage_vqvae_and_prior),
    ("DDPM", stage_ddpm),
]


def _environment() -> dict:
    return {
        "minigen": minigen.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_report(out: Path, results: list[StageResult], failures: dict, env: dict, total_s: float) -> Path:
    lines = ["# minigen tour", "",
             f"minigen {env['minigen']}, torch {env['torch']}, Python {env['python']}, "
             f"{env['machine']}, {env['threads']} threads, device {env['device']}, {env['date']}; "
             f"total {total_s / 60:.1f} min{' (quick mode)' if env['quick'] else ''}.", "",
             "| family | data | params | steps | train time | sampling / image | figures |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        figs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.metrics.items())
        samp = f"{r.sample_s_per_image * 1000:.1f} ms" if r.sample_s_per_image is not None else "—"
        lines.append(f"| {r.family} | {r.dataset} | {r.params / 1e6:.2f}M | {r.steps} | {r.train_s:.0f} s "
                     f"| {samp} | {figs} |")
    for fam, err in failures.items():
        lines.append(f"| {fam} | — | — | — | — | — | failed: {err} |")
    lines.append("")
    for r in results:
        if r.image:
            lines += [f"## {r.family}", "", r.note, "", f"![{r.family}]({r.image})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(
        {"environment": env, "total_s": total_s, "failures": failures,
         "results": [r.__dict__ for r in results]}, indent=2))
    return path


def run(out_dir="tour", quick: bool = False, device: str = "auto", seed: int = 0) -> int:
    import os

    if quick:
        os.environ["MINIGEN_QUICK"] = "1"
    from minigen.course import is_quick

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = train.select_device(device)
    env = _environment() | {"device": str(dev), "quick": is_quick()}
    results, failures = [], {}
    t0 = time.perf_counter()
    for family, stage in STAGES:
        print(f"\n== {family} ==", flush=True)
        try:
            res = stage(out, str(dev), seed)
            results.extend(res if isinstance(res, list) else [res])
        except ImportError as e:
            failures[family] = f"module missing ({e})"
        except Exception as e:  # one family failing must not hide the others' results
            traceback.print_exc()
            failures[family] = f"{type(e).__name__}: {e}"
        write_report(out, results, failures, env, time.perf_counter() - t0)
    path = write_report(out, results, failures, env, time.perf_counter() - t0)
    print(f"\nreport: {path}  ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 1 if failures else 0
