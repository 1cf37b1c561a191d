"""minigen's U-Net against diffusers' UNet2DModel of the same shape: training speed, side by side.

performance-notes.md quotes diffusers' UNet2DModel as the bar for the "≥ 90% of the fp32
matmul rate" target. This script measures both networks in one process, interleaved with
the same 2048² matmul, so the ratio between them (and each one's fraction of the matmul
rate) comes from one run on one machine state. Same counting as unet_throughput.py: a
training step is 3x the forward FLOPs (torch.utils.flop_counter), batch 64, MSE + backward
+ AdamW, glibc malloc thresholds raised as in minigen.train.fit.

Two shapes, the two diffusers rows of performance-notes.md:

  small  (32, 64, 64), 2 ResNet layers per level, attention at 8x8  (minigen's default UNetConfig)
  wide   (64, 128, 128), 1 ResNet layer per level, no attention but the middle block's

diffusers is NOT a dependency of minigen: run this from a separate virtual environment,

    python -m venv /tmp/venv_ref && /tmp/venv_ref/bin/pip install torch==2.13.0 diffusers==0.31.0
    /tmp/venv_ref/bin/pip install -e . --no-deps
    /tmp/venv_ref/bin/python benchmarks/unet_vs_diffusers_speed.py --threads 2 --repeats 5
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn

import minigen
from minigen import runtime
from minigen.unet import UNet, UNetConfig
from unet_throughput import forward_gflops, matmul_gflops, train_img_per_s  # sibling script

SHAPES = {
    "small": dict(channels=(32, 64, 64), layers=2, attention_at_8x8=True),
    "wide": dict(channels=(64, 128, 128), layers=1, attention_at_8x8=False),
}


class DiffusersUNet(nn.Module):
    """UNet2DModel behind minigen's call signature model(x, t) -> tensor."""

    def __init__(self, channels, layers, attention_at_8x8):
        super().__init__()
        from diffusers import UNet2DModel

        down = ["DownBlock2D"] * len(channels)
        if attention_at_8x8:  # the last (8x8) level of a 32x32 input
            down[-1] = "AttnDownBlock2D"
        up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
        self.unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=layers,
            block_out_channels=tuple(channels), down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=32,
        )

    def forward(self, x, t):
        return self.unet(x, t).sample


def minigen_unet(channels, layers, attention_at_8x8):
    base = channels[0]
    return UNet(UNetConfig(
        channels=base, channel_mult=tuple(c // base for c in channels), layers_per_block=layers,
        attention_resolutions=(2 ** (len(channels) - 1),) if attention_at_8x8 else (),
    ))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runtime.tune_malloc()
    import diffusers

    models = {}
    for shape in args.shapes:
        for lib, build in (("minigen", minigen_unet), ("diffusers", DiffusersUNet)):
            m = build(**SHAPES[shape])
            models[f"{shape}/{lib}"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), forward_gflops(m))
    rows = {"matmul": [], **{k: [] for k in models}}
    for _ in range(args.repeats):  # interleaved: a change of load hits every figure alike
        rows["matmul"].append(matmul_gflops())
        for k, (m, opt, _) in models.items():
            rows[k].append(train_img_per_s(m, opt, 64, steps=3))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"minigen {minigen.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"fp32 matmul 2048^2: {med['matmul']:.0f} GFLOP/s (median of {args.repeats}, "
          f"range {min(rows['matmul']):.0f}..{max(rows['matmul']):.0f})")
    print("| model | params | forward GFLOP/img | train img/s, batch 64 | GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|")
    for k, (m, _, fwd) in models.items():
        gflops = 3 * fwd * med[k]
        print(f"| {k} | {sum(q.numel() for q in m.parameters()) / 1e6:.2f}M | {fwd:.3f} | "
              f"{med[k]:.1f} ({min(rows[k]):.1f}..{max(rows[k]):.1f}) | {gflops:.0f} | {gflops / med['matmul']:.0%} |")
    for shape in args.shapes:
        print(f"{shape}: minigen / diffusers images/s = {med[f'{shape}/minigen'] / med[f'{shape}/diffusers']:.2f}")


if __name__ == "__main__":
    main()
