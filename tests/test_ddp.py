"""Distributed data parallel: 2 ranks (gloo, CPU) must train exactly like one process.

The tests launch this very file with ``python -m torch.distributed.run`` (torchrun): once as
one node with two processes (``--standalone --nproc_per_node 2``), once as two single-process
"nodes" on localhost that meet through a c10d rendezvous, exactly the command docs/scale.md
gives for several machines. Run as a script, it is the per-rank worker. Models here have no dropout, no BatchNorm and no
random noise, and their losses are means over the batch, so averaging the gradients of two
half-batches gives the gradient of the whole batch, up to float rounding.
"""

import faulthandler
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.train import fit, load_checkpoint

STEPS = 4  # trained by the two ranks
MORE_STEPS = 7  # then resumed in one process
AE_KW = dict(batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.5,  # lr independent of steps
             progress=False, log_every=1)
GAN_KW = dict(steps=3, batch_size=8, lr=1e-2, progress=False, log_every=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 6, 3, 2, 1)
        self.decoder = nn.ConvTranspose2d(6, 3, 4, 2, 1)
        self.seen = []  # (step, a fingerprint of each image in the micro-batch)

    def training_loss(self, batch, step):
        x, _ = batch
        self.seen.append((step, x[:, 0, 0, 0].clone()))
        return F.mse_loss(self.decoder(F.silu(self.encoder(x))), x)


class DetGAN(nn.Module):
    """Two optimizers; the 'generator' input is a fixed function of the batch (no RNG)."""

    def __init__(self):
        super().__init__()
        self.G = nn.Linear(2, 2)
        self.D = nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 1))

    def configure_optimizers(self, config):
        return {"g": torch.optim.Adam(self.G.parameters(), lr=config.lr),
                "d": torch.optim.Adam(self.D.parameters(), lr=config.lr)}

    def training_loss(self, x, step, name):
        fake = self.G(x.flip(1))
        if name == "g":
            return -self.D(fake).mean()
        return F.relu(1 - self.D(x)).mean() + F.relu(1 + self.D(fake.detach())).mean()


def make(cls):
    torch.manual_seed(0)
    return cls()


def data():
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(24, 3, 4, 4, generator=g), size=8, mode="bilinear").tanh()
    return torch.utils.data.TensorDataset(x, torch.zeros(24, dtype=torch.long))


def gan_data():
    return torch.randn(20, 2, generator=torch.Generator().manual_seed(2)) + 1


def worker(out: Path, mode: str = "both"):
    """One rank: train both models, save what this rank ended with.

    mode "resume": only continue the autoencoder run in out/run to MORE_STEPS.
    """
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where, instead of a timeout
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "resume":
        ae = fit(make(Net), data(), steps=MORE_STEPS, out_dir=str(out / "run"), **AE_KW)
        torch.save({"ae": ae.model.state_dict(), "ema": ae.ema.shadow, "history": ae.history,
                    "seen": ae.model.seen, "world": int(os.environ["WORLD_SIZE"])}, out / f"rank{rank}.pt")
        return
    ae = fit(make(Net), data(), steps=STEPS, grad_accum=2, out_dir=str(out / "run"), **AE_KW)
    gan = fit(make(DetGAN), gan_data(), **GAN_KW)
    torch.save({"ae": ae.model.state_dict(), "ema": ae.ema.shadow, "gan": gan.model.state_dict(),
                "history": ae.history, "seen": ae.model.seen}, out / f"rank{rank}.pt")


def assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{k} differs")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_under_torchrun_reports_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minigen", "train", "autoencoder", "--data", "digits", "--n-train", "64", "--steps", "2",
           "--batch-size", "8", "--set", "channels=8", "--device", "cpu", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training autoencoder") == 1, proc.stdout
    assert proc.stdout.count("done at step 2") == 1, proc.stdout
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_two_ranks_match_one_process(tmp_path):
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    torch.set_num_threads(1)
    one = fit(make(Net), data(), steps=STEPS, **AE_KW)
    gan = fit(make(DetGAN), gan_data(), **GAN_KW)

    # the ranks agree with each other exactly, and with one process on the whole batch
    for k in r0["ae"]:
        assert torch.equal(r0["ae"][k], r1["ae"][k]), k
    assert_close(r0["ae"], one.model.state_dict())
    assert_close(r0["ema"], one.ema.shadow)
    assert_close(r0["gan"], gan.model.state_dict())
    assert_close(r1["gan"], gan.model.state_dict())
    # logged losses are means over the ranks, i.e. over the global batch
    for a, b in zip(r0["history"], one.history):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    assert r0["history"] == r1["history"] or all(
        abs(a["loss"] - b["loss"]) < 1e-7 for a, b in zip(r0["history"], r1["history"]))
    # each rank got its own contiguous quarter-batches; together they are the global batch
    for step in range(STEPS):
        shards = [x for r in (r0, r1) for s, x in r["seen"] if s == step]
        assert len(shards) == 4 and all(len(x) == 2 for x in shards)
        whole = [x for s, x in one.model.seen if s == step]
        assert torch.equal(torch.cat(shards), whole[0])
    # the run trained: a comparison that could not fail would be worthless
    assert not torch.equal(r0["ae"]["encoder.weight"], make(Net).encoder.weight.detach())

    # rank 0 wrote the checkpoint, with one RNG state per rank
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt", expected_model=Net)
    assert ckpt["step"] == STEPS and len(ckpt["rng"]) == 2

    # resume the 2-rank run in a single process (another world size) and go on to MORE_STEPS:
    # the data order depends on (seed, step) only, so this equals an uninterrupted single run
    resumed = fit(make(Net), data(), steps=MORE_STEPS, out_dir=str(tmp_path / "run"), **AE_KW)
    straight = fit(make(Net), data(), steps=MORE_STEPS, **AE_KW)
    assert resumed.step == MORE_STEPS
    assert_close(resumed.model.state_dict(), straight.model.state_dict())
    assert_close(resumed.ema.shadow, straight.ema.shadow)


def test_two_nodes_c10d_rendezvous_resume_from_one_process(tmp_path):
    """Two torchrun "nodes" on localhost (--nnodes 2, c10d rendezvous) resume a 1-process run.

    Resuming on another world size (1 -> 2 here; 2 -> 1 above) continues exactly: batch_size is
    global and the data order depends on (seed, step) only.
    """
    first = fit(make(Net), data(), steps=STEPS, out_dir=str(tmp_path / "run"), **AE_KW)
    assert first.step == STEPS
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minigen-test",
           __file__, str(tmp_path), "resume"]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2

    straight = fit(make(Net), data(), steps=MORE_STEPS, **AE_KW)
    for k in r0["ae"]:
        assert torch.equal(r0["ae"][k], r1["ae"][k]), k
    assert_close(r0["ae"], straight.model.state_dict())
    assert_close(r0["ema"], straight.ema.shadow)
    # the resumed ranks split each global batch of the resumed steps between them
    for step in range(STEPS, MORE_STEPS):
        shards = [x for r in (r0, r1) for s, x in r["seen"] if s == step]
        assert len(shards) == 2 and torch.equal(torch.cat(shards), [x for s, x in straight.model.seen if s == step][0])
    assert not any(s < STEPS for r in (r0, r1) for s, _ in r["seen"])  # nothing was redone
    # one log (rank 0's): the first run's records, then the resumed ones, once each
    assert [h["step"] for h in r0["history"]] == list(range(1, MORE_STEPS + 1))
    for a, b in zip(r0["history"], straight.history):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt", expected_model=Net)
    assert ckpt["step"] == MORE_STEPS and len(ckpt["rng"]) == 2
    assert not list((tmp_path / "run").glob(".*tmp*"))  # atomic writes leave no temporary files


if __name__ == "__main__":
    worker(Path(sys.argv[1]), *sys.argv[2:])
