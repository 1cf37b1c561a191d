"""VQ-VAE vs VQGAN on `shapes` after the same number of training steps (a CPU-sized run).

    python benchmarks/vqgan_vs_vqvae.py [--steps 240] [--batch-size 16] [--disc-start 120]
                                        [--lr 5e-4] [--n-test 1000] [--threads 1] [--no-gan-ablation]

Trains, with minigen.train.fit and the same steps / batch / lr / seed:

  vqvae      minigen.vq.VQVAE with its default config (MSE reconstruction loss)
  vqgan      minigen.vqgan.VQGAN with its default config (L1 + judge perceptual loss + PatchGAN
             from step --disc-start, adaptive weight)
  vqgan-nogan  the same VQGAN with the discriminator never switched on (unless --no-gan-ablation)

and reports on the first --n-test images of the test split: PSNR and SSIM (minigen.metrics),
the per-image judge feature distance (minigen.perceptual.PerceptualLoss, lower = closer; the
VQGAN *trains* on this distance, so it is not a neutral referee), FD-shapes between the set of
reconstructions and the set of originals (judge penultimate features, minigen.judge), the
codebook perplexity on the test images, and the wall time per step.

Pixel metrics reward blur, so a GAN-trained decoder can lose PSNR while looking sharper;
read the numbers together with the image grid written to --out (originals, VQ-VAE, VQGAN).
A few hundred steps is far from convergence for either model: this is a smoke-level
comparison, not a result about the methods.
"""

from __future__ import annotations

import argparse
import time

import torch

from minigen import metrics
from minigen.data import load_dataset
from minigen.judge import extract_features, load_judge
from minigen.perceptual import PerceptualLoss
from minigen.train import fit
from minigen.vq import VQVAE, VQVAEConfig
from minigen.vqgan import VQGAN, VQGANConfig


@torch.no_grad()
def evaluate(model, x, judge, perceptual, batch_size=250):
    model.eval()
    recs, idx = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        z_q, ind = model.encode(xb)
        recs.append(model.decode(z_q).clamp(-1, 1))
        idx.append(ind)
    r = torch.cat(recs)
    usage = metrics.codebook_usage(torch.cat(idx), model.quantize.num_codes)
    f_real, f_rec = extract_features(judge, x), extract_features(judge, r)
    dist = torch.cat([perceptual(x[i:i + batch_size], r[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return r, dict(psnr=metrics.psnr(r, x).mean().item(), ssim=metrics.ssim(r, x).mean().item(),
                   feat_dist=dist.mean().item(), fd=metrics.frechet_distance(f_rec, f_real),
                   perplexity=float(usage.perplexity))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--disc-start", type=int, default=120)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gan-ablation", action="store_true", help="skip the VQGAN without discriminator")
    p.add_argument("--out", default="vqgan_vs_vqvae.png", help="image grid: originals, VQ-VAE, VQGAN rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # tiny models: more threads mostly wait on each other
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); steps {args.steps}, "
          f"batch {args.batch_size}, lr {args.lr}, disc_start {args.disc_start}, seed {args.seed}")

    train = load_dataset("shapes", split="train")
    x_test, _ = load_dataset("shapes", split="test", n=args.n_test).tensors()
    judge = load_judge("shapes")
    perceptual = PerceptualLoss(3)

    runs = {"vqvae": lambda: VQVAE(VQVAEConfig()),
            "vqgan": lambda: VQGAN(VQGANConfig(disc_start=args.disc_start))}
    if not args.no_gan_ablation:
        runs["vqgan-nogan"] = lambda: VQGAN(VQGANConfig(disc_start=10 ** 9))

    rows, grids = [], {}
    for name, make in runs.items():
        torch.manual_seed(args.seed)
        model = make()
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        fit(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            progress=False, log_every=0, device="cpu")
        sec = (time.perf_counter() - t0) / max(args.steps, 1)
        r, m = evaluate(model, x_test, judge, perceptual)
        grids[name] = r[:8]
        rows.append((name, n_params, sec, m))
        print(f"  {name}: done in {sec * args.steps:.0f} s", flush=True)

    print(f"\nreconstructions of the first {args.n_test} shapes test images "
          f"(PSNR/SSIM higher = better; feature distance, FD lower = better)")
    print(f"{'model':<12} {'trainable':>10} {'s/step':>7} {'PSNR dB':>8} {'SSIM':>6} {'feat dist':>9} "
          f"{'FD-shapes':>9} {'perplexity':>10}")
    for name, n_params, sec, m in rows:
        print(f"{name:<12} {n_params:>10,} {sec:>7.2f} {m['psnr']:>8.2f} {m['ssim']:>6.3f} {m['feat_dist']:>9.4f} "
              f"{m['fd']:>9.3f} {m['perplexity']:>10.1f}")
    print("(trainable counts the discriminator for the VQGANs; the frozen judge is not counted)")

    try:
        from minigen.plot import save_grid

        save_grid(torch.cat([x_test[:8], *grids.values()]), args.out, nrow=8)
        print(f"grid (rows: original, {', '.join(grids)}) -> {args.out}")
    except Exception as e:  # plotting is a convenience, never the point of the benchmark
        print(f"(no grid written: {e})")


if __name__ == "__main__":
    main()
