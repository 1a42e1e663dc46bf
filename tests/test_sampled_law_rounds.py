"""Sampled output law over several rounds, with the draft budget changing between rounds (issue 13).

test_sampling_e2e.py checks new tokens 2 and 3 with a fixed gamma: the first speculative round only.
Here each method generates its first K = 5 new tokens (token 1 from the prompt's pass, tokens 2..5
from two or more speculative rounds) many times with fixed seeds, through the real round loop
(`generate_tokens`, with an InProcessSource or a DuoSource) and the real drafters, while the draft budget changes between
rounds: a schedule (chains 1, 3, 2, 1, ...; trees 2, 5, 3, ...) or the production cost-driven
policies, whose budget follows the online acceptance and the draft's confidences. The target is a
one-layer float32 Qwen2 (tests/tiny_models.py's config) with an 8-token vocabulary, so the exact law
of the 5 new tokens is enumerated from the target's own autoregressive conditionals (1 + 8 + ... +
8^4 contexts, warped by `warp_probs` as the engine warps them). Every pair of consecutive new tokens,
(1,2) .. (4,5), is compared with the exact law by chi-square (`law_checks.goodness_of_fit`, which
also asserts that no token outside the warped support appears); pairs (3,4) and (4,5) mostly span a
round boundary or lie in a later round. Each test also asserts that it exercised what it claims:
verified draft sizes that differ within a run, tokens 4 and 5 coming from round 2 or later, later
rounds that accepted draft tokens, and acceptance neither ~0 nor ~1.

Duo runs its real source (`DuoSource`) and the child's real state machine (`SpeculativeChain`,
which drafts ahead, then keeps or rolls back its chain on commit) in this process, behind
`InProcessDraft`, a stand-in for the pipe of `DraftProcess` that answers `take` as the child's loop
does. Unlike a real child it drafts ahead a scheduled number of tokens instead of as many as time
allows, so runs repeat seed for seed. (tests/test_duo.py runs the spawned process.)

Default run (~45-55 s here): sd, pld, multiseq and duo (warped: t 0.8, top-k 5, top-p 0.9) and
specexec (t 1) with scheduled budgets, 320 runs each, and two negative controls. `-m slow` (~9 min):
every case, also sd and duo with the production cost-driven policies and `auto`, under both sampling
settings at 2,000 runs each, a subtle negative control, and the Duo finding below end to end.

Threshold: seeds are fixed, so every test is deterministic. Under a correct engine a p-value is
uniform on [0, 1], so "p > 1e-4" for 4 pairs fails a correct engine for about 1 seed set in 2,500.
The negative controls (verifiers that accept every draft or recover from p instead of the residual;
a budget that reads the token it includes) run through the same check and land below 1e-7.

Found by these tests and fixed: DuoPlanner.choose_chain decided whether a sampled chain's first token
was verified from that token's own draft probability when one draft token alone did not pay (see
DUO_PLANNER_BUG; the old rule is kept below as a negative control that fails the exact law).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from inprocess_draft import InProcessDraft
from law_checks import first_tokens, goodness_of_fit
from tiny_models import perturbed, tiny_config
from transformers import Qwen2ForCausalLM

from duospec.budget.duo import DuoPlanner
from duospec.budget.model import CostProfile
from duospec.budget.policy import DraftBudget, GammaPolicy
from duospec.config import GenerationRequest, SamplingConfig
from duospec.drafting.auto import AutoDrafter
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.lookup import LookupDrafter
from duospec.drafting.multiseq import MultiSequenceDrafter
from duospec.drafting.specexec import SpecExecDrafter
from duospec.drafting.suffix import SuffixDrafter, SuffixHistory, SuffixPolicy
from duospec.engines import steps
from duospec.engines.draft_process import ChainReply
from duospec.engines.duo import DuoSource
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.sampling import sample, warp_probs
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import Verdict, chain_acceptance_law, verify, walk

VOCAB = 8
PROMPT = [3, 4, 5, 3, 4]  # ends in a repeated bigram, so prompt lookup proposes drafts
K = 5  # new tokens checked: token 1 from the prefill, 2..5 from the speculative rounds
MAX_NEW = 32  # never reached: a run stops reading after K tokens, so no round is cut by the length
SAMPLES = 320  # runs per default law test (3-9 s each here)
CONTROL_SAMPLES = 200  # runs of the blatant negative control
CUT_SAMPLES = 400  # runs of the subtler one
SLOW_SAMPLES = 2000  # runs per case and sampling setting in the thorough (slow) variant
P_MIN = 1e-4
PLAIN = SamplingConfig(temperature=1.0)
WARPED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
CHAIN_SCHEDULE = (1, 3, 2)
TREE_SCHEDULE = (2, 5, 3)
# Fake pass costs (seconds of one target pass over n tokens) for the cost-driven policies: GPU-like,
# so drafting pays, and the budget moves with the acceptance and confidences seen (tests/test_duo.py's).
FLAT = CostProfile({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.012, 33: 0.015})
# A pass over 2 or 3 tokens costs 1.9 one-token passes: one draft token does not pay at the prior
# acceptance (1.8 tokens / 1.9 < 1.05), two do when the first is likely enough.
ONE_DOES_NOT_PAY = CostProfile({1: 0.010, 2: 0.019, 3: 0.019, 4: 0.01995})


# ===================================================================================================
# Models and the exact law


def one_layer_model(seed: int, lm_head_scale: float) -> Qwen2ForCausalLM:
    """tiny_models.tiny_model's config with one decoder layer (a pass costs ~1.0 ms here, not ~1.4)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(VOCAB, max_positions=64, layers=1)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_module():
    # tiny_model's sharpening (x8) softened 4x as in test_sampling_e2e.py: every token keeps real mass.
    return one_layer_model(seed=11, lm_head_scale=2.0)


@pytest.fixture(scope="module")
def draft_module(target_module):
    draft = perturbed(target_module, noise=0.3, seed=5)
    with torch.no_grad():
        draft.lm_head.weight.mul_(3.0)  # surer than the target: rejections and residual draws are frequent
    return draft


@pytest.fixture(scope="module")
def target(target_module):
    return HFModel(target_module, "target8")


@pytest.fixture(scope="module")
def models(target_module, draft_module, target):
    return target_module, draft_module, target


_LAWS: dict = {}


def exact_law(target_module, sampling: SamplingConfig) -> torch.Tensor:
    """float64 [V] * K: P(new tokens = t1..tK) under the warped target, by enumerating every prefix
    (8^k contexts at step k, in one batched pass each)."""
    key = (id(target_module), sampling.temperature, sampling.top_k, sampling.top_p)
    if key not in _LAWS:
        prefixes = torch.zeros(1, 0, dtype=torch.long)
        law = torch.ones(1, dtype=torch.float64)
        for _ in range(K):
            contexts = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
            with torch.no_grad():
                probs = warp_probs(target_module(contexts).logits[:, -1], sampling).double()  # [n, V]
            law = (law[:, None] * probs).reshape(-1)  # index i * V + v: prefix i, then token v
            prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(prefixes))[:, None]], dim=1)
        _LAWS[key] = (law / law.sum()).view([VOCAB] * K)
    return _LAWS[key]


def pair_p_values(counts: torch.Tensor, law: torch.Tensor, require_support: bool = True) -> list[float]:
    """Chi-square p-value of every pair of consecutive new tokens, (1,2) .. (K-1,K)."""
    values = []
    for first in range(K - 1):
        others = tuple(d for d in range(K) if d not in (first, first + 1))
        values.append(goodness_of_fit(counts.sum(others), law.sum(others), require_support))
    return values


def assert_law(counts: torch.Tensor, target_module, sampling: SamplingConfig) -> None:
    p_values = pair_p_values(counts, exact_law(target_module, sampling))
    assert min(p_values) > P_MIN, f"pairs (1,2)..(4,5): p = {[f'{p:.3g}' for p in p_values]}"


def test_exact_law_is_the_target_autoregressive_law(target_module):
    """Sanity of the enumeration: a law that sums to 1, whose token-1 marginal is the target's row
    after the prompt."""
    law = exact_law(target_module, PLAIN)
    with torch.no_grad():
        first = warp_probs(target_module(torch.tensor([PROMPT])).logits[0, -1], PLAIN).double()
    assert torch.allclose(law.sum((1, 2, 3, 4)), first / first.sum(), atol=1e-6)
    assert abs(float(law.sum()) - 1.0) < 1e-9


# ===================================================================================================
# Budgets that change between rounds, and recording what ran


class ScheduledBudget:
    """The engine's budget policy (GammaPolicy's interface) whose budget follows a fixed schedule,
    round after round: draft sizes that change between rounds and never depend on the tokens."""

    fixed_gamma = None
    alpha = 0.5

    def __init__(self, schedule: tuple[int, ...], tree: bool = False) -> None:
        self.schedule, self.tree = schedule, tree
        self.reset()

    def reset(self) -> None:
        self.asked: list[int] = []

    def next_budget(self) -> DraftBudget:
        budget = self.schedule[len(self.asked) % len(self.schedule)]
        self.asked.append(budget)
        return DraftBudget(budget, tree=self.tree)

    def observe_round(self, tree, verdict) -> None:
        pass

    def observe(self, drafted: int, accepted: int) -> None:
        pass


class RecordingDrafter:
    """A real drafter, recording each proposal's kind: "chain" or "tree", and for `auto` the
    method that drafted it (from AutoDrafter.rounds)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.kinds: Counter = Counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, context, budget, sampling, generator) -> TokenTree:
        rounds = Counter(getattr(self.inner, "rounds", {}))
        tree = self.inner.propose(context, budget, sampling, generator)
        self.kinds["chain" if tree.is_chain else "tree"] += 1
        self.kinds.update((Counter(getattr(self.inner, "rounds", {})) - rounds).elements())
        return tree

    def feedback(self, verdict: Verdict) -> None:
        self.inner.feedback(verdict)


@dataclass
class Exercise:
    """What the runs of one test did: the evidence that it exercised what it claims."""

    runs: int = 0
    varied: int = 0  # runs whose verified draft sizes took two values or more
    later_tail: int = 0  # runs whose tokens 4 and 5 both came from speculative round 2 or later
    later_accepting: int = 0  # runs in which a round after the first emitted >= 2 tokens
    drafted: int = 0
    accepted: int = 0
    kinds: Counter = field(default_factory=Counter)

    def add(self, stats: GenerationStats) -> None:
        passes = stats.tokens_per_pass  # tokens emitted by each target pass, the prefill's first
        self.runs += 1
        self.varied += len(set(stats.gammas)) >= 2
        pass_of = [index for index, n in enumerate(passes) for _ in range(n)]  # the pass of each token
        self.later_tail += pass_of[3] >= 2 and pass_of[4] >= 2
        self.later_accepting += any(n >= 2 for n in passes[2:])
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens

    def check(self, varied: float = 0.5, later_accepting: float = 0.3) -> None:
        assert self.varied >= varied * self.runs, f"draft sizes varied within {self.varied} of {self.runs} runs only"
        assert self.later_tail >= 0.3 * self.runs, f"tokens 4-5 came from round 2+ in {self.later_tail} of {self.runs} runs only"
        assert self.later_accepting >= later_accepting * self.runs, f"a later round accepted a draft in {self.later_accepting} of {self.runs} runs only"
        assert 0.05 < self.accepted / self.drafted < 0.95, f"acceptance {self.accepted}/{self.drafted}"


# ===================================================================================================
# Running the engines


def seeded(sampling: SamplingConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(sampling.temperature, sampling.top_k, sampling.top_p, seed)


def run_in_process(target, drafter, policy, sampling: SamplingConfig, samples: int, first_seed: int = 0):
    """counts [V] * K of the first K new tokens over seeded runs of the loop with an in-process drafter."""
    counts = torch.zeros([VOCAB] * K)
    exercise = Exercise()
    for seed in range(first_seed, first_seed + samples):
        request = GenerationRequest(method="sd", max_new_tokens=MAX_NEW, sampling=seeded(sampling, seed))
        stats = GenerationStats("law", len(PROMPT))
        counts[tuple(first_tokens(generate_tokens(target, InProcessSource(drafter, policy), PROMPT, request, frozenset(), stats), K))] += 1
        exercise.add(stats)
    if isinstance(drafter, RecordingDrafter):
        exercise.kinds.update(drafter.kinds)
    return counts, exercise


class ScheduledDraft(InProcessDraft):
    """The in-process draft (tests/inprocess_draft.py) drafting `ahead[round]` more tokens after each
    take; it records how many tokens were already drafted when each later round's take came."""

    def __init__(self, model: HFModel, ahead: tuple[int, ...]) -> None:
        super().__init__(model, VOCAB, lambda round_: ahead[round_ % len(ahead)])
        self.ready_at_take: list[int] = []

    def take(self, min_tokens: int, max_tokens: int, sampled: bool, max_sequences: int = 1) -> ChainReply:
        if self.rounds:
            self.ready_at_take.append(len(self.state.chain))
        return super().take(min_tokens, max_tokens, sampled, max_sequences)


class ScheduledDuoPlanner(DuoPlanner):
    """A DuoPlanner whose round r waits for and verifies schedule[r] draft tokens, whatever their
    confidences (the engine caps it by what is ready and by the room left)."""

    def __init__(self, schedule: tuple[int, ...]) -> None:
        self.schedule = schedule
        super().__init__(FLAT, 0.001, max_gamma=max(schedule))

    def reset(self) -> None:
        super().reset()
        self.rounds = 0

    def wait_for(self, first_round: bool) -> int:
        return self.schedule[self.rounds % len(self.schedule)]

    def choose_chain(self, confidences: list[float]) -> tuple[int, float]:
        gamma = min(len(confidences), self.schedule[self.rounds % len(self.schedule)])
        self.rounds += 1
        return gamma, self._predict(confidences[:gamma])


def run_duo(target, draft_module, planner: DuoPlanner, sampling: SamplingConfig, samples: int, first_seed: int = 0, ahead=(2, 0, 3)):
    draft = ScheduledDraft(HFModel(draft_module, "draft8"), ahead)
    counts = torch.zeros([VOCAB] * K)
    exercise = Exercise()
    for seed in range(first_seed, first_seed + samples):
        request = GenerationRequest(method="duo", max_new_tokens=MAX_NEW, sampling=seeded(sampling, seed))
        stats = GenerationStats("duo", len(PROMPT))
        counts[tuple(first_tokens(generate_tokens(target, DuoSource(draft, planner), PROMPT, request, frozenset(), stats), K))] += 1
        assert stats.fallback == ""
        exercise.add(stats)
    exercise.kinds["kept past a commit"] += sum(ready > 0 for ready in draft.ready_at_take)
    return counts, exercise


# ===================================================================================================
# The cases: every method, with budgets that change between rounds


def case_sd(models, sampling, samples, first_seed):
    """sd: chains of 1, 3, 2, 1, ... draft tokens, verified by rejection sampling."""
    _, draft_module, target = models
    counts, exercise = run_in_process(target, ChainDrafter(HFModel(draft_module), VOCAB), ScheduledBudget(CHAIN_SCHEDULE), sampling, samples, first_seed)
    exercise.check()
    return counts


def case_sd_cost(models, sampling, samples, first_seed):
    """sd with the production GammaPolicy: gamma follows the online acceptance, and (a draft step
    having a cost) each chain stops where the draft's cumulative confidence falls below the floors."""
    _, draft_module, target = models
    policy = GammaPolicy(FLAT, draft_step_seconds=0.0001, max_gamma=6)
    counts, exercise = run_in_process(target, ChainDrafter(HFModel(draft_module), VOCAB), policy, sampling, samples, first_seed)
    exercise.check(varied=0.3)
    return counts


def case_pld(models, sampling, samples, first_seed):
    """pld: prompt-lookup chains (one-hot q) of up to 1, 3, 2, ... tokens. A random target rarely
    continues a copy, so fewer later rounds accept."""
    _, _, target = models
    counts, exercise = run_in_process(target, LookupDrafter(), ScheduledBudget(CHAIN_SCHEDULE), sampling, samples, first_seed)
    exercise.check(later_accepting=0.1)
    return counts


def case_multiseq(models, sampling, samples, first_seed):
    """multiseq: budgets 1, 3, 2, ...; a budget of 1 is a chain (rejection sampling with q), larger
    ones branch into trees (target-sample matching) when the draft is unsure of the first token."""
    _, draft_module, target = models
    drafter = RecordingDrafter(MultiSequenceDrafter(HFModel(draft_module), VOCAB))
    counts, exercise = run_in_process(target, drafter, ScheduledBudget(CHAIN_SCHEDULE), sampling, samples, first_seed)
    exercise.check()
    assert exercise.kinds["tree"] > 0.2 * samples and exercise.kinds["chain"] > samples, exercise.kinds
    return counts


def case_specexec(models, sampling, samples, first_seed):
    """specexec: best-first trees of 2, 5, 3, ... nodes (depth cap 2), target-sample matching."""
    _, draft_module, target = models
    drafter = RecordingDrafter(SpecExecDrafter(HFModel(draft_module), VOCAB, depth=2))
    counts, exercise = run_in_process(target, drafter, ScheduledBudget(TREE_SCHEDULE, tree=True), sampling, samples, first_seed)
    exercise.check()
    assert exercise.kinds["tree"] > samples, exercise.kinds
    return counts


def suffix_history() -> SuffixHistory:
    """Earlier "requests" that begin like PROMPT and go on in several ways, so suffix trees branch
    and their size follows the match (1 to 7 tokens long) from round to round."""
    history = SuffixHistory()
    for continuation in ([5, 3, 4, 5, 6], [5, 7, 1], [6, 2, 2, 0], [5, 3, 4, 6], [1, 1, 0, 7, 2]):
        history.add([*PROMPT, *continuation])
    return history


def case_suffix(models, sampling, samples, first_seed):
    """suffix: trees of what followed the context's longest match in the history and the request
    (sized by the cost policy, calibrated online), verified by target-sample matching."""
    _, _, target = models
    drafter = RecordingDrafter(SuffixDrafter(suffix_history(), SuffixPolicy(FLAT, max_nodes=6)))
    counts, exercise = run_in_process(target, drafter, drafter.inner.policy, sampling, samples, first_seed)
    exercise.check(varied=0.3, later_accepting=0.1)
    assert exercise.kinds["tree"] > 0.5 * samples, exercise.kinds
    return counts


def case_auto(models, sampling, samples, first_seed):
    """auto: each round a suffix tree or the draft model's chain or nothing, each with its own
    cost-driven policy, so both the method and its budget change between rounds."""
    _, draft_module, target = models
    # No history: suffix trees come from the request's own repeats (PROMPT ends in one), so the draft
    # model gets the rounds where nothing repeats.
    auto = AutoDrafter(SuffixDrafter(None, SuffixPolicy(FLAT, max_nodes=4)), ChainDrafter(HFModel(draft_module), VOCAB), GammaPolicy(FLAT, 0.0001, max_gamma=4))
    drafter = RecordingDrafter(auto)
    counts, exercise = run_in_process(target, drafter, auto.policy, sampling, samples, first_seed)
    exercise.check(varied=0.3)
    assert exercise.kinds["suffix"] > 0.5 * samples and exercise.kinds["sd"] > 0.5 * samples, exercise.kinds
    return counts


def case_duo(models, sampling, samples, first_seed):
    """duo: chains of 1, 3, 2, ... tokens taken from the chain the draft drafted ahead (kept past a
    guessed bonus token, or rolled back), verified by rejection sampling with the child's q rows."""
    _, draft_module, target = models
    counts, exercise = run_duo(target, draft_module, ScheduledDuoPlanner(CHAIN_SCHEDULE), sampling, samples, first_seed)
    exercise.check()
    assert exercise.kinds["kept past a commit"] > 0.05 * samples, exercise.kinds
    return counts


def case_duo_cost(models, sampling, samples, first_seed):
    """duo with the production DuoPlanner on the flat cost curve: each round verifies the ready
    prefix with the most expected tokens per second (it waits for more when fewer are ready)."""
    _, draft_module, target = models
    counts, exercise = run_duo(target, draft_module, DuoPlanner(FLAT, 0.001, max_gamma=4), sampling, samples, first_seed)
    exercise.check(varied=0.3)
    return counts


CASES = {
    "sd": case_sd,
    "sd-cost": case_sd_cost,
    "pld": case_pld,
    "suffix": case_suffix,
    "multiseq": case_multiseq,
    "specexec": case_specexec,
    "auto": case_auto,
    "duo": case_duo,
    "duo-cost": case_duo_cost,
}
# The default run: one sampling setting per method (both kinds of warping covered), SAMPLES runs each.
DEFAULT_CASES = [("sd", WARPED), ("pld", WARPED), ("suffix", WARPED), ("multiseq", WARPED), ("specexec", PLAIN), ("duo", WARPED)]


@pytest.mark.parametrize("name, sampling", DEFAULT_CASES, ids=[f"{name}-{'warped' if s is WARPED else 't1'}" for name, s in DEFAULT_CASES])
def test_law_over_rounds_with_changing_budgets(models, name, sampling):
    counts = CASES[name](models, sampling, SAMPLES, first_seed=0)
    assert_law(counts, models[0], sampling)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [PLAIN, WARPED], ids=["t1", "warped"])
@pytest.mark.parametrize("name", list(CASES))
def test_law_over_rounds_thorough(models, name, sampling):
    """Every case, both sampling settings, SLOW_SAMPLES runs on seeds the default run does not use."""
    counts = CASES[name](models, sampling, SLOW_SAMPLES, first_seed=100_000)
    assert_law(counts, models[0], sampling)


# ===================================================================================================
# Negative controls: biased samplers through the same check


def verify_accepting_every_draft(tree, target_logits, sampling, generator, lenience=1.0) -> Verdict:
    """Biased on purpose: a chain's draft tokens are all accepted, then a bonus token from p."""
    if tree.n_nodes == 1 or not tree.is_chain or sampling.is_greedy:
        return verify(tree, target_logits, sampling, generator, lenience)
    bonus = int(sample(warp_probs(target_logits[-1:], sampling), generator)[0])
    return Verdict(path=list(range(tree.n_nodes)), next_token=bonus, tokens=tree.tokens[1:].tolist() + [bonus])


def verify_recovering_from_the_target(tree, target_logits, sampling, generator, lenience=1.0) -> Verdict:
    """Biased on purpose, subtly: rejection sampling whose recovered token is drawn from p instead of
    norm(max(0, p - q)), so the tokens the draft over-proposes are emitted too often."""
    if tree.n_nodes == 1 or not tree.is_chain or sampling.is_greedy:
        return verify(tree, target_logits, sampling, generator, lenience)
    target_probs = warp_probs(target_logits, sampling)
    accept_probs, _ = chain_acceptance_law(target_probs, tree.tokens[1:], tree.draft_probs, lenience)
    accepted = torch.rand(accept_probs.shape, generator=generator) < accept_probs
    n_accepted = int(torch.cumprod(accepted.long(), 0).sum())
    next_token = int(sample(target_probs, generator)[n_accepted])  # the bug: p, not the residual
    return Verdict(path=list(range(n_accepted + 1)), next_token=next_token, tokens=tree.tokens[1 : n_accepted + 1].tolist() + [next_token])


class CutAtAnUnsureToken:
    """Biased on purpose: a budget that reads the token it includes. The chain is cut before its first
    draft token whose own draft probability is below `floor`, so the tokens kept were kept because
    they looked likely, and are no longer draws from the q rows the verifier is given. (The
    production floors decide on token j + 1 from tokens 1..j, which keeps the chain exact.)"""

    def __init__(self, inner: ChainDrafter, floor: float) -> None:
        self.inner, self.floor = inner, floor
        self.model = inner.model

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, context, budget, sampling, generator) -> TokenTree:
        tree = self.inner.propose(context, budget, sampling, generator)
        if tree.draft_probs is None:
            return tree
        own = tree.draft_probs.gather(1, tree.tokens[1:, None]).squeeze(1)  # q of each draft token
        unsure = (own < self.floor).nonzero()
        keep = int(unsure[0]) if len(unsure) else tree.n_draft
        return TokenTree.chain(tree.tokens[: keep + 1], tree.draft_probs[:keep] if keep else None)

    def feedback(self, verdict: Verdict) -> None:
        self.inner.feedback(verdict)  # the draft cache held only fed drafts; the accepted ones stay valid


def control_p_values(models, drafter, sampling: SamplingConfig, samples: int) -> list[float]:
    target_module, _, target = models
    counts, exercise = run_in_process(target, drafter, ScheduledBudget(CHAIN_SCHEDULE), sampling, samples)
    assert exercise.later_accepting > 0.3 * samples  # the biased runs are multi-round runs too
    return pair_p_values(counts, exact_law(target_module, sampling), require_support=False)


def test_the_check_rejects_a_verifier_that_accepts_every_draft(models, monkeypatch):
    """Blatant: with an unrelated draft (another random model), accepting every draft token emits
    the draft's law (p ~ 1e-24 at the later pairs when written)."""
    monkeypatch.setattr(steps, "verify", verify_accepting_every_draft)
    unrelated = one_layer_model(seed=12, lm_head_scale=6.0)
    p_values = control_p_values(models, ChainDrafter(HFModel(unrelated), VOCAB), WARPED, CONTROL_SAMPLES)
    assert max(p_values[2:]) < 1e-10, p_values  # the pairs (3,4) and (4,5), in the later rounds


def test_the_check_rejects_a_budget_that_reads_the_token_it_includes(models):
    """Subtler, and the hazard of budgets that change within a round: cutting a chain where its own
    tokens look unlikely (p ~ 1e-8 and 1e-10 at the later pairs when written)."""
    p_values = control_p_values(models, CutAtAnUnsureToken(ChainDrafter(HFModel(models[1]), VOCAB), floor=0.3), WARPED, CUT_SAMPLES)
    assert max(p_values[2:]) < 1e-6, p_values


def walk_accepting_a_first_child(tree, choice) -> Verdict:
    """Biased on purpose, for trees: where the target's choice at a node has no child, the walk goes
    on into the node's first child anyway (a tree verifier that over-accepts)."""
    choice = choice.clone()
    for node in range(tree.n_nodes):
        children = [child for child in range(1, tree.n_nodes) if tree.parents[child] == node]
        carried = [int(tree.tokens[child]) for child in children]
        if carried and int(choice[node]) not in carried:
            choice[node] = carried[0]
    return walk(tree, choice)


def test_the_check_rejects_a_tree_verifier_that_over_accepts(models, monkeypatch):
    """The suffix case through the same check, with its trees verified by the biased walk."""
    monkeypatch.setattr(steps, "walk", walk_accepting_a_first_child)
    target_module, _, target = models
    drafter = SuffixDrafter(suffix_history(), SuffixPolicy(FLAT, max_nodes=6))
    counts, exercise = run_in_process(target, drafter, drafter.policy, WARPED, CONTROL_SAMPLES)
    assert exercise.drafted > CONTROL_SAMPLES
    p_values = pair_p_values(counts, exact_law(target_module, WARPED), require_support=False)
    assert max(p_values) < 1e-6, p_values


@pytest.mark.slow
def test_the_check_rejects_a_recovered_token_drawn_from_the_target(models, monkeypatch):
    """The subtle one: p and the residual differ little on this near-uniform target, so it takes the
    thorough run's sample size to see it (p ~ 1e-4 at 300 runs, ~1e-9 at 500)."""
    monkeypatch.setattr(steps, "verify", verify_recovering_from_the_target)
    p_values = control_p_values(models, ChainDrafter(HFModel(models[1]), VOCAB), WARPED, SLOW_SAMPLES)
    assert max(p_values[2:]) < 1e-8, p_values  # caught at the later pairs (3,4) and (4,5) as well


# ===================================================================================================
# Found and fixed: DuoPlanner.choose_chain read the first token it included (sampled duo, some cost curves)

DUO_PLANNER_BUG = (
    "(fixed) DuoPlanner.choose_chain scanned j = 1, 2, ... and breaks at the first j that does not improve the "
    "rate only once best > 0; while best == 0 it goes on, and rate(j + 1) includes token 1's draft "
    "confidence. So where one draft token does not pay but two do (t(2) / t(1) >= (1 + alpha_first) / 1.05), "
    "whether the chain (token 1 included) is verified depends on token 1's own q: a sampled chain whose "
    "first token is kept because it looked likely is no longer drawn from the q rows that rejection "
    "sampling is given, and the output law drifts (the class docstring promises the opposite)."
)


def first_token_law(planner: DuoPlanner, target_row: torch.Tensor, draft_row: torch.Tensor) -> torch.Tensor:
    """Exact law of the first token a Duo round emits when the draft has two sampled tokens ready:
    x1 ~ q; the planner's choose_chain sees the ready tokens' confidences (q(x1), then a second one,
    which cannot matter for the first emitted token); gamma = 0 emits a target sample, gamma >= 1
    verifies x1 by rejection sampling (the real chain_acceptance_law)."""
    law = torch.zeros(VOCAB, dtype=torch.float64)
    rows = torch.stack([target_row, target_row]).float()  # position 1, and a bonus row (unused here)
    for x1 in range(VOCAB):
        weight = float(draft_row[x1])
        gamma, _ = planner.choose_chain([weight, 0.5])
        if gamma == 0:
            law += weight * target_row.double()
            continue
        accept, residual = chain_acceptance_law(rows, torch.tensor([x1]), draft_row[None].float())
        law[x1] += weight * float(accept[0])
        law += weight * (1 - float(accept[0])) * residual[0].double()
    return law


# A target sure of token 0, a draft that ranks it first but less surely: a chain starting with 0 is
# always accepted, one starting elsewhere is rejected (p < q there).
TARGET_ROW = torch.tensor([0.72, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04], dtype=torch.float64)
DRAFT_ROW = torch.tensor([0.37, 0.09, 0.09, 0.09, 0.09, 0.09, 0.09, 0.09], dtype=torch.float64)


def test_duo_planner_first_token_law_when_one_token_pays():
    """The exact law above is the target's where choose_chain verifies a chain whatever its tokens
    (flat costs): the computation itself is right, and so is the planner there."""
    law = first_token_law(DuoPlanner(FLAT, 0.001), TARGET_ROW, DRAFT_ROW)
    assert torch.allclose(law, TARGET_ROW, atol=1e-6), law


def test_duo_planner_first_token_law_when_one_token_does_not_pay():
    """Costs where one draft token does not pay but two do: token 1 joins the chain (or not) on the
    online rates alone, so the first token's law is the target's."""
    law = first_token_law(DuoPlanner(ONE_DOES_NOT_PAY, 0.001), TARGET_ROW, DRAFT_ROW)
    assert torch.allclose(law, TARGET_ROW, atol=1e-6), law


class ScanningPastTokenOnePlanner(DuoPlanner):
    """Control: the rule before the fix, which scanned on past a first token that did not pay, so the
    rate at j = 2 (token 1's own confidence in it) decided whether token 1 was verified."""

    def choose_chain(self, confidences: list[float]) -> tuple[int, float]:
        ready = min(len(confidences), self.max_gamma)
        first, later = self.policy.alpha_first, self.policy.alpha_next
        reach, expected, best, best_rate = 1.0, 1.0, 0, 1.05 / self.profile.target_pass(1)
        for j in range(1, ready + 1):
            expected += reach * (first if j == 1 else later)
            rate = expected / self.profile.target_pass(j + 1)
            if rate > best_rate:
                best, best_rate = j, rate
            elif best:
                break
            reach *= min(0.99, confidences[j - 1] * self.calibration)
        return best, self._predict(confidences[:best])


def test_control_the_old_rule_biases_the_first_token():
    """The chain was verified only when q(x1) was above about 0.24, i.e. only when x1 was token 0, so
    token 0 came out with probability 0.37 * 1 + 0.63 * 0.72 = 0.82 instead of 0.72."""
    law = first_token_law(ScanningPastTokenOnePlanner(ONE_DOES_NOT_PAY, 0.001), TARGET_ROW, DRAFT_ROW)
    assert abs(float(law[0]) - 0.8236) < 1e-3, law


DUO_SAMPLES = 1000  # the old rule gave p ~ 1e-13 at these 1,000 runs


@pytest.fixture(scope="module")
def sure_models():
    """A sharper target (x32) and the same weights as a draft at half the sharpness: the draft ranks
    like the target but less surely, so its confidence in token 1 often crosses the planner's bar."""
    target_module = one_layer_model(seed=11, lm_head_scale=32.0)
    draft_module = Qwen2ForCausalLM(target_module.config).float().eval()
    draft_module.load_state_dict(target_module.state_dict())
    with torch.no_grad():
        draft_module.lm_head.weight.mul_(0.5)
    return target_module, draft_module, HFModel(target_module, "sure-target8")


@pytest.mark.slow
def test_duo_law_with_the_cost_driven_planner_when_one_token_does_not_pay(sure_models):
    """End to end through the loop and DuoSource: the production DuoPlanner on ONE_DOES_NOT_PAY. (The same
    models and engine with the flat curve pass: test_duo_law_with_the_cost_driven_planner_on_sure_models.)"""
    target_module, draft_module, target = sure_models
    counts, exercise = run_duo(target, draft_module, DuoPlanner(ONE_DOES_NOT_PAY, 0.001, max_gamma=2), PLAIN, DUO_SAMPLES, ahead=(0,))
    assert exercise.drafted > 0.5 * DUO_SAMPLES and exercise.later_accepting > 0.5 * DUO_SAMPLES
    assert_law(counts, target_module, PLAIN)


@pytest.mark.slow
def test_duo_law_with_the_cost_driven_planner_on_sure_models(sure_models):
    """The control of the test above: same models, same engine, flat costs: the law holds."""
    target_module, draft_module, target = sure_models
    counts, exercise = run_duo(target, draft_module, DuoPlanner(FLAT, 0.001, max_gamma=2), PLAIN, DUO_SAMPLES, ahead=(0,))
    assert exercise.drafted > 0.5 * DUO_SAMPLES and exercise.later_accepting > 0.5 * DUO_SAMPLES
    assert_law(counts, target_module, PLAIN)
