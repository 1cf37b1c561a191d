"""Datasets: the pixel conventions, `ImageDataset`, the disk cache, image folders, `load_dataset`.

Every model in minigen eats float32 images of shape (N, C, H, W) in [-1, 1]; `to_unit`,
`from_unit`, `to_uint8`, `from_uint8` convert and `check_images` checks. `load_dataset` serves
four kinds of source:

* ``shapes``, ``digits`` -- drawn procedurally from a seed (minigen.builtin_data) and cached
  on disk in ``$MINIGEN_CACHE`` (default ``~/.cache/minigen``). The cache file name carries the
  generator's version, and a cache file is used only if its first images are what the
  generator draws now, so a changed generator never serves stale data.
* ``mnist``, ``fashion-mnist``, ``cifar10`` -- downloaded once into the cache folder and
  verified against their published MD5 checksums (minigen.downloads).
* a path to a folder of PNG/JPEG images, optionally with one sub-folder per class.

Datasets keep their images as uint8 (a quarter of the memory of float32) and convert an
example to [-1, 1] only when it is read. The generators' and readers' public names
(`make_shapes`, `SHAPE_NAMES`, `read_idx`, `DownloadError`, ...) stay importable from here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigen.checkpoint import atomic_save

__all__ = [
    "to_unit", "from_unit", "to_uint8", "from_uint8", "check_images",
    "ImageDataset", "load_dataset", "list_datasets",
    "make_shapes", "make_digits", "cache_dir", "read_idx", "read_cifar_batch",
    "DownloadError", "check_count", "shapes_caption", "shapes_label",
]

# ----------------------------------------------------------------------------- pixel ranges
# One convention for the whole package: float images live in [-1, 1] (as in DDPM and
# taming-transformers), uint8 images in {0..255}; these four functions convert between them.


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{what} expects a torch.Tensor (or numpy array), got {type(x).__name__}")


def to_unit(x) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped), e.g. for plotting."""
    x = _as_tensor(x, "to_unit")
    if not x.is_floating_point():
        raise TypeError(f"to_unit expects float images in [-1, 1], got dtype {x.dtype}; "
                        "for uint8 images use minigen.data.from_uint8 first")
    return ((x + 1) / 2).clamp(0, 1)


def from_unit(x) -> torch.Tensor:
    """Map images from [0, 1] to [-1, 1]."""
    x = _as_tensor(x, "from_unit")
    if not x.is_floating_point():
        raise TypeError(f"from_unit expects float images in [0, 1], got dtype {x.dtype}; "
                        "for uint8 images use minigen.data.from_uint8")
    return x * 2 - 1


def to_uint8(x) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in {0..255}, same shape (values outside are clamped)."""
    x = _as_tensor(x, "to_uint8")
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects float images in [-1, 1], got dtype {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("to_uint8: the images contain NaN (did the model diverge?)")
    # round, not floor: from_uint8 -> to_uint8 is then the identity on every byte value
    return torch.round(to_unit(x.float()) * 255).to(torch.uint8)


def from_uint8(x) -> torch.Tensor:
    """uint8 images in {0..255} -> float32 in [-1, 1], same shape."""
    x = _as_tensor(x, "from_uint8")
    if x.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects a uint8 tensor, got dtype {x.dtype}")
    return x.float() / 127.5 - 1


def check_images(x, *, channels: int | None = None, size=None, name: str = "images") -> None:
    """Raise a ValueError/TypeError that says what is wrong unless ``x`` is a float batch
    (N, C, H, W) in [-1, 1] with the expected channel count and size (int or (H, W))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    x = x.detach()  # a check: no autograd (a model may pass its input that requires grad)
    if x.dim() != 4:
        hint = " (a single image? add a batch dimension with x[None])" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if channels is not None and x.shape[1] != channels:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == channels else ""
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}{hint}")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != hw:
            raise ValueError(f"{name} must be {hw[0]}x{hw[1]} pixels, got shape {tuple(x.shape)}; "
                             f"load_dataset(..., size={hw[0]}) resizes a dataset")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float in [-1, 1], got dtype {x.dtype}; "
                         "use minigen.data.from_uint8 for uint8 images")
    if x.numel() == 0:
        return
    if torch.isnan(x).any():
        raise ValueError(f"{name} contain NaN values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:  # a little slack for float round-off
        raise ValueError(f"{name} must lie in [-1, 1], observed min {lo:.4g}, max {hi:.4g}; "
                         "use minigen.data.from_unit / from_uint8 to convert from [0, 1] / uint8")


# ----------------------------------------------------------------------------- the dataset


class ImageDataset(torch.utils.data.Dataset):
    """Images (uint8, N x C x H x W) with integer labels and optional captions/attributes.

    ``ds[i]`` returns ``(image, label)`` with the image float32 in [-1, 1].
    """

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                 captions: list[str] | None = None, attributes: dict[str, torch.Tensor] | None = None,
                 attribute_names: dict[str, list[str]] | None = None):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4):
            raise TypeError("ImageDataset.images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(images, 'dtype', type(images).__name__)} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels {tuple(labels.shape)}")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
        for k, v in (attributes or {}).items():
            if v.shape != (len(images),):
                raise ValueError(f"attribute {k!r} has shape {tuple(v.shape)}, expected ({len(images)},)")
        self.name = name
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.captions = captions
        self.attributes = attributes
        self.attribute_names = attribute_names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return from_uint8(self.images[i]), self.labels[i]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensors(self, n: int | None = None):
        """The first ``n`` examples (all by default) as (float images in [-1, 1], labels)."""
        n = len(self) if n is None else _check_n(n, len(self), self.name)
        return from_uint8(self.images[:n]), self.labels[:n]

    def head(self, n: int) -> "ImageDataset":
        """A dataset of the first ``n`` examples (shares memory with this one)."""
        n = _check_n(n, len(self), self.name)
        return ImageDataset(self.name, self.images[:n], self.labels[:n], self.classes,
                            None if self.captions is None else self.captions[:n],
                            None if self.attributes is None else {k: v[:n] for k, v in self.attributes.items()},
                            self.attribute_names)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, {len(self)} images of shape {self.image_shape}, "
                f"{len(self.classes)} classes)")


def check_count(v, what: str) -> None:
    """A ValueError unless `v` is a positive int (a count of images, a size)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")


def _check_n(n, total: int, name: str) -> int:
    check_count(n, "n (the number of examples to take)")
    if n > total:
        raise ValueError(f"n={n} but {name!r} has only {total} examples in this split")
    return n


# ----------------------------------------------------------------------------- cache


def cache_dir(root=None) -> Path:
    """Where datasets are cached: ``root`` if given, else $MINIGEN_CACHE, else ~/.cache/minigen."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("MINIGEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minigen"


# A cache file is trusted only if its first images are the ones the generator draws now: the
# version in the file name catches a deliberate change, this catches everything else (a cache
# written before an unversioned change, or digits drawn with another Pillow/font, which render
# the glyphs slightly differently). Regenerating _CACHE_CHECK images takes ~20 ms.
_CACHE_CHECK = 64


def _cache_matches_generator(images: torch.Tensor, make, seed: int) -> bool:
    k = min(_CACHE_CHECK, len(images))
    return torch.equal(images[:k], make(k, seed).images)


def _load_builtin(name: str, split: str, n: int | None, root) -> ImageDataset:
    from minigen import builtin_data

    make, version, splits = builtin_data.BUILTIN[name]
    total, seed = splits[split]
    if n is not None:
        _check_n(n, total, name)
    path = cache_dir(root) / f"{name}-v{version}-{split}-n{total}-seed{seed}.pt"
    d = None
    if path.exists():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if len(d["images"]) != total:
                raise ValueError("wrong length")
        except Exception as e:  # a truncated/foreign file: regenerate rather than fail
            warnings.warn(f"ignoring unreadable cache file {path} ({e}); regenerating it")
            d = None
        else:
            if not _cache_matches_generator(d["images"], make, seed):
                warnings.warn(f"ignoring cache file {path}: its first {_CACHE_CHECK} images differ from what "
                              f"this minigen's {name} generator draws (it was written by another version of "
                              "the generator, or with another Pillow/matplotlib for digits); regenerating it")
                d = None
        if d is not None:
            ds = builtin_data.from_arrays(name, d["images"], d["labels"], d["attributes"])
            return ds if n is None else ds.head(n)
    if n is not None and n < total:
        return make(n, seed)  # prefix-stable, so this equals the cached split's first n
    ds = make(total, seed)
    atomic_save({"images": ds.images, "labels": ds.labels, "attributes": ds.attributes}, path)
    return ds


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_FOLDER_CACHE: dict = {}   # decoded folders, so a second load_dataset(path) does not decode again


class _Unreadable(Exception):
    """An image file that cannot be decoded; the message says why."""


# 16-bit greyscale modes and the value of their brightest pixel: Pillow's convert("L") would
# clip them at 255 instead of scaling (a 0..65535 gradient turns white). (PNG stores 16-bit
# colour as RGB/RGBA, which Pillow already reduces to 8 bits by scaling.)
_WIDE_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (channels, size, size): shorter side resized to `size`
    (anti-aliased bicubic), centre-cropped. 8-bit, 16-bit grey (scaled, not clipped: 65535 ->
    255), palette, grey, RGBA/LA (composited on white), CMYK. Raises _Unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            if im.mode in _WIDE_GREY:
                # PNG stores 16-bit grey as I;16 (or I in older Pillow): keep it in float
                # through the resize, and scale its full range onto 0..255
                a = np.asarray(im, dtype=np.float32) * (255.0 / _WIDE_GREY[im.mode])
                im = Image.fromarray(a.astype(np.float32), mode="F")
            elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent pixels would otherwise become whatever colour they store
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            if im.mode != "F":
                im = im.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as e:
        why = str(e).replace(repr(str(path)), "").replace(str(path), "").strip(" :")  # the name is shown already
        raise _Unreadable(f"{type(e).__name__}: {why[:100]}" if why else type(e).__name__) from None
    # resize so the shorter side is `size` (Pillow's resize filters are anti-aliased), then centre-crop
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    if im.mode == "F":  # wide grey: round to 8 bits, then as many channels as asked
        a = np.clip(np.rint(np.asarray(im, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.repeat(a[None], channels, axis=0)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")  # .DS_Store, ._foo.jpg, .ipynb_checkpoints ...


def _load_folder(folder: Path, split: str, size: int, channels: int) -> ImageDataset:
    folder = folder.resolve()
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
    names = {p.name for p in subdirs}
    if {"train", "test"} <= names:          # folder/train/..., folder/test/...: pick the split
        return _load_folder(folder / split, "train", size, channels)
    if split != "train":
        raise ValueError(f"{folder} has no 'train' and 'test' sub-folders, so it has no {split!r} split; "
                         "use split='train' (all images) or make train/ and test/ sub-folders")
    skipped = []
    if subdirs:   # one class per sub-folder (images at any depth below it)
        groups = []
        for d in subdirs:
            files = sorted(p for p in d.rglob("*") if p.is_file() and _visible(p)
                           and all(_visible(q) for q in p.relative_to(d).parents))
            imgs = [p for p in files if _is_image(p)]
            skipped += [p for p in files if not _is_image(p)]
            if imgs:
                groups.append((d.name, imgs))
            else:
                warnings.warn(f"class folder {d} holds no PNG/JPEG images; it is ignored")
        top = [p for p in folder.iterdir() if p.is_file() and _visible(p)]
        if any(_is_image(p) for p in top):
            warnings.warn(f"{folder} has class sub-folders, so the images directly inside it are ignored: "
                          + ", ".join(p.name for p in sorted(top) if _is_image(p))[:300])
        skipped += [p for p in top if not _is_image(p)]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and _visible(p))
        groups = [("images", [p for p in files if _is_image(p)])] if any(map(_is_image, files)) else []
        skipped += [p for p in files if not _is_image(p)]
    if skipped:
        shown = ", ".join(str(p.relative_to(folder)) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"skipping {len(skipped)} file(s) in {folder} that are not PNG/JPEG: {shown}{more}")
    if not groups:
        raise ValueError(f"no PNG/JPEG images found in {folder} (nor in its sub-folders); "
                         "put some .png/.jpg files there, or use a built-in dataset such as 'shapes'")

    files = [(p, label) for label, (_, ps) in enumerate(groups) for p in ps]
    signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p, _ in files)
    key = (str(folder), size, channels)
    hit = _FOLDER_CACHE.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    decoded, bad = [], []
    for p, label in files:
        try:
            decoded.append((_decode_image(p, size, channels), label))
        except _Unreadable as e:
            bad.append((p, str(e)))
    if bad:
        shown = "; ".join(f"{p.relative_to(folder)} ({why})" for p, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        if not decoded:
            raise ValueError(f"none of the {len(files)} image file(s) in {folder} could be read: {shown}{more}. "
                             "They are broken or not really PNG/JPEG; replace them with readable images")
        warnings.warn(f"skipped {len(bad)} of {len(files)} image file(s) in {folder} that could not be read "
                      f"(broken, or not really PNG/JPEG): {shown}{more}. Training uses the other "
                      f"{len(decoded)}; delete or replace these to silence this warning")
    # a class whose images were all unreadable is dropped; labels stay 0..K-1 in folder order
    used = sorted({label for _, label in decoded})
    if len(used) < len(groups):
        gone = [groups[i][0] for i in range(len(groups)) if i not in used]
        warnings.warn(f"class folder(s) {gone} in {folder} have no readable image left; those classes are dropped")
    relabel = {old: new for new, old in enumerate(used)}
    images = torch.from_numpy(np.stack([a for a, _ in decoded]))
    labels = torch.tensor([relabel[label] for _, label in decoded], dtype=torch.long)
    ds = ImageDataset(str(folder), images, labels, [groups[i][0] for i in used])
    _FOLDER_CACHE[key] = (signature, ds)
    return ds


# ----------------------------------------------------------------------------- load_dataset

_DESCRIPTIONS = {
    "shapes": "3x32x32 coloured circles/squares/triangles with captions, 18 classes; built in (50k/10k)",
    "digits": "1x28x28 MNIST-like digits rendered from fonts, 10 classes; built in (60k/10k)",
    "mnist": "1x28x28 handwritten digits, 10 classes (60k/10k); downloaded once",
    "fashion-mnist": "1x28x28 clothing items, 10 classes (60k/10k); downloaded once",
    "cifar10": "3x32x32 natural images, 10 classes (50k/10k); downloaded once",
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description (any image folder path works too)."""
    return dict(_DESCRIPTIONS)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = []
    for i in range(0, len(images), 4096):  # bounded memory when upsampling 60k images
        x = images[i:i + 4096].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)   # ITU-R 601 luma, as Pillow's "L"
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def load_dataset(name, split: str = "train", *, size: int | None = None, n: int | None = None,
                 root=None, download: bool = True, channels: int | None = None) -> ImageDataset:
    """Load a dataset by name, or a folder of PNG/JPEG images by path.

    name: "shapes" | "digits" | "mnist" | "fashion-mnist" | "cifar10" | path/to/folder.
    split: "train" or "test" (a folder has a test split only if it has train/ and test/ sub-folders).
    size: resize to size x size (bilinear, anti-aliased; folders: shorter side, then centre
        crop; default 32 for folders, native otherwise).
    n: keep the first n examples. root: cache folder (default $MINIGEN_CACHE or ~/.cache/minigen).
    download: allow downloading real datasets. channels: 1 (grayscale) or 3 (RGB) to convert.

    A dataset name wins over a folder of the same name in the working directory; write
    "./shapes" to mean the folder. An image folder may contain one sub-folder per class (labels follow the sorted folder
    names) or only images (all label 0, class "images"). Files that are not PNG/JPEG, and image
    files that cannot be decoded, are skipped with one warning each kind (how many, the first
    few by name, why); only a folder with no readable image left raises a ValueError.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int (the side length in pixels), got {size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (as stored), got {channels!r}")
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a folder path, got {type(name).__name__}")

    key = str(name).lower() if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    from minigen.builtin_data import BUILTIN

    if key in BUILTIN:
        ds = _load_builtin(key, split, n, root)
        n = None
    elif key in ("mnist", "fashion-mnist"):
        from minigen.downloads import load_mnist_like

        ds = load_mnist_like(key, split, root, download)
    elif key == "cifar10":
        from minigen.downloads import load_cifar10

        ds = load_cifar10(split, root, download)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            ds = _load_folder(path, split, size or 32, channels or 3)
        elif path.exists():
            raise ValueError(f"{path} is a file; load_dataset needs a folder of images (or a dataset name)")
        else:
            raise ValueError(f"unknown dataset {str(name)!r}: choose one of {', '.join(_DESCRIPTIONS)}, "
                             "or pass the path to a folder of PNG/JPEG images (e.g. load_dataset('path/to/images'))")
    if n is not None:
        ds = ds.head(_check_n(n, len(ds), ds.name))
    images = ds.images
    if channels is not None:
        images = _convert_channels(images, channels)
    if size is not None:
        images = _resize(images, size)
    if images is not ds.images:
        ds = ImageDataset(ds.name, images, ds.labels, ds.classes, ds.captions, ds.attributes, ds.attribute_names)
    return ds


# Names that moved to builtin_data / downloads stay importable from here, where the lessons and
# the README import them (resolved on first use: those modules import this one).
_MOVED = {**dict.fromkeys(["SHAPES_VERSION", "SHAPE_NAMES", "COLOR_NAMES", "SIZE_NAMES", "BACKGROUND_NAMES",
                           "shapes_caption", "shapes_label", "make_shapes", "DIGITS_VERSION", "DIGIT_FONTS",
                           "make_digits"], "minigen.builtin_data"),
          **dict.fromkeys(["DownloadError", "MNIST_CLASSES", "FASHION_CLASSES", "CIFAR10_CLASSES",
                           "read_idx", "read_cifar_batch"], "minigen.downloads")}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
