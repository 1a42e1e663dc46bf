"""A chain of draft tokens from a draft model (speculative decoding's drafter).

The draft model keeps its own KV cache. After verification it learns how many of its draft tokens were
accepted (`feedback`); before the next proposal it crops its cache to that valid prefix and feeds what
it has not seen: usually just the new root, or the last draft token plus the bonus token after a fully
accepted round (gpt-fast's catch-up step). No token is read back from the device for this.

Across requests the draft cache is kept too: `reset` does not drop it; the first catch-up of the next
request keeps the prefix the new context shares with what the cache holds (models/prefix.py), which
`feedback` records after every round.
"""

from __future__ import annotations

import torch

from duospec.budget.policy import DraftBudget
from duospec.config import SamplingConfig
from duospec.models import prefix
from duospec.models.base import Model
from duospec.sampling import sample, warp_probs
from duospec.tree import TokenTree
from duospec.verify import Verdict


class ChainDrafter:
    """Greedy (temperature 0) or sampled chains; keeps the draft law q of each sampled token."""

    def __init__(self, model: Model, target_vocab_size: int) -> None:
        self.model = model
        self.target_vocab_size = target_vocab_size
        self._valid = 0  # leading context tokens the draft cache holds correctly
        self._context_len = 0  # context length at the last proposal
        self._fed_drafts = 0  # draft tokens of the last proposal fed to the draft (all but the last)
        self._context: list[int] = []  # the engine's context at the last proposal (a live list: it only grows)
        self._reuse_pending = True  # the next catch-up first takes over the cache's recorded prefix

    def reset(self) -> None:
        """A new sequence: the draft cache stays; the first catch-up keeps what it shares with the
        new context and drops the rest (`_catch_up`)."""
        self._valid = self._context_len = self._fed_drafts = 0
        self._context = []
        self._reuse_pending = True

    def propose(
        self,
        context: list[int],
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        root = torch.tensor([context[-1]], device=self.model.device)
        self._context = context
        if self.model.max_context is not None and len(context) + budget.max_tokens > self.model.max_context:
            self._context_len, self._fed_drafts = self._valid, 0  # feedback then keeps the cache as it is
            return TokenTree.chain(root)  # the draft's own context is full: let the target go on alone
        logits = self._catch_up(context)  # [1, V]: the draft's law after the root
        tokens, draft_rows = self._draft([root], logits, budget, sampling, generator)
        self._context_len = len(context)
        self._fed_drafts = max(0, len(tokens) - 2)  # the last draft token is fed next round, if accepted
        if self.model.cache_len != self._context_len + self._fed_drafts:
            raise RuntimeError("draft cache out of step with the context: a cache bug")
        draft_probs = torch.cat(draft_rows) if draft_rows else None
        return TokenTree.chain(torch.cat(tokens), draft_probs)

    def _draft(
        self,
        tokens: list[torch.Tensor],
        logits: torch.Tensor | None,
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        confidence: float = 1.0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Extend the chain `tokens` while the budget allows; return it and the law of each new token.

        tokens: root first, each [1] int64; the draft cache holds every one of them but the last.
        logits: [1, V] the draft's logits after tokens[-1] when the cache already holds it too, else None
            (then tokens[-1] is fed only if another token is wanted, so a stopped chain costs no pass).
        confidence: the draft's estimate that tokens[1:] are all accepted (what the budget's floors read).
        Returns (tokens, draft_rows): draft_rows holds the warped law [1, V] of each new token when
        sampling, nothing when greedy (a greedy draft is one-hot).
        """
        tokens = list(tokens)
        draft_rows: list[torch.Tensor] = []
        while budget.allows(len(tokens) - 1, confidence):
            if logits is None:  # feed the previous draft token only now that another one is wanted
                logits = self.model.forward(tokens[-1], last_only=True)
            logits = fit_vocab(logits, self.target_vocab_size)
            token, probs = choose_draft_token(logits, sampling, generator)
            # Only a budget with confidence floors reads the confidence, and not after its last token.
            chosen = None
            if budget.confidence_floors and len(tokens) < budget.max_tokens:
                # Greedy: the top probability, exp(max - logsumexp), without materialising a softmax.
                chosen = torch.exp(logits[0, token] - torch.logsumexp(logits, -1)) if probs is None else probs[0, token[0]]
            if probs is not None:
                draft_rows.append(probs)
            tokens.append(token)
            logits = None
            if chosen is not None:
                confidence *= float(chosen)  # a host sync, but the loop must decide whether to go on
        return tokens, draft_rows

    def feedback(self, verdict: Verdict) -> None:
        """The draft cache stays valid up to the root and the accepted drafts it was fed."""
        self._valid = self._context_len + min(verdict.n_accepted, self._fed_drafts)
        self._remember()

    def _remember(self) -> None:
        """Record the valid prefix for a later request (models/prefix.py). The engine has extended its
        context by the accepted tokens before feedback, so context[:_valid] is what the cache holds;
        cells past it (rejected drafts) are cropped by whoever reuses the record."""
        if not self._reuse_pending:  # the cache is this request's (else it still holds an earlier one's, untouched)
            prefix.remember(self.model, self._context, self._valid)

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Crop the draft cache to its valid prefix, feed the context's rest, return the last logits.

        Usually the rest is the new root alone; after a fully accepted round it is the last draft token
        plus the bonus token (gpt-fast's catch-up step); on a request's first round it is the prompt
        past the prefix it shares with the last request's (all of it when none is shared).
        """
        if self._reuse_pending:
            self._valid = prefix.reuse(self.model, context)
            self._reuse_pending = False
        valid = min(self._valid, len(context) - 1)  # always feed at least the root
        if valid < self.model.cache_len:
            self.model.crop(valid)
        pending = torch.tensor(context[valid:], device=self.model.device)
        return self.model.forward(pending, last_only=True)


def fit_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Match the target's logit width: drop ids the target cannot emit, or pad with -inf (a draft's
    vocabulary may be padded to another size than the target's)."""
    have = logits.shape[-1]
    if have == width:
        return logits
    if have > width:
        return logits[..., :width]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], width - have), float("-inf"))], dim=-1)


def choose_draft_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chain's next draft token after `logits` [1, V] (fitted to the target's vocabulary): the
    argmax when greedy, else a draw from the warped law, returned with that law [1, V] (the q row
    rejection sampling needs; None when greedy, whose law is one-hot). Every model chain is drafted
    by this rule, in this process and in duo's draft process (engines/draft_process.py), so the two
    cannot drift apart in what q is. Returns ([1] int64, [1, V] or None)."""
    if sampling.is_greedy:
        return logits.argmax(-1), None
    probs = warp_probs(logits, sampling)
    return sample(probs, generator), probs
