"""Prompt lookup: a draft without a model.

Find the most recent earlier occurrence of the context's last n-gram (longest n first) and propose the
tokens that followed it. The draft law is one-hot (draft_probs=None), which verify.py handles exactly.
"""

from __future__ import annotations

import torch

from duospec.budget.policy import DraftBudget
from duospec.config import SamplingConfig
from duospec.tree import TokenTree
from duospec.verify import Verdict


class LookupDrafter:
    """Copies continuations of repeated n-grams (Saxena's prompt lookup decoding)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not (1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        pass

    def propose(
        self,
        context: list[int],
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        draft = find_continuation(context, budget.max_tokens, self.max_ngram, self.min_ngram)
        return TokenTree.chain(torch.tensor([context[-1], *draft], dtype=torch.long))

    def feedback(self, verdict: Verdict) -> None:
        pass


def find_continuation(context: list[int], max_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Tokens that followed the most recent earlier match of the context's last n-gram.

    Example: context [1, 2, 3, 4, 1, 2], max_tokens 3 -> [3, 4, 1]
    (the bigram [1, 2] last occurred at index 0, followed by 3, 4, 1; not [3, 4]: a continuation may
    run into the tail itself).
    """
    if max_tokens <= 0 or len(context) < 2:
        return []
    sequence = torch.tensor(context, dtype=torch.long)
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = sequence[-n:]
        # windows[i] = sequence[i : i + n]; the last window is the tail itself, so leave it out.
        windows = sequence[:-1].unfold(0, n, 1)
        starts = torch.nonzero((windows == tail).all(dim=1)).flatten()
        if starts.numel():
            follow = int(starts[-1]) + n
            return context[follow : follow + max_tokens]
    return []
