"""TokenTree: the draft tokens one target pass verifies.

Node 0 is the *root*: the last token already emitted, which the target has not cached yet. Every
other node is a draft token whose parent comes before it. A chain (speculative decoding, prompt
lookup) is a tree whose nodes each have one child, so chain and tree methods share everything after
drafting: one target pass over all nodes with an ancestor mask, one verifier, one cache update.

Invariant: siblings carry distinct tokens, so a walk from the root that follows the target's choices
is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenTree:
    """Draft tokens in topological order (parents before children).

    tokens: [n] int64, tokens[0] is the root (last emitted token).
    parents: n ints, parents[0] == -1 and parents[i] < i.
    draft_probs: [n - 1, V] float32 or None. For chains drawn from a draft model, row i is the draft
        law q that proposed node i + 1. None means each draft token had q = 1 (one-hot), as for
        model-free drafts such as prompt lookup or a greedy draft.
    log_probs: [n] float32 or None: each node's cumulative draft log-probability (root 0), the score a
        best-first tree (SpecExec) ranks its nodes by. One number per node, never a [n, V] law: trees
        are verified by target-sample matching, which needs no q. Used for acceptance-by-budget
        accounting and reports; never read by the verifier.
    """

    tokens: torch.Tensor
    parents: tuple[int, ...]
    draft_probs: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    depths: tuple[int, ...] = field(init=False, repr=False)
    is_chain: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.parents)
        if self.tokens.ndim != 1 or self.tokens.shape[0] != n or n == 0:
            raise ValueError(f"tokens must be a 1-D tensor with one entry per node ({n}), got {tuple(self.tokens.shape)}")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        depths = [0] * n
        for i in range(1, n):
            parent = self.parents[i]
            if not (0 <= parent < i):
                raise ValueError(f"node {i} has parent {parent}; parents must come before their children")
            depths[i] = depths[parent] + 1
        object.__setattr__(self, "depths", tuple(depths))
        object.__setattr__(self, "is_chain", all(self.parents[i] == i - 1 for i in range(1, n)))
        if not self.is_chain:
            self.check_siblings_distinct()
        if self.draft_probs is not None:
            if not self.is_chain:
                raise ValueError("draft_probs are only kept for chains; trees are verified by target-sample matching")
            if self.draft_probs.ndim != 2 or self.draft_probs.shape[0] != n - 1:
                raise ValueError(f"draft_probs must be [n_nodes - 1, V] = [{n - 1}, V], got {tuple(self.draft_probs.shape)}")
        if self.log_probs is not None and tuple(self.log_probs.shape) != (n,):
            raise ValueError(f"log_probs must hold one value per node ([{n}]), got {tuple(self.log_probs.shape)}")

    @classmethod
    def chain(cls, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> "TokenTree":
        """A chain: tokens[0] is the root, tokens[i] follows tokens[i - 1]. tokens: [n] int64."""
        return cls(tokens=tokens, parents=tuple(range(-1, tokens.shape[0] - 1)), draft_probs=draft_probs)

    def to(self, device: torch.device | str) -> "TokenTree":
        """The same tree with its tensors on `device` (drafts may come from another device than the target's)."""
        if self.tokens.device == torch.device(device):
            return self
        draft_probs = None if self.draft_probs is None else self.draft_probs.to(device)
        log_probs = None if self.log_probs is None else self.log_probs.to(device)
        return TokenTree(tokens=self.tokens.to(device), parents=self.parents, draft_probs=draft_probs, log_probs=log_probs)

    def first(self, count: int) -> "TokenTree":
        """The tree of its first `count` nodes (parents come first, so they form a tree). Verifying it
        is as exact as verifying the whole: a chain's prefix is what the draft drew first, and a tree
        is verified by target-sample matching, which reads no draft law. (A round whose pass must
        narrow after drafting: engines/rounds.py.)"""
        if not 1 <= count <= self.n_nodes:
            raise ValueError(f"a tree of {self.n_nodes} nodes has no first {count}")
        if count == self.n_nodes:
            return self
        return TokenTree(
            tokens=self.tokens[:count],
            parents=self.parents[:count],
            draft_probs=None if self.draft_probs is None else self.draft_probs[: count - 1],
            log_probs=None if self.log_probs is None else self.log_probs[:count],
        )

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def n_draft(self) -> int:
        """Draft tokens in the tree (every node but the root)."""
        return len(self.parents) - 1

    def check_siblings_distinct(self) -> None:
        """Raise if two children of one node carry the same token (the walk would be ambiguous)."""
        seen: set[tuple[int, int]] = set()
        for node, token in enumerate(self.tokens.tolist()):
            key = (self.parents[node], token)
            if key in seen:
                raise ValueError(f"node {node} repeats token {token} under parent {self.parents[node]}")
            seen.add(key)

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[n, n] bool: mask[i, j] is True when node j is node i or one of its ancestors.

        Example: tokens [7, 3, 5, 9], parents (-1, 0, 0, 1) (node 3 hangs under node 1):

            node 0: [1, 0, 0, 0]
            node 1: [1, 1, 0, 0]
            node 2: [1, 0, 1, 0]
            node 3: [1, 1, 0, 1]   # not [1, 1, 1, 1]: node 2 is a sibling of node 1, not an ancestor

        Built by walking all nodes up their parent links together: one batched scatter per depth level.
        """
        n = self.n_nodes
        if self.is_chain:
            return torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        mask = torch.eye(n, dtype=torch.bool, device=device)
        rows = torch.arange(n, device=device)
        parents = torch.tensor(self.parents, device=device)
        ancestor = parents
        for _ in range(max(self.depths)):
            has_ancestor = ancestor >= 0
            mask[rows[has_ancestor], ancestor[has_ancestor]] = True
            # One link up per level: index `parents`, not `ancestor` (ancestor[ancestor] would jump 1, 2,
            # 4, ... levels and skip the ancestor 3 levels up).
            ancestor = torch.where(has_ancestor, parents[ancestor.clamp_min(0)], ancestor)
        return mask

    @property
    def n_leaves(self) -> int:
        """Nodes without children (a llama.cpp pass needs one sequence id per leaf)."""
        return self.n_nodes - len(set(self.parents[1:]))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to `node`, root first."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def depth_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[n] int64 depth of each node (root 0): its position offset after the cached prefix."""
        return torch.tensor(self.depths, dtype=torch.long, device=device)
