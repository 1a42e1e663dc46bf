"""Accept a path in a scored TokenTree.

Convention: p = target, q = draft. Below they are only ever written `target_probs` / `draft_probs`.

Glossary
- node: one token of the TokenTree; node 0 is the root (the last emitted token).
- path: the accepted nodes, root first. Its draft tokens are emitted.
- accepted: a draft token the verifier keeps.
- recovered (residual) token: drawn after the first rejection in a chain from
  norm(max(0, target_probs - draft_probs)); it replaces the rejected draft token.
- bonus token: drawn from the target at the end of a fully accepted path; it comes for free.
- output: the path's draft tokens followed by the one recovered or bonus token (`Verdict.next_token`).
- lenience l in (0, 1]: accept a draft token x with probability min(1, p(x) / (l * q(x))). l = 1 is the
  exact method; l < 1 accepts more and changes the output law (opt-in, documented as lossy).

Rules
- greedy: accept while the draft token equals the target's argmax; emit the target's argmax after.
  Output equals autoregressive greedy decoding.
- chain sampling (Leviathan et al. / Chen et al.): rejection sampling with residual and bonus. Exact
  for any draft law q. `draft_probs=None` means one-hot q (a model-free draft, or a greedy draft).
- tree sampling (SpecExec): at each node on the walk draw the target's token y ~ p; descend into the
  child carrying y, else emit y and stop. Every emitted token is a target sample, so it is exact for
  any tree and any draft, and needs no q.

All functions are pure: tensors and a `torch.Generator` in, a `Verdict` out; inputs are not modified.
Each makes one host sync, at the end, to read the accepted count, the next token and the tree's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from duospec.config import SamplingConfig
from duospec.sampling import choose, sample, warp_probs
from duospec.tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    """What one verification step keeps: the accepted path and the token that follows it."""

    path: list[int]  # accepted node indices, root first (path[0] == 0)
    next_token: int  # recovered token after a rejection, or bonus token after the whole path
    # The output: the path's draft tokens, then next_token (read in the same sync; derived, so not compared).
    tokens: list[int] = field(default_factory=list, compare=False)

    @property
    def n_accepted(self) -> int:
        """Draft tokens accepted (the root is not a draft token)."""
        return len(self.path) - 1


def verify(
    tree: TokenTree,
    target_logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    lenience: float = 1.0,
) -> Verdict:
    """Pick the rule for this tree and these settings.

    target_logits: [n_nodes, V]; row i scores the children of node i.
    """
    if lenience < 1.0 and not tree.is_chain:
        raise ValueError("lenience is defined for chains only; tree drafts are verified exactly")
    if tree.n_nodes == 1:
        # Nothing drafted (autoregressive decoding): the target's own choice, without the machinery.
        next_token = int(choose(target_logits, sampling, generator)[0])
        return Verdict(path=[0], next_token=next_token, tokens=[next_token])
    if sampling.is_greedy:
        if lenience < 1.0:
            return verify_greedy_lenient(tree, target_logits, lenience)
        return verify_greedy(tree, target_logits)
    target_probs = warp_probs(target_logits, sampling)
    if tree.is_chain:
        return verify_chain_sampling(tree, target_probs, generator, lenience)
    return verify_tree_sampling(tree, target_probs, generator)


def verify_greedy(tree: TokenTree, target_logits: torch.Tensor) -> Verdict:
    """Follow the target's argmax from the root. target_logits: [n_nodes, V]."""
    # NOTE: the argmax of the logits is the argmax of the probabilities; no softmax is needed.
    return walk(tree, target_logits.argmax(-1))


def verify_tree_sampling(
    tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator | None
) -> Verdict:
    """Target-sample matching. target_probs: [n_nodes, V] float32 (already warped).

    One target sample is drawn at every node, in one batch; the walk reads only those on its path,
    and each of them is an independent draw from p at that node, so the output law is p's.
    """
    return walk(tree, sample(target_probs, generator))


def walk(tree: TokenTree, choice: torch.Tensor) -> Verdict:
    """Descend from the root while a child carries the target's choice at its parent.

    choice: [n_nodes] int64, the target's token at each node (argmax or sample).

    Example: chain tokens [7, 3, 5, 9], choice [3, 5, 2, 8] -> path [0, 1, 2], next_token 2
    (3 and 5 match; 9 does not match the choice 2 at node 2, so 2 is emitted instead).
    """
    if tree.n_nodes == 1:
        return _verdict(tree, [0], int(choice[0]), tree.tokens[:1].tolist())
    if tree.is_chain:
        matches = tree.tokens[1:] == choice[:-1]  # draft token i + 1 against the target's choice at node i
        n_accepted = torch.cumprod(matches.long(), 0).sum()
        n_accepted, next_token, tree_tokens = _read(n_accepted, choice, tree.tokens)
        return _verdict(tree, list(range(n_accepted + 1)), next_token, tree_tokens)
    # A node is on the accepted path when it and all its ancestors match: AND along parent links by
    # pointer doubling, log2(depth) batched steps. Siblings carry distinct tokens, so the accepted
    # nodes form one path and the deepest of them ends it.
    parents = torch.tensor(tree.parents, device=choice.device).clamp_min_(0)  # the root points to itself
    on_path = tree.tokens == choice[parents]
    on_path[0] = True
    ancestor = parents
    for _ in range(math.ceil(math.log2(max(tree.depths) + 1))):
        on_path = on_path & on_path[ancestor]
        ancestor = ancestor[ancestor]
    depths = tree.depth_tensor(choice.device)
    deepest = torch.where(on_path, depths, -1).argmax()
    deepest, next_token, tree_tokens = _read(deepest, choice, tree.tokens)
    return _verdict(tree, tree.path_to(deepest), next_token, tree_tokens)


def verify_greedy_lenient(tree: TokenTree, target_logits: torch.Tensor, lenience: float) -> Verdict:
    """Lossy greedy: accept a draft token whose target probability is at least l times the top one.

    Opt-in only. Probabilities are the target's softmax at temperature 1. After the first rejection
    the target's argmax is emitted, as in exact greedy. l = 1 is routed to `verify_greedy` by `verify`
    so ties cannot make it differ from exact greedy.
    """
    if not tree.is_chain:
        raise ValueError("lenient greedy verification is defined for chains only")
    probs = torch.softmax(target_logits.float(), dim=-1)  # [n, V]
    draft_tokens = tree.tokens[1:]
    draft_prob = probs[:-1].gather(1, draft_tokens[:, None]).squeeze(1)  # [n_draft]
    top_prob, argmax = probs.max(-1)  # [n], [n]
    accepted = draft_prob >= lenience * top_prob[:-1]
    n_accepted = torch.cumprod(accepted.long(), 0).sum()
    # After the last accepted node (lenient or not) the target's argmax there is emitted.
    n_accepted, next_token, tree_tokens = _read(n_accepted, argmax, tree.tokens)
    return _verdict(tree, list(range(n_accepted + 1)), next_token, tree_tokens)


def chain_acceptance_law(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    lenience: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic half of rejection sampling: acceptance probabilities and residual laws.

    target_probs: [g + 1, V] float32, row j is p at chain position j (row g serves the bonus token).
    draft_tokens: [g] int64, draft token j + 1 (drawn from draft_probs[j]).
    draft_probs: [g, V] float32 or None (one-hot q at each draft token).
    Returns accept_probs [g] = min(1, p(x) / (l q(x))) and residual [g, V] = norm(max(0, p - q)).

    Split from the draws so that tests can compose the exact output law from this very code.
    """
    g = draft_tokens.shape[0]
    target_rows = target_probs[:g]
    target_at_draft = target_rows.gather(1, draft_tokens[:, None]).squeeze(1)  # [g]
    if draft_probs is None:
        # One-hot q: q(x) = 1 at the draft token, so p - q is p with the draft token removed.
        draft_at_draft = torch.ones_like(target_at_draft)
        residual = target_rows.scatter(1, draft_tokens[:, None], 0.0)
    else:
        draft_at_draft = draft_probs.gather(1, draft_tokens[:, None]).squeeze(1)
        residual = (target_rows - draft_probs).clamp_min_(0.0)
    # NOTE: a token drawn from q has q(x) > 0. A drafter that proposes a token it gave no mass breaks
    # that contract; we reject such a token (acceptance 0) rather than divide by zero.
    accept_probs = torch.where(
        draft_at_draft > 0,
        (target_at_draft / (lenience * draft_at_draft).clamp_min(1e-30)).clamp(max=1.0),
        torch.zeros_like(target_at_draft),
    )
    mass = residual.sum(-1, keepdim=True)
    # A residual with no mass means p <= q everywhere, i.e. p == q: then every draft token is accepted
    # and the row is never used; fall back to p so it is still a valid law.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_rows)
    return accept_probs, residual


def verify_chain_sampling(
    tree: TokenTree,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    lenience: float = 1.0,
) -> Verdict:
    """Speculative sampling on a chain. target_probs: [g + 1, V] float32 (already warped).

    All recovered tokens and the bonus token are drawn in one batch before the first rejection is
    known, so the whole step needs a single host sync.
    """
    draft_tokens = tree.tokens[1:]
    accept_probs, residual = chain_acceptance_law(target_probs, draft_tokens, tree.draft_probs, lenience)
    uniform = torch.rand(accept_probs.shape, generator=generator, device=accept_probs.device)
    accepted = uniform < accept_probs  # P(accept) = min(1, p / (l q))
    n_accepted = torch.cumprod(accepted.long(), 0).sum()
    candidates = sample(torch.cat([residual, target_probs[-1:]]), generator)  # [g + 1]: recovered..., bonus
    n_accepted, next_token, tree_tokens = _read(n_accepted, candidates, tree.tokens)
    return _verdict(tree, list(range(n_accepted + 1)), next_token, tree_tokens)


def _read(index: torch.Tensor, candidates: torch.Tensor, tree_tokens: torch.Tensor) -> tuple[int, int, list[int]]:
    """One host sync: a 0-d index, candidates[index] and the tree's tokens.

    index: [] int64; candidates: [n] int64 (the token to emit after each node); tree_tokens: [n].
    """
    picked = candidates.gather(0, index.view(1))
    values = torch.cat([index.view(1), picked, tree_tokens.to(candidates.device)]).tolist()
    return values[0], values[1], values[2:]


def _verdict(tree: TokenTree, path: list[int], next_token: int, tree_tokens: list[int]) -> Verdict:
    return Verdict(path=path, next_token=next_token, tokens=[tree_tokens[node] for node in path[1:]] + [next_token])
