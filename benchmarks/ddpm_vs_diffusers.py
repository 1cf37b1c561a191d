"""minigen's pixel DDPM against diffusers, part by part, on `shapes`.

Trains a class-conditional denoiser on `shapes` with minigen.train.fit and minigen's
training loss -- either minigen's UNet or diffusers' UNet2DModel of a similar size
(wrapped to the same call signature) -- and scores its samples with minigen's DDIM sampler
and with diffusers' DDIMScheduler (same trailing spacing, same clipping, same guidance), so
a difference can be pinned to the network or to the sampler. Printed per sampler:

  * lap   mean |Laplacian| of the samples (high-frequency energy; real images ~0.05);
  * acc   class accuracy of the shipped judge (minigen.metrics.conditional_accuracy);
  * fd    FD-shapes (minigen.judge.fd_score) against the real test statistics at the same n.

diffusers is NOT a dependency of minigen: run this from a separate virtual environment,

    python -m venv /work/venv_ref && /work/venv_ref/bin/pip install torch numpy diffusers
    /work/venv_ref/bin/pip install -e . --no-deps
    OMP_NUM_THREADS=1 /work/venv_ref/bin/python benchmarks/ddpm_vs_diffusers.py --unet minigen --steps 600
    OMP_NUM_THREADS=1 /work/venv_ref/bin/python benchmarks/ddpm_vs_diffusers.py --unet diffusers --steps 600
    ... --checkpoint runs/ddpm/checkpoint.pt   # score a trained minigen checkpoint ('model' weights)

Without diffusers installed only `--unet minigen --samplers minigen` works.
"""

import argparse
import json
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen import diffusion
from minigen.data import load_dataset
from minigen.judge import fd_score, load_judge
from minigen.metrics import conditional_accuracy
from minigen.train import fit, load_checkpoint


def laplacian_energy(x):
    """Mean |4-neighbour Laplacian| per pixel and channel: flat shapes have little of it,
    residual sampling noise a lot."""
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return float(F.conv2d(x.float(), k, groups=x.shape[1]).abs().mean())


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind minigen's denoiser signature model(x, t, y=None).
    Class id num_classes is the null class of classifier-free guidance, as in minigen."""

    def __init__(self, num_classes, block_out_channels=(16, 32, 64), norm_num_groups=8):
        super().__init__()
        from diffusers import UNet2DModel

        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups,
            down_block_types=("DownBlock2D",) * len(block_out_channels),
            up_block_types=("UpBlock2D",) * len(block_out_channels),
            num_class_embeds=num_classes + 1,
        )

    def forward(self, x, t, y=None):
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y).sample


def build_model(kind, num_classes, channels=16, norm_groups=8, prediction_type="epsilon", beta_schedule="linear"):
    overrides = dict(channels=channels, channel_mult=(1, 2, 4), layers_per_block=1, attention_resolutions=())
    dconf = dict(prediction_type=prediction_type, beta_schedule=beta_schedule)
    if kind == "minigen":
        return diffusion.build({**overrides, **dconf}, image_shape=(3, 32, 32), num_classes=num_classes)
    net = DiffusersUNet(num_classes, (channels, 2 * channels, 4 * channels), norm_groups)
    net.config = diffusion.UNetConfig(**overrides, num_classes=num_classes)  # GaussianDiffusion reads num_classes
    return diffusion.GaussianDiffusion(net, diffusion.DiffusionConfig(image_shape=(3, 32, 32), **dconf))


def load_minigen_checkpoint(path):
    ck = load_checkpoint(path)
    model = diffusion.GaussianDiffusion(config=diffusion.DiffusionConfig(**ck["model_config"]))
    state = {k: v for k, v in ck["model"].items() if k not in ("betas", "alphas_cumprod")}
    model.load_state_dict(state, strict=False)
    return model


@torch.no_grad()
def sample_diffusers(model, y, guidance, steps, generator):
    """DDIM (eta 0) with diffusers' DDIMScheduler, configured like minigen's defaults."""
    from diffusers import DDIMScheduler

    c = model.config
    sched = DDIMScheduler(num_train_timesteps=model.num_timesteps,
                          beta_schedule={"cosine": "squaredcos_cap_v2"}.get(c.beta_schedule, c.beta_schedule),
                          clip_sample=c.clip_denoised, set_alpha_to_one=True, timestep_spacing="trailing",
                          prediction_type={"v": "v_prediction", "x0": "sample"}.get(c.prediction_type, "epsilon"))
    sched.set_timesteps(steps)
    x = torch.randn((len(y), *model.config.image_shape), generator=generator)
    fn = model.denoiser(y, guidance_scale=guidance)
    for t in sched.timesteps:
        eps = fn(x, torch.full((len(y),), int(t), dtype=torch.long))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x


def evaluate(model, judge, samplers, n, guidance, steps, seed, eta=0.0):
    model.eval()
    y = torch.arange(n) % model.num_classes
    rows = {}
    for name in samplers:
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if name == "minigen":
            x = model.sample(n, y=y, guidance_scale=guidance, steps=steps, sampler="ddim", eta=eta, generator=g)
        else:
            if eta:
                continue  # the diffusers loop here is deterministic DDIM only
            x = sample_diffusers(model, y, guidance, steps, g)
        rows[name] = dict(lap=laplacian_energy(x), acc=conditional_accuracy(judge, x, y),
                          fd=fd_score("shapes", x), s=time.perf_counter() - t0)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", choices=("minigen", "diffusers"), default="minigen")
    p.add_argument("--checkpoint", default=None, help="score this minigen checkpoint instead of training")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups of the diffusers UNet")
    p.add_argument("--samplers", nargs="+", default=["minigen", "diffusers"])
    p.add_argument("--n", type=int, default=144)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--prediction-type", choices=("epsilon", "v", "x0"), default="epsilon")
    p.add_argument("--beta-schedule", choices=("linear", "scaled_linear", "cosine"), default="linear")
    p.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM eta values (minigen sampler)")
    p.add_argument("--load", default=None, help="weights saved by --save (same --unet and options)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="save the trained weights here")
    args = p.parse_args()

    judge = load_judge("shapes")
    test_x, test_y = load_dataset("shapes", "test", n=args.n).tensors()
    print(f"real test images: lap {laplacian_energy(test_x):.4f} acc {conditional_accuracy(judge, test_x, test_y):.3f} "
          f"fd {fd_score('shapes', test_x):.2f} (n={args.n})", flush=True)
    if args.checkpoint:
        model, info = load_minigen_checkpoint(args.checkpoint), dict(checkpoint=args.checkpoint)
    elif args.load:
        model = build_model(args.unet, 18, args.channels, args.norm_groups, args.prediction_type, args.beta_schedule)
        model.load_state_dict(torch.load(args.load), strict=False)
        info = dict(loaded=args.load)
    else:
        data = load_dataset("shapes", n=20000)
        model = build_model(args.unet, len(data.classes), args.channels, args.norm_groups,
                            args.prediction_type, args.beta_schedule)
        params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(model, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=min(100, args.steps // 5), lr_schedule="cosine", seed=args.seed,
                      out_dir=tmp, progress=False, log_every=max(1, args.steps // 10))
        info = dict(unet=args.unet, params=params, steps=args.steps, train_s=round(time.perf_counter() - t0),
                    final_loss=res.history[-1]["loss"])
        if args.save:
            torch.save(model.state_dict(), args.save)
    print(json.dumps(info), flush=True)
    for w in args.guidance:
        for eta in args.eta:
            for name, r in evaluate(model, judge, args.samplers, args.n, w, args.sample_steps, args.seed, eta).items():
                print(f"guidance {w:g} eta {eta:g} sampler {name:9s} lap {r['lap']:.4f} acc {r['acc']:.3f} "
                      f"fd {r['fd']:.2f} ({r['s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
