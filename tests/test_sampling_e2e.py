"""End to end: sampled `sd` and `pld` answers follow the target's law, like sampled `ar`.

A tiny-vocabulary target (8 tokens) makes the exact law of new tokens 2 and 3 computable by enumeration
(1 + 8 + 64 target passes). Token 1 comes from the prompt pass; with gamma 2 the first speculative
round then drafts two tokens, so tokens 2 and 3 exercise both draft positions, the recovered token
and the bonus token. Thousands of seeded generations per method are compared with that law by a
chi-square goodness-of-fit test.

Why the threshold cannot flake: the seeds are fixed, so each test is deterministic; p > 1e-4 is the
bar, and a correct sampler lands far above it (its p-value is uniform on [0, 1] over seeds), while
an always-accept verifier is rejected with p ~ 0 (test_the_check_rejects_a_lossy_sampler).
"""

from __future__ import annotations

import pytest
import torch
from law_checks import goodness_of_fit
from tiny_models import perturbed, tiny_model

from duospec.budget.policy import GammaPolicy
from duospec.config import GenerationRequest, SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.lookup import LookupDrafter
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.sampling import warp_probs
from duospec.stats import GenerationStats

VOCAB = 8
PROMPT = [3, 4, 5, 3, 4]  # ends in a repeated bigram, so prompt lookup proposes drafts
SAMPLES = 2000
SETTINGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.8, top_k=5, top_p=0.9),
]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    target = tiny_model(seed=11, vocab_size=VOCAB)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)  # soften: every token keeps real mass, so the test has power
    return target, perturbed(target, noise=0.3, seed=5)


def exact_two_token_law(target, sampling: SamplingConfig) -> torch.Tensor:
    """[V, V] float64: P(new token 2 = a, new token 3 = b) under the warped target (token 1 summed out)."""

    def law_after(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return warp_probs(target(torch.tensor([PROMPT + tokens])).logits[0, -1], sampling).double()

    law = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    first = law_after([])
    for t1 in range(VOCAB):
        second = law_after([t1])
        for a in range(VOCAB):
            law[a] += first[t1] * second[a] * law_after([t1, a])
    return law / law.sum()  # float32 softmax rows sum to 1 only to ~1e-7; chisquare wants exact totals


def sample_two_tokens(target, drafter, sampling: SamplingConfig, gamma: int, lenience: float = 1.0) -> torch.Tensor:
    """[V, V] counts of new tokens 2 and 3 over SAMPLES seeded generations."""
    counts = torch.zeros(VOCAB, VOCAB)
    target_model = HFModel(target)
    for seed in range(SAMPLES):
        seeded = SamplingConfig(**{**sampling.__dict__, "seed": seed})
        request = GenerationRequest(method="sd", max_new_tokens=4, sampling=seeded, lenience=lenience)
        policy = GammaPolicy(None, fixed_gamma=gamma) if drafter is not None else None
        stats = GenerationStats("x", len(PROMPT))
        tokens = [t for chunk in generate_tokens(target_model, InProcessSource(drafter, policy), PROMPT, request, frozenset(), stats) for t in chunk]
        counts[tokens[1], tokens[2]] += 1
    return counts


@pytest.mark.parametrize("sampling", SETTINGS, ids=["t1", "t0.8-k5-p0.9"])
@pytest.mark.parametrize("method", ["ar", "sd", "pld"])
def test_sampled_methods_follow_the_target_law(models, method, sampling):
    target, draft = models
    drafter = {"ar": None, "sd": ChainDrafter(HFModel(draft), VOCAB), "pld": LookupDrafter()}[method]
    counts = sample_two_tokens(target, drafter, sampling, gamma=2)
    assert goodness_of_fit(counts, exact_two_token_law(target, sampling), require_support=False) > 1e-4


def test_the_check_rejects_a_lossy_sampler(models):
    """Negative control: lenience 0.3 accepts too many drafts, biasing the law towards the draft's,
    and the same check catches it (p ~ 1e-199 at 1,500 samples when written). (A draft verified as if q were one-hot would not do: that rule is
    exact for any proposal, which is why prompt lookup is exact.)"""
    target, _ = models
    unrelated_draft = tiny_model(seed=12, vocab_size=VOCAB)  # far from the target, so lenience shows
    counts = sample_two_tokens(target, ChainDrafter(HFModel(unrelated_draft), VOCAB), SETTINGS[0], gamma=2, lenience=0.3)
    assert goodness_of_fit(counts, exact_two_token_law(target, SETTINGS[0]), require_support=False) < 1e-6
