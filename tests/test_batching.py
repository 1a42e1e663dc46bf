"""Continuous batching on the llama.cpp backend (duospec/batching.py, models/joint.py): lanes of one
cache answer several requests at once, each exactly as it would alone.

Tiny float32 GGUF files (tests/tiny_gguf.py): requests answered in threads, their passes joined,
must give the tokens of the same requests answered one at a time, for every method, while requests
join and leave between passes; a lane's cache operations never touch another lane's cells.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")

from lane_runs import PROMPTS, REQUESTS, answerer, newcomer_during, run_batched, sampled_counts  # noqa: E402
from tiny_gguf import write_gguf  # noqa: E402
from tiny_models import EOS_ID, perturbed, tiny_model, tiny_tokenizer  # noqa: E402

from duospec.api import Pipeline  # noqa: E402
from duospec.batching import default_max_batch, open_lanes  # noqa: E402
from duospec.budget.batch import UNFAIR, BatchPricedProfile  # noqa: E402
from duospec.budget.model import CostProfile  # noqa: E402
from duospec.config import DuospecError  # noqa: E402
from duospec.models.llamacpp import LlamaCppModel, LlamaCppSettings, split_lanes  # noqa: E402

LANES = 4
SETTINGS = LlamaCppSettings(context=256, batch=64, sequences=64, threads=1)
@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    target = tiny_model(seed=0)
    return {"target": write_gguf(target, directory / "target.gguf"), "draft": write_gguf(perturbed(target, noise=0.2, seed=7), directory / "draft.gguf")}


def pipeline(files, settings: LlamaCppSettings) -> Pipeline:
    pipe = Pipeline(LlamaCppModel(files["target"], settings), tiny_tokenizer(), device=torch.device("cpu"), dtype=torch.float32, threads=1, backend="llama.cpp", eos_ids=frozenset({EOS_ID}))
    pipe.attach_draft(LlamaCppModel(files["draft"], settings))
    return pipe


@pytest.fixture(scope="module")
def solo_answers(gguf_files):
    """Every (prompt, method) answered alone, one at a time, on an unsplit pipeline."""
    pipe = pipeline(gguf_files, LlamaCppSettings(context=256, batch=64, sequences=16, threads=1))
    return {(prompt, method): pipe.generate(prompt, method=method, max_new_tokens=24, **options).token_ids for prompt in PROMPTS for method, options in REQUESTS}


def test_batched_requests_equal_the_same_requests_alone(gguf_files, solo_answers):
    pipe = pipeline(gguf_files, SETTINGS)
    passes = []
    lanes, joint = open_lanes(pipe, LANES, on_pass=passes.append)
    jobs = [(prompt, method, options) for method, options in REQUESTS for prompt in PROMPTS]
    answers = run_batched(lanes, joint, jobs)
    mismatches = [key for key, tokens in solo_answers.items() if answers[key] != tokens]
    assert not mismatches, mismatches
    assert max(record.lanes for record in passes) == LANES  # the target's passes really were joint
    assert any(record.drafting_lanes for record in passes) and any(record.prompt_lanes for record in passes)
    assert sum(record.prompt_lanes for record in passes) == len(jobs)  # on_pass hears target passes only


def test_a_long_prompt_beside_decoding_requests_is_cut_into_chunks(gguf_files, solo_answers):
    """With the measured curve known, a prompt's pass beside other generating requests takes at most
    budget/batch.py's prefill_chunk tokens; the answers stay those of the requests alone."""
    from duospec.budget.batch import prefill_chunk

    pipe = pipeline(gguf_files, SETTINGS)
    curve = pipe.costs.target_profile()  # measured on the unsplit model, as the server does before listening
    passes = []
    lanes, joint = open_lanes(pipe, LANES, on_pass=passes.append)
    assert joint.prefill_chunk is not None
    long_prompt = PROMPTS[2]  # 12 words: the longest prompt
    # specexec: its draft's first pass (the whole prompt) is cut too, and its tree grows from all of it
    jobs = [(prompt, "ar", {}) for prompt in PROMPTS] + [(long_prompt, "pld", {"gamma": 4}), (long_prompt, "specexec", {"tree_budget": 12, "tree_depth": 4})]
    answers = run_batched(lanes, joint, jobs)
    assert all(answers[(prompt, method)] == solo_answers[(prompt, method)] for prompt, method, _ in jobs)
    chunk = prefill_chunk(curve)
    widest = max(chunk(decoding) for decoding in range(LANES))
    assert all(record.tokens <= record.prompt_lanes * widest + (record.lanes - record.prompt_lanes) * 13 for record in passes)  # a decoder: <= 1 + 12 tokens
    assert sum(record.prompt_lanes for record in passes) > len(jobs)  # some prompt took more than one pass


def test_a_request_that_joins_stops_a_lone_prompt_chunk_and_both_answers_stay_exact(gguf_files, solo_answers, monkeypatch):
    """A lone prompt prefills in wide chunks; a request that joins stops the chunk in flight (it does
    not wait for it), the stopped chunk leaves nothing in the cache and runs again narrower, and both
    answers are those of the requests alone."""
    from duospec.models.llamacpp import PreparedPass

    pipe = pipeline(gguf_files, SETTINGS)
    lanes, joint = open_lanes(pipe, 2)
    joint.prefill_chunk = lambda others: 4 if others == 0 else 1  # a lone prompt: 4 tokens a pass; beside another: 1
    long_prompt, short_prompt = PROMPTS[2], PROMPTS[3]
    answers = {}
    answer = answerer(joint, answers)

    newcomer = threading.Thread(target=answer, args=(lanes[1], short_prompt, "ar", {}))
    stop_flag = lanes[0].target._engine._stop_flag
    runs = newcomer_during(monkeypatch, PreparedPass, newcomer, lambda passes: all(p.preemptible for p in passes), lambda: stop_flag.raw[0])
    answer(lanes[0], long_prompt, "pld", {"gamma": 4})
    newcomer.join(60)
    assert not newcomer.is_alive()
    runs = [run for run in runs if run[1] == lanes[0].target.joint_key]  # the target's
    assert runs[0][0] == "stopped" and runs[0][2] == {"lane 0": (4, True)}  # the lone chunk stopped for the newcomer
    assert runs[1][0] == "ran" and runs[1][2]["lane 0"] == (1, True) and "lane 1" in runs[1][2]  # then 1 token, beside the newcomer's prompt
    assert not stop_flag.raw[0]  # cleared once the stopped run ended
    assert answers[(long_prompt, "pld")] == solo_answers[(long_prompt, "pld")]
    assert answers[(short_prompt, "ar")] == solo_answers[(short_prompt, "ar")]


@pytest.mark.parametrize("stop_after_decodes", [0, 1])
def test_a_stopped_pass_leaves_the_cache_as_it_was(gguf_files, monkeypatch, stop_after_decodes):
    """Stopped before its first llama_decode, or after the first of its two (n_batch 4, 5 tokens:
    llama.cpp keeps the cells of a decode that finished; abandon_forward must drop them)."""
    from duospec.models.joint import PassPreempted

    model = LlamaCppModel(gguf_files["target"], LlamaCppSettings(context=256, batch=4, sequences=4, threads=1))
    model.forward(torch.tensor([5, 6, 7]))
    real_decode, decodes = model._lib.llama_decode, []

    def decode_then_stop(ctx, batch):
        if len(decodes) == stop_after_decodes:
            model.interrupt()
        decodes.append(1)
        return real_decode(ctx, batch)

    monkeypatch.setattr(model._lib, "llama_decode", decode_then_stop)
    with pytest.raises(PassPreempted):
        model.forward(torch.tensor([8, 9, 10, 11, 12]))
    monkeypatch.setattr(model._lib, "llama_decode", real_decode)
    assert len(decodes) == stop_after_decodes + 1 and model.cache_len == 3
    model.interrupt(False)
    after = model.forward(torch.tensor([8, 9, 10, 11, 12]))
    fresh = LlamaCppModel(gguf_files["target"], SETTINGS).forward(torch.tensor([5, 6, 7, 8, 9, 10, 11, 12]))
    torch.testing.assert_close(after, fresh[3:], rtol=1e-4, atol=1e-4)


def test_a_fixed_draft_budget_beside_others_stays_within_the_fair_pass(gguf_files, solo_answers):
    """A client's fixed gamma (8) beside other requests is capped by the fairness rule: on a curve
    where t(3) > 2 t(1), no lane adds a draft beside another, so every joint decoding pass holds one
    token per lane; the answers stay those of the requests alone."""
    from duospec.budget.batch import pass_limit

    pipe = pipeline(gguf_files, SETTINGS)
    passes = []
    lanes, joint = open_lanes(pipe, 2, on_pass=passes.append)
    steep = CostProfile({1: 0.05, 2: 0.09, 3: 0.14, 4: 0.19, 8: 0.4, 16: 0.8})
    for lane in lanes:
        lane.target.fair_profile = steep
    assert pass_limit(SimpleNamespace(last_batch=(1, 1), fair_profile=steep)) == 1  # one beside: t(1 + 2) = 0.14 > 2 t(1)
    assert pass_limit(SimpleNamespace(last_batch=(0, 0), fair_profile=steep)) is None  # alone: no cap
    jobs = [(PROMPTS[1], "sd", {"gamma": 8}), (PROMPTS[4], "pld", {"gamma": 4})]
    answers = run_batched(lanes, joint, jobs)
    assert all(answers[(prompt, method)] == solo_answers[(prompt, method)] for prompt, method, _ in jobs)
    beside = [record for record in passes if record.lanes == 2 and record.prompt_lanes == 0]
    assert beside and all(record.tokens == 2 for record in beside)  # next tokens only, side by side


def test_the_prefill_chunk_follows_the_curve():
    from duospec.budget.batch import prefill_chunk

    steep = prefill_chunk(CostProfile({1: 0.05, 2: 0.1, 4: 0.2, 8: 0.4}))  # every token costs a full step
    flat = prefill_chunk(CostProfile({1: 0.05, 16: 0.053, 64: 0.1, 256: 0.4}))
    assert steep(1) == 1  # one request decoding: t(1 + 1) = 2 x t(1), t(1 + 2) more
    assert steep(3) == 3  # t(3 + 3) = 0.3 = 2 x t(3)
    assert 60 < flat(1) < 256  # t(1 + c) <= 0.1 up to c = 63


def test_lanes_own_their_cells(gguf_files):
    """Trees kept and dropped on one lane leave another lane's next logits as a fresh run gives them."""
    model = LlamaCppModel(gguf_files["target"], SETTINGS)
    first, second = split_lanes(model, 2)
    first.forward(torch.tensor([5, 6, 7, 8]))
    second.forward(torch.tensor([9, 10, 11]))
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    second.forward(torch.tensor([12, 13, 14]), positions=torch.tensor([3, 4, 4]), tree_mask=mask)
    second.keep([0, 2])
    first.forward(torch.tensor([20, 21, 22]), positions=torch.tensor([4, 5, 5]), tree_mask=mask)
    first.keep([])
    after_first = first.forward(torch.tensor([30]))
    after_second = second.forward(torch.tensor([31]))
    alone = LlamaCppModel(gguf_files["target"], LlamaCppSettings(context=256, batch=64, sequences=16, threads=1))
    expected_first = alone.forward(torch.tensor([5, 6, 7, 8, 30]))[-1]
    alone.reset()
    expected_second = alone.forward(torch.tensor([9, 10, 11, 12, 14, 31]))[-1]
    torch.testing.assert_close(after_first[-1], expected_first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after_second[-1], expected_second, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="split into lanes"):
        model.forward(torch.tensor([1]))


def test_a_lane_refuses_duo_and_the_budget_knows_the_batch(gguf_files):
    pipe = pipeline(gguf_files, SETTINGS)
    lanes, _ = open_lanes(pipe, 2)
    with pytest.raises(DuospecError, match="--max-batch 1"):
        lanes[0].duo_runtime()
    curve = {1: 0.05, 2: 0.085, 4: 0.17, 8: 0.33, 16: 0.5}
    lanes[0].target.last_batch = (0, 0)
    alone = BatchPricedProfile(curve, lane=lanes[0].target)
    assert [alone.target_pass(n) for n in (1, 2, 4)] == [CostProfile(curve).target_pass(n) for n in (1, 2, 4)]
    lanes[0].target.last_batch = (7, 7)  # seven other requests, one token each, in the pass
    batched = BatchPricedProfile(curve, lane=lanes[0].target)
    assert batched.target_pass(1) == pytest.approx(0.33 / 8)  # its share of the pass
    assert batched.target_pass(2) == pytest.approx(0.33 / 8 + (0.5 - 0.33) / 8)  # plus what one draft adds to the pass: t(9) - t(8)
    lanes[0].target.last_batch = (1, 1)  # one short request beside: this lane may at most double its pass, t(1 + n) <= 2 t(1)
    beside_one = BatchPricedProfile(curve, lane=lanes[0].target)
    assert beside_one.target_pass(1) == pytest.approx(0.085 / 2)  # its next token: t(2) = 0.085 <= 0.1
    assert beside_one.target_pass(2) == UNFAIR  # one draft more: t(3) = 0.1275 > 0.1, the neighbour would wait over 2x
    flat = {1: 0.05, 4: 0.051, 16: 0.06, 64: 0.11}
    assert BatchPricedProfile(flat, lane=lanes[0].target).target_pass(48) < 1  # t(49) <= 2 t(1) on a flat curve: drafts stay
    assert BatchPricedProfile(curve, lane=lanes[1].target).target_pass(3) == CostProfile(curve).target_pass(3)  # alone: uncapped


def test_the_default_batch_comes_from_the_curve():
    steep = CostProfile({1: 0.05, 2: 0.1, 4: 0.2, 8: 0.4, 16: 0.8})  # no gain from width
    flat = CostProfile({1: 0.05, 2: 0.05, 4: 0.051, 8: 0.052, 16: 0.053})
    this_machine = CostProfile({1: 0.056, 2: 0.094, 4: 0.183, 8: 0.351, 16: 0.494, 24: 0.745, 33: 1.019})
    assert default_max_batch(steep) == 1
    assert default_max_batch(flat) == 16
    assert default_max_batch(this_machine) == 16


# -- sampling keeps the target's law under batching ---------------------------------------------------
def sampled_pair_counts(tmp_path, lenience: float, unrelated_draft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens 2 and 3 of 2,000 seeded sd generations (gamma 2), answered by 4 lanes at once, and
    the exact law of that pair (test_sampling_e2e's enumeration over the same float32 weights)."""
    from test_sampling_e2e import PROMPT, SAMPLES, VOCAB, exact_two_token_law

    from duospec.config import SamplingConfig

    target = tiny_model(seed=11, vocab_size=VOCAB)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)  # as in test_sampling_e2e: every token keeps real mass
    settings = LlamaCppSettings(context=64, batch=64, sequences=16, threads=1)
    tokenizer = tiny_tokenizer(VOCAB, chat=False)
    pipe = Pipeline(LlamaCppModel(write_gguf(target, tmp_path / "t.gguf", chat=False), settings), tokenizer, device=torch.device("cpu"), dtype=torch.float32, threads=1, backend="llama.cpp", eos_ids=frozenset())
    draft = tiny_model(seed=12, vocab_size=VOCAB) if unrelated_draft else perturbed(target, noise=0.3, seed=5)
    pipe.attach_draft(LlamaCppModel(write_gguf(draft, tmp_path / "d.gguf", chat=False), settings))
    lanes, joint = open_lanes(pipe, 4)
    counts = sampled_counts(lanes, joint, PROMPT, SAMPLES, VOCAB, lenience)
    return counts, exact_two_token_law(target, SamplingConfig(temperature=1.0))


def test_sampled_sd_under_batching_keeps_the_target_law(tmp_path):
    from law_checks import goodness_of_fit

    counts, law = sampled_pair_counts(tmp_path, lenience=1.0)
    assert goodness_of_fit(counts, law) > 1e-4


def test_the_law_check_sees_a_lossy_acceptance_under_batching(tmp_path):
    """Negative control: lenience 0.3 (documented as lossy) with a draft far from the target (so the
    bias shows, as in test_sampling_e2e's control), under the same batching, fails the check."""
    from law_checks import goodness_of_fit

    counts, law = sampled_pair_counts(tmp_path, lenience=0.3, unrelated_draft=True)
    assert goodness_of_fit(counts, law, require_support=False) < 1e-4


def test_a_lane_shares_the_prefix_another_lane_holds(gguf_files, solo_answers):
    """A request on a cold lane takes the prefix another lane's cache holds (the same cells, tagged
    with its sequence id), computes only the rest, and answers as alone; the donor lane's next
    answer is untouched."""
    pipe = pipeline(gguf_files, SETTINGS)
    lanes, joint = open_lanes(pipe, 2)
    prompt = PROMPTS[2]
    with joint.member():
        first = lanes[0].generate(prompt, method="ar", max_new_tokens=24)
    with joint.member():
        second = lanes[1].generate(prompt, method="pld", gamma=4, max_new_tokens=24)
    assert first.token_ids == solo_answers[(prompt, "ar")] and second.token_ids == solo_answers[(prompt, "pld")]
    assert first.stats.reused_prompt_tokens == 0
    assert second.stats.reused_prompt_tokens == len(pipe.encode(prompt)) - 1  # all but the last prompt token
    with joint.member():
        again = lanes[0].generate(PROMPTS[3], method="ar", max_new_tokens=24)
    assert again.token_ids == solo_answers[(PROMPTS[3], "ar")]


def test_without_the_prefix_cache_no_lane_takes_another_lanes_prefix(gguf_files):
    """--no-prefix-cache promises every request a cold start: no prefix is shared across lanes either."""
    pipe = pipeline(gguf_files, SETTINGS)
    pipe.prefix_cache = False
    lanes, joint = open_lanes(pipe, 2)
    with joint.member():
        lanes[0].generate(PROMPTS[2], method="ar", max_new_tokens=8)
    with joint.member():
        second = lanes[1].generate(PROMPTS[2], method="ar", max_new_tokens=8)
    assert second.stats.reused_prompt_tokens == 0
