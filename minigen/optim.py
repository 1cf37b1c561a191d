"""What one optimizer step of `minigen.train.fit` is built from.

- the model's loss, as fit calls it: `LossModule` makes ``training_loss(batch, step[, name])``
  (or a ``loss_fn``) the ``forward`` of a module, because DDP averages gradients only for work
  done inside the forward of the module it wraps and `torch.compile` compiles forward;
  `split_loss` checks what the loss returned (a scalar tensor that requires grad, or a dict
  with one under ``"loss"`` and scalar metrics) and says what is wrong when it is not.
- the optimizers: the model's ``configure_optimizers(config)`` (one optimizer, or a dict of
  them for a GAN), else `default_optimizer` (AdamW, fused on CUDA); `build_optimizers`.
- the learning-rate schedule: `lr_factor`, a multiplier on each param group's own lr.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from minigen.train import TrainConfig


# -----------------------------------------------------------------------------
# the learning-rate schedule and the optimizers


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


def default_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over all parameters: what `fit` uses when the model has no configure_optimizers.

    On CUDA the fused kernel (one launch for all parameters instead of several per tensor) is
    asked for; on the CPU the default implementation is kept: the fused CPU kernel measured
    within noise of it (+0.7% on the U-Net step, docs/scale.md) and is newer code.
    """
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay, fused=True if device.type == "cuda" else None)


def build_optimizers(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[dict, bool]:
    """-> ({name: optimizer}, several?): the model's configure_optimizers(config), else AdamW."""
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
    return opts, multi


# -----------------------------------------------------------------------------
# the loss as a module


class LossModule(nn.Module):
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


def split_loss(out, where: str):
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


__all__ = ["LossModule", "split_loss", "default_optimizer", "build_optimizers", "lr_factor"]
