"""`--method auto` and `duo` through the Pipeline: identity with `ar`, the choice and its report, cleanup.

Tiny float32 models; `duo` runs a real spawned draft process. The choice between duo and the in-process
methods is tested with injected split costs (the rule, not this machine's timing, is what is checked).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from duospec.engines.duo import ThreadSplit
from duospec.engines.duo_runtime import SplitCosts
from tiny_models import perturbed, tiny_model, tiny_pipeline

PROMPT = [5, 9, 13, 2, 7, 11, 5, 9, 13]  # repeats, so prompt lookup finds matches

SLOW_DUO = SplitCosts({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}, 1.0)  # promises 1 tok/s
FAST_DUO = SplitCosts({1: 1e-5, 2: 1e-5, 4: 1e-5, 8: 1e-5, 16: 1e-5}, 1e-6)  # promises far more than anything in-process
SPLIT = ThreadSplit(1, 1, None, None)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    target = tiny_model(0).float()
    pipeline = tiny_pipeline(target, perturbed(target, 0.05, 1).float())
    yield pipeline
    pipeline.close()


def _inject(pipeline, costs: SplitCosts) -> None:
    runtime = pipeline.duo_runtime()
    runtime.split, runtime.costs = SPLIT, costs
    runtime.report = ["injected by the test"]


@pytest.mark.parametrize("max_new_tokens", [1, 7, 40])
def test_auto_in_process_equals_ar(pipe, max_new_tokens, duo_candidate):
    _inject(pipe, SLOW_DUO)
    reference = pipe.generate(PROMPT, method="ar", max_new_tokens=max_new_tokens).token_ids
    result = pipe.generate(PROMPT, method="auto", max_new_tokens=max_new_tokens)
    assert result.token_ids == reference
    assert result.stats.method == "auto"  # duo promised less: not chosen
    if max_new_tokens > 1:
        # every round that could draft says what ran (a round with room for no draft token asks nobody)
        assert 0 < sum(result.stats.auto_rounds.values()) <= result.stats.target_passes - 1
        assert set(result.stats.auto_rounds) <= {"ar", "sd", "suffix"}
        assert "a 2-token pass costs" in result.stats.choice_note


@pytest.fixture
def duo_candidate(monkeypatch):
    """duo is measured only with 4+ CPU cores (or a GPU); these tests check the rule on any machine."""
    import duospec.engines.start

    monkeypatch.setattr(duospec.engines.start, "DUO_MIN_CPU_CORES", 1)


def test_auto_does_not_measure_duo_on_too_few_cores(monkeypatch):
    import duospec.engines.start

    target = tiny_model(0).float()
    pipeline = tiny_pipeline(target, perturbed(target, 0.05, 1).float())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(type(pipeline), "duo_runtime", lambda self: pytest.fail("measured duo on 2 cores"))
    result = pipeline.generate(PROMPT, method="auto", max_new_tokens=12)
    assert result.stats.method == "auto"
    assert not duospec.engines.start.duo_is_a_candidate(torch.device("cpu"))
    assert duospec.engines.start.duo_is_a_candidate(torch.device("cuda"))


def test_auto_picks_duo_where_its_measured_costs_promise_more(pipe, capsys, duo_candidate):
    _inject(pipe, FAST_DUO)
    pipe.verbose = True
    try:
        reference = pipe.generate(PROMPT, method="ar", max_new_tokens=30).token_ids
        result = pipe.generate(PROMPT, method="auto", max_new_tokens=30)
    finally:
        pipe.verbose = False
    assert result.stats.method == "auto:duo"
    assert result.token_ids == reference
    err = capsys.readouterr().err
    assert "auto: duo promises" in err and "duo budget" in err


def test_duo_through_the_pipeline_equals_ar_and_reports_json(pipe):
    _inject(pipe, FAST_DUO)
    reference = pipe.generate(PROMPT, method="ar", max_new_tokens=25)
    result = pipe.generate(PROMPT, method="duo", max_new_tokens=25)
    assert result.token_ids == reference.token_ids
    record = result.to_dict()
    assert record["method"] == "duo" and "fallback" not in record


def test_sampled_duo_respects_the_request_and_its_seed_range(pipe):
    _inject(pipe, FAST_DUO)
    result = pipe.generate(PROMPT, method="duo", max_new_tokens=20, temperature=0.8, seed=3)
    stats = result.stats
    # the request's length is honoured exactly unless an EOS ends it early (then it is the last token)
    if stats.finish_reason == "length":
        assert stats.new_tokens == len(result.token_ids) == 20
    else:
        assert stats.finish_reason == "eos" and result.token_ids[-1] in pipe.eos_ids
    assert stats.drafted_tokens > 0 and not stats.fallback  # sampled rounds really were drafted by the process
    assert sum(stats.tokens_per_pass) == stats.new_tokens


def test_close_leaves_no_child_process(pipe):
    _inject(pipe, FAST_DUO)
    pipe.generate(PROMPT, method="duo", max_new_tokens=5)
    process = pipe.duo_runtime().process
    assert process is not None and process.alive
    pipe.close()
    assert not process.alive
    assert not [child for child in multiprocessing.active_children() if child.name == "duospec-draft"]


def test_duo_without_a_draft_is_a_clear_error():
    from duospec.config import DuospecError

    pipeline = tiny_pipeline(tiny_model(0).float())
    with pytest.raises(DuospecError, match="needs a draft"):
        pipeline.generate(PROMPT, method="duo", max_new_tokens=5)


def test_a_method_that_cannot_pay_says_why_in_measured_terms():
    """sd and pld on a steep curve (a 2-token pass at 2x a 1-token pass): nothing is drafted, and the
    summary's note says why; on a flat curve there is no such note."""
    from duospec.cli import summary_line

    target = tiny_model(0).float()
    pipeline = tiny_pipeline(target, perturbed(target, 0.05, 1).float())
    pipeline.costs.target_costs = {1: 0.01, 2: 0.02, 4: 0.04, 8: 0.08}
    pipeline.costs.draft_step = 0.005
    for method, step_note in (("sd", "a draft step 0.50x"), ("pld", "")):
        result = pipeline.generate(PROMPT, method=method, max_new_tokens=12)
        assert result.stats.drafted_tokens == 0
        note = result.stats.choice_note
        assert note.startswith("a 2-token pass costs 2.00x a 1-token pass") and "cannot pay" in note and step_note in note
        assert note in summary_line(result.stats)
    pipeline.costs.target_costs = {1: 0.01, 2: 0.01, 4: 0.0105, 8: 0.011}
    assert pipeline.generate(PROMPT, method="sd", max_new_tokens=12).stats.choice_note == ""


def test_auto_learns_the_draft_models_acceptance_only_from_its_rounds():
    """auto_alpha is what auto expects of the draft model: rounds that copied a suffix (or drafted
    nothing) must not move it (review of the acceptance_estimate rename); sd rounds do."""
    target = tiny_model(0).float()
    pipeline = tiny_pipeline(target, perturbed(target, 0.05, 1).float())
    pipeline.costs.target_costs = {1: 0.01, 2: 0.02, 4: 0.04, 8: 0.08}  # steep: the draft model cannot pay
    pipeline.costs.draft_step = 0.005
    result = pipeline.generate(PROMPT, method="auto", max_new_tokens=16)
    assert "sd" not in result.stats.auto_rounds and pipeline.auto_alpha == 0.8
    pipeline.costs.target_costs = {1: 0.01, 2: 0.01, 4: 0.0105, 8: 0.011, 16: 0.012, 33: 0.015}  # flat: it pays
    pipeline.costs.draft_step = 0.0005
    pipeline.suffix_scope = "request"  # no copying from the first answer: the draft model drafts
    result = pipeline.generate(PROMPT, method="auto", max_new_tokens=16)
    assert result.stats.auto_rounds.get("sd", 0) > 0 and pipeline.auto_alpha != 0.8
