"""A GPT-style transformer prior over VQ codes (the second stage of VQGAN, Esser et al. 2021).

A VQGAN turns an image into a small grid of code indices, e.g. 8x8 = 64 integers in
[0, K). Read in raster order that grid is a sentence of 64 "words" from a vocabulary of K,
and a decoder-only transformer can learn its distribution exactly as a language model
does, one token at a time:

    p(codes | c) = prod_i p(code_i | c, code_0 .. code_{i-1})

where c is the conditioning: a class label, a caption, or nothing. Sampling draws the
codes one by one and the VQGAN decoder turns them back into an image.

The sequence the transformer reads is

    [ prefix tokens ] + [ code_0, code_1, ..., code_{T-2} ]
      ^ class token (1), caption ids (prefix_len), or a learned start token (1)

and the output at position (last prefix token + i) is the distribution of code_i. The
last code is only ever a target, never an input, so the model sees at most
n_prefix + block_size - 1 positions. The loss is the cross-entropy on the code positions
only: we never ask the model to predict the prefix.

The network follows GPT-2 / minGPT: token + learned position embeddings, a stack of
pre-LayerNorm blocks (causal self-attention, then an MLP with GELU), a final LayerNorm and
a linear head; weights N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer);
AdamW with betas (0.9, 0.95) and weight decay on Linear weights only.

Sampling reuses work with a KV cache: the keys and values of tokens already seen never
change (attention is causal), so each new token costs one position instead of the whole
prefix. `generate(..., use_cache=False)` recomputes everything and must give the same
tokens; the tests check that.

The parts a lesson may replace are arguments: `GPT(config, attention=MyAttention)`,
`generate(..., sample_fn=my_sample)`, and the filters `top_k_logits`, `top_p_logits` are
plain functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# minGPT / GPT-3 Adam betas for transformers; beta2 = 0.95 reacts faster to the loss spikes
# that large-vocabulary softmaxes produce than Adam's default 0.999.
PRIOR_BETAS = (0.9, 0.95)
# minigen.train.TrainConfig's generic default; configure_optimizers swaps it for PRIOR_BETAS.
TRAIN_CONFIG_DEFAULT_BETAS = (0.9, 0.999)


@dataclass
class GPTConfig:
    vocab_size: int = 512        # number of codes K in the VQ codebook
    block_size: int = 64         # codes per image, e.g. 64 for an 8x8 code map
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True            # bias in Linear and LayerNorm layers, as GPT-2
    num_classes: int = 0         # > 0: class-conditional, label = a learned start token
    prefix_vocab_size: int = 0   # caption conditioning: size of the caption token vocabulary
    prefix_len: int = 0          # caption conditioning: caption ids per example (0 = padding)
    cond_drop_prob: float = 0.0  # training: replace the condition by the null one this often
    # Caption padding (id 0) is an ordinary token with a learned embedding; added to the
    # position embedding it acts as a per-position pad token (as in DALL-E). An all-padding
    # caption is the null caption of classifier-free guidance.

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0 or self.prefix_len < 0 or self.prefix_vocab_size < 0:
            raise ValueError("num_classes, prefix_len and prefix_vocab_size must be >= 0")
        if self.num_classes > 0 and self.prefix_len > 0:
            raise ValueError("choose one conditioning: num_classes > 0 (class labels) or "
                             "prefix_len > 0 (captions), not both")
        if (self.prefix_len > 0) != (self.prefix_vocab_size > 0):
            raise ValueError("caption conditioning needs both prefix_len > 0 and prefix_vocab_size > 0, "
                             f"got prefix_len={self.prefix_len}, prefix_vocab_size={self.prefix_vocab_size}")
        if self.prefix_len > 0 and self.prefix_vocab_size < 2:
            raise ValueError("prefix_vocab_size must be >= 2: id 0 is reserved for padding")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.cond_drop_prob > 0 and self.num_classes == 0 and self.prefix_len == 0:
            raise ValueError("cond_drop_prob > 0 needs a condition to drop: set num_classes or prefix_len")

    @property
    def n_prefix(self) -> int:
        """Tokens before the first code: the caption, or one class/start token."""
        return self.prefix_len if self.prefix_len > 0 else 1


# ----------------------------------------------------------------------------- KV cache


class LayerKVCache:
    """Keys and values of one attention layer for every position seen so far.

    The tensors are allocated once, (N, n_head, max_len, head_dim), and filled in place:
    appending with torch.cat would copy the whole cache at every step.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k = self.v = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Write k, v (N, n_head, t, head_dim) at positions start_pos.. and return the
        keys and values of positions 0 .. start_pos + t - 1."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
        if self.k is None or self.k.shape != shape or self.k.dtype != k.dtype or self.k.device != k.device:
            if start_pos != 0:
                raise ValueError("the KV cache is empty or was filled for another batch; "
                                 "start a generation at start_pos=0")
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKVCache per block, plus `length`: how many positions are filled."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0


# ----------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i only sees positions <= i.

    The interface a replacement must follow: `forward(x)` for training and uncached
    sampling; to support the KV cache also `forward(x, kv_cache, start_pos)`, where
    `kv_cache.update(k, v, start_pos)` stores the new keys/values and returns all of them.
    Name the output projection `c_proj` to get GPT-2's scaled initialisation.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache: LayerKVCache | None = None, start_pos: int = 0):
        N, t, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (N, t, C) -> (N, n_head, t, head_dim): every head attends independently
        q, k, v = (z.view(N, t, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        dropout_p = self.attn_dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = kv_cache.update(k, v, start_pos)
            if t == 1:
                # the one new query is the latest position: it may see every cached key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif start_pos == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                # queries at start_pos..end-1 against keys 0..end-1. is_causal would align the
                # mask to the top-left corner (query 0 sees key 0 only), which is wrong here.
                end = start_pos + t
                qpos = torch.arange(start_pos, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= qpos
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(N, t, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Normalising the input of each branch (not the sum, as the original Transformer did)
    leaves a clean residual path from the embeddings to the head, which trains stably
    without learning-rate warm-up tricks at this size.
    """

    def __init__(self, config: GPTConfig, attention=CausalSelfAttention):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: LayerKVCache | None = None, start_pos: int = 0):
        if kv_cache is None:
            x = x + self.attn(self.ln_1(x))  # a learner's attention may only take x
        else:
            x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- sampling


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the others to -inf.

    Logits tied with the k-th largest are kept too (so a row may keep more than k).
    k larger than the vocabulary keeps everything.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {k!r}")
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probabilities sum to at least p; set the other logits to -inf.

    A token is dropped when the tokens more likely than it already reach p. The most
    likely token is always kept, and p = 1 keeps everything.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # probability mass strictly before each token in the sorted order (exclusive cumsum)
    cum = torch.cumsum(probs, dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of logits (N, V) -> (N,): temperature -> top-k -> top-p ->
    softmax -> multinomial. temperature = 0 means greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()  # sample in float32 even when the model runs in bf16/fp16
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    if top_p is not None:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """Decoder-only transformer over code indices, optionally class- or caption-conditioned.

    `attention` builds each block's attention from the config (default
    CausalSelfAttention); a lesson passes the learner's class here.
    """

    def __init__(self, config: GPTConfig, attention=None):
        super().__init__()
        self.config = config
        self.n_prefix = config.n_prefix
        self.seq_len = config.n_prefix + config.block_size - 1  # the last code is never an input
        if config.num_classes > 0:
            cond_rows = config.num_classes + 1  # the last row is the null class (id = num_classes)
        elif config.prefix_len > 0:
            cond_rows = config.prefix_vocab_size
        else:
            cond_rows = 1  # a single learned start token
        self.cond_emb = nn.Embedding(cond_rows, config.n_embd)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(self.seq_len, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        attention = attention if attention is not None else CausalSelfAttention
        self.blocks = nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

        self.apply(self._init_weights)
        # GPT-2: each block adds two residual branches, so scale their output projections by
        # 1/sqrt(2 n_layer) to keep the variance of the residual stream from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def null_cond(self):
        """The id of the 'no condition' class (num_classes), or None for other models."""
        return self.config.num_classes if self.config.num_classes > 0 else None

    # -- input checks: public entry points validate, internal loops trust their own tokens

    def _check_codes(self, idx, name="codes"):
        if not torch.is_tensor(idx) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if torch.is_tensor(idx) else type(idx).__name__
            raise TypeError(f"{name} must be a LongTensor (N, T) of code indices, got {got}; "
                            f"flatten an (N, h, w) code map with .flatten(1)")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"{name} must lie in [0, vocab_size={self.config.vocab_size}), found values in "
                             f"[{int(idx.min())}, {int(idx.max())}]; does vocab_size match the codebook size?")

    def _check_cond(self, cond, batch_size):
        cfg = self.config
        if cfg.num_classes == 0 and cfg.prefix_len == 0:
            if cond is not None:
                raise ValueError("this prior is unconditional (num_classes=0, prefix_len=0): pass cond=None")
            return None
        if cond is None:
            what = "class labels (N,)" if cfg.num_classes > 0 else f"caption ids (N, {cfg.prefix_len})"
            raise ValueError(f"this prior is conditional: pass cond = {what}"
                             + (f"; use label {cfg.num_classes} for 'no class'" if cfg.num_classes else ""))
        cond = torch.as_tensor(cond, device=self.tok_emb.weight.device)
        if cond.dtype.is_floating_point or cond.dtype == torch.bool or cond.is_complex():
            raise TypeError(f"cond must hold integer ids, got dtype {cond.dtype}")
        cond = cond.long()
        if cfg.num_classes > 0:
            if cond.dim() == 0:
                cond = cond.expand(batch_size)
            if cond.shape != (batch_size,):
                raise ValueError(f"class labels must have shape ({batch_size},), got {tuple(cond.shape)}")
            lo, hi, top = 0, cfg.num_classes, cfg.num_classes
            what = f"class labels must lie in [0, {top}] ({top} = the null class)"
        else:
            if cond.shape != (batch_size, cfg.prefix_len):
                raise ValueError(f"caption ids must have shape ({batch_size}, prefix_len={cfg.prefix_len}), "
                                 f"got {tuple(cond.shape)}; pad with 0 or truncate")
            lo, hi = 0, cfg.prefix_vocab_size - 1
            what = f"caption ids must lie in [0, prefix_vocab_size={cfg.prefix_vocab_size}) (0 = padding)"
        if cond.numel() and (int(cond.min()) < lo or int(cond.max()) > hi):
            raise ValueError(f"{what}, found values in [{int(cond.min())}, {int(cond.max())}]")
        return cond

    # -- forward

    def _prefix(self, cond, batch_size):
        """Embeddings of the prefix tokens, (N, n_prefix, n_embd)."""
        if cond is None:  # unconditional: the start token for every row
            return self.cond_emb.weight[None, :1].expand(batch_size, 1, -1)
        if cond.dim() == 1:  # class label as one start token
            cond = cond[:, None]
        return self.cond_emb(cond)

    def forward(self, idx: torch.Tensor, cond=None, *, kv_cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """Logits of the codes that follow each input.

        idx: (N, t) code indices. cond: class labels (N,), caption ids (N, prefix_len) or
        None (unconditional). start_pos: position of idx[:, 0] in the whole token sequence
        (prefix included), i.e. how many positions `kv_cache` already holds.

        - start_pos = 0: the prefix is prepended; returns (N, t + 1, vocab) where row i is
          the distribution of code i given cond and codes < i. Pass codes[:, :-1] to get
          one row per code of an image: t <= block_size - 1.
        - start_pos > 0 (only with kv_cache, cond unused): idx continues the cached
          sequence; returns (N, t, vocab), row i predicting the code after idx[:, i].
        """
        self._check_codes(idx)
        if kv_cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs the kv_cache that holds the earlier positions")
        if kv_cache is not None and start_pos != kv_cache.length:
            raise ValueError(f"start_pos ({start_pos}) must equal the number of cached positions "
                             f"({kv_cache.length}); a new sequence starts at start_pos=0 with a fresh cache")
        end = start_pos + (self.n_prefix if start_pos == 0 else 0) + idx.shape[1]
        if end > self.seq_len:
            raise ValueError(
                f"sequence too long: {end} positions, the model has {self.seq_len} (n_prefix={self.n_prefix} + "
                f"block_size={self.config.block_size} - 1; the last code is only a target). For training "
                f"pass the whole (N, block_size) codes to training_loss, which feeds codes[:, :-1]")
        if start_pos == 0:
            cond = self._check_cond(cond, idx.shape[0])
        return self._forward(idx, cond, kv_cache, start_pos)

    def _forward(self, idx, cond, kv_cache, start_pos):
        x = self.tok_emb(idx)
        if start_pos == 0:
            x = torch.cat([self._prefix(cond, idx.shape[0]).to(x.dtype), x], dim=1)
        pos = torch.arange(start_pos, start_pos + x.shape[1], device=idx.device)
        x = self.drop(x + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache.layers[i], start_pos)
        if kv_cache is not None:
            kv_cache.length = start_pos + x.shape[1]
        if start_pos == 0:
            x = x[:, self.n_prefix - 1:]  # prefix tokens before the last one predict no code
        return self.head(self.ln_f(x))

    # -- training

    def training_loss(self, batch, step: int = 0):
        """Cross-entropy of the codes given the condition, for minigen.train.fit.

        batch: (codes (N, T) LongTensor, labels) with labels class ids (N,) or caption ids
        (N, prefix_len); an unconditional prior ignores the labels. Returns the mean loss in
        nats per code and bits_per_token = loss / ln 2.
        """
        if isinstance(batch, (tuple, list)):
            codes, cond = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            codes, cond = batch, None
        self._check_codes(codes)
        if codes.shape[1] < 1 or codes.shape[1] > self.config.block_size:
            raise ValueError(f"codes must have 1..block_size={self.config.block_size} columns, "
                             f"got shape {tuple(codes.shape)}; is block_size the number of codes per image?")
        cfg = self.config
        if cfg.num_classes == 0 and cfg.prefix_len == 0:
            cond = None
        else:
            cond = self._check_cond(cond, codes.shape[0])
            if self.training and cfg.cond_drop_prob > 0:
                # classifier-free guidance training: sometimes show the 'no condition' token
                drop = torch.rand(codes.shape[0], device=codes.device) < cfg.cond_drop_prob
                if cfg.num_classes > 0:
                    cond = torch.where(drop, torch.full_like(cond, cfg.num_classes), cond)
                else:
                    cond = cond.masked_fill(drop[:, None], 0)  # an all-padding caption
        logits = self(codes[:, :-1], cond)
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), codes.reshape(-1))
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2)}

    def configure_optimizers(self, train_config):
        """AdamW with weight decay on Linear weights only (minGPT).

        Decay pulls weights towards 0; that regularises the matrices that mix features, but
        on biases and LayerNorm gains it only fights the scale they are meant to set, and on
        embeddings it shrinks the rows of rare codes that get few gradient updates.

        Uses train_config.lr and .weight_decay (set 0.1 for minGPT's value). Betas: those of
        train_config, except that TrainConfig's generic Adam default (0.9, 0.999) is replaced
        by the transformer setting (0.9, 0.95); pass any other betas to use them as given.
        """
        decay, no_decay = [], []
        seen = set()
        for module in self.modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                (decay if isinstance(module, nn.Linear) and pname == "weight" else no_decay).append(p)
        betas = tuple(getattr(train_config, "betas", PRIOR_BETAS))
        if betas == TRAIN_CONFIG_DEFAULT_BETAS:
            betas = PRIOR_BETAS
        groups = [
            {"params": decay, "weight_decay": float(getattr(train_config, "weight_decay", 0.0))},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=train_config.lr, betas=betas)

    # -- sampling

    @torch.no_grad()
    def generate(self, cond=None, num_tokens: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, *, use_cache: bool = True,
                 generator: torch.Generator | None = None, idx: torch.Tensor | None = None,
                 num_samples: int | None = None, guidance_scale: float | None = None,
                 sample_fn=None) -> torch.Tensor:
        """Sample code indices autoregressively.

        cond: class labels (N,) (a single int with num_samples), caption ids (N, prefix_len),
        or None for an unconditional prior (then give num_samples). num_tokens: codes to draw,
        by default enough to fill block_size. idx: optional (N, t0) codes to continue from.
        guidance_scale w: classifier-free guidance, logits = u + w (c - u) from the
        conditional (c) and null-condition (u) logits, for a model trained with
        cond_drop_prob > 0; None or 1 is plain conditional sampling. sample_fn(logits,
        temperature, top_k, top_p, generator) -> (N,) tokens replaces sample_logits.
        Returns (N, t0 + num_tokens) codes (idx first). The model is put in eval mode while
        sampling and restored afterwards.
        """
        cfg = self.config
        device = self.tok_emb.weight.device
        if idx is None:
            if cond is not None and torch.as_tensor(cond).dim() > 0:
                n = torch.as_tensor(cond).shape[0]
            elif num_samples is not None:
                n = int(num_samples)
            else:
                raise ValueError("say how many samples: pass cond with a batch dimension or num_samples=N")
            idx = torch.empty(n, 0, dtype=torch.long, device=device)
        self._check_codes(idx, "idx")
        n, t0 = idx.shape
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} but cond/idx hold {n} rows")
        cond = self._check_cond(cond, n)
        if num_tokens is None:
            num_tokens = cfg.block_size - t0
        if num_tokens < 1 or t0 + num_tokens > cfg.block_size:
            raise ValueError(f"num_tokens must be >= 1 and t0 + num_tokens <= block_size={cfg.block_size}, "
                             f"got t0={t0}, num_tokens={num_tokens}")
        sample_fn = sample_fn if sample_fn is not None else sample_logits
        guided = guidance_scale is not None and guidance_scale != 1.0
        if guided:
            if cond is None:
                raise ValueError("guidance_scale needs a conditional prior (num_classes or prefix_len > 0)")
            # one batch of 2N rows: the conditional ones, then the same codes with the null condition
            null = torch.full_like(cond, cfg.num_classes) if cfg.num_classes > 0 else torch.zeros_like(cond)
            cond = torch.cat([cond, null])

        def next_logits(tokens, cache, start_pos):
            if guided:
                c, u = self._forward(torch.cat([tokens, tokens]), cond, cache, start_pos)[:, -1].chunk(2)
                return u + guidance_scale * (c - u)
            return self._forward(tokens, cond, cache, start_pos)[:, -1]

        was_training = self.training
        self.eval()
        try:
            codes = torch.empty(n, t0 + num_tokens, dtype=torch.long, device=device)
            codes[:, :t0] = idx
            cache = KVCache(cfg.n_layer, self.seq_len) if use_cache else None
            for i in range(t0, t0 + num_tokens):
                if cache is None:  # recompute the whole sequence: the reference path
                    logits = next_logits(codes[:, :i], None, 0)
                elif i == t0:  # fill the cache with the prefix and any given codes
                    logits = next_logits(codes[:, :i], cache, 0)
                else:  # one new position: the code drawn at the previous step
                    logits = next_logits(codes[:, i - 1:i], cache, cache.length)
                codes[:, i] = sample_fn(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=generator)
        finally:
            self.train(was_training)
        return codes


# ----------------------------------------------------------------------------- data


class PriorDataset(torch.utils.data.Dataset):
    """(codes, label) pairs for training the prior with minigen.train.fit.

    indices: code maps (N, h, w) from a VQ encoder, flattened here in raster order
    (row by row, the order the prior generates in), or sequences (N, T). labels: class ids
    (N,), caption ids (N, prefix_len), or None (each item then carries label -1, which an
    unconditional prior ignores).
    """

    def __init__(self, indices: torch.Tensor, labels: torch.Tensor | None = None):
        indices = torch.as_tensor(indices)
        if indices.dtype.is_floating_point or indices.dim() not in (2, 3):
            raise ValueError(f"indices must be integer codes (N, h, w) or (N, T), got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        self.codes = indices.long().flatten(1)
        if labels is None:
            labels = torch.full((len(self.codes),), -1, dtype=torch.long)
        labels = torch.as_tensor(labels).long()
        if labels.shape[0] != len(self.codes):
            raise ValueError(f"{len(self.codes)} code maps but {labels.shape[0]} labels")
        self.labels = labels

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        return self.codes[i], self.labels[i]
