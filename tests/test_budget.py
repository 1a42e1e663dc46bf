"""Draft budgets from measured costs: the formula, the choice of gamma, online alpha, confidence floors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from duospec.budget.model import CostProfile, best_gamma, expected_tokens
from duospec.budget.policy import DraftBudget, GammaPolicy
from duospec.config import SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.models.hf import HFModel

# The shape measured on the 2-core CPU (DESIGN.md section 3): flat to 4 tokens, then growing.
CPU_PROFILE = CostProfile({1: 0.26, 2: 0.26, 4: 0.273, 6: 0.32, 8: 0.351, 12: 0.43, 16: 0.54})


def test_expected_tokens_formula():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)  # not 2.5: later tokens need earlier ones
    assert expected_tokens(1.0, 4) == 5.0


def test_profile_interpolates_and_extrapolates():
    profile = CostProfile({1: 1.0, 3: 2.0, 5: 4.0})
    assert profile.target_pass(2) == pytest.approx(1.5)
    assert profile.target_pass(4) == pytest.approx(3.0)
    assert profile.target_pass(7) == pytest.approx(6.0)  # slope of the last segment, 1 s per token
    assert profile.target_pass(1) == 1.0


def test_best_gamma_grows_with_alpha_and_with_cheaper_drafts():
    gammas_by_alpha = [best_gamma(alpha, CPU_PROFILE, 0.094, 15) for alpha in (0.5, 0.7, 0.85, 0.95)]
    assert gammas_by_alpha == sorted(gammas_by_alpha) and gammas_by_alpha[0] < gammas_by_alpha[-1]
    assert best_gamma(0.85, CPU_PROFILE, 0.01, 15) > best_gamma(0.85, CPU_PROFILE, 0.094, 15)


def test_best_gamma_maximises_the_expected_rate():
    def rate(gamma):
        return expected_tokens(0.8, gamma) / (gamma * 0.05 + CPU_PROFILE.target_pass(gamma + 1))

    chosen = best_gamma(0.8, CPU_PROFILE, 0.05, 15)
    assert all(rate(chosen) >= rate(gamma) for gamma in range(1, 16))


def test_alpha_is_learned_from_outcomes():
    policy = GammaPolicy(CPU_PROFILE, 0.05, prior_alpha=0.8)
    start = policy.alpha
    for _ in range(20):
        policy.observe(drafted=4, accepted=0)
    # Every first draft token failed and no later one was ever tested: only alpha_first learned.
    assert policy.alpha_first < 0.2 < start
    assert policy.alpha_next == pytest.approx(0.8)
    policy.reset()
    for _ in range(20):
        policy.observe(drafted=4, accepted=4)
    assert policy.alpha_first > 0.95 and policy.alpha_next > 0.95


def test_observe_counts_first_and_later_trials():
    """accepted 2 of 4: the first token is a success; later trials are token 2 (success) and token 3
    (the rejection); token 4 was never tested."""
    policy = GammaPolicy(CPU_PROFILE, 0.05, prior_weight=0.0, discount=1.0)
    policy.observe(drafted=4, accepted=2)
    assert policy.alpha_first == pytest.approx(0.99)  # 1 of 1, capped at 0.99
    assert policy.alpha_next == pytest.approx(0.5)  # 1 of 2, not 1 of 3


def test_two_rate_model_drafts_long_for_lookup_style_drafts():
    """A free draft whose first token is a gamble but whose continuation is a copy should draft long:
    the single-rate model with the same overall acceptance would draft short."""
    copy_like = best_gamma(0.3, CPU_PROFILE, 0.0, 32, alpha_next=0.95)
    uniform = best_gamma(0.5, CPU_PROFILE, 0.0, 32)
    assert copy_like > uniform
    assert expected_tokens(0.3, 3, alpha_next=0.9) == pytest.approx(1 + 0.3 * (1 + 0.9 + 0.81))


def test_observe_ignores_rounds_without_drafts():
    policy = GammaPolicy(CPU_PROFILE, 0.05)
    before = policy.alpha
    policy.observe(drafted=0, accepted=0)
    assert policy.alpha == before


def test_budgets_by_kind_of_draft():
    assert GammaPolicy(None, fixed_gamma=3).next_budget() == DraftBudget(3)  # fixed: exactly 3, no floors
    free = GammaPolicy(CPU_PROFILE, 0.0).next_budget()
    assert free.confidence_floors == () and free.max_tokens >= 1  # lookup drafts have no confidence
    model = GammaPolicy(CPU_PROFILE, 0.094).next_budget()
    assert model.max_tokens == 32 and model.confidence_floors[0] == 0.0  # always draft at least one
    # Each later token must clear a real bar (draft + verification cost), below certainty on this profile.
    assert all(0.3 < floor < 1.0 for floor in model.confidence_floors[1:])


def test_draft_budget_allows():
    budget = DraftBudget(3, (0.0, 0.5, 0.6))
    assert budget.allows(0, 0.01)
    assert budget.allows(1, 0.5) and not budget.allows(1, 0.49)
    assert not budget.allows(3, 1.0)  # max_tokens reached
    assert DraftBudget(5).allows(4, 0.0) and not DraftBudget(5).allows(5, 1.0)
    assert budget.capped(1) == DraftBudget(1, (0.0, 0.5, 0.6))


def test_chain_drafter_stops_when_its_confidence_drops():
    """A draft that is unsure stops early; the same draft with no floors drafts the whole budget."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)  # nearly uniform: confidence ~1/64 per token
    drafter = ChainDrafter(HFModel(model), target_vocab_size=64)
    context = [3, 4, 5, 6]
    unsure = drafter.propose(context, DraftBudget(6, (0.0,) + (0.5,) * 5), SamplingConfig(), None)
    drafter.reset()
    full = drafter.propose(context, DraftBudget(6), SamplingConfig(), None)
    assert unsure.n_draft == 1
    assert full.n_draft == 6
    assert torch.equal(unsure.tokens, full.tokens[:2])  # the same first draft token either way


# Measured on this project's 2-core AMD EPYC with llama.cpp (1.5B Q4_K target): every extra token in a
# pass costs about 50 ms more, so verification is never free.
STEEP_PROFILE = CostProfile({1: 0.070, 2: 0.120, 3: 0.150, 4: 0.185, 8: 0.470, 16: 0.600})


def test_no_draft_where_drafting_cannot_pay_even_at_full_acceptance():
    """With a 35 ms draft step, gamma 1 at alpha 0.99 gives 1.99 tokens per 155 ms (12.8/s) < 1/0.070
    (14.3/s): the budget must draft nothing, not the 'best' gamma of 1 (which would lose 10%), and
    must not probe either (each probe makes the draft catch up on the context, seconds for a long
    prompt: measured 9 s on a summarisation prompt before this rule)."""
    policy = GammaPolicy(STEEP_PROFILE, 0.035)
    for _ in range(40):
        policy.observe(3, 3)  # even a perfect record does not change that
    assert [policy.next_budget().max_tokens for _ in range(40)] == [0] * 40  # and no probes: nothing to learn


def test_drafting_resumes_by_probing_once_it_could_pay():
    """A cheap draft could pay at high acceptance; after many rejections the policy stops drafting but
    probes one token every PROBE_EVERY rounds, and drafts again once the probes are accepted."""
    from duospec.budget.policy import PROBE_EVERY

    policy = GammaPolicy(STEEP_PROFILE, 0.004)
    for _ in range(30):
        policy.observe(2, 0)
    budgets = [policy.next_budget().max_tokens for _ in range(PROBE_EVERY * 2)]
    assert budgets.count(0) == 2 * PROBE_EVERY - 2 and budgets.count(1) == 2  # not all zero: it probes
    for _ in range(30):
        policy.observe(1, 1)
    assert policy.next_budget().max_tokens >= 1


def test_every_budget_implements_the_policy_protocol():
    """The round loop calls one protocol (budget/policy.py); each budget must implement all of it."""
    from duospec.budget.model import CostProfile
    from duospec.budget.policy import BudgetPolicy, GammaPolicy
    from duospec.budget.tree import TreeBudgetPolicy
    from duospec.drafting.auto import AutoDrafter
    from duospec.drafting.suffix import SuffixDrafter, SuffixPolicy

    profile = CostProfile({1: 0.01, 2: 0.015, 4: 0.02, 8: 0.03})
    suffix = SuffixDrafter(None, SuffixPolicy(profile))
    policies = [
        GammaPolicy(profile, 0.002),
        GammaPolicy(None, fixed_gamma=3),
        TreeBudgetPolicy(None, None, fixed_budget=8),
        suffix.policy,
        AutoDrafter(suffix, None, None).policy,
    ]
    for policy in policies:
        assert isinstance(policy, BudgetPolicy), type(policy).__name__
        policy.reset()
        assert policy.next_budget().max_tokens >= 0 and isinstance(policy.describe(), str) and policy.describe()


def test_accepted_node_ranks_worked_example():
    """budget/tree.py's docstring example: ranks follow the log-probabilities, not the node order."""
    import torch

    from duospec.budget.tree import accepted_node_ranks
    from duospec.tree import TokenTree
    from duospec.verify import Verdict

    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9]), parents=(-1, 0, 0, 1), log_probs=torch.tensor([0.0, -0.1, -2.0, -0.5]))
    assert accepted_node_ranks(tree, Verdict(path=[0, 1, 3], next_token=4)) == [0, 1]  # Not [0, 2]
    assert accepted_node_ranks(tree, Verdict(path=[0, 2], next_token=4)) == [2]
