"""Instrumentation the lessons use, kept out of the notebooks so they read as prose and ideas.

- `training_step_cost(loss_fn)`: FLOPs, saved activation memory and time of one training step;
- `record_inputs(module)`: the positional inputs of a module's next call (a forward hook);
- `plot_word_maps(image, maps, words)`: one attention map per prompt word beside the image;
- `plot_sweep(x, panels)`: metrics against a swept setting, one panel per metric.

Lesson 07 uses all four (latent vs pixel cost, cross-attention maps, the guidance sweep).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def training_step_cost(loss_fn, repeats: int = 3, device=None) -> dict:
    """Measure one training step, loss_fn().backward(), where loss_fn() returns a scalar loss.

    Returns {"gflops": forward + backward FLOPs / 1e9 (torch's FlopCounterMode: matrix products
    and convolutions; on a CPU it has no formula for the fused scaled_dot_product_attention
    kernel, so attention's own products are left out there), "saved_mib": bytes of the distinct
    storages autograd saves for the backward pass / 2**20 (views of one storage count once),
    "ms": median wall time of `repeats` steps after one warm-up step, "peak_mib": CUDA peak memory
    of those steps / 2**20 (nan on the CPU)}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"

    def step():
        loss = loss_fn()
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
        loss.backward()

    with FlopCounterMode(display=False) as counter:  # also the warm-up step
        step()
    storages = {}

    def pack(tensor):  # record each saved tensor's storage once (views share it)
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    return dict(gflops=counter.get_total_flops() / 1e9, saved_mib=sum(storages.values()) / 2**20,
                ms=1000 * sorted(times)[len(times) // 2], peak_mib=peak)


@contextlib.contextmanager
def record_inputs(module: torch.nn.Module):
    """Context manager: yields a dict whose "inputs" becomes the detached positional inputs of
    `module`'s last call inside the block. The output is left unchanged; the hook is removed on exit.

        with record_inputs(model.get_submodule(name)) as rec:
            model(x)
        module(*rec["inputs"], return_attention=True)
    """
    recorded = {}

    def hook(_module, inputs, _output):  # returns None: the output is left unchanged
        recorded["inputs"] = [x.detach() if torch.is_tensor(x) else x for x in inputs]

    handle = module.register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()
    if "inputs" not in recorded:
        raise RuntimeError(f"{type(module).__name__} was not called inside the `with record_inputs(...)` block")


def plot_word_maps(image, maps, words, title: str | None = None):
    """The image beside one heat map per word: maps is (L = side*side, M) weights over M >= len(words)
    tokens, column k for words[k]; image is one (C, H, W) image in [-1, 1]. Returns the figure."""
    import matplotlib.pyplot as plt

    from minigen.plot import image_grid

    maps = torch.as_tensor(maps).detach().cpu()
    if maps.dim() != 2 or maps.shape[1] < len(words):
        raise ValueError(f"maps must be (positions, tokens) with at least {len(words)} token columns, "
                         f"got shape {tuple(maps.shape)}")
    side = math.isqrt(maps.shape[0])
    if side * side != maps.shape[0]:
        raise ValueError(f"maps has {maps.shape[0]} positions, not a square number: not one square feature map")
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.6 * (len(words) + 1), 2))
    axes[0].imshow(image_grid(image[None] if image.dim() == 3 else image, nrow=1))
    axes[0].set_title("sample", fontsize=8)
    for k, word in enumerate(words):
        axes[k + 1].imshow(maps[:, k].reshape(side, side).numpy(), cmap="magma", vmin=0)
        axes[k + 1].set_title(word, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_sweep(x, panels: dict, xlabel: str, hlines: dict | None = None):
    """One panel per metric against the swept setting x: panels = {title: values (one per x)};
    hlines = {title: (y, label)} draws a dashed reference line (e.g. real vs real) in that panel."""
    import matplotlib.pyplot as plt

    x = list(x)
    for name, values in panels.items():
        if len(values) != len(x):
            raise ValueError(f"panel {name!r} has {len(values)} values for {len(x)} settings")
    unknown = set(hlines or {}) - set(panels)
    if unknown:
        raise ValueError(f"hlines for unknown panel(s) {sorted(unknown)}; panels: {list(panels)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        ax.plot(x, list(values), "o-")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        if hlines and name in hlines:
            y, label = hlines[name]
            ax.axhline(y, color="gray", ls="--", label=label)
            ax.legend()
    fig.tight_layout()
    return fig


__all__ = ["training_step_cost", "record_inputs", "plot_word_maps", "plot_sweep"]
