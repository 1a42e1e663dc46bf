"""The Model protocol: what an engine needs from a causal language model with a KV cache.

Engines and drafters only talk to this protocol, never to transformers directly, so a backend
(transformers today, llama.cpp or offloaded weights later) can be swapped without touching the loop.

Cache discipline: the cache holds a prefix of the sequence. `forward` appends new tokens (a chain or a
whole tree) after it; `keep` then retains exactly the accepted nodes of that last forward, and `crop`
drops everything past a length. The prompt is never run twice, not even by the next request: the
cache outlives a request, and `held_prefix` records what it holds (models/prefix.py).

Trees over several passes (SpecExec's draft grows its tree level by level): a forward with
`extend_tree=True` adds its tokens to the *open tree*, i.e. everything the forwards since the last
ordinary forward appended. Its `tree_mask` then has one column per open-tree token already cached plus
one per new token, and `keep` indexes the whole open tree, numbered in the order its tokens were fed.
Positions are always explicit for trees: the committed length plus the node's depth.

Logits of large trees: `reduce` turns each [rows, V] block of logits into what the caller needs (an
argmax, a sample) as soon as the block exists, so a 2,048-node tree never holds 2,048 x V floats.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol, runtime_checkable

import torch

def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS, Windows)
        return os.cpu_count() or 1


LOGIT_BLOCK_ROWS = 128  # rows of logits a `reduce`d forward holds at once (128 x 151,936 floats = 78 MB)


def reduce_blocks(logits_of: Callable[[int, int], torch.Tensor], n_rows: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`reduce` over row blocks [start, end) of logits that `logits_of(start, end)` computes on demand."""
    parts = [reduce(logits_of(start, min(n_rows, start + LOGIT_BLOCK_ROWS))) for start in range(0, n_rows, LOGIT_BLOCK_ROWS)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@runtime_checkable
class Model(Protocol):
    name: str
    device: torch.device
    vocab_size: int  # width of the logits
    max_context: int | None  # longest sequence the model accepts, None if unknown
    max_tree_leaves: int | None  # leaves a tree may have (llama.cpp: one sequence id each), None = no limit
    tree_ids_left: int | None  # leaves the open tree may still gain, None = no limit
    # What a caller recorded the cache to hold (a prefix.HeldPrefix), for the next request to reuse.
    # Callers set it; the backend sets it to None on every cache change (forward, keep, crop, reset).
    held_prefix: object | None
    # Deterministic mode (models/deterministic.py): every logit row of a multi-token pass bit-identical
    # to a one-token decode. A backend that cannot keep it refuses set_deterministic(True).
    deterministic: bool

    def set_deterministic(self, enabled: bool) -> None:
        """Switch deterministic mode; raises DuospecError where this backend or machine cannot keep it."""
        ...

    @property
    def cache_len(self) -> int:
        """Tokens currently held in the KV cache."""
        ...

    def reset(self) -> None:
        """Drop the whole cache (a new sequence starts)."""
        ...

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
        extend_tree: bool = False,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run `tokens` after the cached prefix and append them to the cache.

        tokens: [n] int64. positions: [n] int64 absolute positions (default: cache_len + arange(n)).
        tree_mask: [n, n] bool, True where new token i may attend new token j (default: causal); with
            extend_tree, [n, t + n] over the t open-tree tokens already cached and the new ones.
        extend_tree: the tokens join the open tree of the previous forward(s) (see the module docstring).
        reduce: applied to consecutive row blocks of the logits (float32, at most LOGIT_BLOCK_ROWS
            rows each); the results are concatenated along dim 0 and returned instead of the logits.
        Returns logits [n, V] float32, or [1, V] for the last token only when `last_only`.
        """
        ...

    def extend_fits(self, parents: list[int]) -> list[bool]:
        """Which of these candidate nodes (parents: indices into the open tree), taken in order, the
        next `forward(extend_tree=True)` could hold: all, except where a backend's tree ids run out."""
        ...

    def keep(self, nodes: list[int]) -> None:
        """Keep the cached prefix from before the open tree plus these of its tokens, in order.

        nodes are indices into the open tree's tokens, i.e. the last forward's, or all forwards' since
        the last ordinary one when later ones extended the tree (a root-first path, so increasing).
        """
        ...

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        ...
