"""Suffix decoding (Oliaro et al., NeurIPS 2025; vLLM's `suffix`): a draft tree that costs no model.

Text repeats: a coding assistant's second answer rewrites its first, a chat client resends the
history, an agent loops over the same tool output. Each round we find the longest suffix of the
context (at most MAX_MATCH tokens) that occurred before, either in this request (prompt and answer
so far) or in earlier requests of this process (`SuffixHistory`, bounded, oldest evicted), and
propose a *tree* of what followed those occurrences, most frequent continuations first.

    history: "a b c d"  and  "a b c e"        context: "x a b c"
    longest match: "a b c" (3 tokens), followed by d once and e once
    tree: root -> d (score 1/2), root -> e (score 1/2)

A node's score is the share of the matched occurrences that continue along its path (the product of
count(child) / count(parent) along it); with how long copies stay right here (learned per round) it
is the drafter's estimate that the target accepts the node. The
tree grows best-first (highest score next), at most `MAX_SPEC_FACTOR` x the match length nodes (a
long match earns a long speculation; no match drafts nothing), and the policy cuts it where one more
node stops paying for its place in the target pass (`SuffixPolicy`, from the measured cost curve).

Exact at every temperature: the draft law is one-hot (a lookup, no sampling), the tree carries its
scores as `log_probs`, and the engine verifies it by target-sample matching (verify.walk).

Written here in numpy rather than taken from Snowflake's arctic-inference (whose C++
`SuffixDecodingCache` the SuffixDecoding authors ship): its PyPI release (0.3.0) is an sdist whose
setup.py also builds its custom GPU kernels, which cannot finish on a CPU-only machine. Matching
scans the stored tokens with vectorised comparisons (one pass over the history per round, about
0.25 ms per million tokens here) instead of keeping a suffix tree, which keeps memory at 4 bytes per
stored token.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from duospec.budget.model import DRAFT_MARGIN, CostProfile
from duospec.budget.policy import DraftBudget
from duospec.config import DuospecError, SamplingConfig
from duospec.tree import TokenTree
from duospec.verify import Verdict

SEPARATOR = -1  # between stored sequences: no token id, so no match runs across two of them
MAX_MATCH = 32  # longest context suffix matched (vLLM's max tree depth is 24; longer adds nothing here)
MAX_OCCURRENCES = 64  # most recent occurrences of the match counted per source (older ones are alike)
MAX_SPEC_FACTOR = 2.0  # at most this many draft nodes per matched token (vLLM: max_spec_factor)
MIN_SCORE = 0.05  # nodes less likely than this are never proposed (vLLM: min_token_prob 0.1)
MAX_NODES = 64  # a tree's node cap whatever the match (the cost curve cuts earlier on CPUs)
DEFAULT_HISTORY_TOKENS = 1_000_000  # 4 MB of int32; about 1 ms per round to scan on a CPU
# What suffix decoding drafts from besides the request itself: earlier requests ("shared") or nothing.
SUFFIX_SCOPES = ("shared", "request")


def check_history_options(max_tokens: int, scope: str) -> None:
    """The history's limit and scope as a user gives them (--suffix-history-tokens, --suffix-scope)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise DuospecError(
            f"the suffix history's limit must be a positive number of tokens, got {max_tokens!r}; "
            "pass e.g. --suffix-history-tokens 1000000 (or --suffix-scope request to keep no history)"
        )
    if scope not in SUFFIX_SCOPES:
        raise DuospecError(f"unknown suffix scope {scope!r}; choose one of: {', '.join(SUFFIX_SCOPES)}")


class SuffixHistory:
    """Earlier requests' tokens (prompt + answer each), bounded: the oldest are evicted first.

    >>> history = SuffixHistory(max_tokens=6)
    >>> history.add([1, 2, 3]); history.add([4, 5]); history.add([6, 7])
    >>> history.sequences, history.tokens_held
    (2, 4)

    ([1, 2, 3] was evicted: holding it too would make 7 tokens.)
    """

    def __init__(self, max_tokens: int = DEFAULT_HISTORY_TOKENS) -> None:
        check_history_options(max_tokens, SUFFIX_SCOPES[0])
        self.max_tokens = max_tokens
        self._sequences: deque[np.ndarray] = deque()
        self._held = 0
        self._corpus: np.ndarray | None = None  # the sequences joined by SEPARATOR, rebuilt after a change

    @property
    def tokens_held(self) -> int:
        return self._held

    @property
    def sequences(self) -> int:
        return len(self._sequences)

    def add(self, tokens: Sequence[int]) -> None:
        """Remember one request's tokens; a sequence longer than the limit keeps its last tokens."""
        if len(tokens) < 2:
            return  # nothing could follow a match
        array = np.asarray(tokens[-self.max_tokens :], dtype=np.int32)
        self._sequences.append(array)
        self._held += len(array)
        while self._held > self.max_tokens:
            self._held -= len(self._sequences.popleft())
        self._corpus = None

    def clear(self) -> None:
        self._sequences.clear()
        self._held = 0
        self._corpus = None

    def corpus(self) -> np.ndarray:
        """Every stored token, sequences separated by SEPARATOR (and one after the last)."""
        if self._corpus is None:
            parts = [part for sequence in self._sequences for part in (sequence, np.array([SEPARATOR], dtype=np.int32))]
            self._corpus = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        return self._corpus


@dataclass(frozen=True)
class Match:
    """Where the context's longest matched suffix occurred in one token array.

    starts: positions in `tokens` right after each occurrence (where its continuation begins),
    oldest first, at most MAX_OCCURRENCES (the most recent ones).
    """

    length: int
    tokens: np.ndarray
    starts: np.ndarray


def longest_match(tokens: np.ndarray, tail: np.ndarray, searchable: int) -> Match | None:
    """The longest suffix of `tail` that ends at some position p < searchable of `tokens`.

    Occurrences are extended one token to the left at a time while any survive, so the cost is one
    comparison over `tokens` plus a few over the shrinking candidate set.

    Example: tokens [5, 1, 2, 9, 7, 1, 2], tail [7, 1, 2], searchable 6 (the context itself, whose
    last position is the tail's own end) -> length 2, starts [3]: "1 2" occurred at 1..2, followed
    by 9; "7 1 2" never occurred before.
    """
    if len(tail) == 0 or searchable <= 0:
        return None
    candidates = np.flatnonzero(tokens[:searchable] == tail[-1])
    if len(candidates) == 0:
        return None
    length = 1
    while length < len(tail):
        earlier = candidates - length
        valid = earlier >= 0
        extended = candidates[valid][tokens[earlier[valid]] == tail[-1 - length]]
        if len(extended) == 0:
            break
        candidates, length = extended, length + 1
    return Match(length, tokens, candidates[-MAX_OCCURRENCES:] + 1)


def find_matches(context: Sequence[int], history: SuffixHistory | None) -> list[Match]:
    """The longest matches of the context's suffix, in this request and in the history: the
    longer of the two, or both when they are equally long (their occurrences are counted together)."""
    if len(context) < 2:
        return []
    local = np.asarray(context, dtype=np.int32)
    tail = local[-MAX_MATCH:]
    # The context's own last position is the tail itself: search before it.
    found = [longest_match(local, tail, len(local) - 1)]
    if history is not None and history.tokens_held:
        corpus = history.corpus()
        found.append(longest_match(corpus, tail, len(corpus)))
    found = [match for match in found if match is not None]
    if not found:
        return []
    best = max(match.length for match in found)
    return [match for match in found if match.length == best]


@dataclass(frozen=True)
class Speculation:
    """A draft tree in best-first order: node i + 1 has parent parents[i] (0 = the root), depth
    depths[i] (1 under the root) and score scores[i]; scores never increase along the order, so
    every prefix of it is a tree."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    depths: list[int]


def speculate(matches: list[Match], max_nodes: int, max_depth: int) -> Speculation:
    """The most likely continuations of the matches, best first (see the module docstring).

    Example: one match whose continuations are [4, 8], [4, 8] and [6]: the root's children are 4
    (score 2/3) and 6 (1/3); 8 under 4 scores 2/3 x 2/2. Best first: 4 (2/3), 8 (2/3), 6 (1/3).
    """
    speculation = Speculation([], [], [], [])
    if not matches or max_nodes <= 0 or max_depth <= 0:
        return speculation
    # A frontier entry: (-score, order, parent node, token, depth, starts per match of its occurrences).
    frontier: list[tuple[float, int, int, int, int, list[np.ndarray]]] = []
    order = 0
    for entry in _children(matches, [match.starts for match in matches], 1.0, 0, 1):
        heapq.heappush(frontier, (*entry[:1], order, *entry[1:]))
        order += 1
    while frontier and len(speculation.tokens) < max_nodes:
        negative_score, _, parent, token, depth, starts = heapq.heappop(frontier)
        score = -negative_score
        if score < MIN_SCORE:
            break
        speculation.tokens.append(token)
        speculation.parents.append(parent)
        speculation.scores.append(score)
        speculation.depths.append(depth)
        node = len(speculation.tokens)
        if depth < max_depth:
            for entry in _children(matches, starts, score, node, depth + 1):
                heapq.heappush(frontier, (*entry[:1], order, *entry[1:]))
                order += 1
    return speculation


def _children(matches: list[Match], starts: list[np.ndarray], score: float, node: int, depth: int) -> list[tuple]:
    """The tokens that follow `starts` (per match), each with its score and the starts after it."""
    total = sum(len(positions) for positions in starts)  # occurrences that reached this node
    inside = [positions[positions < len(match.tokens)] for match, positions in zip(matches, starts)]
    next_tokens = [match.tokens[positions] for match, positions in zip(matches, inside)]
    if total == 0:
        return []
    values, counts = np.unique(np.concatenate(next_tokens), return_counts=True)
    children = []
    for value, count in zip(values.tolist(), counts.tolist()):
        if value == SEPARATOR:
            continue  # a stored sequence ended here
        after = [positions[tokens == value] + 1 for positions, tokens in zip(inside, next_tokens)]
        children.append((-score * count / total, node, value, depth, after))
    return children


class SuffixPolicy:
    """How many of a speculation's nodes one round verifies, from the measured target cost curve.

    Node i (best-first order) is accepted with probability about scores[i] * a ** depths[i]: its
    score is the share of earlier occurrences that continued along its path, and a is the chance
    that the target goes on agreeing with a copy for one more token, learned from this request's
    rounds as the geometric rate of the accepted path lengths (Leviathan's alpha: a copy that is
    right for 5 tokens is often wrong at the 6th, however sure its counts are). A tree of the first
    n nodes then emits 1 + sum of those on average and costs one target pass over n + 1 tokens:
    take the n with the most tokens per second, or none unless it beats plain decoding by
    DRAFT_MARGIN. a is learned per match-length class (1, 2-3, 4-7, 8-15, 16+ tokens) from
    PRIOR_AGREEMENT: a short match says little (one earlier "the" says nothing of what follows this
    one), and a class that keeps failing stops drafting without silencing the long matches. Without
    a cost profile (a budget fixed by the user) every node is verified.
    """

    fixed_gamma = None
    PRIOR_AGREEMENT = (0.5, 0.6, 0.75, 0.85, 0.9)  # by match-length class; each round's outcome updates it

    def __init__(self, profile: CostProfile | None, max_nodes: int = MAX_NODES, prior_weight: float = 4.0, discount: float = 0.95) -> None:
        self.profile = profile
        self.max_nodes = max_nodes
        self.prior_weight = prior_weight
        self.discount = discount
        self.reset()

    def reset(self) -> None:
        classes = len(self.PRIOR_AGREEMENT)
        self._agreed = [0.0] * classes  # discounted draft tokens accepted, per match-length class
        self._trials = [0.0] * classes  # ... and tokens tested (accepted ones, plus the one rejected)
        self._drafted = self._accepted_total = 0
        self._class = 0  # the class of the last sized speculation (what observe_round learns about)

    @staticmethod
    def match_class(match_length: int) -> int:
        """0 for 1 token, 1 for 2-3, 2 for 4-7, 3 for 8-15, 4 for 16 or more."""
        return min(4, max(1, match_length).bit_length() - 1)

    def agreement(self, match_class: int) -> float:
        """The chance the target accepts one more copied token (prior worth `prior_weight` tokens)."""
        prior = self.PRIOR_AGREEMENT[match_class] * self.prior_weight
        return min(0.99, (self._agreed[match_class] + prior) / (self._trials[match_class] + self.prior_weight))

    @property
    def alpha(self) -> float:
        """Accepted share of the drafted nodes so far (reported as the acceptance estimate)."""
        return self._accepted_total / self._drafted if self._drafted else 0.0

    def next_budget(self) -> DraftBudget:
        return DraftBudget(self.max_nodes, tree=True)

    def nodes_to_verify(self, speculation: Speculation, match_length: int) -> int:
        """The number of leading nodes (best-first order) that maximises tokens per second."""
        self._class = self.match_class(match_length)
        if self.profile is None or not speculation.scores:
            return len(speculation.scores)
        agreement = self.agreement(self._class)
        plain = 1.0 / self.profile.target_pass(1)
        best_n, best_rate, expected = 0, plain * (1.0 + DRAFT_MARGIN), 1.0
        for n, (score, depth) in enumerate(zip(speculation.scores, speculation.depths), start=1):
            expected += score * agreement**depth
            rate = expected / self.profile.target_pass(n + 1)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def describe(self) -> str:
        """The rule this policy sizes trees by (for --verbose)."""
        if self.profile is None:
            return f"every node of each match's tree is verified, up to {self.max_nodes} (fixed by --gamma)"
        t1 = self.profile.target_pass(1)
        classes = ", ".join(f"{label} {prior:.0%}" for label, prior in zip(("1", "2-3", "4-7", "8-15", "16+"), self.PRIOR_AGREEMENT))
        return (
            f"each round looks up the longest earlier occurrence of the text's end and verifies the n best nodes of its "
            f"continuation tree that give the most expected tokens per second on the measured curve (target pass {t1:.3f} s, "
            f"{self.profile.target_pass(2) / t1:.2f}x for 2 tokens, {self.profile.target_pass(4) / t1:.2f}x for 4), none unless "
            f"that beats plain decoding by {DRAFT_MARGIN:.0%}; prior chance a copied token is right, by match length: {classes}"
        )

    def observe_round(self, tree: TokenTree, verdict: Verdict) -> None:
        """One more accepted path: its length in successes, plus one failure where the walk stopped
        at a node that had children (a draft token was tested and rejected there)."""
        if tree.n_draft == 0:
            return
        accepted = verdict.n_accepted
        rejected = 1.0 if verdict.path[-1] in tree.parents else 0.0
        c = self._class
        self._agreed[c] = self._agreed[c] * self.discount + accepted
        self._trials[c] = self._trials[c] * self.discount + accepted + rejected
        self._drafted += tree.n_draft
        self._accepted_total += accepted


class SuffixDrafter:
    """Proposes suffix-decoding trees; `history` (shared across requests, or None) is read, never
    written here: the Pipeline adds each finished request to it."""

    def __init__(self, history: SuffixHistory | None, policy: SuffixPolicy, max_leaves: int | None = None) -> None:
        self.history = history
        self.policy = policy
        self.max_leaves = max_leaves
        self.last_match = 0  # length of the last round's match (reports, tests)

    def reset(self) -> None:
        self.last_match = 0

    def propose(self, context: list[int], budget: DraftBudget, sampling: SamplingConfig, generator: torch.Generator | None) -> TokenTree:
        matches = find_matches(context, self.history)
        self.last_match = matches[0].length if matches else 0
        limit = min(budget.max_tokens, math.ceil(MAX_SPEC_FACTOR * self.last_match))
        if self.max_leaves is not None:
            limit = min(limit, self.max_leaves)  # leaves <= nodes: a llama.cpp pass has ids for them
        depth = budget.max_depth if budget.max_depth is not None else budget.max_tokens
        speculation = speculate(matches, limit, depth)
        n = self.policy.nodes_to_verify(speculation, self.last_match)
        return to_tree(context[-1], speculation, n)

    def feedback(self, verdict: Verdict) -> None:
        pass


def to_tree(root: int, speculation: Speculation, n: int) -> TokenTree:
    """The root plus the first n nodes of a speculation, scores kept as log-probabilities; with
    n = 0 the root alone, as plain decoding runs it."""
    if n == 0:
        return TokenTree.chain(torch.tensor([root], dtype=torch.long))
    tokens = torch.tensor([root, *speculation.tokens[:n]], dtype=torch.long)
    log_probs = torch.tensor([0.0, *(math.log(score) for score in speculation.scores[:n])], dtype=torch.float32)
    return TokenTree(tokens=tokens, parents=(-1, *speculation.parents[:n]), log_probs=log_probs)
