"""Text prompts for latent diffusion: a word-level tokenizer and a small text encoder.

Stable Diffusion conditions its U-Net on the token-wise outputs of a frozen CLIP text
transformer. The LDM paper's own text-to-image model instead trains a transformer text
encoder *jointly* with the U-Net, from scratch, on the captions; that is what we do, at
toy scale. Our captions come from a tiny closed vocabulary ("a small red circle on a blue
background"), so a word-level tokenizer is enough: no BPE, no downloads.

    tokens  = Tokenizer.encode(prompts)        (N, max_length) int64, padded with <pad> = 0
    context = TextEncoder(tokens)              (N, max_length, n_embd), what cross-attention reads

The empty prompt "" is all padding; its encoding is the "null" condition of classifier-free
guidance, as Stable Diffusion uses the encoding of the empty string.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, with inner apostrophes ("it's")


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary; "<pad>" = 0, "<unk>" = 1.

    `vocab` lists the words; "<pad>" and "<unk>" are put in front if it does not start with
    them. Text is lower-cased and split into words; punctuation is dropped. Every prompt
    becomes `max_length` ids: its words, then padding. An unknown word becomes <unk> (and
    a warning names it: the model has never seen it, so it cannot follow it); a prompt of
    more than `max_length` words is an error rather than silently cut.
    """

    pad_id = 0
    unk_id = 1

    def __init__(self, vocab: list[str], max_length: int = 12):
        vocab = [str(w) for w in vocab]
        words = [w for w in vocab if w not in (PAD, UNK)]
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"the vocabulary lists some words twice: {dup[:5]}")
        bad = [w for w in words if self.split(w) != [w]]
        if bad:
            raise ValueError(f"vocabulary entries must be single lower-case words, got {bad[:5]}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.vocab = [PAD, UNK] + words
        self.max_length = max_length
        self._ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_captions(cls, captions, max_length: int | None = None) -> "Tokenizer":
        """The sorted vocabulary of every word in `captions`. max_length=None: 12, or the
        longest caption's word count if that is longer."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError("from_captions needs at least one caption")
        splits = [cls.split(c) for c in captions]
        vocab = sorted({w for s in splits for w in s})
        if max_length is None:
            max_length = max(12, max(len(s) for s in splits))
        return cls(vocab, max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"

    @staticmethod
    def split(text) -> list[str]:
        """Lower-case words, punctuation dropped: "A red, round circle!" -> [a, red, round, circle]."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        return _WORD.findall(text.lower())

    def unknown_words(self, text) -> list[str]:
        """The words of `text` that are not in the vocabulary (in order, without repeats)."""
        out = []
        for w in self.split(text):
            if w not in self._ids and w not in out:
                out.append(w)
        return out

    def encode(self, texts) -> torch.Tensor:
        """A prompt or a list of prompts -> LongTensor (N, max_length), padded with pad_id."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        unknown = []
        for i, text in enumerate(texts):
            words = self.split(text)
            if len(words) > self.max_length:
                raise ValueError(f"the prompt {text!r} has {len(words)} words; this tokenizer takes at most "
                                 f"max_length={self.max_length} words: shorten the prompt")
            for j, w in enumerate(words):
                k = self._ids.get(w)
                if k is None:
                    k = self.unk_id
                    if w not in unknown:
                        unknown.append(w)
                ids[i, j] = k
        if unknown:
            known = ", ".join(self.vocab[2:14])
            more = " ..." if self.vocab_size > 14 else ""
            warnings.warn(f"unknown word(s) {', '.join(repr(w) for w in unknown)} in the prompt: the model was "
                          f"never trained on them, they become <unk> and are mostly ignored. "
                          f"Known words: {known}{more}", UserWarning, stacklevel=2)
        return ids

    def decode(self, ids) -> list[str]:
        """(N, L) or (L,) ids -> the prompts, padding dropped (unknown words read "<unk>")."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (N, L) or (L,), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return [" ".join(self.vocab[i] for i in row if i != self.pad_id) for row in ids.tolist()]


# ----------------------------------------------------------------------------- the encoder


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_length: int = 12
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; `mask` (N, L) True = may be attended to."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None):
        N, L, C = x.shape
        q, k, v = (z.view(N, L, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(C, dim=2))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, L): per key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(N, L, C)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Token ids (N, L) -> context (N, L, n_embd), L <= max_length.

    Token + learned position embeddings, n_layer bidirectional pre-LayerNorm blocks (every
    word sees the whole prompt, unlike a GPT), a final LayerNorm. Padding keys are masked
    out of attention, so the words' outputs do not depend on how much padding follows
    them; the pad positions still get outputs (they attend to the words), and the U-Net's
    cross-attention reads all max_length positions, as Stable Diffusion reads all 77. A
    prompt of padding only (the empty prompt) attends among its pads: its encoding is a
    learned constant, the null condition.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.max_length, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"TextEncoder expects int64 token ids of shape (N, L), got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
        N, L = tokens.shape
        if L > c.max_length:
            raise ValueError(f"{L} tokens per prompt but the encoder has {c.max_length} positions (max_length)")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        is_pad = tokens == Tokenizer.pad_id
        # an all-padding prompt would have no key left to attend to (softmax of nothing):
        # let it attend to its own pads instead
        mask = ~is_pad | is_pad.all(dim=1, keepdim=True)
        pos = torch.arange(L, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos)[None])
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)


__all__ = ["Tokenizer", "TextEncoderConfig", "TextEncoder", "PAD", "UNK"]
