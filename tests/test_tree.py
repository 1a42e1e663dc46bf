"""Tests for TokenTree: shapes, validation, paths and the ancestor mask the target attends with.

The ancestor mask decides which draft tokens each node sees in the target's tree pass; a wrong entry
silently scores a node in the wrong context. So besides the docstring example it is compared with a
brute-force walk up the parent links on random trees of every shape (chains, deep, bushy, mixed).
"""

from __future__ import annotations

import random

import pytest
import torch

from duospec.tree import TokenTree


def brute_force_ancestors(parents: tuple[int, ...]) -> torch.Tensor:
    """[n, n] bool: mask[i, j] when j is i or an ancestor of i, by walking up one link at a time."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for node in range(n):
        ancestor = node
        while ancestor >= 0:
            mask[node, ancestor] = True
            ancestor = parents[ancestor]
    return mask


def random_tree(rng: random.Random, n: int, shape: str, vocab: int = 6) -> TokenTree:
    """A random tree of n nodes with distinct sibling tokens.

    shape: "random" (parent uniform among earlier nodes), "deep" (mostly the previous node),
    "bushy" (mostly the first three nodes with room for another child).
    """
    parents = [-1]
    tokens = [rng.randrange(vocab)]
    used: dict[int, set[int]] = {0: set()}
    for node in range(1, n):
        open_parents = [p for p in range(node) if len(used[p]) < vocab]  # never empty: node - 1 is a leaf
        if shape == "deep" and rng.random() < 0.8:
            parent = node - 1
        elif shape == "bushy" and rng.random() < 0.9:
            parent = min(open_parents[:3], key=lambda p: len(used[p]))
        else:
            parent = rng.choice(open_parents)
        token = rng.choice([t for t in range(vocab) if t not in used[parent]])
        used[parent].add(token)
        used[node] = set()
        parents.append(parent)
        tokens.append(token)
    return TokenTree(tokens=torch.tensor(tokens), parents=tuple(parents))


# ---------------------------------------------------------------------------------------------------
# Worked example (STYLE item 3): the docstring of `ancestor_mask`.


def test_ancestor_mask_docstring_example():
    """tokens [7, 3, 5, 9], parents (-1, 0, 0, 1): node 3 sees the root and node 1, not its uncle node 2."""
    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9]), parents=(-1, 0, 0, 1))
    mask = tree.ancestor_mask().int().tolist()
    assert mask[0] == [1, 0, 0, 0]
    assert mask[1] == [1, 1, 0, 0]
    assert mask[2] == [1, 0, 1, 0]
    assert mask[3] == [1, 1, 0, 1]  # not [1, 1, 1, 1]: node 2 is a sibling of node 1, not an ancestor
    assert not tree.is_chain
    assert tree.depths == (0, 1, 1, 2)
    assert tree.path_to(3) == [0, 1, 3]  # not [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------
# Chains versus trees.


def test_chain_constructor_is_a_chain():
    tree = TokenTree.chain(torch.tensor([4, 1, 2, 3]))
    assert tree.parents == (-1, 0, 1, 2)
    assert tree.is_chain
    assert tree.depths == (0, 1, 2, 3)
    assert tree.n_nodes == 4 and tree.n_draft == 3
    assert tree.path_to(3) == [0, 1, 2, 3]
    assert tree.path_to(0) == [0]
    # A chain's mask is lower-triangular (the causal mask), equal to the brute-force one.
    assert torch.equal(tree.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(tree.ancestor_mask(), brute_force_ancestors(tree.parents))
    assert tree.depth_tensor().tolist() == [0, 1, 2, 3]
    assert tree.depth_tensor().dtype == torch.int64


def test_chain_given_by_parents_is_recognised():
    """is_chain depends on the parents, not on which constructor was used."""
    assert TokenTree(tokens=torch.tensor([0, 1, 2]), parents=(-1, 0, 1)).is_chain


def test_root_only_tree():
    tree = TokenTree.chain(torch.tensor([5]))
    assert tree.is_chain and tree.n_nodes == 1 and tree.n_draft == 0
    assert tree.depths == (0,)
    assert tree.ancestor_mask().tolist() == [[True]]
    assert tree.path_to(0) == [0]


def test_bushy_tree_is_not_a_chain():
    tree = TokenTree(tokens=torch.tensor([0, 1, 2, 3]), parents=(-1, 0, 0, 0))
    assert not tree.is_chain
    assert tree.depths == (0, 1, 1, 1)
    assert tree.path_to(2) == [0, 2]
    assert tree.ancestor_mask().int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]


def test_depths_and_paths_of_a_mixed_tree():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #       |
    #       6
    tree = TokenTree(tokens=torch.tensor([0, 1, 2, 1, 2, 1, 0]), parents=(-1, 0, 0, 1, 1, 2, 4))
    assert tree.depths == (0, 1, 1, 2, 2, 2, 3)
    assert tree.path_to(6) == [0, 1, 4, 6]
    assert tree.path_to(5) == [0, 2, 5]
    assert torch.equal(tree.ancestor_mask(), brute_force_ancestors(tree.parents))


def test_ancestor_mask_depth_three_sees_root_regression():
    """Regression: the mask loop stepped with `ancestor[ancestor]` (pointer doubling: 1, 2, 4 levels up)
    instead of one parent link per level, so a node 3 levels below the root missed the root (and any
    node 3, 5, 6, 7 ... levels up). Chains take the tril shortcut, so only trees of depth >= 3 showed it;
    the target then scored such nodes without the root token in context.
    """
    # A non-chain tree with a depth-3 node: 0 -> 1 -> 2 -> 3, plus a sibling 4 under the root.
    tree = TokenTree(tokens=torch.tensor([0, 1, 2, 3, 4]), parents=(-1, 0, 1, 2, 0))
    assert tree.ancestor_mask()[3].int().tolist() == [1, 1, 1, 1, 0]  # not [0, 1, 1, 1, 0]
    # Depth 7: every level up must be present.
    deep = TokenTree(tokens=torch.arange(9), parents=(-1, 0, 1, 2, 3, 4, 5, 6, 0))
    assert deep.ancestor_mask()[7].int().tolist() == [1] * 8 + [0]


@pytest.mark.parametrize("shape", ["random", "deep", "bushy"])
@pytest.mark.parametrize("seed", range(4))
def test_ancestor_mask_matches_brute_force_on_random_trees(shape, seed):
    """The batched mask equals the one-link-at-a-time walk; depths and paths agree with it too."""
    rng = random.Random(1000 * seed + len(shape))
    for n in (2, 3, rng.randrange(4, 20), rng.randrange(20, 51), 50):
        tree = random_tree(rng, n, shape)
        tree.check_siblings_distinct()
        mask = tree.ancestor_mask()
        assert mask.dtype == torch.bool and mask.shape == (n, n)
        assert torch.equal(mask, brute_force_ancestors(tree.parents)), (tree.parents, mask)
        for node in range(n):
            path = tree.path_to(node)
            assert path[0] == 0 and path[-1] == node
            assert set(path) == set(torch.nonzero(mask[node]).flatten().tolist())
            assert tree.depths[node] == len(path) - 1
            assert all(tree.parents[b] == a for a, b in zip(path, path[1:]))


# ---------------------------------------------------------------------------------------------------
# Validation.


def test_parent_after_child_is_rejected():
    with pytest.raises(ValueError, match="parents must come before their children"):
        TokenTree(tokens=torch.tensor([0, 1, 2]), parents=(-1, 2, 0))


def test_self_parent_is_rejected():
    with pytest.raises(ValueError, match="node 1 has parent 1"):
        TokenTree(tokens=torch.tensor([0, 1]), parents=(-1, 1))


def test_root_must_have_parent_minus_one():
    with pytest.raises(ValueError, match="root"):
        TokenTree(tokens=torch.tensor([0, 1]), parents=(0, 0))


def test_second_root_is_rejected():
    with pytest.raises(ValueError, match="node 1 has parent -1"):
        TokenTree(tokens=torch.tensor([0, 1]), parents=(-1, -1))


def test_draft_probs_on_a_non_chain_are_rejected():
    with pytest.raises(ValueError, match="only kept for chains"):
        TokenTree(tokens=torch.tensor([0, 1, 2]), parents=(-1, 0, 0), draft_probs=torch.full((2, 4), 0.25))


@pytest.mark.parametrize(
    "tokens, parents",
    [
        (torch.tensor([[0, 1]]), (-1, 0)),  # 2-D tokens
        (torch.tensor([0, 1, 2]), (-1, 0)),  # one token too many
        (torch.tensor([0]), (-1, 0)),  # one token too few
        (torch.tensor([], dtype=torch.long), ()),  # no root at all
    ],
)
def test_tokens_of_the_wrong_shape_are_rejected(tokens, parents):
    with pytest.raises(ValueError, match="tokens must be a 1-D tensor"):
        TokenTree(tokens=tokens, parents=parents)


@pytest.mark.parametrize("shape", [(3, 4), (1, 4), (2,), (2, 4, 1)])
def test_draft_probs_of_the_wrong_shape_are_rejected(shape):
    """A chain of 3 nodes has 2 draft tokens: draft_probs must be [2, V]."""
    with pytest.raises(ValueError, match=r"draft_probs must be \[n_nodes - 1, V\]"):
        TokenTree.chain(torch.tensor([0, 1, 2]), draft_probs=torch.full(shape, 0.25))


def test_draft_probs_of_the_right_shape_are_kept():
    draft_probs = torch.full((2, 4), 0.25)
    tree = TokenTree.chain(torch.tensor([0, 1, 2]), draft_probs=draft_probs)
    assert tree.draft_probs is draft_probs


def test_check_siblings_distinct():
    # Two children of the root both carry token 3: a walk could not tell them apart.
    with pytest.raises(ValueError, match="node 2 repeats token 3 under parent 0"):
        TokenTree(tokens=torch.tensor([3, 3, 3]), parents=(-1, 0, 0)).check_siblings_distinct()
    # The same token under different parents (cousins) or on parent and child is fine.
    TokenTree(tokens=torch.tensor([3, 3, 4, 3, 3]), parents=(-1, 0, 0, 1, 2)).check_siblings_distinct()
    TokenTree.chain(torch.tensor([3, 3, 3])).check_siblings_distinct()


def test_tree_is_immutable():
    tree = TokenTree.chain(torch.tensor([0, 1]))
    with pytest.raises(AttributeError):
        tree.parents = (-1, 0)  # type: ignore[misc]


def test_the_first_nodes_of_a_tree_are_a_tree():
    """What a round scores when a joining request narrows its pass (engines/rounds.py)."""
    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9, 4]), parents=(-1, 0, 0, 1, 3), log_probs=torch.tensor([0.0, -0.1, -0.5, -0.7, -0.9]))
    first = tree.first(4)
    assert first.tokens.tolist() == [7, 3, 5, 9] and first.parents == (-1, 0, 0, 1) and first.log_probs.tolist() == pytest.approx([0.0, -0.1, -0.5, -0.7])
    assert tree.first(5) is tree and tree.first(1).n_nodes == 1
    chain = TokenTree.chain(torch.tensor([1, 2, 3]), draft_probs=torch.full((2, 4), 0.25))
    assert chain.first(2).is_chain and chain.first(2).draft_probs.shape == (1, 4)  # the law of the draft kept
    with pytest.raises(ValueError, match="no first 6"):
        tree.first(6)
