"""SpecExec's draft: a best-first tree of the draft's most probable continuations (DESIGN.md 1.2).

Every node's score is its cumulative draft log-probability (the root scores 0). The search keeps a
pool of at most `budget` draft nodes. The draft runs first on the root (and whatever context it has
not cached), then once per pass on the `width` best nodes it has not run yet, all in one batched
forward whose tree mask lets each node see the committed prefix and its own ancestors. Each run node
adds its top children to the pool, and the pool is cut back to the best `budget` nodes overall. A
child never scores above its parent, so the best nodes always form a tree, and ties keep the earlier
node (stable sort: parents precede their children).

Worked example (tests/test_specexec.py checks it): budget 3, width 1, children 2. The root's law
gives A 0.6, B 0.3: the pool is {A: log 0.6, B: log 0.3}. Pass 1 runs A (the best not yet run): its
law gives C 0.9, D 0.05, i.e. C: log 0.54, D: log 0.03. The best three are A (0.6), C (0.54) and B
(0.3); D (0.03) is pruned. Pass 2 runs C, whose children (at most 0.54 x their probability) compete
with B (0.3) for the last place.

The draft's cache holds the committed prefix plus every node the draft ran, as one open tree
(`Model.forward(extend_tree=True)`), so nothing is recomputed; after verification the draft keeps
the accepted path's run nodes and drops the rest. The pool lives in tensors on the draft's device:
per pass there is one host read (how many nodes to run), none per node or token.

The tree goes to the target with each node's cumulative log-probability (`TokenTree.log_probs`), no
[n, V] law: target-sample matching verifies any tree exactly without q.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from duospec.budget.policy import DraftBudget
from duospec.config import SamplingConfig
from duospec.models import prefix
from duospec.models.base import Model
from duospec.models.joint import PassPreempted
from duospec.sampling import warp_probs
from duospec.tree import TokenTree
from duospec.verify import Verdict

DEFAULT_DEPTH = 16  # the tree's depth cap and so its draft passes (SpecExec reports ~8 tokens per pass)
MAX_CHILDREN = 32  # children each run node offers to the pool (the pool keeps the best anyway)


@dataclass(frozen=True)
class TreeSearch:
    """How one best-first search spends its budget.

    budget: draft nodes in the final tree (the root excluded).
    passes: draft passes after the root's, each one level deeper at most: the depth cap.
    width: nodes the draft runs per pass. budget / passes, so the run nodes could fill the budget.
    children: top children each run node offers.
    """

    budget: int
    passes: int
    width: int
    children: int

    @classmethod
    def for_budget(cls, budget: int, depth: int | None = None) -> "TreeSearch":
        """A chain for tiny budgets (budget <= depth: width 1), wider levels for large ones."""
        passes = max(1, min(depth or DEFAULT_DEPTH, budget))
        return cls(budget=budget, passes=passes, width=math.ceil(budget / passes), children=min(MAX_CHILDREN, budget))


class SpecExecDrafter:
    """Drafts SpecExec trees with `model`; the same tree for greedy and sampled requests (ranked by the
    warped draft law when sampling), since target-sample matching is exact for any tree."""

    def __init__(self, model: Model, target_vocab_size: int, max_leaves: int | None = None, depth: int | None = None) -> None:
        self.model = model
        self.target_vocab_size = target_vocab_size
        self.max_leaves = max_leaves  # the target's limit (llama.cpp: a sequence id per leaf), None = none
        self.depth = depth
        self.last_search: TreeSearch | None = None
        self.last_round_used_model = False
        self._valid = 0  # leading context tokens the draft cache holds correctly
        self._context_len = 0
        self._keep_slots: list[int] | None = None  # the open tree's chain part: catch-up tokens and the root
        self._slot_of_node: list[int] = []  # final tree node -> its slot in the draft's open tree, -1 if never run
        self._context: list[int] = []  # the engine's context at the last proposal (a live list: it only grows)
        self._reuse_pending = True  # the next root pass first takes over the cache's recorded prefix

    def reset(self) -> None:
        """A new sequence: the draft cache stays; the first root pass keeps what it shares with the
        new context (models/prefix.py) and drops the rest."""
        self._valid = self._context_len = 0
        self._keep_slots = None
        self._slot_of_node = []
        self._context = []
        self._reuse_pending = True

    # -- the search ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, context: list[int], budget: DraftBudget, sampling: SamplingConfig, generator: torch.Generator | None) -> TokenTree:
        device = self.model.device
        root = context[-1]
        depth = self.depth or DEFAULT_DEPTH
        if budget.max_depth is not None:
            depth = min(depth, budget.max_depth)  # the request's or the context's end is near
        search = TreeSearch.for_budget(budget.max_tokens, depth)
        self.last_search = search
        self._keep_slots = None
        limit = self.model.max_context
        if limit is not None and len(context) + search.passes + 1 > limit:
            self.last_round_used_model = False
            return TokenTree.chain(torch.tensor([root], device=device))  # the draft's own context is full
        self.last_round_used_model = True

        # The root's pass: whatever context the draft has not cached, ending with the root (a chain).
        if self._reuse_pending:
            self._valid = prefix.reuse(self.model, context)
            self._reuse_pending = False
        self._context = context
        valid = min(self._valid, len(context) - 1)
        if valid < self.model.cache_len:
            self.model.crop(valid)
        pending = torch.tensor(context[valid:], device=device)
        root_logits = self.model.forward(pending, last_only=True)
        chain = len(pending)
        root_position = len(context) - 1
        self._context_len = len(context)
        self._keep_slots = list(range(chain))
        slots_total = chain + search.passes * search.width

        pool = _Pool.rooted(root, chain, slots_total, device)
        pool.add_children(torch.zeros(1, dtype=torch.long, device=device), self._log_law(root_logits, sampling), search.children)
        pool.prune(search.budget)
        used = chain
        joiner = getattr(self.model, "joiner", None)  # under batching (models/joint.py): the requests generating now
        company = joiner.members if joiner is not None else 0
        for _ in range(search.passes):
            if joiner is not None and joiner.members > company:
                # A request joined: the round's pass will be narrowed to what is fair beside it
                # (engines/rounds.py), so deeper levels would only hold up the newcomer's tokens.
                break
            if self.model.tree_ids_left is None:
                chosen = pool.best_unrun(search.width, search.passes)
            else:
                # llama.cpp: a run node needs a sequence id unless it is its parent's first child, so
                # when ids run short the best nodes that still fit are run (host work: a CPU backend).
                candidates = pool.best_unrun(pool.tokens.shape[0], search.passes)
                fits = self.model.extend_fits(pool.slot[pool.parents[candidates]].tolist())
                chosen = candidates[torch.tensor(fits, dtype=torch.bool, device=candidates.device)][: search.width]
            if limit is not None:
                chosen = chosen[: max(0, limit - self.model.cache_len)]  # and takes a cache cell: near the context's end they run out
            if chosen.numel() == 0:
                break
            m = chosen.shape[0]
            mask = torch.cat([pool.seen[chosen, :used], torch.eye(m, dtype=torch.bool, device=device)], dim=1)
            try:
                logits = self.model.forward(pool.tokens[chosen], root_position + pool.depth[chosen], mask, extend_tree=True)
            except PassPreempted:  # a request joined and stopped this level (models/joint.py): the draft cache
                self._keep_slots, self._valid = None, valid  # dropped the open tree with it; the tree so far is proposed
                break
            pool.mark_run(chosen, used)
            used += m
            pool.add_children(chosen, self._log_law(logits, sampling), search.children)
            pool.prune(search.budget)
        return self._final_tree(pool)

    def _log_law(self, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """[m, V] log-probabilities the search ranks by: the draft's law, warped like the target's when sampling."""
        logits = logits[..., : self.target_vocab_size].float()
        if sampling.is_greedy:
            return torch.log_softmax(logits, dim=-1)
        return torch.log(warp_probs(logits, sampling))

    def _final_tree(self, pool: "_Pool") -> TokenTree:
        """The pool as a TokenTree (one host read), its leaves capped for the target if it must be."""
        parents, slots = pool.parents.tolist(), pool.slot.tolist()
        keep = list(range(len(parents)))
        if self.max_leaves is not None:
            keep = cap_leaves(parents, pool.scores.tolist(), self.max_leaves)
        if len(keep) < len(parents):
            index = torch.tensor(keep, device=pool.tokens.device)
            renumber = {old: new for new, old in enumerate(keep)}
            parents = [-1] + [renumber[parents[old]] for old in keep[1:]]
            slots = [slots[old] for old in keep]
            tokens, scores = pool.tokens[index], pool.scores[index]
        else:
            tokens, scores = pool.tokens, pool.scores
        self._slot_of_node = slots
        return TokenTree(tokens=tokens, parents=tuple(parents), log_probs=scores)

    def feedback(self, verdict: Verdict) -> None:
        """Keep the accepted path's run nodes in the draft cache, drop the rest of the draft's tree."""
        if self._keep_slots is None:
            return
        slots = list(self._keep_slots)
        for node in verdict.path[1:]:
            if self._slot_of_node[node] < 0:
                break  # a node the draft never ran: neither it nor anything below it is cached
            slots.append(self._slot_of_node[node])
        self.model.keep(slots)
        self._valid = self._context_len + len(slots) - len(self._keep_slots)
        self._keep_slots = None
        # The engine extended its context by the accepted tokens first: context[:_valid] is cached.
        prefix.remember(self.model, self._context, self._valid)


class _Pool:
    """The search's nodes as parallel tensors, in topological order (parents before children).

    tokens, parents (pool index, -1 for the root), scores (cumulative log-probability), depth, slot
    (position in the draft's open tree, -1 until run) and seen: [n, slots] bool, the open-tree slots
    each node attends to (its run ancestors, and itself once run).
    """

    def __init__(self, tokens, parents, scores, depth, slot, seen) -> None:
        self.tokens, self.parents, self.scores, self.depth, self.slot, self.seen = tokens, parents, scores, depth, slot, seen

    @classmethod
    def rooted(cls, root: int, chain: int, slots_total: int, device: torch.device) -> "_Pool":
        seen = torch.zeros(1, slots_total, dtype=torch.bool, device=device)
        seen[0, :chain] = True  # the catch-up chain and the root itself
        as_long = lambda value: torch.tensor([value], dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(root), as_long(-1), torch.zeros(1, device=device), as_long(0), as_long(chain - 1), seen)

    def best_unrun(self, width: int, max_depth: int) -> torch.Tensor:
        """Pool indices of the best `width` nodes not run yet and above the depth cap, best first."""
        open_scores = torch.where((self.slot < 0) & (self.depth < max_depth), self.scores, float("-inf"))
        k = min(width, int(torch.isfinite(open_scores).sum()))  # the one host read of a pass
        return torch.topk(open_scores, k).indices if k else open_scores.new_zeros(0, dtype=torch.long)

    def mark_run(self, chosen: torch.Tensor, first_slot: int) -> None:
        new_slots = torch.arange(first_slot, first_slot + chosen.shape[0], device=chosen.device)
        self.slot[chosen] = new_slots
        self.seen[chosen, new_slots] = True

    def add_children(self, parents: torch.Tensor, log_law: torch.Tensor, children: int) -> None:
        """Each parent's top `children` tokens as new nodes (impossible tokens, -inf, left out)."""
        values, tokens = torch.topk(log_law, min(children, log_law.shape[-1]), dim=-1)  # [m, k]
        scores = (self.scores[parents, None] + values.clamp_max(0.0)).reshape(-1)
        keep = torch.isfinite(scores)
        parent_index = parents[:, None].expand_as(tokens).reshape(-1)[keep]
        self.tokens = torch.cat([self.tokens, tokens.reshape(-1)[keep]])
        self.parents = torch.cat([self.parents, parent_index])
        self.scores = torch.cat([self.scores, scores[keep]])
        self.depth = torch.cat([self.depth, self.depth[parent_index] + 1])
        self.slot = torch.cat([self.slot, torch.full_like(parent_index, -1)])
        self.seen = torch.cat([self.seen, self.seen[parent_index]])

    def prune(self, budget: int) -> None:
        """Keep the root and the best `budget` other nodes, in their order (stable: ties keep the earlier)."""
        n = self.tokens.shape[0]
        if n <= budget + 1:
            return
        best = torch.sort(self.scores, descending=True, stable=True).indices[: budget + 1]
        keep = torch.sort(best).values
        renumber = torch.full((n,), -1, dtype=torch.long, device=keep.device)
        renumber[keep] = torch.arange(keep.shape[0], device=keep.device)
        parents = self.parents[keep]
        self.parents = torch.where(parents >= 0, renumber[parents.clamp_min(0)], parents)
        self.tokens, self.scores, self.depth = self.tokens[keep], self.scores[keep], self.depth[keep]
        self.slot, self.seen = self.slot[keep], self.seen[keep]


def cap_leaves(parents: list[int], scores: list[float], max_leaves: int) -> list[int]:
    """Nodes to keep so that at most `max_leaves` leaves remain: drop the worst leaf until it fits.

    A dropped leaf's parent may become a leaf itself (and compete in turn). Returns kept node indices in
    order. Example: parents [-1, 0, 0, 0], scores [0, -1, -2, -3], max_leaves 2 -> [0, 1, 2].
    """
    children = [0] * len(parents)
    for parent in parents[1:]:
        children[parent] += 1
    leaves = [(scores[node], -node, node) for node in range(1, len(parents)) if children[node] == 0]
    excess = len(leaves) - max_leaves
    if excess <= 0:
        return list(range(len(parents)))
    heapq.heapify(leaves)
    dropped = set()
    while excess > 0 and leaves:
        _, _, node = heapq.heappop(leaves)
        dropped.add(node)
        parent = parents[node]
        children[parent] -= 1
        if children[parent] == 0 and parent != 0:
            heapq.heappush(leaves, (scores[parent], -parent, parent))  # a leaf for a leaf: the count holds
        else:
            excess -= 1
    return [node for node in range(len(parents)) if node not in dropped]
