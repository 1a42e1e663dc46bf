"""A chain of draft tokens from a draft model (speculative decoding's drafter).

The draft model keeps its own KV cache. Before each proposal it crops that cache to the longest prefix
that still agrees with the context and feeds what it has not seen: usually just the new root, or the
last draft token plus the bonus token after a fully accepted round (gpt-fast's catch-up step).
"""

from __future__ import annotations

import torch

from duospec.budget import DraftBudget
from duospec.config import SamplingConfig
from duospec.models.base import Model
from duospec.sampling import sample, warp_probs
from duospec.tree import TokenTree
from duospec.verify import Verdict


class ChainDrafter:
    """Greedy (temperature 0) or sampled chains; keeps the draft law q of each sampled token."""

    def __init__(self, model: Model, target_vocab_size: int) -> None:
        self.model = model
        self.target_vocab_size = target_vocab_size
        self._cached: list[int] = []  # tokens in the draft model's cache, confirmed on the host
        self._unconfirmed: torch.Tensor | None = None  # draft tokens fed last round, read lazily

    def reset(self) -> None:
        self.model.reset()
        self._cached = []
        self._unconfirmed = None

    def propose(
        self,
        context: list[int],
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        logits = self._catch_up(context)  # [1, V]: the draft's law after the root
        tokens: list[torch.Tensor] = [torch.tensor([context[-1]], device=self.model.device)]
        draft_rows: list[torch.Tensor] = []
        confidence = 1.0  # the draft's own estimate that every token drafted so far is accepted
        while budget.allows(len(tokens) - 1, confidence):
            if len(tokens) > 1:  # feed the previous draft token only now that another one is wanted
                logits = self.model.forward(tokens[-1], last_only=True)
            logits = self._fit_vocab(logits)
            if sampling.is_greedy:
                token = logits.argmax(-1)  # [1]
                chosen = torch.softmax(logits, -1).amax() if budget.confidence_floors else None
            else:
                probs = warp_probs(logits, sampling)  # [1, V]
                token = sample(probs, generator)
                draft_rows.append(probs)
                chosen = probs[0, token[0]] if budget.confidence_floors else None
            tokens.append(token)
            if chosen is not None:
                confidence *= float(chosen)  # a host sync, but the loop must decide whether to go on
        fed = tokens[1:-1]  # the last draft token is fed next round, if it is accepted
        self._unconfirmed = torch.cat(fed) if fed else None
        draft_probs = torch.cat(draft_rows) if draft_rows else None
        return TokenTree.chain(torch.cat(tokens), draft_probs)

    def feedback(self, verdict: Verdict) -> None:
        pass  # the next `propose` compares its cache with the context, which covers every outcome

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Crop the draft cache to what still matches `context`, feed the rest, return last logits."""
        # Tokens cached before the last proposal came from the context, which only grows by appending,
        # so they still agree; only last round's draft tokens can disagree with it now.
        valid = len(self._cached)
        if self._unconfirmed is not None:
            self._cached.extend(self._unconfirmed.tolist())
            self._unconfirmed = None
        limit = min(len(self._cached), len(context) - 1)  # always feed at least the root
        while valid < limit and self._cached[valid] == context[valid]:
            valid += 1
        valid = min(valid, limit)
        if valid < self.model.cache_len:
            self.model.crop(valid)
        del self._cached[valid:]
        pending = context[valid:]
        self._cached.extend(pending)
        return self.model.forward(torch.tensor(pending, device=self.model.device), last_only=True)

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Match the target's logit width: drop ids the target cannot emit, or pad with -inf."""
        width = logits.shape[-1]
        if width == self.target_vocab_size:
            return logits
        if width > self.target_vocab_size:
            return logits[..., : self.target_vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.target_vocab_size - width), float("-inf"))
        return torch.cat([logits, pad], dim=-1)
