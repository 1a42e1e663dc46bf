"""Temperature / top-k / top-p, applied the same way to target and draft logits.

"The target distribution" in duospec always means the *warped* one the user asked for: both models'
logits pass through `warp_probs` with the same settings before any acceptance test, so speculative
sampling reproduces exactly what `ar` would sample with those settings.

Order follows the transformers library: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import torch

from duospec.config import SamplingConfig


def warp_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Turn raw logits into the sampling distribution, in float32.

    logits: [..., V] any float dtype. Returns probs: [..., V] float32, each row summing to 1.
    Greedy settings (temperature 0) return the one-hot distribution of the argmax, so greedy is the
    special case of sampling where the law is a point mass.
    """
    logits = logits.float()
    if sampling.is_greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Subtract each row's max before dividing: softmax((x - max x) / T) is the same law as softmax(x / T)
    # (softmax ignores a per-row shift, and torch's softmax shifts by the max internally anyway), but the
    # shifted logits are <= 0 with the max exactly 0, so a tiny T can only send the others to -inf
    # (probability 0) and never to +inf, where softmax would give NaN (inf - inf). At T -> 0 this is the
    # exact limit: the argmax (ties share the mass equally), and the same function warps target and draft.
    # SamplingConfig refuses temperatures float32 cannot hold (below MIN_TEMPERATURE), where T would
    # round to 0 and 0 / 0 would be NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        # The k-th largest value is the cut; ties at the cut are kept, as in transformers' TopKLogitsWarper.
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if sampling.top_p < 1.0:
        logits = _top_p_filter(logits, sampling.top_p)
    return torch.softmax(logits, dim=-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches top_p (always at least one).

    logits: [..., V]. A token is dropped when the mass of the tokens ranked strictly above it already
    reaches top_p.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_above >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row. probs: [n, V] float32 rows summing to 1 -> [n] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The target's choice for each row: argmax when greedy, else a sample of the warped law.

    logits: [n, V] -> [n] int64. Greedy takes the argmax of the raw logits (no softmax needed: it is
    monotone), which is what autoregressive greedy decoding does.
    """
    if sampling.is_greedy:
        return logits.argmax(-1)
    return sample(warp_probs(logits, sampling), generator)
