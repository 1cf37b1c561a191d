"""minigen.metrics against independent references: scikit-image, scipy, brute force."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from minigen import metrics


def _skimage_ssim(x, y, data_range):
    """Reference SSIM per image, float64 (skimage computes in the input's float type).

    The tests compare to 1e-8, not 1e-4: using sample instead of population variances
    moves SSIM by only ~4e-6 on noisy images, and that mistake should fail.
    """
    out = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        out.append(
            structural_similarity(
                a, b, channel_axis=0, data_range=data_range, gaussian_weights=True,
                sigma=1.5, use_sample_covariance=False,
            )
        )
    return np.array(out)


def _structured(n, c, h, w, gen):
    """Smooth gradients, stripes and blobs in [-1, 1]: images with real structure."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = []
    for _ in range(n):
        f = torch.rand(3, generator=gen) * 6 + 1
        ph = torch.rand(3, generator=gen) * 6.28
        chans = [
            torch.sin(f[i % 3] * xx + ph[i % 3]) * torch.cos(f[(i + 1) % 3] * yy) * 0.7
            + 0.3 * torch.tanh(5 * (xx**2 + yy**2 - torch.rand(1, generator=gen)))
            for i in range(c)
        ]
        imgs.append(torch.stack(chans))
    return torch.stack(imgs).clamp(-1, 1)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 28, 28), (2, 3, 17, 40)])
def test_ssim_matches_skimage_random(shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.rand(shape, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=gen)).clamp(-1, 1)
    ours = metrics.ssim(x, y).numpy()
    np.testing.assert_allclose(ours, _skimage_ssim(x, y, 2.0), atol=1e-8)


def test_ssim_matches_skimage_structured_and_unit_range():
    gen = torch.Generator().manual_seed(1)
    x = _structured(4, 3, 32, 32, gen)
    # blur-like, shift-like, contrast-change and noise distortions
    y = torch.stack([
        x[0].roll(1, dims=2),
        0.5 * x[1],
        (x[2] + 0.1 * torch.randn(x[2].shape, generator=gen)).clamp(-1, 1),
        torch.nn.functional.avg_pool2d(x[3:4], 3, 1, 1)[0],
    ])
    ours = metrics.ssim(x, y).numpy()
    ref = _skimage_ssim(x, y, 2.0)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    assert ref.min() < 0.9  # the distortions are visible, so the test discriminates

    # [0, 1] images: L = 1
    xu, yu = (x + 1) / 2, (y + 1) / 2
    np.testing.assert_allclose(metrics.ssim(xu, yu, data_range="[0,1]").numpy(), _skimage_ssim(xu, yu, 1.0), atol=1e-8)


def test_ssim_identity_and_single_image():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert metrics.ssim(x[0], x[0]).shape == ()


def test_psnr_known_values():
    x = torch.rand(3, 3, 32, 32) * 1.8 - 0.9
    delta = torch.tensor([0.1, 0.02, 0.05]).view(3, 1, 1, 1)
    y = x + delta
    expected = 10 * torch.log10(4.0 / delta.view(-1).double() ** 2)  # L = 2 in [-1, 1]
    torch.testing.assert_close(metrics.psnr(x, y), expected, rtol=0, atol=1e-4)
    # the same images mapped to [0,1]: offset and range both halve, so PSNR is unchanged
    xu, yu = (x + 1) / 2, (y + 1) / 2
    torch.testing.assert_close(metrics.psnr(xu, yu, data_range="[0,1]"), expected, rtol=0, atol=1e-4)
    for a, b, e in zip(xu.numpy(), yu.numpy(), metrics.psnr(xu, yu, data_range="[0,1]")):
        assert abs(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1.0) - float(e)) < 1e-4
    assert math.isinf(float(metrics.psnr(x[0], x[0])))


def test_metrics_reject_bad_images():
    x = torch.rand(2, 3, 32, 32) * 255
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(x, x)
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 28, 28))
    with pytest.raises(TypeError, match="from_uint8"):
        metrics.psnr(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    # a raw number is a peak-to-peak range, as in skimage
    assert torch.isfinite(metrics.psnr(x, x + 1.0, data_range=255.0)).all()


def _fd_scipy(f1, f2):
    """The textbook formula with scipy's general matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng()
    d = 16
    a = rng.normal(size=(d, d))
    f1 = rng.normal(size=(600, d)) @ a
    f2 = rng.normal(size=(500, d)) @ (a + 0.3 * rng.normal(size=(d, d))) + 0.5
    ours = metrics.frechet_distance(torch.from_numpy(f1).float(), f2)
    ref = _fd_scipy(f1.astype(np.float32).astype(np.float64), f2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # from (mu, sigma) pairs gives the same number
    s1, s2 = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
    assert metrics.frechet_distance(s1, s2) == pytest.approx(_fd_scipy(f1, f2), rel=1e-6)


def test_frechet_distance_closed_form_and_self():
    # diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    a, b = torch.rand(8, dtype=torch.float64) + 0.1, torch.rand(8, dtype=torch.float64) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert metrics.frechet_distance((mu1, torch.diag(a)), (mu2, torch.diag(b))) == pytest.approx(float(expected), rel=1e-10)

    f = torch.randn(300, 32) * 3
    assert metrics.frechet_distance(f, f) < 1e-8
    # more dimensions than samples: singular covariance, still finite and >= 0
    g = torch.randn(20, 64)
    v = metrics.frechet_distance(g, g)
    assert 0 <= v < 1e-6
    assert math.isfinite(metrics.frechet_distance(g, torch.randn(20, 64)))


def _mmd2_brute(x, y):
    m, n = len(x), len(y)
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_brute_force():
    rng = np.random.default_rng()
    x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 6)) + 0.4
    # one subset of all vectors: MMD^2 does not depend on the order, so it is exact
    mean, std = metrics.kid(x, y, subset_size=25, num_subsets=1)
    assert mean == pytest.approx(_mmd2_brute(x, y), rel=1e-9)
    assert std == 0.0


def test_kid_same_distribution_near_zero_and_different_clearly_positive():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 32, generator=gen)
    b = torch.randn(2000, 32, generator=gen)
    mean, std = metrics.kid(a, b, subset_size=500, num_subsets=50)
    assert abs(mean) < std
    mean_shift, std_shift = metrics.kid(a, b + 0.5, subset_size=500, num_subsets=50)
    assert mean_shift > 10 * std_shift and mean_shift > 10 * abs(mean)


def _pr_brute(real, fake, k):
    def radii(s):
        d = np.linalg.norm(s[:, None] - s[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    def cov(man, r, q):
        d = np.linalg.norm(q[:, None] - man[None], axis=-1)
        return float(np.mean((d <= r[None]).any(axis=1)))

    return cov(real, radii(real), fake), cov(fake, radii(fake), real)


def test_precision_recall():
    # Seeded: with 200 fake points precision is 1.0 by chance now and then, which would make
    # the strict ordering below flaky; the brute-force comparison is what tests the code.
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 5))
    fake = rng.normal(size=(200, 5)) * 0.6 + 0.8  # partly overlapping, narrower
    p, r = metrics.precision_recall(real, fake, k=3, batch_size=64)
    pb, rb = _pr_brute(real, fake, 3)
    assert (p, r) == (pytest.approx(pb, abs=1e-12), pytest.approx(rb, abs=1e-12))
    assert 0 < r < p < 1  # narrower fake set: precise but covers less
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, fake + 100.0) == (0.0, 0.0)


def test_codebook_usage():
    k = 16
    u = metrics.codebook_usage(torch.arange(k).repeat(10), k)
    assert u.perplexity == pytest.approx(k) and u.fraction_used == 1.0
    u = metrics.codebook_usage(torch.full((50,), 3), k)
    assert u.perplexity == pytest.approx(1.0) and u.fraction_used == 1 / k
    idx = torch.randint(0, 8, (4, 7, 7))  # uses at most half of 16 codes
    p = torch.bincount(idx.flatten(), minlength=k).double() / idx.numel()
    ent = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
    perplexity, frac = metrics.codebook_usage(idx, k)
    assert perplexity == pytest.approx(math.exp(ent)) and frac == pytest.approx(float((p > 0).double().mean()))
    with pytest.raises(ValueError):
        metrics.codebook_usage(torch.tensor([0, 16]), k)


def test_bits_per_dim():
    # a uniform model over 256 levels per dim has exactly 8 bits/dim
    dims = 3 * 32 * 32
    nll = dims * math.log(256)
    assert metrics.bits_per_dim(nll, dims) == pytest.approx(8.0)
    assert metrics.bits_per_dim(nll, (3, 32, 32)) == pytest.approx(8.0)
    t = metrics.bits_per_dim(torch.tensor([nll, nll / 2]), dims)
    torch.testing.assert_close(t, torch.tensor([8.0, 4.0]))
