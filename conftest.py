"""Test-wide settings, for tests/ and for nbval over solutions/.

Quick mode makes every lesson and example size its runs for CI (see minigen.course.budget).
It is set here, before any notebook kernel starts, so kernels inherit it.
"""
import os

os.environ.setdefault("MINIGEN_QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
