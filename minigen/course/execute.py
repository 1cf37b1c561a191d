"""Running one planned notebook: the worker and the judge, time limits, replays.

`run_notebook` runs the cells `submissions.plan_cells` chose in a fresh working folder of a
`sandbox.Sandbox`. Each attempt (`_attempt`) starts two processes: the worker
(`minigen.course._runner`, inside the sandbox), which runs the learner's cells and never a
check, and the trusted judge (`minigen.course._judge`, outside it), which runs each check
cell against probes answered by the worker over a socket pair (`minigen.course.probe`).
Both report token-tagged JSON lines on pipes (`_Lines`, capped at `LINE_CAP`); their raw
output is kept only as a tail (`_drain`).

A cell over its time limit gets SIGINT (a KeyboardInterrupt inside the cell); one that does
not stop within `GRACE_S` has its worker killed, and the notebook is replayed without that
cell, up to `MAX_RESTARTS` times, so later exercises are still graded. A notebook over its
own time limit has the rest of its cells marked "not run". The result: {cell index:
{"status", "error", "output"[, "report"]}}, from which `grader.grade_submission` scores.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GRACE_S = 3.0        # after an interrupt, how long a cell may take to stop before the kill
MAX_RESTARTS = 3     # replays after a killed or crashed cell
LINE_CAP = 4 << 20   # longest result line accepted from the child (bytes)


def _child_env(workdir: Path, threads: int, cache: Path | None) -> dict:
    import minigen

    pkg_root = str(Path(minigen.__file__).resolve().parents[1])
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "MINIGEN_QUICK": "1",
        "MINIGEN_GRADING": "1",
        "MINIGEN_CACHE": str(cache or workdir / "cache"),
        "MPLBACKEND": "Agg",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "IPYTHONDIR": str(workdir / ".ipython"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
    })
    return env


def _drain(stream, keep: list, cap: int = 16_000):
    """Read a child's raw stdout/stderr (C-level writes, crashes); keep only the last `cap` bytes."""
    tail = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail = (tail + chunk)[-cap:]
    keep.append(tail.decode("utf-8", "replace"))


class _Lines:
    """Token-tagged JSON lines from a pipe, with a cap on the line length."""

    def __init__(self, fd, token: bytes = b""):
        self.fd, self.token, self.buf, self.eof = fd, token, b"", False

    def read(self) -> list[dict]:
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.eof = True
            return []
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > LINE_CAP:
            self.buf = b""
        out = []
        for line in lines:
            if not line.startswith(self.token):
                continue  # not ours: a forged or garbled line
            try:
                msg = json.loads(line[len(self.token):])
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out


def _attempt(cells, aliases, results, *, workdir, env, cell_timeout, deadline, box, report_names):
    """Run `cells` in one worker with one judge. Returns (outcome, culprit cell index, raw output tail)."""
    from minigen.course import sandbox

    r, w = os.pipe()
    jr, jw = os.pipe()
    judge_sock, worker_sock = socket.socketpair()
    token = secrets.token_hex(16)
    roles = {c["i"]: c for c in cells}
    judge_env = dict(env, HOME=os.environ.get("HOME", str(workdir)), TMPDIR=tempfile.gettempdir())
    judge = subprocess.Popen(
        [sys.executable, "-m", "minigen.course._judge"], cwd=tempfile.gettempdir(), env=judge_env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(jw, judge_sock.fileno()), start_new_session=True)
    sandbox._known_children.add(judge.pid)  # ours: never taken for a notebook's orphan
    proc = box.spawn([sys.executable, "-m", "minigen.course._runner"], cwd=workdir, env=env,
                     pass_fds=(w, worker_sock.fileno()))
    os.close(w)
    os.close(jw)
    jsock_fd, wsock_fd = judge_sock.fileno(), worker_sock.fileno()
    judge_sock.close()
    worker_sock.close()
    raw: list = []
    jraw: list = []
    drains = [threading.Thread(target=_drain, args=(proc.stdout, raw), daemon=True),
              threading.Thread(target=_drain, args=(judge.stdout, jraw), daemon=True)]
    for t in drains:
        t.start()
    try:
        judge.stdin.write((json.dumps({"result_fd": jw, "probe_fd": jsock_fd,
                                       "probe_timeout": cell_timeout}) + "\n").encode())
        judge.stdin.flush()
        proc.stdin.write(json.dumps({"token": token, "fd": w, "probe_fd": wsock_fd, "cells": cells}).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    wlines, jlines = _Lines(r, token.encode()), _Lines(jr)
    current, started, interrupted_at = None, 0.0, None
    asked: set = set()     # check cells sent to the judge
    pending = None         # a check cell whose verdict has not arrived
    outcome = "eof"
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                outcome = "deadline"
                break
            limit = cell_timeout + (5.0 if current is not None and roles.get(current, {}).get("role") == "check"
                                    else 0.0)
            if current is not None and now - started > limit:
                if interrupted_at is None:
                    interrupted_at = now
                    if roles.get(current, {}).get("role") != "check":
                        results.setdefault(current, {"status": "timeout", "error": None, "output": ""})
                    try:
                        os.kill(proc.pid, signal.SIGINT)  # KeyboardInterrupt inside the cell
                    except (ProcessLookupError, PermissionError):
                        pass
                elif now - interrupted_at > GRACE_S:
                    outcome = "killed"
                    break
            fds = [fd for fd, src in ((r, wlines), (jr, jlines)) if not src.eof]
            if not fds:
                break
            ready, _, _ = select.select(fds, [], [], 0.1)
            done = False
            if jr in ready:
                for msg in jlines.read():
                    if msg.get("ev") == "result" and msg.get("i") in roles:
                        i = msg["i"]
                        err = msg.get("error")
                        status = "ok" if msg.get("ok") else ("timeout" if (err or {}).get("timeout") else "error")
                        results[i] = {"status": status, "error": err, "output": msg.get("output", ""),
                                      "report": msg.get("report") or {}}
                        if pending == i:
                            pending = None
                if jlines.eof and pending is not None:
                    results.setdefault(pending, {"status": "crashed", "error": None,
                                                 "output": "the grader's checking process died:\n"
                                                           + "".join(jraw)[-2000:]})
                    pending = None
            if r in ready:
                for msg in wlines.read():
                    ev = msg.get("ev")
                    i = msg.get("i")
                    if ev == "start" and i in roles:
                        current, started, interrupted_at = i, time.monotonic(), None
                        if roles[i]["role"] == "check" and i not in asked:
                            asked.add(i)
                            pending = i
                            cmd = {"cmd": "check", "i": i, "source": roles[i]["source"], "aliases": aliases,
                                   "cell_timeout": cell_timeout, "report_names": report_names.get(i, [])}
                            try:
                                judge.stdin.write((json.dumps(cmd) + "\n").encode())
                                judge.stdin.flush()
                            except (BrokenPipeError, OSError):
                                pass
                    elif ev == "end" and i in roles and i == current:
                        if roles[i]["role"] != "check":
                            prior = results.get(i)
                            if prior is None or (prior["status"] == "timeout" and not prior.get("output")):
                                status = "ok" if msg.get("ok") else "error"
                                if prior is not None:
                                    status = "timeout"
                                err = msg.get("error") if isinstance(msg.get("error"), dict) else None
                                results[i] = {"status": status, "error": err,
                                              "output": str(msg.get("output", ""))[-20_000:]}
                        current = None
                    elif ev == "done":
                        done = True
            if done or (wlines.eof and pending is None):
                outcome = "done" if done else "eof"
                break
        # a verdict still on its way (the worker finished or died during the last check)
        wait_until = min(deadline, time.monotonic() + cell_timeout + 5.0)
        while pending is not None and not jlines.eof and time.monotonic() < wait_until:
            ready, _, _ = select.select([jr], [], [], 0.1)
            if ready:
                for msg in jlines.read():
                    if msg.get("ev") == "result" and msg.get("i") == pending:
                        err = msg.get("error")
                        results[pending] = {"status": "ok" if msg.get("ok") else
                                            ("timeout" if (err or {}).get("timeout") else "error"),
                                            "error": err, "output": msg.get("output", ""),
                                            "report": msg.get("report") or {}}
                        pending = None
    finally:
        box.kill_all(proc)
        try:
            judge.stdin.close()
        except OSError:
            pass
        try:
            judge.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _killpg(judge)
        sandbox._known_children.discard(judge.pid)
        os.close(r)
        os.close(jr)
        for t in drains:
            t.join(timeout=5)
    return outcome, current, (raw[0] if raw else "")


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_notebook(cells, aliases, *, cell_timeout: float, timeout: float, threads: int = 1, box=None,
                 report_names=None) -> dict:
    """Run the planned cells in a fresh temporary directory; returns {cell index: result}."""
    from minigen.course import sandbox

    box = box or sandbox.Sandbox.for_slot(0)
    results: dict[int, dict] = {}
    skip: set[int] = set()
    deadline = time.monotonic() + timeout
    workdir = box.make_workdir()
    try:
        env = _child_env(workdir, threads, box.cache_dir(workdir))
        for attempt in range(MAX_RESTARTS + 1):
            todo = [c for c in cells if c["i"] not in skip]
            outcome, culprit, raw = _attempt(todo, aliases, results, workdir=workdir, env=env,
                                             cell_timeout=cell_timeout, deadline=deadline, box=box,
                                             report_names=report_names or {})
            if outcome == "done":
                break
            if outcome == "deadline":
                why = f"not run: the notebook's time limit ({timeout:g} s) was reached"
                if culprit is not None:
                    results.setdefault(culprit, {"status": "timeout", "error": None, "output": ""})
                for c in cells:
                    results.setdefault(c["i"], {"status": "not run", "error": None, "output": why})
                break
            if culprit is None:  # died outside any cell (e.g. at start-up)
                for c in cells:
                    results.setdefault(c["i"], {"status": "crashed", "error": None,
                                                "output": "the grading process died:\n" + raw[-4000:]})
                break
            if outcome == "killed":
                prior = results.get(culprit, {})
                if prior.get("status") not in ("ok", "error"):  # a check's verdict stands
                    results[culprit] = {"status": "timeout", "error": None, "output": prior.get("output", "")}
            else:  # the process died inside the cell: os._exit, segfault, out of memory, closed pipe
                why = box.death_reason()
                results.setdefault(culprit, {"status": "crashed", "error": None,
                                             "output": f"the process running this cell died{why}:\n" + raw[-4000:]})
            skip.add(culprit)
            if attempt == MAX_RESTARTS:
                for c in cells:
                    results.setdefault(c["i"], {"status": "not run", "error": None,
                                                "output": "not run: too many cells timed out or crashed"})
    finally:
        box.remove_workdir(workdir)
    return results



__all__ = ["GRACE_S", "MAX_RESTARTS", "LINE_CAP", "run_notebook"]
