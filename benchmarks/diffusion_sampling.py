"""Diffusion sampling: quality and cost against the number of steps, and guidance.

For one class-conditional DDPM on `shapes` (trained here, or loaded with --checkpoint), prints

  * FD-shapes and class accuracy (shipped judge) of samples from DDPM ancestral sampling
    with all T = 1000 steps and from DDIM (eta = 0) with 10 / 25 / 50 / 100 steps, all at
    the same guidance scale, against the real-vs-real FD at the same n;
  * class accuracy and FD against the classifier-free guidance scale (DDIM, 25 steps);
  * sampling time per image for each (wall clock, batch = the evaluation set).

DDPM with 1000 network calls per image is slow on a CPU, so it is scored on --n-ddpm images
(FD is biased upwards at small n: compare it with DDIM at the same n, which is printed too).

    python benchmarks/diffusion_sampling.py                       # trains ~1500 steps first
    python benchmarks/diffusion_sampling.py --checkpoint runs/ddpm/checkpoint.pt
    python benchmarks/diffusion_sampling.py --quick               # a smoke run, ~1 minute
"""

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import minigen
from minigen import diffusion
from minigen.data import load_dataset
from minigen.judge import fd_score, load_judge
from minigen.metrics import conditional_accuracy
from minigen.train import fit


def train_model(steps, batch_size, seed):
    """The class-conditional U-Net of lesson 06 (16/32/64 channels, attention in the middle)."""
    shapes = load_dataset("shapes", n=20000)
    model = diffusion.build(dict(channels=16, channel_mult=(1, 2, 4), layers_per_block=1,
                                 attention_resolutions=()),
                            image_shape=shapes.image_shape, num_classes=len(shapes.classes))
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, shapes, steps=steps, batch_size=batch_size, lr=2e-3,
                     warmup_steps=min(100, steps // 5), lr_schedule="cosine", ema_decay=0.999,
                     seed=seed, out_dir=tmp, progress=False, log_every=max(1, steps // 10))
    result.ema.copy_to(model)
    info = dict(train_steps=steps, batch_size=batch_size, train_wall_s=time.perf_counter() - t0,
                train_cpu_s=time.process_time() - c0, final_loss=result.history[-1]["loss"])
    return model.eval(), info


def load_model(path):
    from minigen.cli import load_model as _load

    model, ckpt = _load(path)
    return model, dict(checkpoint=str(path), train_steps=ckpt.get("step"))


def measure(model, judge, n, seed, **kwargs):
    y = torch.arange(n) % model.num_classes
    t0 = time.perf_counter()
    x = model.sample(n, y=y, generator=torch.Generator().manual_seed(seed), **kwargs)
    sec = (time.perf_counter() - t0) / n
    return dict(fd=fd_score("shapes", x), acc=conditional_accuracy(judge, x, y), s_per_image=sec)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a class-conditional ddpm checkpoint; default: train one")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=360, help="images per DDIM setting (20 per class)")
    p.add_argument("--n-ddpm", type=int, default=36, help="images for 1000-step DDPM")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--scale", type=float, default=2.0, help="guidance scale of the steps sweep")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.n, args.n_ddpm, args.steps, args.guidance = 30, 36, 4, [5, 10], [1.0, 3.0]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"# diffusion sampling benchmark, {datetime.date.today()}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__}, minigen {minigen.__version__}")
    model, info = load_model(args.checkpoint) if args.checkpoint else train_model(args.train_steps, args.batch_size, args.seed)
    params = sum(p.numel() for p in model.model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()})}")
    judge = load_judge("shapes")

    real = load_dataset("shapes", split="train", n=args.n).tensors()[0]
    baseline = {n: fd_score("shapes", real[:n]) for n in (args.n_ddpm, args.n)}
    print(f"\nreal-vs-real FD-shapes (train vs test): n={args.n_ddpm}: {baseline[args.n_ddpm]:.2f}, "
          f"n={args.n}: {baseline[args.n]:.2f}")

    rows = []
    print(f"\n## quality and cost against steps (guidance scale {args.scale})\n")
    print("| sampler | steps | n | FD-shapes | class accuracy | s / image |")
    print("|---|---|---|---|---|---|")

    def row(sampler, steps, n, **kw):
        r = measure(model, judge, n, args.seed + 1, sampler=sampler, steps=steps, guidance_scale=args.scale, **kw)
        r.update(sampler=sampler, steps=steps or model.num_timesteps, n=n, guidance=args.scale)
        rows.append(r)
        print(f"| {sampler} | {r['steps']} | {n} | {r['fd']:.2f} | {r['acc']:.3f} | {r['s_per_image']:.3f} |",
              flush=True)

    row("ddpm", None, args.n_ddpm)
    for s in args.steps:
        row("ddim", s, args.n_ddpm)
    for s in args.steps:
        row("ddim", s, args.n, eta=0.0)

    print("\n## guidance scale (DDIM, 25 steps)\n")
    print(f"| guidance | n | FD-shapes | class accuracy |")
    print("|---|---|---|---|")
    guidance_rows = []
    for g in args.guidance:
        r = measure(model, judge, args.n, args.seed + 2, sampler="ddim", steps=25, guidance_scale=g)
        r.update(guidance=g, n=args.n)
        guidance_rows.append(r)
        print(f"| {g:g} | {args.n} | {r['fd']:.2f} | {r['acc']:.3f} |", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=str(datetime.date.today()), torch=torch.__version__, minigen=minigen.__version__,
            threads=torch.get_num_threads(), model=info, params=params, real_vs_real=baseline,
            steps=rows, guidance=guidance_rows), indent=1))


if __name__ == "__main__":
    main()
