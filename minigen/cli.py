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

Every subcommand has --help. Bad arguments exit with status 2 and say what to do.
"""

from __future__ import annotations

import argparse
import ast
import importlib
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
    import dataclasses

    name = config_cls.__name__.removesuffix("Config")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"{name} needs square images, got {h}x{w}")
    overrides = dict(overrides or {})
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown {name} option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return config_cls(**{"in_channels": c, "image_size": h, **defaults, **overrides})


class UsageError(Exception):
    """Bad input from the command line: reported without a traceback, exit status 2."""


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
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value  # a bare string such as a schedule name
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
    ds = data.load_dataset(args.data, split="train", size=args.size)
    if args.n_train is not None:
        ds = ds.head(args.n_train)
    overrides = _parse_overrides(args.set)
    if "backbone" in overrides and args.model not in _models_with_backbone(models):
        raise UsageError(f"{args.model} has no backbone option; --set backbone=... is for "
                         f"{', '.join(_models_with_backbone(models))}")
    # a module whose build takes the dataset (ldm: vocabulary, latent scale) gets it
    extra = {"dataset": ds} if "dataset" in inspect.signature(mod.build).parameters else {}
    try:
        model = mod.build(overrides, tuple(ds.image_shape), len(ds.classes), **extra)
    except TypeError as e:
        raise UsageError(f"bad --set for {args.model}: {e}") from None
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
    result = train.fit(model, train_data, cfg)
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
    out = Path(args.out)
    plot.save_grid(x, out, nrow=int(args.n ** 0.5 + 0.999), scale=2)
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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("datasets", help="list the datasets or preview one as a PNG grid")
    d.add_argument("action", nargs="?", choices=["list", "preview"], help="list (default) or preview")
    d.add_argument("name", nargs="?", help="dataset name or image folder (for preview)")
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--n", type=int, default=64, help="number of images in the grid")
    d.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE")
    d.add_argument("--out", default=None, help="PNG path (default NAME_preview.png)")
    d.set_defaults(func=cmd_datasets)

    t = sub.add_parser("train", help="train a model on a dataset or a folder of images")
    t.add_argument("model", help=f"one of: {', '.join(MODELS)}")
    t.add_argument("--data", default="shapes", help="shapes, digits, mnist, fashion-mnist, cifar10 or a folder")
    t.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000, or the model module's TRAIN_DEFAULTS, e.g. minigen.ldm)")
    t.add_argument("--batch-size", type=int, default=None, help="default 64")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 or the model's TRAIN_DEFAULTS)")
    t.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps (default 0 or the model's TRAIN_DEFAULTS)")
    t.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear"],
                   help="learning-rate schedule (default constant or the model's TRAIN_DEFAULTS)")
    t.add_argument("--n-train", type=int, default=None, metavar="N", help="train on the first N images only")
    t.add_argument("--ema", type=float, default=None, help="EMA decay of the weights, e.g. 0.999")
    t.add_argument("--out", default="runs/latest", help="run directory (checkpoint, log, samples); "
                   "an existing checkpoint there is resumed")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sample-every", type=int, default=0)
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config field, repeatable")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained checkpoint into a PNG grid")
    s.add_argument("checkpoint", help="checkpoint.pt or its run directory")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--prompt", default=None, help="text prompt (latent diffusion)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--steps", type=int, default=None,
                   help="solver steps (diffusion, flow, ldm; default the model's): one network evaluation "
                        "each for ddim, dpmsolver++ and euler, 2 steps - 1 for heun; ddpm walks all T")
    s.add_argument("--sampler", default=None,
                   help="ddpm, ddim, dpmsolver++ or heun (ddpm, ldm); euler, heun or dpmsolver++ (flow); "
                        "default the model's")
    s.set_defaults(func=cmd_sample)

    tr = sub.add_parser("tour", help="train every model family briefly on built-in data; write a report")
    tr.add_argument("--out", default="tour", help="output folder for the report and images")
    tr.add_argument("--quick", action="store_true", help="tiny budgets (also MINIGEN_QUICK=1)")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--seed", type=int, default=0)
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
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"minigen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Bad input (unknown dataset, broken image folder, missing checkpoint): the message
        # already says what to do; a traceback would only hide it.
        print(f"minigen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint on disk is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
