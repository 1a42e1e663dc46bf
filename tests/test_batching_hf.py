"""Continuous batching on the transformers backend (models/hf_lanes.py): lanes of one shared cache
answer several requests at once, each exactly as it would alone.

Tiny float32 transformers models built in memory (tests/tiny_models.py): requests answered in
threads, their passes joined, give the tokens of the same requests answered one at a time, for every
method, while requests join and leave; a lane's keep, crop and trees never touch another lane's
cells; compaction and a stopped prompt chunk leave every lane's logits as a fresh run gives them; the
sampled law per request holds under batching (with a lossy negative control).
"""

from __future__ import annotations

import threading

import pytest
import torch
from lane_runs import PROMPTS, REQUESTS, answerer, newcomer_during, run_batched, sampled_counts
from tiny_models import EOS_ID, perturbed, tiny_model, tiny_tokenizer

from duospec.api import Pipeline
from duospec.batching import check_batchable, open_lanes
from duospec.config import DuospecError
from duospec.models.hf import HFModel
from duospec.models.hf_lanes import CHECK_EVERY, MIN_GARBAGE, LanePass, run_lane_passes, split_lanes
from duospec.models.joint import PassPreempted

LANES = 4


def pipeline(target, draft=None, vocab: int | None = None, chat: bool = True) -> Pipeline:
    tokenizer = tiny_tokenizer(vocab or target.config.vocab_size, chat=chat)
    pipe = Pipeline(HFModel(target, "target"), tokenizer, device=torch.device("cpu"), dtype=torch.float32, threads=1, backend="transformers", eos_ids=frozenset({EOS_ID} if chat else ()))
    if draft is not None:
        pipe.attach_draft(HFModel(draft, "draft"))
    return pipe


@pytest.fixture(scope="module")
def models():
    target = tiny_model(seed=0)
    return target, perturbed(target, noise=0.2, seed=7)


@pytest.fixture(scope="module")
def solo_answers(models):
    """Every (prompt, method) answered alone, one at a time, on an unsplit pipeline."""
    pipe = pipeline(*models)
    return {(prompt, method): pipe.generate(prompt, method=method, max_new_tokens=24, **options).token_ids for prompt in PROMPTS for method, options in REQUESTS}


def test_batched_requests_equal_the_same_requests_alone(models, solo_answers):
    pipe = pipeline(*models)
    passes = []
    lanes, joint = open_lanes(pipe, LANES, on_pass=passes.append)
    jobs = [(prompt, method, options) for method, options in REQUESTS for prompt in PROMPTS]
    answers = run_batched(lanes, joint, jobs)
    mismatches = [key for key, tokens in solo_answers.items() if answers[key] != tokens]
    assert not mismatches, mismatches
    assert max(record.lanes for record in passes) == LANES  # the target's passes really were joint
    assert any(record.drafting_lanes for record in passes) and any(record.prompt_lanes for record in passes)
    assert all(lane._draft is not None for lane in lanes)  # the draft was split too: sd and specexec ran on draft lanes


def test_lanes_own_their_cells(models):
    """Trees kept and dropped on one lane leave another lane's next logits as a fresh model gives them."""
    target, _ = models
    first, second = split_lanes(HFModel(target), 2)
    first.forward(torch.tensor([5, 6, 7, 8]))
    second.forward(torch.tensor([9, 10, 11]))
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    second.forward(torch.tensor([12, 13, 14]), positions=torch.tensor([3, 4, 4]), tree_mask=mask)
    second.keep([0, 2])
    first.forward(torch.tensor([20, 21, 22]), positions=torch.tensor([4, 5, 5]), tree_mask=mask)
    first.crop(4)  # the tree dropped
    # A tree grown over two passes (extend_tree) on the first lane, a path of it kept.
    first.forward(torch.tensor([23, 24]), positions=torch.tensor([4, 5]), tree_mask=torch.ones(2, 2, dtype=torch.bool).tril())
    first.forward(torch.tensor([25]), positions=torch.tensor([5]), tree_mask=torch.tensor([[1, 0, 1]], dtype=torch.bool), extend_tree=True)
    first.keep([0, 2])
    after_first = first.forward(torch.tensor([30]))
    after_second = second.forward(torch.tensor([31]))
    alone = HFModel(target)
    expected_first = alone.forward(torch.tensor([5, 6, 7, 8, 23, 25, 30]))[-1]
    alone.reset()
    expected_second = alone.forward(torch.tensor([9, 10, 11, 12, 14, 31]))[-1]
    torch.testing.assert_close(after_first[-1], expected_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_second[-1], expected_second, rtol=1e-5, atol=1e-5)
    assert first.cache_len == 7 and second.cache_len == 6


def test_a_joint_pass_gives_each_lane_its_own_logits(models):
    """Two lanes' chains and a tree in one pass: each lane's rows are what it gets alone."""
    target, _ = models
    first, second, third = split_lanes(HFModel(target), 3)
    for lane, prompt in ((first, [5, 6, 7]), (second, [9, 10]), (third, [3])):
        lane.forward(torch.tensor(prompt))
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    passes = [
        first.prepare_forward(torch.tensor([8, 9]), None, None, False, False, None),
        second.prepare_forward(torch.tensor([11, 12, 13]), torch.tensor([2, 3, 3]), mask, False, False, None),
        third.prepare_forward(torch.tensor([4]), None, None, True, False, None),
    ]
    run_lane_passes(passes)
    joint = [lane.finish_forward(prepared) for lane, prepared in zip((first, second, third), passes)]
    alone = HFModel(target)
    torch.testing.assert_close(joint[0], alone.forward(torch.tensor([5, 6, 7, 8, 9]))[3:], rtol=1e-5, atol=1e-5)
    alone.reset()
    alone.forward(torch.tensor([9, 10]))
    torch.testing.assert_close(joint[1], alone.forward(torch.tensor([11, 12, 13]), positions=torch.tensor([2, 3, 3]), tree_mask=mask), rtol=1e-5, atol=1e-5)
    alone.reset()
    torch.testing.assert_close(joint[2], alone.forward(torch.tensor([3, 4]))[-1:], rtol=1e-5, atol=1e-5)


def test_compaction_drops_garbage_and_keeps_every_lane_logits(models):
    """Cells no lane holds are gathered away; the lanes' next logits are unchanged by it, and cells
    two lanes share (an adopted prefix) stay shared."""
    target, _ = models
    first, second = split_lanes(HFModel(target), 2)
    first.forward(torch.tensor(list(range(2, 40))))
    second.cells = first.cells[:20]  # a prefix shared by reference, as adopt_prefix does
    second.forward(torch.tensor([41, 42]))
    first.forward(torch.tensor(list(range(2, 60))))  # rejected drafts, say
    first.crop(38)
    shared = first.shared
    before = shared.total
    expected = (HFModel(target).forward(torch.tensor(list(range(2, 40)) + [7]))[-1], HFModel(target).forward(torch.tensor(list(range(2, 22)) + [41, 42, 8]))[-1])
    shared.compact(shared.live_cells())
    assert shared.total == 40 < before and first.cells == list(range(38)) and second.cells[:20] == first.cells[:20]
    torch.testing.assert_close(first.forward(torch.tensor([7]))[-1], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.forward(torch.tensor([8]))[-1], expected[1], rtol=1e-5, atol=1e-5)


def test_memory_stays_bounded_by_what_the_lanes_hold(models):
    """Many requests later, the shared cache holds at most about twice the cells its lanes hold."""
    pipe = pipeline(*models)
    lanes, joint = open_lanes(pipe, 2)
    jobs = [(f"{prompt} w{index}", "sd", {"gamma": 3}) for index in range(15) for prompt in PROMPTS]
    run_batched(lanes, joint, jobs, max_new_tokens=16)
    shared = lanes[0].target.shared
    live = len(shared.live_cells())
    assert shared.compactions > 0
    assert shared.total <= 2 * max(live, MIN_GARBAGE) + CHECK_EVERY + 64


def test_a_stopped_chunk_leaves_the_cache_as_it_was(models):
    """A prompt chunk stopped between decoder layers (a request joined) leaves no cell in any layer,
    and the lane's next pass gives a fresh run's logits."""
    target, _ = models
    model = HFModel(target)
    (lane,) = split_lanes(model, 1)
    lane.forward(torch.tensor([5, 6, 7]))
    shared = lane.shared
    layer_zero = model.model.model.layers[0]
    handle = layer_zero.register_forward_hook(lambda module, args, output: lane.interrupt())  # the first layer has written its cells; the second stops
    prepared = lane.prepare_forward(torch.tensor([8, 9, 10, 11]), None, None, True, False, None)
    prepared.preemptible = True
    with pytest.raises(PassPreempted):
        run_lane_passes([prepared])
    handle.remove()
    lane.abandon_forward(prepared)
    lane.interrupt(False)
    assert lane.cache_len == 3 and all(layer.get_seq_length() == 3 for layer in shared.cache.layers)
    after = lane.forward(torch.tensor([8, 9, 10, 11]))
    torch.testing.assert_close(after, HFModel(target).forward(torch.tensor([5, 6, 7, 8, 9, 10, 11]))[3:], rtol=1e-5, atol=1e-5)
    lane.interrupt()  # a pass that is not a prompt chunk is never stopped
    lane.forward(torch.tensor([12]))
    lane.interrupt(False)


def test_a_request_that_joins_stops_a_lone_prompt_chunk_and_both_answers_stay_exact(models, solo_answers, monkeypatch):
    pipe = pipeline(*models)
    lanes, joint = open_lanes(pipe, 2)
    joint.prefill_chunk = lambda others: 4 if others == 0 else 1  # a lone prompt: 4 tokens a pass; beside another: 1
    long_prompt, short_prompt = PROMPTS[2], PROMPTS[3]
    answers = {}
    answer = answerer(joint, answers)

    newcomer = threading.Thread(target=answer, args=(lanes[1], short_prompt, "ar", {}))
    shared = lanes[0].target.shared
    runs = newcomer_during(monkeypatch, LanePass, newcomer, lambda passes: all(p.preemptible for p in passes), lambda: shared.stop)
    answer(lanes[0], long_prompt, "pld", {"gamma": 4})
    newcomer.join(60)
    assert not newcomer.is_alive()
    runs = [run for run in runs if run[1] == id(shared)]  # the target's
    assert runs[0][0] == "stopped" and runs[0][2] == {"lane 0": (4, True)}  # the lone chunk stopped for the newcomer
    assert runs[1][0] == "ran" and runs[1][2]["lane 0"] == (1, True) and "lane 1" in runs[1][2]  # then 1 token, beside the newcomer's prompt
    assert not shared.stop
    assert answers[(long_prompt, "pld")] == solo_answers[(long_prompt, "pld")]
    assert answers[(short_prompt, "ar")] == solo_answers[(short_prompt, "ar")]


@pytest.mark.parametrize("stopped", ["target tree", "draft level"])
def test_a_request_that_joins_stops_a_wide_lone_tree_pass_and_the_round_narrows_it(models, solo_answers, monkeypatch, stopped):
    """A lone SpecExec tree wider than what is fair beside one more request is stopped when a request
    joins (it does not wait for the pass); the round scores the tree's first nodes, as many as the
    fairness rule allows (pass_limit: 3 on this curve), beside the newcomer. Or the newcomer joins
    during a level of the search on the draft: that level stops, the search proposes the tree it has.
    Both answers stay exact."""
    from duospec.budget.batch import prefill_chunk
    from duospec.budget.model import CostProfile

    pipe = pipeline(*models)
    lanes, joint = open_lanes(pipe, 2)
    curve = CostProfile({1: 0.05, 4: 0.1, 8: 0.3, 16: 0.6})  # beside one request: t(1 + 3) <= 2 t(1) < t(1 + 4)
    joint.prefill_chunk = prefill_chunk(curve)
    for lane in lanes:
        lane.target.fair_profile = curve
    tree_prompt, short_prompt = PROMPTS[1], PROMPTS[3]
    answers = {}
    answer = answerer(joint, answers)

    newcomer = threading.Thread(target=answer, args=(lanes[1], short_prompt, "ar", {}))
    shared = (lanes[0].target if stopped == "target tree" else lanes[0]._draft).shared

    def lone_wide_pass(passes) -> bool:
        lone = len(passes) == 1 and passes[0].joint_key == id(shared) and passes[0].preemptible and not passes[0].last_only
        return lone and (stopped == "target tree" or passes[0].extends_tree)

    runs = newcomer_during(monkeypatch, LanePass, newcomer, lone_wide_pass, lambda: shared.stop)
    answer(lanes[0], tree_prompt, "specexec", {"tree_budget": 12, "tree_depth": 4})
    newcomer.join(60)
    assert not newcomer.is_alive()
    runs = [run for run in runs if run[1] == id(shared)]
    assert runs[0][0] == "stopped" and runs[0][2]["lane 0"][0] > 1  # the lone pass, stopped
    if stopped == "target tree":
        assert runs[0][2]["lane 0"][0] > 3
        beside = runs[1]
        assert beside[0] == "ran" and beside[2]["lane 0"] == (3, False) and "lane 1" in beside[2]  # its first 3 nodes, beside the newcomer
    assert answers[(tree_prompt, "specexec")] == solo_answers[(tree_prompt, "specexec")]
    assert answers[(short_prompt, "ar")] == solo_answers[(short_prompt, "ar")]


def test_a_lane_shares_the_prefix_another_lane_holds(models, solo_answers):
    pipe = pipeline(*models)
    lanes, joint = open_lanes(pipe, 2)
    prompt = PROMPTS[2]
    with joint.member():
        first = lanes[0].generate(prompt, method="ar", max_new_tokens=24)
    with joint.member():
        second = lanes[1].generate(prompt, method="pld", gamma=4, max_new_tokens=24)
    assert first.token_ids == solo_answers[(prompt, "ar")] and second.token_ids == solo_answers[(prompt, "pld")]
    assert second.stats.reused_prompt_tokens == len(pipe.encode(prompt)) - 1


def test_what_cannot_batch_is_refused_with_the_way_out(models):
    target, _ = models
    pipe = pipeline(target)
    check_batchable(pipe, 4)  # a plain transformers target batches

    class Streamed(HFModel):  # stands for a target with its own forward (offloaded weights)
        pass

    pipe.target = Streamed(target)
    with pytest.raises(DuospecError, match="--max-batch 1"):
        check_batchable(pipe, 2)
    check_batchable(pipe, 1)
    lane = split_lanes(HFModel(target), 1)[0]
    with pytest.raises(DuospecError, match="--max-batch 1"):
        lane.set_deterministic(True)


# -- sampling keeps the target's law under batching ---------------------------------------------------
def sampled_pair(lenience: float, unrelated_draft: bool = False):
    from test_sampling_e2e import PROMPT, SAMPLES, VOCAB, exact_two_token_law

    from duospec.config import SamplingConfig

    target = tiny_model(seed=11, vocab_size=VOCAB)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)  # as in test_sampling_e2e: every token keeps real mass
    draft = tiny_model(seed=12, vocab_size=VOCAB) if unrelated_draft else perturbed(target, noise=0.3, seed=5)
    lanes, joint = open_lanes(pipeline(target, draft, vocab=VOCAB, chat=False), 4)
    return sampled_counts(lanes, joint, PROMPT, SAMPLES, VOCAB, lenience), exact_two_token_law(target, SamplingConfig(temperature=1.0))


def test_sampled_sd_under_batching_keeps_the_target_law():
    from law_checks import goodness_of_fit

    counts, law = sampled_pair(lenience=1.0)
    assert goodness_of_fit(counts, law) > 1e-4


def test_the_law_check_sees_a_lossy_acceptance_under_batching():
    from law_checks import goodness_of_fit

    counts, law = sampled_pair(lenience=0.3, unrelated_draft=True)
    assert goodness_of_fit(counts, law, require_support=False) < 1e-4
