"""The run directory: one run per folder, an append-only log, no debris of killed writes.

A training run owns its ``out_dir`` while it runs. This module holds what that ownership
means, apart from the checkpoint itself (`minigen.checkpoint`):

- the run lock: ``out_dir/.lock`` (`LOCK_NAME`) is `flock`'ed by the run and holds its PID and
  host. The OS drops an flock when the process dies, even by kill -9, so a crashed run never
  leaves the folder locked; a second run on the folder gets `RunLockedError` naming the first
  one's PID (`lock`). On a filesystem without flock (some network mounts) the run goes on
  unlocked, with a warning; on Windows runs are not locked.
- stale temporary files: holding the lock, the run deletes the temporary files that killed
  checkpoint writes left there (`remove_stale_temp_files`, which names them).
- the log: ``out_dir/log.jsonl`` (`LOG_NAME`) is only ever appended to (`open_log`). Where
  records already are, a marker line first says what follows: ``{"event": "resume", "step": s}``
  (records above it past step s were made by the interrupted run and are redone below it) or
  ``{"event": "start"}`` (a new run; the records above belong to an earlier one). `read_log`
  reads through both and returns the latest run's records.

`minigen.train.fit` calls these in this order: `make`, `lock`, `remove_stale_temp_files`,
(resume from the checkpoint), `open_log`, `append_log` every ``log_every`` steps, `unlock`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path

try:
    import fcntl  # the run lock; POSIX only (on Windows runs are not locked)
except ImportError:  # pragma: no cover
    fcntl = None

from minigen import checkpoint

LOG_NAME = "log.jsonl"
LOCK_NAME = ".lock"  # out_dir/.lock: flock'ed by the run using out_dir, holds its PID


class RunLockedError(RuntimeError):
    """out_dir is in use by another run (it holds out_dir/.lock)."""


# -----------------------------------------------------------------------------
# the folder and its lock


def make(out_dir: Path) -> None:
    """Create out_dir (and its parents); a file in its place is a clear error."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, f"out_dir {out_dir} exists and is not a folder; "
                                 "choose a folder path for the run", str(out_dir)) from None


def lock(out_dir: Path) -> tuple[int | None, str | None]:
    """Take out_dir/.lock -> (its descriptor, None), or (None, a message saying who holds it).

    The descriptor is None with no message where the folder cannot be locked (no fcntl, or a
    filesystem without flock: then with a warning). Pass the descriptor to `unlock`.
    """
    if fcntl is None:
        return None, None
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        pid = holder[0] if holder else "?"
        where = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        return None, (f"{out_dir} is in use by another run (PID {pid}{where}): two runs writing one "
                      f"folder would overwrite each other's checkpoints. Wait for it to finish (or stop it: "
                      f"kill {pid}), or choose another out_dir (--out)")
    except OSError as e:  # a filesystem without flock (some network mounts): run unlocked
        os.close(fd)
        warnings.warn(f"cannot lock {path} ({e.strerror}): nothing stops a second run from using "
                      f"{out_dir} at the same time")
        return None, None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd, None


def unlock(fd: int) -> None:
    """Release out_dir (closing the descriptor drops the flock)."""
    os.close(fd)


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temp files that killed checkpoint writes left in out_dir, with a warning
    naming them; -> the removed. Call it only while holding the lock."""
    removed = checkpoint.remove_stale_temp_files(out_dir)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left in {out_dir} by a "
                      f"killed checkpoint write: {', '.join(p.name for p in removed[:5])}")
    return removed


# -----------------------------------------------------------------------------
# the log


def open_log(out_dir: Path, start: int, resumed: bool):
    """Open out_dir/log.jsonl for appending -> the file. Where records already are, first write
    a marker saying what follows: a resume from step `start`, or a new run (see `read_log`)."""
    path = out_dir / LOG_NAME
    old = path.read_bytes() if path.exists() else b""
    log_file = open(path, "a", encoding="utf-8")
    if old.strip():
        if not old.endswith(b"\n"):  # a line cut short by a crash: keep it on its own line
            log_file.write("\n")
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        marker = ({"event": "resume", "step": start, "time": when,
                   "note": f"resumed from the checkpoint at step {start}; records above with a "
                           f"larger step were redone below"} if resumed else
                  {"event": "start", "step": 0, "time": when,
                   "note": "a new run started in this folder (it had no checkpoint); the records "
                           "above belong to an earlier run"})
        log_file.write(json.dumps(marker) + "\n")
    log_file.flush()
    return log_file


def append_log(log_file, record: dict) -> None:
    """One record, one line, flushed: a crash loses at most the line being written."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def read_log(path, upto_step: float = math.inf) -> list[dict]:
    """The log records of the latest run in a log.jsonl (or its run folder), steps <= upto_step.

    log.jsonl is only ever appended to. A run that starts afresh where records already are
    first writes ``{"event": "start", ...}``: the records above it belong to an earlier run.
    A resumed run writes ``{"event": "resume", "step": s, ...}``: records above it past step s
    were made by the interrupted run and are redone below it. This reads through both and
    returns what the latest run's history is (the markers themselves left out).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if not isinstance(rec, dict):
            continue
        event = rec.get("event")
        if event == "start":
            records = []
        elif event == "resume":
            records = [r for r in records if r.get("step", math.inf) <= rec.get("step", -1)]
        elif event is None:
            records.append(rec)
    return [r for r in records if r.get("step", math.inf) <= upto_step]


__all__ = ["LOG_NAME", "LOCK_NAME", "RunLockedError", "make", "lock", "unlock", "remove_stale_temp_files",
           "open_log", "append_log", "read_log"]
