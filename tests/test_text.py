"""minigen.text: the word-level tokenizer and the bidirectional text encoder."""
import math
import warnings

import pytest
import torch

from minigen.data import make_shapes
from minigen.text import TextEncoder, TextEncoderConfig, Tokenizer


@pytest.fixture(scope="module")
def captions():
    return make_shapes(400, seed=3).captions


@pytest.fixture(scope="module")
def tok(captions):
    return Tokenizer.from_captions(captions)


def test_vocabulary_from_shapes_captions(tok, captions):
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.pad_id == 0 and tok.unk_id == 1
    words = tok.vocab[2:]
    assert words == sorted(words) and len(set(words)) == len(words)
    from minigen.data import BACKGROUND_NAMES, COLOR_NAMES, SHAPE_NAMES, SIZE_NAMES

    expected = set(COLOR_NAMES) | set(SHAPE_NAMES) | set(SIZE_NAMES) | set(BACKGROUND_NAMES) | {"a", "on", "background"}
    assert set(words) == expected  # 400 images show every word
    assert tok.vocab_size == len(expected) + 2 and tok.max_length == 12


def test_round_trip_on_fresh_captions(tok):
    fresh = make_shapes(50, seed=11).captions
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known words only: no warning
        ids = tok.encode(fresh)
    assert ids.shape == (50, 12) and ids.dtype == torch.long
    assert tok.decode(ids) == fresh
    # each id is the word's position in the vocabulary, independently looked up
    for row, cap in zip(ids.tolist(), fresh):
        words = cap.split()
        assert row[: len(words)] == [tok.vocab.index(w) for w in words]
        assert row[len(words):] == [0] * (12 - len(words))


def test_split_lowercases_and_drops_punctuation(tok):
    assert Tokenizer.split("A Small, RED circle!  on a blue-background.") == \
        ["a", "small", "red", "circle", "on", "a", "blue", "background"]
    assert tok.decode(tok.encode("A RED circle!!")) == ["a red circle"]
    with pytest.raises(TypeError, match="str"):
        tok.encode([3])


def test_padding_and_empty_prompt(tok):
    ids = tok.encode(["a red circle", "", "a large blue square on a green background"])
    assert ids.shape == (3, tok.max_length)
    assert (ids[0, 3:] == tok.pad_id).all() and (ids[0, :3] != tok.pad_id).all()
    assert (ids[1] == tok.pad_id).all()  # the empty prompt: the null condition
    assert (ids[2, :8] != tok.pad_id).all() and (ids[2, 8:] == tok.pad_id).all()
    assert tok.encode("x" and "red").shape == (1, tok.max_length)  # one str -> a batch of one


def test_unknown_words_warn_name_them_and_map_to_unk(tok):
    assert tok.unknown_words("a big red dog and a big cat") == ["big", "dog", "and", "cat"]
    with pytest.warns(UserWarning) as rec:
        ids = tok.encode("a big red dog")
    msg = str(rec[0].message)
    assert "'big'" in msg and "'dog'" in msg and "'red'" not in msg.split("Known")[0]
    assert "Known words" in msg and "circle" in msg  # says what would work
    assert ids[0, :4].tolist() == [tok.vocab.index("a"), tok.unk_id, tok.vocab.index("red"), tok.unk_id]
    assert tok.decode(ids) == ["a <unk> red <unk>"]


def test_too_long_prompt_is_an_error_naming_the_limit():
    tok = Tokenizer(["a", "red", "circle"], max_length=4)
    tok.encode("a red red circle")  # exactly the limit is fine
    with pytest.raises(ValueError, match="max_length=4") as e:
        tok.encode("a red red red circle")
    assert "5 words" in str(e.value)


def test_bad_vocabularies():
    with pytest.raises(ValueError, match="twice"):
        Tokenizer(["a", "red", "a"])
    with pytest.raises(ValueError, match="single lower-case"):
        Tokenizer(["Red"])
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(["a"], max_length=0)
    # the specials are put in front once, whether given or not
    assert Tokenizer(["<pad>", "<unk>", "a"]).vocab == Tokenizer(["a"]).vocab == ["<pad>", "<unk>", "a"]


def test_decode_checks_ids(tok):
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(torch.tensor([[0, tok.vocab_size]]))


# ----------------------------------------------------------------------------- encoder


def _encoder(vocab_size=20, **kw):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(vocab_size=vocab_size, **kw)).eval()


def test_encoder_shapes_and_final_layernorm():
    enc = _encoder(n_embd=32, n_head=4, n_layer=2)
    tokens = torch.randint(2, 20, (5, 12))
    out = enc(tokens)
    assert out.shape == (5, 12, 32) and out.dtype == torch.float32
    # the final LayerNorm (identity affine at init): zero mean, unit variance per position
    # (var / (var + eps) with eps = 1e-5 and the small N(0, 0.02) initial activations: ~0.98)
    torch.testing.assert_close(out.mean(-1), torch.zeros(5, 12), atol=1e-5, rtol=0)
    var = out.var(-1, unbiased=False)
    assert ((var > 0.9) & (var <= 1.0)).all()
    assert enc(tokens[:, :7]).shape == (5, 7, 32)  # fewer positions than max_length is fine
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        enc(torch.full((1, 3), 20))
    with pytest.raises(ValueError, match="int64"):
        enc(torch.zeros(1, 3))


def test_padding_does_not_change_the_words_encoding():
    enc = _encoder(n_embd=32, n_head=2, n_layer=3)
    words = torch.randint(2, 20, (4, 5))
    padded = torch.cat([words, torch.zeros(4, 7, dtype=torch.long)], dim=1)
    torch.testing.assert_close(enc(padded)[:, :5], enc(words), atol=1e-5, rtol=1e-5)
    empty = enc(torch.zeros(2, 12, dtype=torch.long))  # all padding: defined, finite, the same for all
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[0], empty[1])


def test_encoder_is_bidirectional():
    enc = _encoder(n_embd=32)
    a = torch.randint(2, 20, (1, 6))
    b = a.clone()
    b[0, 5] = 2 + (b[0, 5] - 1) % 18  # change the last word only
    assert not torch.allclose(enc(a)[0, 0], enc(b)[0, 0], atol=1e-4)  # the first word sees it


def test_encoder_matches_a_float64_reference():
    """One block written out by hand: x + attn(ln(x)) with masked softmax, x + mlp(ln(x)), ln_f."""
    enc = _encoder(vocab_size=10, max_length=6, n_embd=8, n_head=2, n_layer=1)
    with torch.no_grad():  # make every parameter matter (biases, LayerNorm affine)
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0], [9, 2, 8, 7, 6, 1]])
    e = {k: v.double() for k, v in enc.state_dict().items()}

    def ln(x, pre):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * e[pre + ".weight"] + e[pre + ".bias"]

    x = e["wte.weight"][tokens] + e["wpe.weight"][torch.arange(6)]
    h = ln(x, "blocks.0.ln_1")
    q, k, v = (h @ e["blocks.0.attn.c_attn.weight"].T + e["blocks.0.attn.c_attn.bias"]).split(8, dim=-1)
    out = torch.zeros_like(x)
    for n in range(3):
        keys = [j for j in range(6) if tokens[n, j] != 0] or list(range(6))
        for head in range(2):
            s = slice(4 * head, 4 * head + 4)
            scores = q[n, :, s] @ k[n, keys, s].T / math.sqrt(4)
            out[n, :, s] = torch.softmax(scores, -1) @ v[n, keys, s]
    x = x + out @ e["blocks.0.attn.c_proj.weight"].T + e["blocks.0.attn.c_proj.bias"]
    h = ln(x, "blocks.0.ln_2") @ e["blocks.0.mlp.0.weight"].T + e["blocks.0.mlp.0.bias"]
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    x = x + h @ e["blocks.0.mlp.2.weight"].T + e["blocks.0.mlp.2.bias"]
    ref = ln(x, "ln_f")
    torch.testing.assert_close(enc(tokens).double(), ref, atol=1e-5, rtol=1e-5)


def test_encoder_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoderConfig(vocab_size=0)
