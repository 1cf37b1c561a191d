"""Every lesson-02 check: correct answers (several formulations) pass, the stub fails naming the
exercise, and typical wrong answers fail with the helpful "Likely mistake" message."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from minigen.course.checks import CheckFailed
from minigen.course.checks import l02 as check

from _check_helpers import stub


def fails(check_fn, *answers_and_fragments):
    *answers, fragments = answers_and_fragments
    with pytest.raises(CheckFailed) as info:
        check_fn(*answers)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"expected {f!r} in the message:\n{msg}"
    return msg


# ---------------------------------------------------------------------------- 2.1 quantize
def good_quantize(z_flat, codebook):
    with torch.autocast(device_type=z_flat.device.type, enabled=False):
        z, e = z_flat.float(), codebook.float()
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)


def expansion(z_flat, codebook, *, zz=1.0, ee=1.0, two=2.0, argmax=False, dtype=torch.float32, autocast_off=True):
    """The expansion with switchable terms, to produce the typical wrong answers."""
    ctx = torch.autocast(device_type=z_flat.device.type, enabled=False) if autocast_off else contextlib.nullcontext()
    with ctx:
        z, e = z_flat.to(dtype), codebook.to(dtype)
        d = zz * z.pow(2).sum(1, keepdim=True) + ee * e.pow(2).sum(1) - two * (z @ e.t())
        return d.argmax(1) if argmax else d.argmin(1)


def test_quantize_correct(capsys):
    check.quantize(good_quantize)
    # other correct formulations: brute force (elementwise, untouched by autocast), float64,
    # and dropping ||z||^2 (the same for every code of a row, so the argmin does not change)
    check.quantize(lambda z, e: ((z.float()[:, None] - e.float()[None]) ** 2).sum(-1).argmin(1))
    check.quantize(lambda z, e: torch.cdist(z.double(), e.double()).argmin(1))
    check.quantize(lambda z, e: expansion(z, e, zz=0.0))
    out = capsys.readouterr().out
    assert out.count("✓ Exercise 2.1 quantize: passed") == 4 and out.count("\n") == 4


def test_quantize_stub():
    fails(check.quantize, stub, ["Exercise 2.1 (quantize) is not done yet"])


@pytest.mark.parametrize("answer, fragment", [
    (lambda z, e: expansion(z, e, argmax=True), "argmax"),
    (lambda z, e: expansion(z, e, ee=0.0), "dropped the ||e||^2 term"),
    (lambda z, e: expansion(z, e, two=1.0), "factor 2"),
    (lambda z, e: expansion(z, e, two=-2.0), "minus sign"),
    (lambda z, e: (z.float() @ e.float().t()).argmin(1), "smallest dot product"),
    (lambda z, e: expansion(z, e, dtype=z.dtype), "float32"),                  # bf16 inputs kept in bf16
    (lambda z, e: expansion(z, e, autocast_off=False), "autocast"),            # .float() but autocast on
    (lambda z, e: good_quantize(z, e)[:, None], "keepdim"),
    (lambda z, e: good_quantize(z, e).int(), "int64"),
    (lambda z, e: e[good_quantize(z, e)], "not the code vectors"),
    (lambda z, e: (z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()).argmin(0), "dim 0"),
    (lambda z, e: (z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()).argmin(), "flattens"),
])
def test_quantize_mistakes(answer, fragment):
    fails(check.quantize, answer, ["Exercise 2.1", fragment])


def test_quantize_unknown_wrong_answer_names_a_row():
    msg = fails(check.quantize, lambda z, e: (good_quantize(z, e) + 1) % e.shape[0], ["did not get their nearest code",
                                                                                     "the nearest is code"])
    assert "Likely mistake" not in msg


def test_quantize_in_place():
    def inplace(z, e):
        out = good_quantize(z, e)
        z.zero_()
        return out
    fails(check.quantize, inplace, ["in place"])


# ---------------------------------------------------------------------------- 2.2 straight-through + losses
def good_st(z, z_q):
    return z + (z_q - z).detach()


def good_losses(z, z_q, beta=0.25):
    codebook = F.mse_loss(z_q, z.detach())
    commitment = F.mse_loss(z, z_q.detach())
    return codebook + beta * commitment, codebook, commitment


def test_st_and_losses_correct(capsys):
    check.straight_through_and_losses(good_st, good_losses)
    check.straight_through_and_losses(
        lambda z, z_q: z - z.detach() + z_q.detach(),
        lambda z, z_q, beta=0.25: ((((z_q - z.detach()) ** 2).mean() * (1 + 0) + beta * ((z - z_q.detach()) ** 2).mean()),
                              ((z.detach() - z_q) ** 2).mean(), ((z - z_q.detach()) ** 2).mean()))
    assert capsys.readouterr().out.count("✓ Exercise 2.2 straight_through_and_losses: passed") == 2


def test_st_and_losses_stub():
    fails(check.straight_through_and_losses, stub, good_losses, ["Exercise 2.2", "is not done yet"])
    fails(check.straight_through_and_losses, good_st, stub, ["Exercise 2.2", "is not done yet"])


@pytest.mark.parametrize("answer, fragment", [
    (lambda z, z_q: z_q.detach(), "z_q.detach()"),
    (lambda z, z_q: z + (z_q - z), "without .detach()"),
    (lambda z, z_q: z_q, "gradient reaches z_q"),
    (lambda z, z_q: z, "you returned z's value"),
    (lambda z, z_q: z_q + (z - z_q).detach(), "you returned z's value"),
])
def test_straight_through_mistakes(answer, fragment):
    fails(check.straight_through_and_losses, answer, good_losses, ["Exercise 2.2", fragment])


def test_straight_through_scaled_gradient():
    fails(check.straight_through_and_losses, lambda z, z_q: 2 * z - z.detach() * 2 + z_q.detach(), good_losses,
          ["identity"])


def legacy_swap(z, z_q, beta=0.25):  # taming legacy=True: beta on the codebook term
    codebook = F.mse_loss(z_q, z.detach())
    commitment = F.mse_loss(z, z_q.detach())
    return beta * codebook + commitment, codebook, commitment


def taming_legacy_literal(z, z_q, beta=0.25):  # the detaches on the "wrong" sides gives the same swap
    first = torch.mean((z_q.detach() - z) ** 2)
    second = torch.mean((z_q - z.detach()) ** 2)
    return first + beta * second, second, first


def no_stop_gradients(z, z_q, beta=0.25):
    codebook = F.mse_loss(z_q, z)
    commitment = F.mse_loss(z, z_q)
    return codebook + beta * commitment, codebook, commitment


def swapped_order(z, z_q, beta=0.25):
    loss, codebook, commitment = good_losses(z, z_q, beta)
    return loss, commitment, codebook


def summed(z, z_q, beta=0.25):
    codebook = F.mse_loss(z_q, z.detach(), reduction="sum")
    commitment = F.mse_loss(z, z_q.detach(), reduction="sum")
    return codebook + beta * commitment, codebook, commitment


def no_beta(z, z_q, beta=0.25):
    codebook = F.mse_loss(z_q, z.detach())
    commitment = F.mse_loss(z, z_q.detach())
    return codebook + commitment, codebook, commitment


def weighted_commitment(z, z_q, beta=0.25):
    codebook = F.mse_loss(z_q, z.detach())
    commitment = beta * F.mse_loss(z, z_q.detach())
    return codebook + commitment, codebook, commitment


def loss_without_stop_gradients(z, z_q, beta=0.25):
    _, codebook, commitment = good_losses(z, z_q, beta)
    return (1 + beta) * F.mse_loss(z, z_q), codebook, commitment


def per_element(z, z_q, beta=0.25):
    codebook = (z_q - z.detach()) ** 2
    commitment = (z - z_q.detach()) ** 2
    return codebook + beta * commitment, codebook, commitment


@pytest.mark.parametrize("answer, fragment", [
    (legacy_swap, "legacy=True"),
    (taming_legacy_literal, "legacy=True"),
    (no_stop_gradients, "codebook_loss sends gradient to z"),
    (swapped_order, "swapped"),
    (summed, "you summed"),
    (no_beta, "beta is missing"),
    (weighted_commitment, "unweighted"),
    (loss_without_stop_gradients, "no stop-gradients"),
    (per_element, "single number"),
    (lambda z, z_q, beta=0.25: good_losses(z, z_q, beta)[0], "three values"),
    (lambda z, z_q, beta=0.25: good_losses(z, z_q, 0.25), "beta=0.6 was ignored"),
    (lambda z, z_q, beta=1.0: good_losses(z, z_q, beta), "loss (beta=0.25)"),
    (lambda z, z_q, beta: good_losses(z, z_q, beta), "no default in your signature"),
])
def test_vq_losses_mistakes(answer, fragment):
    fails(check.straight_through_and_losses, good_st, answer, ["Exercise 2.2", fragment])


# ---------------------------------------------------------------------------- 2.3 EMA
def good_ema(cluster_size, embed_sum, z_flat, indices, decay=0.99, eps=1e-5):
    K = cluster_size.shape[0]
    counts = torch.bincount(indices, minlength=K).float()
    sums = torch.zeros_like(embed_sum).index_add_(0, indices, z_flat)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def ema_variant(*, flip=False, smooth="laplace", n_from="ema", duplicates=False, means=False, inplace=False):
    def fn(cluster_size, embed_sum, z_flat, indices, decay=0.99, eps=1e-5):
        K = cluster_size.shape[0]
        counts = torch.bincount(indices, minlength=K).float()
        if duplicates:
            sums = torch.zeros_like(embed_sum)
            sums[indices] += z_flat
        else:
            sums = F.one_hot(indices, K).t().float() @ z_flat
        if means:
            sums = sums / counts.clamp_min(1)[:, None]
        keep, new = (1 - decay, decay) if flip else (decay, 1 - decay)
        if inplace:
            cluster_size.mul_(keep).add_(new * counts)
            embed_sum.mul_(keep).add_(new * sums)
        else:
            cluster_size = keep * cluster_size + new * counts
            embed_sum = keep * embed_sum + new * sums
        n = cluster_size.sum() if n_from == "ema" else counts.sum()
        if smooth == "laplace":
            smoothed = (cluster_size + eps) / (n + K * eps) * n
        elif smooth == "plus_eps":
            smoothed = cluster_size + eps
        else:
            smoothed = cluster_size
        return cluster_size, embed_sum, embed_sum / smoothed[:, None]
    return fn


def test_ema_update_correct(capsys):
    check.ema_update(good_ema)
    check.ema_update(ema_variant())  # one_hot formulation
    assert capsys.readouterr().out.count("✓ Exercise 2.3 ema_update: passed") == 2


def test_ema_update_stub():
    fails(check.ema_update, stub, ["Exercise 2.3 (ema_update) is not done yet"])


@pytest.mark.parametrize("answer, fragment", [
    (ema_variant(flip=True), "swapped decay"),
    (ema_variant(smooth="none"), "no Laplace smoothing"),
    (ema_variant(smooth="plus_eps"), "(N_i + eps) / (n + K * eps) * n"),
    (ema_variant(n_from="batch"), "not the number of vectors in this batch"),
    (ema_variant(duplicates=True), "index_add_"),
    (ema_variant(means=True), "not their mean"),
    (ema_variant(inplace=True), "in place"),
    (lambda N, m, z, i, decay, eps: good_ema(N, m, z, i, 0.0, eps), "not just this batch's counts"),
    (lambda N, m, z, i, decay, eps: good_ema(N, m, z, i, decay, eps)[:2], "three tensors"),
    (lambda N, m, z, i, decay, eps: tuple(t.double() for t in good_ema(N, m, z, i, decay, eps)), "float32"),
])
def test_ema_update_mistakes(answer, fragment):
    fails(check.ema_update, answer, ["Exercise 2.3", fragment])


def test_ema_no_smoothing_with_tiny_eps_gives_nan_message():
    # the first case (eps=0.3) would already catch it; check the NaN path on its own
    def nan_only_on_zero_code(N, m, z, i, decay=0.99, eps=1e-5):
        out = good_ema(N, m, z, i, decay, eps)
        if eps < 1e-3:
            return ema_variant(smooth="none")(N, m, z, i, decay, eps)
        return out
    fails(check.ema_update, nan_only_on_zero_code, ["NaN", "Laplace smoothing"])


# ---------------------------------------------------------------------------- 2.4 perplexity
def good_perplexity(indices, num_codes):
    counts = torch.bincount(indices.flatten(), minlength=num_codes).float()
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def test_perplexity_correct(capsys):
    check.perplexity(good_perplexity)

    def base2(indices, num_codes):  # any base, as long as the exponential matches the log
        p = torch.bincount(indices.flatten(), minlength=num_codes).double()
        p = p[p > 0] / p.sum()
        return 2 ** (-(p * p.log2()).sum())

    def with_epsilon(indices, num_codes):  # the common log(p + tiny) trick is accurate enough
        p = F.one_hot(indices.flatten(), num_codes).float().mean(0)
        return torch.exp(-(p * torch.log(p + 1e-10)).sum())

    check.perplexity(base2)
    check.perplexity(with_epsilon)
    assert capsys.readouterr().out.count("✓ Exercise 2.4 perplexity: passed") == 3


def test_perplexity_stub():
    fails(check.perplexity, stub, ["Exercise 2.4 (perplexity) is not done yet"])


def entropy_variant(*, base=math.e, exp_base=math.e, normalise=True, exponentiate=True, by_K=False):
    def fn(indices, num_codes):
        counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
        p = counts / (num_codes if by_K else counts.sum()) if normalise else counts
        p = p[p > 0]
        H = -(p * torch.log(p) / math.log(base)).sum()
        return exp_base ** H if exponentiate else H
    return fn


@pytest.mark.parametrize("answer, fragment", [
    (entropy_variant(base=2), "mixed bases"),
    (entropy_variant(exponentiate=False), "that is the entropy"),
    (entropy_variant(base=2, exponentiate=False), "entropy"),
    (entropy_variant(normalise=False), "normalise the counts"),
    (entropy_variant(by_K=True), "counts / num_codes"),
    (lambda i, K: (torch.bincount(i.flatten(), minlength=K) > 0).sum().float(), "number of codes used"),
    (lambda i, K: good_perplexity(i, K).item(), "Python float"),
    (lambda i, K: torch.stack([good_perplexity(r, K) for r in i]) if i.dim() > 1 else good_perplexity(i, K),
     "flatten"),
])
def test_perplexity_mistakes(answer, fragment):
    fails(check.perplexity, answer, ["Exercise 2.4", fragment])


def test_perplexity_nan_from_unused_codes():
    def naive(indices, num_codes):
        p = torch.bincount(indices.flatten(), minlength=num_codes).float()
        p = p / p.sum()
        return torch.exp(-(p * p.log()).sum())
    fails(check.perplexity, naive, ["xlogy"])


# ---------------------------------------------------------------------------- the module accepts them
def test_learner_functions_plug_into_vector_quantizer():
    from minigen.vq import VectorQuantizer

    torch.manual_seed(0)
    layer = VectorQuantizer(16, 4, ema=True, decay=0.9, quantize_fn=good_quantize, vq_losses_fn=good_losses,
                            straight_through_fn=good_st, ema_update_fn=good_ema)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, info = layer(z)
    loss.backward()
    assert z_q.shape == z.shape and z.grad is not None
    assert float(good_perplexity(info["indices"], 16)) == pytest.approx(float(info["perplexity"]), rel=1e-5)


# ---------------------------------------------------------------------------- unused codes anywhere
def test_ema_without_minlength():
    def no_minlength(cluster_size, embed_sum, z_flat, indices, decay=0.99, eps=1e-5):
        K = cluster_size.shape[0]
        counts = torch.bincount(indices).float()
        sums = torch.zeros_like(embed_sum).index_add_(0, indices, z_flat)
        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum = decay * embed_sum + (1 - decay) * sums
        n = cluster_size.sum()
        return cluster_size, embed_sum, embed_sum / ((cluster_size + eps) / (n + K * eps) * n)[:, None]

    fails(check.ema_update, no_minlength, ["Exercise 2.3", "minlength=K"])


def test_ema_wrong_defaults_and_keywords():
    def fixed_decay(cluster_size, embed_sum, z_flat, indices, decay=0.99, eps=1e-5):
        return good_ema(cluster_size, embed_sum, z_flat, indices, 0.99, eps)

    fails(check.ema_update, fixed_decay, ["Exercise 2.3", "decay=0.8"])

    def ema(cluster_size, embed_sum, z_flat, indices, decay=0.9, eps=1e-5):
        return good_ema(cluster_size, embed_sum, z_flat, indices, decay, eps)

    fails(check.ema_update, ema, ["Exercise 2.3", "default decay and eps"])


def test_perplexity_other_valid_histograms(capsys):
    # the perplexity depends only on the multiset of counts: any histogram with one bin per
    # used code is right, wherever the unused codes are
    def histc(indices, num_codes):
        counts = torch.histc(indices.flatten().float(), bins=num_codes)
        p = counts / counts.sum()
        return torch.exp(-torch.special.xlogy(p, p).sum())

    def unique(indices, num_codes):
        _, counts = torch.unique(indices, return_counts=True)
        p = counts.float() / indices.numel()
        return torch.exp(-(p * p.log()).sum())

    check.perplexity(histc)
    check.perplexity(unique)
    assert capsys.readouterr().out.count("✓ Exercise 2.4") == 2


def test_perplexity_wrong_on_unused_first_codes():
    def offset(indices, num_codes):  # assumes code 0 is used: normalises by the codes up to the max
        counts = torch.bincount(indices.flatten() - indices.min(), minlength=num_codes).float()
        p = counts / num_codes
        return torch.exp(-torch.special.xlogy(p, p).sum())

    fails(check.perplexity, offset, ["Exercise 2.4", "counts / num_codes"])
