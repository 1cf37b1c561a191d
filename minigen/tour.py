"""`minigen tour`: train every model family briefly on built-in data and write a report.

The tour is the project's main job and its smoke test on a new machine: each stage trains
one family through `minigen.train.fit`, draws samples (or reconstructions) into a PNG and
measures what can be measured in a few seconds. The report (`report.md`) collects the
figures in one table. A family whose module is not in this version of minigen is listed as
missing rather than failing the tour.

Budgets: about 10 minutes in all on a 2-core CPU by default; `--quick` (or MINIGEN_QUICK=1)
shrinks every stage to seconds, for tests.
"""

from __future__ import annotations

import json
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minigen
from minigen import data, plot, train
from minigen.course import budget


@dataclass
class StageResult:
    family: str
    dataset: str
    params: int = 0
    steps: int = 0
    train_s: float = 0.0
    sample_s_per_image: float | None = None
    metrics: dict = field(default_factory=dict)
    image: str | None = None
    note: str = ""


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _fit(model, ds, steps, out_dir, device, seed, **cfg):
    config = train.TrainConfig(steps=steps, device=device, seed=seed, out_dir=None,
                               progress=True, log_every=max(1, steps // 10), **cfg)
    t0 = time.perf_counter()
    result = train.fit(model, ds, config)
    return result, time.perf_counter() - t0


def _reconstruction_metrics(model, x) -> dict:
    from minigen import metrics

    model.eval()
    with torch.no_grad():
        x_hat = model.reconstruct(x).clamp(-1, 1)
    return {
        "PSNR (dB)": float(metrics.psnr(x_hat, x).mean()),
        "SSIM": float(metrics.ssim(x_hat, x).mean()),
    }, x_hat


def stage_autoencoder(out: Path, device, seed) -> StageResult:
    from minigen.autoencoder import AutoEncoder, AutoEncoderConfig

    ds = data.load_dataset("shapes")
    model = AutoEncoder(AutoEncoderConfig(in_channels=3, image_size=32, channels=32, latent_channels=8))
    steps = budget(600, quick=20)
    _, secs = _fit(model, ds, steps, out, device, seed, batch_size=64, lr=2e-3)
    x, _ = data.load_dataset("shapes", split="test").tensors(256)
    m, x_hat = _reconstruction_metrics(model.cpu(), x)
    path = out / "autoencoder_reconstructions.png"
    plot.save_grid(torch.cat([x[:16], x_hat[:16]]), path, nrow=16, scale=2)
    return StageResult("autoencoder", "shapes", _params(model), steps, secs, None, m, path.name,
                       "top row: test images; bottom row: reconstructions (not a generative model)")


# Each stage: (family name, function). Stages whose module is missing are reported as such.
STAGES = [
    ("autoencoder", stage_autoencoder),
]


def _environment() -> dict:
    return {
        "minigen": minigen.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_report(out: Path, results: list[StageResult], failures: dict, env: dict, total_s: float) -> Path:
    lines = ["# minigen tour", "",
             f"minigen {env['minigen']}, torch {env['torch']}, Python {env['python']}, "
             f"{env['machine']}, {env['threads']} threads, device {env['device']}, {env['date']}; "
             f"total {total_s / 60:.1f} min{' (quick mode)' if env['quick'] else ''}.", "",
             "| family | data | params | steps | train time | sampling / image | figures |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        figs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.metrics.items())
        samp = f"{r.sample_s_per_image * 1000:.1f} ms" if r.sample_s_per_image is not None else "—"
        lines.append(f"| {r.family} | {r.dataset} | {r.params / 1e6:.2f}M | {r.steps} | {r.train_s:.0f} s "
                     f"| {samp} | {figs} |")
    for fam, err in failures.items():
        lines.append(f"| {fam} | — | — | — | — | — | failed: {err} |")
    lines.append("")
    for r in results:
        if r.image:
            lines += [f"## {r.family}", "", r.note, "", f"![{r.family}]({r.image})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(
        {"environment": env, "total_s": total_s, "failures": failures,
         "results": [r.__dict__ for r in results]}, indent=2))
    return path


def run(out_dir="tour", quick: bool = False, device: str = "auto", seed: int = 0) -> int:
    import os

    if quick:
        os.environ["MINIGEN_QUICK"] = "1"
    from minigen.course import is_quick

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = train.select_device(device)
    env = _environment() | {"device": str(dev), "quick": is_quick()}
    results, failures = [], {}
    t0 = time.perf_counter()
    for family, stage in STAGES:
        print(f"\n== {family} ==", flush=True)
        try:
            results.append(stage(out, str(dev), seed))
        except ImportError as e:
            failures[family] = f"module missing ({e})"
        except Exception as e:  # one family failing must not hide the others' results
            traceback.print_exc()
            failures[family] = f"{type(e).__name__}: {e}"
        write_report(out, results, failures, env, time.perf_counter() - t0)
    path = write_report(out, results, failures, env, time.perf_counter() - t0)
    print(f"\nreport: {path}  ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 1 if failures else 0
