import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minigen.transformer import (
    GPT, GPTConfig, CausalSelfAttention, KVCache, PriorDataset, sample_logits, top_k_logits, top_p_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    base = dict(vocab_size=24, block_size=12, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


CONDITIONINGS = {
    "uncond": dict(),
    "class": dict(num_classes=5),
    "caption": dict(prefix_len=4, prefix_vocab_size=30),
}


def make_cond(kind, n, g=None):
    if kind == "uncond":
        return None
    if kind == "class":
        return torch.randint(0, 6, (n,), generator=g)  # 5 = the null class
    return torch.randint(0, 30, (n, 4), generator=g)


# ----------------------------------------------------------------------------- attention


class NaiveAttention(nn.Module):
    """Independent reference: float64 masked softmax(q k^T / sqrt(d)) v, same parameter names."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        N, T, C = x.shape
        h, d = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).double().split(C, dim=2)
        q, k, v = (z.reshape(N, T, h, d).permute(0, 2, 1, 3) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(N, T, C)
        return self.c_proj(y.to(x.dtype))


def test_attention_matches_naive_reference_and_learner_attention_is_used():
    torch.manual_seed(0)
    cfg = tiny(num_classes=5)
    ref = GPT(cfg).eval()
    mine = GPT(cfg, attention=NaiveAttention).eval()
    assert all(isinstance(b.attn, CausalSelfAttention) for b in ref.blocks)
    assert all(isinstance(b.attn, NaiveAttention) for b in mine.blocks)
    mine.load_state_dict(ref.state_dict())
    codes = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    labels = torch.tensor([0, 3, 5])
    a, b = ref(codes[:, :-1], labels), mine(codes[:, :-1], labels)
    assert a.shape == (3, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # an attention without KV-cache support still samples through the uncached path
    g = torch.Generator().manual_seed(1)
    out = mine.generate(labels, 5, use_cache=False, generator=g)
    assert out.shape == (3, 5)


@pytest.mark.parametrize("kind", list(CONDITIONINGS))
def test_causal_mask(kind):
    torch.manual_seed(1)
    cfg = tiny(**CONDITIONINGS[kind])
    model = GPT(cfg).eval()
    codes = torch.randint(0, cfg.vocab_size, (2, cfg.block_size - 1))
    cond = make_cond(kind, 2)
    base = model(codes, cond)
    for j in (0, 4, cfg.block_size - 2):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 7) % cfg.vocab_size
        out = model(changed, cond)
        # row i predicts code i from codes < i, so rows 0..j cannot see code j
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], atol=1e-6, rtol=0)
        assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind", list(CONDITIONINGS))
def test_kv_cache_logits_equal_full_recompute(kind):
    torch.manual_seed(2)
    cfg = tiny(**CONDITIONINGS[kind])
    model = GPT(cfg).eval()
    n = 3
    codes = torch.randint(0, cfg.vocab_size, (n, cfg.block_size))
    cond = make_cond(kind, n)
    full = model(codes[:, :-1], cond)  # (n, block_size, vocab)

    # prefix alone, then one code at a time
    cache = KVCache(cfg.n_layer, model.seq_len)
    rows = [model(codes[:, :0], cond, kv_cache=cache, start_pos=0)]
    for i in range(cfg.block_size - 1):
        rows.append(model(codes[:, i:i + 1], kv_cache=cache, start_pos=cache.length))
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=1e-5, rtol=0)

    # prefix + 3 codes, then chunks of 3 and 5 (the explicit-mask path for t > 1, start_pos > 0)
    cache = KVCache(cfg.n_layer, model.seq_len)
    rows = [model(codes[:, :3], cond, kv_cache=cache, start_pos=0)]
    rows.append(model(codes[:, 3:6], kv_cache=cache, start_pos=cache.length))
    rows.append(model(codes[:, 6:11], kv_cache=cache, start_pos=cache.length))
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CONDITIONINGS))
def test_generate_same_tokens_with_and_without_cache(kind):
    torch.manual_seed(3)
    cfg = tiny(**CONDITIONINGS[kind])
    model = GPT(cfg)
    model.train()  # generate must switch dropout off itself and restore the mode
    cond = make_cond(kind, 6)
    kw = dict(num_samples=6, top_k=10, top_p=0.9, temperature=1.3)
    a = model.generate(cond, cfg.block_size, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(cond, cfg.block_size, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(cond, cfg.block_size, generator=torch.Generator().manual_seed(8), **kw)
    assert model.training
    assert a.shape == (6, cfg.block_size) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the generator is really what drives the draws


def test_generate_continues_given_codes_and_uses_sample_fn():
    torch.manual_seed(4)
    cfg = tiny(num_classes=5)
    model = GPT(cfg).eval()
    start = torch.randint(0, cfg.vocab_size, (2, 5))
    labels = torch.tensor([1, 2])
    out = model.generate(labels, idx=start, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, cfg.block_size) and torch.equal(out[:, :5], start)
    # cached continuation equals the uncached one
    ref = model.generate(labels, idx=start, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)

    seen = []

    def always_three(logits, temperature, top_k, top_p, generator):
        seen.append(logits.shape)
        return torch.full(logits.shape[:1], 3, dtype=torch.long)

    out = model.generate(labels, 4, sample_fn=always_three)
    assert (out == 3).all() and seen == [(2, cfg.vocab_size)] * 4
    # a scalar label with num_samples
    assert model.generate(2, 3, num_samples=4).shape == (4, 3)


# ----------------------------------------------------------------------------- sampling


def test_top_k_never_samples_outside_the_k_best():
    g = torch.Generator().manual_seed(0)
    V, k, draws = 50, 5, 20000
    logits = torch.randn(V, generator=g) * 2
    best = set(torch.topk(logits, k).indices.tolist())
    tokens = sample_logits(logits.expand(draws, V), top_k=k, generator=g)
    assert set(tokens.tolist()) <= best
    # and within the k best the frequencies follow the renormalised softmax
    freq = torch.bincount(tokens, minlength=V).double() / draws
    expect = torch.zeros(V, dtype=torch.float64)
    idx = torch.tensor(sorted(best))
    expect[idx] = logits.double()[idx].softmax(0)
    assert (freq - expect).abs().max() < 0.02
    # without top-k the same logits do draw outside the k best
    free = sample_logits(logits.expand(draws, V), generator=g)
    assert not set(free.tolist()) <= best


def test_top_k_logits_values():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_logits(logits, 2)
    assert torch.equal(out.isfinite(), torch.tensor([[False, True, False, True, False]]))
    assert torch.equal(out[out.isfinite()], torch.tensor([5.0, 4.0]))
    assert torch.equal(top_k_logits(logits, 99), logits)  # k > vocab keeps everything
    with pytest.raises(ValueError, match="top_k"):
        top_k_logits(logits, 0)


def test_top_p_hand_example():
    # probabilities 0.1, 0.5, 0.15, 0.25 in a shuffled order: sorted 0.5, 0.25, 0.15, 0.1
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)
    logits = probs.log()[None]
    kept = lambda p: top_p_logits(logits, p)[0].isfinite().tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]   # 0.5 >= 0.4
    assert kept(0.7) == [False, True, False, True]    # 0.5 + 0.25 = 0.75 >= 0.7
    assert kept(0.8) == [False, True, True, True]     # 0.9 >= 0.8
    assert kept(0.95) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    # kept logits are unchanged
    out = top_p_logits(logits, 0.7)[0]
    assert torch.equal(out[[1, 3]], logits[0, [1, 3]])
    # mass exactly p: the set {0.5} already reaches p = 0.5, so nothing else is kept
    exact = torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64).log()[None]
    assert exact.softmax(-1)[0, 1] == 0.5 and exact.softmax(-1)[0, 3] == 0.25  # exact in binary
    assert top_p_logits(exact, 0.5)[0].isfinite().tolist() == [False, True, False, False]
    assert top_p_logits(exact, 0.75)[0].isfinite().tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="top_p"):
        top_p_logits(logits, 0.0)


def test_top_p_matches_brute_force_on_random_rows():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 12, generator=g, dtype=torch.float64) * 2
    for p in (0.3, 0.6, 0.9):
        got = top_p_logits(logits, p).isfinite()
        probs = logits.softmax(-1)
        for r in range(logits.shape[0]):
            order = probs[r].argsort(descending=True).tolist()
            mass, keep = 0.0, set()
            for j in order:  # smallest prefix of the sorted tokens with mass >= p
                keep.add(j)
                mass += probs[r, j].item()
                if mass >= p:
                    break
            assert set(torch.nonzero(got[r]).flatten().tolist()) == keep


def test_temperature_to_zero_approaches_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2000, 30, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, temperature=0.0), greedy)
    agree = [(sample_logits(logits, temperature=t, generator=g) == greedy).float().mean().item()
             for t in (1.0, 0.3, 0.1, 0.01)]
    assert agree[0] < 0.5 and agree == sorted(agree) and agree[-1] > 0.95
    # where the best logit leads by >= 0.05, temperature 1e-3 scales the lead to >= 50 nats
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 0.05
    assert clear.sum() > 1500
    cold = sample_logits(logits[clear], temperature=1e-3, generator=g)
    assert torch.equal(cold, greedy[clear])
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=-1.0)


# ----------------------------------------------------------------------------- conditioning


def test_conditioning_changes_the_output():
    torch.manual_seed(6)
    codes = torch.randint(0, 24, (1, 11)).expand(3, -1)
    m = GPT(tiny(num_classes=5)).eval()
    out = m(codes, torch.tensor([0, 1, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3
    m = GPT(tiny(prefix_len=4, prefix_vocab_size=30)).eval()
    caps = torch.tensor([[3, 4, 0, 0], [3, 5, 0, 0], [0, 0, 0, 0]])
    out = m(codes, caps)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3
    # same condition, same output
    torch.testing.assert_close(m(codes[:1], caps[:1]), out[:1])


def test_cond_drop_uses_null_condition():
    torch.manual_seed(7)
    m = GPT(tiny(num_classes=5, cond_drop_prob=1.0))
    codes = torch.randint(0, 24, (4, 12))
    labels = torch.tensor([0, 1, 2, 3])
    m.train()
    dropped = m.training_loss((codes, labels))["loss"]
    m.eval()  # no dropping in eval: compare against the explicit null class
    null = torch.nn.functional.cross_entropy(m(codes[:, :-1], torch.full((4,), 5)).reshape(-1, 24), codes.reshape(-1))
    torch.testing.assert_close(dropped, null)
    assert (m.training_loss((codes, labels))["loss"] - null).abs() > 1e-4  # eval keeps the labels


@pytest.mark.parametrize("kind", ["class", "caption"])
def test_classifier_free_guidance(kind):
    torch.manual_seed(11)
    cfg = tiny(**CONDITIONINGS[kind])
    m = GPT(cfg).eval()
    cond = make_cond(kind, 3)
    null = torch.full_like(cond, 5) if kind == "class" else torch.zeros_like(cond)
    w = 3.0
    captured = []

    def greedy(logits, **kw):
        captured.append(logits)
        return logits.argmax(-1)

    out = m.generate(cond, 3, guidance_scale=w, sample_fn=greedy)
    # reference: u + w (c - u) from separate conditional and null forward passes
    for i in range(3):
        c = m(out[:, :i], cond)[:, -1]
        u = m(out[:, :i], null)[:, -1]
        torch.testing.assert_close(captured[i], u + w * (c - u), atol=1e-5, rtol=0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = m.generate(cond, guidance_scale=w, generator=g())
    b = m.generate(cond, guidance_scale=w, use_cache=False, generator=g())
    assert torch.equal(a, b)
    assert torch.equal(m.generate(cond, guidance_scale=1.0, generator=g()), m.generate(cond, generator=g()))


# ----------------------------------------------------------------------------- optimiser


def test_weight_decay_groups():
    cfg = tiny(num_classes=5)
    m = GPT(cfg)
    opt = m.configure_optimizers(SimpleNamespace(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999)))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)  # TrainConfig's generic default is replaced
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}
    names = {id(p): n for n, p in m.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    for n, p in m.named_parameters():
        is_linear_weight = n.endswith("weight") and p.dim() == 2 and "emb" not in n
        assert (n in decay_names) == is_linear_weight, n
    assert any("ln_" in n for n in names.values()) and any("bias" in n for n in names.values())
    assert not any(("ln_" in n or "bias" in n or "emb" in n) for n in decay_names)
    # explicit betas are used as given
    opt = m.configure_optimizers(SimpleNamespace(lr=1e-3, weight_decay=0.0, betas=(0.8, 0.99)))
    assert opt.defaults["betas"] == (0.8, 0.99)


def test_init_statistics():
    torch.manual_seed(8)
    cfg = tiny(n_layer=8, n_embd=128, n_head=4)
    m = GPT(cfg)
    for n, p in m.named_parameters():
        if n.endswith("c_proj.weight"):
            assert abs(p.std().item() - 0.02 / math.sqrt(16)) < 0.002, n
        elif n.endswith("c_attn.weight") or n == "tok_emb.weight":
            assert abs(p.std().item() - 0.02) < 0.002, n
        elif n.endswith("bias") and "ln" not in n:
            assert (p == 0).all(), n


# ----------------------------------------------------------------------------- training


def test_loss_falls_when_overfitting_and_greedy_sampling_recalls():
    torch.manual_seed(9)
    cfg = GPTConfig(vocab_size=16, block_size=10, n_layer=2, n_head=2, n_embd=48, num_classes=4)
    m = GPT(cfg)
    codes = torch.randint(0, 16, (4, 10))
    labels = torch.arange(4)
    data = PriorDataset(codes.view(4, 2, 5), labels)  # (N, h, w) maps are flattened row by row
    assert torch.equal(data[2][0], codes[2]) and data[2][1] == 2 and len(data) == 4
    opt = m.configure_optimizers(SimpleNamespace(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95)))
    first = None
    for step in range(60):
        out = m.training_loss((data.codes, data.labels), step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert first == pytest.approx(math.log(16), abs=0.3)  # N(0, 0.02) init starts near uniform
    assert out["loss"].item() < 0.05
    torch.testing.assert_close(out["bits_per_token"], out["loss"].detach() / math.log(2))
    # the memorised sequences come back from the class token alone
    assert torch.equal(m.generate(labels, temperature=0.0), codes)


def test_fit_trains_the_prior():
    train = pytest.importorskip("minigen.train")
    torch.manual_seed(10)
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=32, num_classes=2)
    data = PriorDataset(torch.randint(0, 16, (8, 8)), torch.arange(8) % 2)
    result = train.fit(GPT(cfg), data, steps=30, batch_size=8, lr=3e-3, progress=False, log_every=1,
                       device="cpu")
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    m = GPT(tiny(num_classes=5)).eval()
    ok = torch.randint(0, 24, (2, 11))
    lab = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="vocab_size=24"):
        m(torch.tensor([[0, 24]]), lab[:1])
    with pytest.raises(ValueError, match=r"\[0, vocab_size"):
        m(torch.tensor([[-1, 3]]), lab[:1])
    with pytest.raises(TypeError, match="LongTensor"):
        m(ok.float(), lab)
    with pytest.raises(ValueError, match="too long"):
        m(torch.randint(0, 24, (2, 12)), lab)  # block_size codes: the last is only a target
    with pytest.raises(ValueError, match="block_size=12"):
        m.training_loss((torch.randint(0, 24, (2, 13)), lab))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        m(ok, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        m(ok, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        m(ok, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        m(ok, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="conditional"):
        m(ok, None)
    with pytest.raises(ValueError, match="num_tokens"):
        m.generate(lab, 13)
    with pytest.raises(ValueError, match="start_pos"):
        cache = KVCache(2, m.seq_len)
        m(ok[:, :2], lab, kv_cache=cache)
        m(ok[:, 2:3], kv_cache=cache, start_pos=5)
    u = GPT(tiny()).eval()
    with pytest.raises(ValueError, match="unconditional"):
        u(ok, lab)
    with pytest.raises(ValueError, match="num_samples"):
        u.generate(None, 3)
    u.training_loss((torch.randint(0, 24, (2, 12)), lab))  # an unconditional prior ignores labels
    c = GPT(tiny(prefix_len=4, prefix_vocab_size=30)).eval()
    with pytest.raises(ValueError, match="prefix_len=4"):
        c(ok, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_vocab_size=30"):
        c(ok, torch.full((2, 4), 30))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="not both"):
        GPTConfig(num_classes=3, prefix_len=2, prefix_vocab_size=10)
