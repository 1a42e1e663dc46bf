"""Deterministic mode (`--deterministic`): every logit row of a multi-token bf16 pass equals, bit for bit,
a one-token decode of the same prefix, so greedy output of every method equals `ar`'s with no near-ties.

Tiny random Qwen2s in bfloat16 (not float32 as elsewhere): bf16 is where a multi-token pass rounds
differently, and the controls below show it does so on these models too, so the identity checks have teeth.

The mode is checked, not assumed: on a CPU whose bf16 matmul kernel changes with the row count (oneDNN
on an Intel AMX Xeon, issue 21) it is refused with a DuospecError. Every test that needs the mode is
therefore `@needs_the_mode`: where the mode is kept it checks what the mode promises; where this CPU
refuses it, it checks the refusal is the documented clean error and skips the rest with its message.
The controls at the end fake such a kernel here, so that path runs on every machine.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from bench_fixtures import one_thread
from tiny_models import perturbed, tiny_config, tiny_model, tiny_tokenizer
from transformers import Qwen2ForCausalLM

from duospec.api import Pipeline
from duospec.config import DuospecError
from duospec.models import deterministic
from duospec.models.hf import HFModel
from duospec.models.loading import resolve_backend

PROMPT = "def add(a, b): return a + b\nadd"
# What both refusals of models/deterministic.py say (RowCheck: "... depends on the row count. Run without
# --deterministic, or try another --dtype ..."; probe: "... depends on the number of rows). Run without ...").
CLEAN_REFUSAL = re.compile(r"^--deterministic cannot be kept .*depends on the (row count|number of rows).*Run without --deterministic", re.S)


@contextlib.contextmanager
def unless_refused() -> Iterator[None]:
    """Run code that needs the mode; where this CPU refuses it (at load, or when a pass first uses a row
    count the load did not check), assert the refusal is the clean, documented error and skip the test
    with its message. Any other error, or a refusal without its reason, still fails."""
    try:
        yield
    except DuospecError as error:
        assert CLEAN_REFUSAL.search(str(error)), f"not the documented refusal: {error}"
        pytest.skip(f"deterministic mode refused on this CPU: {error}")


def needs_the_mode(test: Callable) -> Callable:
    """Decorator: the test body runs under `unless_refused` (functools.wraps keeps its fixtures)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        with unless_refused():
            return test(*args, **kwargs)

    return run


def bf16(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    return model.to(torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():  # tiny matmuls on two threads of a busy 2-core machine only wait on each other
        yield


@pytest.fixture
def target() -> Qwen2ForCausalLM:
    """A fresh model per test: the mode switches the module's attention implementation."""
    return bf16(tiny_model(seed=3))


def decodes(model: HFModel, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `tokens` one by one after `prefix`: the reference every row must equal."""
    model.reset()
    model.forward(prefix)
    rows = torch.cat([model.forward(tokens[i : i + 1]) for i in range(len(tokens))])
    model.reset()
    return rows


def one_pass(model: HFModel, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    model.reset()
    model.forward(prefix)
    rows = model.forward(tokens)
    model.reset()
    return rows


CHAINS = (2, 5, 9, 17, 33)


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 64, (n,), generator=torch.Generator().manual_seed(seed))


@needs_the_mode
def test_chain_rows_equal_one_token_decodes_bit_for_bit(target):
    model = HFModel(target, deterministic=True)
    prefix = random_tokens(40, 0)
    for n in CHAINS:
        tokens = random_tokens(n, n)
        assert torch.equal(one_pass(model, prefix, tokens), decodes(model, prefix, tokens)), f"{n} rows"


def test_control_the_default_mode_differs_so_the_check_has_teeth(target):
    """The same comparison without the mode: bf16 multi-token passes round differently here."""
    model = HFModel(target)
    prefix = random_tokens(40, 0)
    assert not model.deterministic and target.config._attn_implementation == "sdpa"
    gaps = [float((one_pass(model, prefix, random_tokens(n, n)) - decodes(model, prefix, random_tokens(n, n))).abs().max()) for n in CHAINS]
    assert max(gaps) > 0, gaps


def tree_of(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ancestor mask [n, n], depths [n]) of a tree given each node's parent (-1 for the root)."""
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    depth = torch.zeros(len(parents), dtype=torch.long)
    for node, parent in enumerate(parents):
        mask[node, node] = True
        if parent >= 0:
            mask[node] |= mask[parent]
            depth[node] = depth[parent] + 1
    return mask, depth


def path_decodes(model: HFModel, prefix: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each node's logits from one-token decodes of its own root-to-node path after the prefix."""
    rows = []
    for node in range(len(tokens)):
        path = mask[node].nonzero().flatten()
        rows.append(decodes(model, prefix, tokens[path])[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("parents", [[-1, 0, 0, 1, 1, 2, 2, 3], [-1, 0, 1, 0, 3, 4, 1, 6, 6]], ids=["binary", "uneven"])
@needs_the_mode
def test_tree_rows_equal_decodes_of_their_own_paths(target, parents):
    model = HFModel(target, deterministic=True)
    prefix = random_tokens(30, 1)
    tokens = random_tokens(len(parents), 2)
    mask, depth = tree_of(parents)
    model.reset()
    model.forward(prefix)
    scored = model.forward(tokens, len(prefix) + depth, mask)
    assert torch.equal(scored, path_decodes(model, prefix, tokens, mask))


@needs_the_mode
def test_a_tree_grown_over_several_passes_equals_decodes(target):
    """SpecExec's draft side: extend_tree passes over the open tree keep the identity."""
    model = HFModel(target, deterministic=True)
    prefix = random_tokens(20, 4)
    parents = [-1, 0, 0, 1, 2, 2]
    tokens = random_tokens(len(parents), 5)
    mask, depth = tree_of(parents)
    model.reset()
    model.forward(prefix)
    first = model.forward(tokens[:3], len(prefix) + depth[:3], mask[:3, :3])
    second = model.forward(tokens[3:], len(prefix) + depth[3:], mask[3:, :], extend_tree=True)
    assert torch.equal(torch.cat([first, second]), path_decodes(model, prefix, tokens, mask))


@needs_the_mode
def test_kept_tree_path_leaves_the_cache_a_decode_leaves(target):
    """After `keep` of a tree path, the next token's logits equal those after decoding that path."""
    model = HFModel(target, deterministic=True)
    prefix = random_tokens(25, 6)
    parents = [-1, 0, 0, 2, 2, 4]
    tokens = random_tokens(len(parents), 7)
    mask, depth = tree_of(parents)
    model.reset()
    model.forward(prefix)
    model.forward(tokens, len(prefix) + depth, mask)
    model.keep([0, 2, 4])
    after_keep = model.forward(torch.tensor([9]))
    assert torch.equal(after_keep, decodes(model, prefix, torch.tensor([*tokens[[0, 2, 4]].tolist(), 9]))[-1:])


@needs_the_mode
def test_one_token_decodes_are_the_same_in_both_modes(target):
    """A one-token pass makes the same SDPA call with and without the mode (the prompt here is a single
    token, so both caches are filled alike; a longer prompt is itself a multi-token pass, row-wise in the mode)."""
    prefix, tokens = random_tokens(1, 8), random_tokens(12, 9)
    assert torch.equal(decodes(HFModel(target), prefix, tokens), decodes(HFModel(target, deterministic=True), prefix, tokens))


@needs_the_mode
def test_switching_the_mode_off_restores_the_loaded_attention(target):
    model = HFModel(target, deterministic=True)
    model.set_deterministic(False)
    assert target.config._attn_implementation == "sdpa" and not model.deterministic
    prefix, tokens = random_tokens(30, 8), random_tokens(9, 9)
    assert torch.equal(one_pass(model, prefix, tokens), one_pass(HFModel(target), prefix, tokens))


@pytest.fixture(scope="module")
def pipe():
    draft = bf16(perturbed(tiny_model(seed=3), noise=0.3, seed=5))
    with unless_refused():  # refused here: every test of this pipeline is skipped with the reason
        target = HFModel(bf16(tiny_model(seed=3)), deterministic=True)
    pipeline = Pipeline(target, tiny_tokenizer(), draft_source=None, device=torch.device("cpu"), dtype=torch.bfloat16, threads=1, progress=False)
    pipeline.attach_draft(HFModel(draft))
    return pipeline


def oracle(model: Qwen2ForCausalLM, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding one token per pass from the first prompt token on, in the default mode: the
    mode's promise is exactly this output, whatever the method."""
    reference = HFModel(model)
    reference.reset()
    for token in prompt_ids:
        logits = reference.forward(torch.tensor([token]))
    out = [int(logits[-1].argmax())]
    while len(out) < n:
        out.append(int(reference.forward(torch.tensor(out[-1:]))[-1].argmax()))
    return out


@pytest.mark.parametrize(
    "method, options",
    [("ar", {}), ("sd", {"gamma": 4}), ("sd", {"gamma": 13}), ("pld", {}), ("multiseq", {"gamma": 6}), ("specexec", {"tree_budget": 24}), ("specexec", {"tree_budget": 70})],
    ids=["ar", "sd-4", "sd-13", "pld", "multiseq", "specexec-24", "specexec-70"],
)
@needs_the_mode
def test_greedy_output_of_every_method_equals_one_token_decoding_bit_for_bit(pipe, target, method, options):
    """`target` is a fresh copy of the pipeline's target in the default mode: the oracle decodes with it."""
    prompt_ids = pipe.encode(PROMPT)
    result = pipe.generate(prompt_ids, method=method, max_new_tokens=40, **options)
    expected = oracle(target, prompt_ids, 40)
    assert result.token_ids == expected[: len(result.token_ids)] and len(result.token_ids) >= 20
    if method in ("sd", "multiseq", "specexec"):
        assert result.stats.accepted_tokens > 0  # rounds really verified several tokens at once


def test_pipeline_reports_the_mode(pipe):
    assert pipe.deterministic


def test_llama_cpp_is_refused_with_the_reason_and_auto_picks_transformers():
    with pytest.raises(DuospecError, match="--deterministic needs the transformers backend"):
        resolve_backend("llama.cpp", "qwen2.5-coder-0.5b-instruct", torch.device("cpu"), deterministic=True)
    assert resolve_backend("auto", "qwen2.5-coder-0.5b-instruct", torch.device("cpu"), deterministic=True) == "transformers"


def test_gpus_are_refused_with_the_measurement():
    model = tiny_model(seed=0)
    with pytest.raises(DuospecError, match="only verified on CPUs"):
        deterministic.refuse_unsupported(model, torch.device("cuda"))


def test_sliding_window_models_are_refused():
    config = tiny_config()
    config.use_sliding_window = True
    config.sliding_window = 16
    with pytest.raises(DuospecError, match="sliding-window"):
        HFModel(bf16(Qwen2ForCausalLM(config)), deterministic=True)


class RowCountDependentLinear(torch.nn.Linear):
    """Control: a linear layer whose result depends on how many rows it gets, as a GEMM/GEMV switch does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if x.reshape(-1, x.shape[-1]).shape[0] == 1 else out * (1 + 2**-6)


def test_control_a_row_count_dependent_kernel_is_refused_and_the_model_left_as_it_was():
    model = bf16(tiny_model(seed=1))
    layer = model.model.layers[0].mlp.down_proj
    swapped = RowCountDependentLinear(layer.in_features, layer.out_features, bias=False).to(torch.bfloat16)
    swapped.weight = layer.weight
    model.model.layers[0].mlp.down_proj = swapped
    # RowCheck calls F.linear on the weights: it sees the real kernel, not this module's forward, so
    # here the end-to-end probe is what catches the difference, with the refusal unless_refused accepts.
    with pytest.raises(DuospecError, match=CLEAN_REFUSAL):
        HFModel(model, deterministic=True)
    assert model.config._attn_implementation == "sdpa"


def linear_depending_on_rows(from_rows: int) -> Callable:
    """F.linear as on a CPU whose kernel changes at `from_rows` rows (oneDNN on AMX): other bits from there on.
    The model's own layers call it too (nn.Linear looks F.linear up per call), so what the mode would
    promise really breaks, as it does on such a CPU."""
    real_linear = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        out = real_linear(x, weight, bias)
        return out * (1 + 2**-6) if x.reshape(-1, x.shape[-1]).shape[0] >= from_rows else out

    return linear


def test_row_check_refuses_a_kernel_that_depends_on_the_row_count(monkeypatch):
    model = bf16(tiny_model(seed=1))
    check = deterministic.RowCheck(model)
    monkeypatch.setattr(torch.nn.functional, "linear", linear_depending_on_rows(2))
    with pytest.raises(DuospecError, match="depends on the row count"):
        check.check(5)


@needs_the_mode
def test_bench_runs_each_method_in_both_modes_and_allows_no_near_ties_in_the_mode(tmp_path):
    from bench_fixtures import tiny_models, write_small_questions
    from bench_fixtures import tiny_tokenizer as bench_tokenizer

    from duospec.bench.report import collect_meta, write_report
    from duospec.bench.runner import BenchSettings, pipeline_flags, run_bench

    tokenizer = bench_tokenizer()
    target, draft = tiny_models(len(tokenizer))
    pipeline = Pipeline(HFModel(bf16(target), deterministic=True), tokenizer, draft_source=None, device=torch.device("cpu"), dtype=torch.bfloat16, threads=1, progress=False)
    pipeline.attach_draft(HFModel(bf16(draft)))
    questions = write_small_questions(tmp_path / "q.jsonl", per_task=1)
    settings = BenchSettings(methods=("sd", "specexec"), tasks=("qa", "math_reasoning"), limit=1, max_new_tokens=24, questions=questions, gamma=4, tree_budget=16)
    records = run_bench(pipeline, settings, tmp_path / "out", progress=False)
    methods = {record["method"] for record in records}
    assert methods == {"ar", "sd", "specexec", "ar@default", "sd@default", "specexec@default"}
    for record in records:
        if record["method"] in ("sd", "specexec"):
            assert record["greedy"]["status"] == "match" and record["greedy"]["tolerance"] == 0.0
            assert record["accepted_tokens"] > 0 and max(record["tokens_per_pass"]) > 1
        if record["method"] == "sd@default":
            assert record["greedy"]["tolerance"] > 0  # the default mode keeps its rounding allowance
    assert pipeline.deterministic  # the default-mode answers switched the mode back on afterwards
    flags = pipeline_flags(pipeline, settings)
    assert flags["deterministic"] is True and flags["gamma"] == 4 and flags["tree_budget"] == 16
    write_report(tmp_path / "out", records, collect_meta(flags, {"methods": sorted(methods), "tasks": ["qa", "math_reasoning"], "limit": 1, "questions": str(questions)}, "duospec bench --deterministic"))
    assert (tmp_path / "out" / "report.md").read_text().count("@default") >= 3


@pytest.mark.parametrize(
    "from_rows",
    [2, max(deterministic.ROWS_CHECKED_AT_LOAD) + 1],
    ids=["refused-at-load", "refused-at-the-first-long-prompt"],
)
def test_control_where_the_cpu_refuses_the_mode_the_bench_test_skips_with_the_reason(tmp_path, monkeypatch, from_rows):
    """Issue 21: on an AMX Xeon the bench test errored instead of checking the refusal. Here, a kernel
    that changes at 2 rows is refused at load; one that changes past every row count checked at load is
    refused by the first prompt that long (the bench's chat prompts are). Either way the test skips,
    saying why, through the same path it takes on such a CPU."""
    monkeypatch.setattr(torch.nn.functional, "linear", linear_depending_on_rows(from_rows))
    with pytest.raises(pytest.skip.Exception, match=r"refused on this CPU: --deterministic cannot be kept here: .* depends on the row count"):
        test_bench_runs_each_method_in_both_modes_and_allows_no_near_ties_in_the_mode(tmp_path)


def test_control_an_unclean_error_is_not_taken_for_a_refusal():
    """unless_refused skips only for the documented refusal: another DuospecError still fails the test."""
    with pytest.raises(AssertionError, match="not the documented refusal"):
        with unless_refused():
            raise DuospecError("--deterministic cannot be kept here")  # no reason, no way out


def test_bench_refuses_a_gamma_out_of_range_before_loading():
    from duospec.bench.runner import BenchSettings

    with pytest.raises(DuospecError, match="gamma"):
        BenchSettings(gamma=0).validate()


@needs_the_mode
def test_greedy_duo_with_its_draft_process_equals_one_token_decoding_bit_for_bit():
    """duo: the draft drafts in its own process, the deterministic target verifies chains and trees."""
    from test_duo import FLAT, deadline, run_duo, start_process

    from duospec.budget.duo import DuoPlanner

    target_module = bf16(tiny_model(seed=3))
    process = None
    try:
        with deadline(180):
            process = start_process(HFModel(bf16(perturbed(tiny_model(seed=3), noise=0.3, seed=5)), "draft"), 64)
            prompt = random_tokens(12, 11).tolist()
            for planner, sequences in ((DuoPlanner(FLAT, 0.001, fixed_gamma=4), 1), (DuoPlanner(FLAT, 0.001), 8)):
                tokens, stats = run_duo(HFModel(bf16(tiny_model(seed=3)), "target", deterministic=True), process, prompt, 32, planner, max_sequences=sequences)
                assert tokens == oracle(target_module, prompt, 32) and stats.fallback == ""
                assert stats.accepted_tokens > 0
    finally:
        if process is not None:
            process.close()



def test_default_mode_answers_keep_their_own_costs_and_restore_the_mode(pipe):
    """bench's <method>@default: the mode off for one answer, with cost figures kept apart per mode."""
    pipe.costs.target_costs = {1: 1.0, 2: 2.0}  # stands for the deterministic mode's measured curve
    deterministic_identity = pipe.costs.target_identity
    with pipe.default_mode():
        assert not pipe.deterministic and pipe.costs.target_costs is None
        assert pipe.costs.target_identity is None or "deterministic" not in pipe.costs.target_identity
        pipe.costs.target_costs = {1: 0.5, 2: 0.6}  # what the default mode measured
    assert pipe.deterministic and pipe.costs.target_costs == {1: 1.0, 2: 2.0} and pipe.costs.target_identity == deterministic_identity
    with pipe.default_mode():
        assert pipe.costs.target_costs == {1: 0.5, 2: 0.6}  # the default mode's own figures, kept for the next answer
    pipe.costs.target_costs = None
