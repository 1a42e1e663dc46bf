"""SpecExec (DESIGN.md 1.2): the best-first search, open trees over several passes, exactness.

(a) The search on hand-written draft laws: the worked example of specexec.py's docstring driven
    through `_Pool` step by step, ties, a random property check of every prune, `cap_leaves` and
    `TreeSearch.for_budget`; then the whole drafter against a slow reference search that runs every
    node's path from scratch (so a wrong mask or position in the draft's passes changes the tree).
(b) Open trees on both backends (transformers' 4-D mask, llama.cpp's sequence ids): a tree grown over
    three extending forwards gives every node the logits of its own path run alone, and `keep` of any
    path leaves the cache of that path; a deliberately wrong keep fails the same check.
(c) Greedy identity with `ar` on transformers, llama.cpp and mixed, drafts that are the target, a
    perturbed copy and an unrelated model, budgets 1..100 and depths 1, 3, 16 (llama.cpp with few
    sequences, so `cap_leaves` cuts real trees); rounds driven by hand check both caches every round.
(d) The output law: exactly (every target choice at every node of a real drafted tree enumerated) and
    empirically (chi-square through the engine, with a lossy walker as negative control).
(e) Reduced scoring (`forward(reduce=...)`), the node budget policy, request validation, and the
    real pair (slow).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import pytest
import torch
from law_checks import goodness_of_fit
from tiny_models import EOS_ID, perturbed, tiny_model, tiny_pipeline, tiny_tokenizer

import duospec.models.base as model_base
from duospec.budget.model import CostProfile
from duospec.budget.policy import PROBE_EVERY, DraftBudget
from duospec.budget.timing import measure_growing_costs
from duospec.budget.tree import CANDIDATE_BUDGETS, TreeBudgetPolicy, accepted_node_ranks
from duospec.config import DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting.specexec import MAX_CHILDREN, SpecExecDrafter, TreeSearch, _Pool, cap_leaves
from duospec.engines import steps
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.models.llamacpp import llama_cpp_available
from duospec.sampling import warp_probs
from duospec.stats import GenerationStats
from duospec.tree import TokenTree
from duospec.verify import Verdict, walk

HAS_LLAMA = llama_cpp_available()
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
if HAS_LLAMA:
    from tiny_gguf import write_gguf

    from duospec.models.llamacpp import LlamaCppModel, LlamaCppSettings

    SETTINGS = LlamaCppSettings(context=256, batch=64, sequences=16, threads=1)
    FEW_SEQUENCES = LlamaCppSettings(context=256, batch=64, sequences=8, threads=1)  # trees of at most 7 leaves

HF_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# llama.cpp keeps K/V in float16: a cache filled by other batch shapes rounds to other f16 values
# (~4e-4 in these logits); a wrong cache is off by more than 1e-2 (the negative controls below).
LLAMA_TOLERANCE = {"atol": 2e-3, "rtol": 1e-3}
WRONG = 1e-2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and others time their work here)


# ===================================================================================================
# (a) The search.

A, B, C, D, E, F = 1, 2, 3, 4, 5, 6
VOCAB_A = 8
VOCAB = 64  # tiny_models' vocabulary


def log_law(probs: dict[int, float]) -> torch.Tensor:
    """[1, VOCAB_A] log-probabilities of a hand-written law; tokens not named get probability 0."""
    row = torch.zeros(1, VOCAB_A)
    for token, prob in probs.items():
        row[0, token] = prob
    return row.log()


def pool_nodes(pool: _Pool) -> list[tuple[int, int, float, int]]:
    """(token, parent, probability, depth) of each pool node, in pool order."""
    return [
        (token, parent, round(math.exp(score), 6), depth)
        for token, parent, score, depth in zip(pool.tokens.tolist(), pool.parents.tolist(), pool.scores.tolist(), pool.depth.tolist())
    ]


def assert_parent_closed(pool: _Pool) -> None:
    parents, scores, depths = pool.parents.tolist(), pool.scores.tolist(), pool.depth.tolist()
    assert parents[0] == -1 and depths[0] == 0
    for node in range(1, len(parents)):
        parent = parents[node]
        assert 0 <= parent < node, f"node {node} has parent {parent}: not kept, or not before it"
        assert depths[node] == depths[parent] + 1
        assert scores[node] <= scores[parent]


def test_docstring_worked_example_best_first_order_and_pruning():
    """specexec.py's example: budget 3, width 1, children 2. Root law A 0.6, B 0.3 (0.1 elsewhere)."""
    root, chain = 0, 2  # the open tree's chain part: one catch-up token, then the root (slot 1)
    pool = _Pool.rooted(root, chain, slots_total=chain + 2, device=torch.device("cpu"))
    pool.add_children(torch.tensor([0]), log_law({A: 0.6, B: 0.3, C: 0.06, D: 0.04}), children=2)
    pool.prune(3)
    assert pool_nodes(pool) == [(root, -1, 1.0, 0), (A, 0, 0.6, 1), (B, 0, 0.3, 1)]  # only the top 2 children: not C

    # Pass 1 runs A, the best node not run yet; its law gives C 0.9, D 0.05: scores 0.54 and 0.03.
    chosen = pool.best_unrun(width=1, max_depth=3)
    assert chosen.tolist() == [1]  # A; not B (0.3)
    pool.mark_run(chosen, first_slot=chain)
    pool.add_children(chosen, log_law({C: 0.9, D: 0.05, E: 0.05}), children=2)
    pool.prune(3)
    # The best three are A (0.6), C (0.54), B (0.3); D (0.03) is pruned. Pool order stays topological.
    assert pool_nodes(pool) == [(root, -1, 1.0, 0), (A, 0, 0.6, 1), (B, 0, 0.3, 1), (C, 1, 0.54, 2)]
    assert_parent_closed(pool)
    assert pool.slot.tolist() == [1, 2, -1, -1]  # root at the chain's end, A run into slot 2
    # What each node attends to in the draft's open tree: the chain (catch-up token, root), then A.
    assert pool.seen.tolist() == [[True, True, False, False], [True, True, True, False], [True, True, False, False], [True, True, True, False]]

    # Pass 2 runs C (0.54 > B's 0.3); C's children compete with B for the last place.
    chosen = pool.best_unrun(width=1, max_depth=3)
    assert chosen.tolist() == [3]  # C, not B
    pool.mark_run(chosen, first_slot=chain + 1)
    assert pool.seen[3].tolist() == [True, True, True, True]
    pool.add_children(chosen, log_law({E: 0.6, F: 0.4}), children=2)  # E: 0.324 beats B (0.3); F: 0.216 does not
    pool.prune(3)
    assert pool_nodes(pool) == [(root, -1, 1.0, 0), (A, 0, 0.6, 1), (C, 1, 0.54, 2), (E, 2, 0.324, 3)]  # not B
    assert pool.seen[3].tolist() == [True, True, True, True]  # E inherits C's view (C is now pool node 2)
    assert_parent_closed(pool)
    # The depth cap: with max_depth 3, E (depth 3) may not run; nothing else is open.
    assert pool.best_unrun(width=1, max_depth=3).tolist() == []


def test_impossible_children_are_left_out():
    pool = _Pool.rooted(0, 1, 4, torch.device("cpu"))
    pool.add_children(torch.tensor([0]), log_law({A: 1.0}), children=3)  # one possible token of three asked
    assert pool_nodes(pool) == [(0, -1, 1.0, 0), (A, 0, 1.0, 1)]


def test_ties_keep_the_earlier_node():
    """Equal scores: the earlier node stays, so a child whose probability is 1 (the parent's score)
    never displaces its parent and the kept set stays a tree."""
    pool = _Pool.rooted(0, 1, 4, torch.device("cpu"))
    pool.add_children(torch.tensor([0]), log_law({A: 0.5, B: 0.5}), children=2)
    chosen = pool.best_unrun(width=1, max_depth=4)
    pool.mark_run(chosen, 1)
    assert pool.tokens[chosen].item() in (A, B)
    pool.add_children(chosen, log_law({C: 1.0}), children=2)  # C ties both A and B
    before = pool_nodes(pool)
    pool.prune(2)
    assert pool_nodes(pool) == before[:3]  # root, A, B: not C, which ties them but came last
    pool.prune(1)
    assert pool_nodes(pool) == before[:2]  # root, A: not B (a tie, later), nor C
    assert_parent_closed(pool)


def test_random_searches_prune_stably_and_stay_parent_closed():
    """Random laws with many exact ties (probabilities in eighths, some children certain): every prune
    keeps the root and the best `budget` nodes by a stable sort (checked against Python's sorted), in
    pool order, with parents renumbered; best_unrun returns the best open nodes above the depth cap."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        budget = int(torch.randint(1, 12, (1,), generator=generator))
        width = int(torch.randint(1, 4, (1,), generator=generator))
        children = int(torch.randint(1, 5, (1,), generator=generator))
        max_depth = int(torch.randint(1, 5, (1,), generator=generator))
        pool = _Pool.rooted(0, 1, 1 + (max_depth + 1) * width, torch.device("cpu"))
        parents_to_run = torch.tensor([0])
        used = 1
        for _ in range(max_depth + 1):
            counts = torch.randint(0, 3, (parents_to_run.shape[0], VOCAB_A), generator=generator).float()
            counts[:, 0] += (counts.sum(-1) == 0).float()  # every law has some mass
            if trial % 3 == 0:
                counts[:, 1:] = 0  # certain children: exact ties with their parents
            pool.add_children(parents_to_run, (counts / counts.sum(-1, keepdim=True)).log(), children)
            scores, parents = pool.scores.tolist(), pool.parents.tolist()
            expected = sorted(sorted(range(len(scores)), key=lambda node: -scores[node])[: budget + 1])  # sorted() is stable
            old = {"tokens": pool.tokens.clone(), "depth": pool.depth.clone(), "slot": pool.slot.clone()}
            pool.prune(budget)
            assert pool.tokens.tolist() == old["tokens"][expected].tolist()
            assert pool.depth.tolist() == old["depth"][expected].tolist()
            assert pool.slot.tolist() == old["slot"][expected].tolist()
            assert pool.parents.tolist() == [-1] + [expected.index(parents[node]) for node in expected[1:]]
            assert_parent_closed(pool)
            chosen = pool.best_unrun(width, max_depth)
            open_nodes = [n for n in range(len(pool.scores)) if pool.slot[n] < 0 and pool.depth[n] < max_depth]
            assert len(chosen) == min(width, len(open_nodes))
            if len(chosen):
                worst_chosen = min(pool.scores[chosen].tolist())
                assert all(pool.scores[n] <= worst_chosen for n in open_nodes if n not in chosen.tolist())
                pool.mark_run(chosen, used)
                used += len(chosen)
            else:
                break
            parents_to_run = chosen


def leaves_of(parents: list[int] | tuple[int, ...]) -> set[int]:
    """Draft nodes (root excluded) without children."""
    return set(range(1, len(parents))) - set(parents)


def test_cap_leaves_docstring_example():
    assert cap_leaves([-1, 0, 0, 0], [0, -1, -2, -3], 2) == [0, 1, 2]  # not [0, 1, 2, 3]: the worst leaf (-3) goes
    # A dropped leaf's parent becomes a leaf and competes in turn: here the whole branch 2-3 goes.
    assert cap_leaves([-1, 0, 0, 2, 1], [0, -1, -2, -3, -1.5], 1) == [0, 1, 4]  # not [0, 1, 2, 4]: node 2 was left a leaf
    assert cap_leaves([-1, 0, 1, 2], [0, -1, -2, -3], 1) == [0, 1, 2, 3]  # a chain has one leaf: nothing to drop


def test_cap_leaves_random_trees():
    """Parent-closed, exactly min(leaves, cap) leaves, and only the lowest go: every dropped node scores
    at most every kept leaf (ties: the later node goes first)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        n = int(torch.randint(2, 30, (1,), generator=generator))
        parents = [-1] + [int(torch.randint(0, node, (1,), generator=generator)) for node in range(1, n)]
        scores = [0.0]
        for node in range(1, n):  # children never outscore parents; steps of 0, 1 or 2 make ties common
            scores.append(scores[parents[node]] - int(torch.randint(0, 3, (1,), generator=generator)))
        cap = int(torch.randint(1, 8, (1,), generator=generator))
        kept = cap_leaves(parents, scores, cap)
        assert kept == sorted(kept) and kept[0] == 0
        assert all(parents[node] in kept for node in kept[1:])
        kept_parents = [-1] + [kept.index(parents[node]) for node in kept[1:]]
        kept_leaves = [kept[node] for node in leaves_of(kept_parents)]
        assert len(kept_leaves) == min(len(leaves_of(parents)), cap)
        dropped = [node for node in range(n) if node not in kept]
        if dropped:
            assert max(scores[node] for node in dropped) <= min(scores[node] for node in kept_leaves)


def test_tree_search_for_budget():
    assert TreeSearch.for_budget(1) == TreeSearch(budget=1, passes=1, width=1, children=1)
    assert TreeSearch.for_budget(4) == TreeSearch(budget=4, passes=4, width=1, children=4)  # tiny budgets: one node per pass
    assert TreeSearch.for_budget(16) == TreeSearch(budget=16, passes=16, width=1, children=16)
    assert TreeSearch.for_budget(100) == TreeSearch(budget=100, passes=16, width=7, children=MAX_CHILDREN)
    assert TreeSearch.for_budget(100, depth=3) == TreeSearch(budget=100, passes=3, width=34, children=MAX_CHILDREN)
    assert TreeSearch.for_budget(4096).width == 256
    for budget in (1, 2, 5, 16, 17, 100, 1000, 4096):
        for depth in (None, 1, 3, 40):
            search = TreeSearch.for_budget(budget, depth)
            assert search.passes * search.width >= budget  # the run nodes could fill the budget
            assert search.passes <= (depth or 16) and search.passes <= budget
            if budget <= (depth or 16):
                assert search.width == 1


def reference_search(draft_hf, context: list[int], budget: int, depth: int | None) -> list[tuple[tuple[int, ...], float]]:
    """The docstring's search written plainly: every node's law from a fresh run of its whole path.
    Returns (path tokens after the root, score) of each final node in pool order."""
    search = TreeSearch.for_budget(budget, depth)
    nodes = [{"path": (), "score": torch.tensor(0.0), "depth": 0, "run": True}]

    def add_children(node: dict) -> None:
        with torch.no_grad():
            logits = draft_hf(torch.tensor([context + list(node["path"])])).logits[0, -1].float()
        values, tokens = torch.topk(torch.log_softmax(logits, -1), min(search.children, logits.shape[-1]))
        for value, token in zip(values, tokens.tolist()):
            nodes.append({"path": node["path"] + (token,), "score": node["score"] + value, "depth": node["depth"] + 1, "run": False})

    def prune() -> None:
        best = sorted(range(len(nodes)), key=lambda i: -float(nodes[i]["score"]))[: budget + 1]
        nodes[:] = [nodes[i] for i in sorted(best)]

    add_children(nodes[0])
    prune()
    for _ in range(search.passes):
        open_nodes = [n for n in nodes if not n["run"] and n["depth"] < search.passes]
        chosen = sorted(open_nodes, key=lambda n: -float(n["score"]))[: search.width]
        if not chosen:
            break
        for node in chosen:
            node["run"] = True
            add_children(node)
        prune()
    return [(node["path"], float(node["score"])) for node in nodes]


def tree_paths(tree: TokenTree) -> list[tuple[int, ...]]:
    tokens = tree.tokens.tolist()
    return [tuple(tokens[i] for i in tree.path_to(node)[1:]) for node in range(tree.n_nodes)]


@pytest.mark.parametrize("budget,depth", [(1, None), (5, None), (12, 3), (40, None), (40, 2)])
def test_drafter_builds_the_reference_tree(target, budget, depth):
    """SpecExecDrafter (open tree over several draft passes, one mask per pass) against the plain
    search: same nodes, same order, same scores, for two rounds (the second reuses the kept cache)."""
    draft_hf = perturbed(target, noise=0.2, seed=7)
    drafter = SpecExecDrafter(HFModel(draft_hf), target.config.vocab_size, depth=depth)
    context = tiny_pipeline(target).encode("w5 w9 w5")
    for _ in range(2):
        tree = drafter.propose(context, DraftBudget(budget), SamplingConfig(), None)
        expected = reference_search(draft_hf, context, budget, depth)
        assert tree_paths(tree) == [path for path, _ in expected]
        torch.testing.assert_close(tree.log_probs, torch.tensor([score for _, score in expected]), atol=1e-5, rtol=0)
        assert tree.n_draft == min(budget, len(expected) - 1)
        assert max(tree.depths) <= TreeSearch.for_budget(budget, depth).passes
        best_leaf = max(range(1, tree.n_nodes), key=lambda node: (tree.depths[node], -node))
        drafter.feedback(Verdict(path=tree.path_to(best_leaf), next_token=7))
        context = context + [int(tree.tokens[i]) for i in tree.path_to(best_leaf)[1:]] + [7]


# ===================================================================================================
# (b) Open trees over several passes on both backends.

COMMITTED = [4, 8, 15, 16]  # cached by an earlier ordinary forward
CHAIN = [23, 42, 7]  # the ordinary forward that opens the tree: catch-up tokens, then the root (slot 2)
# Extending passes: (token, parent slot) per new node; slots number the open tree in feeding order.
EXTENDS = [
    [(10, 2), (11, 2), (12, 3), (13, 5), (14, 3)],  # 3 A, 4 B under the root; 5 under 3 and 6 under 5 in the same pass; 7 a second child of 3
    [(15, 4), (16, 4), (17, 6), (18, 10), (19, 2), (20, 1)],  # 8, 9 under B; 10 under 6, 11 under 10; 12 another root child; 13 off the chain
    [(21, 9), (22, 7), (23, 13), (24, 8), (25, 0), (26, 18)],  # 14 under 9, 15 under 7, 16 under 13, 17 under 8; 18 off the chain's start, 19 under it
]
OPEN_PARENTS = [-1, 0, 1] + [parent for extend in EXTENDS for _, parent in extend]
OPEN_TOKENS = CHAIN + [token for extend in EXTENDS for token, _ in extend]


def open_path(node: int) -> list[int]:
    path = [node]
    while OPEN_PARENTS[path[-1]] >= 0:
        path.append(OPEN_PARENTS[path[-1]])
    return path[::-1]


def grow_open_tree(model) -> torch.Tensor:
    """COMMITTED, then the CHAIN (ordinary forwards), then EXTENDS: [open-tree nodes, V] logits."""
    model.reset()
    model.forward(torch.tensor(COMMITTED))
    logits = [model.forward(torch.tensor(CHAIN))]
    cached = len(CHAIN)
    for extend in EXTENDS:
        mask = torch.zeros(len(extend), cached + len(extend), dtype=torch.bool)
        for row in range(len(extend)):
            mask[row, open_path(cached + row)] = True  # the node and its ancestors, nothing else
        positions = torch.tensor([len(COMMITTED) + len(open_path(cached + row)) - 1 for row in range(len(extend))])
        logits.append(model.forward(torch.tensor([token for token, _ in extend]), positions, mask, extend_tree=True))
        cached += len(extend)
    assert model.cache_len == len(COMMITTED) + len(OPEN_TOKENS)
    return torch.cat(logits)


class Backend:
    """A model under test, a second instance of the same weights for fresh runs, and its tolerance."""

    def __init__(self, name: str, make) -> None:
        self.name = name
        self.model = make()
        self._reference = make()
        self.tolerance = LLAMA_TOLERANCE if name == "llama.cpp" else HF_TOLERANCE

    def fresh(self, tokens: list[int]) -> torch.Tensor:
        """[V] logits after `tokens` run alone from an empty cache."""
        self._reference.reset()
        return self._reference.forward(torch.tensor(tokens), last_only=True)[-1]


def sharpened(model, factor: float = 3.0):
    """The model with its logits scaled up: tiny_models' laws are so flat that a best-first tree of 16
    nodes is mostly the root's children; sharper laws grow deep trees whose paths get accepted."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def target():
    return sharpened(tiny_model(seed=0))


def unrelated_draft():
    return sharpened(tiny_model(seed=1))


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, target):
    if not HAS_LLAMA:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    directory = tmp_path_factory.mktemp("specexec-gguf")
    return {
        "same": write_gguf(target, directory / "target.gguf"),
        "perturbed": write_gguf(perturbed(target, noise=0.2, seed=7), directory / "perturbed.gguf"),
        "random": write_gguf(unrelated_draft(), directory / "random.gguf"),
    }


@pytest.fixture(params=["transformers", "llama.cpp"])
def backend(request, target):
    if request.param == "transformers":
        return Backend("transformers", lambda: HFModel(target))
    path = request.getfixturevalue("gguf_files")["same"]
    return Backend("llama.cpp", lambda: LlamaCppModel(path, SETTINGS))


def test_a_tree_grown_over_passes_gives_each_node_its_path_logits(backend):
    expected = [backend.fresh(COMMITTED + [OPEN_TOKENS[i] for i in open_path(node)]) for node in range(len(OPEN_TOKENS))]
    logits = grow_open_tree(backend.model)
    for node in range(len(OPEN_TOKENS)):
        torch.testing.assert_close(logits[node], expected[node], **backend.tolerance, msg=f"{backend.name}: node {node}, path {open_path(node)}")


# Paths to keep: through all three passes (14, 15), two levels of one pass (11), branching off the chain
# (13, 16, 19), ending inside the chain (0, 1) or at the root (2), one level deep (4).
KEPT_NODES = [14, 15, 11, 13, 16, 19, 0, 1, 2, 4]


@pytest.mark.parametrize("node", KEPT_NODES)
def test_keep_of_any_path_across_passes_leaves_that_paths_cache(backend, node):
    path = open_path(node)
    grow_open_tree(backend.model)
    backend.model.keep(path)
    kept = COMMITTED + [OPEN_TOKENS[i] for i in path]
    assert backend.model.cache_len == len(kept)
    after = backend.model.forward(torch.tensor([33]), last_only=True)[-1]
    torch.testing.assert_close(after, backend.fresh(kept + [33]), **backend.tolerance, msg=f"{backend.name}: path {path}")
    # The cache goes on as an ordinary prefix: another tree on top of it is exact too.
    tree = TokenTree(tokens=torch.tensor([5, 6, 9, 12]), parents=(-1, 0, 0, 1))
    logits = backend.model.forward(tree.tokens, backend.model.cache_len + tree.depth_tensor(), tree.ancestor_mask())
    torch.testing.assert_close(logits[3], backend.fresh(kept + [33, 5, 6, 12]), **backend.tolerance)


def test_a_wrong_keep_fails_the_same_check(backend):
    """Negative control: keep the path 0 1 2 3 7 (A, then A's second child), but break it: on
    transformers keep B's slot (4) in A's place; on llama.cpp give node 7 the sequence id of its
    sibling 5, so the cache follows 5's branch. The next-logits comparison above then fails."""
    path = open_path(7)
    assert path == [0, 1, 2, 3, 7]
    kept = COMMITTED + [OPEN_TOKENS[i] for i in path] + [33]
    right = backend.fresh(kept)

    def next_logits(break_it: bool) -> torch.Tensor:
        grow_open_tree(backend.model)
        if not break_it:
            backend.model.keep(path)
        elif backend.name == "transformers":
            backend.model.keep([0, 1, 2, 4, 7])  # the sibling's slot: not [0, 1, 2, 3, 7]
        else:
            open_tree = backend.model._tree
            open_tree.sequence[7] = open_tree.sequence[5]
            backend.model.keep(path)
        return backend.model.forward(torch.tensor([33]), last_only=True)[-1]

    torch.testing.assert_close(next_logits(False), right, **backend.tolerance)
    assert (next_logits(True) - right).abs().max() > WRONG


@needs_llama
def test_llama_cpp_sequence_ids_count_down_and_a_tree_over_the_limit_is_refused(gguf_files):
    """sequences 4: id 0 is the prefix, so an open tree may have 3 leaves. A node that is its parent's
    first child inherits the parent's id; every other node takes a fresh one. An extend that needs more
    ids than are left is refused before it touches anything, and the tree stays usable."""
    model = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=128, batch=64, sequences=4, threads=1))
    reference = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=128, batch=64, sequences=4, threads=1))
    assert model.max_tree_leaves == 3
    model.forward(torch.tensor([4, 8, 15]))
    model.forward(torch.tensor([16, 23]))  # the chain part: root 23 at slot 1, position 4
    assert model.tree_ids_left == 3

    parents, positions = [-1, 0], [3, 4]  # the open tree so far (slot -> parent slot, position)

    def extend(tokens: list[int], new_parents: list[int]) -> None:
        cached = len(parents)
        mask = torch.zeros(len(tokens), cached + len(tokens), dtype=torch.bool)
        for row, parent in enumerate(new_parents):
            node = cached + row
            parents.append(parent)
            positions.append(positions[parent] + 1)
            while node >= 0:
                mask[row, node] = True
                node = parents[node]
        try:
            model.forward(torch.tensor(tokens), torch.tensor(positions[cached:]), mask, extend_tree=True)
        except DuospecError:
            del parents[cached:], positions[cached:]
            raise

    extend([10], [1])  # slot 2 under the root: a fresh id
    assert model.tree_ids_left == 2
    extend([11], [2])  # slot 3 under 2, its first child: inherits
    assert model.tree_ids_left == 2
    extend([12, 13], [1, 2])  # slot 4 another root child, slot 5 a second child of 2: two fresh ids
    assert model.tree_ids_left == 0
    assert model._tree.sequence == [0, 0, 1, 1, 2, 3]
    with pytest.raises(DuospecError, match="sequences"):
        extend([14, 15], [3, 1])  # 6 under 3 would inherit, but 7 under the root needs a fourth leaf
    assert model.tree_ids_left == 0 and model._tree.size == 6 and model.cache_len == 3 + 6
    extend([14], [3])  # the refused call changed nothing: a node that inherits still fits
    model.keep([0, 1, 2, 3, 6])
    reference.forward(torch.tensor([4, 8, 15, 16, 23, 10, 11, 14]))
    torch.testing.assert_close(model.forward(torch.tensor([33]), last_only=True), reference.forward(torch.tensor([33]), last_only=True), **LLAMA_TOLERANCE)
    assert model.tree_ids_left == 3  # a new open tree (the ordinary forward of [33]) starts with every id free


# ===================================================================================================
# (c) Greedy identity with `ar`, and both caches after every round.

PROMPTS = ["w1 w2 w3", "w5 w9 w5 w9 w5"]
SEARCHES = [(1, None), (4, 1), (4, 3), (16, None), (16, 3), (100, 1), (100, None)]  # (budget, depth)


@dataclass
class Round:
    budget: int
    tree: TokenTree
    slots: list[int]  # each tree node's slot in the draft's open tree, -1 if never run
    verdict: Verdict | None = None


@dataclass
class RecordingDrafter:
    """Passes every call to a real SpecExecDrafter and keeps each round (no behaviour of its own)."""

    drafter: SpecExecDrafter
    rounds: list[Round] = field(default_factory=list)

    @property
    def model(self):
        return self.drafter.model

    def reset(self) -> None:
        self.drafter.reset()

    def propose(self, context, budget, sampling, generator) -> TokenTree:
        tree = self.drafter.propose(context, budget, sampling, generator)
        assert tree.n_draft <= budget.max_tokens
        assert tree.log_probs is not None or tree.n_draft == 0  # a root alone where the draft's context is full
        self.rounds.append(Round(budget.max_tokens, tree, list(self.drafter._slot_of_node)))
        return tree

    def feedback(self, verdict: Verdict) -> None:
        self.rounds[-1].verdict = verdict
        self.drafter.feedback(verdict)


def run_specexec(target_model, draft_model, prompt_ids: list[int], budget: int, depth: int | None, max_new_tokens: int = 20, recorder=None):
    drafter = SpecExecDrafter(draft_model, target_model.vocab_size, max_leaves=target_model.max_tree_leaves, depth=depth)
    recorder = recorder or RecordingDrafter(drafter)
    recorder.drafter = drafter
    request = GenerationRequest(method="specexec", max_new_tokens=max_new_tokens, tree_budget=budget, tree_depth=depth)
    stats = GenerationStats("specexec", len(prompt_ids))
    policy = TreeBudgetPolicy(None, None, depth=depth, fixed_budget=budget)
    tokens = [t for chunk in generate_tokens(target_model, InProcessSource(recorder, policy), prompt_ids, request, frozenset({EOS_ID}), stats) for t in chunk]
    return tokens, stats, recorder


def check_identity(target_model, draft_model, draft_kind: str, cap: int | None) -> None:
    pipe_ids = [tiny_tokenizer()(prompt)["input_ids"] for prompt in PROMPTS]
    recorder = RecordingDrafter(None)
    for ids in pipe_ids:
        ar = [t for chunk in generate_tokens(target_model, None, ids, GenerationRequest(method="ar", max_new_tokens=20), frozenset({EOS_ID}), GenerationStats("ar", len(ids))) for t in chunk]
        for budget, depth in SEARCHES:
            tokens, stats, _ = run_specexec(target_model, draft_model, ids, budget, depth, recorder=recorder)
            assert tokens == ar, f"{draft_kind} budget={budget} depth={depth} prompt={ids}"
            assert stats.gammas and max(stats.gammas) <= budget
    rounds = recorder.rounds
    ends_at_leaf = [round_.verdict.path[-1] in leaves_of(round_.tree.parents) for round_ in rounds]
    kept_run_nodes = [sum(round_.slots[node] >= 0 for node in round_.verdict.path[1:]) for round_ in rounds]
    if draft_kind == "same":
        # The draft's argmax is the target's, and a node's best child survives whenever any child does:
        # every walk goes down to a leaf (a tree's "full acceptance").
        assert all(ends_at_leaf)
    if draft_kind == "perturbed":
        assert not all(ends_at_leaf) and any(ends_at_leaf)  # partial acceptance
    if draft_kind != "random":
        assert max(kept_run_nodes) >= 2  # the draft kept nodes of its extending passes, two levels deep
    if draft_kind == "random":
        assert sum(r.verdict.n_accepted for r in rounds) < 0.5 * len(rounds)
    if cap is not None:
        leaves = [len(leaves_of(round_.tree.parents)) for round_ in rounds]
        assert max(leaves) <= cap
        # The cap really cut trees: full-size leaf sets with fewer nodes than the budget asked for.
        assert any(n == cap and r.tree.n_draft < r.budget for n, r in zip(leaves, rounds) if r.budget >= 16)


DRAFT_KINDS = ["same", "perturbed", "random"]


def hf_draft(target, kind: str):
    return {"same": lambda: target, "perturbed": lambda: perturbed(target, noise=0.2, seed=7), "random": unrelated_draft}[kind]()


@pytest.mark.parametrize("draft_kind", DRAFT_KINDS)
def test_greedy_specexec_equals_ar_on_transformers(target, draft_kind):
    check_identity(HFModel(target), HFModel(hf_draft(target, draft_kind)), draft_kind, cap=None)


@needs_llama
@pytest.mark.parametrize("draft_kind", DRAFT_KINDS)
def test_greedy_specexec_equals_ar_on_llama_cpp_with_capped_leaves(gguf_files, draft_kind):
    """The target has 8 sequence ids, so trees keep at most 7 leaves (cap_leaves cuts budget-16 and
    budget-100 trees); the draft's own open trees are limited by its ids left (tree_ids_left)."""
    target_model = LlamaCppModel(gguf_files["same"], FEW_SEQUENCES)
    check_identity(target_model, LlamaCppModel(gguf_files[draft_kind], SETTINGS), draft_kind, cap=7)


@needs_llama
def test_greedy_specexec_equals_ar_mixed_llama_target_transformers_draft(gguf_files, target):
    check_identity(LlamaCppModel(gguf_files["same"], FEW_SEQUENCES), HFModel(hf_draft(target, "perturbed")), "perturbed", cap=7)


@needs_llama
def test_llama_cpp_draft_with_few_sequences_stops_growing_and_stays_exact(gguf_files, target):
    """A llama.cpp draft with 4 sequence ids can run only a few nodes per tree: the search stops when its
    ids run out (it never asks for more), and the answer is still `ar`'s."""
    draft = LlamaCppModel(gguf_files["perturbed"], LlamaCppSettings(context=256, batch=64, sequences=4, threads=1))
    ids = tiny_tokenizer()(PROMPTS[0])["input_ids"]
    target_model = HFModel(target)
    ar = [t for chunk in generate_tokens(target_model, None, ids, GenerationRequest(method="ar", max_new_tokens=20), frozenset({EOS_ID}), GenerationStats("ar", len(ids))) for t in chunk]
    tokens, _, few = run_specexec(target_model, draft, ids, 32, None)
    assert tokens == ar
    _, _, many = run_specexec(target_model, LlamaCppModel(gguf_files["perturbed"], SETTINGS), ids, 32, None)
    runs = lambda recorder: max(sum(slot >= 0 for slot in r.slots[1:]) for r in recorder.rounds)
    assert 2 <= runs(few) < runs(many)  # the search went past its first node, and stopped early


@needs_llama
def test_a_llama_cpp_draft_with_one_free_id_goes_on_down_one_branch(gguf_files):
    """A node that is its parent's first child inherits the parent's sequence id, so a chain costs one
    id however deep: a draft with a single free id (2 sequences) goes on running the best pool nodes
    that inherit it (here 3 levels before the budget's pool holds none). Counting an id per run node
    (the old rule) stopped after the first pass, with 1 node run."""
    draft = LlamaCppModel(gguf_files["perturbed"], LlamaCppSettings(context=256, batch=64, sequences=2, threads=1))
    drafter = SpecExecDrafter(draft, VOCAB, depth=8)
    context = tiny_tokenizer()(PROMPTS[0])["input_ids"]
    tree = drafter.propose(context, DraftBudget(8), SamplingConfig(), None)
    run_nodes = draft.cache_len - len(context)  # the draft's open tree: the context, then every node it ran
    assert run_nodes >= 3  # the first run node took the one id; the next ones inherited it
    assert draft.tree_ids_left == 0 and tree.n_draft == 8


@needs_llama
def test_the_drafts_open_tree_never_outgrows_its_context(gguf_files):
    """Regression: near the context's end the root pass leaves few cache cells, and a search of `passes`
    passes over `width` nodes could run more nodes than fit (llama.cpp then refused: "257 tokens do not
    fit the llama.cpp context of 256"). Budgets here are the room the engine would give (the context's
    end), and the search stops running nodes when the cells run out."""
    draft = LlamaCppModel(gguf_files["perturbed"], LlamaCppSettings(context=256, batch=64, sequences=64, threads=1))
    assert draft.max_context == 256
    for room in range(10, 18):
        for depth in (4, 5):
            for seed in (0, 1):
                context = torch.randint(2, 62, (draft.max_context - room - 1,), generator=torch.Generator().manual_seed(seed)).tolist()
                drafter = SpecExecDrafter(draft, VOCAB, depth=depth)
                tree = drafter.propose(context, DraftBudget(room), SamplingConfig(), None)
                assert draft.cache_len <= draft.max_context and tree.n_draft <= room
                drafter.reset()


def context_end_models(kind: str, target, gguf_files_getter):
    """A target whose context ends 40 tokens after the prompt (PROMPT_AT_END), and a perturbed draft."""
    if kind == "transformers":
        short = sharpened(tiny_model(seed=0, max_positions=64))
        return HFModel(short), HFModel(perturbed(short, noise=0.2, seed=7))
    files = gguf_files_getter()
    target_model = LlamaCppModel(files["same"], SETTINGS)
    draft = LlamaCppModel(files["perturbed"], SETTINGS) if kind == "llama.cpp" else HFModel(perturbed(target, noise=0.2, seed=7))
    return target_model, draft


@pytest.mark.parametrize("kind", ["transformers", pytest.param("llama.cpp", marks=needs_llama), pytest.param("mixed", marks=needs_llama)])
def test_specexec_runs_to_the_context_end(request, target, kind):
    """Up to the target's last position, rounds of shrinking room: the answer is `ar`'s, it ends for
    "context", and no tree (the target's or the draft's open one) needs more cache than there is."""
    target_model, draft = context_end_models(kind, target, lambda: request.getfixturevalue("gguf_files"))
    prompt = torch.randint(2, 62, (target_model.max_context - 40,), generator=torch.Generator().manual_seed(0)).tolist()
    ar_stats = GenerationStats("ar", len(prompt))
    ar = [t for chunk in generate_tokens(target_model, None, prompt, GenerationRequest(method="ar", max_new_tokens=100), frozenset(), ar_stats) for t in chunk]
    assert ar_stats.finish_reason == "context"
    for budget, depth in ((16, 3), (14, 4), (32, None)):
        drafter = SpecExecDrafter(draft, VOCAB, max_leaves=target_model.max_tree_leaves, depth=depth)
        request_ = GenerationRequest(method="specexec", max_new_tokens=100, tree_budget=budget, tree_depth=depth)
        stats = GenerationStats("specexec", len(prompt))
        policy = TreeBudgetPolicy(None, None, depth=depth, fixed_budget=budget)
        tokens = [t for chunk in generate_tokens(target_model, InProcessSource(drafter, policy), prompt, request_, frozenset(), stats) for t in chunk]
        assert tokens == ar, (kind, budget, depth)
        assert stats.finish_reason == "context"


def test_pipeline_generate_specexec_equals_ar(target):
    """Through the public API: fixed budgets and depths, and the autotuned default."""
    pipe = tiny_pipeline(target, perturbed(target, noise=0.2, seed=7))
    for prompt in PROMPTS:
        ar = pipe.generate(prompt, method="ar", max_new_tokens=16)
        for budget, depth in ((4, None), (16, 3)):
            out = pipe.generate(prompt, method="specexec", max_new_tokens=16, tree_budget=budget, tree_depth=depth)
            assert out.token_ids == ar.token_ids, (prompt, budget, depth)
            assert out.stats.gammas and max(out.stats.gammas) <= budget
    out = pipe.generate(PROMPTS[0], method="specexec", max_new_tokens=16)  # budget from measured costs
    assert out.token_ids == pipe.generate(PROMPTS[0], method="ar", max_new_tokens=16).token_ids


def drive_rounds(target_b: Backend, draft_b: Backend, sampling: SamplingConfig, rounds: int = 20, corrupt: bool = False) -> dict:
    """The engine's steps written out (propose, score_choices, accept_choices, keep, feedback); after
    every round the target's and the draft's next-step logits are compared with fresh runs of the
    accepted context. corrupt: in the first round that accepts a run node while another run node
    hangs at the same depth, the draft keeps that other node's slot instead (a wrong keep)."""
    target_model, draft_model = target_b.model, draft_b.model
    drafter = SpecExecDrafter(draft_model, target_model.vocab_size, max_leaves=target_model.max_tree_leaves)
    generator = torch.Generator().manual_seed(0)
    prompt = tiny_tokenizer()(PROMPTS[1])["input_ids"]
    stats = GenerationStats("specexec", len(prompt))
    target_model.reset()
    drafter.reset()
    progress = steps.Progress([*prompt, steps.prefill(target_model, prompt, sampling, generator, stats)], 1, 256)
    gaps = {"target": [], "draft": [], "corrupted": None, "accepted": 0, "deep_kept": 0, "unrun_accepted": 0}
    for round_ in range(rounds):
        # Depth 4 grows paths the draft ran two levels deep; depth 2 (width 4) accepts nodes it never ran.
        drafter.depth = 4 if round_ % 2 else 2
        proposed_after = len(progress.context)
        tree = drafter.propose(progress.context, DraftBudget(8), sampling, generator)
        choices = steps.score_choices(target_model, tree, sampling, generator, stats)
        verdict = steps.accept_choices(tree, choices, stats)
        steps.keep(target_model, verdict, progress)  # raises if the target's cache length is off
        gaps["accepted"] += verdict.n_accepted
        run = [drafter._slot_of_node[node] >= 0 for node in verdict.path[1:]]
        gaps["deep_kept"] += sum(run) >= 2
        gaps["unrun_accepted"] += not all(run)
        if corrupt and gaps["corrupted"] is None and verdict.n_accepted >= 1 and drafter._slot_of_node[verdict.path[1]] >= 0:
            siblings = [n for n in range(1, tree.n_nodes) if tree.depths[n] == 1 and n != verdict.path[1] and drafter._slot_of_node[n] >= 0]
            if siblings:
                drafter._slot_of_node[verdict.path[1]] = drafter._slot_of_node[siblings[0]]
                for node in verdict.path[2:]:
                    drafter._slot_of_node[node] = -1  # keep nothing below it (llama.cpp would refuse a non-path)
                gaps["corrupted"] = round_
        # Nothing the draft ran on the accepted path is dropped: it holds the context it drafted after
        # plus the accepted nodes it ran (those run form a prefix of the path: children of run nodes).
        kept_run = len(list(itertools.takewhile(lambda node: drafter._slot_of_node[node] >= 0, verdict.path[1:])))
        drafter.feedback(verdict)
        context = progress.context
        assert draft_model.cache_len == proposed_after + kept_run, f"round {round_}"

        assert target_model.cache_len == len(context) - 1
        after = target_model.forward(torch.tensor(context[-1:]), last_only=True)[-1]
        target_model.crop(len(context) - 1)
        gaps["target"].append(float((after - target_b.fresh(context)).abs().max()))

        cached = draft_model.cache_len
        assert cached <= len(context) - 1
        caught_up = draft_model.forward(torch.tensor(context[cached:]), last_only=True)[-1]
        draft_model.crop(cached)  # leave the cache as the drafter left it
        gaps["draft"].append(float((caught_up - draft_b.fresh(context)).abs().max()))
    return gaps


def backends_for(kind: str, target, gguf_files_getter):
    draft_hf = perturbed(target, noise=0.2, seed=7)
    if kind == "transformers":
        return Backend("transformers", lambda: HFModel(target)), Backend("transformers", lambda: HFModel(draft_hf))
    files = gguf_files_getter()
    return Backend("llama.cpp", lambda: LlamaCppModel(files["same"], FEW_SEQUENCES)), Backend("llama.cpp", lambda: LlamaCppModel(files["perturbed"], SETTINGS))


@pytest.mark.parametrize("kind", ["transformers", pytest.param("llama.cpp", marks=needs_llama)])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)], ids=["greedy", "t1"])
def test_both_caches_equal_a_fresh_run_after_every_round(request, target, kind, sampling):
    target_b, draft_b = backends_for(kind, target, lambda: request.getfixturevalue("gguf_files"))
    gaps = drive_rounds(target_b, draft_b, sampling)
    atol = target_b.tolerance["atol"] * 2  # logits of magnitude ~10: rtol adds as much again
    assert max(gaps["target"]) < atol, gaps["target"]
    assert max(gaps["draft"]) < atol, gaps["draft"]
    assert gaps["accepted"] >= 6  # rounds accepted tree nodes, so keep gathered real paths
    assert gaps["deep_kept"] >= 1  # the draft kept run nodes of two of its passes
    assert gaps["unrun_accepted"] >= 1  # and accepted nodes it never ran (its cache then lags the context)


@pytest.mark.parametrize("kind", ["transformers", pytest.param("llama.cpp", marks=needs_llama)])
def test_a_wrong_draft_keep_fails_the_cache_check(request, target, kind):
    """Negative control of the test above: the draft keeps a sibling's slot once; its cache then no
    longer matches a fresh run of the context, from that round on."""
    target_b, draft_b = backends_for(kind, target, lambda: request.getfixturevalue("gguf_files"))
    gaps = drive_rounds(target_b, draft_b, SamplingConfig(), corrupt=True)
    assert gaps["corrupted"] is not None
    assert gaps["draft"][gaps["corrupted"]] > WRONG
    assert max(gaps["target"]) < 2 * target_b.tolerance["atol"]  # the target's own cache is unaffected


# ===================================================================================================
# (d) The output law.

LAW_VOCAB = 4


def exact_law_of_tree_sampling(tree: TokenTree, law_after, length: int, walker=walk) -> dict[tuple[int, ...], float]:
    """P(first `length` emitted tokens) when every node draws the target's token independently from
    its own law (as score_choices does) and `walker` picks the output, continued by the target alone.
    law_after(tokens after the root) -> [V] float64."""
    tokens = tree.tokens.tolist()
    node_laws = [law_after(tuple(tokens[i] for i in tree.path_to(node)[1:])) for node in range(tree.n_nodes)]
    out: dict[tuple[int, ...], float] = {}

    def continue_by_target(emitted: tuple[int, ...], weight: float) -> None:
        if len(emitted) >= length:
            out[emitted[:length]] = out.get(emitted[:length], 0.0) + weight
            return
        for token, prob in enumerate(law_after(emitted).tolist()):
            if prob > 0:
                continue_by_target(emitted + (token,), weight * prob)

    for choice in itertools.product(range(LAW_VOCAB), repeat=tree.n_nodes):
        weight = math.prod(float(node_laws[node][token]) for node, token in enumerate(choice))
        if weight > 0:
            verdict = walker(tree, torch.tensor(choice))
            continue_by_target(tuple(verdict.tokens), weight)
    return out


def exact_target_law(law_after, length: int) -> dict[tuple[int, ...], float]:
    out = {}
    for emitted in itertools.product(range(LAW_VOCAB), repeat=length):
        out[emitted] = math.prod(float(law_after(emitted[:k])[emitted[k]]) for k in range(length))
    return out


def walk_with_the_roots_sample_everywhere(tree: TokenTree, choice: torch.Tensor) -> Verdict:
    """Wrong on purpose: one target sample (the root's) reused at every node, a broadcasting bug."""
    return walk(tree, choice[:1].expand(tree.n_nodes))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=3)], ids=["greedy-tree", "t1", "t0.8-k3"])
def test_exact_output_law_over_a_drafted_tree(sampling):
    """A real drafted tree (vocabulary 4, budget 5, so 4^6 choice vectors), the target's warped laws
    from fresh runs, the real walk: the law of the first three emitted tokens is the target's, to
    1e-12. A walker that reuses one sample for all nodes is off by more than 1e-2."""
    target = tiny_model(seed=3, vocab_size=LAW_VOCAB)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)
    draft = perturbed(target, noise=0.5, seed=4)
    prompt = [1, 2, 3, 2]
    law_sampling = sampling if not sampling.is_greedy else SamplingConfig(temperature=1.0)
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def law_after(tokens: tuple[int, ...]) -> torch.Tensor:
        if tokens not in cache:
            with torch.no_grad():
                logits = target(torch.tensor([prompt + list(tokens)])).logits[0, -1]
            law = warp_probs(logits, law_sampling).double()
            cache[tokens] = law / law.sum()  # float32 rows sum to 1 only to ~1e-7; the enumeration wants exact
        return cache[tokens]

    # The tree is ranked by the draft law (warped like the target's when sampling); root = prompt[-1].
    tree = SpecExecDrafter(HFModel(draft), LAW_VOCAB).propose(prompt, DraftBudget(5), sampling, None)
    assert tree.n_draft == 5 and not tree.is_chain and max(tree.depths) >= 2  # branching and depth
    # Contexts after the root: the root is prompt[-1], already emitted, so laws start after `prompt`.
    reference = exact_target_law(law_after, 3)
    ours = exact_law_of_tree_sampling(tree, law_after, 3)
    assert max(abs(ours.get(key, 0.0) - value) for key, value in reference.items()) < 1e-12
    wrong = exact_law_of_tree_sampling(tree, law_after, 3, walker=walk_with_the_roots_sample_everywhere)
    assert max(abs(wrong.get(key, 0.0) - value) for key, value in reference.items()) > 1e-2


E2E_VOCAB = 8
E2E_PROMPT = [3, 4, 5, 3, 4]


@pytest.fixture(scope="module")
def law_models():
    """test_sampling_e2e's vocabulary-8 target, but not softened: its laws then differ enough between
    contexts that sampling a node from another node's law (a batching bug in score_choices) fails the
    check (p ~ 1e-28 at 600 samples when written; softened 4x it passed with p = 0.7)."""
    target = tiny_model(seed=11, vocab_size=E2E_VOCAB)
    return target, perturbed(target, noise=0.3, seed=5)


def sample_two_tokens(target_model, draft_model, sampling: SamplingConfig, samples: int) -> tuple[torch.Tensor, int]:
    """[V, V] counts of new tokens 2 and 3 over seeded specexec generations (budget 6, depth 2: trees
    of three children, each run, their children competing), and how many tokens trees accepted."""
    counts = torch.zeros(E2E_VOCAB, E2E_VOCAB)
    accepted = 0
    for seed in range(samples):
        seeded = SamplingConfig(**{**sampling.__dict__, "seed": seed})
        drafter = SpecExecDrafter(draft_model, E2E_VOCAB, max_leaves=target_model.max_tree_leaves, depth=2)
        request = GenerationRequest(method="specexec", max_new_tokens=8, sampling=seeded, tree_budget=6, tree_depth=2)
        stats = GenerationStats("specexec", len(E2E_PROMPT))
        tokens: list[int] = []
        for chunk in generate_tokens(target_model, InProcessSource(drafter, TreeBudgetPolicy(None, None, depth=2, fixed_budget=6)), E2E_PROMPT, request, frozenset(), stats):
            tokens += chunk
            if len(tokens) >= 3:
                break  # closes the generator: tokens 2 and 3 came from one or two tree rounds
        counts[tokens[1], tokens[2]] += 1
        accepted += stats.accepted_tokens
    return counts, accepted


def e2e_models(kind: str, law_models, tmp_path_factory):
    target, draft = law_models
    if kind == "transformers":
        return HFModel(target), HFModel(draft)
    directory = tmp_path_factory.mktemp("law-gguf")
    settings = LlamaCppSettings(context=64, batch=32, sequences=8, threads=1)
    return LlamaCppModel(write_gguf(target, directory / "t.gguf"), settings), LlamaCppModel(write_gguf(draft, directory / "d.gguf"), settings)


LAW_CASES = [
    pytest.param("transformers", SamplingConfig(temperature=1.0), 600, id="transformers-t1"),
    pytest.param("llama.cpp", SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), 1000, id="llama.cpp-t0.8-k5-p0.9", marks=needs_llama),
]


def check_law(kind, sampling, samples, law_models, tmp_path_factory) -> None:
    from test_sampling_e2e import exact_two_token_law

    target_model, draft_model = e2e_models(kind, law_models, tmp_path_factory)
    counts, accepted = sample_two_tokens(target_model, draft_model, sampling, samples)
    assert accepted > samples // 2  # trees really accepted tokens, so both tokens often came from a walk
    assert goodness_of_fit(counts, exact_two_token_law(law_models[0], sampling)) > 1e-4


@pytest.mark.parametrize("kind,sampling,samples", LAW_CASES)
def test_sampled_specexec_follows_the_target_law(kind, sampling, samples, law_models, tmp_path_factory):
    """Chi-square of new tokens 2 and 3 (after at least one tree round) against the exact law from the
    target alone (test_sampling_e2e's enumeration). Seeds are fixed: deterministic; a correct sampler's
    p-value is uniform over seeds, the bar is 1e-4, and the lossy walker below lands near 0."""
    check_law(kind, sampling, samples, law_models, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformers", pytest.param("llama.cpp", marks=needs_llama)])
@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)], ids=["t1", "t0.8-k5-p0.9"])
def test_sampled_specexec_follows_the_target_law_many_samples(kind, sampling, law_models, tmp_path_factory):
    check_law(kind, sampling, 3000, law_models, tmp_path_factory)


def test_the_law_check_rejects_a_lossy_walker(law_models, monkeypatch):
    """Negative control: a walk that takes the draft's best first child without asking the target
    (then walks on correctly) biases token 2 towards the draft; the same check rejects it."""

    def lossy_walk(tree: TokenTree, choice: torch.Tensor) -> Verdict:
        first_children = [node for node in range(1, tree.n_nodes) if tree.parents[node] == 0]
        if first_children:
            choice = choice.clone()
            choice[0] = tree.tokens[first_children[0]]
        return walk(tree, choice)

    from test_sampling_e2e import exact_two_token_law

    monkeypatch.setattr(steps, "walk", lossy_walk)
    target, draft = law_models
    counts, _ = sample_two_tokens(HFModel(target), HFModel(draft), SamplingConfig(temperature=1.0), 300)
    assert goodness_of_fit(counts, exact_two_token_law(target, SamplingConfig(temperature=1.0)), require_support=False) < 1e-6


# ===================================================================================================
# (e) Reduced scoring.


def random_tree(n: int, seed: int) -> TokenTree:
    generator = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, node, (1,), generator=generator)) for node in range(1, n)]
    return TokenTree(tokens=torch.arange(2, 2 + n), parents=tuple(parents))


def test_reduced_forward_gives_the_full_argmax_one_block_at_a_time(backend, monkeypatch):
    """LOGIT_BLOCK_ROWS 3 over an 11-node tree: the reduce callback sees blocks of 3, 3, 3, 2 float32
    rows, the reduced result is the full logits' argmax, and score_choices agrees. On transformers the
    output projection itself only ever runs on one block (a hook on the real lm_head counts rows)."""
    monkeypatch.setattr(model_base, "LOGIT_BLOCK_ROWS", 3)
    tree = random_tree(11, seed=5)
    model = backend.model

    def fresh_tree_pass(**kwargs):
        model.reset()
        model.forward(torch.tensor(COMMITTED))
        hook = None
        if backend.name == "transformers":
            hook = model.model.get_output_embeddings().register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[-2]))
        try:
            return model.forward(tree.tokens, len(COMMITTED) + tree.depth_tensor(), tree.ancestor_mask(), **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    head_rows: list[int] = []
    full = fresh_tree_pass()
    assert head_rows in ([11], [])  # the full pass projects all rows at once
    head_rows.clear()
    blocks = []

    def reduce(block: torch.Tensor) -> torch.Tensor:
        blocks.append((block.shape[0], block.dtype))
        return block.argmax(-1)

    reduced = fresh_tree_pass(reduce=reduce)
    assert blocks == [(3, torch.float32)] * 3 + [(2, torch.float32)]
    assert torch.equal(reduced, full.argmax(-1))
    if backend.name == "transformers":
        assert head_rows == [3, 3, 3, 2]  # never [11]: the whole [n, V] logits never existed
    model.reset()
    model.forward(torch.tensor(COMMITTED))
    choices = steps.score_choices(model, tree, SamplingConfig(), None, GenerationStats("x", 0))
    assert torch.equal(choices, full.argmax(-1))


@needs_llama
def test_reduced_forward_on_llama_cpp_chunks_stays_blockwise(gguf_files, monkeypatch):
    """A tree longer than llama.cpp's batch is decoded in chunks; each chunk's logits are reduced in
    blocks of at most LOGIT_BLOCK_ROWS rows, and the result is still the full argmax."""
    monkeypatch.setattr(model_base, "LOGIT_BLOCK_ROWS", 3)
    model = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=128, batch=8, sequences=8, threads=1))
    tree = random_tree(11, seed=6)
    assert len(leaves_of(tree.parents)) <= 7
    model.forward(torch.tensor(COMMITTED))
    full = model.forward(tree.tokens, 4 + tree.depth_tensor(), tree.ancestor_mask())
    model.reset()
    model.forward(torch.tensor(COMMITTED))
    rows = []
    reduced = model.forward(tree.tokens, 4 + tree.depth_tensor(), tree.ancestor_mask(), reduce=lambda block: (rows.append(block.shape[0]), block.argmax(-1))[1])
    assert rows == [3, 3, 2, 3]  # chunks of 8 and 3 tokens
    assert torch.equal(reduced, full.argmax(-1))


# ===================================================================================================
# (e) The node budget.


def hand_tree() -> tuple[TokenTree, Verdict]:
    """Root and 8 draft nodes whose rank (by score) is their index - 1; the accepted path 0 1 3 5 has
    ranks 0, 2, 4. Parents: 1, 2 under the root; 3, 4 under 1; 5 under 3; 6 under 4; 7 under 2; 8 under 5."""
    parents = (-1, 0, 0, 1, 1, 3, 4, 2, 5)
    scores = torch.tensor([0.0, -0.1, -0.3, -0.35, -0.4, -0.5, -0.6, -0.7, -0.8])
    tree = TokenTree(tokens=torch.arange(10, 19), parents=parents, log_probs=scores)
    return tree, Verdict(path=[0, 1, 3, 5], next_token=3)


def test_accepted_node_ranks():
    tree, verdict = hand_tree()
    assert accepted_node_ranks(tree, verdict) == [0, 2, 4]
    # Ties rank by index: nodes 2 and 3 share a score, node 2 ranks first.
    tied = TokenTree(tokens=tree.tokens, parents=tree.parents, log_probs=torch.tensor([0.0, -0.1, -0.3, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]))
    assert accepted_node_ranks(tied, Verdict(path=[0, 1, 3], next_token=1)) == [0, 2]  # not [0, 1]


def test_observe_round_records_every_budget_up_to_the_asked_one():
    """The b best nodes of a budget-B tree are the budget-b tree: budget b accepted the path's nodes
    ranked below b. Budgets above the asked one (and the tree) hear nothing."""
    tree, verdict = hand_tree()
    policy = TreeBudgetPolicy(None, None, fixed_budget=8)
    prior = {b: policy.expected_accepted(b) for b in CANDIDATE_BUDGETS}
    assert policy.next_budget().max_tokens == 8
    policy.observe_round(tree, verdict)
    weight = policy.prior_weight
    for b, accepted in {1: 1, 2: 1, 4: 2, 8: 3}.items():  # ranks 0, 2, 4 below b: 2 and 4 count from 4 and 8 on, not at 2 and 4
        assert policy.expected_accepted(b) == pytest.approx((accepted + weight * prior[b]) / (1 + weight))
    for b in CANDIDATE_BUDGETS[4:]:
        assert policy.expected_accepted(b) == prior[b]  # 16 and up: not recorded

    # A search that ended below its budget (asked 64, the tree has 8 nodes): budgets 16..64 got this tree.
    policy = TreeBudgetPolicy(None, None, fixed_budget=64)
    policy.next_budget()
    policy.observe_round(tree, verdict)
    for b in (16, 32, 64):
        assert policy.expected_accepted(b) == pytest.approx((3 + weight * prior[b]) / (1 + weight))
    assert policy.expected_accepted(128) == prior[128]


def deep_acceptance_tree(accepted_ranks: list[int], n_draft: int = 4096) -> tuple[TokenTree, Verdict]:
    """n_draft nodes ranked by index; the nodes at `accepted_ranks` form the accepted chain, every other
    node is a leaf under the root (tokens = index, so siblings differ)."""
    parents = [-1]
    previous = 0
    for rank in range(n_draft):
        if rank in accepted_ranks:
            parents.append(previous)
            previous = rank + 1
        else:
            parents.append(0)
    scores = torch.cat([torch.zeros(1), -0.001 * (1 + torch.arange(n_draft, dtype=torch.float32))])
    tree = TokenTree(tokens=torch.arange(n_draft + 1), parents=tuple(parents), log_probs=scores)
    return tree, Verdict(path=[0] + [rank + 1 for rank in accepted_ranks], next_token=0)


def test_flat_costs_and_deep_acceptance_choose_a_large_budget():
    """Offloading's regime: a pass over 4,097 tokens costs what one token does, drafting is nearly free,
    and the accepted paths reach nodes ranked in the thousands: the largest budget wins."""
    target_costs = CostProfile({1: 0.1, 2: 0.1, 4097: 0.1})
    draft_costs = CostProfile({1: 0.001, 256: 0.001})
    policy = TreeBudgetPolicy(target_costs, draft_costs)
    assert policy.candidates == CANDIDATE_BUDGETS
    tree, verdict = deep_acceptance_tree([0, 5, 20, 60, 150, 300, 500, 900, 1500, 2500])
    for _ in range(6):
        policy.next_budget()
        policy.observe_round(tree, verdict)
    assert policy.next_budget().max_tokens == 4096
    assert "chose budget 4096" in policy.describe()


def test_steep_costs_and_low_acceptance_choose_plain_decoding_and_probe():
    """This CPU's regime (DESIGN.md: t(n)/t(1) = 1.0, 1.05, 1.23, 1.35, 1.66, 2.07 at n = 2..16, then
    linear) with a draft pass a third of a target pass, and rounds that accepted nothing: budget 0
    (plain decoding), except a probe of the best tree every PROBE_EVERY rounds."""
    t1 = 0.26
    relative = {1: 1.0, 2: 1.0, 4: 1.05, 6: 1.23, 8: 1.35, 12: 1.66, 16: 2.07, 64: 8.28, 4097: 530.0}
    target_costs = CostProfile({n: t1 * r for n, r in relative.items()})
    draft_costs = CostProfile({1: 0.09, 2: 0.1, 4: 0.12, 256: 7.0})
    policy = TreeBudgetPolicy(target_costs, draft_costs)
    tree, nothing = deep_acceptance_tree([], n_draft=64)
    for _ in range(20):
        policy.observe_round(tree, nothing)
    budgets = [policy.next_budget().max_tokens for _ in range(2 * PROBE_EVERY)]
    probes = [index for index, budget in enumerate(budgets) if budget > 0]
    assert probes == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1]  # rounds 16 and 32
    assert "chose budget 0" in policy.describe() and f"probed every {PROBE_EVERY} rounds" in policy.describe()


def test_where_no_tree_could_ever_pay_nothing_is_drafted_not_even_probes():
    """The curves measured on this project's 2-core AMD CPU with llama.cpp (README): even with every
    draft token accepted no tree beats a plain step, so probing (each probe pays the draft's catch-up
    on every token since it last ran) is skipped. Control: the same policy with a 10x cheaper target
    growth would probe."""
    target_costs = CostProfile({1: 0.073, 2: 0.112, 3: 0.148, 4: 0.173, 5: 0.217, 6: 0.254, 8: 0.426, 12: 0.539, 16: 0.532, 24: 0.864, 33: 1.085, 48: 1.636})
    draft_costs = CostProfile({1: 0.045, 2: 0.092, 4: 0.132, 8: 0.238, 16: 0.383, 32: 0.709})
    policy = TreeBudgetPolicy(target_costs, draft_costs)
    assert not policy.could_pay
    assert [policy.next_budget().max_tokens for _ in range(3 * PROBE_EVERY)] == [0] * (3 * PROBE_EVERY)
    assert "even if every draft token were accepted" in policy.describe()
    cheap_growth = CostProfile({n: 0.073 + (s - 0.073) / 10 for n, s in target_costs.target_pass_seconds.items()})
    assert TreeBudgetPolicy(cheap_growth, draft_costs).could_pay


def test_measure_growing_costs_stops_at_the_ceiling(target):
    model = HFModel(target)
    assert list(measure_growing_costs(model, (1, 2, 4, 8), ceiling=0.0, context_tokens=16, repeats=1)) == [1]  # the first pass is over it
    costs = measure_growing_costs(model, (1, 2, 4, 8, 1000), ceiling=math.inf, context_tokens=16, repeats=1)
    assert list(costs) == [1, 2, 4, 8]  # 1000 does not fit the 256 positions
    assert model.cache_len == 0


def test_fixed_policy_describes_itself():
    assert TreeBudgetPolicy(None, None, depth=5, fixed_budget=32).describe() == "specexec: fixed budget 32 (depth cap 5)"
    with pytest.raises(ValueError, match="measured"):
        TreeBudgetPolicy(None, None)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tree_budget": 0}, "tree_budget must be an integer in 1..4096"),
        ({"tree_budget": 5000}, "tree_budget must be an integer in 1..4096"),
        ({"tree_depth": 0}, "tree_depth must be an integer in 1..64"),
        ({"lenience": 0.5}, "specexec verifies its trees exactly"),
    ],
)
def test_bad_specexec_requests_are_refused(target, kwargs, message):
    with pytest.raises(DuospecError, match=message):
        GenerationRequest(method="specexec", **kwargs)
    pipe = tiny_pipeline(target, target)
    with pytest.raises(DuospecError, match=message):
        pipe.generate("w1", method="specexec", max_new_tokens=4, **kwargs)


# ===================================================================================================
# The real pair.


@pytest.mark.slow
@pytest.mark.real_model
def test_real_pair_float32_specexec_equals_ar():
    """Qwen2.5-Coder 1.5B target, 0.5B draft, float32 on transformers: greedy specexec is ar, token for token."""
    from test_real_models import PROMPTS as REAL_PROMPTS
    from test_real_models import _require_models

    _require_models()
    import duospec

    pipe = duospec.load(dtype="float32", backend="transformers", progress=False)
    for prompt in REAL_PROMPTS[:2]:
        ids = pipe.encode(prompt)
        ar = pipe.generate(ids, method="ar", max_new_tokens=24)
        for budget in (8, 32):
            started = time.perf_counter()
            out = pipe.generate(ids, method="specexec", max_new_tokens=24, tree_budget=budget)
            assert out.token_ids == ar.token_ids, (prompt, budget, time.perf_counter() - started)
            assert out.stats.accepted_tokens > 0


def test_the_tree_stops_growing_when_a_request_joins_the_batch():
    """Under batching (models/joint.py) a request that joins mid-search ends the search at the level in
    flight: the round's pass will be narrowed to what is fair beside the newcomer (engines/rounds.py),
    so deeper levels would only hold up its tokens. Alone the search runs all its levels."""
    from types import SimpleNamespace

    target = tiny_model(seed=0)
    context = [5, 6, 7, 8]

    def levels_run(join_after_passes: int | None) -> int:
        model = HFModel(perturbed(target, noise=0.2, seed=7))
        model.joiner = SimpleNamespace(members=1)
        real_forward, calls = model.forward, []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == join_after_passes:
                model.joiner.members = 2  # a request joins while this pass runs
            return real_forward(*args, **kwargs)

        model.forward = counted
        SpecExecDrafter(model, target.config.vocab_size, depth=4).propose(context, DraftBudget(16), SamplingConfig(), None)
        return len(calls) - 1  # the root's pass is not a level

    assert levels_run(None) == 4
    assert levels_run(2) == 1  # joined during the first level: no second one
