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
- one run per ``out_dir``: `fit` holds ``out_dir/.lock`` (an flock, which the OS releases when
  the process dies, even by kill -9) while it runs; a second run on the same folder stops with
  RunLockedError naming the first one's PID. Holding it, `fit` deletes the temporary files
  that killed checkpoint writes left there (`minigen.rundir` holds the folder's jobs).
- logging: a tqdm bar (loss, images/s), ``out_dir/log.jsonl`` every ``log_every`` steps
  (step, loss and the model's metrics averaged over the interval, lr, img_per_s, elapsed; with
  several optimizers ``loss_<name>`` and ``lr_<name>``; the file is only appended to, with a
  marker line where a run resumes or a new run starts, see `rundir.read_log`),
  sample grids ``out_dir/samples/step_XXXXXX.png`` from ``model.sample_images(n)`` (drawn with a
  fixed seed and the EMA weights when there are any, in a forked RNG so that sampling never
  changes the training run).
- a NaN/inf loss stops the run with an error naming the step and what to try. The loss of
  step s is computed from the weights that update s - 1 made, so a checkpoint due after
  step s is held (copied to the CPU) until step s + 1's loss, computed from its weights, is
  known to be finite, and only then written; the last step's checkpoint is written once its
  weights and optimizer state are checked finite. The checkpoint on disk therefore never
  holds weights that gave a NaN: training again from it with a lower lr continues cleanly.
- checkpoints: ``out_dir/checkpoint.pt``, written atomically every ``ckpt_every`` steps and at
  the end. If ``out_dir`` already holds one, `fit` resumes from it: model, EMA, optimizers,
  grad scalers, step and every RNG (torch, cuda, numpy, python), so an interrupted run ends with
  bit-identical weights to an uninterrupted one on the same machine. The config passed to the
  resuming call is the one used from then on, the optimizers' hyperparameters included (pass
  a larger ``steps`` to train longer, a lower ``lr`` after a NaN; note that a cosine/linear
  schedule is defined over ``steps``).

Speed on a CPU: `fit` raises glibc malloc's mmap and trim thresholds once per process
(`minigen.runtime.tune_malloc`; opt out with ``MINIGEN_NO_MALLOPT=1``), so activation buffers are reused
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

import contextlib
import copy
import dataclasses
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

from minigen import rundir, runtime
from minigen.batching import MicroBatchSampler, StepOrder, check_data, micro_batches, to_device
from minigen.checkpoint import (CHECKPOINT_NAME, CheckpointError, first_non_finite, load_checkpoint,
                                restore_training_state, rng_state, save_checkpoint, set_rng_state,
                                training_state)
from minigen.ema import EMA
from minigen.optim import LossModule, build_optimizers, split_loss
from minigen.optim import default_optimizer, lr_factor  # public here too: their home is minigen.optim
from minigen.plot import save_grid
from minigen.rundir import LOCK_NAME, LOG_NAME, RunLockedError, read_log  # public here too: home is rundir
from minigen.runtime import select_device, set_seed  # public here too: lessons import them from train

_read_log = read_log  # the old private name

_SCHEDULES = ("constant", "cosine", "linear")
_PRECISIONS = runtime.PRECISIONS
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
        need(isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool)
             and math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}")
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


def _precision(config: TrainConfig, device: torch.device):
    """-> (autocast dtype or None, use a GradScaler) for config.precision on `device`."""
    return runtime.autocast_dtype(config.precision, device)


# -----------------------------------------------------------------------------
# the loop


def fit(model: nn.Module, data, config: TrainConfig | None = None, *,
        loss_fn: Callable | None = None, callback: Callable | None = None, **overrides) -> TrainResult:
    """Train `model` on `data`; see the module docstring for what happens at each step.

    model: an nn.Module with ``training_loss(batch, step[, name])`` (unless `loss_fn` is given),
        optionally ``configure_optimizers(config)`` and ``sample_images(n)``; or a function
        of no arguments that builds one (``lambda: VAE(cfg)``): `fit` calls it after seeding
        every RNG with ``config.seed``, so the seed fixes the starting weights too.
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
    the rank under DDP), so two calls with the same arguments train identically -- from the
    same starting weights if `model` is a builder function (an already built model's weights
    are whatever the RNG gave when it was built: seed before building it, as the CLI does).
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
    if callable(model) and not isinstance(model, nn.Module):
        # build it from seeded generators: same seed, same starting weights (on every rank)
        runtime.set_seed(config.seed)
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model builder passed to fit must return an nn.Module, got {type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or a function that builds one), got {type(model).__name__}")
    if loss_fn is None and not callable(getattr(model, "training_loss", None)):
        raise TypeError(f"{type(model).__name__} has no training_loss(batch, step) method; "
                        f"define one or pass loss_fn=(model, batch, step) -> loss")
    n_data = check_data(data)
    runtime.tune_malloc()

    world, rank, local_rank = runtime.dist_env()
    if world > 1:
        runtime.init_distributed(config.device)
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by world_size x grad_accum "
                         f"= {world} x {config.grad_accum}")

    return _fit(model, data, n_data, config, loss_fn, world, rank, local_rank, callback)


def _fit(model, data, n_data, config, loss_fn, world, rank, local_rank, callback=None) -> TrainResult:
    """The loop itself; each line is a method of `_Trainer` below, in the order it runs."""
    run = _Trainer(model, config, loss_fn, world, rank, local_rank)  # device, precision, optimizers, EMA
    try:
        run.lock_out_dir()  # one run per out_dir; clear temp files of killed writes
        run.resume_or_seed()  # from out_dir's checkpoint, or seed every RNG afresh
        run.open_log()
        loss_module = run.wrap_loss_module()  # DDP / torch.compile
        batches = run.micro_batches(data, n_data)
        run.start_progress()
        for step in range(run.start, config.steps):
            micro = [next(batches) for _ in range(config.grad_accum)]
            record = run.optimizer_step(loss_module, micro, step)
            run.after_step(step + 1, record, callback)  # check losses, log, sample, checkpoint
        run.finish()
    finally:
        run.close()
    return TrainResult(model=model, ema=run.ema, history=run.history, step=max(run.start, config.steps))


class _Trainer:
    """The state one `fit` call carries from step to step, and the named steps of its loop."""

    def __init__(self, model, config: TrainConfig, loss_fn, world: int, rank: int, local_rank: int):
        self.model, self.config, self.loss_fn = model, config, loss_fn
        self.world, self.rank = world, rank
        self.distributed, self.is_main = world > 1, rank == 0
        if self.distributed and runtime.wants_cuda(config.device):
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = runtime.select_device(config.device)
        self.amp_dtype, use_scaler = _precision(config, self.device)
        self.on_cuda = self.device.type == "cuda"
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME if self.out_dir else None

        self.was_training = model.training
        model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()

        self.opts, self.multi = build_optimizers(model, config, self.device)
        self.scalers = {name: torch.amp.GradScaler(self.device.type) for name in self.opts} if use_scaler else None
        self.ema = EMA(model, config.ema_decay) if config.ema_decay is not None else None
        self.loss_key = {name: (f"loss_{name}" if self.multi else "loss") for name in self.opts}
        self.where = "loss_fn" if loss_fn is not None else f"{type(model).__name__}.training_loss"

        self.start, self.history, self.resumed = 0, [], False
        self.log_file, self.bar, self.lock_fd = None, None, None
        # A checkpoint is written only once the loss computed from its weights (the next step's)
        # is known to be finite: until then it waits here, copied to the CPU.
        self.held: dict | None = None
        self.last_saved: int | None = None
        # Losses stay on the device until a sync point (every step on CPU, every 10 on CUDA where
        # a sync would stall the queue), where they are checked for NaN/inf and summed for the log.
        self.sync_every = 10 if self.on_cuda else 1
        self.pending: list[tuple[int, dict]] = []
        self.sums: dict[str, float] = {}
        self.n_summed = 0
        self.postfix: dict[str, str] = {}

    # --- before the loop

    def lock_out_dir(self) -> None:
        """Take out_dir/.lock or raise RunLockedError naming the run that holds it; then delete
        the temp files of killed writes (`minigen.rundir`)."""
        error = None
        if self.is_main and self.out_dir is not None:
            rundir.make(self.out_dir)
            self.lock_fd, error = rundir.lock(self.out_dir)
        if self.distributed:  # every rank stops if rank 0 could not lock
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RunLockedError(error)
        if self.lock_fd is not None:
            rundir.remove_stale_temp_files(self.out_dir)

    def resume_or_seed(self) -> None:
        """Continue from out_dir's checkpoint (model, optimizers, scalers, EMA, step, RNG, log),
        or seed every RNG for a fresh run."""
        config, ckpt_path = self.config, self.ckpt_path
        self.resumed = ckpt_path is not None and ckpt_path.exists()
        if not self.resumed:
            runtime.set_seed(config.seed + self.rank)
            return
        # loaded on the CPU (RNG states must stay there); load_state_dict moves the rest
        ckpt = load_checkpoint(ckpt_path, expected_model=self.model)
        restore_training_state(ckpt, self.model, self.opts, self.scalers, self.ema, self.out_dir)
        self.start = int(ckpt["step"])
        old = ckpt.get("train_config") or {}
        if old.get("batch_size", config.batch_size) != config.batch_size or old.get("seed", config.seed) != config.seed:
            warnings.warn("resuming with a different batch_size or seed than the checkpoint's: the "
                          "data order will not continue the original run exactly")
        rng = ckpt.get("rng") or []
        if len(rng) == self.world:
            set_rng_state(rng[self.rank], self.device)
        else:  # another world size: see "Resuming on a different world size" above
            runtime.set_seed(runtime.derive_seed(config.seed, "resume", self.start, self.rank))
        self.last_saved = self.start
        self.history = read_log(self.out_dir / LOG_NAME, self.start)

    def open_log(self) -> None:
        """Rank 0 appends to out_dir/log.jsonl, after a resume/start marker where records are."""
        if self.is_main and self.out_dir is not None:
            self.log_file = rundir.open_log(self.out_dir, self.start, self.resumed)

    def wrap_loss_module(self) -> nn.Module:
        loss_module = LossModule(self.model, self.loss_fn)
        if self.distributed:
            # With several optimizers some parameters get no gradient in some phases (the generator
            # in the discriminator's), which DDP must be told to expect.
            loss_module = nn.parallel.DistributedDataParallel(
                loss_module, device_ids=[self.device.index] if self.on_cuda else None,
                find_unused_parameters=self.multi)
        if self.config.compile:
            loss_module = torch.compile(loss_module)
        return loss_module

    def micro_batches(self, data, n_data: int):
        """This rank's micro-batches for steps start..steps-1, on the device."""
        c = self.config
        sampler = MicroBatchSampler(StepOrder(n_data, c.batch_size, c.seed), self.start, c.steps,
                                    self.rank, self.world, c.grad_accum)
        for batch in micro_batches(data, sampler, c.num_workers, self.on_cuda, c.seed):
            yield to_device(batch, self.device, self.on_cuda, c.channels_last)

    def start_progress(self) -> None:
        c = self.config
        self.bar = tqdm(total=c.steps, initial=self.start, disable=not (c.progress and self.is_main),
                        unit="step", dynamic_ncols=True, leave=True)
        self.t_start = time.perf_counter()
        self.t_log, self.io_time = self.t_start, 0.0
        self.t_postfix = -math.inf  # when the bar's loss was last updated (perf_counter)

    # --- one optimizer step

    def optimizer_step(self, loss_module, batches: list, step: int) -> dict[str, Any]:
        """Each optimizer in turn: zero all gradients, forward + backward over the micro-batches,
        schedule the lr, unscale, clip, step. Then the EMA. -> the step's losses and metrics."""
        config, multi = self.config, self.multi
        factor = lr_factor(step, config)
        autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if self.amp_dtype \
            else contextlib.nullcontext
        scalers = self.scalers
        record: dict[str, Any] = {}
        for name, opt in self.opts.items():
            for o in self.opts.values():
                o.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
            for k, batch in enumerate(batches):
                # with DDP, all-reduce gradients only on the last micro-batch
                no_sync = self.distributed and k < len(batches) - 1
                with (loss_module.no_sync() if no_sync else contextlib.nullcontext()):
                    with autocast():
                        out = loss_module(batch, step, name if multi else None)
                    loss, metrics = split_loss(out, self.where)
                    loss_scaled = loss / config.grad_accum
                    (scalers[name].scale(loss_scaled) if scalers else loss_scaled).backward()
                # metrics/loss summed over micro-batches, as a mean
                for key, v in ((self.loss_key[name], loss), *metrics.items()):
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
        if self.ema is not None:
            self.ema.update(self.model)
        return record

    # --- after each step

    def after_step(self, done: int, record: dict, callback) -> None:
        """Check the losses (at sync points), then log, sample, checkpoint, call back, as due."""
        c, steps = self.config, self.config.steps
        self.pending.append((done - 1, record))
        self.bar.update(1)
        log_now = c.log_every and done % c.log_every == 0
        ckpt_now = self.ckpt_path is not None and ((c.ckpt_every and done % c.ckpt_every == 0) or done == steps)
        sample_now = self._can_sample() and done % c.sample_every == 0
        if (log_now or ckpt_now or sample_now or self.held is not None or done == steps
                or len(self.pending) >= self.sync_every):
            self.check_losses()
        if self.held is not None:  # this step's loss, computed from the held weights, was finite
            self.write(self.held)
        if log_now or (c.log_every and done == steps and self.n_summed):
            self.log(done)
        if sample_now or ckpt_now:
            t0 = time.perf_counter()
            if sample_now:
                self.sample(done)
            if ckpt_now:
                self.checkpoint(done)
            self.io_time += time.perf_counter() - t0
        if callback is not None and self.is_main:
            self.run_callback(callback, done)

    def check_losses(self) -> None:
        """Bring the pending losses to the host (mean over ranks), stop on NaN/inf, sum for the log."""
        if not self.pending:
            return
        keys = [list(d) for _, d in self.pending]
        flat = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor)
                else torch.tensor(float(v), device=self.device) for _, d in self.pending for v in d.values()]
        vals = torch.stack(flat)
        if self.distributed:  # log the mean over ranks; also makes every rank see the same NaN
            dist.all_reduce(vals)
            vals /= self.world
        vals = vals.tolist()
        i = 0
        for (s, _), ks in zip(self.pending, keys):
            rec = dict(zip(ks, vals[i:i + len(ks)]))
            i += len(ks)
            for name, key in self.loss_key.items():
                if not math.isfinite(rec[key]):
                    self.held = None  # its weights gave this loss: never write them
                    raise FloatingPointError(
                        f"the loss{'' if not self.multi else f' of optimizer {name!r}'} became {rec[key]} "
                        f"at step {s}. Try a lower lr (now {self.config.lr:g}), gradient clipping "
                        f"(grad_clip={self.config.grad_clip}) or a longer warm-up. {self._where_to_resume()}")
            for k, v in rec.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n_summed += 1
        self.pending.clear()
        bar = self.bar
        # the loss on the bar, at most once per the bar's mininterval (our own clock: tqdm's
        # last_print_t is time.time()-based, not comparable with perf_counter)
        now = time.perf_counter()
        if not bar.disable and now - self.t_postfix > bar.mininterval:
            self.t_postfix = now
            self.postfix.update((k, f"{v:.4g}") for k, v in rec.items() if k.startswith("loss"))
            bar.set_postfix(self.postfix, refresh=False)

    def log(self, done: int) -> None:
        """One record: the losses and metrics averaged since the last, lr, img/s (without I/O time)."""
        now = time.perf_counter()
        train_time = max(now - self.t_log - self.io_time, 1e-9)
        rec = {"step": done, **{k: v / self.n_summed for k, v in self.sums.items()}}
        for name, opt in self.opts.items():
            rec["lr" if not self.multi else f"lr_{name}"] = opt.param_groups[0]["lr"]
        rec["img_per_s"] = self.n_summed * self.config.batch_size / train_time
        rec["elapsed"] = now - self.t_start
        self.history.append(rec)
        if self.log_file is not None:
            rundir.append_log(self.log_file, rec)
        if not self.bar.disable:
            self.postfix["img/s"] = f"{rec['img_per_s']:.0f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        self.sums.clear()
        self.n_summed = 0
        self.t_log, self.io_time = now, 0.0

    def _can_sample(self) -> bool:
        return (self.is_main and self.out_dir is not None and self.config.sample_every > 0
                and hasattr(self.model, "sample_images"))

    def sample(self, done: int) -> None:
        """out_dir/samples/step_XXXXXX.png from the EMA weights, in a forked RNG with a fixed seed:
        the same noise every time, and the training run is unchanged."""
        net = self.model
        if self.ema is not None:
            net = copy.deepcopy(self.model)
            self.ema.copy_to(net)
        net.eval()
        device = self.device
        accel = device.type in ("cuda", "mps")
        with torch.random.fork_rng(devices=[device] if accel else [],
                                   device_type=device.type if accel else "cuda"), torch.no_grad():
            torch.manual_seed(self.config.seed)
            images = net.sample_images(_SAMPLE_N)
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"sample_images must return (N, 1|3, H, W) images, got {tuple(images.shape)}")
        save_grid(images, self.out_dir / "samples" / f"step_{done:06d}.png", nrow=4)
        self.model.train()

    def _where_to_resume(self) -> str:
        if self.ckpt_path is None:
            return "(No out_dir: nothing was saved.)"
        if self.last_saved is None:
            return f"No checkpoint was written to {self.out_dir}: the run starts afresh next time."
        return (f"The checkpoint in {self.out_dir} is from step {self.last_saved}, and every update up to it "
                f"gave a finite loss: training again with the same out_dir resumes from there.")

    def checkpoint(self, done: int) -> None:
        """Every rank contributes its RNG state; rank 0 copies the state to the CPU and holds it
        until the next step's loss (computed from these weights) is checked finite, then writes
        out_dir/checkpoint.pt. The last step's checkpoint has no next loss: its weights and
        optimizer state are checked finite instead."""
        rng = rng_state(self.device)
        rngs = [None] * self.world
        if self.distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not self.is_main:
            return
        state = training_state(self.model, self.ema, self.opts, self.scalers, done, rngs,
                               dataclasses.asdict(self.config))
        if done < self.config.steps:
            self.held = state
            return
        bad = first_non_finite({"model": state["model"], "ema": state["ema"], "optimizers": state["optimizers"]})
        if bad is not None:
            raise FloatingPointError(
                f"the last update (step {done - 1}) made {bad} non-finite. Try a lower lr (now "
                f"{self.config.lr:g}), gradient clipping (grad_clip={self.config.grad_clip}) or a longer "
                f"warm-up. {self._where_to_resume()}")
        self.write(state)

    def write(self, state: dict) -> None:
        self.held = None
        save_checkpoint(self.ckpt_path, state)
        self.last_saved = state["step"]

    def run_callback(self, callback, done: int) -> None:
        t0 = time.perf_counter()
        was = self.model.training
        # the callback may draw random numbers (e.g. sample): keep training's stream
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.on_cuda else None)
        callback(done, self.model, self.ema)
        torch.set_rng_state(rng[0])
        if self.on_cuda:
            torch.cuda.set_rng_state(rng[1], self.device)
        self.model.train(was)
        self.io_time += time.perf_counter() - t0

    # --- after the loop

    def finish(self) -> None:
        if self.ckpt_path is not None and not self.resumed and self.config.steps == 0:
            self.checkpoint(0)  # "a checkpoint at the end", even of an empty run
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.lock_fd is not None:  # release out_dir
            rundir.unlock(self.lock_fd)
            self.lock_fd = None
        if not self.was_training:
            self.model.eval()


__all__ = ["TrainConfig", "TrainResult", "fit", "read_log", "RunLockedError", "LOCK_NAME", "lr_factor", "default_optimizer", "EMA", "CheckpointError",
           "save_checkpoint", "load_checkpoint", "select_device", "set_seed", "CHECKPOINT_NAME", "LOG_NAME"]
