"""Tokens to streamed text: incremental detokenization and stop strings.

Streaming text per round has two traps. A multi-byte character can be split across tokens (byte-level
BPE), so a half-decoded character shows up as a trailing "\\ufffd" that must be held back until the next
token completes it. And a stop string can be split across rounds, so any suffix of the text that could
still grow into a stop string must be held back too, or we would send text the caller must never see.
`TextStream` does both, token by token, so it also knows which token completed a stop string.

The unary Generate and the streaming GenerateStream both go through `TextStream`, so the concatenated
chunks equal the unary text by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What we need of a Hugging Face tokenizer."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: object) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that never end inside a multi-byte character.

    Decodes a small window (from the previous stable point) instead of the whole output each time: the
    delta is decode(window + new) minus decode(window), emitted only when it does not end in "\\ufffd"
    (the prefix/read offsets of TGI and vLLM).
    """

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoding starts here so merges across the boundary are seen
        self._read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly stable text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as "\\ufffd"); call once, at the end."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds the first stop string in streamed text, holding back any suffix that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stops)
        self._pending = ""  # received but not yet released: could be the start of a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found).

        After a stop, the released text ends right before the stop string and nothing more may be pushed."""
        buffer = self._pending + text
        found = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if found:
            self._pending = ""
            return buffer[: min(found)], True
        hold = self._held_suffix_length(buffer)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Release what was held back (the text ended without completing a stop string)."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest


@dataclass(frozen=True)
class TextDelta:
    """Text and tokens released by one push."""

    text: str
    token_ids: list[int]  # the tokens consumed (after a stop: up to the one that completed the stop string)
    stopped: bool


class TextStream:
    """Detokenization + stop strings for one generation's output tokens."""

    def __init__(self, tokenizer: Decoder, stops: Sequence[str] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopMatcher(stops)
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        """Add one round's tokens, one at a time, stopping at the token that completes a stop string."""
        if self._stopped:
            raise RuntimeError("push after a stop string was found")
        parts: list[str] = []
        for i, token in enumerate(token_ids):
            released, stopped = self._matcher.push(self._detokenizer.push([token]))
            parts.append(released)
            if stopped:
                self._stopped = True
                return TextDelta("".join(parts), list(token_ids[: i + 1]), True)
        return TextDelta("".join(parts), list(token_ids), False)

    def finish(self) -> TextDelta:
        """The end of the output: release everything still held back (a stop string may still complete)."""
        if self._stopped:
            return TextDelta("", [], True)
        released, stopped = self._matcher.push(self._detokenizer.flush())
        self._stopped = stopped
        if not stopped:
            released += self._matcher.flush()
        return TextDelta(released, [], stopped)
