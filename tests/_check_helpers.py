"""Helpers shared by the tests of the exercise checks (tests/test_checks_lNN.py)."""

import pytest

from minigen.course.checks import CheckFailed


def stub(*args, **kwargs):
    """What an untouched exercise cell does."""
    raise NotImplementedError("Exercise N.M: stub")


def fails(check_fn, *answers_and_fragments, n_answers=1):
    """Run a check on a wrong answer (the first n_answers arguments; a check that takes
    several pieces gets several): it must raise CheckFailed whose message holds every fragment."""
    answers, fragments = answers_and_fragments[:n_answers], answers_and_fragments[n_answers:]
    with pytest.raises(CheckFailed) as info:
        check_fn(*answers)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"expected {f!r} in the message:\n{msg}"
    return msg
