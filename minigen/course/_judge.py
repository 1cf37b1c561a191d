"""The grader's trusted child: runs the check cells of one notebook against probes.

Started by minigen.course.grader, never by hand. It never imports or executes learner code:
the learner's notebook runs in the worker (minigen.course._runner), and every check call
here gets proxies (minigen.course.probe) for the learner's names. Commands arrive as JSON
lines on stdin; one JSON line per check cell goes back on the inherited result fd:
{"i", "ok", "error", "output", "report"}. Points are computed from these by the grader.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = json.loads(sys.stdin.readline())
    out = os.fdopen(job["result_fd"], "w", buffering=1, encoding="utf-8")
    sock = socket.socket(fileno=job["probe_fd"])

    import time

    import torch  # noqa: F401

    from minigen.course import probe

    peer = probe.Peer(sock, trusted=True, timeout=job["probe_timeout"])
    real_stdout, real_stderr = sys.stdout, sys.stderr
    out.write(json.dumps({"ev": "ready"}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") != "check":
            break
        captured = probe.CappedWriter()
        sys.stdout = sys.stderr = captured
        error, report = None, {}
        peer.dead = None
        peer.deadline = time.monotonic() + cmd["cell_timeout"]
        try:
            probe.run_check_cell(peer, cmd["source"], cmd["aliases"])
        except BaseException as e:  # noqa: BLE001 - a failing check is a result, not a crash
            names = [c.__name__ for c in type(e).__mro__]
            chain, x = [], e
            while x is not None and len(chain) < 5:
                chain.append(x)
                x = x.__cause__ or x.__context__
            learner_tb = next((getattr(c, "learner_traceback", None) for c in chain
                               if getattr(c, "learner_traceback", None)), None)
            timeout = any(isinstance(c, probe.ProbeTimeout) for c in chain)
            error = {"type": type(e).__name__, "message": str(e)[:8000],
                     "check_failed": "CheckFailed" in names,
                     "not_implemented": any(isinstance(c, NotImplementedError) for c in chain),
                     "timeout": timeout,
                     "learner_traceback": learner_tb,
                     "probe_error": any(isinstance(c, probe.ProbeError) for c in chain)}
            if "CheckFailed" not in names and not isinstance(e, (probe.ProbeError, NameError)) \
                    and not learner_tb:
                # a failure of the check itself (not of the learner's code): for the instructor,
                # on the judge's stderr; the feedback never shows the check's source
                print(traceback.format_exc(), file=real_stderr, flush=True)
        finally:
            sys.stdout, sys.stderr = real_stdout, real_stderr
        try:
            if cmd.get("report_names") and not peer.dead:
                peer.deadline = time.monotonic() + 10
                report = peer.report(cmd["report_names"])
        except Exception:  # noqa: BLE001 - the report is advisory
            report = {}
        peer.deadline = time.monotonic() + 10
        peer.end()
        out.write(json.dumps({"ev": "result", "i": cmd["i"], "ok": error is None, "error": error,
                              "output": captured.getvalue(), "report": report,
                              "worker_dead": bool(peer.dead)}) + "\n")


if __name__ == "__main__":
    main()
