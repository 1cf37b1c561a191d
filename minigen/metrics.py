"""Metrics for generative image models.

Two families live here:

* **Per-image fidelity** between a reconstruction and its target: `psnr` and `ssim`
  (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural
  Similarity"). Both take batches (N, C, H, W) and return one value per image.
* **Distribution distances** between two *sets* of feature vectors: `frechet_distance`
  (Heusel et al. 2017, the formula behind FID), `kid` (Binkowski et al. 2018, "Demystifying
  MMD GANs") and `precision_recall` (Kynkaanniemi et al. 2019, "Improved Precision and
  Recall Metric for Assessing Generative Models"). The features come from a small judge
  network trained on the dataset (`minigen.judge`); FID proper uses Inception-v3 features,
  which we cannot download offline, so minigen reports "FD-shapes" / "FD-digits" instead.
  Numbers computed in different feature spaces are not comparable with each other or with
  published FIDs; compare models only within one feature space and at one sample size.

Plus small helpers shared by the model lessons: `conditional_accuracy`,
`codebook_usage` and `bits_per_dim`.

Everything statistical is done in float64: covariance matrices of a few hundred
dimensions lose digits quickly in float32, and the answer is a small difference of large
numbers (tr S1 + tr S2 - 2 tr sqrt(S1 S2)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "psnr",
    "ssim",
    "feature_statistics",
    "frechet_distance",
    "kid",
    "precision_recall",
    "conditional_accuracy",
    "codebook_usage",
    "CodebookUsage",
    "bits_per_dim",
]


# ----------------------------------------------------------------------------------------
# Per-image fidelity: PSNR and SSIM
# ----------------------------------------------------------------------------------------

_RANGES = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0)}


def _value_range(data_range) -> tuple[float, float] | None:
    """Map the `data_range` keyword to (low, high), or None for a bare peak-to-peak number."""
    if isinstance(data_range, str):
        key = data_range.replace(" ", "")
        if key not in _RANGES:
            raise ValueError(
                f"data_range={data_range!r} is not understood; use '[-1,1]' (minigen's "
                "convention), '[0,1]', or a positive number (the peak-to-peak range)"
            )
        return _RANGES[key]
    return None


def _prepare_pair(x, y, data_range, name: str) -> tuple[Tensor, Tensor, float, bool]:
    """Validate a pair of image batches; return float64 (N,C,H,W) tensors, L, and squeeze flag."""
    for arg, label in ((x, "x"), (y, "y")):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(arg).__name__}")
        if not arg.is_floating_point():
            raise TypeError(
                f"{name}: {label} has dtype {arg.dtype}; convert uint8 images with "
                "minigen.data.from_uint8 (to [-1,1]) first"
            )
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    squeeze = x.dim() == 3
    if squeeze:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images of shape (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")

    bounds = _value_range(data_range)
    if bounds is None:
        L = float(data_range)
        if not L > 0:
            raise ValueError(f"{name}: data_range must be positive, got {data_range}")
    else:
        lo, hi = bounds
        L = hi - lo
        # A generous tolerance: an unclamped decoder may overshoot a little, but [0,255]
        # images passed as [-1,1] (the usual mistake) are far outside and must not pass.
        tol = 0.1 * L
        for arg, label in ((x, "x"), (y, "y")):
            if not torch.isfinite(arg).all():
                raise ValueError(f"{name}: {label} contains NaN or inf")
            amin, amax = float(arg.min()), float(arg.max())
            if amin < lo - tol or amax > hi + tol:
                raise ValueError(
                    f"{name}: {label} has values in [{amin:.3g}, {amax:.3g}] but data_range="
                    f"{data_range!r}; rescale the images (minigen images are in [-1,1]) or pass "
                    "the matching data_range"
                )
    return x.double(), y.double(), L, squeeze


def psnr(x: Tensor, y: Tensor, data_range="[-1,1]") -> Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    PSNR = 10 log10(L^2 / MSE), with L the peak-to-peak range of the pixel values and the
    MSE taken over all channels and pixels of each image.

    Args:
        x, y: images (N, C, H, W) (or a single (C, H, W) image), float, in [-1, 1] by
            default. Pass ``data_range="[0,1]"`` for images in [0, 1], or a number for
            the peak-to-peak range of anything else (e.g. 255.0).
    Returns:
        float64 tensor (N,) (a 0-dim tensor for a single image); ``inf`` where x == y.
    """
    x, y, L, squeeze = _prepare_pair(x, y, data_range, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(L * L / mse)  # mse == 0 -> +inf, as it should
    return out[0] if squeeze else out


def _gaussian_window(size: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian, the same taps as scipy.ndimage.gaussian_filter uses."""
    r = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float64) - r
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range="[-1,1]",
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    K1: float = 0.01,
    K2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al. 2004), mean SSIM per image.

    Local statistics come from an 11x11 Gaussian window (sigma 1.5) applied as a *valid*
    convolution (no padding), population (not sample) variances, C1 = (K1 L)^2 and
    C2 = (K2 L)^2, and the SSIM map is averaged over pixels and then over channels. This
    is exactly ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=L, channel_axis=...)``.

    Args:
        x, y: images (N, C, H, W) (or one (C, H, W) image), float, in [-1, 1] by default
            (L = 2). Pass ``data_range="[0,1]"`` for [0, 1] images (L = 1) or a number.
            H and W must be at least ``win_size``.
    Returns:
        float64 tensor (N,) of values in [-1, 1]; 1 means identical.
    """
    x, y, L, squeeze = _prepare_pair(x, y, data_range, "ssim")
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"ssim: win_size must be an odd number >= 3, got {win_size}")
    N, C, H, W = x.shape
    if H < win_size or W < win_size:
        raise ValueError(f"ssim: images of {H}x{W} are smaller than the {win_size}x{win_size} window")

    g = _gaussian_window(win_size, sigma)
    # Separable filter, one group per channel: a (C,1,k,1) then a (C,1,1,k) convolution.
    gh = g.view(1, 1, -1, 1).expand(C, 1, win_size, 1).contiguous()
    gw = g.view(1, 1, 1, -1).expand(C, 1, 1, win_size).contiguous()

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, gh, groups=C), gw, groups=C)

    # One batched pass over the five maps we need: x, y, x^2, y^2, xy.
    maps = blur(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.split(N, dim=0)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y

    C1, C2 = (K1 * L) ** 2, (K2 * L) ** 2
    s = ((2 * mu_x * mu_y + C1) * (2 * cov_xy + C2)) / (
        (mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2)
    )
    out = s.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels (as skimage)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------
# Distribution distances between feature sets
# ----------------------------------------------------------------------------------------


def _as_features(f, name: str) -> Tensor:
    """Any (N, D) array-like -> float64 CPU tensor, with a clear error otherwise."""
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(f)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a (N, D) tensor or numpy array, got {type(f).__name__}")
    if f.dim() != 2:
        raise ValueError(
            f"{name} must have shape (N, D) (one feature vector per image), got {tuple(f.shape)}; "
            "get features with minigen.judge.extract_features(judge, images)"
        )
    f = f.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def feature_statistics(feats) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of a feature set (N, D), float64.

    The covariance uses the unbiased 1/(N-1) normalisation, like ``np.cov`` and the
    reference FID code.
    """
    f = _as_features(feats, "feats")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    d = f - mu
    sigma = d.T @ d / (f.shape[0] - 1)
    return mu, sigma


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigh.

    Round-off can leave eigenvalues like -1e-17 on a singular covariance (more dims than
    samples, dead ReLU features); they are clamped to 0 rather than producing NaN.
    """
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats1, feats2) -> float:
    """Frechet distance between two Gaussians fitted to feature sets.

        FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix
    M = S1^(1/2) S2 S1^(1/2) (same eigenvalues), so tr((S1 S2)^(1/2)) = sum sqrt(eig(M)).
    Using eigh on M avoids the complex intermediate values and the ill-conditioning that
    a general ``scipy.linalg.sqrtm(S1 @ S2)`` runs into on near-singular covariances.

    Args:
        feats1, feats2: each either a feature set (N, D) (tensor or numpy array) or a
            ``(mu, sigma)`` pair as returned by `feature_statistics`.
    Returns:
        the distance as a Python float (>= 0; round-off below zero is clamped to 0).
        FD is biased upwards at small N, so compare numbers at the same sample size.
    """
    mu1, s1 = _stats(feats1, "feats1")
    mu2, s2 = _stats(feats2, "feats2")
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    r1 = _sqrtm_psd(s1)
    eig = torch.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = eig.clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def _stats(f, name: str) -> tuple[Tensor, Tensor]:
    if isinstance(f, (tuple, list)) and len(f) == 2:
        mu = torch.as_tensor(np.asarray(f[0]) if not isinstance(f[0], torch.Tensor) else f[0])
        sigma = torch.as_tensor(np.asarray(f[1]) if not isinstance(f[1], torch.Tensor) else f[1])
        mu, sigma = mu.detach().double().cpu(), sigma.detach().double().cpu()
        if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"{name}: a (mu, sigma) pair needs mu of shape (D,) and sigma (D, D), got "
                f"{tuple(mu.shape)} and {tuple(sigma.shape)}"
            )
        return mu, sigma
    return feature_statistics(_as_features(f, name))


def _polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid(
    feats1,
    feats2,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel.

    For each of ``num_subsets`` random subsets of ``m = subset_size`` vectors drawn
    without replacement from each set,

        MMD^2 = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1))
                - 2 sum_{i,j} k(x_i,y_j)/m^2,      k(x, y) = (x.y/d + 1)^3.

    The estimator is unbiased, so for two samples of one distribution it scatters around
    0 and can be negative; judge it against its std.

    Args:
        feats1, feats2: feature sets (N1, D), (N2, D).
        subset_size: m; reduced to min(N1, N2) when either set is smaller.
        num_subsets: how many subsets to average over.
        seed: for the subset draws (the result is deterministic given the inputs).
    Returns:
        (mean, std) of MMD^2 over the subsets (std with 1/num_subsets, population form).
    """
    x = _as_features(feats1, "feats1")
    y = _as_features(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"kid needs at least 2 vectors in each set, got {x.shape[0]} and {y.shape[0]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    gen = torch.Generator().manual_seed(seed)
    mmds = torch.empty(num_subsets, dtype=torch.float64)
    for s in range(num_subsets):
        xs = x[torch.randperm(x.shape[0], generator=gen)[:m]]
        ys = y[torch.randperm(y.shape[0], generator=gen)[:m]]
        kxx = _polynomial_kernel(xs, xs)
        kyy = _polynomial_kernel(ys, ys)
        kxy = _polynomial_kernel(xs, ys)
        mmds[s] = (
            (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(mmds.mean()), float(mmds.std(unbiased=False))


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)


def _knn_radii(f: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance from each vector to its k-th nearest neighbour within the set.

    The vector itself is at distance 0 and counts as the first "neighbour", so we take the
    (k+1)-th smallest distance, as the paper's reference code does.
    """
    out = torch.empty(f.shape[0], dtype=f.dtype)
    for i in range(0, f.shape[0], batch_size):
        d = _sq_dists(f[i : i + batch_size], f)
        out[i : i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return out


def _coverage(manifold: Tensor, radii: Tensor, queries: Tensor, batch_size: int) -> float:
    """Fraction of queries inside at least one ball B(manifold_i, radius_i)."""
    inside = 0
    for i in range(0, queries.shape[0], batch_size):
        d = _sq_dists(queries[i : i + batch_size], manifold)
        inside += int((d <= radii).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats, fake_feats, *, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its vectors, each ball reaching the
    vector's k-th nearest neighbour in the same set. Precision is the fraction of fake
    vectors inside the real manifold (are samples realistic?); recall is the fraction of
    real vectors inside the fake manifold (is the real variety covered?).

    Args:
        real_feats, fake_feats: feature sets (N1, D), (N2, D); each needs more than k rows.
        k: neighbourhood size (the paper uses 3).
        batch_size: rows per block of the distance matrix (memory ~ batch_size * N).
    Returns:
        (precision, recall), floats in [0, 1].
    """
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k vectors per set; got k={k}, sizes {real.shape[0]}, {fake.shape[0]}")
    r_real = _knn_radii(real, k, batch_size)
    r_fake = _knn_radii(fake, k, batch_size)
    precision = _coverage(real, r_real, fake, batch_size)
    recall = _coverage(fake, r_fake, real, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------------------
# Helpers shared by the model lessons
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def conditional_accuracy(judge, images: Tensor, labels: Tensor, *, batch_size: int = 500) -> float:
    """Fraction of class-conditional samples that the judge assigns to the requested class.

    Args:
        judge: a `minigen.judge.Judge` (anything with ``predict(images) -> labels``).
        images: generated images (N, C, H, W) in [-1, 1] at the judge's native size.
        labels: the class each image was generated for, (N,) int; for `shapes` this is
            the combined label shape*6 + colour.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    batches = range(0, images.shape[0], batch_size)
    pred = torch.cat([judge.predict(images[i : i + batch_size]) for i in batches])
    return float((pred.cpu() == labels.cpu().long()).double().mean())


class CodebookUsage(NamedTuple):
    perplexity: float  # exp(entropy) of the code histogram: the "effective number" of codes
    fraction_used: float  # codes used at least once / num_codes


def codebook_usage(indices: Tensor, num_codes: int) -> CodebookUsage:
    """How well a VQ codebook is used: perplexity exp(-sum p log p) and fraction of codes used.

    Perplexity is num_codes when every code is equally frequent and 1 when one code
    takes everything (codebook collapse).

    Args:
        indices: code indices of any shape, ints in [0, num_codes).
        num_codes: codebook size K.
    """
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"indices must be integer code ids, got dtype {idx.dtype}")
    if idx.numel() == 0:
        raise ValueError("indices is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= num_codes:
        raise ValueError(f"indices must lie in [0, {num_codes}), got [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx.cpu().long(), minlength=num_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()  # 0 log 0 = 0
    return CodebookUsage(float(entropy.exp()), float((counts > 0).double().mean()))


def bits_per_dim(nll_nats, num_dims: int):
    """Convert a negative log-likelihood in nats per image to bits per dimension.

    bits/dim = nll / (num_dims * ln 2), with num_dims = C*H*W. Works on floats and on
    tensors (e.g. per-image NLLs), returning the same kind.
    """
    if isinstance(num_dims, (tuple, list, torch.Size)):
        num_dims = math.prod(num_dims)
    if int(num_dims) <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return nll_nats / (int(num_dims) * math.log(2))
