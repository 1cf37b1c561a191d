"""Checks for lesson 00 (setup and tour): images as tensors, display, grids, reconstruction loss.

Each check calls the learner's function on fresh seeded random inputs and compares it with
a reference written here, in float64 where it matters. Wrong answers that match a typical
mistake get a "Likely mistake" line.
"""

from __future__ import annotations

import math

import torch

from minigen.course.checks._framework import CheckFailed, Exercise, _fmt_shape, checker, show_hint

__all__ = ["hint", "to_minus_one_one", "to_display", "make_grid", "reconstruction_loss", "to_minus_one_one_hidden", "to_display_hidden", "make_grid_hidden", "reconstruction_loss_hidden"]


# ---------------------------------------------------------------------------- 0.1
def _random_uint8(shape, g, lo=0, hi=255) -> torch.Tensor:
    """Random pixels in [lo, hi]; with the full range both ends occur, else neither need to."""
    x = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.uint8)
    if (lo, hi) == (0, 255) and x.numel() >= 2:
        x.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    return x


@checker
def to_minus_one_one(fn) -> None:
    """Exercise 0.1: uint8 images in {0..255} -> float32 in [-1, 1], 0 -> -1 and 255 -> 1.

    The map is fixed (it does not depend on the batch): batches of any shape, with the full
    range of values and with narrow random ranges that touch neither 0 nor 255.
    """
    ex = Exercise("0.1", "to_minus_one_one")
    g = torch.Generator().manual_seed(1)
    lo, hi = (int(v) for v in torch.randint(20, 120, (2,), generator=g) + torch.tensor([0, 100]))
    cases = [((4, 3, 8, 8), 0, 255), ((2, 1, 5, 7), lo, hi), ((3, 6, 6), 0, 255), ((7,), 40, 90),
             ((2, 3, 2, 4, 5), lo, hi), ((5, 9), 0, 255), ((), 200, 200)]
    for shape, lo_, hi_ in cases:
        x = _random_uint8(shape, g, lo_, hi_)
        x_before = x.clone()
        case = f" (input shape {_fmt_shape(shape)}, values {int(x.min())}..{int(x.max())})"
        out = ex.call(fn, x)
        if isinstance(out, torch.Tensor) and out.dtype in (torch.uint8, torch.int64, torch.int32):
            ex.fail(f"the output has dtype {out.dtype}; images in [-1, 1] need a float dtype",
                    mistake="integer arithmetic: convert first with x.float(), then scale")
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            ex.fail("the output has dtype torch.float64, expected torch.float32",
                    mistake="x.double() or numpy arithmetic gives float64; use x.float()")
        out = ex.tensor(out, shape=shape, dtype=torch.float32, what="the output" + case)
        if not torch.equal(x, x_before):
            ex.fail("your function changed its input tensor in place; return a new tensor instead")
        xd = x.double()
        reference = xd / 127.5 - 1.0
        wrapped = (x.long() * 2 % 256).double()  # what uint8 arithmetic x * 2 produces
        span = float(xd.max() - xd.min())
        minmax = ((xd - xd.min()) / span * 2 - 1) if span > 0 else torch.full_like(xd, float("nan"))
        if not torch.isfinite(out).all() and span == 0:
            ex.fail("the output contains NaN for a batch whose pixels all have the same value" + case,
                    mistake="you scaled by the batch's own min and max (0/0 here); the map is fixed: "
                            "0 -> -1 and 255 -> +1 whatever the batch holds")
        ex.close(out, reference, atol=1e-6, what="the output" + case, mistakes=[
            (minmax, "you scaled by this batch's own min and max; the map must be the same for every "
                     "batch: 0 -> -1 and 255 -> +1 even when a batch has no black or white pixel"),
            (xd / 255.0, "this maps to [0, 1]; the course uses [-1, 1]: x / 127.5 - 1"),
            (xd / 127.5, "this maps to [0, 2]: subtract 1 after dividing by 127.5"),
            (wrapped / 255.0 - 1.0, "x * 2 on a uint8 tensor wraps around at 256; convert with "
                                    "x.float() before multiplying"),
            ((xd - 128.0) / 128.0, "(x - 128) / 128 maps 255 to 0.992, not 1: use x / 127.5 - 1"),
            (xd / 128.0 - 1.0, "dividing by 128 maps 255 to 0.992, not 1: use 127.5 = 255 / 2"),
            (1.0 - xd / 127.5, "the sign is flipped: 0 must map to -1 and 255 to +1"),
        ])
    ex.passed("values, shapes, dtype float32")


# ---------------------------------------------------------------------------- 0.2
def _display_inputs(shape, g):
    """Float images whose exact display value k is unambiguous (no value near a .5 boundary)."""
    k = torch.randint(0, 256, shape, generator=g).double()
    noise = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 0.6  # |noise| < 0.3
    x = (k + noise) / 127.5 - 1.0
    # a few values outside [-1, 1], as a model's samples can overshoot
    flat = x.view(-1)
    flat[0], flat[1], flat[2] = 1.5, -1.4, 1.02
    x = x.float()
    return x


@checker
def to_display(fn) -> None:
    """Exercise 0.2: float (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, C), rounded and clamped."""
    ex = Exercise("0.2", "to_display")
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 8, 6), (2, 1, 5, 7), (4, 3, 4, 9)]:
        x = _display_inputs(shape, g)
        x_before = x.clone()
        try:
            out = ex.call(fn, x)
        except CheckFailed as e:
            if len(shape) != 3 and "raised" in str(e):
                ex.refail(e, "your function works for one image (C, H, W) but not for a batch "
                             f"{_fmt_shape(shape)}: count the axes from the end (the channel axis is -3) "
                             "so leading batch axes stay where they are")
            raise
        *lead, c, h, w = shape
        want = (*lead, h, w, c)
        if isinstance(out, torch.Tensor) and tuple(out.shape) != want:
            got = tuple(out.shape)
            if got == tuple(shape):
                ex.fail(f"the output has shape {got}, expected {want}",
                        mistake="the channel axis must move last for matplotlib: x.movedim(-3, -1) "
                                "(for a single image x.permute(1, 2, 0))")
            if got == (*lead, w, h, c):
                ex.fail(f"the output has shape {got}, expected {want}",
                        mistake="height and width are swapped: permute(1, 2, 0), not permute(2, 1, 0)")
            ex.fail(f"the output has shape {got}, expected {want} (height, width, channels last)")
        if isinstance(out, torch.Tensor) and out.dtype != torch.uint8:
            ex.fail(f"the output has dtype {out.dtype}, expected torch.uint8",
                    mistake="convert at the end with .to(torch.uint8), after rounding and clamping")
        out = ex.tensor(out, shape=want, dtype=torch.uint8)
        if not torch.equal(x, x_before):
            ex.fail("your function changed its input tensor in place (e.g. clamp_ or add_); "
                    "work on a copy or use the out-of-place versions")
        xd = x.double()
        scaled = (xd.clamp(-1, 1) + 1) * 127.5
        reference = scaled.round().movedim(-3, -1)
        mistakes = [
            (scaled.floor().movedim(-3, -1),
             ".to(torch.uint8) truncates (3.9 -> 3): round first with .round()"),
            (scaled.round().reshape(want),
             "reshape/view keeps the memory order, so the pixels get scrambled; "
             "move axes with permute/movedim instead"),
            ((xd.clamp(0, 1) * 255).round().movedim(-3, -1),
             "this treats the input as [0, 1]; it is in [-1, 1]: (x + 1) * 127.5"),
        ]
        unclamped = ((x + 1) * 127.5).round()
        if torch.isfinite(unclamped).all():
            mistakes.append((unclamped.to(torch.uint8).movedim(-3, -1),
                             "values outside [-1, 1] give numbers outside 0..255, which wrap "
                             "around in uint8: clamp to [-1, 1] first"))
        ex.close(out, reference, atol=0.0, what="the pixel values", mistakes=mistakes)
    ex.passed("values, rounding, clamping, shapes, dtype uint8")


# ---------------------------------------------------------------------------- 0.3
def _reference_grid(images: torch.Tensor, nrow: int, padding: int) -> torch.Tensor:
    """Written independently of minigen.plot: loops over pixel blocks, white background."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((nrows * h + (nrows + 1) * padding, ncol * w + (ncol + 1) * padding, c),
                      255, dtype=torch.uint8)
    for i in range(n):
        r, col = i // ncol, i % ncol
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


@checker
def make_grid(fn) -> None:
    """Exercise 0.3: uint8 images (N, H, W, C) -> one uint8 grid image, row-major, white padding."""
    ex = Exercise("0.3", "make_grid")
    g = torch.Generator().manual_seed(3)
    for k, (n, h, w, c, nrow, padding) in enumerate([(7, 5, 6, 3, 3, 2), (4, 4, 4, 1, 8, 1), (6, 3, 5, 3, 2, 0),
                                                     (5, 4, 3, 3, 5, 3), (1, 6, 2, 4, 3, 4), (9, 2, 3, 2, 4, 2)]):
        # values below 255 so the white padding is distinguishable from image pixels
        images = torch.randint(0, 255, (n, h, w, c), generator=g, dtype=torch.uint8)
        before = images.clone()
        # every way of passing the arguments: positional, keywords, and padding's default (2)
        if padding == 2 and k % 2 == 0:
            out = ex.call(fn, images, nrow)
        elif k % 2:
            out = ex.call(fn, images, nrow=nrow, padding=padding)
        else:
            out = ex.call(fn, images, nrow, padding)
        ref = _reference_grid(images, nrow, padding)
        case = f" (N={n}, H={h}, W={w}, C={c}, nrow={nrow}, padding={padding})"
        if isinstance(out, torch.Tensor) and tuple(out.shape) != tuple(ref.shape):
            got = tuple(out.shape)
            ncol = min(nrow, n)
            nrows = math.ceil(n / ncol)
            hint = None
            if len(got) != 3:
                hint = "the grid is one image of shape (height, width, C)"
            elif got == (nrows * h + (nrows - 1) * padding, ncol * w + (ncol - 1) * padding, c) and padding:
                hint = "padding goes around the outside too: height = rows*H + (rows+1)*padding"
            elif got[1] == nrow * w + (nrow + 1) * padding and nrow > n:
                hint = "with fewer images than nrow, the grid has only N columns: ncol = min(nrow, N)"
            elif got[2] != c and got[0] == c:
                hint = "the images are (N, H, W, C) and the grid must be (height, width, C)"
            elif got[:2] == tuple(ref.shape[:2])[::-1]:
                hint = "rows and columns are swapped: nrow is the number of images per row"
            ex.fail(f"the grid has shape {got}, expected {tuple(ref.shape)}{case}", mistake=hint)
        out = ex.tensor(out, shape=ref.shape, dtype=torch.uint8, what="the grid")
        if not torch.equal(images, before):
            ex.fail("your function changed its input images in place")
        # known wrong variants
        black = _reference_grid(images, nrow, padding)
        black[_reference_grid(torch.zeros_like(images), nrow, padding) == 255] = 0
        col_major = torch.full_like(ref, 255)
        ncol = min(nrow, n)
        nrows = math.ceil(n / ncol)
        for i in range(n):
            r, col = i % nrows, i // nrows
            if col < ncol:
                top, left = padding + r * (h + padding), padding + col * (w + padding)
                col_major[top:top + h, left:left + w] = images[i]
        no_lead = torch.full_like(ref, 255)
        for i in range(n):
            r, col = i // ncol, i % ncol
            top, left = r * (h + padding), col * (w + padding)
            no_lead[top:top + h, left:left + w] = images[i]
        ex.close(out, ref, atol=0.0, what="the grid" + case, mistakes=[
            (black, "the background must be white (255): start from torch.full(..., 255)"),
            (col_major, "images go left to right, then top to bottom: row = i // ncol, col = i % ncol"),
            (no_lead, "each image starts after the padding: top = padding + row * (H + padding)"),
        ])
    ex.passed("layout, padding, shapes, dtype uint8")


# ---------------------------------------------------------------------------- 0.4
@checker
def reconstruction_loss(fn) -> None:
    """Exercise 0.4: mean squared error between x_hat and x over every element, a scalar."""
    ex = Exercise("0.4", "reconstruction_loss")
    g = torch.Generator().manual_seed(4)
    for shape in [(4, 3, 8, 8), (2, 1, 5, 7), (6, 5), (3, 2, 4, 3, 2)]:
        x = torch.rand(shape, generator=g) * 2 - 1
        x_hat = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_()
        out = ex.call(fn, x_hat, x)
        if isinstance(out, torch.Tensor) and out.dim() != 0:
            mistake = ("you averaged per image; average over the batch too: .mean() over everything"
                       if tuple(out.shape) == (shape[0],) and len(shape) > 2 else
                       "F.mse_loss(..., reduction='none') or a missing .mean() keeps one value per pixel")
            ex.fail(f"the loss has shape {tuple(out.shape)}; a loss must be a single number (shape ())",
                    mistake=mistake)
        out = ex.tensor(out, shape=(), what="the loss")
        if out.dtype != torch.float32:
            ex.fail(f"the loss has dtype {out.dtype}, expected torch.float32")
        d = x_hat.detach().double() - x.double()
        n_pix = d[0].numel()
        reference = (d ** 2).mean()
        ex.close(out, reference, atol=1e-6, rtol=1e-5, what="the loss", mistakes=[
            ((d ** 2).sum(), "you summed; take the mean so the loss does not grow with batch and "
                             "image size (it would change the effective learning rate)"),
            ((d ** 2).sum() / shape[0], "you summed over pixels and averaged over images; average "
                                        "over every element (the package's convention)"),
            (d.abs().mean(), "that is the mean absolute error (L1); square the difference"),
            (d.mean(), "square the difference before averaging, or positive and negative errors cancel"),
            ((d ** 2).mean().sqrt(), "you took the square root (RMSE); the loss is the plain mean square"),
            ((d ** 2).mean() * n_pix, "the scale is off by the number of pixels per image"),
        ])
        ex.gradients_flow(out, {"x_hat": x_hat}, what="the loss")
    ex.passed("values, scalar shape, gradients")


# ---------------------------------------------------------------------------- hidden tests
@checker
def to_minus_one_one_hidden(fn) -> None:
    """Hidden test of 0.1: an empty batch, a non-contiguous view, every value 0..255 once."""
    ex = Exercise("0.1", "to_minus_one_one", hidden=True)
    every = torch.arange(256, dtype=torch.uint8)
    out = ex.tensor(ex.call(fn, every.clone()), shape=(256,), dtype=torch.float32, what="the output for 0..255")
    ex.close(out, every.double() / 127.5 - 1, atol=1e-6, what="the output for every value 0..255")
    x = torch.randint(0, 256, (3, 5, 4), generator=torch.Generator().manual_seed(100), dtype=torch.uint8)
    view = x.transpose(0, 2)  # (4, 5, 3), not contiguous
    out = ex.tensor(ex.call(fn, view), shape=(4, 5, 3), dtype=torch.float32, what="the output for a transposed view")
    ex.close(out, view.double() / 127.5 - 1, atol=1e-6, what="the output for a transposed view")
    ex.tensor(ex.call(fn, torch.zeros(0, 3, 8, 8, dtype=torch.uint8)), shape=(0, 3, 8, 8), dtype=torch.float32,
              what="the output for an empty batch")


@checker
def to_display_hidden(fn) -> None:
    """Hidden test of 0.2: exact values at -1, 0, +1 and far outside [-1, 1]; a single image."""
    ex = Exercise("0.2", "to_display", hidden=True)
    x = torch.tensor([-1.0, 1.0, 0.0, -50.0, 50.0, 0.5]).view(2, 3, 1)  # (C=2, H=3, W=1)
    out = ex.tensor(ex.call(fn, x.clone()), shape=(3, 1, 2), dtype=torch.uint8, what="the pixels of one image")
    want = torch.tensor([0, 255, 128, 0, 255, 191], dtype=torch.float64).view(2, 3, 1).movedim(0, -1)
    ex.close(out, want, atol=0.0, what="the pixels for -1, +1, 0, -50, +50 and 0.5")


@checker
def make_grid_hidden(fn) -> None:
    """Hidden test of 0.3: one image, and exactly nrow images (one full row)."""
    ex = Exercise("0.3", "make_grid", hidden=True)
    g = torch.Generator().manual_seed(103)
    for n, nrow, padding in [(1, 4, 1), (3, 3, 2)]:
        images = torch.randint(0, 255, (n, 4, 5, 3), generator=g, dtype=torch.uint8)
        out = ex.call(fn, images, nrow, padding=padding)
        ref = _reference_grid(images, nrow, padding)
        out = ex.tensor(out, shape=ref.shape, dtype=torch.uint8, what=f"the grid of {n} image(s), nrow={nrow}")
        ex.close(out, ref, atol=0.0, what=f"the grid of {n} image(s), nrow={nrow}")


@checker
def reconstruction_loss_hidden(fn) -> None:
    """Hidden test of 0.4: zero for equal inputs, symmetric, and the exact gradient 2 (x_hat - x) / n."""
    ex = Exercise("0.4", "reconstruction_loss", hidden=True)
    g = torch.Generator().manual_seed(104)
    x = torch.rand(3, 2, 4, 5, generator=g) * 2 - 1
    ex.close(ex.tensor(ex.call(fn, x.clone(), x.clone()), shape=(), what="the loss of x against itself"),
             torch.zeros(()), atol=0.0, what="the loss of x against itself")
    x_hat = (torch.rand(x.shape, generator=g) * 2 - 1).requires_grad_()
    loss = ex.tensor(ex.call(fn, x_hat, x), shape=(), what="the loss")
    (grad,) = torch.autograd.grad(loss, [x_hat])
    ex.close(grad, 2 * (x_hat.detach().double() - x.double()) / x.numel(), atol=1e-7, rtol=1e-5,
             what="the gradient with respect to x_hat")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '0.1': (
        'A uint8 pixel is an integer from 0 to 255, and integer arithmetic wraps around. The '
        'model wants floats where black is -1 and white is +1: a fixed straight-line map, the '
        "same for every batch, not one that depends on the batch's darkest and brightest pixel.",
        'Convert the tensor to 32-bit floats first. Then find the line through the two points (0,'
        ' -1) and (255, +1): divide by half of 255 and subtract one.',
    ),
    '0.2': (
        'This undoes exercise 0.1 for pictures: back to integers 0..255, and matplotlib wants the'
        " channel axis last. A model's output can overshoot [-1, 1].",
        'Clamp to [-1, 1]; map -1 to 0 and +1 to 255 with the inverse of the line from 0.1; round'
        ' to the nearest integer (converting to uint8 alone truncates); convert to uint8; finally'
        ' move the channel axis (third from the end) to the end. Leading batch axes, if any, '
        'stay.',
    ),
    '0.3': (
        'Think of a white canvas with slots: `nrow` images per row, as many rows as needed, and '
        '`padding` pixels of white around and between the images.',
        'Number of columns: the smaller of nrow and N. Number of rows: N divided by the columns, '
        'rounded up. Canvas height: rows times H plus (rows + 1) times padding, same idea for the'
        ' width. Fill it with 255, then copy image i into row i // columns, column i % columns, '
        'offset by the padding before each slot.',
    ),
    '0.4': (
        'The mean squared error: the average over every element (batch, channels, pixels) of the '
        'squared difference. One number, and gradients must flow back to x_hat.',
        'Subtract the target from the prediction, square each element, take the mean over all '
        'elements. Stay in torch (no .item(), no numpy) so autograd can follow.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
