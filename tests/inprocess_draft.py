"""Duo's draft process served in this process, for tests that drive the real Duo engine deterministically.

`InProcessDraft` answers DraftProcess's protocol (begin, commit, take, park) with the child's own state
machine, SpeculativeChain, the way the child's `_serve` loop does (`SpeculativeChain.ready` is the code
both share). After each take it drafts `ahead(round)` more tokens, standing in for the drafting the
child does while the target verifies, so `commit` really keeps a chain past a guess or rolls it back.
The pipe, shared memory and process handling are tested in test_duo.py.
"""

from __future__ import annotations

from typing import Callable

import torch

from duospec.engines.draft_process import MAX_CHAIN, ChainReply, SpeculativeChain


class InProcessDraft:
    def __init__(self, model, vocab_size: int, ahead: Callable[[int], int], chain_class: type = SpeculativeChain) -> None:
        self.state = chain_class(model, vocab_size)
        self.max_context = model.max_context
        self.ahead = ahead
        self.rounds = 0

    def begin(self, prompt, sampling, seed, reuse: bool = True) -> None:
        self.state.begin(list(prompt), sampling, seed, reuse)
        self.rounds = 0

    def commit(self, tokens) -> None:
        self.state.commit(list(tokens))

    def take(self, min_tokens: int, max_tokens: int, sampled: bool, max_sequences: int = 1) -> ChainReply:
        state = self.state
        max_tokens = max(0, min(max_tokens, MAX_CHAIN))
        count = state.ready(max(0, min(min_tokens, max_tokens)), max_tokens)
        rows = torch.stack(state.rows[:count]).float() if sampled and count else None
        alternatives, probs = state.alternatives(max_sequences) if count else ([], [])
        reply = ChainReply(list(state.chain[:count]), rows, list(state.confidences[:count]), alternatives, probs)
        for _ in range(self.ahead(self.rounds)):
            if state.can_draft:
                state.step()
        self.rounds += 1
        return reply

    def park(self) -> None:
        pass
