"""Time to quality: FD-shapes against wall-clock training time, pixel DDPM vs latent diffusion.

Trains one model and, every --eval-every steps, samples --n-eval images from its EMA weights
and scores them (the evaluation time is not counted as training time). Prints one row per
evaluation and writes them to a JSON file; `--plot` draws several such files as one figure
and prints one Markdown table, with the minutes each run needed to reach 2x the real-vs-real
FD at the same n.

    # pixel DDPM: the reference recipe (minigen.reference SPECS["ddpm"]), class-conditional
    python benchmarks/time_to_quality.py ddpm --steps 1800 --eval-every 300 --out ttq_ddpm.json
    # latent diffusion with text prompts on a trained autoencoder (its training time is
    # read from its log and reported separately: the price of the latent space)
    python benchmarks/time_to_quality.py ldm --autoencoder runs/vqgan/checkpoint.pt --out ttq_ldm.json
    python benchmarks/time_to_quality.py --plot ttq_ddpm.json ttq_ldm.json --figure ttq.png

Samples: DDIM with the model's sample_steps and guidance scale; the DDPM gets every class
equally often, the LDM the captions of the first test images. Accuracy is the judge's class
accuracy (DDPM) or caption accuracy (LDM, shape and colour both right). Run with
OMP_NUM_THREADS=1 (one job per core on the shared 2-core machine).
"""

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

import minigen
from minigen import data, judge, metrics, train
from minigen.cli import _parse_overrides as parse_set  # --set key=value, as the CLI reads it


def autoencoder_seconds(path: Path):
    """Training seconds of the autoencoder: the `elapsed` of its run's log.jsonl, or the
    manifest's train_seconds for a reference checkpoint (else None)."""
    from minigen import reference

    log = Path(path).parent / "log.jsonl"
    if not log.exists():
        try:
            entries = reference.manifest(Path(path).parent)["models"].values()
        except reference.ReferenceError:  # neither a run folder nor a reference folder
            return None
        return next((e["train_seconds"] for e in entries if e["file"] == Path(path).name), None)
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return max((r.get("elapsed", 0.0) for r in recs), default=None)


def build(args, train_set):
    """(model, training data, train kwargs, sample_fn(model, n, generator) -> (images, accuracy))."""
    from minigen import reference

    overrides = parse_set(args.set)
    if args.model == "ddpm":
        from minigen import diffusion

        spec = reference.SPECS["ddpm"]
        model = diffusion.build({**spec["model"], **overrides}, train_set.image_shape, len(train_set.classes))
        kw = {**spec["train"]}
        n_cls = len(train_set.classes)

        def sample(m, n, g):
            y = torch.arange(n) % n_cls
            x = torch.cat([m.sample(len(yb), y=yb, generator=g) for yb in y.split(250)])
            return x, metrics.conditional_accuracy(judge.load_judge("shapes"), x, y)

        return model, train_set, kw, sample

    from minigen import ldm

    if not args.autoencoder:
        raise SystemExit("ldm needs --autoencoder (a VQGAN checkpoint, e.g. from `minigen train vqgan`)")
    model = ldm.build({"autoencoder": args.autoencoder, **overrides}, train_set.image_shape, dataset=train_set)
    latents = model.training_data(train_set, cache=Path(args.work) / "latents")
    kw = dict(ldm.TRAIN_DEFAULTS)
    kw["warmup_steps"] = kw.pop("warmup", 0)
    kw["lr_schedule"] = kw.pop("schedule", "constant")
    kw["ema_decay"] = kw.pop("ema", 0.995)
    test = data.load_dataset("shapes", split="test", n=args.n_eval)
    prompts = list(test.captions)

    def sample(m, n, g):
        x = torch.cat([m.sample(prompts[i:i + 250], generator=g) for i in range(0, n, 250)])
        return x, ldm.caption_accuracy(judge.load_judge("shapes"), x, prompts[:n])

    return model, latents, kw, sample


def run(args):
    torch.manual_seed(args.seed)
    train_set = data.load_dataset("shapes", split="train", n=args.n_train)
    model, train_data, kw, sample = build(args, train_set)
    kw.update(steps=args.steps, seed=args.seed)
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    real = data.load_dataset("shapes", split="train", n=args.n_eval).tensors()[0]
    baseline = judge.fd_score("shapes", real)  # train vs test images, same n
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = dict(model=args.model, date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores",
                threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                minigen=minigen.__version__, params=params, train=kw, n_eval=args.n_eval,
                real_vs_real=baseline, overrides=parse_set(args.set),
                autoencoder=args.autoencoder, autoencoder_train_s=(autoencoder_seconds(args.autoencoder)
                                                                   if args.autoencoder else None))
    print(f"# {head}", flush=True)
    print(f"{'step':>6} | {'train min':>9} | {'FD-shapes':>9} | {'FD / rvr':>8} | {'accuracy':>8} | {'eval s':>6}")
    rows = []
    clock = {"train": 0.0, "t0": time.perf_counter()}

    def evaluate(done, m, ema):
        clock["train"] += time.perf_counter() - clock["t0"]
        if done % args.eval_every == 0 or done == args.steps:
            t = time.perf_counter()
            e = copy.deepcopy(m)
            if ema is not None:
                ema.copy_to(e)
            e.eval()
            x, acc = sample(e, args.n_eval, torch.Generator().manual_seed(args.seed))
            fd = judge.fd_score("shapes", x)
            row = dict(step=done, train_s=clock["train"], fd=fd, fd_over_rvr=fd / baseline, accuracy=acc,
                       eval_s=time.perf_counter() - t)
            rows.append(row)
            print(f"{done:>6} | {row['train_s'] / 60:>9.2f} | {fd:>9.3f} | {fd / baseline:>8.2f} | {acc:>8.3f} | "
                  f"{row['eval_s']:>6.1f}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))
        clock["t0"] = time.perf_counter()

    out_dir = Path(args.work) / args.model
    (out_dir / train.CHECKPOINT_NAME).unlink(missing_ok=True)
    clock["t0"] = time.perf_counter()
    train.fit(model, train_data, out_dir=str(out_dir), progress=False, ckpt_every=0, log_every=100,
              callback=evaluate, **kw)


def first_reach(rows, factor=2.0):
    for r in rows:
        if r["fd_over_rvr"] <= factor:
            return r["train_s"] / 60
    return None


def plot(files, figure):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(f).read_text()) for f in files]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    print("| run | params | final step | train min | FD-shapes (n) | FD / real-vs-real | accuracy | "
          "min to 2x real-vs-real |")
    print("|---|---|---|---|---|---|---|---|")
    for r, f in zip(runs, files):
        rows = r["rows"]
        label = {"ddpm": "pixel DDPM, class label", "ldm": "latent diffusion, text prompt"}[r["model"]]
        if r.get("autoencoder_train_s"):
            label += " (+ {:.0f} min for the autoencoder)".format(r["autoencoder_train_s"] / 60)
        t = [x["train_s"] / 60 for x in rows]
        ax[0].plot(t, [x["fd"] for x in rows], "o-", label=label)
        ax[1].plot(t, [x["accuracy"] for x in rows], "o-", label=label)
        reach = first_reach(rows)
        last = rows[-1]
        print(f"| {Path(f).stem} ({r['model']}) | {r['params'] / 1e6:.2f}M | {last['step']} | {t[-1]:.1f} | "
              f"{last['fd']:.2f} ({r['n_eval']}) | {last['fd_over_rvr']:.1f} | {last['accuracy']:.3f} | "
              f"{'%.1f' % reach if reach is not None else 'not reached'} |")
        ax[0].axhline(2 * r["real_vs_real"], color="gray", ls=":", lw=1)
    ax[0].set(xlabel="training minutes (1 thread)", ylabel="FD-shapes", yscale="log",
              title="FD-shapes (dotted: 2x real-vs-real)")
    ax[1].set(xlabel="training minutes (1 thread)", ylabel="accuracy", ylim=(0, 1),
              title="class / caption accuracy (judge)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    print(f"\nfigure: {figure}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", choices=["ddpm", "ldm"])
    p.add_argument("--autoencoder", default=None, help="ldm: the autoencoder checkpoint")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model override, repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/time_to_quality")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="draw these runs instead of training")
    p.add_argument("--figure", default="time_to_quality.png")
    args = p.parse_args(argv)
    if args.plot:
        return plot(args.plot, args.figure)
    if not args.model:
        p.error("give a model (ddpm or ldm) or --plot")
    args.work = str(Path(args.work) / (Path(args.out).stem if args.out else args.model))
    run(args)


if __name__ == "__main__":
    main()
