"""`minigen tour`: train every model family briefly on built-in data and write a report.

The tour is the project's main job and its smoke test on a new machine. Each stage trains
one family through `minigen.train.fit`, draws samples (or reconstructions) into a PNG and
measures what can be measured in seconds:

    autoencoder             reconstruction PSNR / SSIM
    VAE (digits)            test ELBO, samples: FD-digits, precision / recall
    VQ-VAE                  reconstruction PSNR, codebook usage
    VQ-VAE + GPT prior      class-conditional samples: FD-shapes, precision / recall, accuracy
    VQGAN                   reconstruction PSNR, codebook usage (its latents feed the LDM)
    VQGAN + GPT prior       as the VQ-VAE prior, over the VQGAN's codes
    DDPM                    one U-Net; 1000-step ancestral sampling timed on a few images
    DPM-Solver++            the same U-Net, 10 evaluations: FD, precision / recall, accuracy
    latent diffusion        text prompts through the tour's VQGAN: FD, caption accuracy

`report.md` holds one table and a gallery (a PNG per family); `report.json` the same
figures plus the environment and the wall and CPU time of every stage. A stage that fails
is reported as failed and the tour goes on (a later stage that needs its model says so).

FD is the Frechet distance in the feature space of minigen's offline judge networks
(minigen.judge), next to the real-vs-real FD at the same n: FD is biased upwards at small
n, so only the pair can be read. Precision / recall are Kynkaanniemi et al.'s (k = 3) in
the same feature space. Reconstructions, timing, prior sampling and caption accuracy go
through minigen.evaluate, as the reference checkpoints' do; the tour's sample figures
(`_sample_quality`) compare against the judge's test-split statistics and the training
images, a protocol of its own that its published numbers were measured with.

Budgets: the default tour is sized for under 10 minutes on an idle 2-core CPU. Measured
on 2026-11-25 (AMD EPYC, 2 vCPUs, torch 2.13, one thread on a loaded machine) it used
686 CPU seconds in all: autoencoder 26, VAE 48, VQ-VAE + prior 85, VQGAN + prior 122,
DDPM / DDIM 265, latent diffusion 139 (then sampled with DDIM 25 steps; DPM-Solver++ at 10
evaluations now spends 2/5 of those network calls); two threads on an idle machine finish it in roughly
0.5-0.6x that as wall time (the ratio the previous tour's DDPM stage showed), about
6-7 minutes. report.json records each stage's wall and CPU seconds, so a run shows where
the time went. `--quick` (or MINIGEN_QUICK=1) shrinks every stage to seconds, for tests. These are minute-scale budgets: lesson 08 and the reference
checkpoints (minigen.reference) show what the same models do with more training.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minigen
from minigen import data, evaluate, plot, train
from minigen.course import budget

# the tour's fast solver for its diffusion and latent-diffusion samples (minigen.samplers)
FAST_SAMPLER, FAST_STEPS = "dpmsolver++", 10

HONEST_LINE = ("These are minute-scale budgets: every model above trained for one to three minutes on "
               "a CPU, so the samples are rough and the figures say that the pipeline works, not how "
               "good these architectures can be. Lesson 08 and the reference checkpoints "
               "(`python -m minigen.reference`, shipped in `minigen/weights/reference/`) show the same "
               "models trained longer.")


@dataclass
class StageResult:
    family: str
    dataset: str
    params: int = 0
    steps: int = 0
    train_s: float = 0.0                     # wall seconds in minigen.train.fit
    train_cpu_s: float = 0.0                 # CPU seconds (all threads) in fit
    sample_s_per_image: float | None = None  # wall seconds per generated image
    metrics: dict = field(default_factory=dict)
    image: str | None = None
    note: str = ""


class Clock:
    """Wall and CPU time since construction (CPU = time.process_time, all threads)."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0


@dataclass
class Context:
    """What every stage gets: the output folder, device, seed, and the models that later
    stages reuse (the latent diffusion stage needs the VQGAN stage's autoencoder)."""
    out: Path
    device: str
    seed: int
    models: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _train_set(name: str):
    """The first images of the training split: enough for every stage's few hundred steps,
    and a fresh machine generates only these (not the full 50,000) before the tour starts."""
    return data.load_dataset(name, split="train", n=budget(12000, quick=2048, gpu=None))


def _test_set(name: str, n: int):
    return data.load_dataset(name, split="test", n=n)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fit(model, ds, steps, ctx: Context, **cfg):
    """minigen.train.fit with the tour's defaults; returns (result, wall s, CPU s)."""
    config = train.TrainConfig(steps=steps, device=ctx.device, seed=ctx.seed, out_dir=None,
                               progress=True, log_every=max(1, steps // 10), **cfg)
    clock = Clock()
    result = train.fit(model, ds, config)
    return result, clock.wall, clock.cpu


def _timed(fn, n: int):
    """(images clamped to [-1, 1] on the CPU, wall seconds per image) of fn(n)."""
    x, seconds = evaluate.timed(lambda: fn(n))
    return x, seconds / n


def _reconstruction_metrics(model, x) -> tuple[dict, torch.Tensor]:
    m, x_hat = evaluate.reconstruction_metrics(model, x)
    return {"PSNR (dB)": m["psnr_db"], "SSIM": m["ssim"]}, x_hat


def _codebook_metrics(indices, num_codes) -> dict:
    from minigen import metrics

    usage = metrics.codebook_usage(indices, num_codes)
    return {"codebook perplexity": usage.perplexity, "codes used": usage.fraction_used}


_baselines: dict = {}  # dataset -> real-vs-real precision / recall at the tour's n (for the notes)


def _sample_quality(name: str, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """FD to the test split beside the real-vs-real FD (train vs test) at the same n,
    precision / recall against real training images, and the judge's accuracy on the
    requested classes (y)."""
    from minigen import judge as judges
    from minigen import metrics

    n = len(x)
    judge = judges.load_judge(name)
    real, _ = data.load_dataset(name, split="train", n=n).tensors()
    f_fake = judges.extract_features(judge, x)
    f_real = judges.extract_features(judge, real)
    test_stats = judges.reference_statistics(name, n)
    out = {"FD": metrics.frechet_distance(metrics.feature_statistics(f_fake), test_stats),
           "FD real-vs-real": metrics.frechet_distance(metrics.feature_statistics(f_real), test_stats),
           "n": n}
    out["precision"], out["recall"] = metrics.precision_recall(f_real, f_fake, k=3)
    if (name, n) not in _baselines:
        x_test, _ = _test_set(name, n).tensors()
        _baselines[(name, n)] = metrics.precision_recall(
            f_real, judges.extract_features(judge, x_test), k=3)
    if y is not None:
        out["class accuracy"] = metrics.conditional_accuracy(judge, x, y)
    return out


def _save_prompt_grid(images: torch.Tensor, prompts: list[str], per_prompt: int, path: Path) -> None:
    """One row per prompt: the prompt as a label, then its samples."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = len(prompts)
    fig, axes = plt.subplots(rows, 1, figsize=(per_prompt * 0.62 + 2.2, rows * 0.8), squeeze=False)
    for r, prompt in enumerate(prompts):
        ax = axes[r, 0]
        ax.imshow(plot.image_grid(images[r * per_prompt:(r + 1) * per_prompt], nrow=per_prompt))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(prompt.replace(" on a ", "\non a "), rotation=0, ha="right", va="center", fontsize=8)
        for s in ax.spines.values():
            s.set_visible(False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- stages


def stage_autoencoder(ctx: Context) -> StageResult:
    from minigen.autoencoder import AutoEncoder, AutoEncoderConfig

    ds = _train_set("shapes")
    model = AutoEncoder(AutoEncoderConfig(in_channels=3, image_size=32, channels=32, latent_channels=8))
    steps = budget(150, quick=10, gpu=3000)
    _, secs, cpu = _fit(model, ds, steps, ctx, batch_size=64, lr=2e-3)
    x, _ = _test_set("shapes", budget(500, quick=64)).tensors()
    m, x_hat = _reconstruction_metrics(model.cpu(), x)
    path = ctx.out / "autoencoder_reconstructions.png"
    plot.save_grid(torch.cat([x[:18], x_hat[:18]]), path, nrow=18, scale=2)
    return StageResult("autoencoder", "shapes", _params(model), steps, secs, cpu, None, m, path.name,
                       "Top row: test images; bottom row: their reconstructions (a plain autoencoder "
                       "is not a generative model: there is nothing to sample from).")


def stage_vae(ctx: Context) -> StageResult:
    from minigen.vae import VAE, VAEConfig

    ds = _train_set("digits")
    model = VAE(VAEConfig(in_channels=1, image_size=28, latent_dim=16, likelihood="bernoulli"))
    steps = budget(400, quick=10, gpu=5000)
    _, secs, cpu = _fit(model, ds, steps, ctx, batch_size=128, lr=1e-3)
    model = model.cpu().eval()
    x_test, _ = _test_set("digits", budget(2000, quick=200)).tensors()
    ev = model.evaluate(x_test)
    torch.manual_seed(ctx.seed)
    x, per_image = _timed(model.sample_images, budget(500, quick=64))
    m = {"test ELBO (nats/image)": ev["elbo"], "bits/dim (Bernoulli)": ev["bits_per_dim"]}
    m |= _sample_quality("digits", x)
    path = ctx.out / "vae_samples.png"
    plot.save_grid(x[:64], path, nrow=16, scale=2)
    return StageResult("VAE", "digits", _params(model), steps, secs, cpu, per_image, m, path.name,
                       "Samples from the prior p(z) = N(0, I), decoded (the Bernoulli decoder's mean).")


def _prior_stage(family: str, ae, ds, ctx: Context, *, steps: int, n_embd: int, tag: str) -> StageResult:
    """Train a class-conditional GPT prior over the 8x8 code maps of `ae` (a trained VQ-VAE
    or VQGAN) and sample n images, one class per column (3 shapes x 6 colours)."""
    from minigen.transformer import GPT, GPTConfig, PriorDataset

    n_train = min(len(ds), budget(8000, quick=512))
    x_train, y_train = ds.tensors(n_train)
    with torch.no_grad():
        codes = evaluate.in_batches(lambda i, k: ae.encode(x_train[i:i + k])[1], n_train, 500)
    h, w = codes.shape[1:]
    gpt = GPT(GPTConfig(vocab_size=ae.config.num_codes, block_size=h * w, n_layer=4, n_head=4,
                        n_embd=n_embd, num_classes=len(ds.classes)))
    _, secs, cpu = _fit(gpt, PriorDataset(codes, y_train), steps, ctx, batch_size=32, lr=1e-3)
    gpt = gpt.cpu().eval()
    n = budget(90, quick=36)
    y = torch.arange(n) % len(ds.classes)
    g = torch.Generator().manual_seed(ctx.seed)
    x, per_image = _timed(lambda k: evaluate.sample_prior(gpt, ae, y[:k], top_k=32, generator=g), n)
    path = ctx.out / f"{tag}_prior_samples.png"
    plot.save_grid(x[:72], path, nrow=18, scale=2)
    return StageResult(family, "shapes", _params(gpt), steps, secs, cpu, per_image,
                       _sample_quality("shapes", x, y), path.name,
                       f"Class-conditional samples from a GPT prior over the {h}x{w} codes (temperature 1, "
                       f"top-k 32), decoded; one column per class: "
                       f"{', '.join(ds.classes[:6])}, ... (3 shapes x 6 colours).")


def stage_vqvae_and_prior(ctx: Context) -> list[StageResult]:
    from minigen.vq import VQVAE, VQVAEConfig

    ds = _train_set("shapes")
    vq = VQVAE(VQVAEConfig(num_codes=128, code_dim=32, hidden_channels=64))
    steps = budget(300, quick=10, gpu=4000)
    _, secs, cpu = _fit(vq, ds, steps, ctx, batch_size=64, lr=1e-3)
    vq = vq.cpu().eval()
    x_test, _ = _test_set("shapes", budget(500, quick=64)).tensors()
    m, x_hat = _reconstruction_metrics(vq, x_test)
    with torch.no_grad():
        m |= _codebook_metrics(vq.encode(x_test)[1], vq.config.num_codes)
    path = ctx.out / "vqvae_reconstructions.png"
    plot.save_grid(torch.cat([x_test[:18], x_hat[:18]]), path, nrow=18, scale=2)
    results = [StageResult("VQ-VAE", "shapes", _params(vq), steps, secs, cpu, None, m, path.name,
                           "Top row: test images; bottom row: reconstructions through 8x8 codes "
                           "(MSE loss only: blurry edges).")]
    results.append(_prior_stage("VQ-VAE + transformer prior", vq, ds, ctx, tag="vqvae",
                                steps=budget(400, quick=10, gpu=5000), n_embd=96))
    return results


def stage_vqgan_and_prior(ctx: Context) -> list[StageResult]:
    from minigen.vqgan import VQGAN, VQGANConfig

    ds = _train_set("shapes")
    steps = budget(360, quick=8, gpu=4000)
    # A 4x8x8 latent (code_dim 4) so that the latent diffusion stage can reuse this VQGAN
    # (the ldm module's defaults are tuned for it); 256 codes. The GAN terms switch on for
    # the last third: a discriminator on top of an untrained autoencoder only adds noise.
    cfg = VQGANConfig(ch=16, code_dim=4, num_codes=256, disc_start=steps * 2 // 3)
    model = VQGAN(cfg)
    _, secs, cpu = _fit(model, ds, steps, ctx, batch_size=16, lr=5e-4)
    model = model.cpu().eval()
    ctx.models["vqgan"] = model
    x_test, _ = _test_set("shapes", budget(500, quick=64)).tensors()
    m, x_hat = _reconstruction_metrics(model, x_test)
    with torch.no_grad():
        m |= _codebook_metrics(model.encode(x_test)[1], cfg.num_codes)
    path = ctx.out / "vqgan_reconstructions.png"
    plot.save_grid(torch.cat([x_test[:18], x_hat[:18]]), path, nrow=18, scale=2)
    params = sum(p.numel() for p in model.generator_parameters())
    results = [StageResult("VQGAN", "shapes", params, steps, secs, cpu, None, m, path.name,
                           f"Top row: test images; bottom row: reconstructions through 8x8 codes (L1 + "
                           f"perceptual loss, PatchGAN from step {cfg.disc_start}). Params: the autoencoder "
                           f"without the discriminator.")]
    results.append(_prior_stage("VQGAN + transformer prior", model, ds, ctx, tag="vqgan",
                                steps=budget(400, quick=10, gpu=5000), n_embd=96))
    return results


def stage_diffusion(ctx: Context) -> list[StageResult]:
    """One class-conditional U-Net, sampled two ways: DDPM's 1000 ancestral steps (timed
    on a few images: minutes per batch on a CPU) and DPM-Solver++(2M) in 10 evaluations."""
    from minigen import diffusion

    ds = _train_set("shapes")
    # T = 1000 as in DDPM; quick mode shortens the chain so that its ancestral sampling
    # (T network calls) takes seconds, not a minute
    # v-prediction on the cosine schedule: far better samples than epsilon on linear betas
    # at a few hundred steps (benchmarks/ddpm_vs_diffusers.py)
    model = diffusion.build({"beta_schedule": "cosine", "prediction_type": "v", "channels": 32, "layers_per_block": 1,
                             "timesteps": budget(1000, quick=100)}, ds.image_shape, len(ds.classes))
    steps = budget(300, quick=6, gpu=20000)
    _, secs, cpu = _fit(model, ds, steps, ctx, batch_size=32, lr=1e-3)
    model = model.to(ctx.device).eval()
    params = _params(model)
    w = 3.0
    g = torch.Generator(ctx.device).manual_seed(ctx.seed)

    n_ddpm = budget(3, quick=1)
    y = torch.arange(n_ddpm) % len(ds.classes)
    x_ddpm, per_ddpm = _timed(lambda k: model.sample(k, y=y.to(ctx.device), guidance_scale=w, sampler="ddpm",
                                                     generator=g), n_ddpm)
    path = ctx.out / "ddpm_samples.png"
    plot.save_grid(x_ddpm, path, nrow=n_ddpm, scale=3)
    m = {"n": n_ddpm, "sampler": f"DDPM {model.num_timesteps} steps"}
    results = [StageResult("DDPM", "shapes", params, steps, secs, cpu, per_ddpm, m, path.name,
                           f"{n_ddpm} class-conditional samples ({', '.join(ds.classes[:n_ddpm])}) with the "
                           f"{model.num_timesteps}-step ancestral sampler, guidance {w:g}; too slow on a CPU for "
                           f"the FD's sample count, so quality figures are in the DPM-Solver++ row (same network).")]

    # the fast solver: on the reference DDPM, DPM-Solver++ at 10 evaluations gave FD 8.3 (mean of
    # 3 draws, n=200) against DDIM's 8.3 at 50 (benchmarks/results/sampler_nfe.json); the LDM
    # likewise (1.84 against 1.81): DDIM's quality in a fifth of the network calls
    fast_steps = budget(FAST_STEPS, quick=5)
    n = budget(90, quick=36)
    y = torch.arange(n) % len(ds.classes)
    x, per_image = _timed(lambda k: evaluate.in_batches(
        lambda i, b: model.sample(b, y=y[i:i + b].to(ctx.device), guidance_scale=w, sampler=FAST_SAMPLER,
                                  steps=fast_steps, generator=g), k, 90), n)
    path = ctx.out / "dpmsolver_samples.png"
    plot.save_grid(x[:72], path, nrow=18, scale=2)
    results.append(StageResult(f"DPM-Solver++ ({fast_steps} evaluations, same U-Net)", "shapes", params, 0, 0.0, 0.0,
                               per_image, _sample_quality("shapes", x, y), path.name,
                               f"The DDPM row's U-Net sampled with DPM-Solver++(2M) in {fast_steps} network "
                               f"evaluations (the deterministic ODE solver of lesson 09) and classifier-free "
                               f"guidance {w:g}; one column per class."))
    return results


def stage_latent_diffusion(ctx: Context) -> StageResult:
    from minigen import judge as judges
    from minigen import ldm
    from minigen.text import Tokenizer

    if "vqgan" not in ctx.models:
        raise RuntimeError("latent diffusion reuses the tour's VQGAN, and the VQGAN stage did not produce one")
    ds = _train_set("shapes")
    model = ldm.LatentDiffusion(ctx.models["vqgan"], ldm.LatentDiffusionConfig(),
                                Tokenizer.from_captions(ds.captions))
    clock = Clock()
    latents = model.encode_dataset(ds, n=min(len(ds), budget(8000, quick=512)))  # fits scale_factor
    encode_s = clock.wall
    steps = budget(400, quick=8, gpu=10000)
    _, secs, cpu = _fit(model, latents, steps, ctx, batch_size=32, lr=1e-3, warmup_steps=min(50, steps // 5),
                        lr_schedule="cosine")
    model = model.to(ctx.device).eval()
    w = model.config.diffusion["guidance_scale"]
    sample_steps = budget(FAST_STEPS, quick=5)
    g = torch.Generator(ctx.device).manual_seed(ctx.seed)

    # figures: one sample per test caption (prompts the model never trained on as such)
    n = budget(90, quick=36)
    prompts = list(_test_set("shapes", n).captions)
    x, per_image = _timed(lambda k: model.sample(prompts[:k], guidance_scale=w, steps=sample_steps,
                                                 sampler=FAST_SAMPLER, generator=g), n)
    m = _sample_quality("shapes", x)
    m["caption accuracy"] = evaluate.caption_accuracy(judges.load_judge("shapes"), x, prompts)
    m["scale factor"] = model.scale_factor
    m["latent encoding (s)"] = encode_s

    # gallery: a few prompts of different shapes and colours, several samples each
    per_prompt = budget(6, quick=3)
    # gallery: test captions covering every shape, each prompt with a colour not shown yet
    pool = _test_set("shapes", 500)
    shape, color = pool.attributes["shape"].tolist(), pool.attributes["color"].tolist()
    gallery, colors = [], set()
    for _ in range(budget(2, quick=1)):  # rounds over the shapes
        for s in range(len(data.SHAPE_NAMES)):
            i = next((i for i in range(len(pool)) if shape[i] == s and color[i] not in colors), None)
            if i is not None:
                colors.add(color[i])
                gallery.append(pool.captions[i])
    with torch.no_grad():
        xg = model.sample([p for p in gallery for _ in range(per_prompt)], guidance_scale=w, steps=sample_steps,
                          sampler=FAST_SAMPLER, generator=g).clamp(-1, 1).cpu()
    path = ctx.out / "ldm_samples.png"
    _save_prompt_grid(xg, gallery, per_prompt, path)
    return StageResult("latent diffusion (text prompts)", "shapes", _params(model), steps, secs, cpu, per_image,
                       m, path.name,
                       f"Text-to-image samples: a U-Net with cross-attention to a small text encoder, diffusing "
                       f"the {'x'.join(map(str, model.config.latent_shape))} latents of the tour's VQGAN "
                       f"(DPM-Solver++ {sample_steps} evaluations, guidance {w:g}). "
                       f"Each row: one prompt, {per_prompt} samples. "
                       f"Caption accuracy: the judge finds the prompt's shape AND colour (chance 1/18).")


# Each stage: (name, function). A stage returns one StageResult or a list of them.
STAGES = [
    ("autoencoder", stage_autoencoder),
    ("VAE", stage_vae),
    ("VQ-VAE + prior", stage_vqvae_and_prior),
    ("VQGAN + prior", stage_vqgan_and_prior),
    ("DDPM / DDIM", stage_diffusion),
    ("latent diffusion", stage_latent_diffusion),
]


# ----------------------------------------------------------------------------- report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> dict:
    import numpy

    return {
        "minigen": minigen.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


_TABLE_KEYS = ("FD", "FD real-vs-real", "n", "precision", "recall", "class accuracy", "caption accuracy",
               "PSNR (dB)")


def _row(r: StageResult) -> str:
    m = r.metrics
    fd = "—"
    if "FD" in m:
        fd = f"{m['FD']:.1f} (real {m['FD real-vs-real']:.1f}, n={m['n']})"
    pr = f"{m['precision']:.2f} / {m['recall']:.2f}" if "precision" in m else "—"
    acc = "—"
    if "class accuracy" in m:
        acc = f"class {m['class accuracy']:.0%}"
    elif "caption accuracy" in m:
        acc = f"caption {m['caption accuracy']:.0%}"
    psnr = f"{m['PSNR (dB)']:.1f}" if "PSNR (dB)" in m else "—"
    other = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k not in _TABLE_KEYS)
    train_t = f"{r.train_s:.0f} s (CPU {r.train_cpu_s:.0f} s)" if r.steps else "—"
    samp = "—"
    if r.sample_s_per_image is not None:
        t = r.sample_s_per_image
        samp = f"{t * 1000:.0f} ms" if t < 1 else f"{t:.1f} s"
    params = f"{r.params / 1e6:.2f}M"
    return (f"| {r.family} | {r.dataset} | {params} | {r.steps or '—'} | {train_t} | {samp} | {fd} | {pr} "
            f"| {acc} | {psnr} | {other or '—'} |")


def write_report(out: Path, results: list[StageResult], failures: dict, env: dict, total_s: float,
                 stages: list | None = None) -> Path:
    stages = stages or []
    total_cpu = sum(s["cpu_s"] for s in stages)
    lines = ["# minigen tour", "",
             f"minigen {env['minigen']}, torch {env['torch']}, numpy {env['numpy']}, Python {env['python']}; "
             f"{env['cpu']} ({env['cpu_count']} logical CPUs, torch uses {env['threads']} threads), "
             f"{env['os']}, device {env['device']}; {env['date']}.", "",
             f"Total {total_s / 60:.1f} min wall, {total_cpu / 60:.1f} min CPU"
             f"{' (quick mode: seconds per stage, figures meaningless)' if env['quick'] else ''}.", "",
             HONEST_LINE, "",
             "| family | data | params | train steps | train time | sampling / image | FD (judge) "
             "| precision / recall | accuracy | PSNR (dB) | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    for fam, err in failures.items():
        lines.append(f"| {fam} | — | — | — | — | — | — | — | — | — | failed: {err} |")
    lines.append("")
    notes = ["FD: Frechet distance in the offline judge's feature space to the test split; \"real\" is "
             "the FD of as many training images, the floor at that n. Precision / recall (k = 3) against "
             "real training images in the same space"]
    if _baselines:
        notes[0] += "; real test images score " + ", ".join(
            f"{p:.2f} / {r:.2f} ({name}, n={n})" for (name, n), (p, r) in sorted(_baselines.items()))
    notes[0] += ". Accuracy: how often the judge sees the class (or caption) the sample was asked for."
    lines += notes + [""]
    if stages:
        lines += ["| stage | wall | CPU | status |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['wall_s']:.0f} s | {s['cpu_s']:.0f} s | {s['status']} |" for s in stages]
        lines.append("")
    lines += ["## Gallery", ""]
    for r in results:
        if r.image:
            lines += [f"### {r.family}", "", r.note, "", f"![{r.family}]({r.image})", ""]
    path = out / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    (out / "report.json").write_text(json.dumps(
        {"environment": env, "total_s": total_s, "total_cpu_s": total_cpu, "stages": stages,
         "failures": failures, "results": [r.__dict__ for r in results],
         "real_precision_recall": {f"{k[0]} n={k[1]}": v for k, v in _baselines.items()},
         "note": HONEST_LINE}, indent=2))
    return path


def run(out_dir="tour", quick: bool = False, device: str = "auto", seed: int = 0) -> int:
    """Run every stage, writing the report after each one; returns 1 if any stage failed."""
    old_quick = os.environ.get("MINIGEN_QUICK")
    if quick:
        os.environ["MINIGEN_QUICK"] = "1"
    try:
        return _run(Path(out_dir), device, seed)
    finally:  # do not leak quick mode into the caller's process (e.g. other tests)
        if old_quick is None:
            os.environ.pop("MINIGEN_QUICK", None)
        else:
            os.environ["MINIGEN_QUICK"] = old_quick


def _run(out: Path, device: str, seed: int) -> int:
    from minigen.course import is_quick

    out.mkdir(parents=True, exist_ok=True)
    dev = train.select_device(device)
    env = _environment() | {"device": str(dev), "quick": is_quick()}
    ctx = Context(out, str(dev), seed)
    _baselines.clear()
    results, failures, stages = [], {}, []
    total = Clock()
    for name, stage in STAGES:
        print(f"\n== {name} ==", flush=True)
        clock = Clock()
        try:
            res = stage(ctx)
            results.extend(res if isinstance(res, list) else [res])
            status = "ok"
        except ImportError as e:
            failures[name] = status = f"module missing ({e})"
        except Exception as e:  # one family failing must not hide the others' results
            traceback.print_exc()
            failures[name] = status = f"{type(e).__name__}: {e}"
        stages.append({"stage": name, "wall_s": clock.wall, "cpu_s": clock.cpu, "status": status})
        print(f"== {name}: {clock.wall:.0f} s wall, {clock.cpu:.0f} s CPU, {status}", flush=True)
        write_report(out, results, failures, env, total.wall, stages)
    path = write_report(out, results, failures, env, total.wall, stages)
    print(f"\nreport: {path}  ({total.wall / 60:.1f} min wall, {total.cpu / 60:.1f} min CPU)")
    return 1 if failures else 0
