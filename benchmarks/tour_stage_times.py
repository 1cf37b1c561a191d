"""Wall and CPU seconds (one thread) of the tour's flow and latent-diffusion stages and of the
shipped-reference rows, in default (non-quick) mode, without running the whole tour.

    OMP_NUM_THREADS=1 python benchmarks/tour_stage_times.py /tmp/tour_stages

Writes times.json and the report rows to stdout (the PNGs into the folder).
"""
import json
import sys

from pathlib import Path
import torch

from minigen import evaluate, tour, tour_report

torch.set_num_threads(1)

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ctx = tour.Context(out, "cpu", 0)
times = {}
def timed(name, fn):
    c = tour.Clock(); r = fn(); times[name] = dict(wall_s=c.wall, cpu_s=c.cpu)
    print(name, times[name], flush=True)
    return r
res = []
res += timed("flow matching stage (incl. encoding 8000 latents, reference DDPM row)", lambda: tour.stage_flow(ctx))
res += timed("latent diffusion stage (incl. reference LDM row)", lambda: tour.stage_latent_diffusion(ctx))
x_test, _ = tour._test_set("shapes", 500).tensors()
res += timed("reference rows: VQ-VAE + VQGAN reconstructions", lambda: tour._reference_reconstructions("VQ-VAE", "vqvae", x_test, ctx) + tour._reference_reconstructions("VQGAN", "vqgan", x_test, ctx))
def vae_ref():
    ref, entry = tour._reference("vae")
    x, per = tour._timed(ref.sample_images, 500)
    return [tour._reference_result("VAE", "vae", entry, per, tour._sample_quality("shapes", x), "-", "")]
res += timed("reference row: VAE", vae_ref)
def prior_refs():
    y = torch.arange(90) % 18
    rs = []
    for tag in ("vqvae", "vqgan"):
        ref, entry = tour._reference(f"{tag}_prior"); ae, _ = tour._reference(tag)
        g = torch.Generator().manual_seed(0)
        x, per = tour._timed(lambda k: evaluate.sample_prior(ref, ae, y[:k], top_k=32, generator=g), 90)
        rs.append(tour._reference_result(tag, f"{tag}_prior", entry, per, tour._sample_quality("shapes", x, y), "-", ""))
    return rs
res += timed("reference rows: both GPT priors", prior_refs)
(out / "times.json").write_text(json.dumps(dict(times=times, results=[r.__dict__ for r in res]), indent=1, default=str))
for r in res:
    print(tour_report.row(r))
