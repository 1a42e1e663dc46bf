"""Suffix decoding (duospec/drafting/suffix.py): worked examples, the bounded history, the cost-driven
tree size, and greedy identity of `suffix` and `auto` with `ar` on both backends at full, partial and
zero acceptance. The sampled output law runs in tests/test_sampled_law_rounds.py (case "suffix")."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from tiny_models import tiny_model, tiny_pipeline

import duospec
from duospec.budget.model import CostProfile
from duospec.budget.policy import DraftBudget
from duospec.config import DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting import suffix
from duospec.drafting.suffix import Speculation, SuffixDrafter, SuffixHistory, SuffixPolicy, find_matches, longest_match, speculate

FLAT = CostProfile({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.012, 64: 0.02})
# Shaped like llama.cpp on the developers' 2-core AMD EPYC (t(n)/t(1): 1.53 at 2, 2.37 at 4, 5.8 at 8).
STEEP = CostProfile({1: 1.0, 2: 1.53, 4: 2.37, 8: 5.8})
GREEDY = SamplingConfig()


def test_docstring_examples_hold():
    failures, tried = doctest.testmod(suffix)
    assert tried > 0 and failures == 0


def test_longest_match_worked_example():
    tokens = np.array([5, 1, 2, 9, 7, 1, 2], dtype=np.int32)
    match = longest_match(tokens, tokens[-3:], searchable=6)
    assert match.length == 2 and match.starts.tolist() == [3]
    assert longest_match(tokens, np.array([8], dtype=np.int32), 6) is None


def test_module_docstring_example():
    """history "a b c d" and "a b c e", context "x a b c": match "a b c", children d and e at 1/2."""
    a, b, c, d, e, x = 1, 2, 3, 4, 5, 6
    history = SuffixHistory()
    history.add([a, b, c, d])
    history.add([a, b, c, e])
    matches = find_matches([x, a, b, c], history)
    assert [match.length for match in matches] == [3]
    speculation = speculate(matches, max_nodes=8, max_depth=4)
    assert speculation.tokens == [d, e] and speculation.parents == [0, 0] and speculation.scores == [0.5, 0.5]
    assert speculation.depths == [1, 1]


def test_speculate_worked_example():
    """Continuations [4, 8], [4, 8] and [6]: best first 4 (2/3), 8 under 4 (2/3), 6 (1/3)."""
    context = [1, 4, 8, 1, 4, 8, 1, 6, 9, 1]
    matches = find_matches(context, None)
    assert matches[0].length == 1 and len(matches[0].starts) == 3
    speculation = speculate(matches, max_nodes=8, max_depth=2)
    assert speculation.tokens == [4, 8, 6, 9]
    assert speculation.parents == [0, 1, 0, 3]
    assert speculation.depths == [1, 2, 1, 2]
    assert speculation.scores == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert speculate(matches, max_nodes=2, max_depth=2).tokens == [4, 8]
    assert speculate(matches, max_nodes=8, max_depth=1).tokens == [4, 6]


def test_no_match_drafts_nothing_and_a_long_match_drafts_more():
    policy = SuffixPolicy(None, max_nodes=64)
    drafter = SuffixDrafter(None, policy)
    assert drafter.propose([1, 2, 3, 4], DraftBudget(64), GREEDY, None).n_draft == 0
    repeated = list(range(10, 30))
    short = drafter.propose([*repeated, 10], DraftBudget(64), GREEDY, None)
    long = drafter.propose([*repeated, *repeated[:12]], DraftBudget(64), GREEDY, None)
    assert short.n_draft == 2  # a 1-token match earns MAX_SPEC_FACTOR x 1 nodes
    # a 12-token match earns 24 nodes; what followed it runs to the context's end (20 tokens)
    assert long.n_draft == 20
    assert long.tokens.tolist() == [repeated[11], *repeated[12:], *repeated[:12]]


def test_history_is_bounded_and_evicts_the_oldest():
    history = SuffixHistory(max_tokens=1000)
    generator = np.random.default_rng(0)
    for index in range(300):
        history.add([10_000 + index, *generator.integers(0, 500, size=int(generator.integers(2, 40))).tolist()])
        assert history.tokens_held <= 1000
        assert len(history.corpus()) == history.tokens_held + history.sequences
    corpus = history.corpus()
    assert 10_000 not in corpus and 10_299 in corpus  # the first request is gone, the last is kept
    history.add(list(range(5000)))  # longer than the limit: its last 1000 tokens
    assert history.sequences == 1 and history.tokens_held == 1000 and history.corpus()[0] == 4000


@pytest.mark.parametrize("limit", [0, -5, True, 1.5, None])
def test_a_bad_history_limit_is_a_clear_error(limit):
    with pytest.raises(DuospecError, match="--suffix-history-tokens"):
        SuffixHistory(limit)


def test_load_checks_the_limit_and_scope_before_loading_models():
    with pytest.raises(DuospecError, match="positive number of tokens"):
        duospec.load("/nonexistent/model.gguf", suffix_history_tokens=0)
    with pytest.raises(DuospecError, match="suffix scope"):
        duospec.load("/nonexistent/model.gguf", suffix_scope="everyone")


def test_lenience_is_refused_for_suffix_trees():
    with pytest.raises(DuospecError, match="verifies its trees exactly"):
        GenerationRequest(method="suffix", lenience=0.5)


def chain(scores: list[float]) -> Speculation:
    """A speculation that is one copied chain: node i + 1 under node i, at depth i + 1."""
    return Speculation(list(range(10, 10 + len(scores))), list(range(len(scores))), list(scores), list(range(1, len(scores) + 1)))


def test_policy_sizes_the_tree_from_the_cost_curve():
    """A sure copy after a long match (agreement prior 0.9) on the steep curve: 1, 2, 3 and 4 nodes
    promise 1.9/1.53, 2.71/1.95, 3.44/2.37 and 4.10/3.26 tokens per t(1): 3 wins. Nodes that half
    the earlier occurrences disagree with (0.4 each) never pay there; on the flat curve every node does."""
    assert SuffixPolicy(STEEP).nodes_to_verify(chain([1.0] * 7), match_length=20) == 3
    assert SuffixPolicy(STEEP).nodes_to_verify(chain([0.4] * 7), match_length=20) == 0
    assert SuffixPolicy(FLAT).nodes_to_verify(chain([0.5] * 12), match_length=20) == 12
    # A one-token match is trusted less (prior 0.5): 1.5/1.53 and 1.75/1.95 do not pay on the steep curve.
    assert SuffixPolicy(STEEP).nodes_to_verify(chain([1.0] * 2), match_length=1) == 0
    assert SuffixPolicy(None, max_nodes=5).nodes_to_verify(chain([0.01] * 5), match_length=1) == 5  # a fixed budget verifies all


def test_match_classes():
    assert [SuffixPolicy.match_class(m) for m in (1, 2, 3, 4, 7, 8, 15, 16, 32)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_policy_learns_per_match_class_how_long_copies_stay_right():
    from duospec.drafting.suffix import to_tree
    from duospec.verify import Verdict

    policy = SuffixPolicy(STEEP)
    assert policy.nodes_to_verify(chain([1.0] * 3), match_length=4) == 2  # prior 0.75: 2.31/1.95 beats 2.73/2.37
    tree = to_tree(0, chain([1.0] * 3), 3)
    for _ in range(10):
        policy.nodes_to_verify(chain([1.0] * 3), match_length=4)
        policy.observe_round(tree, Verdict(path=[0], next_token=7))  # the first copied token rejected
    assert policy.agreement(2) < 0.3
    assert policy.nodes_to_verify(chain([1.0] * 7), match_length=4) == 0  # the failing class stops drafting
    assert policy.nodes_to_verify(chain([1.0] * 7), match_length=20) == 3  # long matches keep their own record
    for _ in range(20):  # copies right to their end (nothing rejected: no failure counted)
        policy.nodes_to_verify(chain([1.0] * 3), match_length=4)
        policy.observe_round(tree, Verdict(path=[0, 1, 2, 3], next_token=7))
    assert policy.agreement(2) > 0.9


# -- greedy identity through the Pipeline ------------------------------------------------------------

PROMPT = [5, 9, 13, 2, 7, 11, 5, 9, 13, 20, 21, 22, 5, 9]


@pytest.fixture(scope="module")
def target_module():
    return tiny_model(0)


def _answers(pipe, method: str, prompt: list[int], max_new_tokens: int = 40, **options):
    return pipe.generate(prompt, method=method, max_new_tokens=max_new_tokens, **options)


@pytest.mark.parametrize("method", ["suffix", "auto"])
def test_greedy_identity_at_full_partial_and_zero_acceptance_on_transformers(target_module, method):
    pipe = tiny_pipeline(target_module)
    reference = _answers(pipe, "ar", PROMPT)  # also enters the shared history
    poisoned = [*PROMPT, *[(token + 7) % 60 + 2 for token in reference.token_ids]]
    # full: the history holds this very prompt and its answer
    full = _answers(pipe, method, PROMPT, gamma=16) if method == "suffix" else _answers(pipe, method, PROMPT)
    assert full.token_ids == reference.token_ids
    if method == "suffix":
        # every round but the prefill emitted a whole copied path plus one token: a pass per 17 tokens
        assert full.stats.accepted_tokens == full.stats.new_tokens - full.stats.target_passes
        assert full.stats.target_passes <= 4
    # zero: a fresh history whose only copy of the prompt is followed by wrong tokens
    pipe.suffix_history.clear()
    pipe.suffix_history.add(poisoned)
    zero = _answers(pipe, method, PROMPT, gamma=16) if method == "suffix" else _answers(pipe, method, PROMPT)
    assert zero.token_ids == reference.token_ids
    if method == "suffix":
        assert zero.stats.drafted_tokens > 0
    # partial: no history, only the prompt's own repeats
    pipe.suffix_history.clear()
    partial = _answers(pipe, method, PROMPT, gamma=8) if method == "suffix" else _answers(pipe, method, PROMPT)
    assert partial.token_ids == reference.token_ids


def test_request_scope_keeps_no_history(target_module):
    pipe = tiny_pipeline(target_module)
    pipe.suffix_scope = "request"
    reference = _answers(pipe, "ar", PROMPT)
    assert pipe.suffix_history.tokens_held == 0
    again = _answers(pipe, "suffix", PROMPT, gamma=16)
    assert again.token_ids == reference.token_ids
    pipe.suffix_scope = "shared"
    _answers(pipe, "ar", PROMPT)
    shared = _answers(pipe, "suffix", PROMPT, gamma=16)
    assert shared.stats.accepted_tokens > again.stats.accepted_tokens


def test_a_separate_history_sees_nothing_of_the_shared_one(target_module):
    pipe = tiny_pipeline(target_module)
    _answers(pipe, "ar", PROMPT)
    from duospec.bench.runner import separate_suffix_history

    own = SuffixHistory()
    with separate_suffix_history(pipe, own):
        assert pipe.suffix_history is own
        _answers(pipe, "suffix", PROMPT, gamma=16)
    assert own.sequences == 1 and pipe.suffix_history.sequences == 1


def test_greedy_identity_on_llama_cpp(tmp_path, target_module):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from test_llamacpp import llama_pipeline
    from tiny_gguf import write_gguf

    pipe = llama_pipeline(write_gguf(target_module, tmp_path / "target.gguf"))
    reference = _answers(pipe, "ar", PROMPT)
    for method, options in (("suffix", {"gamma": 16}), ("suffix", {}), ("auto", {})):
        result = _answers(pipe, method, PROMPT, **options)
        assert result.token_ids == reference.token_ids, (method, options)
    pipe.suffix_history.clear()
    pipe.suffix_history.add([*PROMPT, *[(token + 7) % 60 + 2 for token in reference.token_ids]])
    assert _answers(pipe, "suffix", PROMPT, gamma=16).token_ids == reference.token_ids
