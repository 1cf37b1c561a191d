"""Sampling speed of the transformer prior with and without the KV cache.

Draws a full 8x8 code map (64 tokens) for a batch of class-conditional samples, with
`generate(use_cache=True)` (one new position per step) and `use_cache=False` (the whole
prefix recomputed at every step), and prints the median time of several runs side by
side. Both paths must draw the same tokens from the same seed; the script checks that too.

    python benchmarks/kv_cache.py                 # ~1.8M-parameter model, batch 16, 1 thread
    python benchmarks/kv_cache.py --threads 2 --runs 7
"""

import argparse
import statistics
import time

import torch

from minigen.transformer import GPT, GPTConfig


def time_generate(model, labels, num_tokens, use_cache, runs, seed=0):
    times, tokens = [], None
    for _ in range(runs):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(labels, num_tokens, use_cache=use_cache, generator=g)
        times.append(time.perf_counter() - t0)
        tokens = out
    return statistics.median(times), times, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noise on a shared machine)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.tokens, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, num_classes=10)
    model = GPT(cfg).eval()
    labels = torch.arange(args.batch) % 10

    # warm-up: first calls pay for allocator and kernel selection
    model.generate(labels, 4, use_cache=True)
    model.generate(labels, 4, use_cache=False)

    t_cache, all_cache, tok_cache = time_generate(model, labels, args.tokens, True, args.runs)
    t_full, all_full, tok_full = time_generate(model, labels, args.tokens, False, args.runs)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    print(f"model: {model.num_params() / 1e6:.2f}M params (n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
          f"n_embd={cfg.n_embd}, vocab={cfg.vocab_size}), batch {args.batch}, {args.tokens} tokens, "
          f"median of {args.runs} runs")
    print(f"{'':14s}{'median s':>10s}{'tokens/s':>12s}   all runs (s)")
    for name, t, ts in (("with cache", t_cache, all_cache), ("without", t_full, all_full)):
        runs = " ".join(f"{x:.3f}" for x in ts)
        print(f"{name:14s}{t:10.3f}{args.batch * args.tokens / t:12.0f}   {runs}")
    print(f"speed-up with KV cache: {t_full / t_cache:.1f}x")
    print(f"same tokens from the same seed: {torch.equal(tok_cache, tok_full)}")


if __name__ == "__main__":
    main()
