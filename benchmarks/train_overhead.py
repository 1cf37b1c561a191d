"""How much does minigen.train.fit cost over a bare PyTorch loop?

Same conv autoencoder, same random 3x32x32 data, batch 64, same AdamW and the same gradient
clipping (fit's default grad_clip=1.0), CPU, 2 threads. fit runs as a learner would call it:
progress bar on, log_every at its default. Timed per call (setup included) over --steps steps,
fit and the bare loop interleaved, --repeats times each, medians and their ratio printed.

glibc malloc: fit() raises malloc's mmap/trim thresholds at start (see minigen.runtime.tune_malloc;
opt out with MINIGEN_NO_MALLOPT=1). That is process-wide and cannot be undone, so each setting
runs in its own child process, alternating over --rounds; within a child, fit and the bare loop
run under the same allocator setting, so their ratio is fair either way.

    python benchmarks/train_overhead.py                 # ~2 minutes
    python benchmarks/train_overhead.py --steps 20 --repeats 3 --rounds 1
    python benchmarks/train_overhead.py --model tiny --steps 300   # fixed cost per step
"""

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 64
LR = 2e-4


class ConvAE(nn.Module):
    """32x32 -> 8x8x32 latent -> 32x32; about 0.1M parameters."""

    def __init__(self, ch=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, ch, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * ch, 2 * ch, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * ch, ch, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(ch, 2 * ch, 3, 1, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * ch, 2 * ch, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(ch, 3, 3, 1, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_loss(self, batch, step):
        return F.mse_loss(self(batch), batch)


class Tiny(nn.Module):
    """A 1x1 conv: almost no compute, so the timings expose the loops' fixed per-step cost."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)

    training_loss = ConvAE.training_loss


def bare_loop(model, data, steps, grad_clip=1.0):
    """What one would write by hand: shuffled batches, AdamW, clipping."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    perm, pos = torch.randperm(len(data)), 0
    for _ in range(steps):
        if pos + BATCH > len(data):
            perm, pos = torch.randperm(len(data)), 0
        x = data[perm[pos:pos + BATCH]]
        pos += BATCH
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    return loss.item()


def fit_loop(model, data, steps):
    from minigen.train import fit

    res = fit(model, data, steps=steps, batch_size=BATCH, lr=LR)  # progress bar on, log_every 50
    return res.history[-1]["loss"]


def child(args):
    torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        from minigen.runtime import tune_malloc
        tune_malloc()  # before the first big allocation, so both loops run with it
    torch.manual_seed(0)
    data = torch.randn(2048, 3, 32, 32).clamp(-1, 1)
    base = ConvAE() if args.model == "ae" else Tiny()
    loops = {"fit": fit_loop, "bare": bare_loop}
    for fn in loops.values():  # warm-up: oneDNN primitives, allocator pools, imports
        fn(copy.deepcopy(base), data, 5)
    times = {k: [] for k in loops}
    cpu = {k: [] for k in loops}
    faults = {k: [] for k in loops}
    for _ in range(args.repeats):
        for name, fn in loops.items():
            model = copy.deepcopy(base)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            fn(model, data, args.steps)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps)
    print(json.dumps({"times": times, "cpu": cpu, "faults": faults}))


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    libc = " ".join(platform.libc_ver())
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {libc}; python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("ae", "tiny"), default="ae",
                   help="tiny: a 1x1 conv, to measure the fixed per-step cost of each loop")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--malloc", choices=("default", "tuned"), default="default", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"machine: {machine()}")
    net = ConvAE() if args.model == "ae" else Tiny()
    print(f"model: {type(net).__name__} {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, "
          f"batch {BATCH}, 3x32x32, {args.threads} threads, {args.steps} steps per timed call, "
          f"{args.repeats} interleaved repeats x {args.rounds} rounds per malloc setting")
    kinds = ("times", "cpu", "faults")
    results = {m: {k: {"fit": [], "bare": []} for k in kinds} for m in ("default", "tuned")}
    for _ in range(args.rounds):
        for m in ("default", "tuned"):
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            env.pop("MINIGEN_NO_MALLOPT", None)
            if m == "default":
                env["MINIGEN_NO_MALLOPT"] = "1"
            cmd = [sys.executable, __file__, "--child", "--malloc", m, "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--model", args.model]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"child failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            for kind in kinds:
                for loop in ("fit", "bare"):
                    results[m][kind][loop] += r[kind][loop]

    # img/s from wall-clock time (what a user sees) and from process CPU time (steadier when
    # other processes compete for the cores: a descheduled process accrues no CPU time)
    print(f"\n{'malloc':<8} {'loop':<5} {'img/s (median)':>15} {'min..max':>14} {'img/CPU-s':>10} "
          f"{'page faults/step':>17}")
    med, med_cpu = {}, {}
    for m, r in results.items():
        for loop in ("bare", "fit"):
            ips = [args.steps * BATCH / t for t in r["times"][loop]]
            med[m, loop] = statistics.median(ips)
            med_cpu[m, loop] = statistics.median(args.steps * BATCH / t for t in r["cpu"][loop])
            print(f"{m:<8} {loop:<5} {med[m, loop]:>15.1f} {min(ips):>6.1f}..{max(ips):<7.1f} "
                  f"{med_cpu[m, loop]:>10.1f} {statistics.median(r['faults'][loop]):>17.0f}")
    print()
    for m in results:
        ratio = med[m, "fit"] / med[m, "bare"]
        ratio_cpu = med_cpu[m, "fit"] / med_cpu[m, "bare"]
        extra_ms = 1e3 * BATCH * (1 / med[m, "fit"] - 1 / med[m, "bare"])
        print(f"fit / bare images/s, malloc {m}: {ratio:.3f} wall (fit overhead "
              f"{100 * (1 / ratio - 1):+.1f}% time, {extra_ms:+.2f} ms/step), {ratio_cpu:.3f} CPU time")
    for loop in ("bare", "fit"):
        print(f"tuned / default malloc, {loop}: {med['tuned', loop] / med['default', loop]:.3f} "
              f"(across processes: spread between runs applies)")


if __name__ == "__main__":
    main()
