"""Small reference checkpoints of every model family, trained on `shapes`.

A lesson that needs a trained model (lesson 07 needs a VQGAN, lesson 08 compares every
family) should not have to train it first. This module trains one small model per family
with fixed seeds and fixed budgets, measures it right after training, and ships the
weights in `minigen/weights/reference/` with a `manifest.json` that records, per model, the
file and its sha256, the exact command, the config, the training time and the metrics.

    python -m minigen.reference --threads 1          # everything: ~25 CPU-minutes of training + measuring
    python -m minigen.reference --only vqgan ddpm    # some families (their dependencies must exist)
    python -m minigen.reference --quick              # a tiny smoke run into a temporary folder
    python -m minigen.reference --evaluate           # re-measure the shipped files (no training)

    from minigen import reference
    vqgan = reference.load("vqgan")                  # eval mode, sha256 checked
    reference.manifest()["models"]["ddpm"]["metrics"]

Families and their dependencies (a prior is trained on the codes of its autoencoder; latent
diffusion works in the latent space of the reference VQGAN):

    vae                     Gaussian-likelihood VAE (lesson 01)
    vqvae -> vqvae_prior    VQ-VAE (lesson 02) and a class-conditional GPT over its codes (04)
    vqgan -> vqgan_prior    VQGAN (lesson 03) and its GPT prior
    ddpm                    class-conditional pixel diffusion with guidance (05-06)
    vqgan -> ldm            text-conditional latent diffusion (07)
    flow                    class-conditional pixel flow matching, the ddpm's U-Net (09)
    vqgan -> ldm_flow       text-conditional latent flow matching with a DiT (09)

The files are ordinary minigen checkpoints (`minigen sample minigen/weights/reference/ddpm.pt`
works) holding only the weights the model samples with: the EMA weights when training kept
an EMA, else the model's; no optimizer state. Parameters are stored in float16 to keep the
folder small (the whole folder must stay under 20 MB); loading casts them back to float32.
Metrics are measured on the model *as loaded from its file*, i.e. after that rounding, with
minigen.evaluate (`sample_metrics`, `reconstruction_metrics`, `caption_accuracy`); files are
written and read through minigen.checkpoint.

Budgets are CPU budgets: the models are small and trained briefly, so they show each
family's character, not its best. Compare their figures with each other, not with papers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from minigen import evaluate as evaluation  # (reference.evaluate re-measures shipped files)
from minigen.checkpoint import file_sha256  # the same file check as the shipped judges
from minigen.evaluate import sample_metrics, sample_prior, timed  # public here too (lesson 08)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "reference"
MANIFEST = "manifest.json"
FORMAT = "minigen-reference-v1"
COMMAND = "python -m minigen.reference"
NAMES = ("vae", "vqvae", "vqvae_prior", "vqgan", "vqgan_prior", "ddpm", "ldm", "flow", "ldm_flow")
DEPENDS = {"vqvae_prior": "vqvae", "vqgan_prior": "vqgan", "ldm": "vqgan", "ldm_flow": "vqgan"}
# The order `python -m minigen.reference` trains in: dependencies first, latent models last.
TRAIN_ORDER = ("vqgan", "ddpm", "flow", "vae", "vqvae", "vqvae_prior", "vqgan_prior", "ldm", "ldm_flow")
MAX_TOTAL_BYTES = 20 * 1024 * 1024
SEED = 0
DATASET = "shapes"

# Per-family budgets and settings. `quick` replaces the training steps and data sizes with
# tiny ones for the smoke test; everything else is the same code path.
SPECS = {
    "vae": dict(
        model=dict(latent_dim=32, hidden_channels=(32, 64, 128), likelihood="gaussian", learn_sigma=True),
        train=dict(steps=1200, batch_size=64, lr=1e-3)),
    "vqvae": dict(
        model=dict(num_codes=128, code_dim=32, hidden_channels=64),
        train=dict(steps=600, batch_size=64, lr=1e-3)),
    "vqgan": dict(
        # a 4-channel code (Stable Diffusion's latent width): the latent diffusion model
        # diffuses these 4x8x8 latents (every LDM run that learned the prompt used 4 channels;
        # on the default 32-channel code an earlier LDM recipe stayed at caption accuracy 0.09).
        # The GPT prior liked the 32-channel code better: FD 10.9 / accuracy 0.59 then, 17.3 /
        # 0.42 now (lesson 08 discusses the trade)
        model=dict(disc_start=400, code_dim=4),
        train=dict(steps=800, batch_size=32, lr=5e-4)),
    "vqvae_prior": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, cond_drop_prob=0.1),
        train=dict(steps=600, batch_size=64, lr=1e-3, weight_decay=0.01),
        sample=dict(temperature=1.0, top_k=32)),
    "vqgan_prior": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, cond_drop_prob=0.1),
        train=dict(steps=600, batch_size=64, lr=1e-3, weight_decay=0.01),
        sample=dict(temperature=1.0, top_k=32)),
    "ddpm": dict(
        # lesson 06's small U-Net: 16/32/64 channels, attention only in the middle block.
        # v-prediction on the cosine schedule: at 600 steps it gave judge accuracy 0.90 and
        # FD 9.8 where epsilon on linear betas gave 0.05 and 145 with deterministic DDIM
        # (benchmarks/ddpm_vs_diffusers.py). guidance_scale=2 makes `minigen sample` guide.
        model=dict(channels=16, channel_mult=(1, 2, 4), layers_per_block=1, attention_resolutions=(),
                   prediction_type="v", beta_schedule="cosine", sampler="ddim", sample_steps=25,
                   guidance_scale=2.0),
        train=dict(steps=700, batch_size=64, lr=2e-3, warmup_steps=100, lr_schedule="cosine",
                   ema_decay=0.995)),
    "ldm": dict(
        # minigen.ldm's defaults: 32/64 channels at 8x8/4x4, SpatialTransformers (self- and
        # cross-attention to the text) at both levels and in the middle, the pooled text
        # embedding added to the time embedding, v-prediction on the cosine schedule, the
        # default 2-layer text encoder; on the reference VQGAN's 4x8x8 latents.
        # benchmarks/time_to_quality.py: caption accuracy 0.89 after 1000 steps, 0.98 after 1500
        # on one VQGAN; on this reference VQGAN 2000 steps gave 0.85 and 4000 steps 0.994
        # (two other VQGANs: 0.69 and 0.79 after 2000), so the reference trains 4000
        model=dict(),
        train=dict(steps=4000, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                   ema_decay=0.995),
        sample=dict(steps=25, guidance_scale=3.0)),
    "flow": dict(
        # flow matching (minigen.flow) on the ddpm reference's U-Net (16/32/64 channels, no
        # attention), same data and budget class: the straight path, logit-normal training
        # times (SD3), Euler on a uniform grid with as many evaluations as the ddpm's DDIM
        model=dict(channels=16, channel_mult=(1, 2, 4), layers_per_block=1, attention_resolutions=(),
                   timestep_sampling="logit_normal", sampler="euler", sample_steps=25, guidance_scale=2.0),
        train=dict(steps=600, batch_size=64, lr=2e-3, warmup_steps=100, lr_schedule="cosine",
                   ema_decay=0.995)),
    "ldm_flow": dict(
        # latent flow matching with a DiT (minigen.ldm objective="flow", backbone="dit") on the
        # reference VQGAN's 4x8x8 latents: patch 2 -> 16 tokens, text through the pooled
        # embedding in adaLN and cross-attention in every block, the ldm's text encoder.
        # 4000 steps, as the ldm (0.19 CPU-s each, one thread: 758 CPU-s): caption accuracy
        # 0.96, FD 1.98 (n = 500); 1000 steps had given 0.53 and FD 10.5
        model=dict(objective="flow", backbone="dit", hidden_size=96, depth=4, num_heads=4, patch_size=2,
                   sampler="euler", sample_steps=25, guidance_scale=3.0),
        train=dict(steps=4000, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                   ema_decay=0.995),
        sample=dict(steps=25, guidance_scale=3.0)),
}
N_TRAIN = 20000          # training images (the first ones of the train split)
N_EVAL = 500             # test images / samples per metric
QUICK = dict(steps=2, n_train=256, n_eval=18, sample_steps=3)


class ReferenceError(FileNotFoundError, ValueError):
    """A reference checkpoint that is missing or corrupt; the message says how to rebuild it.

    A FileNotFoundError (the file is missing or unusable) and a ValueError (bad input), so
    that either kind of handler, e.g. the CLI's, reports it without a traceback."""


def _rebuild_hint(name: str) -> str:
    deps = f" (it needs {DEPENDS[name]} first)" if name in DEPENDS else ""
    return f"rebuild it with `{COMMAND} --only {name}`{deps}"


# ----------------------------------------------------------------------------- reading


def manifest(root=None) -> dict:
    """The manifest of the reference checkpoints in `root` (default: the shipped ones)."""
    root = Path(root) if root is not None else WEIGHTS_DIR
    p = root / MANIFEST
    if not p.is_file():
        raise ReferenceError(f"{p} is missing: no reference checkpoints there; create them with `{COMMAND}`")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ReferenceError(f"{p} is not a minigen reference manifest (format {m.get('format')!r}, "
                             f"expected {FORMAT!r}); create it with `{COMMAND}`")
    return m


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(NAMES)}")


def path(name: str, root=None) -> Path:
    """The checkpoint file of reference model `name`; a clear error if it is missing."""
    _check_name(name)
    root = Path(root) if root is not None else WEIGHTS_DIR
    entry = manifest(root)["models"].get(name)
    if entry is None:
        raise ReferenceError(f"the reference model {name!r} is not in {root / MANIFEST}; {_rebuild_hint(name)}")
    p = root / entry["file"]
    if not p.is_file():
        raise ReferenceError(f"the reference checkpoint {p} is missing; {_rebuild_hint(name)}")
    return p


def load(name: str, device="cpu", *, root=None):
    """Reference model `name` in eval mode, its weights in float32, after checking its sha256.

    `load("vqvae_prior")` / `load("vqgan_prior")` return the GPT prior; its codes decode
    through `load("vqvae")` / `load("vqgan")`.
    """
    p = path(name, root)
    entry = manifest(p.parent)["models"][name]
    if file_sha256(p) != entry["sha256"]:
        raise ReferenceError(f"{p} does not match the sha256 in {p.parent / MANIFEST}: the file is corrupt, "
                             f"truncated or from another run; {_rebuild_hint(name)}")
    from minigen.checkpoint import load_model

    model, _ = load_model(p, device)
    return model.float().eval()


# ----------------------------------------------------------------------------- saving


def _save(model, name: str, out: Path, extra: dict) -> tuple[Path, int]:
    """A minigen checkpoint with float16 parameters (buffers keep their dtype: codebook usage
    counts and the like need float32's range), no optimizer state."""
    from minigen.checkpoint import model_header, save_checkpoint

    params = {n for n, _ in model.named_parameters()}
    state = {k: (v.detach().cpu().half() if k in params and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    p = out / f"{name}.pt"
    save_checkpoint(p, {
        **model_header(model),
        "model": state,
        "ema": None,
        "optimizers": {},
        "step": extra["train_steps"],
        "rng": None,
        "train_config": extra["train_config"],
        "reference": {"name": name, "parameter_dtype": "float16"},
    })
    return p, sum(v.numel() for k, v in model.state_dict().items() if k in params)


def _versions() -> dict:
    import minigen

    return {"minigen": minigen.__version__, "torch": torch.__version__}


def _write_manifest(out: Path, name: str, entry: dict) -> None:
    p = out / MANIFEST
    m = json.loads(p.read_text()) if p.is_file() else {}
    if m.get("format") != FORMAT:
        m = {"format": FORMAT, "dataset": DATASET, "command": COMMAND, "models": {}}
    m["models"][name] = entry
    m["models"] = {k: m["models"][k] for k in NAMES if k in m["models"]}
    m["total_bytes"] = sum(e["bytes"] for e in m["models"].values())
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    tmp.replace(p)


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def images_sha256(images: torch.Tensor) -> str:
    """sha256 of the uint8 test images the metrics are measured on."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- training


class _Run:
    """Shared state of one `python -m minigen.reference` run: budgets, data, timing."""

    def __init__(self, out: Path, quick: bool):
        from minigen import data

        self.out, self.quick = out, quick
        self.n_train = QUICK["n_train"] if quick else N_TRAIN
        self.n_eval = QUICK["n_eval"] if quick else N_EVAL
        self.train_set = data.load_dataset(DATASET, split="train", n=self.n_train)
        self.test = data.load_dataset(DATASET, split="test", n=self.n_eval)
        self.x_test, self.y_test = self.test.tensors()
        # which images the metrics were measured on: a changed generator shows up here first
        self.test_sha256 = images_sha256(self.test.images)
        self.num_classes = len(self.train_set.classes)

    def train_kwargs(self, name: str) -> dict:
        kw = dict(SPECS[name]["train"])
        if self.quick:
            kw.update(steps=QUICK["steps"], warmup_steps=0)
        return kw

    def fit(self, model, dataset, name: str):
        """minigen.train.fit with the family's budget; returns (result, wall s, CPU s, config dict)."""
        from minigen import train

        # log_every only records losses (the manifest's final_loss: the mean of the last 100 steps)
        cfg = train.TrainConfig(seed=SEED, device="cpu", progress=False, log_every=100, **self.train_kwargs(name))
        t0, c0 = time.perf_counter(), time.process_time()
        result = train.fit(model, dataset, cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if result.ema is not None:
            result.ema.copy_to(model)  # ship the averaged weights
        return result, wall, cpu, dataclasses.asdict(cfg)

    def finish(self, name: str, model, fit_out, metrics_fn, extra=None) -> dict:
        """Save, reload from the file (float16 round trip), measure, write the manifest entry."""
        result, wall, cpu, tcfg = fit_out
        info = dict(train_steps=result.step, train_config=tcfg)
        p, n_params = _save(model.eval(), name, self.out, info)
        reloaded = _load_unchecked(p)
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = metrics_fn(reloaded)
        last = result.history[-1] if result.history else {}
        entry = {
            "file": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size, "params": n_params,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "command": f"{COMMAND} --only {name}" + (" --quick" if self.quick else ""),
            "depends_on": DEPENDS.get(name),
            "dataset": f"{DATASET} train split, first {self.n_train} images",
            "config": _jsonable(dataclasses.asdict(model.config)),
            "train": _jsonable({k: tcfg[k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps",
                                                    "lr_schedule", "grad_clip", "ema_decay", "seed")}),
            "train_steps": result.step, "train_seconds": round(wall, 1), "train_cpu_seconds": round(cpu, 1),
            "final_loss": next((round(float(last[k]), 5) for k in ("loss", "loss_g") if k in last), None),
            "metrics": _rounded(metrics),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "test_images_sha256": self.test_sha256,
            "parameter_dtype": "float16",
            "threads": torch.get_num_threads(),
            **(extra or {}),
            "torch_version": torch.__version__, "minigen_version": _versions()["minigen"],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": self.quick,
        }
        _write_manifest(self.out, name, entry)
        print(f"[{name}] {n_params / 1e6:.2f}M params, {result.step} steps in {wall:.0f} s ({cpu:.0f} s CPU), "
              f"{entry['bytes'] / 1e6:.2f} MB -> {p}", flush=True)
        print(f"[{name}] metrics: {json.dumps(entry['metrics'])}", flush=True)
        return entry


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _load_unchecked(p: Path):
    from minigen.checkpoint import load_model

    return load_model(p, "cpu")[0].float().eval()


# ----------------------------------------------------------------------------- metrics


def reconstruction_metrics(model, x: torch.Tensor) -> dict:
    """`minigen.evaluate.reconstruction_metrics` under the manifest's keys: PSNR, SSIM and the
    FD-shapes of the reconstructions against x itself (rFD)."""
    m, _ = evaluation.reconstruction_metrics(model, x, dataset=DATASET)
    return {"recon_psnr_db": m["psnr_db"], "recon_ssim": m["ssim"], "recon_fd_shapes": m["fd"]}


def _class_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


# ----------------------------------------------------------------------------- families


def measure_vae(run: _Run, m) -> dict:
    g = torch.Generator().manual_seed(SEED)
    z = torch.randn(run.n_eval, m.config.latent_dim, generator=g)
    x, secs = timed(lambda: m.sample(run.n_eval, z=z))
    ev = m.evaluate(run.x_test)
    return {**reconstruction_metrics(m, run.x_test), "test_elbo_nats": ev["elbo"],
            "test_bits_per_dim": ev["bits_per_dim"],
            **sample_metrics(x, None, run.x_test, secs / len(x))}


def train_vae(run: _Run) -> dict:
    from minigen import train, vae

    train.set_seed(SEED)
    model = vae.build(SPECS["vae"]["model"], run.train_set.image_shape)
    fit_out = run.fit(model, run.train_set, "vae")
    return run.finish("vae", model, fit_out, lambda m: measure_vae(run, m), {"sampler": "z ~ N(0, I), decoder mean"})


def measure_vq(run: _Run, m) -> dict:
    from minigen import metrics

    idx = torch.cat([m.encode(xb)[1] for xb in run.x_test.split(250)])
    usage = metrics.codebook_usage(idx, m.config.num_codes)
    return {**reconstruction_metrics(m, run.x_test), "codebook_perplexity": usage.perplexity,
            "codes_used": usage.fraction_used}


def _train_vq(run: _Run, name: str, module) -> dict:
    from minigen import train

    train.set_seed(SEED)
    model = module.build(SPECS[name]["model"], run.train_set.image_shape)
    fit_out = run.fit(model, run.train_set, name)
    return run.finish(name, model, fit_out, lambda m: measure_vq(run, m))


def train_vqvae(run: _Run) -> dict:
    from minigen import vq

    return _train_vq(run, "vqvae", vq)


def train_vqgan(run: _Run) -> dict:
    from minigen import vqgan

    return _train_vq(run, "vqgan", vqgan)


def measure_prior(run: _Run, name: str, m, ae=None) -> dict:
    ae = ae if ae is not None else load(DEPENDS[name], root=run.out)
    labels = _class_labels(run.n_eval, run.num_classes)
    g = torch.Generator().manual_seed(SEED)
    xs, secs = timed(lambda: sample_prior(m, ae, labels, generator=g, **SPECS[name]["sample"]))
    return sample_metrics(xs, labels, run.x_test, secs / len(xs))


def _train_prior(run: _Run, name: str) -> dict:
    from minigen import train
    from minigen.transformer import GPT, GPTConfig, PriorDataset

    ae_name = DEPENDS[name]
    ae = load(ae_name, root=run.out)
    x, y = run.train_set.tensors()
    with torch.no_grad():
        codes = torch.cat([ae.encode(xb)[1] for xb in x.split(500)])
    train.set_seed(SEED)
    spec = SPECS[name]
    model = GPT(GPTConfig(vocab_size=ae.config.num_codes, block_size=codes[0].numel(),
                          num_classes=run.num_classes, **spec["model"]))
    fit_out = run.fit(model, PriorDataset(codes, y), name)
    return run.finish(name, model, fit_out, lambda m: measure_prior(run, name, m, ae),
                      {"sampler": {**spec["sample"], "decoder": f"reference {ae_name}"}})


def train_vqvae_prior(run: _Run) -> dict:
    return _train_prior(run, "vqvae_prior")


def train_vqgan_prior(run: _Run) -> dict:
    return _train_prior(run, "vqgan_prior")


def measure_ddpm(run: _Run, m) -> dict:
    labels = _class_labels(run.n_eval, run.num_classes)
    g = torch.Generator().manual_seed(SEED)
    xs, secs = timed(lambda: torch.cat([m.sample(len(yb), y=yb, generator=g) for yb in labels.split(250)]))
    return sample_metrics(xs, labels, run.x_test, secs / len(xs))


def train_ddpm(run: _Run) -> dict:
    from minigen import diffusion, train

    train.set_seed(SEED)
    overrides = dict(SPECS["ddpm"]["model"])
    if run.quick:
        overrides["sample_steps"] = QUICK["sample_steps"]
    model = diffusion.build(overrides, run.train_set.image_shape, run.num_classes)
    fit_out = run.fit(model, run.train_set, "ddpm")
    c = SPECS["ddpm"]["model"]
    return run.finish("ddpm", model, fit_out, lambda m: measure_ddpm(run, m),
                      {"sampler": {"sampler": "ddim", "steps": c["sample_steps"], "eta": 0.0,
                                   "guidance_scale": c["guidance_scale"]}})


def latent_test_loss(m, x: torch.Tensor, captions) -> float:
    """The training objective of a latent model (diffusion or flow) on the first 256 test
    images x and their captions, at times and noise drawn from a fixed seed, no caption
    dropout: a cheap, deterministic figure that tests/test_reference.py recomputes."""
    g = torch.Generator().manual_seed(SEED)
    z = m.encode(x[:256])
    context = m.encode_prompts(list(captions[:256]))
    if m.config.objective == "flow":
        t = torch.rand(len(z), generator=g)
    else:
        t = torch.randint(0, m.diffusion.num_timesteps, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    return float(m.diffusion.loss(z, dict(context=context), t=t, noise=noise))


def measure_ldm(run: _Run, m, steps: int, name: str = "ldm") -> dict:
    from minigen import judge

    spec = SPECS[name]["sample"]
    prompts = list(run.test.captions)
    g = torch.Generator().manual_seed(SEED)
    xs, secs = timed(lambda: torch.cat([
        m.sample(prompts[i:i + 250], guidance_scale=spec["guidance_scale"], steps=steps, generator=g)
        for i in range(0, len(prompts), 250)]))
    out = sample_metrics(xs, run.y_test, run.x_test, secs / len(xs))
    out["caption_accuracy"] = evaluation.caption_accuracy(judge.load_judge(DATASET), xs, prompts)
    out["test_latent_loss"] = latent_test_loss(m, run.x_test, run.test.captions)
    return out


def train_ldm(run: _Run, name: str = "ldm") -> dict:
    """A latent model on the reference VQGAN: "ldm" (diffusion, U-Net) or "ldm_flow" (flow, DiT)."""
    try:
        from minigen import ldm
    except ImportError as e:
        raise RuntimeError(f"minigen.ldm is not available in this minigen ({e}); the ldm reference "
                           f"model needs it") from None
    from minigen import train

    vqgan = load("vqgan", root=run.out)  # sha256 checked: the latent space everything else builds on
    train.set_seed(SEED)
    # with the dataset, build() takes the vocabulary from its captions and fits scale_factor
    # (1 / std of the training latents); the latents are cached, so encode_dataset reads them
    model = ldm.build({**SPECS[name]["model"], "autoencoder": vqgan}, run.train_set.image_shape,
                      dataset=run.train_set)
    latents = model.encode_dataset(run.train_set, cache=True)
    fit_out = run.fit(model, latents, name)
    spec = SPECS[name]["sample"]
    steps = QUICK["sample_steps"] if run.quick else spec["steps"]
    return run.finish(name, model, fit_out, lambda m: measure_ldm(run, m, steps, name),
                      {"sampler": {"sampler": model.config.diffusion["sampler"], "steps": steps,
                                   "guidance_scale": spec["guidance_scale"],
                                   "prompts": "captions of the first test images"},
                       "autoencoder": "reference vqgan"})


def flow_test_loss(m, x: torch.Tensor, y: torch.Tensor) -> float:
    """The flow-matching loss of a pixel flow model on the first 256 test images x with their
    labels y, at times and noise drawn from a fixed seed: a cheap, deterministic figure that
    tests/test_reference.py recomputes from the shipped file."""
    g = torch.Generator().manual_seed(SEED)
    x, y = x[:256], y[:256]
    t = torch.rand(len(x), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return float(m.loss(x, dict(y=y), t=t, noise=noise))


def measure_flow(run: _Run, m) -> dict:
    out = measure_ddpm(run, m)  # the same class-conditional samples and figures as ddpm
    out["test_flow_loss"] = flow_test_loss(m, run.x_test, run.y_test)
    return out


def train_flow(run: _Run) -> dict:
    from minigen import flow, train

    train.set_seed(SEED)
    overrides = dict(SPECS["flow"]["model"])
    if run.quick:
        overrides["sample_steps"] = QUICK["sample_steps"]
    model = flow.build(overrides, run.train_set.image_shape, run.num_classes)
    fit_out = run.fit(model, run.train_set, "flow")
    c = model.config
    return run.finish("flow", model, fit_out, lambda m: measure_flow(run, m),
                      {"sampler": {"sampler": c.sampler, "steps": c.sample_steps, "grid": c.grid,
                                   "guidance_scale": c.guidance_scale}})


def measure(run: _Run, name: str, model) -> dict:
    """The metrics of reference model `name` (as loaded from its file), as training records them."""
    if name == "vae":
        return measure_vae(run, model)
    if name in ("vqvae", "vqgan"):
        return measure_vq(run, model)
    if name in ("vqvae_prior", "vqgan_prior"):
        return measure_prior(run, name, model)
    if name == "ddpm":
        return measure_ddpm(run, model)
    if name == "flow":
        return measure_flow(run, model)
    steps = manifest(run.out)["models"][name]["sampler"]["steps"]  # the sampler it was measured with
    return measure_ldm(run, model, steps, name)


def evaluate(run: _Run, names) -> None:
    """Re-measure shipped checkpoints without retraining them, updating their manifest entries
    in place: the metrics, the test images' sha256 and an `evaluated` record (the training
    record -- steps, seconds, date -- is kept). For when the data or the metric code changed."""
    for name in names:
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = measure(run, name, load(name, root=run.out))
        entry = manifest(run.out)["models"][name]
        old = entry["metrics"]
        entry["metrics"] = _rounded(metrics)
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        entry["test_images_sha256"] = run.test_sha256
        entry["evaluated"] = {"command": f"{COMMAND} --evaluate --only {name}", "threads": torch.get_num_threads(),
                              "torch_version": torch.__version__, "minigen_version": _versions()["minigen"],
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_manifest(run.out, name, entry)
        changed = {k: (old.get(k), v) for k, v in entry["metrics"].items() if old.get(k) != v}
        print(f"[{name}] re-measured in {entry['eval_seconds']} s; changed (was, now): {json.dumps(changed)}", flush=True)


TRAINERS = {"vae": train_vae, "vqvae": train_vqvae, "vqvae_prior": train_vqvae_prior, "vqgan": train_vqgan,
            "vqgan_prior": train_vqgan_prior, "ddpm": train_ddpm, "ldm": train_ldm, "flow": train_flow,
            "ldm_flow": lambda run: train_ldm(run, "ldm_flow")}


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=COMMAND, description="Train the small reference checkpoints of every model family on `shapes` "
        "and write them with a manifest (file, sha256, command, config, training time, metrics).")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=NAMES,
                   help=f"train only these ({', '.join(NAMES)}); a prior needs its autoencoder, ldm needs vqgan, "
                        "already in --out")
    p.add_argument("--out", default=None, help=f"output folder (default: the package's {WEIGHTS_DIR}; "
                   "with --quick: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds per family) into a temporary folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--evaluate", action="store_true",
                   help="re-measure the checkpoints already in --out (no training) and update their metrics")
    args = p.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.out is not None:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="minigen-reference-"))
    else:
        out = WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in TRAIN_ORDER if n in (args.only or NAMES)]
    if args.evaluate:
        try:
            entries = manifest(out)["models"]
            for name in names:
                path(name, out)
        except ReferenceError as e:
            p.error(f"--evaluate re-measures existing checkpoints: {e}")
        quick = {entries[n]["quick"] for n in names}
        if len(quick) > 1 or (args.quick and quick != {True}):
            p.error("--evaluate measures each checkpoint as it was built; these mix --quick and full builds"
                    if len(quick) > 1 else "--quick with --evaluate: these checkpoints are from a full build")
        t0 = time.perf_counter()
        evaluate(_Run(out, quick.pop()), names)
        print(f"re-measured {len(names)} in {(time.perf_counter() - t0) / 60:.1f} min; {out / MANIFEST}", flush=True)
        return 0
    for name in names:
        dep = DEPENDS.get(name)
        if dep and dep not in names:
            try:
                path(dep, out)
            except ReferenceError as e:
                p.error(f"{name} needs the reference {dep} in {out}: {e}")
    run = _Run(out, args.quick)
    t0 = time.perf_counter()
    for name in names:
        print(f"== {name} ==", flush=True)
        TRAINERS[name](run)
    total = sum(e["bytes"] for e in manifest(out)["models"].values())
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; {out / MANIFEST}: {total / 1e6:.2f} MB in all", flush=True)
    if total > MAX_TOTAL_BYTES:
        print(f"warning: the reference folder holds {total / 1e6:.1f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB budget",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
