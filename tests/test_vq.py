"""Tests of minigen.vq against independent references (brute force, hand computations, autograd)."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minigen import vq
from minigen.vq import (VQVAE, VectorQuantizer, VQVAEConfig, ema_update, kmeans, perplexity, quantize,
                        straight_through, vq_losses)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is faster, and immune to oversubscription on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    base = dict(in_channels=3, image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1,
                num_downsamples=2, code_dim=8, num_codes=32)
    base.update(kw)
    return VQVAEConfig(**base)


def squares(n=16, c=3, s=16, seed=0):
    """Coloured squares on black: structured data a small VQ-VAE can fit in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, c, s, s)
    for i in range(n):
        r, col = torch.randint(0, s - 6, (2,), generator=g)
        x[i, :, r:r + 6, col:col + 6] = torch.rand(c, 1, 1, generator=g) * 2 - 1
    return x


# ----------------------------------------------------------------------------- quantize


def gap_safe(z, e, tol=1e-3):
    """Rows whose nearest and second-nearest codes differ by more than tol (float64 brute force)."""
    d = torch.cdist(z.double(), e.double())
    two = d.topk(2, dim=1, largest=False).values
    return d.argmin(1), (two[:, 1] - two[:, 0]) > tol


def test_quantize_matches_brute_force_nearest_neighbour():
    torch.manual_seed(10)
    z, e = torch.randn(2000, 16), torch.randn(128, 16)
    ref, safe = gap_safe(z, e)
    assert safe.float().mean() > 0.9
    got = quantize(z, e)
    assert got.dtype == torch.int64 and got.shape == (2000,)
    assert torch.equal(got[safe], ref[safe])
    # under bf16 autocast the distances are still float32: the same argmins
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_ac = quantize(z, e)
    assert torch.equal(got_ac[safe], ref[safe])
    # bf16 inputs are upcast, not compared in bf16
    zb, eb = z.bfloat16(), e.bfloat16()
    ref_b, safe_b = gap_safe(zb.float(), eb.float())
    assert torch.equal(quantize(zb, eb)[safe_b], ref_b[safe_b])


def test_layer_output_is_the_nearest_code_and_decodes_from_indices():
    torch.manual_seed(11)
    layer = VectorQuantizer(64, 8).eval()
    with torch.no_grad():
        layer.embedding.weight.normal_()
    z = torch.randn(3, 8, 5, 4)
    z_q, loss, info = layer(z)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    ref, safe = gap_safe(z_flat, layer.codebook)
    idx = info["indices"]
    assert idx.shape == (3, 5, 4)
    assert torch.equal(idx.reshape(-1)[safe], ref[safe])
    expected = layer.codebook[idx].permute(0, 3, 1, 2)
    # the straight-through output is z + (q - z): two correctly rounded fp32 operations, each
    # off by at most half an ulp of values up to max(|z|, |q|) (elementwise ops round the same
    # on every CPU); was atol=1e-6, only ~1.4x what |values| near 4 allow
    scale = max(z.abs().max().item(), expected.abs().max().item(), 1.0)
    torch.testing.assert_close(z_q, expected, atol=2 * scale * torch.finfo(torch.float32).eps, rtol=0)
    torch.testing.assert_close(layer.get_codebook_entry(idx), expected.detach())
    torch.testing.assert_close(layer.get_codebook_entry(idx.reshape(-1), shape=(3, 5, 4, 8)), expected.detach())
    # both losses have the value mean ||z - e||^2; the layer's loss is codebook + beta * commitment
    mse = (z - expected).pow(2).mean()
    torch.testing.assert_close(info["codebook_loss"], mse.detach())
    torch.testing.assert_close(info["commitment_loss"], mse.detach())
    torch.testing.assert_close(loss, (1 + 0.25) * mse)


# ----------------------------------------------------------------------------- gradients


def test_gradients_go_where_the_paper_says():
    torch.manual_seed(12)
    K, D, beta = 16, 4, 0.25
    layer = VectorQuantizer(K, D, beta=beta, dead_code_threshold=0).eval()
    with torch.no_grad():
        layer.embedding.weight.normal_()
    e = layer.embedding.weight
    z = torch.randn(2, D, 3, 3, dtype=torch.float32, requires_grad=True)
    idx = quantize(z.detach().permute(0, 2, 3, 1).reshape(-1, D), e.detach())
    z_q = layer.embedding(idx).view(2, 3, 3, D).permute(0, 3, 1, 2)
    _, codebook_loss, commitment_loss = vq_losses(z, z_q, beta)
    n = z.numel()

    # expected gradients, row by row in float64
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, D).double()
    ed = e.detach().double()
    g_e = torch.zeros(K, D, dtype=torch.float64)
    g_zf = torch.zeros_like(zf)
    for r, k in enumerate(idx.tolist()):
        g_e[k] += 2 * (ed[k] - zf[r]) / n
        g_zf[r] = beta * 2 * (zf[r] - ed[k]) / n
    g_z = g_zf.view(2, 3, 3, D).permute(0, 3, 1, 2)

    # codebook term: gradient on the codebook only
    gz, ge = torch.autograd.grad(codebook_loss, [z, e], allow_unused=True)
    assert gz is None
    torch.testing.assert_close(ge.double(), g_e, atol=1e-7, rtol=1e-5)
    # beta * commitment term: gradient on the encoder output only
    gz, ge = torch.autograd.grad(beta * commitment_loss, [z, e], allow_unused=True)
    assert ge is None
    torch.testing.assert_close(gz.double(), g_z, atol=1e-7, rtol=1e-5)
    # straight-through: the downstream gradient reaches z unchanged and never the codebook
    w = torch.randn(2, D, 3, 3)
    gz, ge = torch.autograd.grad((straight_through(z, z_q) * w).sum(), [z, e], allow_unused=True)
    assert ge is None
    torch.testing.assert_close(gz, w)

    # the whole layer: z gets w + beta*commitment gradient, the codebook the codebook gradient
    out, loss, _ = layer(z)
    ((out * w).sum() + loss).backward()
    torch.testing.assert_close(z.grad.double(), w.double() + g_z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e.grad.double(), g_e, atol=1e-7, rtol=1e-5)


def test_gradient_reaches_the_encoder_input_through_the_vqvae():
    torch.manual_seed(13)
    model = VQVAE(tiny_config(dead_code_threshold=0))
    x = squares(4).requires_grad_(True)
    model.training_loss(x)["loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    first_conv = model.encoder.net[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- EMA


def test_ema_update_by_hand():
    cluster_size = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    embed_sum = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    indices = torch.tensor([0, 1, 0, 1])
    cs, es, cb = ema_update(cluster_size, embed_sum, z, indices, decay=0.9, eps=0.1)
    # counts (2, 2, 0); sums (1, 2), (4, 2), (0, 0)
    torch.testing.assert_close(cs, torch.tensor([1.1, 2.0, 0.45], dtype=torch.float64))
    torch.testing.assert_close(es, torch.tensor([[1.0, 1.1], [2.2, 0.2], [0.0, 0.45]], dtype=torch.float64))
    # n = 3.55; smoothed N_i = (N_i + 0.1) / (3.55 + 3 * 0.1) * 3.55
    smoothed = torch.tensor([1.2, 2.1, 0.55], dtype=torch.float64) / 3.85 * 3.55
    torch.testing.assert_close(cb, es / smoothed[:, None])
    # inputs untouched (pure function)
    assert torch.equal(cluster_size, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))


def test_ema_layer_updates_codebook_without_gradient():
    torch.manual_seed(14)
    layer = VectorQuantizer(8, 3, ema=True, decay=0.9, dead_code_threshold=0)
    assert not layer.embedding.weight.requires_grad
    with torch.no_grad():
        layer.embedding.weight.normal_()
        layer.embed_sum.copy_(layer.embedding.weight)
    cs0, es0, e0 = layer.cluster_size.clone(), layer.embed_sum.clone(), layer.codebook.detach().clone()
    z = torch.randn(4, 3, 2, 2, requires_grad=True)
    z_q, loss, info = layer(z)
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    idx = torch.cdist(z_flat.double(), e0.double()).argmin(1)
    assert torch.equal(info["indices"].reshape(-1), idx)
    cs, es, cb = ema_update(cs0, es0, z_flat, idx, 0.9, 1e-5)
    torch.testing.assert_close(layer.cluster_size, cs)
    torch.testing.assert_close(layer.codebook, cb)
    # no codebook term in EMA mode: loss = beta * commitment (against the codebook before the update)
    torch.testing.assert_close(loss, 0.25 * (z - e0[idx].view(4, 2, 2, 3).permute(0, 3, 1, 2)).pow(2).mean())
    loss.backward()
    assert layer.embedding.weight.grad is None
    # eval mode leaves everything alone
    layer.eval()
    before = layer.codebook.clone()
    layer(torch.randn(4, 3, 2, 2))
    assert torch.equal(layer.codebook, before)


# ----------------------------------------------------------------------------- usage


def batch_usage(layer, seed):
    layer.eval()
    z = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, _, info = layer(z)
    layer.train()
    return float(info["usage"])


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_replacement_revives_unused_codes(ema):
    results = {}
    for threshold in (0.0, 1.0):
        torch.manual_seed(15)
        layer = VectorQuantizer(32, 4, ema=ema, dead_code_threshold=threshold)
        with torch.no_grad():  # a codebook far away from the data: one code takes everything
            far = 50 + 0.01 * torch.randn(32, 4)
            layer.embedding.weight.copy_(far)
            layer.embed_sum.copy_(far)
        assert batch_usage(layer, 0) <= 2 / 32
        opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05) if not ema else None
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            z = torch.randn(8, 4, 8, 8, generator=g)
            _, loss, info = layer(z)
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
        results[threshold] = batch_usage(layer, 99)
    assert results[0.0] <= 2 / 32, results  # without replacement the far codes stay dead
    assert results[1.0] >= 0.75, results


def test_kmeans_init_finds_the_clusters():
    torch.manual_seed(16)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    pts = centres.repeat_interleave(64, 0) + 0.1 * torch.randn(256, 2)
    pts = pts[torch.randperm(256)]
    z = pts.view(4, 8, 8, 2).permute(0, 3, 1, 2).contiguous()
    layer = VectorQuantizer(4, 2, kmeans_init=True, dead_code_threshold=0)
    assert not bool(layer.initted)
    layer.eval()
    layer(z)  # no init in eval mode
    assert not bool(layer.initted)
    layer.train()
    _, _, info = layer(z)
    assert bool(layer.initted)
    got = layer.codebook.detach()
    # every true centre has a code within 0.05 of the cluster mean
    means = torch.stack([pts[(pts - c).norm(dim=1) < 2].mean(0) for c in centres])
    assert torch.cdist(means, got).min(1).values.max() < 0.05, got
    assert float(info["usage"]) == 1.0
    before = got.clone()
    layer(z)  # only the first batch initialises
    torch.testing.assert_close(layer.codebook.detach(), before)
    # the function alone, with repeated rows and more codes than points
    c = kmeans(torch.zeros(3, 2), 5, iters=2)
    assert c.shape == (5, 2) and torch.isfinite(c).all()


def test_perplexity():
    K = 16
    uniform = torch.arange(K).repeat(5)
    assert float(perplexity(uniform, K)) == pytest.approx(K)
    assert float(perplexity(torch.full((40,), 3), K)) == pytest.approx(1.0)
    idx = torch.randint(0, K, (300,), generator=torch.Generator().manual_seed(17)) % 11
    p = np.bincount(idx.numpy(), minlength=K) / 300
    ref = math.exp(-sum(pi * math.log(pi) for pi in p if pi > 0))
    assert float(perplexity(idx, K)) == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------- the VQ-VAE


@pytest.mark.parametrize("ema", [False, True])
def test_vqvae_loss_falls(ema):
    torch.manual_seed(18)
    model = VQVAE(tiny_config(ema=ema))
    x = squares(16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        out = model.training_loss((x, None), step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) >= {"loss", "recon", "vq", "perplexity", "usage"}
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses[::5]


def test_vqvae_encode_decode_roundtrip():
    torch.manual_seed(19)
    model = VQVAE(tiny_config()).eval()
    x = squares(4)
    z_q, idx = model.encode(x)
    assert z_q.shape == (4, 8, 4, 4) and idx.shape == (4, 4, 4) and idx.dtype == torch.int64
    torch.testing.assert_close(model.decode_indices(idx), model.decode(z_q), atol=1e-5, rtol=1e-5)
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= -1 and rec.max() <= 1
    # encode in train mode does not touch the codebook statistics
    model.train()
    cs = model.quantize.cluster_size.clone()
    model.encode(x)
    assert torch.equal(model.quantize.cluster_size, cs)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode_indices(torch.full((1, 4, 4), 32))


def test_learner_functions_are_used():
    calls = []

    def my_quantize(z_flat, codebook):
        calls.append(z_flat.shape)
        return torch.cdist(z_flat, codebook).argmin(1)

    layer = VectorQuantizer(16, 4, quantize_fn=my_quantize, dead_code_threshold=0).eval()
    z = torch.randn(2, 4, 3, 3)
    _, _, info = layer(z)
    assert calls == [(18, 4)]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(info["indices"].reshape(-1), torch.cdist(z_flat, layer.codebook).argmin(1))
    model = VQVAE(tiny_config(), quantizer=VectorQuantizer(32, 8, quantize_fn=my_quantize))
    model.training_loss(squares(2))
    assert len(calls) == 2


def test_bad_inputs_give_clear_errors():
    layer = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match=r"code_dim=8.*4 channels.*1x1 conv"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="N, C, H, W"):
        layer(torch.randn(2, 8))
    model = VQVAE(tiny_config())
    with pytest.raises(ValueError, match="channel"):
        model.training_loss(squares(2, c=1))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.training_loss((squares(2) + 1) * 127.5)
    # a quantizer whose code_dim does not match the config: caught at construction
    with pytest.raises(ValueError, match=r"code_dim=7.*code_dim=8"):
        VQVAE(tiny_config(), quantizer=VectorQuantizer(32, 7))
    # an encoder that downsamples too much: caught at construction
    enc = vq.Encoder(3, 16, 8, 1, num_downsamples=3)
    with pytest.raises(ValueError, match="2x2 latents"):
        VQVAE(tiny_config(), encoder=enc)
    with pytest.raises(ValueError, match="recon_loss"):
        VQVAEConfig(recon_loss="l3")


def test_custom_encoder_without_out_channels_is_probed():
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 4, 4))  # 16 -> 4, 12 channels, no attribute
    model = VQVAE(tiny_config(), encoder=enc)
    assert model.quant_conv.in_channels == 12
    model.training_loss(squares(2))


def test_build_and_state_dict_roundtrip():
    import dataclasses

    m = vq.build({"num_codes": 64, "ema": True, "kmeans_init": True}, (1, 28, 28), 10)
    assert m.config.in_channels == 1 and m.config.latent_size == 7 and m.quantize.num_codes == 64
    m.training_loss(torch.rand(4, 1, 28, 28) * 2 - 1)
    again = VQVAE(VQVAEConfig(**dataclasses.asdict(m.config)))
    again.load_state_dict(m.state_dict())
    assert bool(again.quantize.initted)
    assert torch.equal(again.quantize.codebook, m.quantize.codebook)
    with pytest.raises(TypeError, match="codes"):
        vq.build({"codes": 3}, (1, 28, 28), 10)


# ----------------------------------------------------------------------------- two processes


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         init_method=f"tcp://127.0.0.1:{port}")
    states = {}
    for ema in (True, False):
        torch.manual_seed(0)  # same initial codebook on both ranks
        layer = VectorQuantizer(8, 2, ema=ema, decay=0.9, dead_code_threshold=3.0)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        replaced = 0
        for step in range(4):
            layer.dead_code_threshold = 3.0 if step < 2 else 0.0  # end on plain EMA steps
            replaced += layer(torch.randn(2, 2, 4, 4, generator=g))[2]["replaced"]
        states[ema] = {k: v.clone() for k, v in layer.state_dict().items()}
        states[ema]["replaced"] = replaced
    torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ranks_keep_identical_codebooks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for ema in (True, False):
        assert int(a[ema]["replaced"]) > 0  # the dead-code path ran
        for k in a[ema]:
            assert torch.equal(a[ema][k], b[ema][k]), (ema, k)
