"""Sample quality against the number of network evaluations (NFE): DDIM, DPM-Solver++(2M)
and Heun on Karras sigmas, on the shipped reference DDPM and latent diffusion model.

For each model, sampler and NFE budget prints FD-shapes (against the first n test images,
with the real-vs-real FD at the same n beside it), the judge's accuracy (class accuracy for
the class-conditional DDPM, caption accuracy -- shape and colour -- for the text-to-image
LDM) and the sampling time per image. Heun takes 2 evaluations per step but the last, so
its budgets are the odd numbers 2 steps - 1 closest to the others. All samplers run at the
models' own guidance scale; the same seed gives every sampler the same starting noise.

    OMP_NUM_THREADS=1 python benchmarks/sampler_nfe.py --n 200 --nfe 5 10 20 50
    python benchmarks/sampler_nfe.py --models ddpm --seeds 0 1 2     # spread over draws
    python benchmarks/sampler_nfe.py ... --out benchmarks/results/sampler_nfe.json --plot nfe.png

The target of issue 16: DPM-Solver++ reaches at <= 10 evaluations the FD DDIM reaches at 50.
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

import minigen
from diffusion_sampling import measure  # a sibling script: benchmarks/ is on sys.path when run
from minigen import data, judge, reference, samplers
from minigen.ldm import caption_accuracy

SAMPLERS = ("ddim", "dpmsolver++", "heun")


def steps_for(sampler, nfe):
    """The step count of `sampler` that spends at most `nfe` evaluations (at least one step)."""
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def measure_ldm(model, n, seed, **kwargs):
    """FD-shapes and caption accuracy of n images for the first n test captions."""
    prompts = list(data.load_dataset("shapes", split="test", n=n).captions)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    x = torch.cat([model.sample(prompts[i:i + 250], generator=g, **kwargs) for i in range(0, n, 250)])
    sec = (time.perf_counter() - t0) / n
    return dict(fd=judge.fd_score("shapes", x), acc=caption_accuracy(judge.load_judge("shapes"), x, prompts),
                s_per_image=sec)


def run(args):
    real = data.load_dataset("shapes", split="train", n=args.n).tensors()[0]
    baseline = judge.fd_score("shapes", real)  # train vs test images, same n
    head = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores",
                threads=torch.get_num_threads(), torch=torch.__version__, minigen=minigen.__version__,
                n=args.n, seeds=args.seeds, real_vs_real=baseline)
    print(f"# {head}", flush=True)
    print(f"{'model':>5} | {'sampler':>11} | {'steps':>5} | {'NFE':>4} | {'seed':>4} | {'FD-shapes':>9} | "
          f"{'FD / rvr':>8} | {'accuracy':>8} | {'s/image':>7}")
    rows = []
    shapes_judge = judge.load_judge("shapes")
    for name in args.models:
        model = reference.load(name)
        for sampler in args.samplers:
            for nfe in args.nfe:
                steps = steps_for(sampler, nfe)
                for seed in args.seeds:
                    kw = dict(sampler=sampler, steps=steps)
                    if name == "ddpm":
                        m = measure(model, shapes_judge, args.n, seed, **kw)
                    else:
                        m = measure_ldm(model, args.n, seed, **kw)
                    row = dict(model=name, sampler=sampler, steps=steps, nfe=samplers.nfe(sampler, steps), seed=seed,
                               fd=m["fd"], fd_over_rvr=m["fd"] / baseline, accuracy=m["acc"],
                               s_per_image=m["s_per_image"])
                    rows.append(row)
                    print(f"{name:>5} | {sampler:>11} | {steps:>5} | {row['nfe']:>4} | {seed:>4} | {row['fd']:>9.3f} | "
                          f"{row['fd_over_rvr']:>8.2f} | {row['accuracy']:>8.3f} | {row['s_per_image']:>7.4f}",
                          flush=True)
                    if args.out:
                        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))
    return head, rows


def plot(head, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for sampler in SAMPLERS:
            pts = sorted((r["nfe"], r["fd"]) for r in rows if r["model"] == name and r["sampler"] == sampler)
            if pts:
                nfes = sorted({p[0] for p in pts})
                means = [sum(f for e, f in pts if e == k) / sum(1 for e, _ in pts if e == k) for k in nfes]
                ax.plot(nfes, means, "o-", label=sampler)
        ax.axhline(head["real_vs_real"], color="gray", ls="--", lw=1, label="real vs real")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="FD-shapes",
               title=f"reference {name}, n={head['n']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ddpm", "ldm"], choices=["ddpm", "ldm"])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--n", type=int, default=200, help="images per setting (FD is biased upwards at small n)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the rows to this JSON file as they come")
    p.add_argument("--plot", default=None, help="save FD against NFE to this PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head, rows = run(args)
    if args.plot:
        plot(head, rows, args.plot)


if __name__ == "__main__":
    main()
