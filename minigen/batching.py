"""Batches for `fit`: a deterministic, endless, step-indexed order, and the copy to the device.

The order is a pure function of ``(seed, step)``: each epoch is a permutation drawn from a
generator seeded with ``(seed, epoch)``, and global batch ``s`` takes positions
``s*B .. (s+1)*B-1`` of the endless concatenation of epochs. Resuming at step ``s`` therefore
continues exactly, on any number of ranks: rank ``r`` of ``W`` takes the ``r``-th contiguous
shard of the global batch, split into ``grad_accum`` micro-batches.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from minigen.runtime import derive_seed


class StepOrder:
    """Which dataset indices global batch `step` holds: a function of (seed, step) only."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # batches move forward: keep only recent epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
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


class MicroBatchSampler(torch.utils.data.Sampler):
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


def check_data(data) -> int:
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


def micro_batches(data, sampler, num_workers, pin, seed):
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
        g = torch.Generator().manual_seed(derive_seed(seed, "workers", sampler.start))
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


def to_device(batch, device, pin, channels_last):
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
        return type(batch)(to_device(b, device, pin, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, pin, channels_last) for k, v in batch.items()}
    return batch


__all__ = ["StepOrder", "MicroBatchSampler", "check_data", "micro_batches", "to_device"]
