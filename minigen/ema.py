"""An exponential moving average of a model's weights (what `fit` keeps with ``ema_decay``)."""

from __future__ import annotations

import torch
import torch.nn as nn


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


__all__ = ["EMA"]
