"""Incremental detokenization (never ends inside a multi-byte character) and stop strings."""

from __future__ import annotations

import pytest

from orchestrator.text import IncrementalDetokenizer, StopMatcher, TextStream


class ByteTokenizer:
    """Each token id is a fixed byte string; decoding joins them and replaces invalid UTF-8 with U+FFFD."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True, **_: object) -> str:
        return b"".join(self.pieces[t] for t in token_ids).decode("utf-8", errors="replace")


EMOJI = "😀".encode()  # 4 bytes
BYTES = ByteTokenizer(
    {
        0: b"Hello",
        1: b" w",
        2: EMOJI[:2],
        3: EMOJI[2:],
        4: b"orld",
        5: b"\n",
        6: b"EN",
        7: b"D",
        8: "é".encode()[:1],
        9: "é".encode()[1:],
        10: b"",  # a special token that decodes to nothing
    }
)


def stream_all(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push([t]) for t in ids]


def test_detokenizer_holds_back_a_split_character():
    deltas = stream_all(IncrementalDetokenizer(BYTES), [0, 1, 2, 3, 4])
    assert deltas == ["Hello", " w", "", "😀", "orld"]
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_flush_releases_an_incomplete_tail():
    detok = IncrementalDetokenizer(BYTES)
    assert stream_all(detok, [0, 2]) == ["Hello", ""]
    assert detok.flush() == "\ufffd"


def test_detokenizer_skips_empty_tokens():
    detok = IncrementalDetokenizer(BYTES)
    assert stream_all(detok, [0, 10, 1]) == ["Hello", "", " w"]
    assert detok.flush() == ""


def test_detokenizer_with_the_real_tokenizer():
    from specdec.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    text = "héllo 😀 wörld 中文, naïve café ✓"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream_all(detok, ids) + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any(d.endswith("\ufffd") for d in deltas)
    assert "" in deltas  # the emoji is split across tokens: one push released nothing


def test_stop_matcher_across_pushes():
    matcher = StopMatcher(["END"])
    assert matcher.push("abc E") == ("abc ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("Dxyz") == ("", True)


def test_stop_matcher_releases_a_false_start():
    matcher = StopMatcher(["END"])
    assert matcher.push("xE") == ("x", False)
    assert matcher.push("Nd") == ("ENd", False)
    assert matcher.flush() == ""


def test_stop_matcher_flush_releases_the_held_suffix():
    matcher = StopMatcher(["END"])
    assert matcher.push("the EN") == ("the ", False)
    assert matcher.flush() == "EN"


def test_stop_matcher_earliest_of_several():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)


def test_stop_matcher_longest_possible_prefix_is_held():
    matcher = StopMatcher(["ab", "abcd"])
    assert matcher.push("xabc") == ("x", True)  # "ab" completes first
    matcher = StopMatcher(["abcd", "bce"])
    assert matcher.push("xabc") == ("x", False)  # "abc" could still become "abcd"
    assert matcher.push("e") == ("a", True)  # ... but "bce" completed


def test_stop_matcher_stop_at_the_very_start():
    assert StopMatcher(["\n"]).push("\nrest") == ("", True)


def test_stop_matcher_refuses_empty_stop_strings():
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_text_stream_cuts_tokens_at_the_stop():
    stream = TextStream(BYTES, ["END"])
    first = stream.push([0, 5])
    assert (first.text, first.token_ids, first.stopped) == ("Hello\n", [0, 5], False)  # "\n" cannot start "END"
    second = stream.push([6, 7, 0, 1])
    assert (second.text, second.token_ids, second.stopped) == ("", [6, 7], True)  # up to the completing token
    assert stream.finish().text == ""
    with pytest.raises(RuntimeError):
        stream.push([0])


def test_text_stream_without_stops_is_the_whole_text():
    stream = TextStream(BYTES)
    parts = [stream.push(chunk).text for chunk in ([0, 1, 2], [3, 4], [8])]
    parts.append(stream.finish().text)
    assert parts == ["Hello w", "😀orld", "", "\ufffd"]


def test_text_stream_stop_with_a_multibyte_character():
    stream = TextStream(BYTES, ["é"])
    assert stream.push([0, 8]).text == "Hello"
    delta = stream.push([9, 0])
    assert (delta.text, delta.token_ids, delta.stopped) == ("", [9], True)


def test_text_stream_finish_releases_held_text():
    stream = TextStream(BYTES, ["ENDX"])
    assert stream.push([0, 6, 7]).text == "Hello"
    tail = stream.finish()
    assert (tail.text, tail.stopped) == ("END", False)
