"""The reasoning splitter and stop matcher on hand-made pieces; test_thinking runs the model."""

from __future__ import annotations

import itertools

import pytest

from vergeai.runtime.reasoning import ReasoningSplitter, close_open_think, prompt_opens_think
from vergeai.runtime.stops import StopMatcher


def split(pieces: list[str], opened: bool = False) -> tuple[str, str]:
    s = ReasoningSplitter(opened)
    out = [s.feed(p) for p in pieces] + [s.flush()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


@pytest.mark.parametrize("cut", range(1, 30))
def test_tags_split_anywhere(cut: int) -> None:
    text = "<think>weighing it</think>\n\nThe answer."
    assert split([text[:cut], text[cut:]]) == ("weighing it", "The answer.")


def test_every_character_its_own_piece() -> None:
    text = "  <think>a < b</think>\nYes <think> is text here"
    assert split(list(text)) == ("a < b", "Yes <think> is text here")


def test_no_reasoning_means_all_content() -> None:
    assert split(["Hello", " <thi", "nk> there"]) == ("", "Hello <think> there")
    assert split(["<thin"]) == ("", "<thin")
    assert split(["   "]) == ("", "   ")


def test_prompt_opened_block() -> None:
    assert split(["still thinking</th", "ink>done"], opened=True) == ("still thinking", "done")
    assert split(["cut off mid-thought"], opened=True) == ("cut off mid-thought", "")


def test_prompt_helpers() -> None:
    assert prompt_opens_think("<|Assistant|><think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")
    assert close_open_think("x<think>\n") == "x<think>\n\n</think>\n\n"
    assert close_open_think("plain") == "plain"


@pytest.mark.parametrize("cut", range(0, 12))
def test_stop_strings_across_pieces(cut: int) -> None:
    text = "one two STOP three"
    m = StopMatcher(["STOP", "never"])
    out = m.feed(text[:cut]) + m.feed(text[cut:])
    assert m.stopped and out == "one two "


def test_stop_prefix_released_when_not_a_stop() -> None:
    m = StopMatcher(["STOP"])
    pieces = [m.feed(p) for p in ["ST", "ART", " ok"]]
    assert "".join(pieces) + m.flush() == "START ok" and not m.stopped
    assert pieces[0] == ""  # held until decided


def test_earliest_stop_wins() -> None:
    for a, b in itertools.permutations(["bb", "abc"]):
        m = StopMatcher([a, b])
        assert m.feed("xxabcbb") == "xx"
