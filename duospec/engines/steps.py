"""A round's steps as functions: every engine calls these, none copies them.

A generation is a prefill followed by rounds; each round 1 gets a TokenTree rooted at the last emitted
token (from a drafter in this process, from a draft process, or just the root), 2 `score`s all its
nodes in one target pass, 3 `accept`s a path, 4 `keep`s exactly that path in the target cache, 5 lets
the round's source learn from the outcome and 6 `emit`s the round's tokens cut at EOS or the
request's length. The round loop (engines/rounds.py) calls them in that order for every method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from duospec.config import GenerationRequest, SamplingConfig
from duospec.models import prefix
from duospec.models.base import Model
from duospec.sampling import choose
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import Verdict, verify, walk


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """One generator per request; a missing seed draws a fresh one (never global RNG state)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def derived_seed(seed: int | None, stream: int = 1) -> int | None:
    """A distinct, fixed seed for another random stream of the same request (a draft on another
    device or in another process must not draw the target's numbers)."""
    return None if seed is None else (seed * 0x9E3779B97F4A7C15 + stream) % (2**63)


@dataclass
class Progress:
    """Where a generation stands: the context (prompt + emitted tokens) and how many were emitted."""

    context: list[int]
    emitted: int
    max_context: int

    def room(self, request: GenerationRequest) -> tuple[int, str]:
        """Draft tokens this round may hold (a round emits at most draft + 1 tokens), or the reason
        the generation ends now ("length", "context")."""
        remaining = request.max_new_tokens - self.emitted
        room = self.max_context - len(self.context)  # positions left for draft tokens and the next token
        if remaining <= 0:
            return 0, "length"
        if room <= 0:
            return 0, "context"
        return min(remaining - 1, room - 1), ""


def reuse_prefix(target: Model, prompt_ids: list[int], stats: GenerationStats) -> int:
    """Keep the cached prefix the prompt shares with the last request (models/prefix.py), drop the
    rest of the cache; returns how many prompt tokens need no pass."""
    reused = prefix.reuse(target, prompt_ids)
    stats.reused_prompt_tokens = reused
    return reused


def prefill(target: Model, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator, stats: GenerationStats, reused: int = 0) -> int:
    """The prompt in one pass gives the first token, exactly as autoregressive decoding does; the
    first `reused` prompt tokens are already cached (`reuse_prefix`) and are not run again."""
    start = time.perf_counter()
    logits = target.forward(torch.tensor(prompt_ids[reused:], device=target.device), last_only=True)
    first_token = int(choose(logits, sampling, generator)[0])
    stats.prefill_seconds += time.perf_counter() - start
    stats.target_passes += 1
    stats.new_tokens = 1
    stats.tokens_per_pass.append(1)
    stats.mark_first_token()
    return first_token


def hold(target: Model, progress: Progress) -> None:
    """Record what the target cache holds now that it is consistent: the context but its last token
    (the next round's root). Recorded by reference, no copy (models/prefix.py)."""
    prefix.remember(target, progress.context, len(progress.context) - 1)


def root_only(context: list[int], device: torch.device) -> TokenTree:
    """The tree of a round that drafts nothing: one autoregressive step."""
    return TokenTree.chain(torch.tensor([context[-1]], device=device))


def score(target: Model, tree: TokenTree, stats: GenerationStats) -> torch.Tensor:
    """All the tree's nodes in one target pass: logits [n_nodes, V]."""
    start = time.perf_counter()
    if tree.is_chain:
        logits = target.forward(tree.tokens)  # positions follow the cache; the causal mask is the chain's
    else:
        positions = target.cache_len + tree.depth_tensor(target.device)
        logits = target.forward(tree.tokens, positions, tree.ancestor_mask(target.device))
    stats.target_seconds += time.perf_counter() - start
    stats.target_passes += 1
    return logits


def score_choices(target: Model, tree: TokenTree, sampling: SamplingConfig, generator: torch.Generator, stats: GenerationStats) -> torch.Tensor:
    """A tree's nodes in one target pass, reduced block by block to the target's choice at each node
    (argmax, or one sample of the warped law): [n_nodes] int64. The logits of a large tree are never
    held whole (a 1,024-node tree's would be ~600 MB); what target-sample matching reads is kept."""
    start = time.perf_counter()
    positions = target.cache_len + tree.depth_tensor(target.device)
    choices = target.forward(tree.tokens, positions, tree.ancestor_mask(target.device), reduce=lambda block: choose(block, sampling, generator))
    stats.target_seconds += time.perf_counter() - start
    stats.target_passes += 1
    return choices


def accept_choices(tree: TokenTree, choices: torch.Tensor, stats: GenerationStats) -> Verdict:
    """Target-sample matching on a tree scored by `score_choices`: exact for any tree (verify.py)."""
    start = time.perf_counter()
    verdict = walk(tree, choices)
    stats.verify_seconds += time.perf_counter() - start
    return verdict


def accept(tree: TokenTree, logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator, stats: GenerationStats) -> Verdict:
    """The shared verifier: greedy, rejection sampling (chains) or target-sample matching (trees)."""
    start = time.perf_counter()
    verdict = verify(tree, logits, request.sampling, generator, request.lenience)
    stats.verify_seconds += time.perf_counter() - start
    return verdict


def keep(target: Model, verdict: Verdict, progress: Progress) -> None:
    """Keep exactly the accepted path in the target cache (the new root stays uncached) and extend
    the context; a cache that disagrees with the context is a bug, caught here on every round."""
    target.keep(verdict.path)
    progress.context.extend(verdict.tokens)
    if target.cache_len != len(progress.context) - 1:
        raise RuntimeError(f"target cache holds {target.cache_len} tokens, the context {len(progress.context) - 1}: a cache bug")
    hold(target, progress)


def emit(
    tree: TokenTree, verdict: Verdict, progress: Progress, request: GenerationRequest, eos_ids: frozenset[int], stats: GenerationStats, drafted: bool
) -> tuple[list[int], str]:
    """The round's tokens cut at the first EOS or the request's length, the stats updated; returns
    (tokens to yield, finish reason or "")."""
    if drafted:
        stats.gammas.append(tree.n_draft)
    kept, reason = truncate(verdict.tokens, request.max_new_tokens - progress.emitted, eos_ids)
    stats.drafted_tokens += tree.n_draft
    stats.accepted_tokens += min(verdict.n_accepted, len(kept))  # draft tokens cut at EOS/length do not count
    progress.emitted += len(kept)
    stats.new_tokens = progress.emitted
    stats.tokens_per_pass.append(len(kept))
    return kept, reason


def truncate(tokens: list[int], remaining: int, eos_ids: frozenset[int]) -> tuple[list[int], str]:
    """Cut a round's tokens at the first EOS (kept) or at the remaining budget; say why it ended."""
    for index, token in enumerate(tokens[:remaining]):
        if token in eos_ids:
            return tokens[: index + 1], "eos"
    if len(tokens) >= remaining:
        return tokens[:remaining], "length"
    return tokens, ""
