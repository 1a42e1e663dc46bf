"""ties.divergence: where two greedy answers part, and whether the target was near a tie there."""

from __future__ import annotations

import pytest
import torch

from bench_fixtures import one_thread, tiny_pipeline
from duospec.bench.ties import NEAR_TIE_LOGITS_FLOAT32, NEAR_TIE_LOGITS_LOW_PRECISION, divergence, near_tie_tolerance


@pytest.fixture(scope="module")
def pipe():
    with one_thread():
        yield tiny_pipeline()


def _target_logits(pipe, ids: list[int]) -> torch.Tensor:
    """The target's next-token logits after `ids`, straight from transformers (no duospec cache code)."""
    with torch.no_grad():
        return pipe.target.model(torch.tensor([ids])).logits[0, -1].float()


def test_identical_answers_have_no_divergence(pipe):
    assert divergence(pipe, [1, 2], [5, 6, 7], [5, 6, 7]).to_dict() == {"position": None, "margin": None, "is_near_tie": False}


def test_position_counts_new_tokens_and_margin_is_the_gap_of_the_two_chosen_tokens(pipe):
    found = divergence(pipe, [1, 2], [5, 6, 7], [5, 9, 7])
    assert found.position == 1  # not 2: the prompt is not counted, new tokens start at 0
    logits = _target_logits(pipe, [1, 2, 5])
    assert found.margin == pytest.approx(abs(float(logits[6] - logits[9])), abs=1e-4)


def test_near_tie_is_decided_by_the_tolerance(pipe):
    margin = divergence(pipe, [1, 2], [5, 6], [5, 9]).margin
    assert divergence(pipe, [1, 2], [5, 6], [5, 9], tolerance=margin + 1e-3).is_near_tie
    assert not divergence(pipe, [1, 2], [5, 6], [5, 9], tolerance=margin / 2).is_near_tie


def test_an_answer_that_stops_early_has_no_competing_token(pipe):
    found = divergence(pipe, [1, 2], [5, 6], [5, 6, 7])
    assert (found.position, found.margin, found.is_near_tie) == (2, None, False)


def test_the_target_cache_is_left_empty(pipe):
    divergence(pipe, [1, 2], [5, 6], [5, 9])
    assert pipe.target.cache_len == 0


def test_tolerance_is_wide_only_for_low_precision():
    assert near_tie_tolerance(torch.float32) == NEAR_TIE_LOGITS_FLOAT32
    assert near_tie_tolerance(torch.bfloat16) == near_tie_tolerance(torch.float16) == NEAR_TIE_LOGITS_LOW_PRECISION
