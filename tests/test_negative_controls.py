"""The exactness checks have teeth: break the engine on purpose and they must fail.

`same_as_ar` is the end-to-end greedy check the exactness tests make (every method against `ar`,
token for token, on a partly-right draft so that acceptance is partial). Each control below breaks
one engine step the way a real bug would, and asserts that this check (or the engine's own cache
check) then fails. If a control ever passes, the check it guards has gone blind.
"""

from __future__ import annotations

import pytest
import torch

from duospec.engines import steps
from duospec.verify import Verdict
from tiny_models import perturbed, tiny_model, tiny_pipeline

PROMPTS = ["abc def", "hello world", "q1 xyz"]


@pytest.fixture(scope="module")
def pipe():
    target = tiny_model(seed=0, max_positions=512)
    return tiny_pipeline(target, perturbed(target, noise=0.2, seed=7))


def answers(pipe, method: str, **options) -> list[list[int]]:
    return [pipe.generate(p, method=method, max_new_tokens=40, temperature=0, chat=False, **options).token_ids for p in PROMPTS]


def same_as_ar(pipe, method: str, **options) -> bool:
    return answers(pipe, method, **options) == answers(pipe, "ar")


@pytest.mark.parametrize("method, options", [("sd", {"gamma": 4}), ("pld", {}), ("multiseq", {}), ("specexec", {"tree_budget": 24, "tree_depth": 4})])
def test_the_check_passes_on_the_real_engine(pipe, method, options):
    assert same_as_ar(pipe, method, **options)


def test_control_keeping_the_prefix_instead_of_the_accepted_path_is_caught(pipe, monkeypatch):
    """In a tree the accepted path is not the first nodes; keeping those leaves the cache with the
    right length but the wrong tokens (the length check cannot see it, the output does)."""

    def keep_prefix(target, verdict: Verdict, progress):
        target.keep(list(range(len(verdict.path))))
        progress.context.extend(verdict.tokens)

    monkeypatch.setattr(steps, "keep", keep_prefix)
    assert not same_as_ar(pipe, "specexec", tree_budget=24, tree_depth=4)


@pytest.mark.parametrize("shift", [-1, 1])
def test_control_keep_off_by_one_is_caught(pipe, monkeypatch, shift):
    """One cached token too few or too many: the engine's per-round cache check stops it at once."""
    original_keep = steps.keep

    def keep_off_by_one(target, verdict: Verdict, progress):
        path = verdict.path[:-1] if shift < 0 else verdict.path + [verdict.path[-1] + 1]
        original_keep(target, Verdict(path, verdict.next_token, verdict.tokens), progress)

    monkeypatch.setattr(steps, "keep", keep_off_by_one)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        answers(pipe, "sd", gamma=4)


def test_control_a_verifier_that_accepts_every_draft_is_caught(pipe, monkeypatch):
    """Accepting the whole chain whatever the target says: the partly-right draft's mistakes reach
    the output, and the check must see them."""

    def accept_all(tree, logits, request, generator, stats):
        path = list(range(len(tree.tokens)))
        next_token = int(torch.argmax(logits[-1]))
        return Verdict(path, next_token, [int(t) for t in tree.tokens[1:]] + [next_token])

    monkeypatch.setattr(steps, "accept", accept_all)
    assert not same_as_ar(pipe, "sd", gamma=4)


def test_control_a_verifier_that_accepts_one_token_too_many_is_caught(pipe, monkeypatch):
    """The subtlest over-acceptance: after a rejection, keep the rejected draft token too."""
    original_accept = steps.accept

    def accept_one_more(tree, logits, request, generator, stats):
        verdict = original_accept(tree, logits, request, generator, stats)
        if tree.is_chain and verdict.n_accepted < tree.n_draft:
            extra = len(verdict.path)
            path = verdict.path + [extra]
            next_token = int(torch.argmax(logits[extra]))
            return Verdict(path, next_token, [int(t) for t in tree.tokens[1 : extra + 1]] + [next_token])
        return verdict

    monkeypatch.setattr(steps, "accept", accept_one_more)
    assert not same_as_ar(pipe, "sd", gamma=4)
