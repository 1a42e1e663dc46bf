"""Stop sequences over streamed text: cut the answer where one begins, never show part of one.

A stop sequence can arrive split across rounds ("\\n\\n" as "\\n" then "\\n"), so the tail of the text
that could still begin one is held back until the next round settles it (what vLLM and llama.cpp's
server do too).
"""

from __future__ import annotations


class StopMatcher:
    """Feed each round's text to `push`; it returns the text safe to show. `stopped` turns True at the
    first stop sequence, whose text (and everything after it) is never shown."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(stops)
        self.stopped = False
        self.shown = ""  # all text returned so far
        self.matched: str | None = None  # the stop sequence that ended the answer
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped or not text:
            return ""
        buffer = self._held + text
        hits = [(position, stop) for stop in self.stops if (position := buffer.find(stop)) >= 0]
        if hits:
            position, self.matched = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
            self.stopped = True
            self._held = ""
            return self._show(buffer[:position])
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return self._show(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """The held-back tail, once the answer has ended without completing a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.stopped else self._show(held)

    def stop_end(self) -> int:
        """Characters of the answer up to the end of the stop sequence that ended it."""
        assert self.matched is not None, "stop_end is only defined once a stop sequence matched"
        return len(self.shown) + len(self.matched)

    def _show(self, text: str) -> str:
        self.shown += text
        return text

    def _partial_stop_length(self, buffer: str) -> int:
        """The longest tail of `buffer` that is the beginning of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
