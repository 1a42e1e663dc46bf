"""Never compute a prefix twice: a model's KV cache outlives its request, and the next request
reuses the longest token prefix it shares with what the cache holds.

The record of what a cache holds lives on the model (`Model.held_prefix`), in one form for the
target and the draft: a token list whose first `length` tokens fill the first `length` cache cells.
It is written only where its writer knows the cache is right (the engine after the prompt pass and
after each round's keep, a drafter after `feedback`), and every backend drops it on every cache
change (forward, keep, crop, reset). So a request that stops mid-round (an exception, Ctrl-C inside
a pass) or a cost measurement that borrows the model between requests leaves no record, and the
next request starts from an empty cache, as every request did before.

The list is the engine's own context (prompt + emitted tokens), held by reference: it only ever
grows, so its first `length` tokens stay right, and no copy is made per round. Memory stays one
sequence per model: the last request's.

Worked example (a test in tests/test_prefix_cache.py). The last request had prompt [1, 2, 3, 4] and
emitted [5, 6]; its context is [1, 2, 3, 4, 5, 6] and the target cache holds [1, 2, 3, 4, 5] (the
last emitted token is the next round's root and is never cached): length 5. The next prompt:

    [1, 2, 3, 4, 5, 6, 7, 8]  second turn:   common prefix 5 -> keep 5, prefill [6, 7, 8]
    [1, 2, 9, 9]              diverges:      common prefix 2 -> crop to 2, prefill [9, 9]
    [1, 2, 3]                 strict prefix: common prefix 3, but keep 2 -> prefill [3]
                              # Not keep 3: the prompt's last token must run, its logits give the first token
    [1, 2, 3, 4]              identical:     keep 3 -> prefill [4]
    [7, 1, 2]                 no match:      reset, prefill all three
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldPrefix:
    """What a cache holds: tokens[:length] in its first `length` cells (tokens may run longer)."""

    tokens: Sequence[int]
    length: int


def common_prefix(held: Sequence[int], held_length: int, tokens: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of held[:held_length] and tokens, at most `limit`.

    common_prefix([1, 2, 3, 4, 5, 6], 5, [1, 2, 9], 2) == 2
    common_prefix([1, 2, 3, 4, 5, 6], 5, [1, 2, 3, 4, 5, 6, 7], 6) == 5   # not 6: token 6 is not cached
    """
    end = min(held_length, len(tokens), limit)
    for index in range(end):
        if held[index] != tokens[index]:
            return index
    return max(end, 0)


def remember(model, tokens: Sequence[int], length: int) -> None:
    """Record that the model's first `length` cache cells hold tokens[:length]. Call it only where
    that is known to be true; the backend drops it at its next cache change. A model that keeps no
    record of its own is left alone: one without a `held_prefix` attribute of its own (a test double,
    or a wrapper that forwards attribute reads to a model it wraps: its own cache changes would not
    drop a record set on the wrapper)."""
    if "held_prefix" in getattr(model, "__dict__", {}) and 0 <= length <= min(len(tokens), model.cache_len):
        model.held_prefix = HeldPrefix(tokens, length)


def forget(model) -> None:
    """Drop the record, so the model's next request starts from an empty cache."""
    if getattr(model, "held_prefix", None) is not None:
        model.held_prefix = None


def reusable(model, tokens: Sequence[int]) -> int:
    """Leading tokens of `tokens` the model's cache holds by its record, leaving at least the last
    one to run (its logits are what the caller wants); 0 without a record."""
    held = getattr(model, "held_prefix", None)
    if held is None or held.length > model.cache_len:
        return 0
    return common_prefix(held.tokens, held.length, tokens, len(tokens) - 1)


def longest_elsewhere(model, others, tokens: Sequence[int], own: int):
    """(length, donor): the model among `others` (lanes sharing one cache with `model`) whose record
    holds the longest reusable prefix of `tokens` longer than `own`; (own, None) when none does."""
    best, donor = own, None
    for other in others:
        length = reusable(other, tokens) if other is not model else 0
        if length > best:
            best, donor = length, other
    return best, donor


def reuse(model, tokens: Sequence[int]) -> int:
    """Make the cache hold the reusable prefix of `tokens` and nothing else; return its length.

    Without a reusable prefix the cache is reset (not cropped to 0: after an interrupted pass a
    backend's layers may hold more than its count says, and only a reset is sure to clear them).
    A model that shares a cache with others (a llama.cpp lane: `adopt_prefix`) takes a longer prefix
    another one holds, by reference, before it would compute it again.
    """
    length = reusable(model, tokens)
    adopt = getattr(model, "adopt_prefix", None)
    if adopt is not None:
        adopted = adopt(tokens, length)
        if adopted > length:
            return adopted
    if length == 0:
        model.reset()
    else:
        model.crop(length)
    return length
