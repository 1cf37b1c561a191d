"""Execute solution notebooks in place and save outputs a reader can read.

    python tools/execute_solutions.py solutions/05_ddpm.ipynb [more.ipynb ...]
    MINIGEN_QUICK=1 python tools/execute_solutions.py solutions/*.ipynb    # quick mode

What `jupyter nbconvert --execute --inplace` does, with two differences:

- stream outputs are coalesced: a progress bar's updates (tqdm writes "\\r" and the new line
  many times a second) are stored as the bar's final line, not as hundreds of outputs, so
  the saved notebook reads like the live one (a bar with leave=False leaves nothing);
- it prints each notebook's wall time and the kernel's CPU time (user + system, all its
  threads), the figures the lessons quote as their measured time.

The kernel runs in the notebook's folder, as with nbconvert. Per-cell timings are kept in
each cell's metadata (`execution`), as nbconvert records them.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import nbclient
import nbformat


def execute(path: Path, timeout: int | None = None) -> tuple[float, float]:
    """Run the notebook at `path` in place; returns (wall seconds, kernel CPU seconds)."""
    nb = nbformat.read(path, as_version=4)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", coalesce_streams=True,
                                     record_timing=True, resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        wall = time.perf_counter() - t0
        # the kernel is this process's child; its CPU time is counted once it has exited
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for cell in nb.cells:
        # a bar with leave=False ends by blanking its line: nothing is left to show
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and not o.text.strip())]
    nbformat.write(nb, path)
    return wall, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=None, help="per-cell limit in seconds (default: none)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    failed = 0
    for path in args.notebooks:
        try:
            wall, cpu = execute(path, args.timeout)
        except nbclient.exceptions.CellExecutionError as e:
            failed += 1
            print(f"{path}: FAILED (outputs not saved)\n{e}", file=sys.stderr, flush=True)
            continue
        print(f"{path}: {wall:.0f} s wall, {cpu:.0f} s kernel CPU", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
