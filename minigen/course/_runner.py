"""The grader's child process: run a notebook's cells in an IPython shell, report over a private pipe.

Started by minigen.course.grader in a fresh temporary directory, never by hand. It reads one
JSON job from stdin (the cells, a random token, the number of the inherited pipe fd), then
stdin is closed so the notebook cannot read it. For each cell it writes a JSON line prefixed
with the token to the pipe: {"ev": "start", "i": i} before and {"ev": "end", ...} after.
Student code prints into capped buffers, so printing "passed" or writing files forges
nothing, and output is bounded in memory.

Before each canonical check cell the check modules are imported afresh and the notebook's
aliases (`check`) rebound to them, and selected attributes of torch/builtins that the
notebook changed are put back, so monkeypatching the checks does not change a grade.
"""

from __future__ import annotations

import builtins
import importlib
import io
import json
import os
import signal
import sys
import traceback

HEAD, TAIL = 4_000, 16_000  # characters of output kept per cell (beginning and end)


class CappedWriter(io.TextIOBase):
    """A text stream that keeps the first HEAD and the last TAIL characters and counts the rest."""

    def __init__(self):
        self.head, self.tail, self.dropped = [], "", 0
        self.head_len = 0

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            s = str(s)
        n = len(s)
        if self.head_len < HEAD:
            take = s[: HEAD - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            joined = self.tail + s
            if len(joined) > TAIL:
                self.dropped += len(joined) - TAIL
                joined = joined[-TAIL:]
            self.tail = joined
        return n

    def flush(self):
        pass

    def isatty(self):
        return False

    def getvalue(self) -> str:
        mid = f"\n[... {self.dropped} characters of output not kept ...]\n" if self.dropped else ""
        return "".join(self.head) + mid + self.tail


def _restore(snap) -> list[str]:
    """Put back module attributes the notebook replaced or deleted; returns their names."""
    changed = []
    for m, saved in snap.values():
        current = vars(m)
        for k, v in saved.items():
            if current.get(k, _MISSING) is not v:
                try:
                    setattr(m, k, v)
                    changed.append(f"{getattr(m, '__name__', '?')}.{k}")
                except (AttributeError, TypeError):
                    pass
    return changed


_MISSING = object()


def main() -> None:
    job = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    token, fd = job.pop("token"), job.pop("fd")
    channel = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    real_stdout, real_stderr = sys.stdout, sys.stderr

    def send(**msg):
        try:
            channel.write(token + json.dumps(msg) + "\n")
            channel.flush()
        except (OSError, ValueError):  # the notebook closed our pipe; the parent sees EOF
            pass

    import torch  # noqa: F401  (imported before any student code, so the snapshot is genuine)
    import torch.nn.functional
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="nocolor") if _accepts_colors() else InteractiveShell.instance()
    try:
        shell.colors = "nocolor"
    except Exception:
        pass
    shell.user_ns["__name__"] = "__main__"
    protected = [torch, torch.nn.functional, torch.Tensor, builtins, importlib]
    snap = {}
    for m in protected:
        try:
            snap[id(m)] = (m, dict(vars(m)))
        except TypeError:
            pass
    aliases = job["check_aliases"]  # {"check": "minigen.course.checks.l00"}

    # The parent interrupts a cell over its time limit with SIGINT. Only a running cell may
    # receive it as KeyboardInterrupt; between cells it is ignored, so a late interrupt cannot
    # kill the runner itself.
    in_cell = [False]

    def on_sigint(signum, frame):
        if in_cell[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    for cell in job["cells"]:
        i = cell["i"]
        send(ev="start", i=i)
        restored = []
        if cell["role"] == "check":
            restored = _fresh_checks(shell, aliases) + _restore(snap)
        out = CappedWriter()
        sys.stdout = sys.stderr = out
        error = None
        try:
            in_cell[0] = True
            result = shell.run_cell(cell["source"], store_history=False)
            in_cell[0] = False
            exc = result.error_before_exec or result.error_in_exec
            if exc is not None:
                names = [c.__name__ for c in type(exc).__mro__]
                error = {"type": type(exc).__name__, "message": str(exc)[:8000],
                         "check_failed": "CheckFailed" in names,
                         "not_implemented": "NotImplementedError" in names}
        except BaseException as e:  # noqa: BLE001 - anything escaping the shell is the cell's failure
            error = {"type": type(e).__name__, "message": str(e)[:8000], "check_failed": False,
                     "not_implemented": False}
            out.write(traceback.format_exc())
        finally:
            in_cell[0] = False
            sys.stdout, sys.stderr = real_stdout, real_stderr
        try:
            import matplotlib.pyplot as plt  # free figures the cell drew (no display here)

            plt.close("all")
        except Exception:
            pass
        send(ev="end", i=i, ok=error is None, error=error, output=out.getvalue(), restored=restored)
    send(ev="done")


def _accepts_colors() -> bool:
    import inspect

    from IPython.core.interactiveshell import InteractiveShell

    try:
        return "colors" in InteractiveShell.class_trait_names()
    except Exception:
        return "colors" in inspect.signature(InteractiveShell.__init__).parameters


def _fresh_checks(shell, aliases) -> list[str]:
    """Import the check modules afresh from disk and rebind the notebook's names to them."""
    for name in [n for n in list(sys.modules) if n == "minigen.course.checks" or n.startswith("minigen.course.checks.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    for alias, modname in aliases.items():
        shell.user_ns[alias] = importlib.import_module(modname)
    return []  # rebinding is routine (a fresh module every time), not worth reporting


if __name__ == "__main__":
    main()
