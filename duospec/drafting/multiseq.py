"""DuoDecoding's dynamic multi-sequence drafting (Lv et al. 2025, DESIGN.md 1.3).

When the draft is unsure of the first token, one chain wastes the whole round on a single guess. The
published rule drafts several sequences with different first tokens instead: with lq1 the draft's
log-probabilities at the first position and lq2_top the log-probability of the top-1 token at the
second position (after the top-1 first token), theta = max(lq1) + lq2_top, and every next-ranked
first token whose log-probability exceeds theta starts a sequence of its own (at most 8 in all). In
words: a runner-up first token gets a sequence when it is more likely than the top-1 chain's first two
tokens together. The draft budget is split among the sequences; the original verifies them one after
another, we verify them as one tree in a single target pass.

Exactness: a tree is verified by target-sample matching (every emitted token is a target sample), so
any tree is exact. A single sequence is a chain verified by rejection sampling with its draft law q,
which is exact only if its first token really was drawn from q. So whether to branch must not depend
on the sampled first token: `branch_first_tokens` counts the sequences from the top-1 (see there).

The building blocks are pure (`branch_first_tokens`, `split_budget`, `tree_from_sequences`), so an
engine in this process or a draft worker process can call them with any `Model`; `MultiSequenceDrafter`
puts them together for an in-process draft model on top of `ChainDrafter`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from duospec.budget.policy import DraftBudget
from duospec.config import SamplingConfig
from duospec.drafting.chain import ChainDrafter, choose_draft_token, fit_vocab
from duospec.models.base import Model
from duospec.sampling import warp_probs
from duospec.tree import TokenTree
from duospec.verify import Verdict

MAX_SEQUENCES = 8  # the paper's cap on sequences per round, the main one included


def draft_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The draft's log-probabilities that the branching rule compares. logits: [..., V] -> [..., V] float32.

    Greedy: the raw log_softmax (the warped greedy law is one-hot and would carry no ranking).
    Sampling: the log of the law tokens are drawn from, warped exactly like the target's (temperature,
    top-k, top-p); tokens the warping removes get -inf and can never start a sequence.
    """
    if sampling.is_greedy:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.log(warp_probs(logits, sampling))


def branch_first_tokens(
    first_logprobs: torch.Tensor,
    second_top_logprob: float | torch.Tensor,
    main_token: int | torch.Tensor,
    max_sequences: int = MAX_SEQUENCES,
) -> list[int]:
    """The first tokens of this round's sequences, main_token first.

    first_logprobs: [V] the draft's log-probabilities at the first position (`draft_logprobs`).
    second_top_logprob: the top-1 log-probability at the second position after feeding the *top-1*
        first token, argmax(first_logprobs) (a float or a 0-d tensor; a tensor saves a host sync).
    main_token: the main sequence's first token (an int, or a [1] / 0-d int64 tensor).

    theta = max(first_logprobs) + second_top_logprob, the paper's threshold. The number of sequences
    is k = max(1, #{tokens with log-prob > theta}), capped at max_sequences: under greedy that is the
    top-1 plus every next-ranked token above theta, exactly the paper's rule. The first tokens are
    main_token and then the k - 1 highest-ranked other tokens.

    Under sampling the main token is the *sampled* one, but theta and k still come from the top-1,
    never from the sampled token: when k == 1 the drafter returns a chain whose first draft_probs row
    says "drawn from q", and that is only true if the decision to return a chain did not look at the
    draw. (Putting the main token's own log-prob in theta's place would branch more often after an
    unlikely draw, so the chains that remain would be biased towards likely first tokens, and
    rejection sampling would no longer be exact; tests/test_multiseq.py shows the law drifting.)
    If the sampled token is not among the top k, it takes the place of the lowest-ranked one above
    theta, so every extra first token still has a log-prob above theta.

    Ties are ranked as torch.topk ranks them; which of two tied tokens starts a sequence does not
    touch exactness. main_token is never repeated. One host sync.

    Example: first-position probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 on tokens 4, 2, 0, 5, 1,
    3 and a top-1 probability of 0.5 at the second position: theta = log(0.40 * 0.5) = log(0.20), so
    tokens 4 (0.40) and 2 (0.25) start sequences, k = 2:

        greedy, main 4:   [4, 2]   # not [4, 2, 0]: 0.15 < 0.20
        sampled, main 0:  [0, 4]   # not [0, 4, 2]: k does not depend on the draw
    """
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    ranked_logprobs, ranked = torch.topk(first_logprobs, min(max_sequences, first_logprobs.shape[-1]))  # [m] each
    theta = ranked_logprobs[0] + second_top_logprob
    n_above = (ranked_logprobs > theta).sum()
    main = torch.as_tensor(main_token, dtype=torch.long, device=ranked.device).view(1)
    values = torch.cat([main, n_above.view(1), ranked]).tolist()  # the one host sync
    main_id, n_above_, ranked_ids = values[0], values[1], values[2:]
    k = min(max_sequences, max(1, n_above_))
    extras = [token for token in ranked_ids if token != main_id][: k - 1]
    return [main_id, *extras]


def split_budget(total: int, sequences: int) -> list[int]:
    """Draft tokens for each sequence, main first: the main one gets the most, each at least one.

    The sum is `total` when total >= sequences; with fewer tokens than sequences only `total`
    sequences of one token fit (so len(result) == min(total, sequences)).

    Each extra sequence gets half an even share, max(1, total // (2 * k)), and the main sequence the
    rest. Why: an extra sequence is insurance for the first token. It is reached only when the target
    rejects the main first token, so its first token is worth a node (theta says it is likelier than
    the main chain's first two tokens), but each later token is worth less than the main chain's token
    at the same depth, which is reached far more often. Half a share keeps a short continuation for
    the case where the insurance pays, and leaves the main chain more than half the budget.

    Example: split_budget(8, 3) == [6, 1, 1]   # not [3, 3, 2]: the extras only insure the first token
             split_budget(16, 2) == [12, 4];  split_budget(3, 5) == [1, 1, 1]
    """
    if sequences < 1 or total < 0:
        raise ValueError(f"need sequences >= 1 and total >= 0, got total={total}, sequences={sequences}")
    k = min(sequences, total)
    if k == 0:
        return []
    if k == 1:
        return [total]
    extra = max(1, total // (2 * k))
    return [total - (k - 1) * extra] + [extra] * (k - 1)


def tree_from_sequences(
    root: int | torch.Tensor,
    sequences: Sequence[Sequence[int] | torch.Tensor],
    device: torch.device | str | None = None,
) -> TokenTree:
    """One TokenTree holding every sequence: each starts under the root and goes on as a chain.

    root: the last emitted token. sequences: main first; each a non-empty list of ints or [n] int64
    tensor; their first tokens must be distinct (siblings under the root). Nodes are numbered main
    sequence first (nodes 1 .. len(main)), then each other sequence in order. One sequence gives a
    chain (`TokenTree.chain`). No draft_probs: a tree is verified by target-sample matching, which is
    exact without q.

    Example: root 7, sequences [[3, 5], [9], [4, 6]] -> tokens [7, 3, 5, 9, 4, 6],
             parents (-1, 0, 1, 0, 0, 4)   # not (-1, 0, 1, 2, 3, 4): the sequences are siblings, not one chain
             depths (0, 1, 2, 1, 1, 2)
    """
    parts = [torch.as_tensor(part, dtype=torch.long, device=device).view(-1) for part in (root, *sequences)]
    if parts[0].shape[0] != 1:
        raise ValueError("the root is one token")
    if any(part.shape[0] == 0 for part in parts[1:]):
        raise ValueError("every sequence needs at least one token")
    tokens = torch.cat(parts)  # [n]
    if len(sequences) <= 1:
        return TokenTree.chain(tokens)
    parents = [-1]
    for part in parts[1:]:
        first = len(parents)
        parents.append(0)  # each sequence starts under the root
        parents.extend(range(first, first + part.shape[0] - 1))  # and goes on as a chain
    return TokenTree(tokens=tokens, parents=tuple(parents))


class MultiSequenceDrafter(ChainDrafter):
    """DuoDecoding's drafter for an in-process draft model: a chain when the draft is sure of the first
    token, else up to `max_sequences` sequences with different first tokens, as one tree.

    Each round: catch the draft cache up (ChainDrafter's catch-up) and read the first position; choose
    the main first token as ChainDrafter would (argmax, or a sample of the warped law); feed the top-1
    first token for the second position's top-1 log-prob; count the sequences (`branch_first_tokens`).
    With one sequence the main chain goes on exactly as ChainDrafter's, with draft_probs when sampling,
    so rejection sampling applies. With k > 1 the budget is split (`split_budget`): the main sequence
    is drafted to its share, then for each other sequence the draft cache is cropped back to the root
    and that sequence drafted to its share (greedy or sampled like the main one).

    Cache policy: after a multi-sequence round the draft cache is cropped to the committed context
    (through the root), and `feedback` keeps it there, so the next `propose` catches up the accepted
    tokens and the new root in one forward pass of n_accepted + 1 tokens (ChainDrafter feeds one or
    two). That is one wider pass, never an extra one; on a CPU a pass over a few tokens costs about as
    much as over one. Keeping the main sequence's cache instead would mean drafting it last and
    feeding its first token twice. After a single-sequence round the cache is ChainDrafter's, except
    that `feedback` crops the rejected entries at once instead of at the next catch-up.

    Costs beyond ChainDrafter: the pass over the top-1 first token that gives the second position is
    the pass ChainDrafter runs for its second token anyway, and is reused, except when the main chain
    stops after one token (a main share of 1, or a budget floor): then it is one pass spent on theta
    alone. Under sampling, when the sampled main token is not the top-1, the main token costs one more
    pass (and the top-1's own sequence, if it has a continuation, feeds it again). Two or three host
    syncs per round read the branching. Budgets of at most one token skip the branching (a single
    sequence is all that fits) and are ChainDrafter's rounds, the first round included.
    """

    def __init__(self, model: Model, target_vocab_size: int, max_sequences: int = MAX_SEQUENCES) -> None:
        if not isinstance(max_sequences, int) or max_sequences < 1:
            raise ValueError(f"max_sequences must be an integer >= 1, got {max_sequences!r}")
        super().__init__(model, target_vocab_size)
        self.max_sequences = max_sequences

    def propose(
        self,
        context: list[int],
        budget: DraftBudget,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        most = min(self.max_sequences, budget.max_tokens)  # every sequence holds at least one token
        context_full = self.model.max_context is not None and len(context) + budget.max_tokens > self.model.max_context
        if most <= 1 or context_full:
            return super().propose(context, budget, sampling, generator)  # one chain, or nothing, as ChainDrafter
        device = self.model.device
        root = torch.tensor([context[-1]], device=device)
        self._context = context
        first_logits = fit_vocab(self._catch_up(context), self.target_vocab_size)  # [1, V]: the draft's law after the root
        main, probs = choose_draft_token(first_logits, sampling, generator)  # [1]: the token ChainDrafter would take
        if probs is None:  # greedy
            first_logprobs = draft_logprobs(first_logits, sampling)[0]  # [V]
            top = main
            first_rows: list[torch.Tensor] = []
        else:
            first_logprobs = torch.log(probs[0])  # [V], = draft_logprobs without warping twice
            top = probs.argmax(-1)  # [1]
            first_rows = [probs]
        second_logits: torch.Tensor | None = fit_vocab(self.model.forward(top, last_only=True), self.target_vocab_size)  # [1, V]
        second_top = draft_logprobs(second_logits, sampling).amax()  # []: theta stays on the device
        first_tokens = branch_first_tokens(first_logprobs, second_top, main[0], most)
        if not sampling.is_greedy and first_tokens[0] != int(top[0]):
            self.model.crop(len(context))  # the cache holds the top-1, not the sampled main token
            second_logits = None  # fed by `_draft` if the main sequence goes on
        confidences = self._confidences(first_logprobs, first_tokens, budget)
        if len(first_tokens) == 1:
            tokens, rows = self._draft([root, main], second_logits, budget, sampling, generator, confidences[0])
            self._settle(len(context), fed_drafts=len(tokens) - 2)
            draft_probs = None if sampling.is_greedy else torch.cat(first_rows + rows)
            return TokenTree.chain(torch.cat(tokens), draft_probs)
        sequences = []
        for index, (token, share) in enumerate(zip(first_tokens, split_budget(budget.max_tokens, len(first_tokens)))):
            if index == 0:
                start, logits = main, second_logits
            else:
                self.model.crop(len(context))  # back to the root: this sequence branches there
                start, logits = torch.tensor([token], device=device), None
            tokens, _ = self._draft([root, start], logits, budget.capped(share), sampling, generator, confidences[index])
            sequences.append(torch.cat(tokens[1:]))
        self.model.crop(len(context))  # the cache policy (class docstring): keep the committed context only
        self._settle(len(context), fed_drafts=0)
        return tree_from_sequences(root, sequences, device)

    def feedback(self, verdict: Verdict) -> None:
        """As ChainDrafter's, and the rejected entries leave the cache now rather than at the next
        catch-up (which would crop them anyway): after feedback the cache holds exactly its valid
        prefix, a state a draft worker can report and a test can check."""
        super().feedback(verdict)
        if self.model.cache_len > self._valid:
            self.model.crop(self._valid)
            self._remember()  # the crop dropped the record feedback made (models/prefix.py)

    def _confidences(self, first_logprobs: torch.Tensor, first_tokens: list[int], budget: DraftBudget) -> list[float]:
        """The draft's probability of each first token, which the budget's confidence floors read as
        the start of each sequence's running confidence; 1.0 (no host sync) for a budget without floors."""
        if not budget.confidence_floors:
            return [1.0] * len(first_tokens)
        index = torch.tensor(first_tokens, device=first_logprobs.device)
        return first_logprobs[index].exp().tolist()

    def _settle(self, context_len: int, fed_drafts: int) -> None:
        """Leave the cache holding the context and the first `fed_drafts` draft tokens of the main
        sequence (what `feedback` may keep), dropping a main token fed for a chain that then stopped."""
        if self.model.cache_len > context_len + fed_drafts:
            self.model.crop(context_len + fed_drafts)
        self._context_len, self._fed_drafts = context_len, fed_drafts
        if self.model.cache_len != context_len + fed_drafts:
            raise RuntimeError("draft cache out of step with the context: a cache bug")
