"""The course machinery: run-size budgets, exercise checks, the lessons builder, the grader.

- `budget(default, quick=None, gpu=None)` picks a size (steps, samples, widths) so the same
  notebook finishes in minutes on a laptop CPU, in seconds under test (quick mode) and
  trains longer on a GPU.
- `minigen.course.checks` holds one module of exercise checks per lesson (`l00`, `l01`, ...).
- `minigen.course.builder` turns the solved notebooks in `solutions/` into the exercise
  notebooks in `lessons/` (`minigen lessons build`).
- `minigen.course.grader` grades a folder of submitted notebooks (`minigen grade`).
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def is_quick() -> bool:
    """True when the environment variable MINIGEN_QUICK asks for tiny run sizes (tests, CI, grader)."""
    value = os.environ.get("MINIGEN_QUICK", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"MINIGEN_QUICK={os.environ['MINIGEN_QUICK']!r} is not understood; "
        "set it to 1 for quick mode or 0 (or unset it) for the normal sizes"
    )


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def budget(default, quick=None, gpu=None):
    """Pick a run size: `quick` in quick mode, `gpu` when CUDA is available, else `default`.

    Quick mode wins over the GPU so tests stay fast everywhere. A missing `quick` or `gpu`
    value falls back to `default`.

        steps = budget(2000, quick=20, gpu=10000)
    """
    if is_quick():
        return default if quick is None else quick
    if gpu is not None and _has_gpu():
        return gpu
    return default


__all__ = ["budget", "is_quick"]
