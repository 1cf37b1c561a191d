"""Candidate speed-ups of the U-Net training step, timed side by side in one process.

Each variant is the default diffusion U-Net (minigen.unet.UNetConfig()) with one change, trained
on the same random batch with AdamW; the variants and a 2048x2048 fp32 matmul are interleaved
round by round, so a change in machine load hits all of them alike. Prints ms/step, images/s,
the speed relative to the baseline and the fraction of the matmul rate (3 x forward FLOPs).

    python benchmarks/unet_variants.py                       # 1 thread, batch 32, 5 rounds
    python benchmarks/unet_variants.py --threads 2 --batch 64
    python benchmarks/unet_variants.py --profile             # where the baseline's time goes

Two variants are not speed-ups but upper bounds, to price a part of the step: "no 1x1
shortcuts" replaces every ResnetBlock's 1x1 nin_shortcut conv by a free channel slice/repeat,
"no GroupNorm" every GroupNorm by the identity. The time they save is what that part costs;
no faster implementation of it can save more.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minigen.nn import ResnetBlock
from minigen.runtime import tune_malloc
from minigen.unet import UNet, UNetConfig


class _MatchChannels(nn.Module):
    """A free stand-in for a 1x1 conv: the first `out` channels, repeating them if too few."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        reps = -(-self.out // x.shape[1])
        return (x.repeat(1, reps, 1, 1) if reps > 1 else x)[:, : self.out]


def _ablate(model, what):
    for module in list(model.modules()):
        if what == "shortcuts" and isinstance(module, ResnetBlock) and module.nin_shortcut is not None:
            module.nin_shortcut = _MatchChannels(module.out_channels)
        if what == "groupnorm":
            for name, child in list(module.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(module, name, nn.Identity())


def variant(x, t, noise, channels_last=False, fused=None, ablate=None):
    torch.manual_seed(0)
    model = UNet(UNetConfig(channels_last=channels_last))
    if ablate:
        _ablate(model, ablate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step():
        loss = F.mse_loss(model(x, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def matmul_gflops(n=2048, reps=3):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the baseline")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()  # as fit does
    torch.manual_seed(0)
    b = args.batch
    x, t, noise = torch.randn(b, 3, 32, 32), torch.randint(0, 1000, (b,)), torch.randn(b, 3, 32, 32)
    variants = {
        "baseline": variant(x, t, noise),
        "channels_last": variant(x, t, noise, channels_last=True),
        "fused AdamW (CPU)": variant(x, t, noise, fused=True),
        "no 1x1 shortcuts (bound)": variant(x, t, noise, ablate="shortcuts"),
        "no GroupNorm (bound)": variant(x, t, noise, ablate="groupnorm"),
    }
    model = variants["baseline"][0]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:8], t[:8])
    fwd = fc.get_total_flops() / 8
    for _, step in variants.values():  # warm-up: oneDNN primitives, allocator
        step(), step()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step = variants["baseline"][1]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(), step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    times = {k: [] for k in variants}
    mm = []
    for _ in range(args.rounds):
        mm.append(matmul_gflops())
        for k, (_, step) in variants.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    mm_med = statistics.median(mm)
    base = statistics.median(times["baseline"])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {b}, forward {fwd / 1e9:.3f} GFLOP/img, "
          f"matmul {mm_med:.0f} GFLOP/s (median of {args.rounds}), {time.strftime('%Y-%m-%d %H:%M')}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<26} {1e3 * med:7.0f} ms/step {b / med:7.1f} img/s  x{base / med:.3f} vs baseline  "
              f"{3 * fwd * b / med / 1e9 / mm_med:.0%} of matmul")


if __name__ == "__main__":
    main()
