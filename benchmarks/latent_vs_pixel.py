"""Why latent diffusion: the same denoising U-Net on 3x32x32 pixels vs on 4x8x8 VQGAN latents.

Times, side by side in one run (interleaved rounds, median of --repeats), one training step
(forward + MSE + backward + AdamW) at batch --batch, and counts forward GFLOP/image with
torch.utils.flop_counter, for

  pixel  : minigen.ldm's default U-Net (cross-attention to a 12-token text context) on 3x32x32
  latent : the same U-Net config on 4x8x8 latents (what minigen.ldm trains), text encoder included
  ddpm   : minigen.diffusion's default pixel U-Net (32, 64, 64), unconditional, for reference

and the one-off cost of the frozen VQGAN: encoder GFLOP/image (paid once per training image,
cached by encode_dataset) and decoder GFLOP/image (once per sample, not per step).

    OMP_NUM_THREADS=2 python benchmarks/latent_vs_pixel.py              # ~2-3 min on 2 cores
    python benchmarks/latent_vs_pixel.py --threads 1 --repeats 3 --batch 32

Like minigen.train.fit it raises glibc's malloc thresholds first (see performance-notes.md).
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minigen
from minigen import ldm, runtime
from minigen.text import TextEncoder, TextEncoderConfig
from minigen.unet import UNet, UNetConfig
from minigen.vqgan import VQGAN, VQGANConfig

VOCAB, L = 19, 12  # the shapes captions' vocabulary (+ <pad>, <unk>), tokens per prompt


def make(kind):
    """(networks to train, input shape) for one contender."""
    torch.manual_seed(0)
    if kind == "ddpm":
        return [UNet(UNetConfig())], (3, 32, 32), False
    text = TextEncoder(TextEncoderConfig(VOCAB, L, **ldm.DEFAULT_TEXT))
    c = 3 if kind == "pixel" else 4
    unet = UNet(UNetConfig(**{**ldm.DEFAULT_UNET, "in_channels": c, "context_dim": ldm.DEFAULT_TEXT["n_embd"]}))
    return [unet, text], ((3, 32, 32) if kind == "pixel" else (4, 8, 8)), True


def forward(nets, x, t, tokens, text):
    ctx = nets[1](tokens) if text else None
    return nets[0](x, t, context=ctx) if text else nets[0](x, t)


def gflops(nets, shape, text, batch=4):
    x, t = torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))
    tokens = torch.randint(0, VOCAB, (batch, L))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        forward(nets, x, t, tokens, text)
    return fc.get_total_flops() / batch / 1e9


def stepper(nets, shape, text, batch):
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t = torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))
    tokens = torch.randint(0, VOCAB, (batch, L))
    noise = torch.randn_like(x)

    def step():
        loss = F.mse_loss(forward(nets, x, t, tokens, text), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, oneDNN primitive caches
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--steps", type=int, default=2, help="training steps per round and contender")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--default-malloc", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        runtime.tune_malloc()
    print(f"# latent vs pixel diffusion, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, minigen {minigen.__version__}, batch {args.batch}, "
          f"malloc {'default' if args.default_malloc else 'tuned'}; median of {args.repeats} rounds x {args.steps} steps")
    kinds = ["pixel", "latent", "ddpm"]
    setups, flops, params, times = {}, {}, {}, {k: [] for k in kinds}
    for k in kinds:
        nets, shape, text = make(k)
        flops[k] = gflops(nets, shape, text)
        params[k] = sum(p.numel() for n in nets for p in n.parameters())
        setups[k] = stepper(nets, shape, text, args.batch)
    for _ in range(args.repeats):  # interleaved, so load changes hit every contender alike
        for k in kinds:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                setups[k]()
            times[k].append((time.perf_counter() - t0) / args.steps)

    print(f"\n{'model':<8} {'input':>9} {'params':>8} {'fwd GFLOP/img':>14} {'step ms':>9} {'train img/s':>12}")
    for k in kinds:
        shape = "3x32x32" if k != "latent" else "4x8x8"
        ms = statistics.median(times[k]) * 1e3
        print(f"{k:<8} {shape:>9} {params[k] / 1e6:>7.2f}M {flops[k]:>14.3f} {ms:>9.1f} {args.batch / ms * 1e3:>12.1f}")
    r = statistics.median(times["pixel"]) / statistics.median(times["latent"])
    print(f"\nsame U-Net config: latent is {r:.1f}x faster per step, {flops['pixel'] / flops['latent']:.1f}x fewer FLOPs")

    vq = VQGAN(VQGANConfig(ch=16, code_dim=4, num_codes=256, perceptual="none", perceptual_weight=0)).eval()
    x = torch.randn(4, 3, 32, 32).clamp(-1, 1)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z = vq.quant_conv(vq.encoder(x))
    enc = fc.get_total_flops() / 4 / 1e9
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vq.decode(vq.quantize(z)[0])
    dec = fc.get_total_flops() / 4 / 1e9
    print(f"frozen VQGAN (ch 16, 4x8x8 latent): encoder {enc:.3f} GFLOP/img once per training image (cached), "
          f"decoder {dec:.3f} GFLOP/img once per sample")


if __name__ == "__main__":
    main()
