"""Checks for lesson 02 (VQ-VAE): nearest-code lookup, straight-through estimator and the two
VQ losses, the EMA codebook update, and codebook perplexity.

Every reference here is written independently of minigen.vq (brute-force float64 distances,
analytic gradients, a loop-free float64 EMA) so that a check never grades the learner against
the package it is teaching.
"""

from __future__ import annotations

import math

import torch

from minigen.course.checks._framework import CheckFailed, Exercise, _fmt_shape, checker, show_hint

# ---------------------------------------------------------------------------- helpers


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


def _codebook(g, K, D, *, spread=True):
    e = torch.randn(K, D, generator=g)
    if spread:  # codes of different lengths: dropping ||e||^2 then really changes the argmin
        e = e * (0.3 + 1.7 * torch.rand(K, 1, generator=g))
    return e


# ---------------------------------------------------------------------------- 2.1
def _quantize_case_ok(ex, out, z, e, case):
    """Shape/dtype of the indices, then: every chosen code is (one of) the nearest."""
    M, K = z.shape[0], e.shape[0]
    if isinstance(out, torch.Tensor):
        if tuple(out.shape) == (M, 1):
            ex.fail(f"the indices have shape {_fmt_shape(out.shape)}, expected ({M},){case}",
                    mistake="argmin(..., keepdim=True) keeps a column; drop keepdim (or .squeeze(1))")
        if tuple(out.shape) == (K,) and K != M:
            ex.fail(f"the indices have shape {_fmt_shape(out.shape)}, expected ({M},){case}",
                    mistake="you took the argmin over the vectors (dim 0); take it over the codes: "
                            "distances are (M, K), argmin(dim=1)")
        if tuple(out.shape) == (M, e.shape[1]):
            ex.fail(f"the output has shape {_fmt_shape(out.shape)}, expected ({M},){case}",
                    mistake="return the *indices* of the nearest codes (integers), not the code vectors")
        if tuple(out.shape) == () or out.numel() == 1 and M > 1:
            ex.fail(f"the output has shape {_fmt_shape(out.shape)}, expected ({M},){case}",
                    mistake="argmin without dim= flattens the whole (M, K) matrix; use argmin(dim=1)")
    out = ex.tensor(out, shape=(M,), what="the indices" + case)
    if out.dtype != torch.int64:
        ex.fail(f"the indices have dtype {out.dtype}, expected torch.int64{case}",
                mistake="argmin already returns int64; don't convert the indices (they feed nn.Embedding "
                        "and torch.bincount)")
    out = out.cpu()
    if int(out.min()) < 0 or int(out.max()) >= K:
        ex.fail(f"the indices must lie in [0, {K}), got [{int(out.min())}, {int(out.max())}]{case}")
    zd, ed = z.detach().double().cpu(), e.detach().double().cpu()
    d = ((zd[:, None, :] - ed[None, :, :]) ** 2).sum(-1)          # brute force, float64
    best = d.min(1).values
    scale = (zd ** 2).sum(1).max() + (ed ** 2).sum(1).max()
    tol = 2e-5 * float(scale)                                      # float32 rounding of the expansion
    chosen = d.gather(1, out[:, None]).squeeze(1)
    bad = chosen > best + tol
    return out, d, bad


@checker
def quantize(fn) -> None:
    """Exercise 2.1: (M, D) vectors, (K, D) codebook -> (M,) int64 index of the nearest code."""
    ex = Exercise("2.1", "quantize")
    g = torch.Generator().manual_seed(21)

    # -- plain float32 inputs of several sizes; some vectors are exact copies of codes
    for M, K, D in [(200, 48, 8), (64, 7, 3), (33, 130, 16), (10, 5, 1), (6, 1, 4)]:
        e = _codebook(g, K, D)
        z = torch.randn(M, D, generator=g) * 1.2
        copies = torch.randint(0, K, (min(3, M),), generator=g)
        z[: len(copies)] = e[copies]  # after dead-code replacement codes are copies of encoder outputs
        z_in, e_in = z.clone(), e.clone()
        case = f" (M={M}, K={K}, D={D}, float32)"
        out = ex.call(fn, z_in, e_in)
        if not (torch.equal(z_in, z) and torch.equal(e_in, e)):
            ex.fail("your function changed its inputs in place")
        out, d, bad = _quantize_case_ok(ex, out, z, e, case)
        if bad.any():
            zd, ed = z.double(), e.double()
            dot = zd @ ed.t()
            ee = (ed ** 2).sum(1)
            wrong = [
                (d.argmax(1), "argmax picks the *farthest* code; the nearest code has the smallest distance: argmin"),
                ((-2 * dot).argmin(1), "you dropped the ||e||^2 term: the largest dot product is the nearest code only "
                                       "when all codes have the same length. (Dropping ||z||^2 is fine: it is the "
                                       "same for every code of a row.)"),
                ((ee - dot).argmin(1), "the cross term is -2 z.e^T: without the factor 2 the argmin changes "
                                       "(||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e)"),
                ((ee + 2 * dot).argmin(1), "the cross term has a minus sign: ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e "
                                           "(with + you find the code nearest to -z)"),
                (dot.argmin(1), "the smallest dot product is not the nearest code; compute the squared distance "
                                "||z||^2 + ||e||^2 - 2 z.e^T and take its argmin"),
            ]
            if K > 1:
                for ref, explanation in wrong:
                    if _agreement(out, ref) >= 0.9:
                        ex.fail(f"{int(bad.sum())} of {M} vectors did not get their nearest code{case}",
                                mistake=explanation)
            m = int(bad.nonzero()[0, 0])
            ex.fail(f"{int(bad.sum())} of {M} vectors did not get their nearest code{case}; e.g. row {m}: "
                    f"you chose code {int(out[m])} at squared distance {float(d[m, out[m]]):.5g}, the nearest "
                    f"is code {int(d[m].argmin())} at {float(d[m].min()):.5g}")

    # -- close codes far from the origin: float32 is enough, bfloat16 is not
    D, K, M = 16, 64, 256
    centre = 2.0 + torch.rand(D, generator=g)
    e = centre + 0.05 * torch.randn(K, D, generator=g)
    z = centre + 0.05 * torch.randn(M, D, generator=g)
    dtype_hint = ("compute the distances in float32: cast the inputs with .float() first. In bfloat16 "
                  "(or float16) the rounding of ||z||^2 + ||e||^2 - 2 z.e^T (about 0.5 here) is larger "
                  "than the gaps between neighbouring codes (about 0.01), so the argmin is noise")
    zb, eb = z.bfloat16(), e.bfloat16()
    case = f" (M={M}, K={K}, D={D}, bfloat16 inputs of close codes far from the origin)"
    out = ex.call(fn, zb, eb)
    out, d, bad = _quantize_case_ok(ex, out, zb, eb, case)
    if bad.any():
        ex.fail(f"{int(bad.sum())} of {M} vectors did not get their nearest code{case}", mistake=dtype_hint)

    case = f" (M={M}, K={K}, D={D}, float32 inputs under torch.autocast(bfloat16), as in mixed-precision training)"
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ex.call(fn, z, e)
    out, d, bad = _quantize_case_ok(ex, out, z, e, case)
    if bad.any():
        ex.fail(f"{int(bad.sum())} of {M} vectors did not get their nearest code{case}",
                mistake="autocast recasts matrix products (@, mm, addmm) to bfloat16 even when the inputs are "
                        "float32. Compute the distances inside "
                        "`with torch.autocast(device_type=z_flat.device.type, enabled=False):` after .float()")
    ex.passed("nearest codes, shapes, int64, float32 distances under bf16 and autocast")


# ---------------------------------------------------------------------------- 2.2
def _grads(out, inputs):
    """Gradients of a scalar `out` w.r.t. each input (None where it does not reach)."""
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(out, inputs, retain_graph=True, allow_unused=True))


def _coef(grad, direction):
    """grad = c * direction (float64 least squares); returns (c, relative residual). None -> (0, 0)."""
    if grad is None:
        return 0.0, 0.0
    gd, dd = grad.detach().double(), direction.double()
    c = float((gd * dd).sum() / (dd * dd).sum())
    res = float((gd - c * dd).norm() / (gd.norm() + 1e-300))
    return c, res


def _straight_through(ex, fn):
    g = torch.Generator().manual_seed(22)
    for shape in [(4, 8, 5, 5), (2, 3, 1, 7)]:
        z = torch.randn(shape, generator=g).requires_grad_()
        z_q = torch.randn(shape, generator=g).requires_grad_()  # stands for codebook vectors
        out = ex.call(fn, z, z_q)
        out = ex.tensor(out, shape=shape, dtype=torch.float32, what="straight_through's output")
        ex.close(out, z_q.detach().double(), atol=1e-5, what="straight_through's output (forward value)", mistakes=[
            (z.detach(), "the forward value must be the quantised z_q (the decoder sees codebook vectors); "
                         "you returned z's value, e.g. z_q + (z - z_q).detach()"),
        ])
        if not out.requires_grad:
            ex.fail("straight_through's output has no gradient (requires_grad is False)",
                    mistake="z_q.detach() (or the whole expression detached) cuts the graph; the encoder needs "
                            "the decoder's gradient: z + (z_q - z).detach()")
        w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        dz, dzq = torch.autograd.grad((out * w).sum(), [z, z_q], allow_unused=True)
        if dzq is not None and torch.any(dzq != 0):
            ex.fail("gradient reaches z_q through straight_through's output",
                    mistake="without .detach() on (z_q - z) the decoder's gradient also flows into the codebook; "
                            "the codes learn only from the codebook loss (or EMA): z + (z_q - z).detach()")
        if dz is None or not torch.any(dz != 0):
            ex.fail("no gradient reaches z through straight_through's output",
                    mistake="returning z_q (or z_q.detach()) gives the encoder no gradient; copy the gradient "
                            "onto z: z + (z_q - z).detach()")
        if not torch.allclose(dz, w, atol=1e-6):
            ex.fail(f"the gradient reaching z should equal the gradient at the output (identity); max error "
                    f"{float((dz - w).abs().max()):.3g}",
                    mistake="the straight-through estimator passes dL/dz_q to z unchanged: z + (z_q - z).detach()")


def _vq_losses(ex, fn):
    g = torch.Generator().manual_seed(23)
    # beta by default (0.25), by keyword and by position; image-shaped and flat (M, D) latents
    for shape, beta, style in [((4, 6, 3, 3), 0.25, "default"), ((2, 5, 4, 2), 0.6, "keyword"),
                               ((7, 3), 1.3, "positional")]:
        z = torch.randn(shape, generator=g).requires_grad_()
        z_q = torch.randn(shape, generator=g).requires_grad_()
        if style == "default":
            out = ex.call(fn, z, z_q)
        elif style == "keyword":
            out = ex.call(fn, z, z_q, beta=beta)
        else:
            out = ex.call(fn, z, z_q, beta)
        case = f" (beta={beta})"
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            got = f"a {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            ex.fail(f"vq_losses must return three values (loss, codebook_loss, commitment_loss), got {got}")
        names = ("loss", "codebook_loss", "commitment_loss")
        for name, value in zip(names, out):
            if isinstance(value, torch.Tensor) and value.dim() != 0:
                ex.fail(f"{name} has shape {_fmt_shape(value.shape)}; each loss is a single number (shape ())",
                        mistake="average over every element: F.mse_loss(a, b) or ((a - b) ** 2).mean()")
            ex.tensor(value, shape=(), dtype=torch.float32, what=name + case)
        loss, cb, cm = out
        diff = (z.detach().double() - z_q.detach().double())
        n = diff.numel()
        m = (diff ** 2).mean()
        sum_hint = "you summed; take the mean over every element (F.mse_loss), the convention of the package"
        for name, value, expected in [("codebook_loss", cb, m), ("commitment_loss", cm, m)]:
            ex.close(value, expected, atol=1e-6, rtol=1e-5, what=name + case, mistakes=[
                ((diff ** 2).sum(), sum_hint),
                (beta * m, f"return {name} unweighted; beta only multiplies the commitment term inside `loss`"),
                ((diff ** 2).sum() / shape[0], "you summed over each image and averaged over the batch; average "
                                               "over every element"),
                (diff.abs().mean(), "that is an L1 distance; both terms are squared errors"),
            ])
        ex.close(loss, (1 + beta) * m, atol=1e-6, rtol=1e-5, what="loss" + case, mistakes=[
            (2 * m, "beta is missing: loss = codebook_loss + beta * commitment_loss"),
            ((diff ** 2).sum() * (1 + beta), sum_hint),
            (m, "loss is the sum of the two terms: codebook_loss + beta * commitment_loss"),
            (beta * m, "loss is codebook_loss + beta * commitment_loss (you returned only the weighted commitment)"),
            (1.25 * m, f"beta={beta} was ignored (your loss used 0.25): weigh the commitment term by the beta "
                       "argument, whose default is 0.25"),
        ])

        # Values alone cannot tell the terms apart (both equal mean (z - z_q)^2): the gradients can.
        up_codes = 2 * (z_q.detach() - z.detach()) / n   # d/dz_q of mean (z_q - z)^2
        up_enc = -up_codes                                # d/dz   of mean (z - z_q)^2
        for name, value in [("codebook_loss", cb), ("commitment_loss", cm)]:
            if not value.requires_grad:
                ex.fail(f"{name} has no gradient (requires_grad is False)",
                        mistake="stop the gradient of one side only: codebook_loss = mse(z_q, z.detach()), "
                                "commitment_loss = mse(z, z_q.detach())")
        gz_cb, gq_cb = _grads(cb, [z, z_q])
        gz_cm, gq_cm = _grads(cm, [z, z_q])
        a_cb, _ = _coef(gq_cb, up_codes)
        b_cb, _ = _coef(gz_cb, up_enc)
        a_cm, _ = _coef(gq_cm, up_codes)
        b_cm, _ = _coef(gz_cm, up_enc)
        if abs(b_cb) > 1e-3 and abs(a_cb) < 1e-3 and abs(a_cm) > 1e-3 and abs(b_cm) < 1e-3:
            ex.fail("codebook_loss sends gradient only to z and commitment_loss only to z_q" + case,
                    mistake="the two terms are swapped (in the return order or in the stop-gradients): "
                            "codebook_loss = ||sg[z] - z_q||^2 moves the codes, commitment_loss = "
                            "||z - sg[z_q]||^2 moves the encoder; return (loss, codebook_loss, commitment_loss)")
        if abs(b_cb) > 1e-3:
            ex.fail("codebook_loss sends gradient to z (the encoder output)" + case,
                    mistake="stop the gradient on z in the codebook term: mse(z_q, z.detach()) (sg[z] in the paper)")
        if abs(a_cb - 1) > 1e-3:
            ex.fail("codebook_loss must send gradient to z_q (the codebook vectors)" + case,
                    mistake="the codebook term is ||sg[z] - z_q||^2: detach z, not z_q")
        if abs(a_cm) > 1e-3:
            ex.fail("commitment_loss sends gradient to z_q (the codebook)" + case,
                    mistake="stop the gradient on z_q in the commitment term: mse(z, z_q.detach()) (sg[e] in the paper)")
        if abs(b_cm - 1) > 1e-3:
            ex.fail("commitment_loss must send gradient to z (the encoder output)" + case,
                    mistake="the commitment term is ||z - sg[z_q]||^2: detach z_q, not z")

        gz, gq = _grads(loss, [z, z_q])
        a, ra = _coef(gq, up_codes)
        b, rb = _coef(gz, up_enc)
        if max(ra, rb) < 1e-4 and abs(a - 1) < 1e-4 and abs(b - beta) < 1e-4:
            continue
        msg = (f"the gradients of `loss` are off: the codebook gets {a:.3g}x and the encoder {b:.3g}x the gradient "
               f"of mean (z - z_q)^2; expected 1x and beta = {beta}x" + case)
        if abs(a - beta) < 1e-4 and abs(b - 1) < 1e-4:
            ex.fail(msg, mistake="beta is on the codebook term. That is the order of taming-transformers' "
                                 "VectorQuantizer with legacy=True (and diffusers' VQModel); this course follows "
                                 "the VQ-VAE paper: loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2")
        if abs(a - 1 - beta) < 1e-4 and abs(b - 1 - beta) < 1e-4:
            ex.fail(msg, mistake="`loss` has no stop-gradients: both terms push both sides. Build it from the two "
                                 "detached terms: codebook_loss + beta * commitment_loss")
        ex.fail(msg, mistake="loss = codebook_loss + beta * commitment_loss, built from the two terms with their "
                             "stop-gradients")


@checker
def straight_through_and_losses(straight_through, vq_losses) -> None:
    """Exercise 2.2: z + sg[z_q - z], and (loss, codebook_loss, commitment_loss) with the paper's beta placement."""
    ex = Exercise("2.2", "straight_through_and_losses")
    _straight_through(ex, straight_through)
    _vq_losses(ex, vq_losses)
    ex.passed("forward values, straight-through gradients, both losses and their stop-gradients, beta placement")


# ---------------------------------------------------------------------------- 2.3
def _ema_reference(N, m, z, idx, decay, eps, *, flip=False, smooth="laplace", n_from="ema", means=False):
    """float64 EMA codebook step; keyword arguments produce the known wrong variants."""
    K = N.shape[0]
    N, m, z = N.double(), m.double(), z.double()
    onehot = torch.zeros(idx.shape[0], K, dtype=torch.float64)
    onehot[torch.arange(idx.shape[0]), idx] = 1.0
    counts = onehot.sum(0)
    sums = onehot.t() @ z
    if means:
        sums = sums / counts.clamp_min(1)[:, None]
    keep, new = (1 - decay, decay) if flip else (decay, 1 - decay)
    N = keep * N + new * counts
    m = keep * m + new * sums
    n = N.sum() if n_from == "ema" else counts.sum()
    if smooth == "laplace":
        Ns = (N + eps) / (n + K * eps) * n
    elif smooth == "plus_eps":
        Ns = N + eps
    else:
        Ns = N
    return N, m, m / Ns[:, None]


@checker
def ema_update(fn) -> None:
    """Exercise 2.3: EMA of code counts and sums, Laplace-smoothed counts, codebook = sums / counts."""
    ex = Exercise("2.3", "ema_update")
    g = torch.Generator().manual_seed(24)
    # unused codes at the end, at the start and scattered (random); decay and eps by position,
    # by keyword and by default (0.99, 1e-5)
    for K, D, M, decay, eps, zero_code, unused, style in [
            (10, 3, 40, 0.8, 0.3, False, "last", "positional"), (12, 4, 64, 0.99, 1e-5, True, "first", "default"),
            (6, 2, 30, 0.5, 0.05, False, "random", "keyword"), (9, 5, 50, 0.9, 0.01, True, "random", "positional")]:
        N = 0.2 + 3 * torch.rand(K, generator=g)
        m = torch.randn(K, D, generator=g) * N[:, None]
        z = torch.randn(M, D, generator=g)
        order = {"last": torch.arange(K), "first": torch.arange(K).flip(0),
                 "random": torch.randperm(K, generator=g)}[unused]
        used = order[:K - 2]                                    # two codes get no vectors this batch
        idx = used[torch.randint(0, K - 2, (M,), generator=g)]
        idx[:4] = used[0]                                       # one code gets several
        idx[4] = used.max()                                     # the largest used index appears
        if zero_code:                                           # a code never used since the start: N = 0
            N[order[-1]], m[order[-1]] = 0.0, 0.0
        args = [N.clone(), m.clone(), z.clone(), idx.clone()]
        case = f" (K={K}, D={D}, M={M}, decay={decay}, eps={eps}, unused codes {sorted(order[K - 2:].tolist())})"
        try:
            if style == "default":
                decay, eps = 0.99, 1e-5
                case = f" (K={K}, D={D}, M={M}, default decay and eps, unused codes {sorted(order[K - 2:].tolist())})"
                out = ex.call(fn, *args)
            elif style == "keyword":
                out = ex.call(fn, *args, decay=decay, eps=eps)
            else:
                out = ex.call(fn, *args, decay, eps)
        except CheckFailed as e:
            if "must match the size" in str(e) and int(idx.max()) < K - 1:
                ex.fail(f"your function raised an error when the last codes are unused{case}",
                        mistake="torch.bincount(indices) stops at the largest index present; count every "
                                "code: torch.bincount(indices, minlength=K)")
            raise
        if any(not torch.equal(a, b) for a, b in zip(args, [N, m, z, idx])):
            ex.fail("your function changed its inputs in place; it must be pure (return new tensors), e.g. "
                    "cluster_size = decay * cluster_size + ..., not cluster_size.mul_(decay)")
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            ex.fail("ema_update must return three tensors (cluster_size, embed_sum, codebook)")
        N_out = ex.tensor(out[0], shape=(K,), dtype=torch.float32, what="cluster_size" + case)
        m_out = ex.tensor(out[1], shape=(K, D), dtype=torch.float32, what="embed_sum" + case)
        e_out = ex.tensor(out[2], shape=(K, D), dtype=torch.float32, what="codebook" + case)
        rN, rm, re = _ema_reference(N, m, z, idx, decay, eps)
        flipped = _ema_reference(N, m, z, idx, decay, eps, flip=True)
        flip_hint = ("decay weighs the *old* statistics: N <- decay * N + (1 - decay) * n_i; you swapped decay "
                     "and 1 - decay, so the codebook forgets its history at once")
        ex.close(N_out, rN, atol=1e-5, rtol=1e-5, what="cluster_size" + case, mistakes=[
            (flipped[0], flip_hint),
            (N, "cluster_size did not change: add (1 - decay) times this batch's counts (torch.bincount(indices, "
                "minlength=K))"),
            (_ema_reference(N, m, z, idx, 0.0, eps)[0], "cluster_size must be an EMA: decay * cluster_size + "
                                                        "(1 - decay) * counts, not just this batch's counts"),
        ])
        # embed_sum: code by code, so a loop-free duplicate bug (sums[idx] += z) is recognisable
        # (the means variant is also wrong only for codes chosen several times: test it first)
        means = _ema_reference(N, m, z, idx, decay, eps, means=True)[1]
        if torch.allclose(m_out.double(), means, atol=1e-5, rtol=1e-5):
            ex.fail("embed_sum is wrong for the codes chosen by several vectors" + case,
                    mistake="embed_sum accumulates the *sum* of the vectors assigned to each code, not their mean "
                            "(the division by the count happens once, in the codebook)")
        counts = torch.bincount(idx, minlength=K)
        bad = ((m_out.double() - rm).abs() > 1e-5 + 1e-5 * rm.abs()).any(1)
        if bad.any() and not bad[counts <= 1].any():
            ex.fail("embed_sum is wrong exactly for the codes chosen by several vectors" + case,
                    mistake="`sums[indices] += z_flat` (or index_put_ without accumulate) keeps one vector per code; "
                            "accumulate every vector: torch.zeros(K, D).index_add_(0, indices, z_flat) or "
                            "F.one_hot(indices, K).T.float() @ z_flat")
        ex.close(m_out, rm, atol=1e-5, rtol=1e-5, what="embed_sum" + case, mistakes=[
            (flipped[1], flip_hint),
        ])
        if not torch.isfinite(e_out).all():
            ex.fail("the codebook contains NaN/inf" + case,
                    mistake="a code with cluster_size 0 gives 0/0 without Laplace smoothing; divide by the smoothed "
                            "counts (N_i + eps) / (n + K * eps) * n with n = cluster_size.sum()")
        ex.close(e_out, re, atol=1e-5, rtol=1e-4, what="codebook" + case, mistakes=[
            (flipped[2], flip_hint),
            (_ema_reference(N, m, z, idx, decay, eps, smooth="none")[2],
             "no Laplace smoothing: divide embed_sum by the smoothed counts (N_i + eps) / (n + K * eps) * n, "
             "n = cluster_size.sum(), so a code that is never chosen keeps a finite vector"),
            (_ema_reference(N, m, z, idx, decay, eps, smooth="plus_eps")[2],
             "N_i + eps alone is not the paper's smoothing; rescale so the smoothed counts still sum to n: "
             "(N_i + eps) / (n + K * eps) * n"),
            (_ema_reference(N, m, z, idx, decay, eps, n_from="batch")[2],
             "n is the sum of the EMA cluster sizes (cluster_size.sum() after the update), not the number of "
             "vectors in this batch"),
            (_ema_reference(N, m, z, idx, 0.0, eps)[2],
             "the codebook must come from the EMA statistics (embed_sum / smoothed cluster_size), not from "
             "this batch alone"),
        ])
    ex.passed("EMA counts and sums, Laplace smoothing, codebook, shapes, pure function")


# ---------------------------------------------------------------------------- 2.4
@checker
def perplexity(fn) -> None:
    """Exercise 2.4: exp(entropy) of the code histogram (natural log, 0 log 0 = 0), a scalar tensor."""
    ex = Exercise("2.4", "perplexity")
    g = torch.Generator().manual_seed(25)
    skew = torch.tensor([8.0, 4, 2, 1, 1, 0.5, 0.25, 0.25])
    cases = [
        ("uniform over every code", torch.arange(16).repeat(5).view(5, 4, 4), 16),
        ("one code only (collapse)", torch.full((3, 4, 4), 7), 32),
        ("skewed, most codes unused", torch.multinomial(skew, 2 * 6 * 6, replacement=True, generator=g)
         .view(2, 6, 6) * 3, 64),
        ("random", torch.randint(0, 50, (4, 8, 8), generator=g), 50),
        ("flat indices", torch.randint(0, 5, (300,), generator=g) ** 2, 25),
        ("the first codes unused", torch.randint(20, 40, (3, 5, 5), generator=g), 40),
        ("unused codes at both ends and between",
         torch.randperm(30, generator=g)[:9][torch.randint(0, 9, (2, 7, 7), generator=g)] + 5, 48),
    ]
    for what, idx, K in cases:
        case = f" ({what}, indices {_fmt_shape(idx.shape)}, num_codes={K})"
        before = idx.clone()
        out = ex.call(fn, idx, K)
        if not torch.equal(idx, before):
            ex.fail("your function changed the indices in place")
        if isinstance(out, (float, int)):
            ex.fail(f"perplexity returned a Python {type(out).__name__}; return a tensor (shape ())" + case,
                    mistake="don't call .item(): keep it a tensor, e.g. torch.exp(entropy)")
        if isinstance(out, torch.Tensor) and out.dim() != 0:
            ex.fail(f"the perplexity has shape {_fmt_shape(out.shape)}; it is one number for all the indices"
                    + case, mistake="count over every index (flatten first): torch.bincount(indices.flatten(), "
                                    "minlength=num_codes), then one entropy")
        out = ex.tensor(out, shape=(), what="the perplexity" + case)
        if not out.is_floating_point():
            ex.fail(f"the perplexity has dtype {out.dtype}; expected a floating-point tensor" + case,
                    mistake="convert the counts to float before dividing")
        counts = torch.bincount(idx.flatten(), minlength=K).double()
        p = counts / counts.sum()
        H = -(p[p > 0] * p[p > 0].log()).sum()
        ref = H.exp()
        if not torch.isfinite(out):
            ex.fail(f"the perplexity is {float(out)}" + case,
                    mistake="unused codes have p = 0 and 0 * log 0 evaluates to NaN in floating point; use "
                            "torch.special.xlogy(p, p) (which defines 0 log 0 = 0) or keep only p > 0")
        c = counts[counts > 0]
        pK = counts / K
        ex.close(out, ref, atol=1e-5, rtol=1e-4, what="the perplexity" + case, mistakes=[
            (H, "that is the entropy; the perplexity is exp(entropy), the effective number of codes in use"),
            (H / math.log(2), "that is the entropy in bits; the perplexity is 2 ** (entropy in bits) = "
                              "exp(entropy in nats)"),
            (torch.exp(H / math.log(2)), "you mixed bases: entropy with log2 but exp() to undo it. The perplexity "
                                         "is the same in any base only if the exponential matches the log: "
                                         "exp with ln, or 2 ** with log2"),
            (torch.exp(-(c * c.log()).sum()), "normalise the counts to probabilities p = counts / counts.sum() "
                                              "before the entropy"),
            (torch.exp(-(pK[pK > 0] * pK[pK > 0].log()).sum()),
             "p = counts / (number of indices), not counts / num_codes: the probabilities must sum to 1"),
            (torch.tensor(float((counts > 0).sum())), "that is the number of codes used; the perplexity weighs "
                                                       "them by how often they are used: exp(-sum p log p)"),
        ])
    ex.passed("values (uniform, collapsed, skewed), unused codes, scalar shape")


__all__ = ["hint", "CheckFailed", "quantize", "straight_through_and_losses", "ema_update", "perplexity", "quantize_hidden", "perplexity_hidden"]


# ---------------------------------------------------------------------------- hidden tests
@checker
def quantize_hidden(fn) -> None:
    """Hidden test of 2.1: one vector, one code, and vectors that are exact copies of codes."""
    ex = Exercise("2.1", "quantize", hidden=True)
    g = torch.Generator().manual_seed(210)
    e = _codebook(g, 9, 5)
    out = ex.tensor(ex.call(fn, e.clone(), e.clone()), shape=(9,), dtype=torch.int64,
                    what="the indices of the codes themselves")
    if not torch.equal(out, torch.arange(9)):
        ex.fail(f"each code is its own nearest code, but you returned {out.tolist()} for the codes 0..8")
    out = ex.tensor(ex.call(fn, torch.randn(1, 5, generator=g), e[:1].clone()), shape=(1,), dtype=torch.int64,
                    what="the index for a one-code codebook")
    if int(out) != 0:
        ex.fail(f"with a single code the index must be 0, got {int(out)}")


@checker
def perplexity_hidden(fn) -> None:
    """Hidden test of 2.4: exactly 1 for one index, exactly K for a uniform histogram, int32 indices."""
    ex = Exercise("2.4", "perplexity", hidden=True)
    one = ex.tensor(ex.call(fn, torch.tensor([3]), 8), shape=(), what="the perplexity of a single index")
    ex.close(one, torch.tensor(1.0), atol=1e-5, what="the perplexity of a single index")
    uniform = torch.arange(12, dtype=torch.int32).repeat(3)
    out = ex.tensor(ex.call(fn, uniform, 12), shape=(), what="the perplexity of int32 indices")
    ex.close(out, torch.tensor(12.0), atol=1e-4, what="the perplexity of a uniform histogram over 12 codes")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '2.1': (
        'For every vector, find the code with the smallest squared Euclidean distance. Expanding '
        '||z - e||^2 avoids building an (M, K, D) tensor.',
        'Compute all M x K squared distances: the squared norm of each vector (a column), plus '
        'the squared norm of each code (a row), minus twice the matrix product of the vectors '
        'with the transposed codebook. Do it in float32 with autocast off. Take the index of the '
        'minimum along the codes.',
    ),
    '2.2': (
        'Straight-through: the forward pass uses the quantised value, the backward pass pretends '
        'quantisation was the identity. The two losses move the codebook towards the encoder and '
        'the encoder towards the codebook; stop-gradient decides which side moves.',
        'Straight-through: z plus the detached difference (z_q - z). Codebook loss: mean squared '
        'error between z_q and a detached z. Commitment loss: mean squared error between z and a '
        'detached z_q. The total is codebook loss plus beta times commitment loss; return all '
        'three.',
    ),
    '2.3': (
        'Instead of gradients, each code follows a moving average of the vectors assigned to it: '
        'one average of the counts, one of the sums. The code is sum / count, with the counts '
        'smoothed so an unused code never divides by zero.',
        'Count the vectors per code (every code, even unused ones) and sum the vectors per code. '
        "New counts: decay times the old counts plus (1 - decay) times this batch's counts; the "
        'same for the sums. With n the total of the new counts, the smoothed count of code i is '
        '(count_i + eps) / (n + K eps) times n. The codebook is the sums divided by the smoothed '
        'counts. Return new tensors; do not change the inputs in place.',
    ),
    '2.4': (
        'Perplexity is the exponential of the entropy of how often each code is used: the number '
        'of codes you would need if they were all used equally often.',
        'Histogram the indices over all num_codes codes, divide by the number of indices to get '
        'probabilities, compute the entropy with natural logs treating 0 log 0 as 0, and '
        'exponentiate. Return a 0-dim float tensor.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
