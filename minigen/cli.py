"""The `minigen` command: datasets, train, sample, tour, lessons, grade.

    minigen datasets                       # list the datasets
    minigen datasets preview shapes        # write a grid of examples to PNG
    minigen train vae --data digits --steps 2000 --out runs/vae
    minigen train ddpm --data path/to/my/images --size 32 --out runs/art
    minigen sample runs/vae/checkpoint.pt --n 64 --out samples.png
    minigen train vqgan --data shapes --set code_dim=4 --out runs/vqgan  # then latent diffusion:
    minigen train ldm --data shapes --set autoencoder=runs/vqgan/checkpoint.pt --out runs/ldm
    minigen sample runs/ldm --prompt "a small red circle on a blue background" --guidance 3 --n 16
    minigen train flow --data shapes --set backbone=dit --out runs/flow  # flow matching, a DiT
    minigen sample runs/flow --sampler heun --steps 10                   # 19 network evaluations
    minigen tour                           # train every family briefly, write a report
    minigen lessons build                  # regenerate lessons/ from solutions/
    minigen grade submissions/*.ipynb --out grades.csv

Every subcommand has --help. A mistake in the command exits with status 2, a problem of the
environment (read-only or full disk, the run folder in use, a run that diverged) with status 1;
either way one message says what was wrong and what to do. --debug (or MINIGEN_DEBUG=1) shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import importlib
import math
import os
import sys
from pathlib import Path

# name -> (module, model class, what it is). A module listed here exposes
# build(overrides, image_shape, num_classes) and its class exposes a dataclass `config`.
MODELS = {
    "autoencoder": ("minigen.autoencoder", "AutoEncoder", "plain convolutional autoencoder (lesson 00)"),
    "vae": ("minigen.vae", "VAE", "variational autoencoder (lesson 01)"),
    "vqvae": ("minigen.vq", "VQVAE", "VQ-VAE with a learned codebook (lesson 02)"),
    "vqgan": ("minigen.vqgan", "VQGAN", "VQGAN: VQ-VAE + perceptual and patch-GAN losses (lesson 03)"),
    "ddpm": ("minigen.diffusion", "GaussianDiffusion", "pixel-space diffusion with a U-Net (lessons 05-06)"),
    "ldm": ("minigen.ldm", "LatentDiffusion", "latent diffusion with text prompts (lesson 07)"),
    "flow": ("minigen.flow", "FlowMatching", "pixel-space flow matching (rectified flow) (lesson 09)"),
}


def image_config(config_cls, overrides, image_shape, **defaults):
    """The common part of an image model's ``build``: its config for (C, H, W) square images.

    in_channels=C and image_size=H, then the model's `defaults` for this shape, then the
    --set `overrides`, which must name fields of `config_cls`.
    """
    name = config_cls.__name__.removesuffix("Config")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"{name} needs square images, got {h}x{w}")
    overrides = dict(overrides or {})
    valid = {f.name for f in dataclasses.fields(config_cls)}
    for key in ("in_channels", "image_size"):
        if key in overrides:
            raise ValueError(f"{key} comes from the data ({c if key == 'in_channels' else h} here) and cannot "
                             f"be set; " + ("resize the images with --size instead (size= in Python)"
                                            if key == "image_size" else "convert the images instead"))
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown {name} option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return config_cls(**{"in_channels": c, "image_size": h, **defaults, **overrides})


class UsageError(Exception):
    """Bad input from the command line: reported without a traceback, exit status 2."""


class EnvironmentProblem(Exception):
    """The command is fine but the machine is not (read-only or full disk, folder in use, a
    diverged run): reported without a traceback, exit status 1."""


# ---------------------------------------------------------------------------- argument types
# argparse reports a failed type check as "argument --n: ..." with exit status 2.

def _int_at_least(low: int, hint: str = ""):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}{hint}")
        return v
    parse.__name__ = "int"
    return parse


def _float_in(low: float, high: float = math.inf, *, low_open=True, high_open=True, what=""):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


def _config_fields(mod) -> dict:
    """field name -> default, over the config dataclasses a model module builds from (for
    checking --set values; keys not found here are left to the module's build)."""
    out = {}
    for obj in vars(mod).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config"):
            for f in dataclasses.fields(obj):
                if f.default is not dataclasses.MISSING:
                    out.setdefault(f.name, f.default)
    return out


def _check_override(key, value, default) -> None:
    """A --set value must have its field's type (and sign, for counts): a clear message here
    instead of an error from deep inside a layer constructor."""
    shown = f"--set {key}={value!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{shown}: {key} is True or False (default {default})")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{shown}: {key} must be a whole number (default {default})")
        if default > 0 and value < 1:
            raise UsageError(f"{shown}: {key} must be at least 1 (default {default})")
        if default == 0 and value < 0:
            raise UsageError(f"{shown}: {key} must be at least 0 (default {default})")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{shown}: {key} must be a finite number (default {default})")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UsageError(f"{shown}: {key} must be a string (default {default!r})")
    elif isinstance(default, tuple):
        if not isinstance(value, (tuple, list)):
            raise UsageError(f"{shown}: {key} must be a tuple such as {default} (write it without spaces, "
                             f"or quote it)")


def _environment_error(e: OSError, flag: str, path, doing: str) -> Exception:
    """An OSError while writing `path` (given by `flag`) -> the error to report: a path that
    cannot be right is the command's mistake (2); anything else is the machine's (1)."""
    why = e.strerror or str(e)
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return UsageError(f"{flag} {path}: cannot {doing} ({why}: {e.filename or path}); "
                          f"a part of that path is a file, not a folder: choose another {flag}")
    hint = {errno.ENOSPC: "the disk is full: free some space, or choose another",
            errno.EDQUOT: "your disk quota is used up: free some space, or choose another",
            errno.EROFS: "the file system is read-only: choose a writable",
            errno.EACCES: "you may not write there: choose a writable",
            errno.EPERM: "you may not write there: choose a writable"}.get(e.errno, "choose another")
    return EnvironmentProblem(f"{flag} {path}: cannot {doing} ({why}); {hint} {flag}")


def _check_writable_folder(flag: str, folder: Path) -> None:
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file; {flag} names the run folder (checkpoint, log, "
                         f"samples): choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise _environment_error(e, flag, folder, "write the run folder") from None


def _available_models() -> dict:
    out = {}
    for name, (module, cls, desc) in MODELS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "build") and hasattr(mod, cls):
            out[name] = (mod, cls, desc)
    return out


def _parse_overrides(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--set expects key=value, got {pair!r} (example: --set latent_dim=16)")
        key, value = pair.split("=", 1)
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            v = value  # a bare string such as a schedule name
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--set {key.strip()}={value}: a setting must be a finite number")
        out[key.strip()] = v
    return out


# ---------------------------------------------------------------------------- datasets

def cmd_datasets(args) -> int:
    from minigen import data

    if args.action in (None, "list"):
        for name, desc in data.list_datasets().items():
            print(f"{name:15s} {desc}")
        print("\nAny folder of PNG/JPEG images is a dataset too: --data path/to/folder")
        return 0
    if not args.name:
        raise UsageError("`minigen datasets preview` needs a dataset name, e.g. `minigen datasets preview shapes`")
    from minigen import plot

    ds = data.load_dataset(args.name, split=args.split, size=args.size)
    n = min(args.n, len(ds))
    x, _ = ds.tensors(n)
    out = Path(args.out or f"{Path(args.name).name}_preview.png")
    plot.save_grid(x, out, nrow=int(n ** 0.5 + 0.999), scale=2)
    print(f"{len(ds)} images of shape {tuple(ds.image_shape)}, {len(ds.classes)} classes; grid of {n} -> {out}")
    if getattr(ds, "captions", None):
        for c in ds.captions[:4]:
            print("  caption:", c)
    return 0


# ---------------------------------------------------------------------------- train

# generic training defaults; a model module may override them with TRAIN_DEFAULTS (ldm does)
_TRAIN_DEFAULTS = dict(steps=2000, batch_size=64, lr=2e-4, warmup=0, schedule="constant", ema=None)


def cmd_train(args) -> int:
    import inspect

    from minigen import data, runtime, train

    models = _available_models()
    if args.model not in models:
        known = ", ".join(models) or "(none installed)"
        raise UsageError(f"unknown model {args.model!r}; available: {known}")
    mod, _, _ = models[args.model]
    overrides = _parse_overrides(args.set)
    known = _config_fields(mod)
    for key, value in overrides.items():
        if key in ("image_size", "in_channels", "image_shape"):
            raise UsageError(f"--set {key}: the image size and channels come from the data; use --size N to "
                             f"resize the images to N x N")
        if key in known:
            _check_override(key, value, known[key])
    if "backbone" in overrides and args.model not in _models_with_backbone(models):
        raise UsageError(f"{args.model} has no backbone option; --set backbone=... is for "
                         f"{', '.join(_models_with_backbone(models))}")
    out = Path(args.out)
    _check_writable_folder("--out", out)  # before the data loads: fail in a second, not a minute
    ds = data.load_dataset(args.data, split="train", size=args.size)
    if args.n_train is not None:
        ds = ds.head(args.n_train)
    # a module whose build takes the dataset (ldm: vocabulary, latent scale) gets it
    extra = {"dataset": ds} if "dataset" in inspect.signature(mod.build).parameters else {}
    # --seed fixes the starting weights: the model is built from freshly seeded generators
    # (fit seeds them again, with the rank, before the first step)
    runtime.set_seed(args.seed)
    try:
        model = mod.build(overrides, tuple(ds.image_shape), len(ds.classes), **extra)
    except (TypeError, ValueError, RuntimeError) as e:
        if not overrides:
            raise
        raise UsageError(f"bad --set for {args.model} ({' '.join(args.set)}): {e}") from None
    # a model that trains on something other than the images (ldm: cached latents + tokens)
    train_data = model.training_data(ds) if hasattr(model, "training_data") else ds
    defaults = {**_TRAIN_DEFAULTS, **getattr(mod, "TRAIN_DEFAULTS", {})}
    opt = {k: (getattr(args, k) if getattr(args, k) is not None else defaults[k]) for k in defaults}
    cfg = train.TrainConfig(
        steps=opt["steps"], batch_size=opt["batch_size"], lr=opt["lr"], out_dir=args.out,
        device=args.device, seed=args.seed, sample_every=args.sample_every,
        ckpt_every=args.ckpt_every, ema_decay=opt["ema"], warmup_steps=opt["warmup"],
        lr_schedule=opt["schedule"], compile=args.compile,
    )
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    what = f"{nparams / 1e6:.2f}M trainable parameters" + (f", {frozen / 1e6:.2f}M frozen" if frozen else "")
    # under torchrun every process runs this command: report once, from rank 0
    say = print if runtime.dist_env()[1] == 0 else (lambda *a, **k: None)
    say(f"training {args.model} ({what}) on {args.data} "
        f"({len(ds)} images {tuple(ds.image_shape)}) for {cfg.steps} steps -> {args.out}")
    try:
        result = train.fit(model, train_data, cfg)
    except train.RunLockedError as e:
        raise EnvironmentProblem(str(e)) from None
    except FloatingPointError as e:
        raise EnvironmentProblem(f"{e} On the command line: a lower --lr (now {cfg.lr:g}) or a longer "
                                 f"--warmup (now {cfg.warmup_steps}), with the same --out.") from None
    except OSError as e:
        err = _environment_error(e, "--out", out, f"write {e.filename or 'the run'}")
        if isinstance(err, EnvironmentProblem):  # training stopped mid-way: say how to continue
            err = EnvironmentProblem(f"{err}; the same command then resumes from the last checkpoint")
        raise err from None
    last = result.history[-1] if result.history else {}
    say(f"done at step {result.step}; last loss {last.get('loss', float('nan')):.4f}; "
        f"checkpoint in {Path(args.out) / 'checkpoint.pt'}")
    return 0


def _models_with_backbone(models) -> list:
    """The models whose config has a `backbone` field (unet or dit), or whose module says which
    backbones it takes (BACKBONES)."""
    import dataclasses

    from minigen.checkpoint import config_class

    out = []
    for name, (mod, cls, _) in models.items():
        try:
            fields = {f.name for f in dataclasses.fields(config_class(getattr(mod, cls)))}
        except (ValueError, TypeError):  # no <Class>Config (CheckpointError is a ValueError)
            fields = set()
        if "backbone" in fields or hasattr(mod, "BACKBONES"):
            out.append(name)
    return out


# ---------------------------------------------------------------------------- sample


def sampler_choices(model):
    """The `sampler=` values model.sample_images accepts: () if it takes no sampler, None if it
    takes one but its objective is not one minigen knows (the model then checks the value)."""
    import inspect

    from minigen import diffusion, flow

    if "sampler" not in inspect.signature(model.sample_images).parameters:
        return ()
    objective = getattr(model, "diffusion", model)  # latent diffusion samples through its objective
    if isinstance(objective, flow.FlowMatching):
        return flow.FLOW_SAMPLERS
    if isinstance(objective, diffusion.GaussianDiffusion):
        return diffusion.SAMPLERS
    return None


def _models_with_sampler() -> list:
    import inspect

    out = []
    for name, (mod, cls, _) in _available_models().items():
        sample_images = getattr(getattr(mod, cls), "sample_images", None)
        if sample_images is not None and "sampler" in inspect.signature(sample_images).parameters:
            out.append(name)
    return out

def load_model(path, device="cpu"):
    """-> (model, checkpoint): `minigen.checkpoint.load_model`, kept here for existing imports
    (imported lazily so that `minigen --help` does not wait for torch)."""
    from minigen.checkpoint import load_model as load

    return load(path, device)


def cmd_sample(args) -> int:
    import torch
    from minigen import plot, train

    from minigen.checkpoint import resolve

    path = resolve(args.checkpoint)  # a run folder means its checkpoint.pt
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; --out names the PNG file to write, e.g. --out {out / 'samples.png'}")
    device = train.select_device(args.device)
    model, ckpt = load_model(path, device)
    torch.manual_seed(args.seed)
    kwargs = {}
    for key in ("prompt", "guidance", "steps", "sampler"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    if not hasattr(model, "sample_images"):
        raise UsageError(f"{type(model).__name__} cannot sample (it is not a generative model); "
                         "train a vae, ddpm, flow or ldm instead (a vqvae or vqgan samples through a transformer prior: see lesson 04 and `minigen tour`)")
    if args.sampler is not None:
        choices = sampler_choices(model)
        if choices == ():
            raise UsageError(f"{type(model).__name__} has no sampler to choose; --sampler is for "
                             f"{', '.join(_models_with_sampler())} checkpoints")
        if choices is not None and args.sampler not in choices:
            raise UsageError(f"unknown sampler {args.sampler!r} for {type(model).__name__}; "
                             f"choose one of {', '.join(choices)}")
    import warnings

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            x = model.sample_images(args.n, **kwargs)
        except TypeError as e:
            raise UsageError(f"{type(model).__name__} does not accept {sorted(kwargs)}: {e}") from None
    for w in {str(w.message): w for w in caught}.values():  # e.g. unknown words in the prompt
        print(f"minigen sample: warning: {w.message}", file=sys.stderr)
    if not torch.isfinite(x).all():
        raise EnvironmentProblem(f"the model produced non-finite samples from {path}: its weights are broken; "
                                 "use an earlier checkpoint or train again")
    try:
        plot.save_grid(x, out, nrow=int(args.n ** 0.5 + 0.999), scale=2)
    except OSError as e:
        raise _environment_error(e, "--out", out, "write the samples") from None
    print(f"{args.n} samples from {path} (step {ckpt.get('step')}) -> {out}")
    return 0


# ---------------------------------------------------------------------------- tour, lessons, grade

def cmd_tour(args) -> int:
    from minigen import tour

    return tour.run(out_dir=args.out, quick=args.quick, device=args.device, seed=args.seed)


def cmd_lessons(args) -> int:
    from minigen.course import builder

    return builder.main(args.rest)


def cmd_grade(args) -> int:
    from minigen.course import grader

    return grader.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minigen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `minigen COMMAND --help` for the options of a command.")
    p.add_argument("--version", action="version", version=f"minigen {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error too (also MINIGEN_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # --debug after the command works too (SUPPRESS: absent there, the top-level value stays)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error too (also MINIGEN_DEBUG=1)")

    d = sub.add_parser("datasets", parents=[common], help="list the datasets or preview one as a PNG grid")
    d.add_argument("action", nargs="?", choices=["list", "preview"], help="list (default) or preview")
    d.add_argument("name", nargs="?", help="dataset name or image folder (for preview)")
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--n", type=_int_at_least(1), default=64, help="number of images in the grid")
    d.add_argument("--size", type=_int_at_least(1), default=None, help="resize to SIZE x SIZE")
    d.add_argument("--out", default=None, help="PNG path (default NAME_preview.png)")
    d.set_defaults(func=cmd_datasets)

    t = sub.add_parser("train", parents=[common], help="train a model on a dataset or a folder of images")
    t.add_argument("model", help=f"one of: {', '.join(MODELS)}")
    t.add_argument("--data", default="shapes", help="shapes, digits, mnist, fashion-mnist, cifar10 or a folder")
    t.add_argument("--size", type=_int_at_least(1), default=None, help="resize images to SIZE x SIZE")
    t.add_argument("--steps", type=_int_at_least(0), default=None, help="optimizer steps (default 2000, or the model module's TRAIN_DEFAULTS, e.g. minigen.ldm)")
    t.add_argument("--batch-size", type=_int_at_least(1), default=None, help="default 64")
    t.add_argument("--lr", type=_float_in(0, what="a finite number > 0"), default=None, help="learning rate (default 2e-4 or the model's TRAIN_DEFAULTS)")
    t.add_argument("--warmup", type=_int_at_least(0), default=None, help="learning-rate warm-up steps (default 0 or the model's TRAIN_DEFAULTS)")
    t.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear"],
                   help="learning-rate schedule (default constant or the model's TRAIN_DEFAULTS)")
    t.add_argument("--n-train", type=_int_at_least(1), default=None, metavar="N", help="train on the first N images only")
    t.add_argument("--ema", type=_float_in(0, 1, low_open=False, what="in [0, 1), e.g. 0.999"), default=None,
                   help="EMA decay of the weights, e.g. 0.999")
    t.add_argument("--out", default="runs/latest", help="run directory (checkpoint, log, samples); "
                   "an existing checkpoint there is resumed, and one run at a time may use it")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    t.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seeds the starting weights and the training run: same command, same model")
    t.add_argument("--sample-every", type=_int_at_least(0), default=0)
    t.add_argument("--ckpt-every", type=_int_at_least(0), default=500)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config field, repeatable")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", parents=[common], help="draw samples from a trained checkpoint into a PNG grid")
    s.add_argument("checkpoint", help="checkpoint.pt or its run directory")
    s.add_argument("--n", type=_int_at_least(1), default=64, help="number of samples")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--prompt", default=None, help="text prompt (latent diffusion)")
    s.add_argument("--guidance", type=_float_in(-math.inf, what="a finite number"), default=None,
                   help="classifier-free guidance scale")
    s.add_argument("--steps", type=_int_at_least(1, "; leave --steps out for the model's default"),
                   default=None,
                   help="solver steps (diffusion, flow, ldm; default the model's): one network evaluation "
                        "each for ddim, dpmsolver++ and euler, 2 steps - 1 for heun; ddpm walks all T")
    s.add_argument("--sampler", default=None,
                   help="ddpm, ddim, dpmsolver++ or heun (ddpm, ldm); euler, heun or dpmsolver++ (flow); "
                        "default the model's")
    s.set_defaults(func=cmd_sample)

    tr = sub.add_parser("tour", parents=[common], help="train every model family briefly on built-in data; write a report")
    tr.add_argument("--out", default="tour", help="output folder for the report and images")
    tr.add_argument("--quick", action="store_true", help="tiny budgets (also MINIGEN_QUICK=1)")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--seed", type=_int_at_least(0), default=0)
    tr.set_defaults(func=cmd_tour)

    ls = sub.add_parser("lessons", help="lesson tools: `minigen lessons build [--check]`", add_help=False)
    ls.add_argument("rest", nargs=argparse.REMAINDER)
    ls.set_defaults(func=cmd_lessons)

    g = sub.add_parser("grade", help="grade submitted notebooks: `minigen grade SUBMISSIONS... --out grades.csv`",
                       add_help=False)
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(func=cmd_grade)
    return p


def _version() -> str:
    from minigen import __version__

    return __version__


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `lessons` and `grade` hand everything after them to their own parsers (so their own
    # --help works); argparse's REMAINDER would swallow nothing that starts with a dash.
    if argv and argv[0] in ("lessons", "grade"):
        args = argparse.Namespace(command=argv[0], rest=argv[1:],
                                  func=cmd_lessons if argv[0] == "lessons" else cmd_grade)
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False) or os.environ.get("MINIGEN_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        # Bad input (unknown dataset, broken image folder, missing or foreign checkpoint): the
        # message already says what to do; a traceback would only hide it.
        return _report(args.command, e, 2, debug)
    except (EnvironmentProblem, OSError) as e:
        return _report(args.command, e, 1, debug)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint on disk is intact", file=sys.stderr)
        return 130


def _report(command: str, e: BaseException, status: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exception(e)
    msg = str(e) if not isinstance(e, OSError) or not e.strerror else \
        f"{e.strerror}: {e.filename or ''} (the command could not read or write a file it needs)"
    print(f"minigen {command}: error: {msg}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
