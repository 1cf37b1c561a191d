"""`minigen tour`: train every model family briefly on built-in data and write a report.

The tour is the project's main job and its smoke test on a new machine. Each stage trains
one family through `minigen.train.fit`, draws samples (or reconstructions) into a PNG and
measures what can be measured in seconds:

    autoencoder             reconstruction PSNR / SSIM
    VAE (digits)            test ELBO, samples: FD-digits, precision / recall
    VQ-VAE                  reconstruction PSNR, codebook usage
    VQ-VAE + GPT prior      class-conditional samples: FD-shapes, precision / recall, accuracy
    VQGAN                   reconstruction PSNR, codebook usage
    VQGAN + GPT prior       as the VQ-VAE prior, over the VQGAN's codes
    flow matching           class-conditional, on the shipped reference VQGAN's latents (the
                            recipe benchmarks/time_to_quality.py found fastest), sampled with
                            DPM-Solver++ in 10 evaluations: FD, precision / recall, accuracy
    latent diffusion        text prompts, on the same latents: FD, caption accuracy

Beside each minute-scale result stands the same family's shipped reference checkpoint
(minigen.reference: VAE, VQ-VAE, VQGAN, both priors, the pixel DDPM, the LDM), sampled or
reconstructing here with the same sampler, n and metrics, plus the figures its manifest
records: what a few minutes buy next to what the architecture does with more training.
The pixel DDPM is no longer trained by the tour (its 300 steps cost 4 of the tour's 11
minutes and gave class accuracy 0.38); its reference row shows it, sampled in 10 evaluations.

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

Budgets: the default tour is sized for under 10 minutes on an idle 2-core CPU, with or
without AVX-512. Measured before this layout (2026-11-25, one thread on a loaded machine):
686 CPU seconds, of which the pixel DDPM stage took 265 and latent diffusion 139; an idle
AVX2-only EPYC took 11.3 minutes of wall time, so wall time on two threads is close to the
one-thread CPU time for these small models. The flow stage that replaces the DDPM stage and
the reference rows were measured on 2026-12-07 (see the README's Results). report.json
records each stage's wall and CPU seconds, so a run shows where the time went. `--quick` (or
MINIGEN_QUICK=1) shrinks every stage to seconds, for tests.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigen import data, evaluate, plot, train
from minigen.course import budget
from minigen.tour_report import StageResult, environment, write_report  # the report's row type and writer

# the tour's fast solver for its diffusion and latent-diffusion samples (minigen.samplers)
FAST_SAMPLER, FAST_STEPS = "dpmsolver++", 10

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


# ----------------------------------------------------------------------------- the shipped references
#
# Beside each minute-scale result the report shows the same family's shipped reference
# checkpoint (minigen.reference): sampled here with the tour's sampler and n, so that the
# two rows of the table are measured alike, plus the figures its manifest records (n = 500,
# the reference protocol). A missing or corrupt checkpoint only drops the reference row.


def _reference(name: str):
    """(model, manifest entry) of shipped reference checkpoint `name`, or (None, None)."""
    from minigen import reference

    try:
        return reference.load(name), reference.manifest()["models"][name]
    except reference.ReferenceError as e:
        print(f"(no reference row for {name}: {e})", flush=True)
        return None, None


def _manifest_metrics(entry: dict) -> dict:
    """The figures a reference checkpoint's manifest records, labelled as such."""
    m, out = entry.get("metrics", {}), {}
    n = m.get("n_samples", 500)
    for key, label in (("fd_shapes", f"manifest FD (n={n})"), ("fd_real_vs_real", f"manifest FD real (n={n})"),
                       ("class_accuracy", "manifest class accuracy"),
                       ("caption_accuracy", "manifest caption accuracy"), ("recon_psnr_db", "manifest PSNR (dB)")):
        if key in m:
            out[label] = m[key]
    return out


def _reference_result(family: str, name: str, entry: dict, per_image, metrics: dict, image: str,
                      note: str) -> StageResult:
    return StageResult(f"{family}, shipped reference", "shapes", entry["params"], entry.get("train_steps", 0),
                       entry.get("train_seconds", 0.0), entry.get("train_cpu_seconds", 0.0), per_image,
                       metrics | _manifest_metrics(entry), image,
                       note + f" Trained offline by `{entry.get('command', 'python -m minigen.reference')}` "
                       f"({entry.get('train_steps', '?')} steps, {entry.get('train_seconds', 0) / 60:.0f} min); "
                       "sampled here as the row above.", reference=True)


def _reference_reconstructions(family: str, name: str, x_test: torch.Tensor, ctx: Context) -> list[StageResult]:
    """The shipped VQ-VAE / VQGAN reconstructing the same test images."""
    ae, entry = _reference(name)
    if ae is None:
        return []
    m, x_hat = _reconstruction_metrics(ae, x_test)
    with torch.no_grad():
        m |= _codebook_metrics(ae.encode(x_test)[1], ae.config.num_codes)
    path = ctx.out / f"{name}_reference_reconstructions.png"
    plot.save_grid(torch.cat([x_test[:18], x_hat[:18]]), path, nrow=18, scale=2)
    return [_reference_result(family, name, entry, None, m, path.name,
                              "Top row: the same test images; bottom row: the shipped checkpoint's reconstructions.")]


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
    results = [StageResult("VAE", "digits", _params(model), steps, secs, cpu, per_image, m, path.name,
                           "Samples from the prior p(z) = N(0, I), decoded (the Bernoulli decoder's mean).")]
    ref, entry = _reference("vae")
    if ref is not None:
        torch.manual_seed(ctx.seed)
        x, per_image = _timed(ref.sample_images, budget(500, quick=64))
        path = ctx.out / "vae_reference_samples.png"
        plot.save_grid(x[:64], path, nrow=16, scale=2)
        results.append(_reference_result("VAE", "vae", entry, per_image, _sample_quality("shapes", x), path.name,
                                         "The shipped VAE is trained on shapes (Gaussian decoder), not digits: "
                                         "samples from its prior."))
    return results


def _prior_stage(family: str, ae, ds, ctx: Context, *, steps: int, n_embd: int, tag: str) -> list[StageResult]:
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
    results = [StageResult(family, "shapes", _params(gpt), steps, secs, cpu, per_image,
                           _sample_quality("shapes", x, y), path.name,
                           f"Class-conditional samples from a GPT prior over the {h}x{w} codes (temperature 1, "
                           f"top-k 32), decoded; one column per class: "
                           f"{', '.join(ds.classes[:6])}, ... (3 shapes x 6 colours).")]
    ref, entry = _reference(f"{tag}_prior")
    ref_ae, _ = _reference(tag)
    if ref is not None and ref_ae is not None:
        g = torch.Generator().manual_seed(ctx.seed)
        x, per_image = _timed(lambda k: evaluate.sample_prior(ref, ref_ae, y[:k], top_k=32, generator=g), n)
        path = ctx.out / f"{tag}_prior_reference_samples.png"
        plot.save_grid(x[:72], path, nrow=18, scale=2)
        results.append(_reference_result(family, f"{tag}_prior", entry, per_image, _sample_quality("shapes", x, y),
                                         path.name, f"The shipped GPT prior over the shipped {tag}'s codes, "
                                         "same classes and sampler."))
    return results


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
    results += _reference_reconstructions("VQ-VAE", "vqvae", x_test, ctx)
    results += _prior_stage("VQ-VAE + transformer prior", vq, ds, ctx, tag="vqvae",
                            steps=budget(400, quick=10, gpu=5000), n_embd=96)
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
    results += _reference_reconstructions("VQGAN", "vqgan", x_test, ctx)
    results += _prior_stage("VQGAN + transformer prior", model, ds, ctx, tag="vqgan",
                            steps=budget(400, quick=10, gpu=5000), n_embd=96)
    return results


# The generative recipe that reached quality fastest (benchmarks/time_to_quality.py, README
# "Time to quality"): class-conditional flow matching with logit-normal times on the shipped
# reference VQGAN's 4x8x8 latents, a U-Net of the latent diffusion model's widths (32/64
# channels at 8x8 / 4x4, attention at 4x4), the reference DDPM's optimiser settings.
FLOW_RECIPE = dict(channels=32, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(2,),
                   timestep_sampling="logit_normal", clip_denoised=False)  # never clip latents
FLOW_TRAIN = dict(batch_size=64, lr=2e-3, lr_schedule="cosine", ema_decay=0.995)
FLOW_GUIDANCE = 2.0


@dataclass
class Latents:
    """The shipped VQGAN wrapped by minigen.ldm (encode / decode with scale_factor), the
    training images' latents with their captions' tokens, and their class labels."""
    model: object  # a minigen.ldm.LatentDiffusion around the reference VQGAN (its U-Net untrained)
    data: object   # TensorDataset(latents * scale_factor, tokens)
    labels: torch.Tensor
    classes: list
    encode_cpu_s: float
    autoencoder: dict  # the VQGAN's manifest entry


def _reference_latents(ctx: Context) -> Latents:
    """Encode the training images once through the shipped reference VQGAN (the flow and the
    latent diffusion stages share them: a newcomer's minutes go to the generative model)."""
    if "latents" not in ctx.models:
        from minigen import ldm
        from minigen.text import Tokenizer

        vq, entry = _reference("vqgan")
        if vq is None:
            raise RuntimeError("the latent stages train on the shipped reference VQGAN's latents, and "
                               "minigen/weights/reference/vqgan.pt could not be loaded: reinstall minigen or "
                               "rebuild it with `python -m minigen.reference --only vqgan`")
        ds = _train_set("shapes")
        n = min(len(ds), budget(8000, quick=512))
        model = ldm.LatentDiffusion(vq, ldm.LatentDiffusionConfig(), Tokenizer.from_captions(ds.captions))
        clock = Clock()
        latents = model.encode_dataset(ds, n=n)  # fits scale_factor = 1 / std of these latents
        ctx.models["latents"] = Latents(model, latents, ds.tensors(n)[1], list(ds.classes), clock.cpu, entry)
    return ctx.models["latents"]


def stage_flow(ctx: Context) -> list[StageResult]:
    """Latent flow matching with class labels (the fastest recipe measured), sampled with
    DPM-Solver++(2M) in 10 evaluations, beside the shipped pixel DDPM sampled the same way."""
    from minigen import flow

    lat = _reference_latents(ctx)
    z = lat.data.tensors[0]
    n_cls = len(lat.classes)
    model = flow.build(FLOW_RECIPE, tuple(z.shape[1:]), n_cls)
    steps = budget(300, quick=6, gpu=5000)
    _, secs, cpu = _fit(model, torch.utils.data.TensorDataset(z, lat.labels), steps, ctx,
                        warmup_steps=min(50, steps // 5), **FLOW_TRAIN)
    model = model.to(ctx.device).eval()
    decoder = lat.model.to(ctx.device).eval()
    fast_steps = budget(FAST_STEPS, quick=5)
    n = budget(90, quick=36)
    y = torch.arange(n) % n_cls
    g = torch.Generator(ctx.device).manual_seed(ctx.seed)
    x, per_image = _timed(lambda k: decoder.decode(model.sample(
        k, y=y[:k].to(ctx.device), guidance_scale=FLOW_GUIDANCE, sampler=FAST_SAMPLER, steps=fast_steps,
        generator=g)), n)
    m = _sample_quality("shapes", x, y)
    m["latent encoding CPU (s)"] = lat.encode_cpu_s
    path = ctx.out / "flow_samples.png"
    plot.save_grid(x[:72], path, nrow=18, scale=2)
    ae_min = lat.autoencoder.get("train_seconds", 0) / 60
    results = [StageResult(
        "flow matching (latents, class label)", "shapes", _params(model), steps, secs, cpu, per_image, m, path.name,
        f"Rectified flow (lesson 09) on the {'x'.join(map(str, z.shape[1:]))} latents of the shipped reference "
        f"VQGAN ({ae_min:.0f} min of training, not counted here), a U-Net with class labels, logit-normal "
        f"times; sampled with DPM-Solver++(2M) in {fast_steps} evaluations, guidance {FLOW_GUIDANCE:g}, and "
        f"decoded. One column per class. This recipe reached quality fastest in "
        f"benchmarks/time_to_quality.py.")]

    ref, entry = _reference("ddpm")
    if ref is not None:
        ref = ref.to(ctx.device)
        w = ref.config.guidance_scale
        x, per_image = _timed(lambda k: evaluate.in_batches(
            lambda i, b: ref.sample(b, y=y[i:i + b].to(ctx.device), guidance_scale=w, sampler=FAST_SAMPLER,
                                    steps=fast_steps, generator=g), k, 90), n)
        path = ctx.out / "ddpm_reference_samples.png"
        plot.save_grid(x[:72], path, nrow=18, scale=2)
        results.append(_reference_result(
            "DDPM", "ddpm", entry, per_image, _sample_quality("shapes", x, y), path.name,
            f"The shipped pixel-space DDPM (lesson 06: v-prediction, cosine schedule, 1000 training "
            f"timesteps) sampled with DPM-Solver++(2M) in {fast_steps} evaluations instead of DDPM's 1000 "
            f"ancestral steps, guidance {w:g}; same classes as the row above."))
    return results


def stage_latent_diffusion(ctx: Context) -> list[StageResult]:
    from minigen import judge as judges

    lat = _reference_latents(ctx)  # the flow stage's latents, with the captions' tokens
    model, latents = lat.model, lat.data
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
    results = [StageResult(
        "latent diffusion (text prompts)", "shapes", _params(model), steps, secs, cpu, per_image, m, path.name,
        f"Text-to-image samples: a U-Net with cross-attention to a small text encoder, diffusing "
        f"the {'x'.join(map(str, model.config.latent_shape))} latents of the shipped reference VQGAN "
        f"(as the flow row; DPM-Solver++ {sample_steps} evaluations, guidance {w:g}). "
        f"Each row: one prompt, {per_prompt} samples. "
        f"Caption accuracy: the judge finds the prompt's shape AND colour (chance 1/18).")]

    ref, entry = _reference("ldm")
    if ref is not None:
        ref = ref.to(ctx.device)
        w = ref.config.diffusion["guidance_scale"]
        x, per_image = _timed(lambda k: ref.sample(prompts[:k], guidance_scale=w, steps=sample_steps,
                                                   sampler=FAST_SAMPLER, generator=g), n)
        m = _sample_quality("shapes", x)
        m["caption accuracy"] = evaluate.caption_accuracy(judges.load_judge("shapes"), x, prompts)
        with torch.no_grad():
            xg = ref.sample([p for p in gallery for _ in range(per_prompt)], guidance_scale=w, steps=sample_steps,
                            sampler=FAST_SAMPLER, generator=g).clamp(-1, 1).cpu()
        path = ctx.out / "ldm_reference_samples.png"
        _save_prompt_grid(xg, gallery, per_prompt, path)
        results.append(_reference_result(
            "latent diffusion (text prompts)", "ldm", entry, per_image, m, path.name,
            f"The shipped latent diffusion model on the same prompts (DPM-Solver++ {sample_steps} evaluations, "
            f"guidance {w:g})."))
    return results


# Each stage: (name, function). A stage returns one StageResult or a list of them.
STAGES = [
    ("autoencoder", stage_autoencoder),
    ("VAE", stage_vae),
    ("VQ-VAE + prior", stage_vqvae_and_prior),
    ("VQGAN + prior", stage_vqgan_and_prior),
    ("flow matching", stage_flow),
    ("latent diffusion", stage_latent_diffusion),
]


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
    env = environment() | {"device": str(dev), "quick": is_quick()}
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
        write_report(out, results, failures, env, total.wall, stages, baselines=_baselines)
    path = write_report(out, results, failures, env, total.wall, stages, baselines=_baselines)
    print(f"\nreport: {path}  ({total.wall / 60:.1f} min wall, {total.cpu / 60:.1f} min CPU)")
    return 1 if failures else 0
