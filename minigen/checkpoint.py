"""Checkpoints: writing them safely, reading them safely, rebuilding the model they hold.

A minigen checkpoint is a dict saved with `torch.save` that holds only tensors and plain
containers, so `torch.load(weights_only=True)` can read it without running pickled code:

    format (the layout's version, `FORMAT`), minigen_version, model_class
    ("minigen.vqgan.VQGAN"), model_config (the dataclass as a dict), model (state_dict),
    ema (EMA.state_dict() or None), optimizers, scalers, step, rng (one RNG state per rank,
    see `rng_state`), train_config

The layout is versioned: ``format`` is 2 since it was introduced; files without it are
format 1 (same layout, written by minigen 0.1.0 before the field existed, like the shipped
reference checkpoints) and are migrated on load (`_MIGRATIONS`). A file from a newer minigen
(format > `FORMAT`) is refused with a message saying to upgrade, never half-read.

`fit` builds one (`training_state`), writes it (`save_checkpoint`) and resumes from it
(`restore_training_state`); `load_model` rebuilds the model
from ``model_class`` + ``model_config`` (the CLI's `sample`, the latent diffusion model's
autoencoder, the shipped reference weights all go through it). ``model_class`` is the
class's import path, so a class keeps loading as long as that path imports: a module that
moves a model class must leave its name importable from the old module.

Every file written here is written atomically (`atomic_save`): a temporary file in the same
folder (``.NAME.tmp-PID-XXXXXXXX``), flushed and fsynced, then renamed over the target, so a
crash never leaves a half-written checkpoint or cache file where a good one was. A process
killed mid-write leaves its temporary file; `remove_stale_temp_files` (called by `fit` once
it holds the run directory's lock) deletes those whose writing process is gone.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import os
import random
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 2  # the checkpoint layout this minigen writes; it reads 1..FORMAT


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or for another model."""


# ----------------------------------------------------------------------------- writing


def atomic_save(obj, path) -> None:
    """`torch.save(obj)` to `path` atomically: a crash mid-write never leaves a broken file.

    The bytes go to a uniquely named temporary file in the same folder, ``.NAME.tmp-PID-XXXX``
    (so concurrent writers never share one, and a later run can tell whether its writer is
    still alive), are flushed and fsynced, and the file is renamed over `path` (os.replace
    is atomic on POSIX and Windows); the folder is then fsynced so the rename itself is durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
                if "writ" not in str(e).lower():
                    raise
                import shutil

                code = errno.ENOSPC if shutil.disk_usage(path.parent).free < (1 << 20) else errno.EIO
                raise OSError(code, f"{os.strerror(code)} ({str(e).splitlines()[0][-120:]})", str(path)) from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_checkpoint(path, state: dict) -> None:
    """Write a checkpoint dict with `atomic_save`, stamped with the layout's `FORMAT`."""
    atomic_save({"format": FORMAT, **state}, path)


# .checkpoint.pt.tmp-1234-abcd1234 (now) and .checkpoint.pt.abcd1234.tmp (minigen 0.1.0, no PID)
_TEMP_WITH_PID = re.compile(r"^\..+\.tmp-(\d+)-[^/]+$")
_TEMP_LEGACY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_LEGACY_QUIET_S = 600  # a live writer keeps touching its file; one untouched this long is dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files of writes that were killed before their rename; -> the removed.

    A file named by `atomic_save` carries its writer's PID: it is removed only if no process
    with that PID is alive (a live one may still be writing it: a concurrent writer, or a
    reused PID, is left alone). Files of the older PID-less naming are removed only if nothing
    touched them for 10 minutes. `fit` calls this for its out_dir while it holds the run lock,
    so no other minigen run is writing checkpoints there.
    """
    removed = []
    now = time.time()
    for p in Path(folder).iterdir():
        m = _TEMP_WITH_PID.match(p.name)
        try:
            if m:
                stale = int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
            elif _TEMP_LEGACY.match(p.name):
                stale = now - p.stat().st_mtime > _LEGACY_QUIET_S
            else:
                continue
            if stale and p.is_file():
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def class_name(obj) -> str:
    """The import path of a class or of an object's class: ``"minigen.vqgan.VQGAN"``."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def model_header(model: nn.Module) -> dict:
    """The part of a checkpoint that says what model it holds and how to rebuild it."""
    import minigen

    cfg = getattr(model, "config", None)
    return {"minigen_version": minigen.__version__,
            "model_class": class_name(model),
            "model_config": dataclasses.asdict(cfg)
            if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else None}


# ----------------------------------------------------------------------------- reading


def _same_class(saved: str, expected: str) -> bool:
    if saved == expected:
        return True
    # a class defined in a script or notebook is "__main__.X" there and "module.X" elsewhere
    s_mod, _, s_name = saved.rpartition(".")
    e_mod, _, e_name = expected.rpartition(".")
    return s_name == e_name and "__main__" in (s_mod, e_mod)


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
        if re.search(r"GLOBAL \S+|Unsupported global", msg):
            # a pickle of arbitrary Python objects: unpickling it would import and call them
            found = re.search(r"GLOBAL (\S+)", msg)
            raise CheckpointError(
                f"{path} is not a minigen checkpoint, and loading it could run code: it contains "
                f"Python objects ({found.group(1) if found else 'a class or function'}) that "
                f"torch.load(weights_only=True) refused to unpickle. minigen checkpoints hold only "
                f"tensors and plain containers. torch's advice: torch.load(path, weights_only=False) "
                f"would likely load it but can execute arbitrary code; do that only if you got the "
                f"file from a trusted source."
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
    ckpt = _migrate(ckpt, path)
    if expected_model is not None:
        expected = expected_model if isinstance(expected_model, str) else class_name(expected_model)
        if not _same_class(ckpt["model_class"], expected):
            raise CheckpointError(
                f"{path} is a checkpoint of {ckpt['model_class']}, not of {expected}. "
                f"Use the matching model class, or another out_dir/path."
            )
    return ckpt


def _from_format_1(ckpt: dict) -> dict:
    """Format 1 (minigen 0.1.0 before versioning) had the same fields, only no ``format``."""
    return {**ckpt, "format": 2}


_MIGRATIONS = {1: _from_format_1}  # format n -> a function returning the dict in format n + 1


def _migrate(ckpt: dict, path) -> dict:
    """Bring a loaded checkpoint to `FORMAT`, or refuse one this minigen cannot read."""
    import minigen

    fmt = ckpt.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{path} has checkpoint format {fmt!r}, which no minigen writes "
                              f"(formats are 1..{FORMAT}); the file is damaged or not from minigen")
    if fmt > FORMAT:
        raise CheckpointError(
            f"{path} was written by minigen {ckpt.get('minigen_version', '?')} (checkpoint format "
            f"{fmt}); this is minigen {minigen.__version__}, which reads formats up to {FORMAT}: "
            f"upgrade minigen (pip install -U minigen) to load it")
    while fmt < FORMAT:
        if fmt not in _MIGRATIONS:
            raise CheckpointError(f"{path} has checkpoint format {fmt}, which this minigen "
                                  f"{minigen.__version__} can no longer read; load it with an older "
                                  f"minigen and save it again")
        ckpt = _MIGRATIONS[fmt](ckpt)
        fmt = ckpt["format"]
    return ckpt


# ----------------------------------------------------------------------------- rebuilding


def import_class(qualname: str) -> type:
    """The class at an import path such as ``"minigen.vqgan.VQGAN"`` (a checkpoint's model_class)."""
    module_name, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"cannot import the model class {qualname!r}: this minigen has no such class") from None


def config_class(cls: type, fields=None) -> type:
    """The dataclass `cls` is built from: ``<Class>Config`` in its module (VQGAN -> VQGANConfig),
    else the module's one dataclass whose field names are `fields`."""
    mod = importlib.import_module(cls.__module__)
    named = getattr(mod, cls.__name__ + "Config", None)
    if dataclasses.is_dataclass(named):
        return named
    if fields is not None:
        classes = [obj for obj in vars(mod).values() if dataclasses.is_dataclass(obj) and isinstance(obj, type)]
        for obj in classes:
            if {f.name for f in dataclasses.fields(obj)} == set(fields):
                return obj
        # a config with fields this minigen lacks (a newer one's): the dataclass it extends,
        # so that `rebuild` can name the unknown fields
        within = [obj for obj in classes if {f.name for f in dataclasses.fields(obj)} < set(fields)]
        if within:
            return max(within, key=lambda obj: len(dataclasses.fields(obj)))
    raise CheckpointError(f"cannot rebuild {cls.__qualname__}: no dataclass {cls.__name__}Config in {cls.__module__}")


def model_state(ckpt: dict) -> dict:
    """The weights to load from a checkpoint: the EMA's when it has one, the raw ones else.

    The EMA holds the averaged parameters and the buffers; anything else (e.g. a buffer
    registered after the EMA was made) comes from the raw model state. (The EMA also copies
    non-persistent buffers, which no state_dict holds: those are left out.)
    """
    state = dict(ckpt["model"])
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and "shadow" in ema:
        state.update(ema["shadow"])
        state.update({k: v for k, v in (ema.get("buffers") or {}).items() if k in state})
    return state


def rebuild(ckpt: dict, where="the checkpoint") -> nn.Module:
    """The model a loaded checkpoint holds: ``model_class(config=<Class>Config(**model_config))``
    with `model_state`'s weights. `where` names the file in error messages."""
    qualname = ckpt.get("model_class") or ""
    try:
        cls = import_class(qualname)
    except CheckpointError:
        raise CheckpointError(f"{where} holds a {qualname!r}, which this minigen cannot build") from None
    cfg = ckpt.get("model_config")
    if cfg is None:
        raise CheckpointError(f"{where} has no model config; it was saved from a model without a dataclass `config`")
    config_cls = config_class(cls, cfg)
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise CheckpointError(
            f"{where} has model_config field(s) {unknown} that this minigen's {config_cls.__name__} "
            f"does not know: it was written by another minigen (its minigen_version: "
            f"{ckpt.get('minigen_version', '?')}). Load it with that version, or upgrade minigen")
    try:
        model = cls(config=config_cls(**cfg))
        model.load_state_dict(model_state(ckpt))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} cannot be rebuilt as a {qualname}: {e}") from None
    return model


def resolve(path) -> Path:
    """A run folder means the checkpoint.pt inside it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_model(path, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model in a minigen checkpoint (EMA weights when present), in eval mode.

    -> (model, checkpoint dict). `path` may be the checkpoint file or the run folder holding it.
    """
    path = resolve(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    return rebuild(ckpt, path).to(device).eval(), ckpt


# ----------------------------------------------------------------------------- hashes


def file_sha256(path) -> str:
    """sha256 of a file's bytes, as hex (the check on shipped weights)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, values), as hex."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- RNG state
# In a form that torch.load(weights_only=True) accepts: tensors, lists, ints, floats.


def rng_state(device: torch.device) -> dict:
    """Every RNG a training step may draw from: torch (CPU, all CUDA devices, MPS), numpy, python."""
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


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` returned (CUDA states only on a machine with as many GPUs)."""
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


# ----------------------------------------------------------------------------- a training run's state
# What `fit` writes every ckpt_every steps and resumes from: the layout in the docstring above.


def training_state(model: nn.Module, ema, optimizers: dict, scalers: dict | None, step: int, rngs: list,
                   train_config: dict) -> dict:
    """A training run's checkpoint dict, every tensor copied to the CPU: a snapshot that
    further training does not change (`fit` may hold it a step before writing it)."""
    return snapshot({
        **model_header(model),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "scalers": {name: sc.state_dict() for name, sc in scalers.items()} if scalers else None,
        "step": step,
        "rng": rngs,
        "train_config": train_config,
    })


def restore_training_state(ckpt: dict, model: nn.Module, optimizers: dict, scalers: dict | None, ema,
                           out_dir) -> None:
    """Load a training checkpoint's model, optimizer, grad-scaler and EMA states in place.

    The optimizers' state (moments, step counts) continues; their hyperparameters (lr, betas,
    weight decay) stay the ones they were built with: a resume with a lower lr must use it.
    A model or optimizer set that does not fit the checkpoint is a CheckpointError saying what
    differs and what to do. The step, the RNG states and the log are the caller's (`fit`).
    """
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing/unexpected keys, size mismatch: another model config
        saved, now = ckpt.get("model_config") or {}, model_header(model)["model_config"] or {}
        diff = [f"{k}={saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]
        raise CheckpointError(
            f"{out_dir} was trained with other model settings "
            f"({'; '.join(diff) or str(e).splitlines()[0]}), so its checkpoint does not fit this model. "
            f"To resume it, use the same settings (on the command line: the same --set options); to "
            f"train this model from scratch, choose another out_dir (--out)") from None
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME
    if set(ckpt["optimizers"]) != set(optimizers):
        raise CheckpointError(f"{ckpt_path} has optimizers {sorted(ckpt['optimizers'])} but the "
                              f"model now configures {sorted(optimizers)}")
    for name, opt in optimizers.items():
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(ckpt["optimizers"][name])
        for g, hyper in zip(opt.param_groups, fresh):
            g.update(hyper)
    if scalers is not None and ckpt.get("scalers"):
        for name, sc in scalers.items():
            sc.load_state_dict(ckpt["scalers"][name])
    if ema is not None:
        if ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        else:
            warnings.warn(f"{ckpt_path} has no EMA state: the EMA restarts from the current weights")


def snapshot(obj):
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


def first_non_finite(obj, where: str = "") -> str | None:
    """The name of the first floating-point tensor in a nested state with a NaN or inf, or None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = first_non_finite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


__all__ = ["CHECKPOINT_NAME", "FORMAT", "CheckpointError", "atomic_save", "save_checkpoint", "load_checkpoint",
           "remove_stale_temp_files",
           "class_name", "model_header", "import_class", "config_class", "model_state", "rebuild", "resolve",
           "load_model",
           "file_sha256", "weights_hash", "rng_state", "set_rng_state",
           "training_state", "restore_training_state", "snapshot", "first_non_finite"]
