"""Exercise checks, one module per lesson: `from minigen.course.checks import l00 as check`.

The shared helpers (CheckFailed, Exercise, seeded) live in `_framework`.
"""

from minigen.course.checks._framework import CheckFailed, Exercise, seeded

__all__ = ["CheckFailed", "Exercise", "seeded"]
