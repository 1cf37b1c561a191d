"""The one training loop every model in the course uses.

A model plugs in by defining a loss; the loop does everything else:

    class MyModel(nn.Module):
        def training_loss(self, batch, step):          # -> Tensor or dict(loss=..., **metrics)
            x, _ = batch
            return F.mse_loss(self(x), x)

    result = fit(MyModel(), dataset, steps=2000, batch_size=64, out_dir="runs/ae")

What `fit` handles, in the order a step meets it:

- data: a Dataset yielding ``(x, y)`` or ``x``, or a Tensor of images. The order is a pure
  function of ``(seed, step)``: each epoch is a permutation drawn from a generator seeded with
  ``(seed, epoch)`` and step ``s`` takes positions ``s*B .. (s+1)*B-1`` of the endless
  concatenation of epochs. Resuming at step ``s`` therefore continues exactly.
- device and precision: cuda -> mps -> cpu; bf16 autocast on CUDA when supported, else fp16
  with a GradScaler; fp32 on CPU unless asked otherwise. Weights always stay fp32.
- gradient accumulation: ``batch_size`` is the global batch per optimizer step; it is split into
  ``grad_accum`` micro-batches whose losses are divided by ``grad_accum`` before backward, so
  the gradient equals that of one big batch (for a loss that is a mean over the batch).
- optimizers: AdamW over all parameters, or whatever ``model.configure_optimizers(config)``
  returns. With a dict of optimizers (a GAN: ``{"g": ..., "d": ...}``) each step runs, in dict
  order, ``training_loss(batch, step, name)``, backward and a step of that optimizer alone; all
  gradients are zeroed before each backward so one network's loss never leaks into another's
  update. Each optimizer gets the LR schedule (warm-up, then constant/cosine/linear decay,
  applied as a factor on each param group's own lr) and its own gradient clipping.
- EMA of the weights (`EMA`), kept in fp32, saved in the checkpoint, returned as `TrainResult.ema`.
- logging: a tqdm bar (loss, images/s), ``out_dir/log.jsonl`` every ``log_every`` steps
  (step, loss and the model's metrics averaged over the interval, lr, img_per_s, elapsed; with
  several optimizers ``loss_<name>`` and ``lr_<name>``),
  sample grids ``out_dir/samples/step_XXXXXX.png`` from ``model.sample_images(n)`` (drawn with a
  fixed seed and the EMA weights when there are any, in a forked RNG so that sampling never
  changes the training run).
- a NaN/inf loss stops the run with an error naming the step; checkpoints are written only
  after the losses up to that step were checked, so the last good one on disk stays good.
- checkpoints: ``out_dir/checkpoint.pt``, written atomically every ``ckpt_every`` steps and at
  the end. If ``out_dir`` already holds one, `fit` resumes from it: model, EMA, optimizers,
  grad scalers, step and every RNG (torch, cuda, numpy, python), so an interrupted run ends with
  bit-identical weights to an uninterrupted one on the same machine. The config passed to the
  resuming call is the one used from then on (pass a larger ``steps`` to train longer; note
  that a cosine/linear schedule is defined over ``steps``).

Speed on a CPU: `fit` raises glibc malloc's mmap and trim thresholds once per process
(`_tune_malloc`; opt out with ``MINIGEN_NO_MALLOPT=1``), so activation buffers are reused
instead of being mapped and page-faulted in again at every step; see benchmarks/train_overhead.py.

On a GPU: ``precision="auto"`` trains under bf16 autocast where the GPU has native bf16
(fp16 + GradScaler otherwise); the default AdamW uses the fused CUDA kernel
(`default_optimizer`); batches are copied from page-locked (pinned) memory with
``non_blocking=True``; ``channels_last=True`` stores the model and the 4-D float inputs in NHWC,
the layout tensor cores prefer (on a CPU it is slower for GroupNorm models, see docs/scale.md);
``compile=True`` wraps the loss computation (model forward + loss) in `torch.compile`. The first
step then compiles (tens of seconds on a CPU); a loss that branches on ``step`` (VQGAN's
``disc_start``) compiles again when the branch flips. docs/scale.md has the commands and the measured effects.

Distributed data parallel
-------------------------
Launch the same script with ``torchrun --nproc_per_node N script.py``. `fit` sees
``WORLD_SIZE > 1``, initialises the process group (nccl on CUDA, gloo on CPU) unless the script
already did, and wraps the model in DDP. The group stays up for later `fit` calls in the same
process (re-creating it after a destroy can hang on stale rendezvous keys) and is destroyed at
exit; every rank waits at a barrier before `fit` returns. DDP only averages gradients for computations that run
inside the wrapped module's ``forward``, so the loss call itself (``training_loss`` or
``loss_fn``) is made the forward of a small wrapper module (`_LossModule`). Each rank takes a
disjoint, contiguous shard of the global batch (``batch_size // world_size`` images, then
``grad_accum`` micro-batches of it), so with a loss that is a mean over the batch, N ranks
compute the same update as one process on the whole batch. Each rank draws its own random
numbers (seeded ``seed + rank``) so that, e.g., diffusion noise differs between shards. Only rank
0 shows progress, writes logs, samples and checkpoints; every rank reads the checkpoint when
resuming (``out_dir`` must be on a filesystem all ranks see).

Resuming on a different world size works: the data order depends only on ``(seed, step)``
and the global ``batch_size``, never on the number of ranks, so the resumed run sees exactly
the batches the original would have seen. What cannot carry over exactly is per-rank random
state: the checkpoint stores the RNG state of every rank; a resumed run with the same world
size restores rank r's state on rank r, and with a different world size a rank without a stored
state is re-seeded from ``(seed, step, rank)``. Models without randomness in their loss (no
dropout, no noise) therefore continue exactly up to floating-point summation order.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import default_collate
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

import minigen

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"

_SCHEDULES = ("constant", "cosine", "linear")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_SAMPLE_N = 16  # images in a periodic sample grid (4 x 4)


# -----------------------------------------------------------------------------
# configuration and result


@dataclass
class TrainConfig:
    """Everything `fit` needs to know besides the model and the data."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # GLOBAL batch per optimizer step (all ranks, all micro-batches)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up: lr * (step + 1) / warmup_steps
    lr_schedule: str = "constant"  # after warm-up: "constant" | "cosine" | "linear"
    min_lr_ratio: float = 0.0  # cosine/linear decay towards lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global grad norm per optimizer; None = off
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    seed: int = 0
    out_dir: str | None = None  # log.jsonl, checkpoint.pt, samples/
    log_every: int = 50  # steps between log records; 0 = never
    sample_every: int = 0  # steps between sample grids; 0 = never
    ckpt_every: int = 0  # steps between checkpoints (one is always written at the end)
    num_workers: int = 0  # DataLoader worker processes; 0 = load in the main process
    progress: bool = True  # tqdm progress bar
    compile: bool = False  # torch.compile the loss computation
    channels_last: bool = False  # NHWC memory format for the model and 4-D inputs

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        if isinstance(self.out_dir, os.PathLike):
            # a Path would land in the checkpoint's train_config, which weights_only refuses
            self.out_dir = os.fspath(self.out_dir)

        for name in ("steps", "batch_size", "grad_accum", "warmup_steps", "log_every",
                     "sample_every", "ckpt_every", "num_workers", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        need(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        for name in ("warmup_steps", "log_every", "sample_every", "ckpt_every", "num_workers"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(float(b) for b in self.betas)
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.lr_schedule in _SCHEDULES,
             f"lr_schedule must be one of {_SCHEDULES}, got {self.lr_schedule!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip is None or self.grad_clip > 0,
             f"grad_clip must be > 0 or None (off), got {self.grad_clip}")
        need(self.ema_decay is None or 0 <= self.ema_decay < 1,
             f"ema_decay must be in [0, 1) or None (off), got {self.ema_decay}")
        need(self.precision in _PRECISIONS,
             f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        for name in ("progress", "compile", "channels_last"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name} must be True or False, got {v!r}")
        need(isinstance(self.device, (str, torch.device)),
             f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {self.device!r}")


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (the plain module, never the DDP/compiled wrapper)
    ema: EMA | None  # the EMA weights, if config.ema_decay was set; ema.copy_to(model) uses them
    history: list[dict] = field(default_factory=list)  # the log records (also in log.jsonl)
    step: int = 0  # optimizer steps done in total (including those before a resume)


# -----------------------------------------------------------------------------
# small public helpers


def set_seed(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(pref: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is checked and returned as is."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(pref)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {pref!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {pref!r} requested but MPS is not available; use 'auto' or 'cpu'")
    return dev


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiplier on each param group's lr at (0-based) `step`.

    Warm-up rises linearly, 1/W, 2/W, ..., 1 over steps 0..W-1. Then, with progress
    p = (step - W) / (steps - W) going from 0 towards 1, "cosine" gives
    m + (1 - m) * (1 + cos(pi p)) / 2 and "linear" m + (1 - m) * (1 - p), m = min_lr_ratio.
    """
    w = config.warmup_steps
    if step < w:
        return (step + 1) / w
    if config.lr_schedule == "constant":
        return 1.0
    p = min(1.0, (step - w) / max(1, config.steps - w))
    m = config.min_lr_ratio
    if config.lr_schedule == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    return m + (1 - m) * (1 - p)


# -----------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a model's parameters, in fp32.

    After each optimizer step: ``shadow = d * shadow + (1 - d) * param``. The averaged
    weights usually sample better than the raw ones (DDPM used decay 0.9999). Buffers (e.g.
    BatchNorm statistics) are not averaged: the latest values are copied at each update.

    With ``warmup`` (the default, as latent diffusion's LitEma), the n-th update uses
    ``d = min(decay, (1 + n) / (10 + n))``. Without it, after n updates the average still
    holds ``decay ** n`` of the initial weights: 22% after 1,500 steps at 0.999, which for a
    U-Net with a zero-initialised output layer shrinks every prediction by about that much
    and turns short CPU runs' samples into noise.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()
                       if p.is_floating_point()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p for n, p in model.named_parameters() if n in self.shadow]
        if len(params) != len(self.shadow):
            raise ValueError("EMA.update: the model's parameters differ from the ones the EMA was made for")
        self.num_updates += 1
        decay = self.current_decay()
        # lerp(shadow, p, 1 - d) = d * shadow + (1 - d) * p, fused over all tensors
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach().float() for p in params],
                             1.0 - decay)
        for n, b in model.named_buffers():
            if n in self.buffers:
                self.buffers[n].copy_(b)

    def current_decay(self) -> float:
        """The decay of the latest update (num_updates counts it)."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters (and buffers) with the averaged ones."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n])
        for n, b in model.named_buffers():
            if n in self.buffers:
                b.copy_(self.buffers[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(self.shadow), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))[:5]
            extra = sorted(set(state["shadow"]) - set(self.shadow))[:5]
            raise ValueError(f"EMA state does not match the model (missing {missing}, unexpected {extra})")
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints from before warm-up had none
        self.num_updates = int(state.get("num_updates", 0))
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
        for n, t in state.get("buffers", {}).items():
            if n in self.buffers:
                self.buffers[n].copy_(t)


# -----------------------------------------------------------------------------
# checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or for another model."""


def _class_name(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(saved: str, expected: str) -> bool:
    if saved == expected:
        return True
    # a class defined in a script or notebook is "__main__.X" there and "module.X" elsewhere
    s_mod, _, s_name = saved.rpartition(".")
    e_mod, _, e_name = expected.rpartition(".")
    return s_name == e_name and "__main__" in (s_mod, e_mod)


def save_checkpoint(path, state: dict) -> None:
    """Write `state` with torch.save, atomically: a crash mid-write never leaves a broken file.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the
    file is then renamed over `path` (os.replace is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, *, expected_model=None, map_location="cpu") -> dict:
    """Load a minigen checkpoint with ``torch.load(weights_only=True)``.

    `expected_model` (a class, an instance or a qualified class name) makes loading a
    checkpoint of another model class an error. Raises FileNotFoundError for a missing file and
    CheckpointError (a ValueError) for a truncated/corrupt file, a file that is not a minigen
    checkpoint, or a checkpoint of another model class.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip reader errors, EOFError, UnpicklingError, ...
        msg = str(e)
        if "Unsupported global" in msg:  # a pickle of arbitrary Python objects
            found = re.search(r"GLOBAL (\S+)", msg)
            raise CheckpointError(
                f"{path} is not a minigen checkpoint: it contains Python objects "
                f"({found.group(1) if found else 'a class'}) that torch.load(weights_only=True) "
                f"refuses to unpickle. minigen checkpoints hold only tensors and plain containers; "
                f"load other files only if you trust them."
            ) from None
        detail = next((l.strip() for l in msg.splitlines() if "error" in l.lower()), msg.splitlines()[0] if msg else "")
        raise CheckpointError(
            f"{path} is truncated or corrupt, or not a torch checkpoint at all "
            f"({type(e).__name__}: {detail[:200]}); delete it or restore a backup"
        ) from e
    if not isinstance(ckpt, dict) or "minigen_version" not in ckpt or "model_class" not in ckpt:
        what = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a minigen checkpoint (it holds {what}). If it is a plain state_dict, "
            f"use model.load_state_dict(torch.load(path, weights_only=True))."
        )
    if expected_model is not None:
        expected = expected_model if isinstance(expected_model, str) else _class_name(expected_model)
        if not _same_class(ckpt["model_class"], expected):
            raise CheckpointError(
                f"{path} is a checkpoint of {ckpt['model_class']}, not of {expected}. "
                f"Use the matching model class, or another out_dir/path."
            )
    return ckpt


# RNG states in a form that torch.load(weights_only=True) accepts: tensors, lists, ints, floats.


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# -----------------------------------------------------------------------------
# data: a deterministic, endless, step-indexed order


def _derive_seed(*parts) -> int:
    """A 63-bit seed that is a fixed function of `parts` (same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, ("minigen", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _StepOrder:
    """Which dataset indices global batch `step` holds: a function of (seed, step) only."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # batches move forward: keep only recent epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(_derive_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos, end = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        while pos < end:  # a batch may straddle epochs (or span several for a tiny dataset)
            epoch, i = divmod(pos, self.n)
            take = min(self.n - i, end - pos)
            parts.append(self._perm(epoch)[i:i + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of indices) for steps start..stop-1, in order."""

    def __init__(self, order, start, stop, rank, world_size, grad_accum):
        self.order, self.start, self.stop = order, start, stop
        self.per_rank = order.batch_size // world_size
        self.rank, self.grad_accum = rank, grad_accum

    def __iter__(self):
        for step in range(self.start, self.stop):
            shard = self.order.indices(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            yield from shard.split(self.per_rank // self.grad_accum)

    def __len__(self):
        return (self.stop - self.start) * self.grad_accum


def _check_data(data) -> int:
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"data is an empty tensor (shape {tuple(data.shape)}); pass at least one image")
        return len(data)
    if isinstance(data, torch.utils.data.DataLoader):
        raise TypeError("pass the Dataset itself, not a DataLoader: fit() builds the batches "
                        "(set batch_size and num_workers in the config)")
    if isinstance(data, torch.utils.data.IterableDataset) or not (
            hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a map-style Dataset (with __len__ and __getitem__) or a Tensor "
                        f"of images, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError("the dataset is empty (len 0): nothing to train on")
    return n


def _micro_batches(data, sampler, num_workers, pin, seed):
    """Iterate over the micro-batches of `sampler`, fetched from `data` and collated."""
    if isinstance(data, torch.Tensor):
        for idx in sampler:
            yield data[idx.to(data.device)]
    elif num_workers == 0:
        for idx in sampler:
            yield default_collate([data[i] for i in idx.tolist()])
    else:
        # The generator only seeds the workers; passing it keeps the loader from drawing that
        # seed from the global torch RNG, which would change the training run's random numbers.
        g = torch.Generator().manual_seed(_derive_seed(seed, "workers", sampler.start))
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=_ListSampler(sampler),
            num_workers=num_workers, pin_memory=pin, generator=g, persistent_workers=False)
        yield from loader


class _ListSampler(torch.utils.data.Sampler):
    """The DataLoader wants index lists, our sampler yields index tensors."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        return (idx.tolist() for idx in self.sampler)

    def __len__(self):
        return len(self.sampler)


def _to_device(batch, device, pin, channels_last):
    if isinstance(batch, torch.Tensor):
        # page-locked host memory lets the copy below run asynchronously (non_blocking), so
        # the next batch's transfer overlaps this step's kernels; DataLoader workers pin already
        if pin and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=pin)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, pin, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, pin, channels_last) for k, v in batch.items()}
    return batch


# -----------------------------------------------------------------------------
# the loss as a module


class _LossModule(nn.Module):
    """Makes the loss computation the forward() of a module.

    DDP synchronises gradients only for work done inside the forward of the module it wraps,
    and torch.compile compiles forward; `training_loss` is a plain method, so we route it here.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, step: int, name: str | None = None):
        if self.loss_fn is not None:
            args = (self.model, batch, step) if name is None else (self.model, batch, step, name)
            return self.loss_fn(*args)
        args = (batch, step) if name is None else (batch, step, name)
        return self.model.training_loss(*args)


def _split_loss(out, where: str):
    """-> (loss tensor, {metric name: scalar tensor or float})."""
    if isinstance(out, dict):
        if "loss" not in out:
            raise TypeError(f"{where} returned a dict without a 'loss' key (keys: {sorted(out)}); "
                            f"put the quantity to minimise under 'loss'")
        metrics = {k: v for k, v in out.items() if k != "loss"}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                raise ValueError(f"{where}: metric {k!r} must be a scalar, got shape {tuple(v.shape)}")
            if not isinstance(v, (torch.Tensor, int, float)):
                raise TypeError(f"{where}: metric {k!r} must be a number or a scalar tensor, "
                                f"got {type(v).__name__}")
        out = out["loss"]
    else:
        metrics = {}
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where} must return a scalar Tensor or a dict with a 'loss' Tensor, "
                        f"got {type(out).__name__}")
    if out.dim() != 0:
        raise ValueError(f"{where} must return a scalar loss, got shape {tuple(out.shape)}; "
                         f"did you forget .mean()?")
    if not out.requires_grad:
        raise ValueError(f"{where} returned a loss that does not require grad: it is not connected "
                         f"to any trainable parameter (detached, or computed under no_grad?)")
    return out, metrics


# -----------------------------------------------------------------------------
# helpers for the loop


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Stop glibc malloc from mmap'ing and unmapping big activation buffers at every step.

    By default glibc serves allocations above a (dynamic) threshold with fresh mmap()s and
    returns freed memory at the top of the heap to the OS, so each training step page-faults
    its activations in again. Raising both thresholds keeps that memory in the process for
    reuse. Linux/glibc only, once per process; set MINIGEN_NO_MALLOPT=1 to opt out.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("MINIGEN_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # absent on musl: leave its allocator alone
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))  # blocks < 1 GiB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))  # keep freed memory for reuse


def default_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over all parameters: what `fit` uses when the model has no configure_optimizers.

    On CUDA the fused kernel (one launch for all parameters instead of several per tensor) is
    asked for; on the CPU the default implementation is kept: the fused CPU kernel measured
    within noise of it (+0.7% on the U-Net step, docs/scale.md) and is newer code.
    """
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay, fused=True if device.type == "cuda" else None)


def _cuda_bf16() -> bool:
    """Native bf16 on the current GPU (emulated bf16 on older GPUs counts as no)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag
        return torch.cuda.is_bf16_supported()


def _precision(config: TrainConfig, device: torch.device):
    """-> (autocast dtype or None, use a GradScaler).

    "auto" is bf16 on a CUDA GPU that supports it (Ampere and newer: no loss scaling needed,
    same exponent range as fp32), fp16 with a GradScaler on older GPUs, fp32 elsewhere.
    Asking for bf16 on a GPU without it is an error rather than a silent slow emulation.
    """
    p = config.precision
    if p == "auto":
        if device.type != "cuda":
            return None, False
        p = "bf16" if _cuda_bf16() else "fp16"
    if p == "bf16" and device.type == "cuda" and not _cuda_bf16():
        raise ValueError(f"precision='bf16' but {torch.cuda.get_device_name(device)} does not support "
                         f"bfloat16; use precision='fp16' (with loss scaling) or 'auto'")
    if p == "fp32":
        return None, False
    if p == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Tile (N, C, H, W) images in [-1, 1] into one PNG with a 2-pixel border."""
    from matplotlib.image import imsave  # imported here: only needed for sample grids

    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"sample_images must return (N, 1|3, H, W) images, got {tuple(images.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    nrow = min(nrow, n)
    ncol = math.ceil(n / nrow)
    pad = 2
    grid = torch.zeros(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, grid.permute(1, 2, 0).numpy())


def _read_log(path: Path, upto_step: int) -> list[dict]:
    """Log records with step <= upto_step (a resumed run drops what it will redo)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and rec.get("step", math.inf) <= upto_step:
            records.append(rec)
    return records


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


# -----------------------------------------------------------------------------
# the loop


def fit(model: nn.Module, data, config: TrainConfig | None = None, *,
        loss_fn: Callable | None = None, callback: Callable | None = None, **overrides) -> TrainResult:
    """Train `model` on `data`; see the module docstring for what happens at each step.

    model: an nn.Module with ``training_loss(batch, step[, name])`` (unless `loss_fn` is given),
        optionally ``configure_optimizers(config)`` and ``sample_images(n)``.
    data: a Dataset yielding ``(x, y)`` or ``x``, or a Tensor of images (batches are then
        tensors, not tuples).
    config: a TrainConfig; keyword `overrides` replace its fields (``fit(m, d, steps=500)``).
    loss_fn: ``loss_fn(model, batch, step[, name])`` used instead of ``model.training_loss``.
    callback: ``callback(done, model, ema)`` after every optimizer step, on the main process
        only (`done` = steps done so far; `ema` the EMA or None), e.g. to evaluate during
        training. Its time is left out of the logged img/s, like checkpointing's, and the
        torch RNG state is restored after it, so it does not change the training run.

    ``step`` is the 0-based index of the optimizer step being computed; log records and
    checkpoints count steps done. A fresh run first seeds every RNG with ``config.seed`` (plus
    the rank under DDP), so two calls with the same arguments train identically.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if overrides:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(known)}")
        config = dataclasses.replace(config, **overrides)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is None and not callable(getattr(model, "training_loss", None)):
        raise TypeError(f"{type(model).__name__} has no training_loss(batch, step) method; "
                        f"define one or pass loss_fn=(model, batch, step) -> loss")
    n_data = _check_data(data)
    _tune_malloc()

    # --- distributed setup
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if _wants_cuda(config.device) else "gloo"
        dist.init_process_group(backend=backend)
        # Kept for later fit() calls in this process and destroyed at exit: creating the default
        # group again after destroying it reuses the rendezvous keys of the first one and can hang.
        atexit.register(_destroy_process_group)
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by world_size x grad_accum "
                         f"= {world} x {config.grad_accum}")

    return _fit(model, data, n_data, config, loss_fn, world, rank, local_rank, callback)


def _wants_cuda(pref) -> bool:
    return torch.cuda.is_available() and (pref == "auto" or str(pref).startswith("cuda"))


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _fit(model, data, n_data, config, loss_fn, world, rank, local_rank, callback=None) -> TrainResult:
    distributed = world > 1
    if distributed and _wants_cuda(config.device):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = select_device(config.device)
    amp_dtype, use_scaler = _precision(config, device)
    on_cuda = device.type == "cuda"
    out_dir = Path(config.out_dir) if config.out_dir else None
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir else None
    is_main = rank == 0

    was_training = model.training
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()

    # --- optimizers: the model's own, or AdamW over everything
    opts = model.configure_optimizers(config) if hasattr(model, "configure_optimizers") \
        else default_optimizer(model, config, device)
    multi = isinstance(opts, dict)
    opts = dict(opts) if multi else {"opt": opts}
    if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts.values()):
        raise TypeError("configure_optimizers must return an Optimizer or a non-empty dict "
                        f"name -> Optimizer, got {opts!r}")
    for opt in opts.values():
        for g in opt.param_groups:  # the schedule multiplies each group's own lr
            g.setdefault("initial_lr", g["lr"])
    scalers = {name: torch.amp.GradScaler(device.type) for name in opts} if use_scaler else None
    ema = EMA(model, config.ema_decay) if config.ema_decay is not None else None

    # --- fresh start or resume
    start = 0
    history: list[dict] = []
    resumed = ckpt_path is not None and ckpt_path.exists()
    if resumed:
        # loaded on the CPU (RNG states must stay there); load_state_dict moves the rest
        ckpt = load_checkpoint(ckpt_path, expected_model=model)
        model.load_state_dict(ckpt["model"])
        if set(ckpt["optimizers"]) != set(opts):
            raise CheckpointError(f"{ckpt_path} has optimizers {sorted(ckpt['optimizers'])} but the "
                                  f"model now configures {sorted(opts)}")
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        if scalers is not None and ckpt.get("scalers"):
            for name, sc in scalers.items():
                sc.load_state_dict(ckpt["scalers"][name])
        if ema is not None:
            if ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            else:
                warnings.warn(f"{ckpt_path} has no EMA state: the EMA restarts from the current weights")
        start = int(ckpt["step"])
        old = ckpt.get("train_config") or {}
        if old.get("batch_size", config.batch_size) != config.batch_size or old.get("seed", config.seed) != config.seed:
            warnings.warn("resuming with a different batch_size or seed than the checkpoint's: the "
                          "data order will not continue the original run exactly")
        rng = ckpt.get("rng") or []
        if len(rng) == world:
            _set_rng_state(rng[rank], device)
        else:  # another world size: see "Resuming on a different world size" above
            set_seed(_derive_seed(config.seed, "resume", start, rank))
        history = _read_log(out_dir / LOG_NAME, start)
        del ckpt
    else:
        set_seed(config.seed + rank)

    log_file = None
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(out_dir / LOG_NAME, "w", encoding="utf-8")
        for rec in history:  # rewrite: drop records past the checkpoint (they will be redone)
            log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    # --- the loss module, wrapped for DDP / compile
    loss_module = _LossModule(model, loss_fn)
    if distributed:
        # With several optimizers some parameters get no gradient in some phases (the generator
        # in the discriminator's), which DDP must be told to expect.
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if on_cuda else None, find_unused_parameters=multi)
    if config.compile:
        loss_module = torch.compile(loss_module)
    where = "loss_fn" if loss_fn is not None else f"{type(model).__name__}.training_loss"
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def checkpoint(step: int) -> None:
        # every rank contributes its RNG state; rank 0 writes
        rng = _rng_state(device)
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not is_main:
            return
        save_checkpoint(ckpt_path, {
            "minigen_version": minigen.__version__,
            "model_class": _class_name(model),
            "model_config": dataclasses.asdict(model.config)
            if dataclasses.is_dataclass(getattr(model, "config", None))
            and not isinstance(model.config, type) else None,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizers": {name: opt.state_dict() for name, opt in opts.items()},
            "scalers": {name: sc.state_dict() for name, sc in scalers.items()} if scalers else None,
            "step": step,
            "rng": rngs,
            "train_config": dataclasses.asdict(config),
        })

    def sample(step: int) -> None:
        net = model
        if ema is not None:
            net = copy.deepcopy(model)
            ema.copy_to(net)
        net.eval()
        # a forked RNG with a fixed seed: the same noise every time, and the run is unchanged
        accel = device.type in ("cuda", "mps")
        with torch.random.fork_rng(devices=[device] if accel else [],
                                   device_type=device.type if accel else "cuda"), torch.no_grad():
            torch.manual_seed(config.seed)
            images = net.sample_images(_SAMPLE_N)
        _save_grid(images, out_dir / "samples" / f"step_{step:06d}.png", nrow=4)
        model.train()

    # --- the loop
    steps = config.steps
    sampler = _MicroBatchSampler(_StepOrder(n_data, config.batch_size, config.seed),
                                 start, steps, rank, world, config.grad_accum)
    micro = _micro_batches(data, sampler, config.num_workers, on_cuda, config.seed)
    can_sample = is_main and out_dir is not None and config.sample_every > 0 and hasattr(model, "sample_images")
    bar = tqdm(total=steps, initial=start, disable=not (config.progress and is_main),
               unit="step", dynamic_ncols=True, leave=True)
    # Losses stay on the device until a sync point (every step on CPU, every 10 on CUDA where a
    # sync would stall the queue), where they are checked for NaN/inf and summed for the log.
    sync_every = 10 if on_cuda else 1
    pending: list[tuple[int, dict]] = []
    sums: dict[str, float] = {}
    n_summed = 0
    t_start = time.perf_counter()
    t_log, io_time = t_start, 0.0
    loss_key = {name: (f"loss_{name}" if multi else "loss") for name in opts}

    postfix: dict[str, str] = {}

    def sync():
        nonlocal n_summed
        if not pending:
            return
        keys = [list(d) for _, d in pending]
        flat = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor)
                else torch.tensor(float(v), device=device) for _, d in pending for v in d.values()]
        vals = torch.stack(flat)
        if distributed:  # log the mean over ranks; also makes every rank see the same NaN
            dist.all_reduce(vals)
            vals /= world
        vals = vals.tolist()
        i = 0
        for (s, _), ks in zip(pending, keys):
            rec = dict(zip(ks, vals[i:i + len(ks)]))
            i += len(ks)
            for name, key in loss_key.items():
                if not math.isfinite(rec[key]):
                    raise FloatingPointError(
                        f"the loss{'' if not multi else f' of optimizer {name!r}'} became {rec[key]} "
                        f"at step {s}. Try a lower lr (now {config.lr:g}), gradient clipping "
                        f"(grad_clip={config.grad_clip}) or a longer warm-up; the last checkpoint "
                        f"on disk, if any, is from before this step.")
            for k, v in rec.items():
                sums[k] = sums.get(k, 0.0) + v
            n_summed += 1
        pending.clear()
        if not bar.disable and time.perf_counter() - bar.last_print_t > bar.mininterval:
            postfix.update((k, f"{v:.4g}") for k, v in rec.items() if k.startswith("loss"))
            bar.set_postfix(postfix, refresh=False)

    try:
        for step in range(start, steps):
            batches = [_to_device(next(micro), device, on_cuda, config.channels_last)
                       for _ in range(config.grad_accum)]
            factor = lr_factor(step, config)
            record: dict[str, Any] = {}
            for name, opt in opts.items():
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                for k, batch in enumerate(batches):
                    # with DDP, all-reduce gradients only on the last micro-batch
                    no_sync = distributed and k < len(batches) - 1
                    with (loss_module.no_sync() if no_sync else contextlib.nullcontext()):
                        with autocast():
                            out = loss_module(batch, step, name if multi else None)
                        loss, metrics = _split_loss(out, where)
                        loss_scaled = loss / config.grad_accum
                        (scalers[name].scale(loss_scaled) if scalers else loss_scaled).backward()
                    # metrics/loss summed over micro-batches, as a mean
                    for key, v in ((loss_key[name], loss), *metrics.items()):
                        v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                        record[key] = record.get(key, 0.0) + v / config.grad_accum
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                if scalers:
                    scalers[name].unscale_(opt)
                if config.grad_clip is not None:
                    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                if scalers:
                    scalers[name].step(opt)
                    scalers[name].update()
                else:
                    opt.step()
            if ema is not None:
                ema.update(model)

            done = step + 1
            pending.append((step, record))
            bar.update(1)
            log_now = config.log_every and done % config.log_every == 0
            ckpt_now = ckpt_path is not None and (
                (config.ckpt_every and done % config.ckpt_every == 0) or done == steps)
            sample_now = can_sample and done % config.sample_every == 0
            if log_now or ckpt_now or sample_now or done == steps or len(pending) >= sync_every:
                sync()
            if log_now or (config.log_every and done == steps and n_summed):
                now = time.perf_counter()
                train_time = max(now - t_log - io_time, 1e-9)
                rec = {"step": done, **{k: v / n_summed for k, v in sums.items()}}
                for name, opt in opts.items():
                    rec["lr" if not multi else f"lr_{name}"] = opt.param_groups[0]["lr"]
                rec["img_per_s"] = n_summed * config.batch_size / train_time
                rec["elapsed"] = now - t_start
                history.append(rec)
                if log_file is not None:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                if not bar.disable:
                    postfix["img/s"] = f"{rec['img_per_s']:.0f}"
                    bar.set_postfix(postfix, refresh=False)
                sums.clear()
                n_summed = 0
                t_log, io_time = now, 0.0
            if sample_now or ckpt_now:
                t0 = time.perf_counter()
                if sample_now:
                    sample(done)
                if ckpt_now:
                    checkpoint(done)
                io_time += time.perf_counter() - t0
            if callback is not None and is_main:
                t0 = time.perf_counter()
                was = model.training
                # the callback may draw random numbers (e.g. sample): keep training's stream
                rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if on_cuda else None)
                callback(done, model, ema)
                torch.set_rng_state(rng[0])
                if on_cuda:
                    torch.cuda.set_rng_state(rng[1], device)
                model.train(was)
                io_time += time.perf_counter() - t0
        if ckpt_path is not None and not resumed and steps == 0:
            checkpoint(0)  # "a checkpoint at the end", even of an empty run
        if distributed:
            dist.barrier()
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if not was_training:
            model.eval()
    return TrainResult(model=model, ema=ema, history=history, step=max(start, steps))
