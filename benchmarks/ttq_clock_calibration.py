"""How much the machine's load inflates the CPU clock of benchmarks/time_to_quality.py.

CPU time is not load-free: on a 2-core machine shared with other jobs (SMT siblings, caches,
memory bandwidth) one training step costs more CPU seconds than on an idle machine. This
prints the CPU (and wall) seconds per training step, batch 64, one thread, of the two
recipes whose 2026-12-04 runs were clocked on an idle machine (pixel DDPM 0.52 s/step wall,
latent diffusion 0.33 s/step, docs/scale.md): the ratio is the inflation factor of a CPU
clock read under today's load. Run it beside the time_to_quality runs it calibrates.

    OMP_NUM_THREADS=1 python benchmarks/ttq_clock_calibration.py
"""
import time

import torch

torch.set_num_threads(1)
from minigen import data, diffusion, ldm, reference
ds = data.load_dataset("shapes", split="train", n=2048)
def per_step(model, batches, n=20, warm=3):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for i in range(n + warm):
        if i == warm: c0, w0 = time.process_time(), time.perf_counter()
        loss = model.training_loss(batches(i))["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n
x, y = ds.tensors()
spec = reference.SPECS["ddpm"]
m = diffusion.build(spec["model"], ds.image_shape, len(ds.classes))
print("pixel DDPM (reference recipe) cpu/wall s per step:", per_step(m, lambda i: (x[i*64 % 1984:][:64], y[i*64 % 1984:][:64])), flush=True)
lm = ldm.build({"autoencoder": reference.load("vqgan")}, ds.image_shape, dataset=ds)
lat = lm.encode_dataset(ds, n=1024)
z, t = lat.tensors
print("text LDM (defaults) cpu/wall s per step:", per_step(lm, lambda i: (z[i*64 % 960:][:64], t[i*64 % 960:][:64])), flush=True)
