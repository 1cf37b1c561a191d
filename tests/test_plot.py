import numpy as np
import pytest
import torch

from minigen import plot


def test_grid_layout_and_values():
    x = torch.full((5, 3, 4, 4), -1.0)
    x[1] = 1.0
    g = plot.image_grid(x, nrow=3, padding=1)
    # 2 rows x 3 columns of 4x4 tiles with 1-pixel borders.
    assert g.shape == (2 * 4 + 3, 3 * 4 + 4, 3) and g.dtype == np.uint8
    assert (g[1:5, 1:5] == 0).all()          # first image: black
    assert (g[1:5, 6:10] == 255).all()       # second image: white
    assert (g[0] == 255).all()               # border is white
    assert (g[6:10, 11:15] == 255).all()     # missing sixth tile stays pad colour


def test_grayscale_and_uint8_and_clipping():
    x = torch.linspace(-2, 2, 16).reshape(1, 1, 4, 4)
    g = plot.image_grid(x, padding=0)
    assert g.shape == (4, 4, 3) and g[0, 0, 0] == 0 and g[-1, -1, 0] == 255
    u = torch.full((2, 1, 3, 3), 255, dtype=torch.uint8)
    assert (plot.image_grid(u, padding=0) == 255).all()


def test_bad_layouts_have_clear_errors():
    with pytest.raises(ValueError, match="permute"):
        plot.image_grid(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="NaN"):
        plot.image_grid(torch.full((1, 1, 2, 2), float("nan")))


def test_save_grid_writes_png(tmp_path):
    from PIL import Image

    p = plot.save_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "a" / "g.png", nrow=2, scale=2)
    im = Image.open(p)
    assert im.size == ((2 * 8 + 6) * 2, (2 * 8 + 6) * 2)


def test_plot_losses_and_missing_key():
    import matplotlib
    matplotlib.use("Agg")
    hist = [{"step": i, "loss": 1 / (i + 1)} for i in range(10)]
    ax = plot.plot_losses(hist, smooth=3)
    assert len(ax.lines) == 1
    with pytest.raises(KeyError, match="available keys"):
        plot.plot_losses(hist, keys=("kl",))
