"""Every lesson-00 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import CheckFailed, Exercise, seeded
from minigen.course.checks import l00 as check

from _check_helpers import stub, fails


# ---------------------------------------------------------------------------- 0.1
def test_to_minus_one_one_correct(capsys):
    check.to_minus_one_one(lambda x: x.float() / 127.5 - 1)
    check.to_minus_one_one(lambda x: x.to(torch.float32) * (2 / 255) - 1)
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and out.startswith("✓ Exercise 0.1 to_minus_one_one: passed")


def test_to_minus_one_one_stub():
    fails(check.to_minus_one_one, stub, "Exercise 0.1 (to_minus_one_one) is not done yet",
          "raise NotImplementedError")


@pytest.mark.parametrize("answer, fragment", [
    (lambda x: x.float() / 255, "[0, 1]"),
    (lambda x: x * 2 / 255 - 1, "wraps around at 256"),
    (lambda x: (x.float() - 128) / 128, "maps 255 to 0.992"),
    (lambda x: x.float() / 127.5, "[0, 2]"),
    (lambda x: x.double() / 127.5 - 1, "float64"),
    (lambda x: x // 128 - 1, "integer arithmetic"),
])
def test_to_minus_one_one_mistakes(answer, fragment):
    fails(check.to_minus_one_one, answer, "Exercise 0.1", fragment)


def test_to_minus_one_one_wrong_without_known_mistake():
    msg = fails(check.to_minus_one_one, lambda x: x.float() / 127.5 - 0.9, "wrong values", "max abs error")
    assert "Likely mistake" not in msg


def test_to_minus_one_one_shape_and_type():
    fails(check.to_minus_one_one, lambda x: (x.float() / 127.5 - 1).flatten(), "shape")
    fails(check.to_minus_one_one, lambda x: None, "torch.Tensor", "return")
    fails(check.to_minus_one_one, lambda x: (x.float() / 127.5 - 1).numpy(), "numpy")
    fails(check.to_minus_one_one, 3, "Pass the function itself")


def test_learner_exception_is_reported():
    msg = fails(check.to_minus_one_one, lambda x: x.foo(), "Exercise 0.1", "AttributeError")
    assert "(4, 3, 8, 8) uint8" in msg


# ---------------------------------------------------------------------------- 0.2
def good_display(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def test_to_display_correct(capsys):
    check.to_display(good_display)
    check.to_display(lambda x: ((x + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).movedim(-3, -1))
    assert capsys.readouterr().out.count("✓ Exercise 0.2 to_display: passed") == 2


def test_to_display_stub():
    fails(check.to_display, stub, "Exercise 0.2 (to_display) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).movedim(-3, -1), "truncates"),
    (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), "channel axis must move last"),
    (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(
        *x.shape[:-3], x.shape[-2], x.shape[-1], x.shape[-3]), "scrambled"),
    (lambda x: ((x + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1), "clamp"),
    (lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1), "[0, 1]"),
    (lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().movedim(-3, -1), "torch.uint8"),
    (lambda x: good_display(x).transpose(-3, -2), "swapped"),
])
def test_to_display_mistakes(answer, fragment):
    fails(check.to_display, answer, "Exercise 0.2", fragment)


def test_to_display_in_place():
    def inplace(x):
        x.clamp_(-1, 1)
        return good_display(x)
    fails(check.to_display, inplace, "in place")


# ---------------------------------------------------------------------------- 0.3
def good_grid(images, nrow, padding=2):
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.full((rows * h + (rows + 1) * padding, ncol * w + (ncol + 1) * padding, c), 255,
                      dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[padding + r * (h + padding):][:h, padding + col * (w + padding):][:, :w] = images[i]
    return grid


def vectorised_grid(images, nrow, padding=2):
    # a different correct formulation: pad every image, tile, add the top/left border
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    full = torch.full((rows * ncol, h + padding, w + padding, c), 255, dtype=torch.uint8)
    full[:n, :h, :w] = images
    tiled = full.view(rows, ncol, h + padding, w + padding, c).permute(0, 2, 1, 3, 4)
    tiled = tiled.reshape(rows * (h + padding), ncol * (w + padding), c)
    return F.pad(tiled.permute(2, 0, 1), (padding, 0, padding, 0), value=255).permute(1, 2, 0)


def test_make_grid_correct(capsys):
    check.make_grid(good_grid)
    check.make_grid(vectorised_grid)
    assert capsys.readouterr().out.count("✓ Exercise 0.3 make_grid: passed") == 2


def test_make_grid_stub():
    fails(check.make_grid, stub, "Exercise 0.3 (make_grid) is not done yet")


def black_grid(images, nrow, padding=2):
    g = good_grid(images, nrow, padding)
    mask = good_grid(torch.zeros_like(images), nrow, padding) == 255
    g[mask] = 0
    return g


def column_major(images, nrow, padding=2):
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.full((rows * h + (rows + 1) * padding, ncol * w + (ncol + 1) * padding, c), 255,
                      dtype=torch.uint8)
    for i in range(n):
        col, r = divmod(i, rows)
        if col < ncol:
            grid[padding + r * (h + padding):][:h, padding + col * (w + padding):][:, :w] = images[i]
    return grid


def no_outer_border(images, nrow, padding=2):
    return good_grid(images, nrow, padding)[padding:-padding or None, padding:-padding or None]


def always_nrow_columns(images, nrow, padding=2):
    n, h, w, c = images.shape
    padded = torch.cat([images, torch.full((max(nrow - n, 0), h, w, c), 255, dtype=torch.uint8)])
    return good_grid(padded, nrow, padding)


@pytest.mark.parametrize("answer, fragment", [
    (black_grid, "white (255)"),
    (column_major, "left to right, then top to bottom"),
    (no_outer_border, "around the outside"),
    (always_nrow_columns, "ncol = min(nrow, N)"),
])
def test_make_grid_mistakes(answer, fragment):
    fails(check.make_grid, answer, "Exercise 0.3", fragment)


# ---------------------------------------------------------------------------- 0.4
def test_reconstruction_loss_correct(capsys):
    check.reconstruction_loss(lambda x_hat, x: F.mse_loss(x_hat, x))
    check.reconstruction_loss(lambda x_hat, x: ((x - x_hat) ** 2).mean())
    assert capsys.readouterr().out.count("✓ Exercise 0.4 reconstruction_loss: passed") == 2


def test_reconstruction_loss_stub():
    fails(check.reconstruction_loss, stub, "Exercise 0.4 (reconstruction_loss) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (lambda x_hat, x: ((x_hat - x) ** 2).sum(), "you summed"),
    (lambda x_hat, x: (x_hat - x).abs().mean(), "L1"),
    (lambda x_hat, x: (x_hat - x).mean(), "cancel"),
    (lambda x_hat, x: ((x_hat - x) ** 2).mean().sqrt(), "RMSE"),
    (lambda x_hat, x: ((x_hat - x) ** 2).flatten(1).mean(1), "per image"),
    (lambda x_hat, x: F.mse_loss(x_hat, x, reduction="none"), "single number"),
    (lambda x_hat, x: ((x_hat - x) ** 2).flatten(1).sum(1).mean(), "averaged over images"),
])
def test_reconstruction_loss_mistakes(answer, fragment):
    fails(check.reconstruction_loss, answer, "Exercise 0.4", fragment)


def test_reconstruction_loss_detached():
    fails(check.reconstruction_loss, lambda x_hat, x: F.mse_loss(x_hat.detach(), x), "requires_grad")


# ---------------------------------------------------------------------------- framework
def test_statistics_check_is_deterministic_and_can_fail():
    ex = Exercise("9.9", "noise")
    for _ in range(3):  # a correct sampler passes every time: the check seeds the RNG
        with seeded(0):
            ex.mean_std(torch.randn(20000) * 2 + 1, mean=1.0, std=2.0)
    with seeded(0):
        z = torch.randn(20000) * 4 + 1
    with pytest.raises(CheckFailed, match="exp\\(logvar\\)"):
        ex.mean_std(z, mean=1.0, std=2.0, mistakes=[(1.0, 4.0, "you used exp(logvar)")])
    with pytest.raises(CheckFailed, match="expected 0.5"):
        ex.statistic(0.7, 0.5, 0.01, what="the fraction", n=2500)


def test_seeded_restores_rng_state():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    with seeded(123):
        torch.rand(100)
    assert torch.equal(torch.rand(3), a)


def test_subclass_output_rejected():
    class Sneaky(torch.Tensor):
        pass
    ex = Exercise("9.9", "x")
    with pytest.raises(CheckFailed, match="subclass"):
        ex.tensor(torch.zeros(2).as_subclass(Sneaky))


def test_to_display_single_image_only():
    def one_image(x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)

    msg = fails(check.to_display, one_image, "Exercise 0.2", "RuntimeError", "works for one image")
    assert "Your" not in msg  # the frames are in learner_traceback, shown by the renderer


def test_to_minus_one_one_batch_range_and_ranks():
    # min/max normalisation passes every batch that holds both 0 and 255; the check has others
    fails(check.to_minus_one_one, lambda x: (x.float() - x.float().min()) / (x.float().max() - x.float().min()) * 2 - 1,
          "Exercise 0.1", "batch's own min and max")
    # any rank: a 1-D batch, a 5-D batch and a single pixel (0-dim)
    check.to_minus_one_one(lambda x: torch.as_tensor(x, dtype=torch.float32).mul(2 / 255).sub(1))


def test_make_grid_keywords_and_defaults():
    def other_default(images, nrow, padding=0):
        return good_grid(images, nrow, padding)

    fails(check.make_grid, other_default, "Exercise 0.3", "padding=2")

    def positional_only(images, nrow, pad=2):
        return good_grid(images, nrow, pad)

    fails(check.make_grid, positional_only, "keyword argument `padding`")


def test_reconstruction_loss_any_rank(capsys):
    check.reconstruction_loss(lambda a, b: torch.mean(torch.square(a - b)))
    assert "✓ Exercise 0.4" in capsys.readouterr().out
