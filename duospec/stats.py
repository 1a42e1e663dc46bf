"""Per-request statistics: what a user needs to judge a method (speed, acceptance, where time went)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counters filled in by an engine while it generates one answer.

    A *target pass* is one forward of the target model; the prompt's prefill counts as one (it yields
    the first token), so plain autoregressive decoding has exactly one token per pass.
    """

    method: str
    prompt_tokens: int
    new_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens the last request left cached (no pass; models/prefix.py)
    target_passes: int = 0
    drafted_tokens: int = 0  # draft tokens sent to verification
    accepted_tokens: int = 0  # draft tokens the verifier kept
    tokens_per_pass: list[int] = field(default_factory=list)  # emitted tokens of each target pass
    gammas: list[int] = field(default_factory=list)  # draft tokens proposed in each round
    seconds: float = 0.0
    ttft_seconds: float | None = None
    prefill_seconds: float = 0.0  # the target's prompt pass over the tokens not reused (the draft's prompt pass is draft time)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0  # verification passes, prefill excluded
    verify_seconds: float = 0.0
    finish_reason: str = ""  # "eos", "length", "context" or "interrupted"
    gamma_auto: bool = True
    acceptance_estimate: float | None = None  # the budget's estimate of the share of draft tokens accepted
    auto_rounds: dict = field(default_factory=dict)  # `auto`: rounds per method it chose
    choice_note: str = ""  # `auto`: why a candidate could or could not pay here, in measured terms
    fallback: str = ""  # why a method went on without its draft (a lost draft process), if it did
    peak_rss_mb: float | None = None  # the process's peak resident memory so far (weights, caches, logits)
    peak_gpu_mb: float | None = None  # torch's peak allocated CUDA memory, where a GPU is in use
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def mark_first_token(self) -> None:
        self.ttft_seconds = time.perf_counter() - self._start

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.seconds = time.perf_counter() - self._start
        self.peak_rss_mb, self.peak_gpu_mb = peak_memory_mb()

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """New tokens per target pass (1.0 for autoregressive decoding)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of draft tokens accepted; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def generation_tokens_per_second(self) -> float | None:
        """Tokens after the first per second after it (the prompt's pass excluded), as llama.cpp reports
        its eval rate apart from its prompt rate; None for answers of one token."""
        if self.ttft_seconds is None or self.new_tokens < 2 or self.seconds <= self.ttft_seconds:
            return None
        return (self.new_tokens - 1) / (self.seconds - self.ttft_seconds)

    @property
    def drafting_rounds(self) -> int:
        """Rounds that sent draft tokens to verification."""
        return sum(1 for drafted in self.gammas if drafted)

    @property
    def mean_draft_per_round(self) -> float:
        """Draft tokens per round that drafted (0 when none did)."""
        return self.drafted_tokens / self.drafting_rounds if self.drafting_rounds else 0.0

    @property
    def other_seconds(self) -> float:
        spent = self.prefill_seconds + self.draft_seconds + self.target_seconds + self.verify_seconds
        return max(0.0, self.seconds - spent)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "new_tokens": self.new_tokens,
            "gamma_auto": self.gamma_auto,  # drafts sized each round from measured costs (no --gamma)
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "prompt_tokens_per_second": round((self.prompt_tokens - self.reused_prompt_tokens) / self.prefill_seconds, 3) if self.prefill_seconds > 0 else None,
            "generation_tokens_per_second": None if self.generation_tokens_per_second is None else round(self.generation_tokens_per_second, 3),
            "drafting_rounds": self.drafting_rounds,
            "mean_draft_per_round": round(self.mean_draft_per_round, 3),
            "ttft_seconds": None if self.ttft_seconds is None else round(self.ttft_seconds, 4),
            "target_passes": self.target_passes,
            "mean_accepted": round(self.mean_accepted, 3),
            "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_estimate": None if self.acceptance_estimate is None else round(self.acceptance_estimate, 4),
            "finish_reason": self.finish_reason,
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            **({"peak_gpu_mb": round(self.peak_gpu_mb, 1)} if self.peak_gpu_mb is not None else {}),
            **({"fallback": self.fallback} if self.fallback else {}),
            **({"auto_rounds": dict(self.auto_rounds)} if self.auto_rounds else {}),
            **({"choice_note": self.choice_note} if self.choice_note else {}),
            "time_breakdown": {
                "prefill": round(self.prefill_seconds, 4),
                "draft": round(self.draft_seconds, 4),
                "target": round(self.target_seconds, 4),
                "verify": round(self.verify_seconds, 4),
                "other": round(self.other_seconds, 4),
            },
            "draft_tokens_per_round": self.gammas,
            "tokens_per_pass": self.tokens_per_pass,
        }


def peak_memory_mb() -> tuple[float | None, float | None]:
    """(peak resident memory of this process, peak CUDA memory torch allocated) in MB; None where unknown."""
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (ImportError, OSError):
        rss = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # a broken CUDA setup must not break the stats
        gpu = None
    return rss, gpu
