"""Pictures of what the models do: image grids, loss curves, interpolation strips.

Everything here takes images as float tensors in [-1, 1] (the convention of the whole
package) and works without a display: `save_grid` writes a PNG, `show_grid` draws into the
current matplotlib figure (inline in a notebook).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def _as_batch(x) -> torch.Tensor:
    """Accept (N,C,H,W), (C,H,W) or (H,W) and return (N,C,H,W) float on the CPU."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
    x = x.detach().to("cpu")
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(
            f"expected images of shape (N, C, H, W), got {tuple(x.shape)}; "
            "stack a list of images with torch.stack first"
        )
    if x.shape[1] not in (1, 3):
        raise ValueError(
            f"expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]} in shape {tuple(x.shape)}; "
            "images are (N, C, H, W), not (N, H, W, C) — use x.permute(0, 3, 1, 2)"
        )
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    x = x.float()
    if torch.isnan(x).any():
        raise ValueError("images contain NaN values; check the model that produced them")
    return x


def image_grid(x, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile a batch of images in [-1, 1] into one uint8 (H, W, 3) array.

    Values outside [-1, 1] are clipped (samples from a model may overshoot slightly).
    `pad_value` is in [0, 1] display units (1 = white borders).
    """
    x = _as_batch(x)
    n, c, h, w = x.shape
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    x = ((x.clamp(-1, 1) + 1) / 2)
    if c == 1:
        x = x.expand(n, 3, h, w)
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    H = nrows * h + (nrows + 1) * padding
    W = ncol * w + (ncol + 1) * padding
    grid = torch.full((3, H, W), float(pad_value))
    for i in range(n):
        r, col = divmod(i, ncol)
        top = padding + r * (h + padding)
        left = padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_grid(x, path, nrow: int = 8, padding: int = 2, scale: int = 1, pad_value: float = 1.0) -> Path:
    """Save a grid of images in [-1, 1] as a PNG (written atomically). Returns the path.

    `scale` repeats each pixel (nearest neighbour) so 32x32 samples are visible in a report;
    `pad_value` as in `image_grid` (fit's periodic sample grids use 0, black borders).
    """
    from PIL import Image

    grid = image_grid(x, nrow=nrow, padding=padding, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)  # fails if `path` is a folder: then no stray .tmp is left behind
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def show_grid(x, nrow: int = 8, title: str | None = None, ax=None, scale_inches: float = 0.6):
    """Draw a grid of images in [-1, 1] with matplotlib (inline in a notebook)."""
    import matplotlib.pyplot as plt

    grid = image_grid(x, nrow=nrow)
    if ax is None:
        n = _as_batch(x).shape[0]
        ncol = min(nrow, n)
        nrows = math.ceil(n / ncol)
        _, ax = plt.subplots(figsize=(max(2.0, ncol * scale_inches), max(2.0, nrows * scale_inches)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def plot_losses(history, keys=("loss",), ax=None, smooth: int = 1, logy: bool = False):
    """Plot training curves from `minigen.train`'s history (a list of dicts with a "step").

    `smooth` > 1 applies a running mean over that many logged points.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if not pts:
            raise KeyError(
                f"no {key!r} in the history; available keys: {sorted({k for h in history for k in h})}"
            )
        steps, vals = map(np.asarray, zip(*pts))
        if smooth > 1 and len(vals) >= smooth:
            kernel = np.ones(smooth) / smooth
            vals = np.convolve(vals, kernel, mode="valid")
            steps = steps[smooth - 1:]
        ax.plot(steps, vals, label=key)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def interpolation_strip(frames, path=None, title: str | None = None, ax=None):
    """Show (or save) a row of images, e.g. decodings along a latent interpolation.

    `frames` is (steps, C, H, W) or (rows, steps, C, H, W) in [-1, 1].
    """
    frames = torch.as_tensor(frames)
    if frames.dim() == 5:
        rows, steps = frames.shape[:2]
        flat = frames.reshape(rows * steps, *frames.shape[2:])
    else:
        steps = frames.shape[0]
        flat = frames
    if path is not None:
        return save_grid(flat, path, nrow=steps)
    return show_grid(flat, nrow=steps, title=title, ax=ax)
