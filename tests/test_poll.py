"""The shared polling loop: returns the first truthy value, raises the caller's error at the
deadline, and always tries the condition at least once."""

from __future__ import annotations

import itertools

import pytest

from shardkeeper.poll import TimedOut, poll_until


def test_returns_the_first_truthy_value():
    counter = itertools.count()
    assert poll_until(lambda: next(counter) >= 3 and "ready", 5.0, "three calls",
                      interval=0.001) == "ready"


def test_raises_the_callers_error_naming_what_it_waited_for():
    with pytest.raises(TimedOut, match=r"timed out after 0.05s waiting for the moon"):
        poll_until(lambda: None, 0.05, "the moon", interval=0.01)
    with pytest.raises(AssertionError, match="the sun"):
        poll_until(lambda: 0, 0.0, "the sun", error=AssertionError)


def test_a_zero_timeout_still_tries_once():
    assert poll_until(lambda: 7, 0.0, "anything") == 7
