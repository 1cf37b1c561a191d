"""The cost of probes: every check of the solved lessons, in-process and through the probe channel.

    MINIGEN_QUICK=1 python scripts/probe_overhead.py [LESSON ...]

For each lesson it runs the solution notebook's cells (skip-grading cells left out) in one
namespace, and at each check cell times the check twice: called in-process with the real
functions, and called by a trusted Peer with proxies while a worker Peer (a thread of this
process, on a socketpair) holds the functions. The difference is the probe overhead
(serialisation, the channel, the bridged autograd), without process start-up.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("MINIGEN_QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minigen.course import builder, grader, probe  # noqa: E402


def main() -> int:
    lessons = sys.argv[1:] or sorted(p.stem for p in (REPO / "solutions").glob("*.ipynb"))
    total_in, total_probe = 0.0, 0.0
    print(f"{'check':34s} {'in-process s':>12s} {'probes s':>9s} {'ratio':>6s}")
    for lesson in lessons:
        src = grader.load_sources(REPO / "solutions")[lesson]
        cells = grader.plan_cells(src, src.nb)
        ns: dict = {"__name__": "__main__"}
        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()
        shell.user_ns.clear()
        shell.user_ns.update(ns)
        for c in cells:
            if c["role"] != "check":
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    shell.run_cell(c["source"], store_history=False)
                continue
            calls, _ = probe.parse_check_cell(c["source"], src.aliases)
            for modname, fname, args, kwargs in calls:
                fn = getattr(importlib.import_module(modname), fname)
                real = [shell.user_ns[v] if k == "name" else v for k, v in args]
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    try:
                        fn(*real)
                        ok_in = True
                    except Exception:  # noqa: BLE001
                        ok_in = False
                t_in = time.perf_counter() - t0
                a, b = socket.socketpair()
                judge, worker = probe.Peer(a, trusted=True, timeout=120), probe.Peer(b, trusted=False)
                worker.namespace = shell.user_ns
                th = threading.Thread(target=worker.serve, daemon=True)
                th.start()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    try:
                        probe.run_check_cell(judge, c["source"], src.aliases)
                        ok_probe = True
                    except Exception:  # noqa: BLE001
                        ok_probe = False
                t_probe = time.perf_counter() - t0
                judge.end()
                th.join(5)
                a.close()
                b.close()
                total_in += t_in
                total_probe += t_probe
                flag = "" if ok_in == ok_probe else f"  (in-process {'pass' if ok_in else 'fail'}, probes " \
                                                   f"{'pass' if ok_probe else 'fail'})"
                print(f"{lesson[:3] + fname:34s} {t_in:12.3f} {t_probe:9.3f} {t_probe / max(t_in, 1e-9):6.1f}{flag}",
                      flush=True)
    print(f"{'total':34s} {total_in:12.3f} {total_probe:9.3f} {total_probe / max(total_in, 1e-9):6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
