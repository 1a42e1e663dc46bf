"""DuoDecoding's dynamic multi-sequence drafting: the pure rules, the drafter, and why both stay exact.

Convention: p = target, q = draft; below written `target` / `draft`.

What is proven, and how:
(a) The rules on hand-built numbers: `branch_first_tokens` (worked example with theta by hand, caps,
    distinctness, the count not depending on the sampled main token), `split_budget` (its promises over
    a grid of inputs), `tree_from_sequences` (parents, depths, paths).
(b) Exact laws in float64 on vocabulary 4: a hand-built multi-sequence tree verified by target-sample
    matching emits exactly the target's law; the branching rule keeps the single-sequence chain's
    rejection sampling exact, and the rule that puts the sampled token's own log-prob into theta
    does not (negative control). Empirical: chi-square of `verify_tree_sampling` on that tree.
(c) Tiny real float32 models (tests/tiny_models.py): greedy output through the engine equals
    autoregressive greedy for drafts "same", "random" and "perturbed", with rounds that really branch;
    a draft sure of itself makes the drafter ChainDrafter token for token (greedy and seeded sampling);
    after every round the draft cache equals a fresh run of the accepted context.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tiny_models import perturbed, tiny_model, tiny_pipeline

from duospec.budget.policy import DraftBudget, GammaPolicy
from duospec.config import GenerationRequest, SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.drafting.multiseq import MAX_SEQUENCES, MultiSequenceDrafter, branch_first_tokens, split_budget, tree_from_sequences
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.sampling import choose, warp_probs
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import chain_acceptance_law, verify, verify_tree_sampling, walk

# ===================================================================================================
# (a) The rules on hand-built numbers.

# Tokens 4, 2, 0, 5, 1, 3 in rank order (ids shuffled so rank and id differ).
DOC_FIRST_PROBS = {4: 0.40, 2: 0.25, 0: 0.15, 5: 0.10, 1: 0.06, 3: 0.04}


def doc_first_logprobs() -> torch.Tensor:
    probs = torch.zeros(6, dtype=torch.float64)
    for token, prob in DOC_FIRST_PROBS.items():
        probs[token] = prob
    return probs.log()


def test_branch_first_tokens_docstring_example():
    # theta = log(0.40) + log(0.5) = log(0.20): tokens 4 (0.40) and 2 (0.25) are above, 0 (0.15) is not.
    first_logprobs = doc_first_logprobs()
    second_top = math.log(0.5)
    assert branch_first_tokens(first_logprobs, second_top, main_token=4) == [4, 2]  # not [4, 2, 0]
    # Sampled main token 0 (rank 3): still k = 2, counted from the top-1; 0 replaces the lowest one above theta.
    assert branch_first_tokens(first_logprobs, second_top, main_token=0) == [0, 4]  # not [0, 4, 2]
    # Sampled main token 2 (rank 2, itself above theta): the other one above theta joins it.
    assert branch_first_tokens(first_logprobs, second_top, main_token=2) == [2, 4]
    # A surer second position raises theta: log(0.40 * 0.9) = log(0.36) keeps only the top-1.
    assert branch_first_tokens(first_logprobs, math.log(0.9), main_token=4) == [4]
    # An unsure one lowers it: log(0.40 * 0.2) = log(0.08) lets 0.25, 0.15 and 0.10 in as well.
    assert branch_first_tokens(first_logprobs, math.log(0.2), main_token=4) == [4, 2, 0, 5]
    # A 0-d tensor for the second position (the drafter's way, no extra host sync) gives the same.
    assert branch_first_tokens(first_logprobs, torch.tensor(math.log(0.2)), torch.tensor([4])) == [4, 2, 0, 5]


def test_branch_first_tokens_certain_second_position_gives_one_sequence():
    """q = 1 at the second position: theta = max(lq1), which nothing exceeds, so no branching."""
    assert branch_first_tokens(doc_first_logprobs(), 0.0, main_token=4) == [4]


def test_branch_first_tokens_tied_top_tokens_both_start_sequences():
    first_logprobs = torch.tensor([0.45, 0.45, 0.1]).log()
    first = branch_first_tokens(first_logprobs, math.log(0.5), main_token=1)
    assert first == [1, 0]  # theta = log(0.225): both tied tokens are above it; main_token 1 not repeated


def test_branch_first_tokens_caps_repeats_and_count():
    """Over random laws and thresholds: at most max_sequences, main first and never repeated, extras
    above theta, and the count is the same whichever token is the main one (k never reads the draw)."""
    generator = torch.Generator().manual_seed(5)
    for trial in range(300):
        vocab = int(torch.randint(2, 40, (1,), generator=generator))
        first_logprobs = torch.log_softmax(3 * torch.randn(vocab, generator=generator), -1)
        if trial % 3 == 0:  # tokens removed by top-k warping
            first_logprobs[torch.rand(vocab, generator=generator) < 0.3] = float("-inf")
            first_logprobs[first_logprobs.argmax()] = first_logprobs.max().clamp_min(-1.0)
        second_top = -float(torch.rand(1, generator=generator)) * 4
        theta = float(first_logprobs.max()) + second_top
        max_sequences = int(torch.randint(1, 11, (1,), generator=generator))
        counts = set()
        for main in range(vocab):
            first = branch_first_tokens(first_logprobs, second_top, main, max_sequences)
            assert first[0] == main and len(set(first)) == len(first) <= max_sequences
            assert all(float(first_logprobs[token]) > theta for token in first[1:])
            counts.add(len(first))
        above = int((first_logprobs > theta).sum())
        assert counts == {min(max_sequences, max(1, above))}


def test_split_budget_docstring_examples():
    assert split_budget(8, 3) == [6, 1, 1]  # not [3, 3, 2]: the extras only insure the first token
    assert split_budget(16, 2) == [12, 4]
    assert split_budget(3, 5) == [1, 1, 1]  # only three one-token sequences fit
    assert split_budget(5, 1) == [5]
    assert split_budget(0, 4) == []


def test_split_budget_properties():
    for total in range(41):
        for sequences in range(1, 11):
            shares = split_budget(total, sequences)
            assert len(shares) == min(total, sequences)
            assert all(share >= 1 for share in shares)
            assert sum(shares) == total if total >= sequences else sum(shares) <= total
            if len(shares) > 1:
                assert len(set(shares[1:])) == 1  # the extras share alike
                assert shares[0] > shares[1] if total > sequences else shares[0] == shares[1] == 1
    with pytest.raises(ValueError):
        split_budget(4, 0)


def test_tree_from_sequences_docstring_example():
    tree = tree_from_sequences(7, [[3, 5], [9], [4, 6]])
    assert tree.tokens.tolist() == [7, 3, 5, 9, 4, 6]
    assert tree.parents == (-1, 0, 1, 0, 0, 4)  # not (-1, 0, 1, 2, 3, 4): the sequences are siblings
    assert tree.depths == (0, 1, 2, 1, 1, 2)
    assert tree.draft_probs is None and not tree.is_chain
    leaves = [2, 3, 5]
    assert [tree.tokens[tree.path_to(leaf)].tolist() for leaf in leaves] == [[7, 3, 5], [7, 9], [7, 4, 6]]


def test_tree_from_sequences_one_sequence_is_a_chain_and_bad_input_is_refused():
    chain = tree_from_sequences(torch.tensor([7]), [torch.tensor([3, 5, 9])])
    assert chain.is_chain and chain.tokens.tolist() == [7, 3, 5, 9]
    assert tree_from_sequences(7, []).tokens.tolist() == [7]
    with pytest.raises(ValueError, match="repeats token"):
        tree_from_sequences(7, [[3, 5], [3, 6]])  # two sequences may not start with the same token
    with pytest.raises(ValueError, match="at least one token"):
        tree_from_sequences(7, [[3], []])


# ===================================================================================================
# (b) Exact laws in float64 on a vocabulary of 4.

VOCAB = 4


class Law:
    """A tiny language model: prefix (tuple of tokens after the root) -> its law, [V] float64, drawn
    once per prefix from a Dirichlet (floor keeps every entry >= floor / V, for chi-square cells)."""

    def __init__(self, seed: int, floor: float = 0.0, root: list[float] | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.floor = floor
        self.cache = {} if root is None else {(): np.array(root, dtype=np.float64)}

    def __call__(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in self.cache:
            law = self.floor / VOCAB + (1 - self.floor) * self.rng.dirichlet(np.full(VOCAB, 0.8))
            self.cache[prefix] = law / law.sum()
        return self.cache[prefix]


def continue_by_target(target: Law, emitted: tuple[int, ...], weight: float, length: int, out: dict) -> None:
    """Add `weight` to `out` spread over the target's autoregressive continuations of `emitted` to `length` tokens."""
    if len(emitted) >= length:
        out[emitted[:length]] += weight
        return
    for token, prob in enumerate(target(emitted)):
        if prob > 0:
            continue_by_target(target, emitted + (token,), weight * prob, length, out)


def joint_law(target: Law, length: int) -> dict:
    out: dict = defaultdict(float)
    continue_by_target(target, (), 1.0, length, out)
    return out


def max_gap(law: dict, reference: dict) -> float:
    return max(abs(law.get(cell, 0.0) - reference.get(cell, 0.0)) for cell in set(law) | set(reference))


def node_contexts(tree: TokenTree) -> list[tuple[int, ...]]:
    """For each node, the tokens on its path after the root: the prefix the target scores it with."""
    tokens = tree.tokens.tolist()
    return [tuple(tokens[k] for k in tree.path_to(node)[1:]) for node in range(tree.n_nodes)]


def tree_output_law(tree: TokenTree, target: Law) -> dict:
    """The output law of target-sample matching over max depth + 1 tokens: every vector of independent
    per-node target samples, weighted by its probability, walked by the real `walk`."""
    contexts = node_contexts(tree)
    rows = [target(context) for context in contexts]
    length = max(tree.depths) + 1
    out: dict = defaultdict(float)
    for choice in itertools.product(range(VOCAB), repeat=tree.n_nodes):
        weight = math.prod(rows[node][token] for node, token in enumerate(choice))
        if weight > 0:
            verdict = walk(tree, torch.tensor(choice))
            continue_by_target(target, contexts[verdict.path[-1]] + (verdict.next_token,), weight, length, out)
    return out


# Three sequences under root 0: main [1, 2], then [3] and [0, 2] (token 0 again, below the root: allowed).
HAND_TREE_SEQUENCES = [[1, 2], [3], [0, 2]]


def test_multi_sequence_tree_law_is_exact():
    tree = tree_from_sequences(0, HAND_TREE_SEQUENCES)
    for seed in range(3):
        target = Law(seed=100 + seed)
        assert max_gap(tree_output_law(tree, target), joint_law(target, 3)) < 1e-12


def first_token_law(draft_first: np.ndarray, target_first: np.ndarray, first_tokens_of) -> np.ndarray:
    """Law of the first emitted token when the main first token m is drawn from q and the drafter
    returns the one-token chain [m] with draft_probs q (verified by rejection sampling) if
    first_tokens_of(m) is a single token, else a tree (target-sample matching: the root's target
    sample is emitted, whatever the tree holds)."""
    target_row = torch.from_numpy(target_first)[None].expand(2, VOCAB)  # rows: first position, bonus
    law = np.zeros(VOCAB)
    for main, weight in enumerate(draft_first):
        if len(first_tokens_of(main)) > 1:
            law += weight * target_first
            continue
        accept, residual = chain_acceptance_law(target_row, torch.tensor([main]), torch.from_numpy(draft_first)[None])
        accept = float(accept[0])
        law[main] += weight * accept
        law += weight * (1 - accept) * residual[0].numpy()
    return law


def test_branching_rule_keeps_the_single_chain_exact():
    """k is counted from the top-1 first token, so a chain's first token is still a draw from q and its
    draft_probs row is true: the first emitted token follows the target, whatever q looks like."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        draft_first, target_first = rng.dirichlet(np.full(VOCAB, 0.6), size=2)
        second_tops = rng.uniform(0.25, 1.0, size=VOCAB)  # top-1 probability at position 2 after each first token
        top = int(draft_first.argmax())
        first_logprobs = torch.from_numpy(np.log(draft_first))
        law = first_token_law(
            draft_first,
            target_first,
            lambda main: branch_first_tokens(first_logprobs, math.log(second_tops[top]), main, MAX_SEQUENCES),
        )
        assert np.abs(law - target_first).max() < 1e-12


def test_theta_from_the_sampled_token_breaks_the_single_chain():
    """Negative control: theta = log q(m) + log q2_top(m) for the *sampled* m branches after unlikely draws
    only, so the chains left over carry likely first tokens while draft_probs says q: the law drifts.

    q = [0.5, 0.3, 0.15, 0.05], q2_top = [0.9, 0.5, 0.9, 0.9], p = [0.2, 0.3, 0.3, 0.2]. Only m = 0
    keeps a chain (theta = log 0.45); there rejection sampling emits [0.4, 0, 0.3, 0.3] (accept 0.4,
    residual on tokens 2 and 3), the trees emit p: 0.5 * [0.4, 0, 0.3, 0.3] + 0.5 * p = [0.3, 0.15, 0.3, 0.25].
    """
    draft_first = np.array([0.5, 0.3, 0.15, 0.05])
    second_tops = np.array([0.9, 0.5, 0.9, 0.9])
    target_first = np.array([0.2, 0.3, 0.3, 0.2])
    first_logprobs = torch.from_numpy(np.log(draft_first))

    def own_theta(main: int) -> list[int]:  # pass second_top so that theta = lq1[main] + lq2_top(main)
        shift = math.log(draft_first[main]) - math.log(draft_first.max()) + math.log(second_tops[main])
        return branch_first_tokens(first_logprobs, shift, main)

    wrong = first_token_law(draft_first, target_first, own_theta)
    assert np.allclose(wrong, [0.3, 0.15, 0.3, 0.25], atol=1e-12)
    right = first_token_law(draft_first, target_first, lambda m: branch_first_tokens(first_logprobs, math.log(0.9), m))
    assert np.abs(right - target_first).max() < 1e-12


# Empirical threshold: for a correct sampler the statistic is chi-square with 15 degrees of freedom
# (pairs of tokens on vocabulary 4) and the p-value uniform, so "p > 1e-4" fails 1 seed in 10,000.
# The target's rows have entries >= 0.5 / 4, so each pair cell expects >= 0.125^2 * 6,000 = 94 samples.


def test_multi_sequence_tree_sampler_matches_target_empirically():
    tree = tree_from_sequences(0, HAND_TREE_SEQUENCES)
    target = Law(seed=300, floor=0.5)
    contexts = node_contexts(tree)
    target_probs = torch.tensor(np.stack([target(context) for context in contexts]), dtype=torch.float32)
    generator, extension = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    n_steps = 6_000
    counts = np.zeros(VOCAB * VOCAB)
    for _ in range(n_steps):
        verdict = verify_tree_sampling(tree, target_probs, generator)
        emitted = list(contexts[verdict.path[-1]]) + [verdict.next_token]
        while len(emitted) < 2:
            row = torch.tensor(target(tuple(emitted)), dtype=torch.float32)
            emitted.append(int(torch.multinomial(row, 1, generator=extension)))
        counts[emitted[0] * VOCAB + emitted[1]] += 1
    joint = joint_law(target, 2)
    expected = np.array([joint[(a, b)] for a in range(VOCAB) for b in range(VOCAB)]) * n_steps
    assert chisquare(counts, expected).pvalue > 1e-4


# ===================================================================================================
# (c) Tiny real models.

PROMPTS = ["w1 w2 w3", "w5 w9 w5 w9 w5", "w40"]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


DRAFTS = {
    "same": lambda target: target,
    "random": lambda target: tiny_model(seed=1),
    "perturbed": lambda target: perturbed(target, noise=0.2, seed=7),
}


class RecordingDrafter:
    """Passes every call through to a real drafter and keeps each proposed tree (no behaviour of its own)."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.model = drafter.model  # the engine reads the draft's device from here
        self.trees: list[TokenTree] = []

    def reset(self) -> None:
        self.drafter.reset()

    def propose(self, context, budget, sampling, generator) -> TokenTree:
        tree = self.drafter.propose(context, budget, sampling, generator)
        assert tree.n_draft <= budget.max_tokens
        self.trees.append(tree)
        return tree

    def feedback(self, verdict) -> None:
        self.drafter.feedback(verdict)


def first_level_children(tree: TokenTree) -> int:
    return sum(parent == 0 for parent in tree.parents)


def run_engine(pipe, drafter, prompt: str, gamma: int, sampling: SamplingConfig, max_new_tokens: int = 24) -> list[int]:
    ids = pipe.encode(prompt)
    request = GenerationRequest(method="sd", max_new_tokens=max_new_tokens, sampling=sampling)
    stats = GenerationStats("sd", len(ids))
    chunks = generate_tokens(pipe.target, InProcessSource(drafter, GammaPolicy(None, fixed_gamma=gamma)), ids, request, pipe.eos_ids, stats)
    return [token for chunk in chunks for token in chunk]


@pytest.mark.parametrize("draft_kind", list(DRAFTS))
@pytest.mark.parametrize("gamma", [2, 5, 12])
def test_multiseq_greedy_equals_autoregressive(target, draft_kind, gamma):
    pipe = tiny_pipeline(target)
    drafter = RecordingDrafter(MultiSequenceDrafter(HFModel(DRAFTS[draft_kind](target)), target.config.vocab_size))
    for prompt in PROMPTS:
        ar = pipe.generate(prompt, method="ar", max_new_tokens=24).token_ids
        assert run_engine(pipe, drafter, prompt, gamma, SamplingConfig()) == ar, f"{draft_kind} gamma={gamma} {prompt!r}"
    branching = [first_level_children(tree) for tree in drafter.trees]
    assert max(branching) > 1  # rounds really branched (else this proves no more than sd's test)
    assert max(branching) <= min(MAX_SEQUENCES, gamma)


def sure_draft(target):
    """The target plus a little noise with its logits scaled up 64x: the draft is sure of nearly every
    first token, so the branching rule keeps one sequence and the drafter should be ChainDrafter."""
    draft = perturbed(target, noise=0.1, seed=7)
    with torch.no_grad():
        draft.lm_head.weight.mul_(64.0)
    return draft


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0, seed=3), SamplingConfig(temperature=0.8, top_k=20, seed=4)])
def test_single_sequence_rounds_are_chain_drafter_rounds(target, sampling):
    """Same trees (tokens and draft_probs) and, under sampling with one seed, the same random draws and
    tokens as ChainDrafter whenever every round keeps one sequence."""
    pipe = tiny_pipeline(target)
    draft = sure_draft(target)
    chain = RecordingDrafter(ChainDrafter(HFModel(draft), target.config.vocab_size))
    multi = RecordingDrafter(MultiSequenceDrafter(HFModel(draft), target.config.vocab_size))
    for prompt in PROMPTS:
        assert run_engine(pipe, multi, prompt, 4, sampling) == run_engine(pipe, chain, prompt, 4, sampling)
    assert all(tree.is_chain for tree in multi.trees)  # the precondition: no round branched
    assert len(multi.trees) == len(chain.trees)
    for mine, theirs in zip(multi.trees, chain.trees):
        assert torch.equal(mine.tokens, theirs.tokens)
        if sampling.is_greedy:
            assert mine.draft_probs is None and theirs.draft_probs is None
        else:
            assert torch.allclose(mine.draft_probs, theirs.draft_probs, atol=1e-6)


def test_sampled_generation_is_seeded(target):
    pipe = tiny_pipeline(target)
    drafter = MultiSequenceDrafter(HFModel(perturbed(target, noise=0.2, seed=7)), target.config.vocab_size)
    sampling = SamplingConfig(temperature=1.0, seed=11)
    assert run_engine(pipe, drafter, PROMPTS[0], 5, sampling) == run_engine(pipe, drafter, PROMPTS[0], 5, sampling)


def fresh_draft_logits(model, context: list[int]) -> torch.Tensor:
    """[V] float32: the draft's logits after `context`, from a plain run without any cache."""
    with torch.no_grad():
        return model(torch.tensor([context])).logits[0, -1].float()


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)])
def test_draft_cache_after_each_round_equals_a_fresh_run(target, sampling):
    """Rounds driven by hand (the engine's steps, written out): after each round's feedback the draft
    cache holds a prefix of the accepted context whose next-step logits equal a fresh run; each round's
    first position is the fresh draft's (argmax under greedy, draft_probs row under sampling)."""
    draft_model = perturbed(target, noise=0.2, seed=7)
    with torch.no_grad():
        draft_model.lm_head.weight.mul_(2.0)  # surer, so that single-sequence rounds happen too
    target_model, draft = HFModel(target), HFModel(draft_model)
    drafter = MultiSequenceDrafter(draft, target.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = tiny_pipeline(target).encode(PROMPTS[1])
    target_model.reset()
    drafter.reset()
    logits = target_model.forward(torch.tensor(prompt_ids), last_only=True)
    context = [*prompt_ids, int(choose(logits, sampling, generator)[0])]
    shapes = set()
    for round_ in range(30):
        fresh = fresh_draft_logits(draft_model, context)
        tree = drafter.propose(context, DraftBudget(1 if round_ == 0 else 5), sampling, generator)
        shapes.add("chain" if tree.is_chain else "tree")
        if sampling.is_greedy:
            assert int(tree.tokens[1]) == int(fresh.argmax())
        elif tree.is_chain:
            assert torch.allclose(tree.draft_probs[0], warp_probs(fresh, sampling), atol=1e-5)
        if tree.is_chain:
            logits = target_model.forward(tree.tokens)
        else:
            positions = target_model.cache_len + tree.depth_tensor()
            logits = target_model.forward(tree.tokens, positions, tree.ancestor_mask())
        verdict = verify(tree, logits, sampling, generator)
        target_model.keep(verdict.path)
        context.extend(verdict.tokens)
        drafter.feedback(verdict)

        cached = draft.cache_len
        assert cached <= len(context) - 1
        caught_up = draft.forward(torch.tensor(context[cached:]), last_only=True)[0]
        draft.crop(cached)  # leave the cache as the drafter left it
        assert torch.allclose(caught_up, fresh_draft_logits(draft_model, context), atol=1e-5), f"round {round_}"
    assert shapes == {"chain", "tree"}  # both kinds of round ran


def test_budget_of_zero_or_one_token_is_a_chain(target):
    drafter = MultiSequenceDrafter(HFModel(perturbed(target, noise=0.2, seed=7)), target.config.vocab_size)
    context = tiny_pipeline(target).encode(PROMPTS[0])
    assert drafter.propose(context, DraftBudget(0), SamplingConfig(), None).n_nodes == 1
    tree = drafter.propose(context, DraftBudget(1), SamplingConfig(), None)
    assert tree.is_chain and tree.n_draft == 1


def test_constructor_refuses_no_sequences(target):
    with pytest.raises(ValueError, match="max_sequences"):
        MultiSequenceDrafter(HFModel(target), target.config.vocab_size, max_sequences=0)


def test_full_draft_context_drafts_nothing_as_chain_drafter_does(target):
    """A draft whose positions would run out mid-round drafts nothing (the target goes on alone)."""
    draft = HFModel(tiny_model(seed=0, max_positions=16))
    drafter = MultiSequenceDrafter(draft, target.config.vocab_size)
    context = list(range(3, 15))  # 12 tokens + 5 draft tokens > 16 positions
    tree = drafter.propose(context, DraftBudget(5), SamplingConfig(), None)
    assert tree.n_nodes == 1 and tree.tokens.tolist() == [14]
    assert drafter.propose(context, DraftBudget(4), SamplingConfig(), None).n_draft >= 1  # 16 fits
