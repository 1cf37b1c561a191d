"""Time the generation of the built-in datasets (no cache), train and test splits.

    python benchmarks/data_gen.py            # all splits
    python benchmarks/data_gen.py --quick    # 5,000 images per split

Prints wall-clock seconds and the CPU seconds of this process (the latter is the fairer
figure on a machine shared with other jobs), with the machine and library versions.
"""

import argparse
import os
import platform
import time

import numpy as np
import torch

from minigen import builtin_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5,000 images per split instead of the full splits")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, load average {load:.1f}")
    print(f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}")

    t0, c0 = time.perf_counter(), time.process_time()
    builtin_data._digit_templates()      # one-off font rendering, shared by every digits split
    print(f"digit glyph templates ({len(builtin_data.DIGIT_FONTS)} fonts): "
          f"{time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU")

    print(f"{'dataset':8s} {'split':6s} {'images':>7s} {'wall s':>8s} {'CPU s':>8s} {'images/s':>10s}")
    for name, (make, version, splits) in builtin_data.BUILTIN.items():
        for split, (n, seed) in splits.items():
            n = min(n, 5000) if args.quick else n
            t0, c0 = time.perf_counter(), time.process_time()
            ds = make(n, seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert len(ds) == n
            print(f"{name:8s} {split:6s} {n:7d} {wall:8.2f} {cpu:8.2f} {n / wall:10.0f}")


if __name__ == "__main__":
    main()
