"""Datasets: built-in procedural ones, real ones downloaded once, and any folder of images.

Every model in minigen eats float32 images of shape (N, C, H, W) in [-1, 1]. This module
produces them from four kinds of source:

* ``shapes`` -- 3x32x32 RGB circles, squares and triangles in six colours on a coloured
  background, with a caption per image ("a small red circle on a blue background").
  Generated procedurally from a seed: no download, identical on every machine.
* ``digits`` -- 1x28x28 MNIST-like white-on-black digits, rendered from the fonts that
  matplotlib ships and then randomly warped (affine + stroke thickness + elastic).
* ``mnist``, ``fashion-mnist``, ``cifar10`` -- the real datasets, downloaded once into the
  cache folder and verified against their published MD5 checksums.
* a path to a folder of PNG/JPEG images, optionally with one sub-folder per class.

Datasets keep their images as uint8 (a quarter of the memory of float32) and convert an
example to [-1, 1] only when it is read. Built-in datasets are cached on disk in
``$MINIGEN_CACHE`` (default ``~/.cache/minigen``); the cache file name carries the
generator's version, so a changed generator never reads stale data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "to_unit", "from_unit", "to_uint8", "from_uint8", "check_images",
    "ImageDataset", "load_dataset", "list_datasets",
    "make_shapes", "make_digits", "cache_dir", "read_idx", "read_cifar_batch",
    "DownloadError",
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


def _check_positive(v, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")


def _check_n(n, total: int, name: str) -> int:
    _check_positive(n, "n (the number of examples to take)")
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


def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a crash or a
    concurrent reader never sees a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- shapes
# Bump a generator's version whenever its output changes: the version is part of the cache
# file name, so old caches are simply never read again.

SHAPES_VERSION = 1
SHAPE_NAMES = ["circle", "square", "triangle"]
COLOR_NAMES = ["red", "green", "blue", "yellow", "purple", "white"]
SIZE_NAMES = ["small", "large"]
BACKGROUND_NAMES = ["black", "gray", "blue", "green", "brown"]
# Saturated shape colours, darker/muted backgrounds: every allowed (shape colour,
# background) pair is at least 114 apart in RGB (before a jitter of at most 27 per
# channel), so the shape always stands out.
_COLOR_RGB = torch.tensor([[220, 40, 40], [40, 190, 60], [50, 90, 240],
                           [240, 220, 40], [160, 60, 210], [245, 245, 245]], dtype=torch.float32)
_BACKGROUND_RGB = torch.tensor([[12, 12, 12], [120, 120, 120], [25, 40, 120],
                                [25, 90, 35], [110, 70, 30]], dtype=torch.float32)
_CHUNK = 1000      # random parameters are drawn per chunk of 1000 images (see _chunk_rng)
_SUBROWS = 8       # anti-aliasing: scanlines per pixel row (see _shape_coverage)


def _allowed_backgrounds() -> list[list[int]]:
    # a background never shares its name with the shape colour ("a blue square on a blue
    # background" would be both invisible and a confusing caption)
    return [[b for b, bn in enumerate(BACKGROUND_NAMES) if bn != cn] for cn in COLOR_NAMES]


def _chunk_rng(seed: int, tag: int, chunk: int) -> np.random.Generator:
    # Each chunk of _CHUNK images has its own stream, and a chunk's parameters are always
    # drawn for the full chunk: the first k images of a dataset are the same whatever its
    # total size, so load_dataset(..., n=k) can generate only k images.
    return np.random.default_rng(np.random.SeedSequence([tag, seed, chunk]))


def _shape_coverage(shape, cx, cy, r, res: int = 32) -> torch.Tensor:
    """Fraction of each pixel covered by each shape, (m, res, res) in [0, 1].

    shape: (m,) ints (0 circle, 1 square, 2 triangle); cx, cy: centres in pixels (pixel i
    spans [i, i + 1)); r: radius of the circle of equal area. Anti-aliasing by scanlines:
    every shape is convex, so each of _SUBROWS horizontal lines per pixel row crosses it in one
    interval [cx - w, cx + w], whose overlap with each pixel column is exact; averaging the
    lines gives the covered area (exact horizontally, 1/_SUBROWS steps vertically).
    """
    s = _SUBROWS
    y = (torch.arange(res * s, dtype=torch.float32) + 0.5) / s       # sub-row centres
    dy = y.view(1, -1) - cy.view(-1, 1)                                # (m, res*s)
    r, shape = r.view(-1, 1), shape.view(-1, 1)
    # half-width w(dy) of the shape along the line; negative means the line misses it
    circle = torch.sqrt((r * r - dy * dy).clamp(min=0)) - (dy.abs() >= r).float()
    h = r * (math.sqrt(math.pi) / 2)                                   # square: equal area
    square = torch.where(dy.abs() <= h, h, -1.0)
    R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))                # triangle circumradius
    # upright equilateral triangle, centroid at (cx, cy): apex at dy = -R, base at dy = R/2
    triangle = torch.where((dy >= -R) & (dy <= R / 2), (R + dy) / math.sqrt(3), -1.0)
    w = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    x0 = (cx.view(-1, 1) - w).unsqueeze(-1)                            # (m, res*s, 1)
    x1 = (cx.view(-1, 1) + w).unsqueeze(-1)
    col = torch.arange(res, dtype=torch.float32)                       # pixel column j spans [j, j+1)
    overlap = (torch.minimum(x1, col + 1) - torch.maximum(x0, col)).clamp(0, 1)
    return overlap.view(-1, res, s, res).mean(2)


def _shape_extent(shape: torch.Tensor, r: torch.Tensor):
    """Half-extents (left, right, up, down) of each shape around its centre, in pixels."""
    h = r * (math.sqrt(math.pi) / 2)
    R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
    x = torch.where(shape == 0, r, torch.where(shape == 1, h, R * math.sqrt(3) / 2))
    up = torch.where(shape == 0, r, torch.where(shape == 1, h, R))
    down = torch.where(shape == 0, r, torch.where(shape == 1, h, R / 2))
    return x, x, up, down


def _shapes_chunk(seed: int, chunk: int, k: int, res: int = 32):
    rng = _chunk_rng(seed, 1, chunk)
    m = _CHUNK
    shape = torch.from_numpy(rng.integers(0, 3, m))
    color = torch.from_numpy(rng.integers(0, 6, m))
    size = torch.from_numpy(rng.integers(0, 2, m))
    allowed = _allowed_backgrounds()
    u_bg = rng.random(m)
    background = torch.tensor([allowed[c][int(u * len(allowed[c]))] for c, u in zip(color.tolist(), u_bg)])
    # "size" radius of the equal-area circle: small 3.5-5 px, large 7-9.5 px
    r = torch.from_numpy(np.where(size.numpy() == 0, rng.uniform(3.5, 5.0, m), rng.uniform(7.0, 9.5, m))).float()
    ux, uy = torch.from_numpy(rng.random(m)).float(), torch.from_numpy(rng.random(m)).float()
    jit_fg = torch.from_numpy(rng.uniform(-15, 15, (m, 3))).float()
    jit_bg = torch.from_numpy(rng.uniform(-12, 12, (m, 3))).float()
    shape, color, size, background, r = shape[:k], color[:k], size[:k], background[:k], r[:k]
    # centre uniform over the positions that keep the whole shape 1 px inside the image
    left, right, up, down = _shape_extent(shape, r)
    cx = (left + 1) + ux[:k] * (res - 2 - left - right)
    cy = (up + 1) + uy[:k] * (res - 2 - up - down)

    alpha = _shape_coverage(shape, cx, cy, r, res)
    fg = (_COLOR_RGB[color] + jit_fg[:k]).clamp(0, 255)
    bg = (_BACKGROUND_RGB[background] + jit_bg[:k]).clamp(0, 255)
    img = bg[:, :, None, None] + alpha[:, None] * (fg - bg)[:, :, None, None]
    images = torch.round(img).to(torch.uint8)
    return images, {"shape": shape, "color": color, "size": size, "background": background}


def shapes_caption(shape: int, color: int, size: int, background: int) -> str:
    return (f"a {SIZE_NAMES[size]} {COLOR_NAMES[color]} {SHAPE_NAMES[shape]} "
            f"on a {BACKGROUND_NAMES[background]} background")


def _shapes_dataset(images, attributes) -> ImageDataset:
    a = attributes
    captions = [shapes_caption(*t) for t in zip(a["shape"].tolist(), a["color"].tolist(),
                                                a["size"].tolist(), a["background"].tolist())]
    return ImageDataset(
        "shapes", images, a["shape"] * len(COLOR_NAMES) + a["color"],
        classes=[f"{c} {s}" for s in SHAPE_NAMES for c in COLOR_NAMES],  # label = shape*6 + colour
        captions=captions, attributes=a,
        attribute_names={"shape": list(SHAPE_NAMES), "color": list(COLOR_NAMES),
                         "size": list(SIZE_NAMES), "background": list(BACKGROUND_NAMES)})


def make_shapes(n: int, seed: int = 0) -> ImageDataset:
    """Generate ``n`` shapes images (3x32x32) from ``seed``; no cache (load_dataset caches).

    Deterministic, and prefix-stable: ``make_shapes(k, s)`` is the first k of ``make_shapes(n, s)``.
    """
    _check_positive(n, "n")
    parts = [_shapes_chunk(seed, c, min(_CHUNK, n - c * _CHUNK)) for c in range(math.ceil(n / _CHUNK))]
    images = torch.cat([p[0] for p in parts])
    attributes = {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}
    return _shapes_dataset(images, attributes)


# ----------------------------------------------------------------------------- digits

DIGITS_VERSION = 1
# Fonts shipped in matplotlib's mpl-data/fonts/ttf that draw proper 0-9 (checked by eye and
# by _digit_templates: non-empty, ten different glyphs). Left out: DejaVu Sans Mono (dotted
# zero), cmmi10 (old-style figures), cmex/cmsy and the STIX non-Unicode/size fonts (no
# digits), the *Display fonts (almost empty) and LastResort (boxes).
DIGIT_FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
]
_TEMPLATE = 56    # templates and warping at 2x the output resolution, then 2x2 average pooling
_BOX = 38         # MNIST fits digits into a 20x20 box keeping the aspect ratio; 19 (38 at 2x)
                  # leaves room for the thicker strokes and the random warp below


@functools.lru_cache(maxsize=1)
def _digit_templates() -> tuple[torch.Tensor, torch.Tensor]:
    """(fonts, 10, 4, 56, 56) float glyph masks in [0, 1] at four stroke thicknesses
    (eroded, as drawn, dilated 3x3, dilated 5x5; each step changes the stroke width by about
    2 template pixels), each centred by its centre of mass; and each font's stroke width."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    glyphs = []
    for fname in DIGIT_FONTS:
        font = ImageFont.truetype(str(font_dir / fname), 160)
        row = []
        for d in range(10):
            im = Image.new("L", (320, 320))
            ImageDraw.Draw(im).text((60, 20), str(d), fill=255, font=font)
            bbox = im.getbbox()
            if bbox is None:
                raise RuntimeError(f"font {fname} draws no glyph for digit {d}")
            im = im.crop(bbox)
            scale = _BOX / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BOX)  # area average: a clean anti-aliased downscale
            g = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
            # paste so that the centre of mass lands on the canvas centre, as MNIST does
            ys = torch.arange(g.shape[0]) + 0.5
            xs = torch.arange(g.shape[1]) + 0.5
            cy = float((g.sum(1) * ys).sum() / g.sum())
            cx = float((g.sum(0) * xs).sum() / g.sum())
            oy, ox = round(_TEMPLATE / 2 - cy), round(_TEMPLATE / 2 - cx)
            canvas = torch.zeros(_TEMPLATE, _TEMPLATE)
            canvas[oy:oy + g.shape[0], ox:ox + g.shape[1]] = g
            row.append(canvas)
        row = torch.stack(row)
        flat = row.flatten(1)
        if torch.cdist(flat, flat).add(torch.eye(10) * 1e9).min() < 1.0:
            raise RuntimeError(f"font {fname} draws two digits the same (missing glyphs?)")
        glyphs.append(row)
    t = torch.stack(glyphs).unsqueeze(2).flatten(0, 1)                  # (F*10, 1, 56, 56)
    eroded = -F.max_pool2d(-t, 3, 1, 1)
    dil3 = F.max_pool2d(t, 3, 1, 1)
    dil5 = F.max_pool2d(t, 5, 1, 2)
    levels = torch.cat([eroded, t, dil3, dil5], 1)                       # (F*10, 4, 56, 56)
    # mean stroke width of each font (2 * area / perimeter of the inked region, in template
    # pixels), so that a sample can ask for a stroke width rather than a font-relative level
    ink = (t > 0.5).float()
    perimeter = (ink + F.max_pool2d(-ink, 3, 1, 1)).sum((1, 2, 3))      # ink minus its erosion
    width = (2 * ink.sum((1, 2, 3)) / perimeter).view(len(DIGIT_FONTS), 10).mean(1)
    return levels.view(len(DIGIT_FONTS), 10, 4, _TEMPLATE, _TEMPLATE), width


@functools.lru_cache(maxsize=None)
def _bicubic_upsample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D bicubic interpolation with align_corners=True."""
    eye = torch.eye(n_in).view(n_in, 1, 1, n_in)
    return F.interpolate(eye, size=(1, n_out), mode="bicubic", align_corners=True).view(n_in, n_out).T


def _digits_chunk(seed: int, chunk: int, k: int):
    templates, font_width = _digit_templates()
    rng = _chunk_rng(seed, 2, chunk)
    m = _CHUNK
    label = rng.integers(0, 10, m)
    font = rng.integers(0, len(DIGIT_FONTS), m)
    stroke = rng.uniform(4.0, 7.0, m)              # stroke width at 56 px, i.e. 2-3.5 px at 28
    rot = np.deg2rad(rng.uniform(-12, 12, m))
    shear = rng.uniform(-0.3, 0.3, m)
    scale = rng.uniform(0.8, 1.0, m)
    aspect = np.exp(rng.uniform(-0.1, 0.1, m))
    shift = rng.uniform(-0.08, 0.08, (m, 2))       # normalised units: +-0.08 is about +-1.1 px
    elastic = rng.standard_normal((m, 2, 5, 5)) * rng.uniform(0.0, 0.05, (m, 1, 1, 1))
    sl = slice(0, k)
    label, font = torch.from_numpy(label[sl]), torch.from_numpy(font[sl])

    # stroke width: MNIST strokes are all about equally thick whatever the "font", so thin
    # fonts are dilated and bold ones eroded towards the drawn width; a fractional level is a
    # linear blend of the two nearest precomputed levels
    thick = (1 + (torch.from_numpy(stroke[sl]).float() - font_width[font]) / 2).clamp(0, 3)
    lo = thick.floor().long().clamp(max=2)
    w = (thick - lo).float().view(-1, 1, 1)
    x = ((1 - w) * templates[font, label, lo] + w * templates[font, label, lo + 1]).unsqueeze(1)

    # forward map of the digit: out = A @ in + t with A = rotation @ shear @ scale;
    # grid_sample needs, for every output pixel, where to read: in = A^-1 (out - t)
    c, s = np.cos(rot[sl]), np.sin(rot[sl])
    A = np.empty((k, 2, 2))
    A[:, 0, 0] = c * scale[sl] * aspect[sl]
    A[:, 0, 1] = (c * shear[sl] - s) * scale[sl] / aspect[sl]
    A[:, 1, 0] = s * scale[sl] * aspect[sl]
    A[:, 1, 1] = (s * shear[sl] + c) * scale[sl] / aspect[sl]
    Ainv = torch.from_numpy(np.linalg.inv(A)).float()
    b = -(Ainv @ torch.from_numpy(shift[sl, :, None]).float()).squeeze(-1)          # (k, 2)
    # the same grid F.affine_grid(align_corners=False) builds, written out (it is faster)
    p = (2 * torch.arange(_TEMPLATE, dtype=torch.float32) + 1) / _TEMPLATE - 1   # pixel centres
    px, py = p.view(1, 1, -1), p.view(1, -1, 1)
    a = Ainv.view(k, 2, 2, 1, 1)
    grid = torch.stack([a[:, 0, 0] * px + a[:, 0, 1] * py + b[:, 0, None, None],
                        a[:, 1, 0] * px + a[:, 1, 1] * py + b[:, 1, None, None]], -1)
    # smooth elastic distortion: a coarse 5x5 random displacement field, upsampled
    # bicubically (separable, so as U @ field @ U^T)
    U = _bicubic_upsample_matrix(5, _TEMPLATE)
    disp = U @ torch.from_numpy(elastic[sl]).float() @ U.T                        # (k, 2, 56, 56)
    grid = grid + disp.permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(x, 2)                                              # (k, 1, 28, 28)
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8), label


def make_digits(n: int, seed: int = 0) -> ImageDataset:
    """Generate ``n`` MNIST-like digit images (1x28x28, white on black) from ``seed``; no cache.

    Deterministic, and prefix-stable like :func:`make_shapes`.
    """
    _check_positive(n, "n")
    parts = [_digits_chunk(seed, c, min(_CHUNK, n - c * _CHUNK)) for c in range(math.ceil(n / _CHUNK))]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return ImageDataset("digits", images, labels, classes=[str(d) for d in range(10)])


# name -> generator, version, {split: (size, seed)}
_BUILTIN = {
    "shapes": (make_shapes, SHAPES_VERSION, {"train": (50_000, 0), "test": (10_000, 1)}),
    "digits": (make_digits, DIGITS_VERSION, {"train": (60_000, 0), "test": (10_000, 1)}),
}


# A cache file is trusted only if its first images are the ones the generator draws now: the
# version in the file name catches a deliberate change, this catches everything else (a cache
# written before an unversioned change, or digits drawn with another Pillow/font, which render
# the glyphs slightly differently). Regenerating _CACHE_CHECK images takes ~20 ms.
_CACHE_CHECK = 64


def _cache_matches_generator(images: torch.Tensor, make, seed: int) -> bool:
    k = min(_CACHE_CHECK, len(images))
    return torch.equal(images[:k], make(k, seed).images)


def _load_builtin(name: str, split: str, n: int | None, root) -> ImageDataset:
    make, version, splits = _BUILTIN[name]
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
            ds = (_shapes_dataset(d["images"], d["attributes"]) if name == "shapes" else
                  ImageDataset(name, d["images"], d["labels"], [str(i) for i in range(10)]))
            return ds if n is None else ds.head(n)
    if n is not None and n < total:
        return make(n, seed)  # prefix-stable, so this equals the cached split's first n
    ds = make(total, seed)
    _atomic_save({"images": ds.images, "labels": ds.labels, "attributes": ds.attributes}, path)
    return ds


# ----------------------------------------------------------------------------- real datasets


class DownloadError(RuntimeError):
    """A real dataset could not be downloaded or failed its checksum."""


MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

# Official file names and their published MD5s (the same values torchvision checks).
_REAL = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "files": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "cifar10": {
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "members": {  # inside the archive, under cifar-10-batches-py/
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
    },
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Stream ``url`` into ``dest``. Raises OSError (URLError, timeouts) when offline."""
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        while block := r.read(1 << 20):
            f.write(block)


def _by_hand(name: str, folder: Path) -> str:
    spec = _REAL[name]
    files = ", ".join(spec["files"])
    url = spec["mirrors"][0] + next(iter(spec["files"]))
    return (f"To use {name} offline, download {files} on a connected machine (e.g. from {url}) "
            f"and place the file(s) in {folder}/ under exactly those names"
            + (" (the extracted cifar-10-batches-py/ folder works too)" if name == "cifar10" else "")
            + ". Or use a built-in "
            "dataset that needs no download: load_dataset('shapes') or load_dataset('digits').")


def _ensure_file(name: str, folder: Path, filename: str, download: bool) -> Path:
    """Return the verified path of one official file, downloading it if needed."""
    spec = _REAL[name]
    md5 = spec["files"][filename]
    path = folder / filename
    problem = None
    if path.exists():
        got = _md5(path)
        if got == md5:
            return path
        problem = (f"{path} has MD5 {got} but the published checksum is {md5} "
                   "(a truncated download or a different file); it is not used")
        if not download:
            raise DownloadError(f"{problem}. Delete it. " + _by_hand(name, folder))
        warnings.warn(problem + "; downloading it again")
    elif not download:
        raise DownloadError(f"{name}: {path} not found and download=False. " + _by_hand(name, folder))

    folder.mkdir(parents=True, exist_ok=True)
    errors = [problem] if problem else []
    network_only = True
    for mirror in spec["mirrors"]:
        url = mirror + filename
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=filename + ".", suffix=".part")
        os.close(fd)
        tmp = Path(tmp)
        try:
            print(f"downloading {url} -> {path}")
            _download(url, tmp)
            got = _md5(tmp)
            if got != md5:  # never keep a file that fails its checksum
                network_only = False
                errors.append(f"{url}: checksum mismatch, MD5 {got} but expected {md5} (file deleted)")
                continue
            os.replace(tmp, path)
            return path
        except OSError as e:  # URLError, HTTPError, socket timeouts, DNS failures are all OSError
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            tmp.unlink(missing_ok=True)
    what = "Could not download" if network_only else "Downloaded a file that failed its checksum for"
    hint = " (no network?)" if network_only else ""
    raise DownloadError(f"{what} {name} file {filename}{hint}:\n  " + "\n  ".join(errors) + "\n"
                        + _by_hand(name, folder))


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, into a numpy array.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the values in big-endian C order.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in types:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(types[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says {dims} of {dtype} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class _CifarUnpickler(pickle.Unpickler):
    # The CIFAR batches are pickles; unpickling may call any global, so allow only what a
    # dict of numpy arrays and lists needs.
    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]   # numpy's own _reconstruct, either version
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import codecs
            return codecs.encode
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")


def read_cifar_batch(path):
    """Parse one CIFAR-10 python batch: (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR batch (expected a dict, got {type(d).__name__})")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 batch (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(d["labels"]) != len(data):
        raise ValueError(f"{path}: unexpected CIFAR batch layout {data.shape}, {len(d['labels'])} labels")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each row-major: already CHW
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(d["labels"], dtype=torch.long)


def _load_mnist_like(name: str, split: str, root, download: bool) -> ImageDataset:
    folder = cache_dir(root) / name
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_ensure_file(name, folder, f"{prefix}-images-idx3-ubyte.gz", download))
    labels = read_idx(_ensure_file(name, folder, f"{prefix}-labels-idx1-ubyte.gz", download))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{name}: unexpected IDX shapes {images.shape} and {labels.shape}")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    return ImageDataset(name, torch.from_numpy(images.astype(np.uint8)[:, None].copy()),
                        torch.from_numpy(labels.astype(np.int64)), classes)


def _load_cifar10(split: str, root, download: bool) -> ImageDataset:
    spec = _REAL["cifar10"]
    folder = cache_dir(root) / "cifar10"
    batch_dir = folder / "cifar-10-batches-py"
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    # the extracted batches (ours, or placed by hand) are used when their checksums are right
    if not all((batch_dir / b).exists() and _md5(batch_dir / b) == spec["members"][b] for b in wanted):
        archive = _ensure_file("cifar10", folder, "cifar-10-python.tar.gz", download)
        batch_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for b, md5 in spec["members"].items():
                # read known members only (never tar.extractall: no path tricks possible)
                member = tar.extractfile(f"cifar-10-batches-py/{b}")
                fd, tmp = tempfile.mkstemp(dir=batch_dir, prefix=b + ".", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(member.read())
                if _md5(Path(tmp)) != md5:
                    Path(tmp).unlink()
                    raise DownloadError(f"{archive}: member {b} fails its checksum; delete the archive and retry")
                os.replace(tmp, batch_dir / b)
    parts = [read_cifar_batch(batch_dir / b) for b in wanted]
    return ImageDataset("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                        CIFAR10_CLASSES)


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_FOLDER_CACHE: dict = {}   # decoded folders, so a second load_dataset(path) does not decode again


def _decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent pixels would otherwise become whatever colour they store
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            im = im.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {e}. The file is broken or not really "
                         "a PNG/JPEG; delete or replace it (or move it out of the folder) and retry") from None
    # resize so the shorter side is `size` (Pillow's resize filters are anti-aliased), then centre-crop
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
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
    images = torch.from_numpy(np.stack([_decode_image(p, size, channels) for p, _ in files]))
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    ds = ImageDataset(str(folder), images, labels, [name for name, _ in groups])
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
    names) or only images (all label 0, class "images"). Files that are not PNG/JPEG are
    skipped with a warning; a broken image raises a ValueError naming the file.
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
    if key in _BUILTIN:
        ds = _load_builtin(key, split, n, root)
        n = None
    elif key in ("mnist", "fashion-mnist"):
        ds = _load_mnist_like(key, split, root, download)
    elif key == "cifar10":
        ds = _load_cifar10(split, root, download)
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
