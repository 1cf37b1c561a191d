"""Time to quality: FD-shapes against one-thread CPU training time, for every generative recipe.

Trains one model and, every --eval-every steps, samples --n-eval images from its EMA weights
and scores them. Prints one row per evaluation and writes them to a JSON file; `--plot`
draws several such files as one figure and prints one Markdown table, with the minutes each
run needed to reach 2x the real-vs-real FD at the same n.

The clock. The machine this was measured on is shared, so wall time says more about the
neighbours than about the recipe: the training clock is the process's CPU time
(time.process_time) with one thread (the script sets torch.set_num_threads(1); run it with
OMP_NUM_THREADS=1 too), summed over the training steps only; evaluation (sampling, the
judge) is excluded. Wall time of the same steps is recorded beside it (`train_wall_s`).
The two rows from 2026-12-04 (ttq_pixel_ddpm.json, ttq_latent_diffusion.json) predate this
and were clocked in wall time at one thread; their JSON has no "clock" field.

    # pixel DDPM: the reference recipe (minigen.reference SPECS["ddpm"]), class-conditional
    python benchmarks/time_to_quality.py ddpm --steps 1800 --eval-every 300 --out ttq_ddpm.json
    # latent diffusion with text prompts on a trained autoencoder (its training time is
    # read from its log and reported separately: the price of the latent space)
    python benchmarks/time_to_quality.py ldm --autoencoder runs/vqgan/checkpoint.pt --out ttq_ldm.json
    # pixel flow matching: the reference DDPM's U-Net and recipe, flow objective (logit-normal t)
    python benchmarks/time_to_quality.py flow --steps 600 --eval-every 150 --out ttq_pixel_flow.json
    # latent flow matching, class-conditional, on the shipped reference VQGAN's 4x8x8 latents
    # (encoded once; the VQGAN's own training time is read from the manifest and reported
    # beside the figure), with a U-Net or a DiT
    python benchmarks/time_to_quality.py lflow --steps 3000 --eval-every 500 --out ttq_latent_flow_unet.json
    python benchmarks/time_to_quality.py lflow --set backbone=dit --out ttq_latent_flow_dit.json
    # the control: the same latents, U-Net, labels and recipe, trained as lesson 06's
    # v-prediction diffusion (cosine schedule) and sampled by DPM-Solver++ at 10 evaluations
    python benchmarks/time_to_quality.py ldiff --steps 600 --eval-every 300 --out ttq_latent_vdiffusion_unet.json
    python benchmarks/time_to_quality.py --plot benchmarks/results/ttq_*.json --figure ttq.png

Samples. ddpm / ldm: DDIM with the model's sample_steps (25) and guidance scale, as the
2026-12-04 rows were made; flow / lflow: the flow model's fast solver, DPM-Solver++(2M) on the
uniform flow grid at --sample-steps (10) network evaluations (ldiff: DPM-Solver++(2M) on its
trailing timesteps, the same count), guidance --guidance (2, the
reference DDPM's). Class-conditional models get every class equally often, the text LDM the
captions of the first test images. Accuracy is the judge's class accuracy (class labels)
or caption accuracy (text: shape and colour both right).
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


def repo_relative(path):
    """`path` relative to the repository when it is inside it, so that a result file does not
    name one machine's checkout (the shipped VQGAN is recorded as minigen/weights/...)."""
    if not path:
        return path
    p, root = Path(path).resolve(), Path(__file__).resolve().parents[1]
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


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

    if args.model in ("flow", "lflow", "ldiff"):
        return build_flow(args, train_set, overrides)

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


# the reference DDPM's U-Net (lesson 06's: 16/32/64 channels, no attention) for pixel flow;
# the latent diffusion model's U-Net widths (32/64 at 8x8/4x4) without its text attention for
# latent flow; a DiT on the 8x8 latents with 2x2 patches (16 tokens)
FLOW_DEFAULTS = {
    "flow": dict(channels=16, channel_mult=(1, 2, 4), layers_per_block=1, attention_resolutions=()),
    "lflow": dict(channels=32, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(2,)),
    "lflow-dit": dict(patch_size=2, hidden_size=128, depth=4, num_heads=4),
}
# the reference DDPM's training recipe (minigen.reference SPECS["ddpm"]["train"]) for both
FLOW_TRAIN = dict(batch_size=64, lr=2e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.995)


def build_flow(args, train_set, overrides):
    """Class-conditional flow matching in pixel space ("flow") or on the reference VQGAN's
    latents ("lflow"): (model, data, train kwargs, sample_fn), as build()."""
    from minigen import flow

    n_cls = len(train_set.classes)
    labels = train_set.tensors()[1]
    w = args.guidance
    if args.model == "flow":
        model = flow.build({**FLOW_DEFAULTS["flow"], **overrides}, train_set.image_shape, n_cls)
        data_, decode = train_set, (lambda z: z)
    else:
        from minigen import ldm, reference
        from minigen.text import Tokenizer

        # the LDM wrapper only to encode (pre-quantisation latents, scale 1/std) and decode
        # through the VQGAN; its own U-Net and text encoder are not trained here
        vq = reference.load("vqgan")
        lat = ldm.LatentDiffusion(vq, ldm.LatentDiffusionConfig(), Tokenizer.from_captions(train_set.captions))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        z = lat.encode_dataset(train_set, cache=Path(args.work) / "latents").tensors[0]
        args.encode_cpu_s, args.encode_wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        backbone = overrides.get("backbone", "unet")
        defaults = FLOW_DEFAULTS["lflow-dit" if backbone == "dit" else "lflow"]
        if args.model == "ldiff":  # the control: lesson 06's v-prediction diffusion, same network and data
            from minigen import diffusion

            model = diffusion.build({**defaults, "prediction_type": "v", "beta_schedule": "cosine",
                                     "clip_denoised": False, **overrides}, tuple(z.shape[1:]), n_cls)
        else:
            model = flow.build({**defaults, "clip_denoised": False, **overrides}, tuple(z.shape[1:]), n_cls)
        data_ = torch.utils.data.TensorDataset(z, labels)
        decode = lat.decode
        args.scale_factor = lat.scale_factor

    def sample(m, n, g):
        y = torch.arange(n) % n_cls
        x = torch.cat([decode(m.sample(len(yb), y=yb, sampler=args.sampler, steps=args.sample_steps,
                                       guidance_scale=w, generator=g)) for yb in y.split(250)]).clamp(-1, 1)
        return x, metrics.conditional_accuracy(judge.load_judge("shapes"), x, y)

    return model, data_, dict(FLOW_TRAIN), sample


def run(args):
    torch.set_num_threads(1)  # the clock is one thread's CPU time
    torch.manual_seed(args.seed)
    if args.model in ("lflow", "ldiff") and not args.autoencoder:
        from minigen import reference

        args.autoencoder = str(reference.path("vqgan"))
    train_set = data.load_dataset("shapes", split="train", n=args.n_train)
    model, train_data, kw, sample = build(args, train_set)
    kw.update(steps=args.steps, seed=args.seed)
    for k in ("batch_size", "lr", "ema_decay"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    real = data.load_dataset("shapes", split="train", n=args.n_eval).tensors()[0]
    baseline = judge.fd_score("shapes", real)  # train vs test images, same n
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = dict(model=args.model, date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores",
                threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                minigen=minigen.__version__, params=params, train=kw, n_eval=args.n_eval,
                real_vs_real=baseline, overrides=parse_set(args.set),
                autoencoder=repo_relative(args.autoencoder), autoencoder_train_s=(autoencoder_seconds(args.autoencoder)
                                                                   if args.autoencoder else None),
                clock="process CPU seconds (time.process_time), 1 thread, evaluation excluded; "
                      "train_wall_s: wall seconds of the same steps",
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), label=args.label,
                sampler=(f"{args.sampler} {args.sample_steps} steps, guidance {args.guidance:g}"
                         if args.model in ("flow", "lflow", "ldiff") else "DDIM, the model's sample_steps and guidance"),
                encode_cpu_s=getattr(args, "encode_cpu_s", None), encode_wall_s=getattr(args, "encode_wall_s", None))
    print(f"# {head}", flush=True)
    print(f"{'step':>6} | {'train min':>9} | {'FD-shapes':>9} | {'FD / rvr':>8} | {'accuracy':>8} | {'eval s':>6}")
    rows = []
    clock = {"train": 0.0, "wall": 0.0}

    def evaluate(done, m, ema):
        clock["train"] += time.process_time() - clock["cpu0"]
        clock["wall"] += time.perf_counter() - clock["t0"]
        if done % args.eval_every == 0 or done == args.steps:
            t = time.perf_counter()
            e = copy.deepcopy(m)
            if ema is not None:
                ema.copy_to(e)
            e.eval()
            x, acc = sample(e, args.n_eval, torch.Generator().manual_seed(args.seed))
            fd = judge.fd_score("shapes", x)
            row = dict(step=done, train_s=clock["train"], train_wall_s=clock["wall"], fd=fd, fd_over_rvr=fd / baseline, accuracy=acc,
                       eval_s=time.perf_counter() - t)
            rows.append(row)
            print(f"{done:>6} | {row['train_s'] / 60:>9.2f} | {fd:>9.3f} | {fd / baseline:>8.2f} | {acc:>8.3f} | "
                  f"{row['eval_s']:>6.1f}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))
            if done == args.steps:  # the final EMA weights, to re-sample without retraining
                torch.save(e.state_dict(), Path(args.work) / "final_ema.pt")
        clock["t0"], clock["cpu0"] = time.perf_counter(), time.process_time()

    out_dir = Path(args.work) / args.model
    (out_dir / train.CHECKPOINT_NAME).unlink(missing_ok=True)
    clock["t0"], clock["cpu0"] = time.perf_counter(), time.process_time()
    train.fit(model, train_data, out_dir=str(out_dir), progress=False, ckpt_every=0, log_every=100,
              callback=evaluate, **kw)


def first_reach(rows, factor=2.0):
    for r in rows:
        if r["fd_over_rvr"] <= factor:
            return r["train_s"] / 60
    return None


LABELS = {"ddpm": "pixel DDPM, class label", "ldm": "latent diffusion, text prompt",
          "flow": "pixel flow matching, class label", "lflow": "latent flow matching, class label",
          "ldiff": "latent v-diffusion, class label"}


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
        label = r.get("label") or LABELS[r["model"]]
        if r.get("autoencoder_train_s"):
            label += " (+ {:.1f} min for the autoencoder)".format(r["autoencoder_train_s"] / 60)
        if "clock" not in r:
            label += " [wall clock]"
        t = [x["train_s"] / 60 for x in rows]
        ax[0].plot(t, [x["fd"] for x in rows], "o-", label=label)
        ax[1].plot(t, [x["accuracy"] for x in rows], "o-", label=label)
        reach = first_reach(rows)
        last = rows[-1]
        print(f"| {Path(f).stem} ({label}) | {r['params'] / 1e6:.2f}M | {last['step']} | {t[-1]:.1f} | "
              f"{last['fd']:.2f} ({r['n_eval']}) | {last['fd_over_rvr']:.1f} | {last['accuracy']:.3f} | "
              f"{'%.1f' % reach if reach is not None else 'not reached'} |")
        ax[0].axhline(2 * r["real_vs_real"], color="gray", ls=":", lw=1)
    ax[0].set(xlabel="training minutes, 1 thread (CPU time; [wall clock]: idle wall time)", ylabel="FD-shapes", yscale="log",
              title="FD-shapes (dotted: 2x real-vs-real)")
    ax[1].set(xlabel="training minutes, 1 thread (CPU time; [wall clock]: idle wall time)", ylabel="accuracy", ylim=(0, 1),
              title="class / caption accuracy (judge)")
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    print(f"\nfigure: {figure}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", choices=["ddpm", "ldm", "flow", "lflow", "ldiff"])
    p.add_argument("--autoencoder", default=None,
                   help="ldm: the autoencoder checkpoint (lflow always uses the reference VQGAN)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--sampler", default="dpmsolver++", help="flow / lflow: the evaluation sampler")
    p.add_argument("--sample-steps", type=int, default=10, help="flow / lflow: its steps")
    p.add_argument("--guidance", type=float, default=2.0, help="flow / lflow: classifier-free guidance")
    p.add_argument("--label", default=None, help="the run's name in the figure")
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
        p.error("give a model (ddpm, ldm, flow, lflow or ldiff) or --plot")
    if args.model in ("lflow", "ldiff") and args.autoencoder:
        p.error(f"{args.model} trains on the reference VQGAN's latents; --autoencoder is for ldm")
    args.work = str(Path(args.work) / (Path(args.out).stem if args.out else args.model))
    run(args)


if __name__ == "__main__":
    main()
