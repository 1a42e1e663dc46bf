"""Draft, then verify, in one process: the loop shared by every method.

Each round: 1 draft a TokenTree rooted at the last emitted token, 2 score all its nodes in one target
pass, 3 accept a path, 4 keep exactly that path in the target cache, 5 re-budget. Autoregressive
decoding is the same loop with no drafter (a tree of just the root).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from duospec.budget import GammaPolicy
from duospec.config import GenerationRequest
from duospec.drafting import Drafter
from duospec.models.base import Model
from duospec.sampling import choose
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import verify


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """One generator per request; a missing seed draws a fresh one (never global RNG state)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generator_for_drafter(drafter: Drafter | None, target_generator: torch.Generator, seed: int | None) -> torch.Generator:
    """The generator a drafter samples with: the target's where both share a device (so seeded runs
    repeat as before), else one of the draft's own device seeded from the request (a CPU draft
    beside a CUDA target cannot draw from a CUDA generator)."""
    device = getattr(getattr(drafter, "model", None), "device", None)
    if device is None or torch.device(device).type == target_generator.device.type:
        return target_generator
    derived = None if seed is None else (seed * 0x9E3779B97F4A7C15 + 1) % (2**63)  # a distinct, fixed stream
    return make_generator(derived, torch.device(device))


def generate_tokens(
    target: Model,
    drafter: Drafter | None,
    prompt_ids: list[int],
    request: GenerationRequest,
    policy: GammaPolicy | None,
    eos_ids: frozenset[int],
    stats: GenerationStats,
) -> Iterator[list[int]]:
    """Yield the new tokens of each round until EOS, max_new_tokens or the context's end.

    Sets stats.finish_reason when it ends; an interrupted consumer leaves it empty.
    """
    sampling = request.sampling
    generator = make_generator(sampling.seed, target.device)
    draft_generator = generator_for_drafter(drafter, generator, sampling.seed)
    max_context = target.max_context or (len(prompt_ids) + request.max_new_tokens + 1)
    target.reset()
    if drafter is not None:
        drafter.reset()
    if policy is not None:
        policy.reset()

    # Prefill: the prompt in one pass gives the first token, exactly as autoregressive decoding does.
    start = time.perf_counter()
    logits = target.forward(torch.tensor(prompt_ids, device=target.device), last_only=True)
    first_token = int(choose(logits, sampling, generator)[0])
    stats.prefill_seconds += time.perf_counter() - start
    stats.target_passes += 1
    context = [*prompt_ids, first_token]
    emitted = 1
    stats.new_tokens = 1
    stats.tokens_per_pass.append(1)
    stats.mark_first_token()
    yield [first_token]
    if first_token in eos_ids:
        stats.finish("eos")
        return

    while True:
        remaining = request.max_new_tokens - emitted
        room = max_context - len(context)  # positions left for draft tokens and the next token
        if remaining <= 0:
            stats.finish("length")
            return
        if room <= 0:
            stats.finish("context")
            return
        # A round emits at most (draft tokens + 1), so never draft past the request or the context.
        budget = policy.next_budget().capped(min(remaining - 1, room - 1)) if (drafter and policy) else None

        # 1. draft
        start = time.perf_counter()
        proposed = drafter is not None and budget is not None and budget.max_tokens > 0
        if proposed:
            tree = drafter.propose(context, budget, sampling, draft_generator).to(target.device)
        else:
            tree = TokenTree.chain(torch.tensor([context[-1]], device=target.device))
        stats.draft_seconds += time.perf_counter() - start

        # 2. score every node in one target pass
        start = time.perf_counter()
        if tree.is_chain:
            logits = target.forward(tree.tokens)  # positions follow the cache; the causal mask is the chain's
        else:
            positions = target.cache_len + tree.depth_tensor(target.device)
            logits = target.forward(tree.tokens, positions, tree.ancestor_mask(target.device))
        stats.target_seconds += time.perf_counter() - start
        stats.target_passes += 1

        # 3. accept a path
        start = time.perf_counter()
        verdict = verify(tree, logits, sampling, generator, request.lenience)
        stats.verify_seconds += time.perf_counter() - start

        # 4. keep exactly the accepted path in the target cache; the new root stays uncached
        target.keep(verdict.path)
        context.extend(verdict.tokens)
        if target.cache_len != len(context) - 1:
            raise RuntimeError(f"target cache holds {target.cache_len} tokens, the context {len(context) - 1}: a cache bug")
        if proposed:
            drafter.feedback(verdict)

        # 5. re-budget from this round's outcome
        if policy is not None and proposed:
            policy.observe(tree.n_draft, verdict.n_accepted)
            stats.alpha_estimate = policy.alpha
        if drafter is not None:
            stats.gammas.append(tree.n_draft)

        kept, reason = _truncate(verdict.tokens, request.max_new_tokens - emitted, eos_ids)
        stats.drafted_tokens += tree.n_draft
        stats.accepted_tokens += min(verdict.n_accepted, len(kept))  # draft tokens cut at EOS/length do not count
        emitted += len(kept)
        stats.new_tokens = emitted
        stats.tokens_per_pass.append(len(kept))
        yield kept
        if reason:
            stats.finish(reason)
            return


def _truncate(tokens: list[int], remaining: int, eos_ids: frozenset[int]) -> tuple[list[int], str]:
    """Cut a round's tokens at the first EOS (kept) or at the remaining budget; say why it ended."""
    for index, token in enumerate(tokens[:remaining]):
        if token in eos_ids:
            return tokens[: index + 1], "eos"
    if len(tokens) >= remaining:
        return tokens[:remaining], "length"
    return tokens, ""
