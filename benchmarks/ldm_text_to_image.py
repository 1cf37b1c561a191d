"""Text-to-image latent diffusion on `shapes`: train, then score against the guidance scale.

Trains minigen.ldm.LatentDiffusion on the latents of a frozen autoencoder (given, or a small
VQGAN trained here first), then samples one image per test-set caption at each guidance
scale and prints

* caption accuracy: the fraction of samples whose shape AND colour, as the shapes judge
  sees them, match the prompt (chance: 1/18);
* FD-shapes: Frechet distance in the judge's feature space to as many test images (compare
  with the real-vs-real baseline at the same n, printed below; FD is biased up at small n);

plus the same two numbers for the autoencoder's reconstructions of the test images (the
ceiling latent diffusion can reach), the machine, versions and date.

    python benchmarks/ldm_text_to_image.py --autoencoder runs/vqgan/checkpoint.pt
    python benchmarks/ldm_text_to_image.py --vqgan-steps 600 --work /tmp/ldm_bench   # trains a VQGAN first
    python benchmarks/ldm_text_to_image.py ... --steps 300 --n-eval 90 --guidance 1 3  # a quick look
    python benchmarks/ldm_text_to_image.py --checkpoint minigen/weights/reference/ldm.pt  # score only

Run with OMP_NUM_THREADS=1 on a shared 2-core machine. Defaults are the module's defaults
(minigen.ldm.DEFAULT_* and TRAIN_DEFAULTS).
"""

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

import minigen
from minigen import data, judge, ldm, train, vqgan
from minigen.builtin_data import shapes_label
from minigen.cli import _parse_overrides as parse_set  # --set key=value, as the CLI reads it


def train_vqgan(work: Path, steps: int, n_train: int, seed: int) -> Path:
    """A small VQGAN with a 4x8x8 latent (code_dim 4), L1 + perceptual loss, no GAN (at this
    budget the GAN terms only add noise)."""
    out = work / "vqgan"
    ds = data.load_dataset("shapes", n=n_train)
    model = vqgan.build(dict(ch=16, code_dim=4, num_codes=256, disc_start=10**9), (3, 32, 32))
    t0 = time.perf_counter()
    train.fit(model, ds, steps=steps, batch_size=32, lr=4e-4, out_dir=str(out), seed=seed, progress=False,
              ckpt_every=0)
    print(f"VQGAN: {steps} steps in {time.perf_counter() - t0:.0f} s -> {out / 'checkpoint.pt'}")
    return out / "checkpoint.pt"


def head_accuracy(j, x, prompts):
    """(shape accuracy, colour accuracy) separately: which half of the prompt is followed."""
    want = torch.tensor([shapes_label(c) for c in prompts])
    got = j.predict(x)
    return float(((got // 6) == (want // 6)).float().mean()), float(((got % 6) == (want % 6)).float().mean())


def train_ldm(args, work):
    ae_path = args.autoencoder or train_vqgan(work, args.vqgan_steps, args.n_train or 50_000, args.seed)
    ds = data.load_dataset("shapes", split="train")
    if args.n_train:
        ds = ds.head(args.n_train)
    overrides = {"autoencoder": str(ae_path), **parse_set(args.set)}
    t0 = time.perf_counter()
    model = ldm.build(overrides, ds.image_shape, dataset=ds)
    latents = model.training_data(ds, cache=work / "latents")
    print(f"# encoded {len(latents)} images in {time.perf_counter() - t0:.1f} s (cached in {work / 'latents'}); "
          f"latent shape {model.config.latent_shape}, scale_factor {model.scale_factor:.4f}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"# config: text {model.config.text}; diffusion "
          f"{ {k: v for k, v in model.config.diffusion.items() if k != 'unet'} }")
    print(f"# unet {model.config.diffusion['unet']}")
    print(f"# {n_train / 1e6:.2f}M trainable parameters; train steps {args.steps}, batch {args.batch_size}, "
          f"lr {args.lr}, warmup {args.warmup}, schedule {args.schedule}, ema {args.ema}")

    run = work / "ldm"
    if not args.resume and (run / "checkpoint.pt").exists():
        (run / "checkpoint.pt").unlink()
    t0 = time.perf_counter()
    result = train.fit(model, latents, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=args.warmup, lr_schedule=args.schedule, ema_decay=args.ema,
                       seed=args.seed, out_dir=str(run), progress=False, ckpt_every=0, log_every=100)
    train_s = time.perf_counter() - t0
    losses = [round(h["loss"], 4) for h in result.history]
    print(f"# trained {args.steps} steps in {train_s:.0f} s ({args.steps * args.batch_size / train_s:.0f} latents/s); "
          f"loss every 100 steps: {losses}")
    if result.ema is not None:
        result.ema.copy_to(model)
    return model


def main(argv=None):
    d = ldm.TRAIN_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="score this trained LDM checkpoint instead of training one")
    p.add_argument("--autoencoder", default=None, help="autoencoder checkpoint (default: train a VQGAN)")
    p.add_argument("--vqgan-steps", type=int, default=600)
    p.add_argument("--work", default="/tmp/ldm_text_to_image", help="folder for the VQGAN, the LDM run and the cache")
    p.add_argument("--n-train", type=int, default=None, help="training images (default all 50,000)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--schedule", default=d["schedule"])
    p.add_argument("--ema", type=float, default=d.get("ema"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="minigen.ldm.build override, repeatable")
    p.add_argument("--guidance", type=float, nargs="+", default=[0, 1, 2, 3, 5, 7.5])
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the config's)")
    p.add_argument("--n-eval", type=int, default=360, help="samples per guidance scale (test captions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep an existing LDM run in --work (else start over)")
    args = p.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MINIGEN_CACHE", str(Path(data.cache_dir())))
    print(f"# latent diffusion text-to-image on shapes, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"minigen {minigen.__version__}")

    if args.checkpoint:
        from minigen.cli import load_model

        model, ckpt = load_model(args.checkpoint)
        print(f"# scoring {args.checkpoint} (step {ckpt.get('step')}); latent shape {model.config.latent_shape}, "
              f"scale_factor {model.scale_factor:.4f}")
        print(f"# config: text {model.config.text}; diffusion "
              f"{ {k: v for k, v in model.config.diffusion.items() if k != 'unet'} }")
        print(f"# unet {model.config.diffusion['unet']}")
    else:
        model = train_ldm(args, work)
    model.eval()

    j = judge.load_judge("shapes")
    test = data.load_dataset("shapes", split="test", n=args.n_eval)
    x_test, _ = test.tensors()
    prompts = list(test.captions)
    rec = model.decode(model.encode(x_test))
    base = judge.judge_info()["shapes"].get("real_vs_real", {})
    print(f"\nreal-vs-real FD-shapes baselines (judges.json): "
          f"{ {n: round(v['fd'], 3) for n, v in base.items()} }")
    print(f"autoencoder reconstructions of {len(x_test)} test images: caption accuracy "
          f"{ldm.caption_accuracy(j, rec, prompts):.3f}, FD-shapes {judge.fd_score('shapes', rec):.3f}")
    print(f"real test images: caption accuracy {ldm.caption_accuracy(j, x_test, prompts):.3f}")
    print(f"\n{'guidance':>8} | {'caption acc':>11} | {'shape':>5} | {'colour':>6} | {'FD-shapes':>9} | "
          f"{'sample s':>8}   (n = {len(prompts)}, "
          f"DDIM {args.sample_steps or model.config.diffusion['sample_steps']} steps)")
    for w in args.guidance:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        x = torch.cat([model.sample(prompts[i:i + 180], guidance_scale=w, steps=args.sample_steps, generator=g)
                       for i in range(0, len(prompts), 180)])
        dt = time.perf_counter() - t0
        sa, ca = head_accuracy(j, x, prompts)
        print(f"{w:>8} | {ldm.caption_accuracy(j, x, prompts):>11.3f} | {sa:>5.3f} | {ca:>6.3f} | "
              f"{judge.fd_score('shapes', x):>9.3f} | {dt:>8.1f}", flush=True)
        if w == args.guidance[-1] or w == model.config.diffusion["guidance_scale"]:
            from minigen import plot

            plot.save_grid(x[:36], work / f"samples_w{w}.png", nrow=6, scale=2)


if __name__ == "__main__":
    main()
