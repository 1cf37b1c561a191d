"""U-Net training and sampling throughput on this machine, against its fp32 matmul rate.

Prints, for minigen's default diffusion U-Net on 3x32x32 images: parameters, forward
GFLOP/image (torch.utils.flop_counter), training images/s at batch 32 and 64 (forward + MSE
+ backward + AdamW), sampler network evaluations/s at batch 64, and the achieved GFLOP/s of
a training step (3x the forward FLOPs) as a fraction of a 2048x2048 fp32 matmul measured in
the same run, interleaved with the model timings. Medians over --repeats rounds.

    python benchmarks/unet_throughput.py                  # ~2 minutes on 2 cores
    python benchmarks/unet_throughput.py --threads 1 --repeats 3
    python benchmarks/unet_throughput.py --threads 1 --compile    # + a torch.compile'd step

With --compile the same model is also trained through torch.compile (inductor; it fuses the
GroupNorm, SiLU and scale-shift elementwise work that runs between the convolutions), timed
in the same interleaved rounds; compilation time is printed separately.

minigen.train.fit raises glibc's malloc thresholds (see performance-notes: at batch 64 the
default allocator maps and unmaps activation buffers every step); this script does the same
so it times what fit runs. Pass --default-malloc to time the allocator as it comes.
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minigen
from minigen import runtime
from minigen.unet import UNet, UNetConfig


def matmul_gflops(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def forward_gflops(model, batch=8):
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as fc:
        model(x, t)
    return fc.get_total_flops() / batch / 1e9


def train_img_per_s(model, opt, batch, steps=5, forward=None):
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x)
    forward = model if forward is None else forward

    def step():
        loss = F.mse_loss(forward(x, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, oneDNN primitive caches)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def evals_per_s(model, batch=64, steps=5):
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    model(x, t)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x, t)
    return steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--default-malloc", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd training step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.default_malloc:
        runtime.tune_malloc()
    model = UNet(UNetConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = forward_gflops(model)
    rows = {"matmul": [], "train32": [], "train64": [], "sample64": []}
    compiled, compile_s = None, None
    if args.compile:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        train_img_per_s(model, opt, 64, steps=1, forward=compiled)  # compiles forward and backward
        compile_s = time.perf_counter() - t0
        rows["train64_compiled"] = []
    for _ in range(args.repeats):  # interleaved so load changes hit every figure alike
        rows["matmul"].append(matmul_gflops())
        rows["train32"].append(train_img_per_s(model, opt, 32))
        rows["train64"].append(train_img_per_s(model, opt, 64))
        if compiled is not None:
            rows["train64_compiled"].append(train_img_per_s(model, opt, 64, forward=compiled))
        rows["sample64"].append(evals_per_s(model))
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "minigen": minigen.__version__, "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "threads": args.threads,
        "malloc": "default" if args.default_malloc else "tuned (as in fit)",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_gflop_per_img": fwd, "matmul_gflops": med["matmul"],
        "train_img_s_b32": med["train32"], "train_img_s_b64": med["train64"],
        "sampler_evals_s_b64": med["sample64"],
        # a training step costs ~3x the forward FLOPs (forward + backward for inputs and weights)
        "train_gflops_b64": 3 * fwd * med["train64"],
    }
    out["train_fraction_of_matmul_b64"] = out["train_gflops_b64"] / med["matmul"]
    if compiled is not None:
        out["compile_s"] = compile_s
        out["train_img_s_b64_compiled"] = med["train64_compiled"]
        out["train_fraction_of_matmul_b64_compiled"] = 3 * fwd * med["train64_compiled"] / med["matmul"]
    print(f"minigen {out['minigen']}, torch {out['torch']}, {out['machine']}, {args.threads} threads, "
          f"malloc {out['malloc']}, {out['date']}")
    print(f"U-Net {out['params_M']:.2f}M params, forward {fwd:.3f} GFLOP/img")
    print(f"fp32 matmul 2048^2: {med['matmul']:.0f} GFLOP/s (median of {args.repeats})")
    print(f"train img/s: batch 32 {med['train32']:.1f}, batch 64 {med['train64']:.1f} "
          f"-> {out['train_gflops_b64']:.0f} GFLOP/s = {out['train_fraction_of_matmul_b64']:.0%} of matmul")
    if compiled is not None:
        print(f"torch.compile: {compile_s:.0f} s to compile; train img/s batch 64 {med['train64_compiled']:.1f} "
              f"= {out['train_fraction_of_matmul_b64_compiled']:.0%} of matmul "
              f"({med['train64_compiled'] / med['train64']:.2f}x eager)")
    print(f"sampler: {med['sample64']:.2f} network evaluations/s at batch 64")
    print("spread (min..max): " + ", ".join(f"{k} {min(v):.1f}..{max(v):.1f}" for k, v in rows.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
