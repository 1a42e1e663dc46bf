"""The Model protocol: what an engine needs from a causal language model with a KV cache.

Engines and drafters only talk to this protocol, never to transformers directly, so a backend
(transformers today, llama.cpp or offloaded weights later) can be swapped without touching the loop.

Cache discipline: the cache holds a prefix of the sequence. `forward` appends new tokens (a chain or a
whole tree) after it; `keep` then retains exactly the accepted nodes of that last forward, and `crop`
drops everything past a length. The prompt is never run twice.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Model(Protocol):
    name: str
    device: torch.device
    vocab_size: int  # width of the logits
    max_context: int | None  # longest sequence the model accepts, None if unknown

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
    ) -> torch.Tensor:
        """Run `tokens` after the cached prefix and append them to the cache.

        tokens: [n] int64. positions: [n] int64 absolute positions (default: cache_len + arange(n)).
        tree_mask: [n, n] bool, True where new token i may attend new token j (default: causal).
        Returns logits [n, V] float32, or [1, V] for the last token only when `last_only`.
        """
        ...

    def keep(self, nodes: list[int]) -> None:
        """Keep the cached prefix from before the last `forward` plus these of its new tokens, in order.

        nodes are indices into the last forward's tokens (a root-first path, so increasing).
        """
        ...

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        ...
