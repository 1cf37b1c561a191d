"""Measuring trained models: reconstructions, samples, captions, time.

The formulas live in minigen.metrics (PSNR, SSIM, Fréchet distance, precision/recall, ...)
and the feature extractor in minigen.judge; this module applies them to models the same way
wherever a model is measured: the tour (minigen.tour), the shipped reference checkpoints
(minigen.reference, whose manifest records what `sample_metrics` returns), the benchmarks.

    x_hat = reconstruct(vqgan, x_test)                           # batched, clamped to [-1, 1]
    x, seconds = timed(lambda: sample_prior(gpt, vqgan, labels, top_k=32))
    m = sample_metrics(x, labels, x_test) | {"caption_accuracy": caption_accuracy(j, x, prompts)}

Every function here runs without gradients and returns images on the CPU as float32.
"""

from __future__ import annotations

import time

import torch

from minigen.builtin_data import shapes_label


# ----------------------------------------------------------------------------- running models


def in_batches(fn, n: int, batch_size: int) -> torch.Tensor:
    """torch.cat of ``fn(start, size)`` over consecutive batches covering 0..n-1."""
    return torch.cat([fn(i, min(batch_size, n - i)) for i in range(0, n, batch_size)])


@torch.no_grad()
def timed(fn) -> tuple[torch.Tensor, float]:
    """(the images ``fn()`` returns, clamped to [-1, 1], float32 on the CPU; wall seconds of fn)."""
    t0 = time.perf_counter()
    x = fn()
    return x.clamp(-1, 1).float().cpu(), time.perf_counter() - t0


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """``model.reconstruct(x)`` in eval mode, in batches, clamped to [-1, 1]."""
    model.eval()
    return torch.cat([model.reconstruct(xb) for xb in x.split(batch_size)]).clamp(-1, 1)


@torch.no_grad()
def sample_prior(prior, autoencoder, labels: torch.Tensor, *, temperature=1.0, top_k=None,
                 guidance_scale=None, generator=None, batch_size=250) -> torch.Tensor:
    """Class-conditional images from a GPT prior over an autoencoder's code maps: the prior
    generates each label's codes, the autoencoder decodes them (clamped to [-1, 1])."""
    s = autoencoder.config.latent_size
    out = []
    for yb in labels.split(batch_size):
        codes = prior.generate(yb, temperature=temperature, top_k=top_k, guidance_scale=guidance_scale,
                               generator=generator)
        out.append(autoencoder.decode_indices(codes[:, -s * s:].reshape(len(yb), s, s)).clamp(-1, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def reconstruction_metrics(model, x: torch.Tensor, *, dataset: str | None = None) -> tuple[dict, torch.Tensor]:
    """-> ({"psnr_db", "ssim"[, "fd"]}, reconstructions): mean PSNR and SSIM of
    model.reconstruct(x) against x and, with a judge's `dataset`, the Fréchet distance of the
    reconstructions to x itself in that judge's feature space (rFD)."""
    from minigen import judge, metrics

    x_hat = reconstruct(model, x)
    out = {"psnr_db": float(metrics.psnr(x_hat, x).mean()), "ssim": float(metrics.ssim(x_hat, x).mean())}
    if dataset is not None:
        out["fd"] = judge.fd_score(dataset, x_hat, x)
    return out, x_hat


@torch.no_grad()
def sample_metrics(images: torch.Tensor, labels: torch.Tensor | None, x_real: torch.Tensor,
                   seconds_per_image: float | None = None, *, dataset: str = "shapes") -> dict:
    """The reference checkpoints' sample metrics (their manifest's keys):

    fd_shapes: Fréchet distance to the first n real (test) images in the judge's feature
    space; fd_real_vs_real: the same between n training and n test images (FD is biased
    upwards at small n, this is its floor at this n); precision/recall (improved, k=3) against
    the real images' features; class_accuracy: the judge's accuracy on the requested classes
    (when `labels` are given); sample_seconds_per_image when given.
    """
    from minigen import data, judge, metrics

    n = len(images)
    j = judge.load_judge(dataset)
    f_fake = judge.extract_features(j, images)
    f_real = judge.extract_features(j, x_real[:n])
    precision, recall = metrics.precision_recall(f_real, f_fake, k=3)
    real_train, _ = data.load_dataset(dataset, split="train", n=n).tensors()
    out = {"n_samples": n,
           "fd_shapes": metrics.frechet_distance(f_fake, f_real),
           "fd_real_vs_real": judge.fd_score(dataset, real_train, x_real[:n]),
           "precision": precision, "recall": recall}
    if labels is not None:
        out["class_accuracy"] = metrics.conditional_accuracy(j, images, labels)
    if seconds_per_image is not None:
        out["sample_seconds_per_image"] = seconds_per_image
    return out


def caption_accuracy(judge, images: torch.Tensor, captions: list[str]) -> float:
    """Fraction of images whose judged class (shape AND colour) matches their caption's.

    judge: minigen.judge.load_judge("shapes"); images (N, 3, 32, 32) in [-1, 1]; one caption
    per image. Size and background are not judged (the judge has no head for them).
    """
    from minigen.metrics import conditional_accuracy

    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) != len(images):
        raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
    labels = torch.tensor([shapes_label(c) for c in captions], dtype=torch.long)
    return conditional_accuracy(judge, images, labels)


__all__ = ["in_batches", "timed", "reconstruct", "sample_prior", "reconstruction_metrics", "sample_metrics",
           "caption_accuracy"]
