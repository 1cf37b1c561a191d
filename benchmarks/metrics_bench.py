"""Speed of FD-shapes and the real-vs-real baselines of both judges.

    python benchmarks/metrics_bench.py [--repeats 3] [--threads N]

Prints (1) the time to compute FD-shapes for 5,000 images on this machine, split into
judge features and the distance itself, median of --repeats runs after one warm-up, and
(2) FD, KID and precision/recall between two disjoint real sets (first n test images vs
the last n train images, which the judges never trained on) at n = 1,000 and 5,000, next
to the values recorded in minigen/weights/judges.json when the judges were trained.
"""

import argparse
import statistics
import time

import torch

from minigen import metrics
from minigen.data import load_dataset
from minigen.judge import extract_features, judge_info, load_judge


def timed(fn, repeats):
    fn()  # warm-up (oneDNN kernel selection, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    info = judge_info()
    for name in ("shapes", "digits"):
        judge = load_judge(name)
        test_x, _ = load_dataset(name, split="test", n=args.n).tensors()
        train = load_dataset(name, split="train")
        hold_x = train.tensors()[0][-args.n :]

        if name == "shapes":
            f_ref = extract_features(judge, hold_x)
            stats_ref = metrics.feature_statistics(f_ref)
            t_feat, f_test = timed(lambda: extract_features(judge, test_x), args.repeats)
            t_dist, fd = timed(lambda: metrics.frechet_distance(f_test, stats_ref), args.repeats)
            print(f"\nFD-shapes for {args.n} images: {t_feat + t_dist:.2f} s "
                  f"(features {t_feat:.2f} s = {args.n / t_feat:.0f} img/s, statistics + distance {t_dist:.3f} s; "
                  f"reference statistics precomputed)")
            t_kid, _ = timed(lambda: metrics.kid(f_test, f_ref), 1)
            t_pr, _ = timed(lambda: metrics.precision_recall(f_test, f_ref), 1)
            print(f"KID (100 subsets of 1000) {t_kid:.2f} s, precision/recall (k=3) {t_pr:.2f} s at n={args.n}")

        f_test = extract_features(judge, test_x)
        f_hold = extract_features(judge, hold_x)
        print(f"\n{name}: real-vs-real (test[:n] vs train[-n:])   measured now | recorded in judges.json")
        for n in (1000, 5000):
            if n > args.n:
                continue
            a, b = f_test[:n], f_hold[-n:]
            fd = metrics.frechet_distance(a, b)
            km, ks = metrics.kid(a, b, subset_size=min(1000, n), num_subsets=100)
            pr = metrics.precision_recall(a, b)
            rec = info[name]["real_vs_real"].get(str(n), {})
            print(f"  n={n}: FD {fd:.4f} | {rec.get('fd', float('nan')):.4f}   "
                  f"KID {km:.2e} ± {ks:.1e} | {rec.get('kid_mean', float('nan')):.2e}   "
                  f"precision {pr[0]:.3f} recall {pr[1]:.3f}")


if __name__ == "__main__":
    main()
