"""The grader's worker process: run a notebook's cells in an IPython shell, serve probes.

Started by minigen.course.grader in a fresh temporary directory (as an unprivileged user
when the grader runs as root), never by hand. It reads one JSON job from stdin (the cells,
a random token, the numbers of the inherited result pipe and probe socket), then stdin is
closed. For each cell it writes a JSON line prefixed with the token to the pipe:
{"ev": "start", "i": i} before and {"ev": "end", ...} after. Learner code prints into
capped buffers, so printing "passed" or writing files forges nothing, and output is
bounded in memory.

Check cells do not run here. At a check cell the worker answers probes from the trusted
judge (minigen.course._judge, minigen.course.probe) until the judge says the cell is over;
the verdict is the judge's, so nothing this process reports can raise a score.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from minigen.course.probe import CappedWriter  # noqa: E402


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

    import socket

    import torch  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell

    from minigen.course import probe

    shell = InteractiveShell.instance(colors="nocolor") if _accepts_colors() else InteractiveShell.instance()
    try:
        shell.colors = "nocolor"
    except Exception:
        pass
    shell.user_ns["__name__"] = "__main__"
    # The parent interrupts a cell over its time limit with SIGINT. Only a running cell may
    # receive it as KeyboardInterrupt; between cells it is ignored, so a late interrupt cannot
    # kill the runner itself.
    in_cell = [False]

    def on_sigint(signum, frame):
        if in_cell[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    class learner_code:  # probes run learner code inside this: only then may SIGINT interrupt it
        def __enter__(self):
            in_cell[0] = True

        def __exit__(self, *exc):
            in_cell[0] = False
            return False

    peer = probe.Peer(socket.socket(fileno=job.pop("probe_fd")), trusted=False, guard=learner_code)
    peer.namespace = shell.user_ns

    for cell in job["cells"]:
        i = cell["i"]
        send(ev="start", i=i)
        out = CappedWriter()
        sys.stdout = sys.stderr = out
        error = None
        if cell["role"] == "check":  # the judge probes the learner's objects; nothing runs here
            try:
                state = torch.get_rng_state()
                peer.serve()
                torch.set_rng_state(state)
            except BaseException as e:  # noqa: BLE001 - the judge went away; carry on with the next cell
                error = {"type": type(e).__name__, "message": str(e)[:2000]}
            finally:
                in_cell[0] = False
                sys.stdout, sys.stderr = real_stdout, real_stderr
            send(ev="end", i=i, ok=error is None, error=error, output="")
            continue
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
        send(ev="end", i=i, ok=error is None, error=error, output=out.getvalue())
    send(ev="done")


def _accepts_colors() -> bool:
    import inspect

    from IPython.core.interactiveshell import InteractiveShell

    try:
        return "colors" in InteractiveShell.class_trait_names()
    except Exception:
        return "colors" in inspect.signature(InteractiveShell.__init__).parameters


if __name__ == "__main__":
    main()
