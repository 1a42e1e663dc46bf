"""ties.divergence: where two greedy answers part, and whether the target was near a tie there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench_fixtures import one_thread, tiny_pipeline
from duospec.bench.ties import NEAR_TIE_LOGITS_FLOAT32, NEAR_TIE_LOGITS_LLAMA_CPP, divergence, near_tie_tolerance


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


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, 0.25), (torch.float16, 0.03125), (torch.float32, 1e-3), (torch.float64, 1e-3)])
def test_tolerance_follows_the_precision_of_the_dtype(dtype, expected):
    assert near_tie_tolerance(dtype) == near_tie_tolerance(dtype, "transformers") == expected
    assert NEAR_TIE_LOGITS_FLOAT32 == 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_is_two_rounding_steps_of_a_logit_between_16_and_32(dtype):
    """Half the tolerance is the spacing of the dtype's numbers from 16 to 32, checked by rounding."""
    step = near_tie_tolerance(dtype) / 2
    for base in (16.0, 31.0 - step):
        assert float(torch.tensor(base + step).to(dtype)) == base + step  # representable: a whole step
        assert float(torch.tensor(base + 0.4 * step).to(dtype)) == base  # less than half a step rounds away


def test_float16_is_held_to_a_tighter_tolerance_than_bfloat16():
    assert near_tie_tolerance(torch.float16) == near_tie_tolerance(torch.bfloat16) / 8  # 3 more mantissa bits


def test_llama_cpp_has_its_own_tolerance_whatever_the_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, "q4_0", None):
        assert near_tie_tolerance(dtype, "llama.cpp") == NEAR_TIE_LOGITS_LLAMA_CPP == 0.25


def test_an_unknown_backend_or_a_non_float_dtype_is_refused():
    with pytest.raises(ValueError, match=r"backend 'vllm'"):
        near_tie_tolerance(torch.float32, "vllm")
    with pytest.raises(ValueError, match=r"dtype torch.int8"):
        near_tie_tolerance(torch.int8)


def test_divergence_and_the_bench_verdict_use_the_pipelines_backend_and_dtype(pipe):
    """A gap of the target's logits between float32's tolerance and llama.cpp's is a mismatch on the
    transformers backend and a near-tie on llama.cpp; a pipeline without `backend` counts as transformers."""
    from duospec.bench.runner import _greedy_check

    logits = _target_logits(pipe, [1, 2, 5])
    gaps = (logits - logits[6]).abs()
    close = [t for t in range(len(gaps)) if 0.01 < float(gaps[t]) < 0.2]
    assert close, "the tiny target has no token within 0.2 of token 6's logit"
    other = close[0]
    on = {backend: SimpleNamespace(target=pipe.target, dtype=torch.float32, backend=backend) for backend in ("transformers", "llama.cpp")}
    no_backend = SimpleNamespace(target=pipe.target, dtype=torch.float32)
    assert divergence(on["llama.cpp"], [1, 2], [5, 6], [5, other]).is_near_tie
    assert not divergence(on["transformers"], [1, 2], [5, 6], [5, other]).is_near_tie
    assert not divergence(no_backend, [1, 2], [5, 6], [5, other]).is_near_tie
    assert _greedy_check(on["llama.cpp"], [1, 2], [5, 6], [5, other], [])["status"] == "near_tie"
    assert _greedy_check(on["transformers"], [1, 2], [5, 6], [5, other], [])["status"] == "mismatch"
    # The tolerance each verdict records is the pipeline's own.
    for dtype, expected in ((torch.bfloat16, 0.25), (torch.float16, 0.03125), (torch.float32, 1e-3)):
        assert _greedy_check(SimpleNamespace(dtype=dtype), [1], [5], [5], [])["tolerance"] == expected
    assert _greedy_check(SimpleNamespace(dtype=torch.float32, backend="llama.cpp"), [1], [5], [5], [])["tolerance"] == 0.25
