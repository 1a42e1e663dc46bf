"""Tests for the verifier: the part that makes every method lossless.

Convention: p = target, q = draft; below only `target_probs` / `draft_probs` (and `target` / `draft`
for the conditional laws that produce them).

What is proven, and how:
(a) Exact laws, no sampling, float64. A "language model" here is a conditional law: each prefix gets
    its own random law on a vocabulary of 4-5 tokens. For a chain, every draft outcome is enumerated
    with its probability under q, the verifier's output law is composed from `chain_acceptance_law`
    exactly as `verify_chain_sampling` uses it, each output is extended by autoregressive target
    sampling to gamma + 1 tokens, and the total must equal the target's joint law to 1e-12. For a
    tree, every vector of per-node target samples is enumerated and fed to the real `walk`.
(b) Negative controls: the same exact check must fail, by a wide margin, for deliberately wrong rules
    (always accept, residual = p, unnormalised residual, inverted ratio; off-by-one and always-descend
    walks; one target sample shared by all nodes). They show the check can fail.
(c) Empirical: the full samplers under a fixed seed, chi-square of the emitted tokens against the target.
(d) Oracle: `walk` against a slow per-node Python walker on many random trees.
(e) Lenience, (f) determinism and RNG hygiene, (g) edge cases.
"""

from __future__ import annotations

import functools
import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from duospec.config import SamplingConfig
from duospec.sampling import sample, warp_probs
from duospec.tree import TokenTree
from duospec.verify import (
    Verdict,
    chain_acceptance_law,
    verify,
    verify_chain_sampling,
    verify_greedy,
    verify_greedy_lenient,
    verify_tree_sampling,
    walk,
)

ROOT_TOKEN = 0  # the root's own token never matters to the laws below: contexts start after it


# ===================================================================================================
# Helpers: conditional laws, autoregressive continuation, composed output laws.


class ConditionalLaw:
    """A tiny language model: prefix (tuple of tokens after the root) -> its own law, [V] float64.

    Each prefix's law is drawn the first time it is asked for and cached, so a law object is one fixed
    model. alpha: Dirichlet concentration; floor: mix in floor * uniform (keeps every entry >= floor / V,
    for chi-square cells); root: a fixed law for the empty prefix; sampling: draw Gaussian logits and
    warp them with `warp_probs` (top-k / top-p put exact zeros in the law).
    """

    def __init__(self, vocab, seed, *, alpha=0.8, floor=0.0, root=None, sampling=None):
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.alpha, self.floor, self.sampling = alpha, floor, sampling
        self.cache = {}
        if root is not None:
            self.cache[()] = torch.tensor(root, dtype=torch.float64)

    def __call__(self, prefix) -> torch.Tensor:
        prefix = tuple(prefix)
        if prefix not in self.cache:
            if self.sampling is None:
                law = torch.from_numpy(self.rng.dirichlet(np.full(self.vocab, self.alpha)))
                law = self.floor / self.vocab + (1 - self.floor) * law
            else:
                logits = torch.from_numpy(self.rng.normal(0.0, 2.0, self.vocab)).float()
                law = warp_probs(logits, self.sampling).double()
            self.cache[prefix] = law / law.sum()  # float64 rows summing to 1 (up to 1 ulp)
        return self.cache[prefix]


class Continuation:
    """Autoregressive target sampling after a prefix, as exact float64 tables up to `length` tokens."""

    def __init__(self, target, vocab, length):
        self.target, self.vocab, self.length = target, vocab, length
        self.memo = {}

    def tail(self, prefix) -> np.ndarray:
        """Law of the remaining tokens after `prefix`: shape (V,) * (length - len(prefix))."""
        if len(prefix) == self.length:
            return np.array(1.0)
        if prefix not in self.memo:
            row = self.target(prefix).numpy()
            self.memo[prefix] = np.stack([row[y] * self.tail(prefix + (y,)) for y in range(self.vocab)])
        return self.memo[prefix]

    def joint(self) -> np.ndarray:
        """The target's joint law over `length` tokens: the reference every verifier must reproduce."""
        return self.tail(())

    def add(self, law, prefix, weight) -> None:
        """Put `weight` on the emitted tokens `prefix`, spread over their autoregressive continuations."""
        law[prefix] += weight * self.tail(prefix)


def draft_outcomes(vocab, gamma, draft=None, propose=None):
    """Every draft chain (gamma tokens after the root) with its probability and its draft_probs.

    draft: a conditional law q; each token is drawn from q at its prefix -> draft_probs [gamma, V].
    propose: a deterministic draft (prefix -> token), i.e. one-hot q -> draft_probs None.
    """
    if propose is not None:
        tokens = ()
        for _ in range(gamma):
            tokens += (propose(tokens),)
        yield tokens, 1.0, None
        return
    for tokens in itertools.product(range(vocab), repeat=gamma):
        weight = math.prod(float(draft(tokens[:j])[tokens[j]]) for j in range(gamma))
        if weight > 0:
            rows = [draft(tokens[:j]) for j in range(gamma)]
            yield tokens, weight, torch.stack(rows) if rows else torch.zeros(0, vocab, dtype=torch.float64)


def chain_output_law(
    target, vocab, gamma, *, draft=None, propose=None, explicit_one_hot=False, acceptance_law=chain_acceptance_law
):
    """(output law, target joint law), both over gamma + 1 tokens, in float64.

    The output law is composed from `acceptance_law` the way `verify_chain_sampling` uses it: draft
    token j is accepted when uniform < accept_probs[j], i.e. with probability accept_probs[j]; at the
    first rejection the recovered token comes from residual[j]; after gamma acceptances the bonus
    token comes from the last target row. Emitted tokens are then continued by the target.
    """
    continuation = Continuation(target, vocab, gamma + 1)
    law = np.zeros((vocab,) * (gamma + 1))
    for tokens, weight, draft_probs in draft_outcomes(vocab, gamma, draft, propose):
        draft_tokens = torch.tensor(tokens, dtype=torch.long)
        if explicit_one_hot:
            draft_probs = F.one_hot(draft_tokens, vocab).double()  # the same one-hot q, written out
        target_probs = torch.stack([target(tokens[:j]) for j in range(gamma + 1)])  # [gamma + 1, V]
        accept_probs, residual = acceptance_law(target_probs, draft_tokens, draft_probs)
        accept_probs, residual = accept_probs.tolist(), residual.numpy()
        reach = weight  # probability of drafting `tokens` and accepting the first n of them
        for n in range(gamma + 1):
            if n < gamma:
                stop, next_law = reach * (1.0 - accept_probs[n]), residual[n]  # recovered token
            else:
                stop, next_law = reach, target_probs[gamma].numpy()  # bonus token
            for y in range(vocab):
                if stop * next_law[y] != 0:
                    continuation.add(law, tokens[:n] + (y,), stop * next_law[y])
            if n < gamma:
                reach *= accept_probs[n]
    return law, continuation.joint()


def tree_contexts(tree):
    """For each node, the tokens on its path after the root: the prefix the target scores it with."""
    tokens = tree.tokens.tolist()
    return [tuple(tokens[k] for k in tree.path_to(node)[1:]) for node in range(tree.n_nodes)]


def tree_output_law(tree, target, vocab, *, walker=walk, shared_sample=False):
    """(output law, target joint law) over max depth + 1 tokens, in float64.

    `verify_tree_sampling` draws one target sample per node (row i = target law at node i's context),
    independently, then calls `walk`. Here every such choice vector is enumerated with its probability
    and the real `walker` decides the output (path tokens + next_token), which is then continued by the
    target. shared_sample: the wrong variant where one sample is reused at every node.
    """
    contexts = tree_contexts(tree)
    rows = [target(context).tolist() for context in contexts]
    n = tree.n_nodes
    continuation = Continuation(target, vocab, max(tree.depths) + 1)
    law = np.zeros((vocab,) * (max(tree.depths) + 1))
    if shared_sample:
        choices = (((y,) * n, rows[0][y]) for y in range(vocab))
    else:
        choices = ((c, math.prod(rows[i][c[i]] for i in range(n))) for c in itertools.product(range(vocab), repeat=n))
    for choice, weight in choices:
        if weight == 0:
            continue
        verdict = walker(tree, torch.tensor(choice, dtype=torch.long))
        continuation.add(law, contexts[verdict.path[-1]] + (verdict.next_token,), weight)
    return law, continuation.joint()


def max_error(laws) -> float:
    law, joint = laws
    return float(np.abs(law - joint).max())


def slow_walk(tree, choice) -> Verdict:
    """Oracle: the SpecExec walk, one node at a time with a dict of children. choice: [n] int64."""
    tokens, choice = tree.tokens.tolist(), choice.tolist()
    children = {(tree.parents[node], tokens[node]): node for node in range(1, tree.n_nodes)}
    node, path = 0, [0]
    while (node, choice[node]) in children:
        node = children[(node, choice[node])]
        path.append(node)
    return Verdict(path=path, next_token=choice[node])


def make_tree(tokens, parents) -> TokenTree:
    tree = TokenTree(tokens=torch.tensor(tokens), parents=tuple(parents))
    tree.check_siblings_distinct()
    return tree


def random_tree(rng: random.Random, n: int, vocab: int) -> TokenTree:
    """A random tree of n nodes with distinct sibling tokens; shape varies from chain-like to bushy."""
    deepness = rng.random()
    parents, tokens, used = [-1], [rng.randrange(vocab)], {0: set()}
    for node in range(1, n):
        open_parents = [p for p in range(node) if len(used[p]) < vocab]
        parent = node - 1 if rng.random() < deepness else rng.choice(open_parents)
        token = rng.choice([t for t in range(vocab) if t not in used[parent]])
        used[parent].add(token)
        used[node] = set()
        parents.append(parent)
        tokens.append(token)
    return make_tree(tokens, parents)


# Tree shapes for the exhaustive tests: (tokens, parents, vocab). Siblings distinct; tokens repeat
# across branches and between parent and child on purpose.
TREE_SHAPES = {
    "chain": ([ROOT_TOKEN, 1, 0, 1], (-1, 0, 1, 2), 4),
    "bushy": ([ROOT_TOKEN, 0, 1, 3], (-1, 0, 0, 0), 4),
    "full_star": ([ROOT_TOKEN, 0, 1, 2], (-1, 0, 0, 0), 3),
    #        0
    #      /   \
    #     1(0)  2(1)
    #    / \      \
    #  3(0) 4(2)   5(1)
    #       |
    #       6(1)
    "mixed7": ([ROOT_TOKEN, 0, 1, 0, 2, 1, 1], (-1, 0, 0, 1, 1, 2, 4), 3),
    "deep_branch6": ([ROOT_TOKEN, 2, 3, 1, 0, 3], (-1, 0, 0, 1, 3, 4), 4),
    "two_levels5": ([ROOT_TOKEN, 3, 1, 3, 0], (-1, 0, 0, 1, 1), 4),
}


# ===================================================================================================
# (a) Exact laws: chains.


@pytest.mark.parametrize("gamma", [0, 1, 2, 3])
@pytest.mark.parametrize("vocab", [4, 5])
def test_chain_law_is_exact_for_a_draft_model(gamma, vocab):
    """Speculative sampling with a random draft law q (different at every prefix) emits exactly the
    target's joint law over gamma + 1 tokens."""
    target = ConditionalLaw(vocab, seed=100 + 10 * gamma + vocab)
    draft = ConditionalLaw(vocab, seed=200 + 10 * gamma + vocab)
    assert max_error(chain_output_law(target, vocab, gamma, draft=draft)) < 1e-12


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("proposer", ["draft_argmax", "last_token", "target_argmax"])
def test_chain_law_is_exact_for_a_one_hot_draft(gamma, proposer):
    """draft_probs=None (one-hot q) from a deterministic draft: greedy draft model, a fixed token
    (the vocabulary's last id), and a draft that always agrees with the target's argmax."""
    vocab = 5
    target = ConditionalLaw(vocab, seed=300 + gamma)
    draft = ConditionalLaw(vocab, seed=400 + gamma)
    propose = {
        "draft_argmax": lambda prefix: int(draft(prefix).argmax()),
        "last_token": lambda prefix: vocab - 1,
        "target_argmax": lambda prefix: int(target(prefix).argmax()),
    }[proposer]
    assert max_error(chain_output_law(target, vocab, gamma, propose=propose)) < 1e-12


@pytest.mark.parametrize("gamma", [0, 1, 3])
def test_one_hot_draft_as_none_and_as_explicit_tensor_give_identical_laws(gamma):
    """STYLE item 7: draft_probs=None means one-hot q. Both forms give the same acceptance law,
    bit for bit, and so the same output law."""
    vocab = 4
    target = ConditionalLaw(vocab, seed=500 + gamma)
    draft = ConditionalLaw(vocab, seed=600 + gamma)
    propose = lambda prefix: int(draft(prefix).argmax())  # noqa: E731
    as_none, joint = chain_output_law(target, vocab, gamma, propose=propose)
    as_tensor, _ = chain_output_law(target, vocab, gamma, propose=propose, explicit_one_hot=True)
    assert np.array_equal(as_none, as_tensor)
    assert np.abs(as_none - joint).max() < 1e-12


def test_one_hot_draft_as_none_and_as_explicit_tensor_sample_identically():
    """Under one seed the full sampler takes the same decisions with either form of one-hot q."""
    vocab, tokens = 6, torch.tensor([ROOT_TOKEN, 2, 5, 1])
    target_probs = torch.softmax(torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)), -1)
    as_none = TokenTree.chain(tokens)
    as_tensor = TokenTree.chain(tokens, draft_probs=F.one_hot(tokens[1:], vocab).float())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    verdicts = [verify_chain_sampling(as_none, target_probs, g1) for _ in range(200)]
    assert verdicts == [verify_chain_sampling(as_tensor, target_probs, g2) for _ in range(200)]
    assert len({v.n_accepted for v in verdicts}) > 1  # the comparison covered more than one outcome


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.8, top_k=2),
        SamplingConfig(temperature=1.2, top_p=0.7),
        SamplingConfig(temperature=1.0, top_k=3, top_p=0.8),
    ],
    ids=repr,
)
@pytest.mark.parametrize("gamma", [2, 3])
def test_chain_law_is_exact_for_the_warped_target(config, gamma):
    """Top-k / top-p put exact zeros in both laws (draft tokens the target forbids, target tokens the
    draft never proposes). With p and q warped by the same settings, the output is exactly the warped
    target's law, for a draft model and for a one-hot draft."""
    vocab = 5
    target = ConditionalLaw(vocab, seed=700 + gamma, sampling=config)
    draft = ConditionalLaw(vocab, seed=800 + gamma, sampling=config)
    assert (target(()) == 0).any()  # the warp really filtered something
    assert max_error(chain_output_law(target, vocab, gamma, draft=draft)) < 1e-12
    propose = lambda prefix: int(draft(prefix).argmax())  # noqa: E731
    assert max_error(chain_output_law(target, vocab, gamma, propose=propose)) < 1e-12


def test_chain_law_is_exact_when_draft_equals_target():
    """q == p: every draft token is accepted and the residual has no mass (the fallback row is unused)."""
    vocab, gamma = 4, 3
    target = ConditionalLaw(vocab, seed=900)
    accept_probs, _ = chain_acceptance_law(
        torch.stack([target(())] * 2), torch.tensor([1]), target(()).unsqueeze(0)
    )
    assert accept_probs.tolist() == [1.0]
    assert max_error(chain_output_law(target, vocab, gamma, draft=target)) < 1e-12


# ===================================================================================================
# (a) Exact laws: trees.


@pytest.mark.parametrize("shape", list(TREE_SHAPES))
def test_tree_walk_law_is_exact(shape):
    """Target-sample matching: with one independent target sample per node and the real `walk`, the
    output (path tokens + next token) has exactly the target's law, for every tree shape."""
    tokens, parents, vocab = TREE_SHAPES[shape]
    tree = make_tree(tokens, parents)
    target = ConditionalLaw(vocab, seed=1000 + len(shape))
    assert max_error(tree_output_law(tree, target, vocab)) < 1e-12


def test_tree_walk_law_is_exact_for_a_warped_target():
    tokens, parents, vocab = TREE_SHAPES["deep_branch6"]
    tree = make_tree(tokens, parents)
    target = ConditionalLaw(vocab, seed=1100, sampling=SamplingConfig(temperature=0.9, top_k=3, top_p=0.9))
    assert max_error(tree_output_law(tree, target, vocab)) < 1e-12


def test_greedy_emits_the_argmax_path():
    """verify_greedy follows the target's argmax from the root, also down a branch that is not the
    first child, and emits autoregressive greedy decoding of the target."""
    #        0
    #      /   \
    #     1(2)  2(3)      target argmax: root -> 3, then (3,) -> 1, then (3, 1) -> 0
    #           |
    #           3(1)
    #           |
    #           4(2)      (3, 1, 2) is not the argmax: the walk stops at node 3 and emits 0
    tree = make_tree([ROOT_TOKEN, 2, 3, 1, 2], (-1, 0, 0, 2, 3))
    logits = torch.full((5, 4), -1.0)
    logits[0, 3] = logits[2, 1] = logits[3, 0] = logits[1, 1] = logits[4, 0] = 2.0
    verdict = verify_greedy(tree, logits)
    assert verdict == Verdict(path=[0, 2, 3], next_token=0)  # not path [0, 2, 3, 4]
    assert verify(tree, logits, SamplingConfig(temperature=0.0), None) == verdict


@pytest.mark.parametrize("seed", range(5))
def test_greedy_equals_autoregressive_greedy_on_random_trees(seed):
    rng = random.Random(seed)
    vocab = 4
    target = ConditionalLaw(vocab, seed=1200 + seed)

    def greedy_rollout(length):
        tokens = ()
        for _ in range(length):
            tokens += (int(target(tokens).argmax()),)
        return tokens

    deepest = 0
    for _ in range(20):
        tree = random_tree(rng, rng.randrange(1, 12), vocab)
        contexts = tree_contexts(tree)
        logits = torch.stack([target(context).log() for context in contexts])  # [n_nodes, V]
        verdict = verify_greedy(tree, logits)
        emitted = contexts[verdict.path[-1]] + (verdict.next_token,)
        assert emitted == greedy_rollout(len(emitted))
        assert verdict == slow_walk(tree, logits.argmax(-1))
        deepest = max(deepest, verdict.n_accepted)
    assert deepest >= 2  # some walks went below the root's children


def test_greedy_on_a_tree_holding_the_greedy_path_accepts_all_of_it():
    vocab = 4
    target = ConditionalLaw(vocab, seed=1300)
    greedy = ()
    for _ in range(4):
        greedy += (int(target(greedy).argmax()),)
    decoy = (greedy[0] + 1) % vocab
    # chain of the greedy path (nodes 1-4) plus a decoy child of the root (node 5)
    tree = make_tree([ROOT_TOKEN, *greedy, decoy], (-1, 0, 1, 2, 3, 0))
    logits = torch.stack([target(context).log() for context in tree_contexts(tree)])
    verdict = verify_greedy(tree, logits)
    assert verdict.path == [0, 1, 2, 3, 4] and verdict.n_accepted == 4
    assert verdict.next_token == int(target(greedy).argmax())


# ===================================================================================================
# (b) Negative controls: deliberately wrong rules must fail the same exact checks.


def always_accept_law(target_probs, draft_tokens, draft_probs, lenience=1.0):
    """Wrong: accept every draft token (the draft's law leaks into the output)."""
    accept_probs, residual = chain_acceptance_law(target_probs, draft_tokens, draft_probs, lenience)
    return torch.ones_like(accept_probs), residual


def residual_is_target_law(target_probs, draft_tokens, draft_probs, lenience=1.0):
    """Wrong: after a rejection, sample from p instead of norm(max(0, p - q))."""
    accept_probs, _ = chain_acceptance_law(target_probs, draft_tokens, draft_probs, lenience)
    return accept_probs, target_probs[: draft_tokens.shape[0]]


def unnormalised_residual_law(target_probs, draft_tokens, draft_probs, lenience=1.0):
    """Wrong: max(0, p - q) used as a law without dividing by its mass."""
    accept_probs, _ = chain_acceptance_law(target_probs, draft_tokens, draft_probs, lenience)
    g, vocab = draft_tokens.shape[0], target_probs.shape[1]
    draft = F.one_hot(draft_tokens, vocab).double() if draft_probs is None else draft_probs
    return accept_probs, (target_probs[:g] - draft).clamp_min(0.0)


def inverted_ratio_law(target_probs, draft_tokens, draft_probs, lenience=1.0):
    """Wrong: accept with min(1, q(x) / p(x)) (p and q swapped, the gpt-fast/transformers naming trap)."""
    _, residual = chain_acceptance_law(target_probs, draft_tokens, draft_probs, lenience)
    g, vocab = draft_tokens.shape[0], target_probs.shape[1]
    draft = F.one_hot(draft_tokens, vocab).double() if draft_probs is None else draft_probs
    at = lambda probs: probs.gather(1, draft_tokens[:, None]).squeeze(1)  # noqa: E731
    return (at(draft) / at(target_probs[:g]).clamp_min(1e-30)).clamp(max=1.0), residual


WRONG_LAWS = [always_accept_law, residual_is_target_law, unnormalised_residual_law, inverted_ratio_law]


@pytest.mark.parametrize("wrong_law", WRONG_LAWS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_model", "one_hot"])
def test_wrong_chain_rules_fail_the_exact_check(wrong_law, one_hot):
    vocab, gamma = 4, 2
    target = ConditionalLaw(vocab, seed=1400)
    draft = ConditionalLaw(vocab, seed=1401)
    kwargs = {"propose": lambda prefix: int(draft(prefix).argmax())} if one_hot else {"draft": draft}
    assert max_error(chain_output_law(target, vocab, gamma, **kwargs)) < 1e-12  # the right rule passes
    assert max_error(chain_output_law(target, vocab, gamma, acceptance_law=wrong_law, **kwargs)) > 1e-2


def walk_matching_own_choice(tree, choice) -> Verdict:
    """Wrong (off by one): compare a child's token with the child's own sample, not its parent's."""
    tokens, choice = tree.tokens.tolist(), choice.tolist()
    children = {(tree.parents[node], tokens[node]): node for node in range(1, tree.n_nodes)}
    node, path = 0, [0]
    while True:
        child = next((c for (p, t), c in children.items() if p == node and choice[c] == t), None)
        if child is None:
            return Verdict(path=path, next_token=choice[node])
        node = child
        path.append(node)


def walk_always_descending(tree, choice) -> Verdict:
    """Wrong (always accept): when no child carries the target's token, descend into the first child."""
    tokens, choice = tree.tokens.tolist(), choice.tolist()
    node, path = 0, [0]
    while True:
        kids = [c for c in range(1, tree.n_nodes) if tree.parents[c] == node]
        if not kids:
            return Verdict(path=path, next_token=choice[node])
        node = next((c for c in kids if tokens[c] == choice[node]), kids[0])
        path.append(node)


@pytest.mark.parametrize("shape", ["chain", "mixed7", "two_levels5"])
def test_wrong_tree_rules_fail_the_exact_check(shape):
    tokens, parents, vocab = TREE_SHAPES[shape]
    tree = make_tree(tokens, parents)
    target = ConditionalLaw(vocab, seed=1500)
    assert max_error(tree_output_law(tree, target, vocab, walker=slow_walk)) < 1e-12  # the oracle passes
    assert max_error(tree_output_law(tree, target, vocab, walker=walk_matching_own_choice)) > 1e-2
    assert max_error(tree_output_law(tree, target, vocab, walker=walk_always_descending)) > 1e-2
    assert max_error(tree_output_law(tree, target, vocab, shared_sample=True)) > 1e-2


# ===================================================================================================
# (c) Empirical: the full samplers under a fixed seed.
#
# Threshold: for a correct sampler the statistic is chi-square with cells - 1 degrees of freedom (4 for
# the first token, 24 for the first two, 124 for three) and the p-value is uniform on (0, 1), so "p > 1e-4" fails for
# 1 seed in 10,000. The seeds are fixed, so each run is deterministic; only a change in how the code
# draws random numbers can move the result, and then it still passes 9,999 times in 10,000.
# Power: a wrong law adds about lambda = N * sum_i (wrong_i - target_i)^2 / target_i to the statistic,
# against a cut of 23.5 (4 dof), 58.6 (24 dof) or 191 (124 dof) at p = 1e-4. Moving 0.02 of mass between two cells
# of mass 0.2 gives lambda = 12,000 * 2 * 0.02^2 / 0.2 = 48 for the first token. The always-accept
# control emits q's first token: lambda = 3,000 * 0.587 = 1,761, p-value ~ 0.
EMPIRICAL_VOCAB = 5
P_ROOT = [0.4, 0.25, 0.15, 0.12, 0.08]  # target at the root; deeper rows have entries >= 0.1, so every
# cell of three tokens expects >= 0.08 * 0.1 * 0.1 * N = 9.6 samples (chi-square wants >= 5)
Q_ROOT = [0.1, 0.2, 0.3, 0.25, 0.15]  # a draft that disagrees with it (total variation 0.33)
N_STEPS = 12_000
N_CONTROL_STEPS = 3_000  # the wrong samplers fail by orders of magnitude; fewer steps suffice


def empirical_models():
    target = ConditionalLaw(EMPIRICAL_VOCAB, seed=1600, floor=0.5, root=P_ROOT)
    draft = ConditionalLaw(EMPIRICAL_VOCAB, seed=1601, floor=0.5, root=Q_ROOT)
    return target, draft


class Extension:
    """Continues a step's emitted tokens by target sampling up to `length` tokens, with its own
    generator (independent of the verifier's), so every step yields a sample of the same joint law."""

    def __init__(self, target, length, seed):
        self.target, self.length = target, length
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, out: list[int]) -> list[int]:
        out = out[: self.length]
        while len(out) < self.length:
            row = self.target(tuple(out)).float()
            out.append(int(torch.multinomial(row, 1, generator=self.generator)))
        return out


def run_chain_sampler(verifier, target, draft, gamma, n_steps, seed):
    """[n_steps, gamma + 1] int: the tokens of n_steps independent verification steps, each on a fresh
    chain drawn from q, continued by the target to gamma + 1 tokens when fewer were emitted."""
    draft_generator = torch.Generator().manual_seed(seed)
    chains = torch.zeros(n_steps, 0, dtype=torch.long)
    for _ in range(gamma):
        rows = torch.stack([draft(tuple(prefix)) for prefix in chains.tolist()]).float()
        chains = torch.cat([chains, torch.multinomial(rows, 1, generator=draft_generator)], dim=1)
    extend = Extension(target, gamma + 1, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    built = {}
    outputs = np.empty((n_steps, gamma + 1), dtype=np.int64)
    for step, tokens in enumerate(map(tuple, chains.tolist())):
        if tokens not in built:
            draft_probs = torch.stack([draft(tokens[:j]) for j in range(gamma)]).float()  # [gamma, V]
            tree = TokenTree.chain(torch.tensor((ROOT_TOKEN, *tokens)), draft_probs=draft_probs)
            built[tokens] = (tree, torch.stack([target(tokens[:j]) for j in range(gamma + 1)]).float())
        verdict = verifier(*built[tokens], generator)
        outputs[step] = extend(list(tokens[: verdict.n_accepted]) + [verdict.next_token])
    return outputs


def run_tree_sampler(verifier, tree, target, n_steps, seed):
    """[n_steps, max depth + 1] int: the tokens of n_steps verification steps of one tree, continued by
    the target when fewer were emitted."""
    contexts = tree_contexts(tree)
    target_probs = torch.stack([target(context) for context in contexts]).float()  # [n_nodes, V]
    extend = Extension(target, max(tree.depths) + 1, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    outputs = np.empty((n_steps, max(tree.depths) + 1), dtype=np.int64)
    for step in range(n_steps):
        verdict = verifier(tree, target_probs, generator)
        outputs[step] = extend(list(contexts[verdict.path[-1]]) + [verdict.next_token])
    return outputs


def chi_square_pvalues(outputs, target) -> list[float]:
    """p-values of the first k emitted tokens against the target's joint law, for k = 1 .. all."""
    vocab, n = EMPIRICAL_VOCAB, len(outputs)
    pvalues = []
    for k in range(1, outputs.shape[1] + 1):
        joint = Continuation(target, vocab, k).joint().ravel()  # row-major: cell = sum_j tok_j V^(k-1-j)
        cells = outputs[:, :k] @ (vocab ** np.arange(k - 1, -1, -1))
        pvalues.append(float(chisquare(np.bincount(cells, minlength=vocab**k), n * joint).pvalue))
    return pvalues


def always_accept_chain_sampling(tree, target_probs, generator) -> Verdict:
    """Wrong: keep every draft token, then a bonus token from the last target row."""
    return Verdict(path=list(range(tree.n_nodes)), next_token=int(sample(target_probs[-1:], generator)[0]))


def shared_sample_tree_sampling(tree, target_probs, generator) -> Verdict:
    """Wrong: one target sample at the root, reused as the choice at every node (a broadcasting bug)."""
    return walk(tree, sample(target_probs[:1], generator).expand(tree.n_nodes))


EMPIRICAL_TREE = ([ROOT_TOKEN, 0, 1, 2, 1, 3, 4], (-1, 0, 0, 0, 1, 1, 2))  # 3 children, 3 grandchildren


def test_chain_sampler_matches_target_empirically():
    """First token, first two and all three (two draft positions and the bonus) follow the target."""
    target, draft = empirical_models()
    outputs = run_chain_sampler(verify_chain_sampling, target, draft, gamma=2, n_steps=N_STEPS, seed=1)
    pvalues = chi_square_pvalues(outputs, target)
    assert min(pvalues) > 1e-4, pvalues


def test_always_accept_chain_sampler_fails_empirically():
    target, draft = empirical_models()
    outputs = run_chain_sampler(always_accept_chain_sampling, target, draft, gamma=2, n_steps=N_CONTROL_STEPS, seed=1)
    pvalues = chi_square_pvalues(outputs, target)
    assert max(pvalues) < 1e-30, pvalues


def test_tree_sampler_matches_target_empirically():
    target, _ = empirical_models()
    tree = make_tree(*EMPIRICAL_TREE)
    outputs = run_tree_sampler(verify_tree_sampling, tree, target, n_steps=N_STEPS, seed=2)
    pvalues = chi_square_pvalues(outputs, target)
    assert min(pvalues) > 1e-4, pvalues


def test_shared_sample_tree_sampler_fails_empirically():
    """Reusing the root's sample gets the first token right but not the second: the pair test catches it."""
    target, _ = empirical_models()
    tree = make_tree(*EMPIRICAL_TREE)
    outputs = run_tree_sampler(shared_sample_tree_sampling, tree, target, n_steps=N_CONTROL_STEPS, seed=2)
    _, pair, _ = chi_square_pvalues(outputs, target)
    assert pair < 1e-30, pair


# ===================================================================================================
# (d) Oracle: the batched walk against the slow per-node walker.


def test_walk_docstring_example():
    """chain tokens [7, 3, 5, 9], choice [3, 5, 2, 8] -> path [0, 1, 2], next_token 2."""
    tree = TokenTree.chain(torch.tensor([7, 3, 5, 9]))
    verdict = walk(tree, torch.tensor([3, 5, 2, 8]))
    assert verdict == Verdict(path=[0, 1, 2], next_token=2)  # not next_token 8: node 3 (token 9) was not reached
    assert verdict.n_accepted == 2


def test_walk_equals_slow_oracle_on_random_trees():
    """Exact equality of path and next token over 400 random trees (1-40 nodes, vocab 2-8, chain-like
    to bushy) and 10 choice vectors each, biased to follow children so that walks go deep."""
    rng = random.Random(0)
    deepest = 0
    for _ in range(400):
        vocab = rng.randrange(2, 9)
        tree = random_tree(rng, rng.randrange(1, 41), vocab)
        tokens = tree.tokens.tolist()
        kids = {node: [c for c in range(1, tree.n_nodes) if tree.parents[c] == node] for node in range(tree.n_nodes)}
        for _ in range(10):
            follow = rng.random()
            choice = [
                tokens[rng.choice(kids[node])] if kids[node] and rng.random() < follow else rng.randrange(vocab)
                for node in range(tree.n_nodes)
            ]
            choice = torch.tensor(choice, dtype=torch.long)
            verdict = walk(tree, choice)
            assert verdict == slow_walk(tree, choice), (tree.parents, tokens, choice)
            deepest = max(deepest, verdict.n_accepted)
    assert deepest >= 8  # the oracle comparison reached deep paths, not only the root


# ===================================================================================================
# (e) Lenience.


def random_chain_case(vocab=6, gamma=4, seed=0):
    """A chain whose draft tokens come from q, with target_probs [gamma + 1, V] and draft_probs [gamma, V]."""
    generator = torch.Generator().manual_seed(seed)
    target_probs = torch.softmax(torch.randn(gamma + 1, vocab, generator=generator) * 1.5, -1)
    draft_probs = torch.softmax(torch.randn(gamma, vocab, generator=generator) * 1.5, -1)
    draft_tokens = torch.multinomial(draft_probs, 1, generator=generator).squeeze(1)
    tree = TokenTree.chain(torch.cat([torch.tensor([ROOT_TOKEN]), draft_tokens]), draft_probs=draft_probs)
    return tree, target_probs


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_model", "one_hot"])
def test_acceptance_is_monotone_in_lenience(one_hot):
    tree, target_probs = random_chain_case(seed=1)
    draft_probs = None if one_hot else tree.draft_probs
    previous = None
    for lenience in (1.0, 0.9, 0.7, 0.5, 0.2):
        accept_probs, residual = chain_acceptance_law(target_probs, tree.tokens[1:], draft_probs, lenience)
        if previous is not None:
            assert (accept_probs >= previous[0]).all()
            assert (accept_probs > previous[0]).any() or (previous[0] == 1).all()
            assert torch.equal(residual, previous[1])  # lenience changes acceptance only
        previous = (accept_probs, residual)
    assert (previous[0] > chain_acceptance_law(target_probs, tree.tokens[1:], draft_probs)[0]).any()


def test_lenience_is_lossy_on_the_exact_law():
    """l < 1 is no longer exact: the same exact check that passes at l = 1 fails."""
    vocab, gamma = 4, 2
    target = ConditionalLaw(vocab, seed=1700)
    draft = ConditionalLaw(vocab, seed=1701)
    lenient = functools.partial(chain_acceptance_law, lenience=0.5)
    assert max_error(chain_output_law(target, vocab, gamma, draft=draft)) < 1e-12
    assert max_error(chain_output_law(target, vocab, gamma, draft=draft, acceptance_law=lenient)) > 1e-2


def expected_accepted(accept_probs) -> float:
    """E[n_accepted] = sum_k prod_{j < k} accept_probs[j] (accept while uniform < accept_prob)."""
    return float(torch.cumprod(accept_probs.double(), 0).sum())


def test_lenience_raises_the_mean_number_accepted():
    tree, target_probs = random_chain_case(seed=2)
    n_steps = 1500
    means = {}
    for lenience in (1.0, 0.5):
        generator = torch.Generator().manual_seed(11)
        accepted = [verify_chain_sampling(tree, target_probs, generator, lenience).n_accepted for _ in range(n_steps)]
        means[lenience] = float(np.mean(accepted))
        accept_probs, _ = chain_acceptance_law(target_probs, tree.tokens[1:], tree.draft_probs, lenience)
        # The sampler's mean matches the law's expectation within 5 standard errors.
        assert abs(means[lenience] - expected_accepted(accept_probs)) < 5 * np.std(accepted) / math.sqrt(n_steps) + 1e-9
    assert means[0.5] > means[1.0] + 0.2, means


def test_lenience_one_equals_the_default_under_one_seed():
    tree, target_probs = random_chain_case(seed=3)
    g_default, g_one, g_verify = (torch.Generator().manual_seed(21) for _ in range(3))
    default = [verify_chain_sampling(tree, target_probs, g_default) for _ in range(100)]
    assert default == [verify_chain_sampling(tree, target_probs, g_one, lenience=1.0) for _ in range(100)]
    logits = target_probs.log()
    config = SamplingConfig(temperature=1.0)
    through_verify = [verify(tree, logits, config, g_verify, lenience=1.0) for _ in range(100)]
    assert [v.n_accepted for v in through_verify] == [v.n_accepted for v in default]
    assert len({v.n_accepted for v in default}) > 1


def lenient_greedy_case():
    """Row 0: top token 2 with probability 0.5, draft token 1 with 0.4. Row 1: argmax 3."""
    tree = TokenTree.chain(torch.tensor([ROOT_TOKEN, 1]))
    logits = torch.stack([torch.tensor([0.05, 0.4, 0.5, 0.05]).log(), torch.tensor([0.0, 0.0, 0.0, 1.0])])
    return tree, logits


def test_lenient_greedy_accepts_a_near_top_draft_token():
    tree, logits = lenient_greedy_case()
    assert verify_greedy(tree, logits) == Verdict(path=[0], next_token=2)
    assert verify_greedy_lenient(tree, logits, 0.7) == Verdict(path=[0, 1], next_token=3)  # 0.4 >= 0.7 * 0.5
    assert verify_greedy_lenient(tree, logits, 0.85) == Verdict(path=[0], next_token=2)  # 0.4 < 0.85 * 0.5
    greedy = SamplingConfig(temperature=0.0)
    assert verify(tree, logits, greedy, None, lenience=0.7) == Verdict(path=[0, 1], next_token=3)


def test_verify_with_lenience_one_routes_to_exact_greedy():
    """Tokens 0 and 1 tie at the top; the argmax is 0. Lenient greedy at l = 1 would accept draft token
    1 (its probability equals the top one); `verify` must use exact greedy instead and emit 0."""
    tree = TokenTree.chain(torch.tensor([ROOT_TOKEN, 1]))
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_greedy_lenient(tree, logits, 1.0).path == [0, 1]
    assert verify(tree, logits, SamplingConfig(temperature=0.0), None, lenience=1.0) == Verdict(path=[0], next_token=0)


def test_lenience_on_a_tree_is_refused():
    tree = make_tree(*TREE_SHAPES["bushy"][:2])
    logits = torch.zeros(tree.n_nodes, 4)
    for config in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)):
        with pytest.raises(ValueError, match="lenience is defined for chains only"):
            verify(tree, logits, config, torch.Generator().manual_seed(0), lenience=0.5)
    with pytest.raises(ValueError, match="chains only"):
        verify_greedy_lenient(tree, logits, 0.5)


# ===================================================================================================
# (f) Determinism and RNG hygiene.


def sampling_cases():
    chain, chain_probs = random_chain_case(seed=4)
    tree = make_tree(*EMPIRICAL_TREE)
    tree_logits = torch.randn(tree.n_nodes, EMPIRICAL_VOCAB, generator=torch.Generator().manual_seed(4))
    return [(chain, chain_probs.log()), (tree, tree_logits)]


@pytest.mark.parametrize("case", [0, 1], ids=["chain", "tree"])
def test_same_seed_gives_same_verdicts(case):
    tree, logits = sampling_cases()[case]
    config = SamplingConfig(temperature=0.9, top_k=4)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [verify(tree, logits, config, generator) for _ in range(60)]

    assert run(7) == run(7)
    assert run(7) != run(8)  # the seed matters: the check above is not vacuous


def test_global_rng_untouched_with_an_explicit_generator():
    state = torch.random.get_rng_state()
    try:
        generator = torch.Generator().manual_seed(0)
        for tree, logits in sampling_cases():
            for lenience in (1.0, 0.5) if tree.is_chain else (1.0,):
                verify(tree, logits, SamplingConfig(temperature=1.0, top_p=0.9), generator, lenience)
                verify(tree, logits, SamplingConfig(temperature=0.0), generator, lenience)
        assert torch.equal(torch.random.get_rng_state(), state)
        # Sensitivity: without a generator the global RNG does move, so the check above can fail.
        verify(*sampling_cases()[0], SamplingConfig(temperature=1.0), None)
        assert not torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.random.set_rng_state(state)


def test_inputs_are_not_modified():
    for tree, logits in sampling_cases():
        tokens, probs = tree.tokens.clone(), None if tree.draft_probs is None else tree.draft_probs.clone()
        before = logits.clone()
        generator = torch.Generator().manual_seed(0)
        for config in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_k=3)):
            verify(tree, logits, config, generator)
        assert torch.equal(logits, before) and torch.equal(tree.tokens, tokens)
        assert probs is None or torch.equal(tree.draft_probs, probs)


def test_verify_dispatches_to_the_warped_samplers():
    """verify() = warp_probs + the chain or tree sampler, under one seed."""
    config = SamplingConfig(temperature=0.8, top_k=3, top_p=0.9)
    chain, tree = (case for case in sampling_cases())
    for (t, logits), sampler in ((chain, verify_chain_sampling), (tree, verify_tree_sampling)):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        expected = [sampler(t, warp_probs(logits, config), g1) for _ in range(30)]
        assert [verify(t, logits, config, g2) for _ in range(30)] == expected


# ===================================================================================================
# (g) Edge cases.


def test_root_only_tree_greedy_and_sampling():
    """gamma = 0: nothing to accept, the step emits one target token (its exact law is covered by
    test_chain_law_is_exact_for_a_draft_model[gamma=0])."""
    vocab = 5
    root = TokenTree.chain(torch.tensor([ROOT_TOKEN]))
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0, 2.0]])
    assert verify(root, logits, SamplingConfig(temperature=0.0), None) == Verdict(path=[0], next_token=1)
    assert verify_greedy(root, logits).n_accepted == 0
    only_last = torch.full((1, vocab), -math.inf)
    only_last[0, vocab - 1] = 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert verify(root, only_last, SamplingConfig(temperature=1.0), generator) == Verdict([0], vocab - 1)
        assert verify_tree_sampling(root, torch.softmax(only_last, -1), generator) == Verdict([0], vocab - 1)
        assert verify_chain_sampling(root, torch.softmax(only_last, -1), generator) == Verdict([0], vocab - 1)


def test_draft_token_at_vocab_boundary_is_accepted():
    """The last id, V - 1, as a draft token the target is sure of: accepted by every rule."""
    vocab = 7
    target_probs = torch.zeros(2, vocab)
    target_probs[0, vocab - 1] = 1.0
    target_probs[1, 2] = 1.0
    tokens = torch.tensor([ROOT_TOKEN, vocab - 1])
    generator = torch.Generator().manual_seed(0)
    for draft_probs in (None, torch.full((1, vocab), 1.0 / vocab)):
        tree = TokenTree.chain(tokens, draft_probs=draft_probs)
        assert verify_chain_sampling(tree, target_probs, generator) == Verdict(path=[0, 1], next_token=2)
    assert verify_greedy(TokenTree.chain(tokens), target_probs.log()) == Verdict(path=[0, 1], next_token=2)


def test_recovered_token_vocab_boundary():
    """Named after vLLM's test_sample_recovered_tokens_vocab_boundary: when the residual's only mass
    sits at the last id V - 1, the recovered token must be V - 1 (no off-by-one at the edge)."""
    vocab = 6
    target_probs = torch.zeros(2, vocab)
    target_probs[0, 0], target_probs[0, vocab - 1] = 0.3, 0.7
    target_probs[1] = 1.0 / vocab
    tokens = torch.tensor([ROOT_TOKEN, 0])
    generator = torch.Generator().manual_seed(0)
    for draft_probs in (None, F.one_hot(torch.tensor([0]), vocab).float()):
        tree = TokenTree.chain(tokens, draft_probs=draft_probs)
        accept_probs, residual = chain_acceptance_law(target_probs, tokens[1:], draft_probs)
        torch.testing.assert_close(accept_probs, torch.tensor([0.3]))
        assert residual.tolist() == [[0.0] * (vocab - 1) + [1.0]]
        verdicts = [verify_chain_sampling(tree, target_probs, generator) for _ in range(200)]
        rejected = [v for v in verdicts if v.n_accepted == 0]
        assert 20 < len(rejected) < 200  # both outcomes occurred
        assert all(v.next_token == vocab - 1 for v in rejected)


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_model", "one_hot"])
def test_draft_token_with_zero_target_probability_is_rejected(one_hot):
    vocab = 5
    target_probs = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0], [0.2] * 5])
    draft_probs = None if one_hot else torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]])
    tree = TokenTree.chain(torch.tensor([ROOT_TOKEN, 1]), draft_probs=draft_probs)
    accept_probs, _ = chain_acceptance_law(target_probs, tree.tokens[1:], draft_probs)
    assert accept_probs.tolist() == [0.0]
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        verdict = verify_chain_sampling(tree, target_probs, generator)
        assert verdict.path == [0] and verdict.next_token in (0, 2)
    assert verify_greedy(tree, target_probs.log()).path == [0]


def test_draft_token_the_draft_gave_no_mass_is_rejected_not_nan():
    """A drafter that breaks the contract (proposes x with q(x) = 0): acceptance 0, not a division by 0."""
    target_probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25] * 4])
    draft_probs = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    accept_probs, residual = chain_acceptance_law(target_probs, torch.tensor([1]), draft_probs)
    assert accept_probs.tolist() == [0.0]
    assert torch.isfinite(residual).all()


def test_verdict_n_accepted():
    assert Verdict(path=[0], next_token=3).n_accepted == 0
    assert Verdict(path=[0, 2, 5], next_token=1).n_accepted == 2
    tree = TokenTree.chain(torch.tensor([ROOT_TOKEN, 1, 2, 3]))
    assert walk(tree, torch.tensor([1, 2, 3, 0])).n_accepted == 3  # full accept, bonus token 0
    assert walk(tree, torch.tensor([1, 2, 3, 0])).next_token == 0
