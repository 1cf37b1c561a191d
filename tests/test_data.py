"""Tests for minigen.data: pixel conversions, built-in datasets, real-dataset loading
(without any network), image folders."""

import copy
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import struct
import tarfile
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigen import builtin_data, data, downloads


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # never read or write the user's ~/.cache/minigen from a test
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shapes2k():
    return data.make_shapes(2000, seed=123)


@pytest.fixture(scope="module")
def digits2k():
    return data.make_digits(2000, seed=7)


# ----------------------------------------------------------------------------- conversions


def test_uint8_round_trip_every_byte():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = data.from_uint8(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(data.to_uint8(x), u)


def test_to_uint8_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2.4 - 1.2          # some values outside [-1, 1]
    ref = np.clip(np.round((x.double().numpy().clip(-1, 1) + 1) / 2 * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(data.to_uint8(x).numpy(), ref)
    inside = x.clamp(-1, 1)
    assert (data.from_uint8(data.to_uint8(inside)) - inside).abs().max() <= 1 / 255 + 1e-6


def test_unit_conversions():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.allclose(data.from_unit(data.to_unit(x)), x, atol=1e-6)
    assert data.to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]   # clamped
    with pytest.raises(TypeError, match="from_uint8"):
        data.to_unit(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        data.from_uint8(torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        data.to_uint8(torch.tensor([float("nan")]))


def test_check_images_messages():
    good = torch.rand(2, 3, 8, 8) * 2 - 1
    data.check_images(good, channels=3, size=8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        data.check_images(good.numpy())
    with pytest.raises(ValueError, match="4-D"):
        data.check_images(good[0])
    with pytest.raises(ValueError, match="3 channel"):
        data.check_images(good[:, :1], channels=3)
    with pytest.raises(ValueError, match="channels last"):
        data.check_images(good.permute(0, 2, 3, 1), channels=3)
    with pytest.raises(ValueError, match="16x16"):
        data.check_images(good, size=16)
    with pytest.raises(ValueError, match="from_uint8"):
        data.check_images(data.to_uint8(good))
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        data.check_images(bad)
    x255 = data.to_uint8(good).float()
    x255[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    with pytest.raises(ValueError, match=r"min 0, max 255.*from_unit / from_uint8"):
        data.check_images(x255)
    with pytest.raises(ValueError, match="from_unit / from_uint8"):
        data.check_images(good * 1.5)


# ----------------------------------------------------------------------------- shapes

CAPTION = re.compile(r"^a (small|large) (\w+) (circle|square|triangle) on a (\w+) background$")


def test_shapes_determinism_and_prefix_stability():
    a, b = data.make_shapes(300, seed=5), data.make_shapes(300, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.captions == b.captions
    assert not torch.equal(a.images, data.make_shapes(300, seed=6).images)
    big = data.make_shapes(1010, seed=5)           # crosses a chunk boundary
    assert torch.equal(big.images[:300], a.images) and big.captions[:300] == a.captions


def test_shapes_layout(shapes2k):
    ds = shapes2k
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (2000, 3, 32, 32)
    assert ds.image_shape == (3, 32, 32) and len(ds) == 2000
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    xs, ys = ds.tensors(10)
    data.check_images(xs, channels=3, size=32)
    assert torch.equal(ys, ds.labels[:10])
    assert len(ds.classes) == 18 and ds.classes[0] == "red circle" and ds.classes[7] == "green square"
    assert set(ds.attributes) == {"shape", "color", "size", "background"}
    for k, v in ds.attributes.items():
        assert v.dtype == torch.int64 and v.shape == (2000,)
        assert 0 <= v.min() and v.max() < len(ds.attribute_names[k])


def test_shapes_captions_labels_attributes_agree(shapes2k):
    ds, names = shapes2k, shapes2k.attribute_names
    for i, cap in enumerate(ds.captions):
        m = CAPTION.match(cap)
        assert m, cap
        size, color, shape, bg = m.groups()
        a = {k: v[i].item() for k, v in ds.attributes.items()}
        assert (names["size"][a["size"]], names["color"][a["color"]], names["shape"][a["shape"]],
                names["background"][a["background"]]) == (size, color, shape, bg)
        assert ds.classes[ds.labels[i]] == f"{color} {shape}"
        assert ds.labels[i] == a["shape"] * 6 + a["color"]
        assert bg != color                               # never "a blue square on a blue background"


def test_shapes_class_balance(shapes2k):
    from scipy.stats import chisquare

    counts = torch.bincount(shapes2k.labels, minlength=18).numpy()
    assert chisquare(counts).pvalue > 1e-3, counts
    for k in ("size", "background"):
        assert (torch.bincount(shapes2k.attributes[k]) > 0).all()


def _alpha_and_colors(ds):
    """Per image: background colour (a corner pixel: shapes keep 1 px inside the border),
    shape colour (the pixel farthest from it) and per-pixel coverage estimated from both."""
    img = ds.images.double()
    bg = img[:, :, 0, 0]
    diff = (img - bg[:, :, None, None]).abs().amax(1)                  # (N, H, W)
    far = diff.flatten(1).argmax(1)
    fg = img.flatten(2)[torch.arange(len(img)), :, far]
    alpha = diff / (fg - bg).abs().amax(1).view(-1, 1, 1)
    return bg, fg, alpha.clamp(0, 1)


def test_shapes_are_visible_and_coloured_as_captioned(shapes2k):
    ds = shapes2k
    bg, fg, alpha = _alpha_and_colors(ds)
    # the shape differs strongly from the background in at least 20 pixels
    strong = ((ds.images.double() - bg[:, :, None, None]).abs().amax(1) > 60).flatten(1).sum(1)
    assert strong.min() >= 20
    nearest_fg = torch.cdist(fg.float(), builtin_data._COLOR_RGB).argmin(1)
    nearest_bg = torch.cdist(bg.float(), builtin_data._BACKGROUND_RGB).argmin(1)
    assert torch.equal(nearest_fg, ds.attributes["color"])
    assert torch.equal(nearest_bg, ds.attributes["background"])
    # every shape has the area of a circle of radius 3.5-5 px (small) or 7-9.5 px (large)
    area = alpha.sum((1, 2))
    small = ds.attributes["size"] == 0
    assert area[small].min() > math.pi * 3.5 ** 2 * 0.9 and area[small].max() < math.pi * 5 ** 2 * 1.1
    assert area[~small].min() > math.pi * 7 ** 2 * 0.95 and area[~small].max() < math.pi * 9.5 ** 2 * 1.05


def test_shapes_kind_matches_attribute(shapes2k):
    # area / (width * height): square 1, circle pi/4, triangle 1/2. Width = sum over columns
    # of the largest coverage in the column (exact for anti-aliased edges); large shapes only.
    ds = shapes2k
    _, _, alpha = _alpha_and_colors(ds)
    large = ds.attributes["size"] == 1
    a = alpha[large]
    fill = a.sum((1, 2)) / (a.amax(1).sum(1) * a.amax(2).sum(1))
    kind = ds.attributes["shape"][large]
    assert fill[kind == 1].min() > 0.95
    assert fill[kind == 0].min() > 0.72 and fill[kind == 0].max() < 0.85
    assert fill[kind == 2].min() > 0.42 and fill[kind == 2].max() < 0.58


def _brute_force_coverage(shape, cx, cy, r, res=32, ss=32):
    """Point sampling at ss x ss points per pixel with plain inside tests (float64)."""
    t = (torch.arange(res * ss, dtype=torch.float64) + 0.5) / ss
    dx, dy = t.view(1, -1) - cx, t.view(-1, 1) - cy
    if shape == 0:
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == 1:
        h = r * math.sqrt(math.pi) / 2                     # square of the circle's area
        inside = (dx.abs() <= h) & (dy.abs() <= h)
    else:                                                   # equilateral, circle's area, apex up
        R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
        verts = [(0.0, -R), (R * math.sqrt(3) / 2, R / 2), (-R * math.sqrt(3) / 2, R / 2)]
        inside = torch.ones_like(dx * dy, dtype=torch.bool)
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):   # clockwise on screen
            inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
    return F.avg_pool2d(inside.double()[None, None], ss)[0, 0]


def test_shape_coverage_matches_brute_force():
    g = np.random.default_rng(0)
    for shape in (0, 1, 2):
        for _ in range(4):
            r = float(g.uniform(3.5, 9.5))
            cx, cy = (float(v) for v in g.uniform(12, 20, 2))
            got = builtin_data._shape_coverage(torch.tensor([shape]), torch.tensor([cx]), torch.tensor([cy]),
                                       torch.tensor([r]))[0].double()
            ref = _brute_force_coverage(shape, cx, cy, r)
            # 8 scanlines per row: a horizontal edge of length L is off by at most L/16 in area
            assert (got - ref).abs().max() < 0.08, (shape, r)
            assert abs(got.sum() - ref.sum()) < 1.5, (shape, r)
            assert abs(got.sum() - math.pi * r * r) < 2.0       # all shapes: the circle's area


# ----------------------------------------------------------------------------- digits


def test_digits_determinism_and_prefix_stability():
    a, b = data.make_digits(200, seed=3), data.make_digits(200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, data.make_digits(200, seed=4).images)
    assert torch.equal(data.make_digits(1010, seed=3).images[:200], a.images)


def test_digits_look_like_mnist(digits2k):
    ds = digits2k
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (2000, 1, 28, 28)
    assert ds.classes == [str(d) for d in range(10)]
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.min() > 150, counts
    x = ds.images.double() / 255
    # white on black: a dark border, a bright saturated stroke core
    border = torch.cat([x[..., :2, :].flatten(1), x[..., -2:, :].flatten(1),
                        x[..., :, :2].flatten(1), x[..., :, -2:].flatten(1)], 1)
    assert border.mean() < 0.01
    assert (x.flatten(1).amax(1) > 0.95).float().mean() > 0.99
    ink = x.flatten(1).sum(1)
    assert ink.min() > 25 and ink.max() < 300                 # neither empty nor a blob (of 784)
    # centred by mass like MNIST, and almost all ink inside the central 22x22
    pos = torch.arange(28, dtype=torch.float64) + 0.5
    cy = (x.sum(3).squeeze(1) * pos).sum(1) / ink
    cx = (x.sum(2).squeeze(1) * pos).sum(1) / ink
    assert (cy - 14).abs().max() < 3 and (cx - 14).abs().max() < 3
    central = x[..., 3:25, 3:25].flatten(1).sum(1) / ink
    assert central.min() > 0.85 and central.quantile(0.01) > 0.92


def test_digit_classes_are_distinct(digits2k):
    x = digits2k.images.flatten(1).float() / 255
    y = digits2k.labels
    means = torch.stack([x[:1500][y[:1500] == d].mean(0) for d in range(10)])
    dist = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert dist.min() > 1.0
    # the label is in the image: nearest class mean on held-out digits is far above chance
    pred = torch.cdist(x[1500:], means).argmin(1)
    assert (pred == y[1500:]).float().mean() > 0.5


def test_digit_images_match_their_label_glyphs(digits2k):
    # each warped digit correlates best with the plain glyph of its own label (best font)
    templates, _ = builtin_data._digit_templates()
    protos = F.avg_pool2d(templates[:, :, 1], 2).flatten(2)          # (fonts, 10, 784)
    protos = protos / protos.norm(dim=2, keepdim=True)
    x = digits2k.images.float().flatten(1)
    x = x / x.norm(dim=1, keepdim=True)
    similarity = torch.einsum("nd,fkd->nfk", x, protos).amax(1)        # (N, 10)
    assert (similarity.argmax(1) == digits2k.labels).float().mean() > 0.7


def test_digit_fonts_render_digits():
    templates, width = builtin_data._digit_templates()
    assert templates.shape == (len(data.DIGIT_FONTS), 10, 4, 56, 56)
    assert (width > 2).all() and (width < 8).all()
    mass = templates[:, :, 1].sum((-1, -2))
    assert mass.min() > 50                                    # every font draws every digit


# ----------------------------------------------------------------------------- load_dataset: built-ins


@pytest.fixture
def small_builtins(monkeypatch):
    """Built-in split sizes shrunk so that cache tests run in a fraction of a second."""
    make, version, _ = builtin_data.BUILTIN["shapes"]
    monkeypatch.setitem(builtin_data.BUILTIN, "shapes", (make, version, {"train": (1200, 0), "test": (300, 1)}))


def _forbid_generation(monkeypatch):
    """Only the cache check's few images may be drawn, never a whole split."""
    for name, (make, version, splits) in list(builtin_data.BUILTIN.items()):
        def guarded(n, seed=0, make=make):
            if n > data._CACHE_CHECK:
                raise AssertionError("regenerated although the cache should have been used")
            return make(n, seed)
        monkeypatch.setitem(builtin_data.BUILTIN, name, (guarded, version, splits))


def test_cache_from_another_generator_is_regenerated_with_a_warning(small_builtins, tmp_path):
    """A cache file with the right name but other images (written before an unversioned change
    to the generator) must not be served: every recorded figure would silently move."""
    fresh = data.load_dataset("shapes", split="test")
    path = tmp_path / "cache" / f"shapes-v{data.SHAPES_VERSION}-test-n300-seed1.pt"
    stale = torch.load(path, weights_only=True)
    stale["images"] = stale["images"].roll(1, dims=0)          # same images, another draw order
    torch.save(stale, path)
    with pytest.warns(UserWarning, match="differ from what this minigen's shapes generator draws"):
        ds = data.load_dataset("shapes", split="test")
    assert torch.equal(ds.images, fresh.images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], fresh.images)   # rewritten


def test_shapes_generator_is_pinned():
    """shapes is pure numpy + torch, so its images are the same on every machine and version.
    If this fails after a deliberate change: bump SHAPES_VERSION, update the hashes, and
    re-measure every recorded figure (`python -m minigen.reference --evaluate`,
    `python scripts/train_judges.py --evaluate`)."""
    expected = {0: "dd84baede90dbc4f7895d05c8ffcf90be029a97e31e7640e01b117ff7b1b1419",
                1: "a79519e62372ef731360c765165189ae366e48d79a80d5e1a3cc343344048f0d"}
    for seed, digest in expected.items():
        d = data.make_shapes(64, seed)
        h = hashlib.sha256(d.images.numpy().tobytes())
        for k in ("shape", "color", "size", "background"):
            h.update(d.attributes[k].numpy().astype("int64").tobytes())
        assert h.hexdigest() == digest, f"make_shapes(64, {seed}) draws other images than shapes v{data.SHAPES_VERSION}"


def test_builtin_cache_written_atomically_and_hit(small_builtins, monkeypatch, tmp_path):
    ds = data.load_dataset("shapes")
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == [f"shapes-v{data.SHAPES_VERSION}-train-n1200-seed0.pt"]     # no temp files left
    assert torch.equal(ds.images, data.make_shapes(1200, 0).images)
    _forbid_generation(monkeypatch)
    again = data.load_dataset("shapes")
    assert torch.equal(again.images, ds.images) and again.captions == ds.captions
    assert torch.equal(again.attributes["background"], ds.attributes["background"])
    head = data.load_dataset("shapes", n=10)
    assert torch.equal(head.images, ds.images[:10]) and head.captions == ds.captions[:10]


def test_builtin_cache_versioned_and_corrupt_file_regenerated(small_builtins, monkeypatch, tmp_path):
    data.load_dataset("shapes", split="test")
    make, version, splits = builtin_data.BUILTIN["shapes"]
    monkeypatch.setitem(builtin_data.BUILTIN, "shapes", (make, version + 1, splits))
    data.load_dataset("shapes", split="test")                 # new version: a new file
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == [f"shapes-v{version}-test-n300-seed1.pt", f"shapes-v{version + 1}-test-n300-seed1.pt"]
    (tmp_path / "cache" / names[1]).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = data.load_dataset("shapes", split="test")
    assert torch.equal(ds.images, data.make_shapes(300, 1).images)


def test_builtin_small_n_without_cache_is_prefix(tmp_path):
    ds = data.load_dataset("shapes", split="test", n=40)
    assert len(ds) == 40 and not (tmp_path / "cache").exists()     # nothing cached for a prefix
    assert torch.equal(ds.images, data.make_shapes(40, seed=1).images)
    assert not torch.equal(ds.images, data.load_dataset("shapes", n=40).images)  # train != test


def test_digits_cache_hit_and_official_split_sizes(monkeypatch):
    make, version, splits = builtin_data.BUILTIN["digits"]
    assert splits == {"train": (60_000, 0), "test": (10_000, 1)}       # the documented splits
    assert builtin_data.BUILTIN["shapes"][2] == {"train": (50_000, 0), "test": (10_000, 1)}
    monkeypatch.setitem(builtin_data.BUILTIN, "digits", (make, version, {"train": (1500, 0), "test": (200, 1)}))
    ds = data.load_dataset("digits")
    assert len(ds) == 1500 and ds.image_shape == (1, 28, 28) and ds.classes[3] == "3"
    _forbid_generation(monkeypatch)
    again = data.load_dataset("digits")
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)


def test_size_and_channels_options():
    ds = data.load_dataset("shapes", n=20, size=16)
    assert ds.images.shape == (20, 3, 16, 16) and ds.images.dtype == torch.uint8
    full = data.make_shapes(20, 0).images.float()
    ref = F.interpolate(full, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert (ds.images.float() - ref).abs().max() <= 0.5 + 1e-4
    assert ds.captions == data.make_shapes(20, 0).captions
    gray = data.load_dataset("shapes", n=4, channels=1)
    ref = (full[:4] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert gray.images.shape == (4, 1, 32, 32) and (gray.images.float() - ref).abs().max() <= 0.5 + 1e-4
    rgb = data.load_dataset("digits", n=4, channels=3, size=32)
    assert rgb.images.shape == (4, 3, 32, 32) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes.*digits.*folder"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("shapes", split="val")
    with pytest.raises(ValueError, match="only 300"):
        data.make_shapes(300).tensors(301)
    with pytest.raises(ValueError, match="positive"):
        data.load_dataset("shapes", n=0)
    with pytest.raises(ValueError, match="size"):
        data.load_dataset("shapes", size=-1)
    assert set(data.list_datasets()) == {"shapes", "digits", "mnist", "fashion-mnist", "cifar10"}


# ----------------------------------------------------------------------------- image folders


def _save(path, array, fmt=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, fmt)


def test_image_folder_with_classes(tmp_path):
    root = tmp_path / "pets"
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:64] = (0, 0, 255)                         # the centre third: what the crop keeps
    wide[:, 64:] = (0, 255, 0)
    _save(root / "dogs" / "a.png", wide)
    _save(root / "cats" / "b.jpg", np.full((50, 40, 3), 200), "JPEG")
    _save(root / "cats" / "sub" / "c.PNG", np.full((20, 20), 10))          # grayscale, nested
    (root / "cats" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"):
        ds = data.load_dataset(root, size=32)
    assert ds.classes == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 32, 32) and ds.images.dtype == torch.uint8
    blue = ds.images[2].float()
    assert (blue[2] > 250).all() and (blue[:2] < 5).all()
    assert (ds.images[1].int() - 10).abs().max() <= 1 and (ds.images[0].int() - 200).abs().max() <= 3
    with pytest.warns(UserWarning, match="notes.txt"):
        small = data.load_dataset(str(root), size=8, channels=1)
    assert small.images.shape == (3, 1, 8, 8)


def test_image_folder_flat_decoded_once(tmp_path, monkeypatch):
    for i in range(3):
        _save(tmp_path / "imgs" / f"{i}.png", np.full((40, 60, 3), 50 * i))
    ds = data.load_dataset(tmp_path / "imgs")
    assert ds.classes == ["images"] and ds.labels.tolist() == [0, 0, 0] and ds.image_shape == (3, 32, 32)
    monkeypatch.setattr(data, "_decode_image", lambda *a: pytest.fail("decoded twice"))
    assert data.load_dataset(tmp_path / "imgs").images is ds.images
    assert len(data.load_dataset(tmp_path / "imgs", n=2)) == 2


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG images"):
        data.load_dataset(tmp_path / "empty")
    _save(tmp_path / "broken" / "ok.png", np.zeros((8, 8, 3)))
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 .*bad\.png"):
        assert len(data.load_dataset(tmp_path / "broken")) == 1
    with pytest.raises(ValueError, match="split"):
        data.load_dataset(tmp_path / "broken", split="test")
    with pytest.raises(ValueError, match="is a file"):
        data.load_dataset(tmp_path / "broken" / "ok.png")


def _png16(path, rgb16):
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_image_folder_modes_load_with_their_full_range(tmp_path):
    """8- and 16-bit grey, 16-bit RGB, palette, RGBA, LA, CMYK, 1-bit: each a known image whose
    8-bit values are checked exactly (no resize: the files are already 16 x 16)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    grey8 = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb8 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    folder = tmp_path / "modes"
    folder.mkdir()
    expect = {}  # file name -> expected uint8 (3, 16, 16)

    Image.fromarray(ramp16).save(folder / "grey16.png")   # mode I;16 (the 0..65535 gradient)
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    expect["grey16.png"] = np.repeat(np.rint(ramp16 / 257.0).astype(np.uint8)[None], 3, 0)
    rgb16 = rng.integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    _png16(folder / "rgb16.png", rgb16)
    expect["rgb16.png"] = (rgb16 >> 8).astype(np.uint8).transpose(2, 0, 1)  # Pillow keeps the high byte
    Image.fromarray(grey8, "L").save(folder / "grey8.png")
    expect["grey8.png"] = np.repeat(grey8[None], 3, 0)
    Image.fromarray(rgb8).save(folder / "rgb8.png")
    expect["rgb8.png"] = rgb8.transpose(2, 0, 1)
    pal = Image.fromarray(rgb8).quantize(16)                # mode P, 16 colours
    pal.save(folder / "palette.png")
    expect["palette.png"] = np.asarray(pal.convert("RGB")).transpose(2, 0, 1)
    rgba = np.dstack([rgb8, alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    a = alpha[..., None] / 255.0                            # composited on white
    expect["rgba.png"] = (rgb8 * a + 255 * (1 - a)).transpose(2, 0, 1)
    Image.fromarray(np.dstack([grey8, alpha]), "LA").save(folder / "la.png")
    expect["la.png"] = np.repeat((grey8 * a[..., 0] + 255 * (1 - a[..., 0]))[None], 3, 0)
    cmyk = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=100)
    expect["cmyk.jpg"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB")).transpose(2, 0, 1)
    bits = rng.integers(0, 2, (16, 16)).astype(bool)
    Image.fromarray(bits).save(folder / "bilevel.png")      # mode 1
    expect["bilevel.png"] = np.repeat(bits[None] * np.uint8(255), 3, 0)

    ds = data.load_dataset(folder, size=16)
    names = sorted(p.name for p in folder.iterdir())
    assert len(ds) == len(names) == len(expect)
    for name, img in zip(names, ds.images):
        want = np.asarray(expect[name], dtype=np.float64)
        # exact, or within 1 where the expectation is a float (alpha blending rounds)
        assert np.abs(img.numpy().astype(np.float64) - want).max() <= 1, name
    g16 = ds.images[names.index("grey16.png")].float()
    assert g16.min() == 0 and g16.max() == 255 and abs(g16.mean().item() - 127.5) < 0.6  # not clipped
    # resized, the 16-bit image keeps its range too (the mean of a linear ramp is its midpoint)
    small = data.load_dataset(folder, size=8, channels=1)
    g16 = small.images[names.index("grey16.png")].float()
    assert small.images.shape == (len(names), 1, 8, 8) and abs(g16.mean().item() - 127.5) < 2


def test_image_folder_skips_unreadable_files_with_one_summary(tmp_path):
    folder = tmp_path / "mixed"
    for i in range(3):
        _save(folder / "cats" / f"ok{i}.png", np.full((8, 8, 3), 40 * i))
    _save(folder / "dogs" / "ok.png", np.full((8, 8, 3), 200))
    bad = {"cats/trunc.png": (folder / "cats" / "ok0.png").read_bytes()[:30],
           "cats/text.jpg": b"hello, I am not a JPEG",
           "dogs/empty.png": b""}
    for i in range(5):
        bad[f"cats/junk{i}.png"] = bytes(range(i, 60))
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    with pytest.warns(UserWarning) as caught:
        ds = data.load_dataset(folder, size=8)
    msgs = [str(w.message) for w in caught if "could not be read" in str(w.message)]
    assert len(msgs) == 1, msgs  # one summary, not one warning per file
    msg = msgs[0]
    assert "skipped 8 of 12 image file(s)" in msg and "and 3 more" in msg and "uses the other 4" in msg
    assert sum(n in msg for n in bad) == 5 and "Error" in msg  # the first five by name, each with why
    assert len(ds) == 4 and ds.classes == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1]
    # a class with nothing readable left is dropped, labels stay contiguous
    (folder / "dogs" / "ok.png").write_bytes(b"broken now")
    with pytest.warns(UserWarning) as caught:
        ds = data.load_dataset(folder, size=8)
    assert any(re.search(r"\['dogs'\].*dropped", str(w.message)) for w in caught)
    assert any("skipped 9 of 12" in str(w.message) for w in caught)
    assert ds.classes == ["cats"] and ds.labels.tolist() == [0, 0, 0]
    # only when nothing is readable does loading fail, naming the files
    for p in (folder / "cats").glob("ok*.png"):
        p.write_bytes(b"broken too")
    with pytest.raises(ValueError, match=r"none of the 12 image file\(s\).*could be read.*cats/"):
        data.load_dataset(folder, size=8)


def test_image_folder_train_test_split(tmp_path):
    _save(tmp_path / "d" / "train" / "x" / "1.png", np.zeros((8, 8, 3)))
    _save(tmp_path / "d" / "train" / "y" / "2.png", np.zeros((8, 8, 3)))
    _save(tmp_path / "d" / "test" / "y" / "3.png", np.zeros((8, 8, 3)))
    assert len(data.load_dataset(tmp_path / "d", size=8)) == 2
    assert data.load_dataset(tmp_path / "d", "test", size=8).classes == ["y"]


# ----------------------------------------------------------------------------- real datasets, offline


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx(tmp_path):
    g = np.random.default_rng(1)
    imgs = g.integers(0, 256, (3, 4, 5)).astype(np.uint8)
    (tmp_path / "a").write_bytes(_idx_bytes(imgs))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    assert np.array_equal(data.read_idx(tmp_path / "a"), imgs)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), imgs)
    vals = g.standard_normal((2, 3)).astype(np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(vals))
    assert np.array_equal(data.read_idx(tmp_path / "f"), vals)
    (tmp_path / "short").write_bytes(_idx_bytes(imgs)[:-1])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX"):
        data.read_idx(tmp_path / "junk")


def _cifar_batch_bytes(n, seed):
    g = np.random.default_rng(seed)
    d = {b"batch_label": b"x", b"labels": g.integers(0, 10, n).tolist(),
         b"data": g.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"f"] * n}
    return pickle.dumps(d, protocol=2), d


def test_read_cifar_batch_layout_and_safety(tmp_path):
    raw, d = _cifar_batch_bytes(4, 0)
    (tmp_path / "b").write_bytes(raw)
    images, labels = data.read_cifar_batch(tmp_path / "b")
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == d[b"labels"]
    row = d[b"data"][2]      # 1024 red values, 1024 green, 1024 blue, each row by row
    assert np.array_equal(images[2, 1].numpy(), row[1024:2048].reshape(32, 32))
    assert images[2, 2, 3, 5] == row[2048 + 3 * 32 + 5]

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        data.read_cifar_batch(tmp_path / "evil")


def _fake_mnist_files():
    g = np.random.default_rng(2)
    files = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
            _idx_bytes(g.integers(0, 256, (n, 28, 28)).astype(np.uint8)))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
            _idx_bytes(g.integers(0, 10, n).astype(np.uint8)))
    return files


def _serve(monkeypatch, files, calls=None):
    def fake_download(url, dest, timeout=30.0):
        if calls is not None:
            calls.append(url)
        dest.write_bytes(files[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(downloads, "_download", fake_download)


def test_mnist_download_verified_and_parsed(monkeypatch, tmp_path):
    files = _fake_mnist_files()
    spec = copy.deepcopy(downloads._REAL["fashion-mnist"])
    spec["files"] = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
    monkeypatch.setitem(downloads._REAL, "fashion-mnist", spec)
    calls = []
    _serve(monkeypatch, files, calls)
    ds = data.load_dataset("fashion-mnist", split="test")
    assert len(ds) == 3 and ds.image_shape == (1, 28, 28) and ds.classes[0] == "T-shirt/top"
    raw = data.read_idx(tmp_path / "cache" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(ds.images[:, 0].numpy(), raw)
    assert len(calls) == 2
    data.load_dataset("fashion-mnist", split="test")            # verified files: no new download
    assert len(calls) == 2


def test_checksum_mismatch_rejected_and_not_kept(monkeypatch, tmp_path):
    files = _fake_mnist_files()                                 # do not match the official MD5s
    _serve(monkeypatch, files)
    with pytest.raises(data.DownloadError, match="checksum mismatch") as e:
        data.load_dataset("mnist")
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in str(e.value)
    folder = tmp_path / "cache" / "mnist"
    assert list(folder.iterdir()) == []                         # nothing kept, no .part files
    # a hand-placed file with the wrong checksum is refused, with its MD5 in the message
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"wrong")
    with pytest.raises(data.DownloadError, match=hashlib.md5(b"wrong").hexdigest()):
        data.load_dataset("mnist", download=False)


@pytest.mark.parametrize("name, filename", [("mnist", "train-images-idx3-ubyte.gz"),
                                            ("cifar10", "cifar-10-python.tar.gz")])
def test_no_network_message_names_builtins_and_files(monkeypatch, tmp_path, name, filename):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DownloadError) as e:
        data.load_dataset(name)
    msg = str(e.value)
    assert "no network" in msg and "'shapes'" in msg and "'digits'" in msg
    assert filename in msg and str(tmp_path / "cache" / name) in msg
    assert not any((tmp_path / "cache" / name).iterdir())       # no partial files left


def test_cifar10_from_archive(monkeypatch, tmp_path):
    members, batches = {}, {}
    for i, b in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        members[b], batches[b] = _cifar_batch_bytes(2 + i, seed=10 + i)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for b, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{b}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    archive = buf.getvalue()
    spec = copy.deepcopy(downloads._REAL["cifar10"])
    spec["files"] = {"cifar-10-python.tar.gz": hashlib.md5(archive).hexdigest()}
    spec["members"] = {b: hashlib.md5(raw).hexdigest() for b, raw in members.items()}
    monkeypatch.setitem(downloads._REAL, "cifar10", spec)
    _serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    train = data.load_dataset("cifar10")
    assert len(train) == 2 + 3 + 4 + 5 + 6 and train.image_shape == (3, 32, 32)
    assert train.labels.tolist() == sum((batches[f"data_batch_{j}"][b"labels"] for j in range(1, 6)), [])
    test = data.load_dataset("cifar10", "test", download=False)   # extracted batches are reused
    assert np.array_equal(test.images.flatten(1).numpy(), batches["test_batch"][b"data"])
    assert test.classes[0] == "airplane"
