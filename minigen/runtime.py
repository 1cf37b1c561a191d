"""Where and how a run executes: device, seeds, precision, processes, the allocator.

Small, independent answers that `fit`, the CLI and the benchmarks share:

- `select_device`: "auto" -> cuda, then mps, then cpu; anything else is checked.
- `set_seed` seeds every global RNG; `derive_seed` makes a seed that is a fixed function of
  its arguments (data order, worker seeds, re-seeding on resume).
- `autocast_dtype`: which mixed precision a config's ``precision`` means on a device.
- `dist_env` / `init_distributed`: the torchrun environment and the process group.
- `tune_malloc`: raise glibc malloc's mmap and trim thresholds so big activation buffers
  are reused instead of being mapped and page-faulted in again every step on a CPU
  (opt out with ``MINIGEN_NO_MALLOPT=1``; see benchmarks/train_overhead.py).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- seeds


def set_seed(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a fixed function of `parts` (same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, ("minigen", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- device


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


def wants_cuda(pref) -> bool:
    """Whether a device preference ('auto', 'cuda:1', ...) resolves to a GPU on this machine."""
    return torch.cuda.is_available() and (pref == "auto" or str(pref).startswith("cuda"))


# ----------------------------------------------------------------------------- precision


def cuda_bf16() -> bool:
    """Native bf16 on the current GPU (emulated bf16 on older GPUs counts as no)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag
        return torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device):
    """-> (autocast dtype or None, use a GradScaler) for a ``precision`` in `PRECISIONS`.

    "auto" is bf16 on a CUDA GPU that supports it (Ampere and newer: no loss scaling needed,
    same exponent range as fp32), fp16 with a GradScaler on older GPUs, fp32 elsewhere.
    Asking for bf16 on a GPU without it is an error rather than a silent slow emulation.
    """
    p = precision
    if p == "auto":
        if device.type != "cuda":
            return None, False
        p = "bf16" if cuda_bf16() else "fp16"
    if p == "bf16" and device.type == "cuda" and not cuda_bf16():
        raise ValueError(f"precision='bf16' but {torch.cuda.get_device_name(device)} does not support "
                         f"bfloat16; use precision='fp16' (with loss scaling) or 'auto'")
    if p == "fp32":
        return None, False
    if p == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


# ----------------------------------------------------------------------------- processes (DDP)


def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the environment torchrun sets; (1, 0, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device_pref) -> None:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) unless it is up.

    The group is kept for later calls in this process and destroyed at exit: creating the
    default group again after destroying it reuses the rendezvous keys of the first one and
    can hang.
    """
    if dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if wants_cuda(device_pref) else "gloo")
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- allocator


_MALLOC_TUNED = False


def tune_malloc() -> None:
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


__all__ = ["PRECISIONS", "set_seed", "derive_seed", "select_device", "wants_cuda", "cuda_bf16",
           "autocast_dtype", "dist_env", "init_distributed", "tune_malloc"]
