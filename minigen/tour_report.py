"""The tour's report: one StageResult per trained (or shipped) model, written as report.md
(a table, the per-stage times and a gallery) and report.json (the same figures plus the
environment). minigen.tour runs the stages; this module only formats what they measured."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minigen

HONEST_LINE = ("These are minute-scale budgets: every model above that is not marked \"shipped reference\" "
               "trained for one to three minutes on this CPU, so its samples are rough and its figures say "
               "that the pipeline works, not how good the architecture can be. The \"shipped reference\" rows "
               "beside them are the checkpoints in `minigen/weights/reference/` (`python -m minigen.reference`, "
               "10-20 minutes of training each), sampled here the same way: what the same models do with "
               "more training. Lesson 08 compares them all.")


@dataclass
class StageResult:
    family: str
    dataset: str
    params: int = 0
    steps: int = 0
    train_s: float = 0.0                     # wall seconds in minigen.train.fit
    train_cpu_s: float = 0.0                 # CPU seconds (all threads) in fit
    sample_s_per_image: float | None = None  # wall seconds per generated image
    metrics: dict = field(default_factory=dict)
    image: str | None = None
    note: str = ""
    reference: bool = False                  # a shipped reference checkpoint, not trained here



def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import numpy

    return {
        "minigen": minigen.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


_TABLE_KEYS = ("FD", "FD real-vs-real", "n", "precision", "recall", "class accuracy", "caption accuracy",
               "PSNR (dB)")


def row(r: StageResult) -> str:
    m = r.metrics
    fd = "—"
    if "FD" in m:
        fd = f"{m['FD']:.1f} (real {m['FD real-vs-real']:.1f}, n={m['n']})"
    pr = f"{m['precision']:.2f} / {m['recall']:.2f}" if "precision" in m else "—"
    acc = "—"
    if "class accuracy" in m:
        acc = f"class {m['class accuracy']:.0%}"
    elif "caption accuracy" in m:
        acc = f"caption {m['caption accuracy']:.0%}"
    psnr = f"{m['PSNR (dB)']:.1f}" if "PSNR (dB)" in m else "—"
    other = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k not in _TABLE_KEYS)
    train_t = f"{r.train_s:.0f} s (CPU {r.train_cpu_s:.0f} s)" if r.steps else "—"
    if r.reference:
        train_t = f"shipped ({r.train_s / 60:.0f} min offline)"
    samp = "—"
    if r.sample_s_per_image is not None:
        t = r.sample_s_per_image
        samp = f"{t * 1000:.0f} ms" if t < 1 else f"{t:.1f} s"
    params = f"{r.params / 1e6:.2f}M"
    return (f"| {r.family} | {r.dataset} | {params} | {r.steps or '—'} | {train_t} | {samp} | {fd} | {pr} "
            f"| {acc} | {psnr} | {other or '—'} |")


def write_report(out: Path, results: list[StageResult], failures: dict, env: dict, total_s: float,
                 stages: list | None = None, baselines: dict | None = None) -> Path:
    """Write report.md and report.json into out (report.md atomically); returns report.md's path.
    baselines: (dataset, n) -> real-vs-real (precision, recall), for the notes."""
    stages, baselines = stages or [], baselines or {}
    total_cpu = sum(s["cpu_s"] for s in stages)
    lines = ["# minigen tour", "",
             f"minigen {env['minigen']}, torch {env['torch']}, numpy {env['numpy']}, Python {env['python']}; "
             f"{env['cpu']} ({env['cpu_count']} logical CPUs, torch uses {env['threads']} threads), "
             f"{env['os']}, device {env['device']}; {env['date']}.", "",
             f"Total {total_s / 60:.1f} min wall, {total_cpu / 60:.1f} min CPU"
             f"{' (quick mode: seconds per stage, figures meaningless)' if env['quick'] else ''}.", "",
             HONEST_LINE, "",
             "| family | data | params | train steps | train time | sampling / image | FD (judge) "
             "| precision / recall | accuracy | PSNR (dB) | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    for fam, err in failures.items():
        lines.append(f"| {fam} | — | — | — | — | — | — | — | — | — | failed: {err} |")
    lines.append("")
    notes = ["FD: Frechet distance in the offline judge's feature space to the test split; \"real\" is "
             "the FD of as many training images, the floor at that n. Precision / recall (k = 3) against "
             "real training images in the same space"]
    if baselines:
        notes[0] += "; real test images score " + ", ".join(
            f"{p:.2f} / {r:.2f} ({name}, n={n})" for (name, n), (p, r) in sorted(baselines.items()))
    notes[0] += ". Accuracy: how often the judge sees the class (or caption) the sample was asked for."
    lines += notes + [""]
    if stages:
        lines += ["| stage | wall | CPU | status |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['wall_s']:.0f} s | {s['cpu_s']:.0f} s | {s['status']} |" for s in stages]
        lines.append("")
    lines += ["## Gallery", ""]
    for r in results:
        if r.image:
            lines += [f"### {r.family}", "", r.note, "", f"![{r.family}]({r.image})", ""]
    path = out / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    (out / "report.json").write_text(json.dumps(
        {"environment": env, "total_s": total_s, "total_cpu_s": total_cpu, "stages": stages,
         "failures": failures, "results": [r.__dict__ for r in results],
         "real_precision_recall": {f"{k[0]} n={k[1]}": v for k, v in baselines.items()},
         "note": HONEST_LINE}, indent=2))
    return path
