"""Every model family on this machine, side by side: one command, one JSON, one Markdown table.

    python benchmarks/run_all.py                 # ~5-10 minutes on 2 idle cores
    python benchmarks/run_all.py --quick         # smoke test, tiny batches (< 30 s)
    python benchmarks/run_all.py --only ddpm vae --repeats 5
    python benchmarks/run_all.py --threads 1 --sample-steps 10   # on a busy machine: 1 thread, shorter sampling

For each family importable from minigen (autoencoder, vae, vqvae, vqgan, prior = the GPT over
codes, ddpm = GaussianDiffusion + UNet, ldm when minigen.ldm exists), built with its defaults for
3x32x32 `shapes`-sized inputs, it measures:

- training images/s at batch 32 and 64: the model's own training_loss, its optimizers
  (configure_optimizers or AdamW), zero_grad / backward / grad-clip 1.0 / step, i.e. what
  minigen.train.fit runs per step, without the loop around it (that is measured separately);
- forward GFLOP/image of the network (torch.utils.flop_counter.FlopCounterMode) and the
  FLOPs of one whole training step counted the same way (forward + backward of every loss,
  including loss networks such as VQGAN's discriminator and perceptual net);
- achieved GFLOP/s of training at batch 64, as a fraction of a 2048x2048 fp32 matmul timed in
  the same process, interleaved with the model timings (both "3 x forward", the usual count,
  and the counted step FLOPs);
- sampling images/s at batch 64 and network evaluations per image (DDIM steps, tokens);
- peak memory: each family runs in its own subprocess; the figure is the growth of the
  process's peak resident set size (getrusage ru_maxrss) during the first batch-64 training
  step over the peak after building the model and data, i.e. activations + gradients +
  optimizer state + allocator slack, on the CPU;
- the overhead of minigen.train.fit over a bare loop (benchmarks/train_overhead.py's child).

Numbers are medians over --repeats interleaved rounds. All children raise glibc's malloc
thresholds as fit does (see minigen.runtime.tune_malloc); --default-malloc turns that off.
On a machine shared with other jobs the absolute rates swing; the ratios to the matmul rate
measured in the same rounds are the figures to compare.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unet_throughput import matmul_gflops  # a sibling script: benchmarks/ is on sys.path when run

HERE = Path(__file__).resolve().parent
FAMILIES = ("autoencoder", "vae", "vqvae", "vqgan", "prior", "ddpm", "ldm")
SHAPE = (3, 32, 32)


# ----------------------------------------------------------------------------- the models


class Bench:
    """One family: how to build it, make a batch, run its network and sample from it."""

    name = ""
    sample_evals = None  # network evaluations per sampled image; None = no sampler

    def batch(self, n):
        return (torch.rand(n, *SHAPE) * 2 - 1, torch.randint(0, 18, (n,)))

    def forward(self, batch):  # the network alone, for "forward GFLOP/img"
        return self.model(batch[0])

    def sample(self, n):
        raise NotImplementedError


class AutoEncoderBench(Bench):
    name = "autoencoder"

    def __init__(self, args):
        from minigen.autoencoder import AutoEncoder, AutoEncoderConfig
        self.model = AutoEncoder(AutoEncoderConfig(in_channels=3, image_size=32))


class VAEBench(Bench):
    name = "vae"
    sample_evals = 1  # one decoder pass per image

    def __init__(self, args):
        from minigen import vae
        self.model = vae.build({}, SHAPE)

    def sample(self, n):
        return self.model.sample(n)


class VQVAEBench(Bench):
    name = "vqvae"
    sample_evals = 1  # decode_indices: what a prior's tokens go through

    def __init__(self, args):
        from minigen import vq
        self.model = vq.build({}, SHAPE)
        self.model.eval()
        with torch.no_grad():
            self.codes = self.model.encode(self.batch(2)[0])[1]
        self.model.train()

    def sample(self, n):
        idx = torch.randint(0, self.model.config.num_codes, (n, *self.codes.shape[1:]))
        return self.model.decode_indices(idx)


class VQGANBench(VQVAEBench):
    name = "vqgan"

    def __init__(self, args):
        from minigen import vqgan
        # disc_start=0: time the steady-state step with the GAN terms and the discriminator on
        self.model = vqgan.build({"disc_start": 0}, SHAPE)
        with torch.no_grad():
            self.codes = self.model.encode(self.batch(2)[0])[1]


class PriorBench(Bench):
    name = "prior"

    def __init__(self, args):
        from minigen.transformer import GPT, GPTConfig
        self.model = GPT(GPTConfig())  # 512 codes, 64 tokens = an 8x8 code map
        self.sample_evals = self.model.config.block_size  # one (KV-cached) step per token

    def batch(self, n):
        cfg = self.model.config
        return (torch.randint(0, cfg.vocab_size, (n, cfg.block_size)), torch.full((n,), -1))

    def forward(self, batch):
        return self.model(batch[0][:, :-1])

    def sample(self, n):
        return self.model.generate(num_samples=n, use_cache=True)


class DDPMBench(Bench):
    name = "ddpm"

    def __init__(self, args):
        from minigen import diffusion
        self.model = diffusion.build({}, SHAPE)  # unconditional; default UNet (32, 64, 64)
        self.steps = args.sample_steps or self.model.config.sample_steps
        self.sample_evals = self.steps

    def forward(self, batch):
        x = batch[0]
        return self.model.model(x, torch.randint(0, 1000, (len(x),)))

    def sample(self, n):
        return self.model.sample(n, steps=self.steps, sampler="ddim")


class LDMBench(Bench):
    """Latent diffusion with a default (untrained) VQGAN: the costs do not depend on the weights."""

    name = "ldm"
    CAPTIONS = ["a small red circle on a blue background", "a large green square on a black background",
                "a small yellow triangle on a white background"]

    def __init__(self, args):
        from minigen import ldm
        from minigen.vqgan import VQGAN, VQGANConfig
        from minigen.text import Tokenizer
        tok = Tokenizer.from_captions(self.CAPTIONS)
        self.model = ldm.LatentDiffusion(VQGAN(VQGANConfig(perceptual="none")),
                                         ldm.LatentDiffusionConfig(image_shape=SHAPE), tokenizer=tok)
        with torch.no_grad():
            self.model.fit_scale_factor(torch.rand(8, *SHAPE) * 2 - 1)
        self.tokens = tok.encode(self.CAPTIONS)
        self.steps = args.sample_steps or self.model.diffusion.config.sample_steps
        self.sample_evals = self.steps  # x2 with classifier-free guidance (batched cond/uncond)

    def batch(self, n):
        # what encode_dataset yields: (scaled latents, caption tokens); the images are encoded
        # once, before training, so a training step never runs the autoencoder
        shape = self.model.config.latent_shape
        return (torch.randn(n, *shape), self.tokens[torch.arange(n) % len(self.tokens)])

    def forward(self, batch):
        z, tokens = batch
        return self.model.diffusion.model(z, torch.randint(0, 1000, (len(z),)),
                                          context=self.model.text_encoder(tokens))

    def sample(self, n):
        return self.model.sample([self.CAPTIONS[i % 3] for i in range(n)], steps=self.steps)


BENCHES = {b.name: b for b in (AutoEncoderBench, VAEBench, VQVAEBench, VQGANBench, PriorBench,
                               DDPMBench, LDMBench)}


# ----------------------------------------------------------------------------- measuring


def optimizers(model):
    from minigen.train import TrainConfig
    if hasattr(model, "configure_optimizers"):
        opts = model.configure_optimizers(TrainConfig())
        return opts if isinstance(opts, dict) else {None: opts}
    return {None: torch.optim.AdamW(model.parameters(), lr=2e-4)}


def train_step(model, opts, batch, step=10**6):
    """One optimizer step of every optimizer, as minigen.train.fit does it (fp32, no accumulation).

    `step` is large so that schedules that switch terms on late (VQGAN's disc_start) are on.
    """
    for name, opt in opts.items():
        model.zero_grad(set_to_none=True)
        out = model.training_loss(batch, step) if name is None else model.training_loss(batch, step, name)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


def count_flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args):
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        from minigen.runtime import tune_malloc
        tune_malloc()
    torch.manual_seed(0)
    bench = BENCHES[args.child](args)
    model = bench.model
    model.train()
    opts = optimizers(model)
    b_small, b_large = args.batches
    batches = {b: bench.batch(b) for b in (b_small, b_large)}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rss0 = maxrss_mib()
    train_step(model, opts, batches[b_large])  # also the warm-up for this batch size
    peak_train = maxrss_mib() - rss0
    train_step(model, opts, batches[b_small])

    with torch.no_grad():
        model.eval()
        fwd = count_flops(lambda: bench.forward(batches[b_small])) / b_small
        model.train()
    step_flops = count_flops(lambda: train_step(model, opts, batches[b_small])) / b_small

    can_sample = bench.sample_evals is not None
    if can_sample:
        with torch.no_grad():
            model.eval()
            bench.sample(b_large)  # warm-up
            model.train()

    rows = {"matmul": [], "train_small": [], "train_large": [], "sample": []}
    for _ in range(args.repeats):  # interleaved: a change in load hits every figure alike
        rows["matmul"].append(matmul_gflops(reps=5))
        for key, b in (("train_small", b_small), ("train_large", b_large)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opts, batches[b])
            rows[key].append(b * args.steps / (time.perf_counter() - t0))
        if can_sample:
            model.eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                bench.sample(b_large)
                rows["sample"].append(b_large / (time.perf_counter() - t0))
            model.train()
    med = {k: statistics.median(v) if v else None for k, v in rows.items()}
    res = {
        "family": bench.name, "model": type(model).__name__, "params_M": params / 1e6,
        "batches": [b_small, b_large],
        "forward_gflop_per_img": fwd / 1e9, "train_step_gflop_per_img": step_flops / 1e9,
        "matmul_gflops": med["matmul"],
        "train_img_s": {str(b_small): med["train_small"], str(b_large): med["train_large"]},
        "train_gflops_3x_fwd": 3 * fwd / 1e9 * med["train_large"],
        "train_gflops_counted": step_flops / 1e9 * med["train_large"],
        "sample_img_s": med["sample"], "sample_evals_per_img": bench.sample_evals,
        "peak_train_mem_mib": peak_train,
        "spread": {k: [min(v), max(v)] for k, v in rows.items() if v},
    }
    res["fraction_of_matmul_3x_fwd"] = res["train_gflops_3x_fwd"] / med["matmul"]
    res["fraction_of_matmul_counted"] = res["train_gflops_counted"] / med["matmul"]
    print(json.dumps(res))


# ----------------------------------------------------------------------------- the parent


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    return cpu


def run_child(family, args):
    cmd = [sys.executable, __file__, "--child", family, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--steps", str(args.steps),
           "--batches", *map(str, args.batches)] + (
        ["--sample-steps", str(args.sample_steps)] if args.sample_steps else []) + (["--quick"] if args.quick else []) + (
        ["--default-malloc"] if args.default_malloc else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"family": family, "skipped": tail[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_overhead(args):
    """fit vs a bare loop on train_overhead.py's conv autoencoder, one child, interleaved."""
    steps, repeats = (5, 1) if args.quick else (30, args.repeats)
    cmd = [sys.executable, str(HERE / "train_overhead.py"), "--child", "--steps", str(steps),
           "--repeats", str(repeats), "--threads", str(args.threads),
           "--malloc", "default" if args.default_malloc else "tuned"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.default_malloc:
        env["MINIGEN_NO_MALLOPT"] = "1"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"skipped": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    med_cpu = {k: statistics.median(v) for k, v in r["cpu"].items()}
    return {"steps": steps, "repeats": repeats, "batch": 64,
            "fit_s": med["fit"], "bare_s": med["bare"],
            "overhead_wall": med["fit"] / med["bare"] - 1, "overhead_cpu": med_cpu["fit"] / med_cpu["bare"] - 1}


def fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def markdown(out):
    b_small, b_large = out["batches"]
    lines = [
        f"# minigen benchmarks ({out['date']})", "",
        f"{out['machine']['cpu']}, {out['machine']['cores']} cores, {out['threads']} threads; "
        f"python {out['python']}, torch {out['torch']}, minigen {out['minigen']}; malloc {out['malloc']}; "
        f"medians of {out['repeats']} interleaved rounds x {out['steps']} steps{' (--quick)' if out['quick'] else ''}.",
        f"Command: `{out['command']}`", "",
        f"| family | params | fwd GFLOP/img | train GFLOP/img (counted) | train img/s b{b_small} | "
        f"train img/s b{b_large} | GFLOP/s b{b_large} (3×fwd) | % of matmul (3×fwd / counted) | "
        f"matmul GFLOP/s | sample img/s b{b_large} | evals/img | peak train mem b{b_large} (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        if "skipped" in r:
            lines.append(f"| {r['family']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        ips = r["train_img_s"]
        lines.append(
            f"| {r['family']} | {r['params_M']:.2f}M | {r['forward_gflop_per_img']:.3f} | "
            f"{r['train_step_gflop_per_img']:.3f} | {ips[str(b_small)]:.1f} | {ips[str(b_large)]:.1f} | "
            f"{r['train_gflops_3x_fwd']:.0f} | {100 * r['fraction_of_matmul_3x_fwd']:.0f}% / "
            f"{100 * r['fraction_of_matmul_counted']:.0f}% | {r['matmul_gflops']:.0f} | "
            f"{fmt(r['sample_img_s'], '.2f')} | {fmt(r['sample_evals_per_img'], 'd')} | {r['peak_train_mem_mib']:.0f} |")
    o = out["fit_overhead"]
    lines += ["", "Training loop: " + (
        f"minigen.train.fit vs a bare loop (conv autoencoder, batch 64, {o['steps']} steps per call, "
        f"setup included): fit takes {100 * o['overhead_wall']:+.1f}% wall time, "
        f"{100 * o['overhead_cpu']:+.1f}% CPU time." if "skipped" not in o else f"skipped: {o['skipped']}")]
    lines += ["", "Notes: training = the model's training_loss + backward + grad clip + its optimizers "
              "(VQGAN: generator and discriminator steps, GAN terms on, perceptual net in the loss; "
              "LDM: on pre-encoded latents, text encoder trained). Sampling: VAE decodes z ~ N(0, I); "
              "VQ-VAE/VQGAN decode random code maps; prior draws 64 tokens with the KV cache; DDPM/LDM "
              "use DDIM. Peak memory: growth of ru_maxrss during the first batch-"
              f"{b_large} step in a fresh process per family."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny batches, 1 round, 1 step")
    p.add_argument("--only", nargs="+", choices=FAMILIES, default=None)
    p.add_argument("--threads", type=int, default=None, help="default: 2, or 1 with --quick")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per round (default 2)")
    p.add_argument("--batches", type=int, nargs=2, default=None, help="default: 32 64 (4 8 with --quick)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="DDIM steps timed for ddpm/ldm sampling (default: the config's, 50; 2 with --quick)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's thresholds alone")
    p.add_argument("--out", default=str(HERE), help="folder for results.json and results.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.threads = args.threads or (1 if q else 2)
    args.repeats = args.repeats or (1 if q else 3)
    args.steps = args.steps or (1 if q else 2)
    args.batches = args.batches or ([4, 8] if q else [32, 64])
    args.sample_steps = args.sample_steps or (2 if q else None)
    if args.child:
        return child(args)

    import minigen
    families = args.only or FAMILIES
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": machine(), "cores": os.cpu_count(), "platform": platform.platform()},
        "python": platform.python_version(), "torch": torch.__version__, "minigen": minigen.__version__,
        "threads": args.threads, "repeats": args.repeats, "steps": args.steps, "batches": args.batches,
        "quick": q, "malloc": "default" if args.default_malloc else "tuned (as in fit)",
        "load_average_start": os.getloadavg(), "results": [],
    }
    print(f"{out['machine']['cpu']}, {out['machine']['cores']} cores, {args.threads} threads, "
          f"torch {out['torch']}, minigen {out['minigen']}, {out['date']}", flush=True)
    t_all = time.perf_counter()
    for fam in families:
        t0 = time.perf_counter()
        r = run_child(fam, args)
        out["results"].append(r)
        note = r.get("skipped") or (f"train b{args.batches[1]} {r['train_img_s'][str(args.batches[1])]:.1f} img/s, "
                                    f"{100 * r['fraction_of_matmul_3x_fwd']:.0f}% of matmul")
        print(f"  {fam:<12} {time.perf_counter() - t0:5.1f} s  {note}", flush=True)
    out["fit_overhead"] = fit_overhead(args)
    out["load_average_end"] = os.getloadavg()
    out["total_s"] = time.perf_counter() - t_all
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(out)
    (dest / "results.md").write_text(md)
    print("\n" + md)
    print(f"total {out['total_s']:.0f} s; wrote {dest / 'results.json'} and {dest / 'results.md'}")


if __name__ == "__main__":
    main()
