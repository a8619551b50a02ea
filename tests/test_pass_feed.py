"""`rayalign.generator_pool.PassFeed`: a host's pass sampled in order on its own thread, run ahead bounded.

No Ray: the feed is plain threads; the sampler is a function that records what it was asked and when.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from rayalign.generator_pool import PassFeed


def _blocks(count: int) -> list[tuple[int, pd.DataFrame]]:
    return [(k, pd.DataFrame({"prompt_id": [2 * k, 2 * k + 1]})) for k in range(count)]


class _Recorder:
    """A sampler that logs the blocks it sampled; `fail_at` raises on that block's first prompt id."""

    def __init__(self, fail_at: int | None = None):
        self.sampled: list[int] = []
        self.fail_at = fail_at

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        first = int(block["prompt_id"].iloc[0])
        if first == self.fail_at:
            raise ValueError(f"bad block at prompt {first}")
        self.sampled.append(first)
        return block.assign(text=[f"sample {i}" for i in block["prompt_id"]])


def _settle(feed: PassFeed, count: int, timeout: float = 5.0) -> None:
    """Wait until the feed has sampled `count` blocks (it must not sample more: the caller checks)."""
    deadline = time.monotonic() + timeout
    while len(feed.sample.sampled) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a feed that ignored its bound would run on in this time


def test_blocks_come_back_in_order_with_their_rows():
    feed = PassFeed("p", _blocks(5), ahead=2, sample=_Recorder())
    taken = [feed.take(k) for k in range(5)]
    assert [list(t["prompt_id"]) for t in taken] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert list(taken[3]["text"]) == ["sample 6", "sample 7"]
    feed.thread.join(timeout=5)
    assert not feed.thread.is_alive() and feed.done == {}  # nothing kept once handed over


def test_the_host_runs_ahead_by_at_most_ahead_blocks():
    feed = PassFeed("p", _blocks(6), ahead=2, sample=_Recorder())
    _settle(feed, 2)
    assert feed.sample.sampled == [0, 2]  # two blocks ready before anyone asked; the third waits
    feed.take(0)
    _settle(feed, 3)
    assert feed.sample.sampled == [0, 2, 4]
    for k in range(1, 6):
        feed.take(k)
    assert feed.sample.sampled == [0, 2, 4, 6, 8, 10]


def test_a_failed_block_raises_in_its_take_and_every_later_one_while_earlier_blocks_are_delivered():
    feed = PassFeed("p", _blocks(4), ahead=4, sample=_Recorder(fail_at=4))
    assert list(feed.take(0)["prompt_id"]) == [0, 1]
    assert list(feed.take(1)["prompt_id"]) == [2, 3]
    for k in (2, 3):
        with pytest.raises(ValueError, match="bad block at prompt 4"):
            feed.take(k)
    assert feed.sample.sampled == [0, 2]  # the thread stopped at the failure


def test_cancel_stops_the_thread_and_wakes_a_waiting_take():
    feed = PassFeed("p", _blocks(6), ahead=1, sample=_Recorder())
    _settle(feed, 1)
    errors: list[BaseException] = []

    def wait_for_block_3():
        try:
            feed.take(3)  # never sampled: the feed waits for block 0 to be taken first
        except RuntimeError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_block_3)
    waiter.start()
    time.sleep(0.05)
    feed.cancel()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and not feed.thread.is_alive()
    assert "cancelled before block 3" in str(errors[0])
    assert feed.sample.sampled == [0]


def test_a_block_given_to_another_host_is_refused_at_once():
    feed = PassFeed("p", [(0, _blocks(1)[0][1]), (2, _blocks(3)[2][1])], ahead=2, sample=_Recorder())
    with pytest.raises(KeyError, match="block 1 is not one of pass p's blocks"):
        feed.take(1)
    assert list(feed.take(2)["prompt_id"]) == [4, 5]


def test_a_block_taken_twice_raises_instead_of_waiting_forever():
    """Ray retries a take whose worker died after the host handed the rows over: the retry must fail the pass,
    not wait for rows that are gone."""
    feed = PassFeed("p", _blocks(2), ahead=2, sample=_Recorder())
    assert list(feed.take(0)["prompt_id"]) == [0, 1]
    with pytest.raises(RuntimeError, match="block 0 of pass p was handed over already"):
        feed.take(0)
    assert list(feed.take(1)["prompt_id"]) == [2, 3]  # the rest of the pass is unaffected
