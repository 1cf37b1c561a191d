"""The two built-in datasets, drawn procedurally from a seed: no download, the same on every machine.

* ``shapes`` -- 3x32x32 RGB circles, squares and triangles in six colours on a coloured
  background, with a caption per image ("a small red circle on a blue background") and its
  attributes (shape, color, size, background); `shapes_label` reads a caption back.
* ``digits`` -- 1x28x28 MNIST-like white-on-black digits, rendered from the fonts that
  matplotlib ships and then randomly warped (affine + stroke thickness + elastic).

`make_shapes(n, seed)` / `make_digits(n, seed)` are prefix-stable (the first k of n images are
`make_*(k, seed)`), which the disk cache in minigen.data relies on. `BUILTIN` lists the splits
`load_dataset` serves: generator, version (bump it whenever the output changes: it is part
of the cache file's name), and each split's size and seed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigen.data import ImageDataset, check_count

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


def shapes_label(caption: str) -> int:
    """shape * 6 + colour of a shapes caption ("a small red circle on a blue background")."""
    from minigen.text import Tokenizer

    words = Tokenizer.split(caption)
    # the colour is the first colour word: the background ("on a blue background") comes after
    shapes = [SHAPE_NAMES.index(w) for w in words if w in SHAPE_NAMES]
    colors = [COLOR_NAMES.index(w) for w in words if w in COLOR_NAMES]
    if not shapes or not colors:
        raise ValueError(f"cannot read a shape and a colour from the caption {caption!r}: expected words such as "
                         f"{SHAPE_NAMES} and {COLOR_NAMES}")
    return shapes[0] * len(COLOR_NAMES) + colors[0]


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
    check_count(n, "n")
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
    check_count(n, "n")
    parts = [_digits_chunk(seed, c, min(_CHUNK, n - c * _CHUNK)) for c in range(math.ceil(n / _CHUNK))]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return ImageDataset("digits", images, labels, classes=[str(d) for d in range(10)])

# ----------------------------------------------------------------------------- the registry
# name -> generator, version, {split: (size, seed)}
BUILTIN = {
    "shapes": (make_shapes, SHAPES_VERSION, {"train": (50_000, 0), "test": (10_000, 1)}),
    "digits": (make_digits, DIGITS_VERSION, {"train": (60_000, 0), "test": (10_000, 1)}),
}


def from_arrays(name: str, images: torch.Tensor, labels: torch.Tensor, attributes) -> ImageDataset:
    """A built-in dataset from its stored tensors (what the disk cache holds)."""
    if name == "shapes":
        return _shapes_dataset(images, attributes)
    return ImageDataset(name, images, labels, [str(i) for i in range(10)])


__all__ = ["SHAPES_VERSION", "SHAPE_NAMES", "COLOR_NAMES", "SIZE_NAMES", "BACKGROUND_NAMES", "shapes_caption",
           "shapes_label", "make_shapes", "DIGITS_VERSION", "DIGIT_FONTS", "make_digits", "BUILTIN", "from_arrays"]
