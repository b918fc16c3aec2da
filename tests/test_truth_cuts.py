"""The cross-check's arithmetic (truth.unaccounted), no kernel needed.

A non-exact cut pairs ftrace's count from before the settle pause with ours
from after it, so under load it comes out below zero by the events of the
pause: measured, that was every "ftrace is N short" warning ever seen. Such
a bound says nothing and must read 0; an exact cut keeps its sign (a real
ftrace shortfall is reported, never hidden), and a real loss stays counted.
"""

from __future__ import annotations

from tcpstates.plugins.kernel.truth import Cut, unaccounted

START = Cut(truth_lo=0, truth_hi=0, seen_lo=6, seen_hi=6, ftrace_lost=0)


def test_pause_slack_of_a_busy_cut_is_not_a_shortfall() -> None:
    # figures of a logged run: 580 of ours and 572 of ftrace's arrived in the pause
    end = Cut(truth_lo=68616, truth_hi=69188, seen_lo=68622, seen_hi=69202, ftrace_lost=0,
              quiet=False)
    assert unaccounted(START, end) == (0, False)


def test_a_loss_still_counts_in_a_busy_cut() -> None:
    end = Cut(truth_lo=70000, truth_hi=70100, seen_lo=69000, seen_hi=69090, ftrace_lost=0,
              quiet=False)
    assert unaccounted(START, end) == (70000 - (69090 - 6), False)


def test_exact_cuts_keep_a_shortfall_visible() -> None:
    end = Cut(truth_lo=1000, truth_hi=1000, seen_lo=1010, seen_hi=1010, ftrace_lost=0)
    assert unaccounted(START, end) == (-4, True)
    ok = Cut(truth_lo=1000, truth_hi=1000, seen_lo=1006, seen_hi=1006, ftrace_lost=0)
    assert unaccounted(START, ok) == (0, True)
