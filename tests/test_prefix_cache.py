"""Issue 21 item 6: a request reuses the KV cache prefix it shares with the last request (models/prefix.py).

What must hold, on tiny float32 models (tiny_models.py; llama.cpp: tiny_gguf.py), for ar, sd and pld
(and the other in-process drafters where it costs nothing to add them):
- a second turn (prompt = the first prompt + its answer + a new turn) gives the same answer as on a
  fresh pipeline, token for token, and its stats count the reused prompt tokens;
- the same for a prompt that diverges early, one that is a strict prefix of the cached tokens, an
  identical prompt, and with the switch off (then nothing is reused);
- a request that ended early (the consumer closed the stream, or an exception inside a pass left a
  cache half-written) leaves the next request correct: a consistent stop keeps the record, a broken
  pass drops it and the next request starts from an empty cache;
- the draft model's cache is reused too (its first catch-up feeds only the new part).
test_draft_cache_rounds.py checks the draft cache round by round across two requests.

Negative controls: a reuse that keeps one cell too many (an off-by-one crop) changes the answer and
fails the cache check, and a backend that kept its record through a broken pass gives a wrong answer.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import EOS_ID, perturbed, tiny_model, tiny_pipeline, tiny_tokenizer

from duospec.api import GenerationInterrupted, Pipeline
from duospec.models import prefix
from duospec.models.hf import HFModel
from duospec.models.llamacpp import llama_cpp_available

HAS_LLAMA = llama_cpp_available()
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
if HAS_LLAMA:
    from tiny_gguf import write_gguf

    from duospec.models.llamacpp import LlamaCppModel, LlamaCppSettings

    LLAMA_SETTINGS = LlamaCppSettings(context=256, batch=64, sequences=16, threads=1)

METHODS = ["ar", "sd", "pld"]
NEW_TOKENS = 16
OPTIONS = dict(max_new_tokens=NEW_TOKENS, gamma=4)  # a fixed gamma: no cost measurement runs between requests
# A prompt with repeats (so pld drafts) in the tiny vocabulary's ids (2..63; 1 is EOS).
PROMPT_A = [5, 9, 12, 3, 40, 7, 7, 21, 5, 9, 12, 3, 33, 18, 2, 44, 5, 9]
NEW_TURN = [30, 31, 5, 9, 12, 8]
# The draft's cache after a request is valid up to the start of its last round (and what that round
# accepted of the drafts it fed): its next request's first pass feeds at most the last round's tokens
# (gamma + 1), the new turn and the first token. Without reuse it would feed the whole prompt (40+).
FIRST_DRAFT_PASS_MAX = 5 + len(NEW_TURN) + 1


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def modules():
    target = tiny_model(seed=0)
    return {"target": target, "draft": perturbed(target, noise=0.2, seed=7)}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, modules):
    if not HAS_LLAMA:
        pytest.skip("llama-cpp-python is not installed")
    directory = tmp_path_factory.mktemp("prefix-gguf")
    return {name: write_gguf(module, directory / f"{name}.gguf") for name, module in modules.items()}


def make_pipeline(backend: str, modules, gguf_getter, prefix_cache: bool = True) -> Pipeline:
    """A fresh pipeline (empty caches) over the tiny target and its perturbed draft."""
    if backend == "transformers":
        pipe = tiny_pipeline(modules["target"], modules["draft"])
    else:
        files = gguf_getter()
        pipe = Pipeline(
            LlamaCppModel(files["target"], LLAMA_SETTINGS), tiny_tokenizer(), device=torch.device("cpu"), dtype=torch.float32,
            threads=1, backend="llama.cpp", eos_ids=frozenset({EOS_ID}), progress=False,
        )
        pipe.attach_draft(LlamaCppModel(files["draft"], LLAMA_SETTINGS))
    pipe.prefix_cache = prefix_cache
    return pipe


@pytest.fixture
def pipelines(request, modules):
    """pipelines(backend) -> a fresh Pipeline; fresh(backend, prompt, method) -> its answer on one."""
    gguf = lambda: request.getfixturevalue("gguf_files")  # noqa: E731 - only llama.cpp runs need the files
    made: dict = {}

    def build(backend: str, prefix_cache: bool = True) -> Pipeline:
        return make_pipeline(backend, modules, gguf, prefix_cache)

    def fresh(backend: str, prompt: list[int], method: str) -> list[int]:
        key = (backend, tuple(prompt), method)
        if key not in made:
            made[key] = build(backend).generate(prompt, method=method, **OPTIONS).token_ids
        return made[key]

    return build, fresh


BACKENDS = ["transformers", pytest.param("llama.cpp", marks=needs_llama)]


# ===================================================================================================
# The worked example of models/prefix.py


class FakeCache:
    """Just the cache bookkeeping of a Model: a length, a record, crop and reset."""

    def __init__(self, length: int) -> None:
        self.cache_len, self.held_prefix, self.calls = length, None, []

    def crop(self, length: int) -> None:
        self.held_prefix = None
        self.calls.append(("crop", length))
        self.cache_len = length

    def reset(self) -> None:
        self.held_prefix = None
        self.calls.append(("reset",))
        self.cache_len = 0


@pytest.mark.parametrize(
    "prompt, kept, call",
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], 5, ("crop", 5)),  # second turn: prefill [6, 7, 8]
        ([1, 2, 9, 9], 2, ("crop", 2)),  # diverges
        ([1, 2, 3], 2, ("crop", 2)),  # strict prefix. Not 3: the last prompt token must run
        ([1, 2, 3, 4], 3, ("crop", 3)),  # identical
        ([7, 1, 2], 0, ("reset",)),  # no match. Not crop(0): only a reset surely clears a broken cache
    ],
    ids=["second-turn", "diverges", "strict-prefix", "identical", "no-match"],
)
def test_the_worked_example(prompt, kept, call):
    context = [1, 2, 3, 4, 5, 6]  # prompt [1, 2, 3, 4], emitted [5, 6]; the cache holds all but the root 6
    model = FakeCache(5)
    prefix.remember(model, context, 5)
    assert prefix.reuse(model, prompt) == kept
    assert model.calls == [call] and model.cache_len == kept


def test_common_prefix_examples():
    assert prefix.common_prefix([1, 2, 3, 4, 5, 6], 5, [1, 2, 9], 2) == 2
    assert prefix.common_prefix([1, 2, 3, 4, 5, 6], 5, [1, 2, 3, 4, 5, 6, 7], 6) == 5  # not 6: token 6 is not cached
    assert prefix.common_prefix([1, 2], 2, [], -1) == 0


def test_no_record_or_a_record_longer_than_the_cache_reuses_nothing():
    model = FakeCache(3)
    assert prefix.reuse(model, [1, 2, 3]) == 0 and model.calls == [("reset",)]
    model = FakeCache(3)
    model.held_prefix = prefix.HeldPrefix([1, 2, 3, 4, 5], 5)  # claims more than the cache holds
    assert prefix.reusable(model, [1, 2, 3, 4, 5, 6]) == 0
    prefix.remember(model, [1, 2, 3, 4, 5], 5)  # refused: the cache holds 3
    assert model.held_prefix.length == 5 and prefix.reusable(model, [1, 2, 3, 4, 5, 6]) == 0


def test_a_model_without_a_record_of_its_own_gets_none():
    """A wrapper that forwards attribute reads would keep a record its wrapped model's cache changes
    never drop: `remember` leaves it (and test doubles without the attribute) alone."""

    class Wrapper:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    inner = FakeCache(5)
    wrapper = Wrapper(inner)
    prefix.remember(wrapper, [1, 2, 3, 4, 5, 6], 5)
    assert "held_prefix" not in vars(wrapper) and inner.held_prefix is None
    prefix.remember(inner, [1, 2, 3, 4, 5, 6], 5)
    assert prefix.reusable(wrapper, [1, 2, 3, 9]) == 3  # reading through the wrapper reads the inner record


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["forward", "crop", "keep", "reset"])
def test_every_cache_change_drops_the_record(request, modules, backend, change):
    if backend == "transformers":
        model = HFModel(modules["target"])
    else:
        model = LlamaCppModel(request.getfixturevalue("gguf_files")["target"], LLAMA_SETTINGS)
    model.forward(torch.tensor(PROMPT_A))
    model.forward(torch.tensor([4, 5]))
    prefix.remember(model, PROMPT_A + [4, 5], len(PROMPT_A) + 2)
    assert model.held_prefix == prefix.HeldPrefix(PROMPT_A + [4, 5], len(PROMPT_A) + 2)
    {"forward": lambda: model.forward(torch.tensor([6])), "crop": lambda: model.crop(3), "keep": lambda: model.keep([0]), "reset": model.reset}[change]()
    assert model.held_prefix is None


# ===================================================================================================
# Answers after a cached request equal answers on a fresh pipeline


def second_turn(first_prompt: list[int], answer: list[int]) -> list[int]:
    return first_prompt + answer + NEW_TURN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_a_second_turn_reuses_the_first_and_answers_as_a_fresh_pipeline(pipelines, backend, method):
    build, fresh = pipelines
    pipe = build(backend)
    first = pipe.generate(PROMPT_A, method=method, **OPTIONS)
    assert first.stats.reused_prompt_tokens == 0
    assert first.token_ids == fresh(backend, PROMPT_A, method)
    prompt = second_turn(PROMPT_A, first.token_ids)
    drafted = record_draft_passes(pipe) if method == "sd" else None
    second = pipe.generate(prompt, method=method, **OPTIONS)
    assert second.token_ids == fresh(backend, prompt, method)
    # The cache held the first prompt and answer but its last token (the root it never ran).
    assert len(PROMPT_A) + len(first.token_ids) - 1 <= second.stats.reused_prompt_tokens <= len(prompt) - 1
    assert second.stats.to_dict()["reused_prompt_tokens"] == second.stats.reused_prompt_tokens
    if drafted is not None:  # the draft's first catch-up fed the new turn, not the whole prompt
        assert drafted and drafted[0] <= FIRST_DRAFT_PASS_MAX, drafted


def record_draft_passes(pipe: Pipeline) -> list[int]:
    """Tokens per draft forward from now on (an instance attribute shadows the method)."""
    draft, passes = pipe.draft, []
    forward = type(draft).forward

    def counting(tokens, *args, **kwargs):
        passes.append(int(tokens.shape[0]))
        return forward(draft, tokens, *args, **kwargs)

    draft.forward = counting
    return passes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "case, make_prompt, reused",
    [
        ("diverges", lambda context: context[:3] + [50, 51, 52, 53], 3),
        ("strict-prefix", lambda context: context[:10], 9),
        ("identical", lambda context: list(PROMPT_A), len(PROMPT_A) - 1),
    ],
    ids=["diverges", "strict-prefix", "identical"],
)
def test_other_prompts_reuse_what_they_share(pipelines, backend, method, case, make_prompt, reused):
    build, fresh = pipelines
    pipe = build(backend)
    first = pipe.generate(PROMPT_A, method=method, **OPTIONS)
    prompt = make_prompt(PROMPT_A + first.token_ids)
    second = pipe.generate(prompt, method=method, **OPTIONS)
    assert second.stats.reused_prompt_tokens == reused
    assert second.token_ids == fresh(backend, prompt, method)
    if case == "identical":
        assert second.token_ids == first.token_ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_switched_off_nothing_is_reused(pipelines, backend):
    build, fresh = pipelines
    pipe = build(backend, prefix_cache=False)
    first = pipe.generate(PROMPT_A, method="sd", **OPTIONS)
    prompt = second_turn(PROMPT_A, first.token_ids)
    drafted = record_draft_passes(pipe)
    second = pipe.generate(prompt, method="sd", **OPTIONS)
    assert second.stats.reused_prompt_tokens == 0 and second.token_ids == fresh(backend, prompt, "sd")
    assert drafted[0] == len(prompt) + 1  # the draft ran the whole prompt and the first token again


def test_the_switch_reaches_load_and_the_cli():
    import inspect

    import duospec
    from duospec.cli import build_parser

    assert inspect.signature(duospec.load).parameters["prefix_cache"].default is True
    for command in (["generate", "x"], ["bench"], ["serve"]):
        assert build_parser().parse_args([*command, "--no-prefix-cache"]).no_prefix_cache is True
        assert build_parser().parse_args(command).no_prefix_cache is False


@pytest.mark.parametrize("switch", [[], ["--no-prefix-cache"]], ids=["on", "off"])
def test_a_prompts_file_reuses_what_its_lines_share(pipelines, monkeypatch, capsys, tmp_path, switch):
    import json

    import duospec
    from duospec.cli import main

    build, _ = pipelines
    given: dict = {}

    def load(*args, **kwargs):
        given.update(kwargs)
        return build("transformers", prefix_cache=kwargs["prefix_cache"])

    monkeypatch.setattr(duospec, "load", load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc def ghi\nabc def ghi jkl\n")
    argv = ["generate", "--prompts-file", str(prompts), "--json", "--method", "ar", "--max-new-tokens", "4", *switch]
    assert main(argv) == 0
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert given["prefix_cache"] is not bool(switch)
    assert first["reused_prompt_tokens"] == 0
    assert (second["reused_prompt_tokens"] > len("user: abc def ghi") - 1) is not bool(switch)  # one token per character


@pytest.mark.parametrize("method", ["multiseq", "specexec"])
def test_tree_drafters_reuse_their_draft_prefix_too(pipelines, method):
    build, fresh = pipelines
    pipe = build("transformers")
    options = dict(max_new_tokens=NEW_TOKENS, gamma=4) if method == "multiseq" else dict(max_new_tokens=NEW_TOKENS, tree_budget=8, tree_depth=4)
    first = pipe.generate(PROMPT_A, method=method, **options)
    prompt = second_turn(PROMPT_A, first.token_ids)
    drafted = record_draft_passes(pipe)
    second = pipe.generate(prompt, method=method, **options)
    assert second.stats.reused_prompt_tokens >= len(PROMPT_A) + len(first.token_ids) - 1
    assert second.token_ids == build("transformers").generate(prompt, method=method, **options).token_ids
    assert drafted[0] <= FIRST_DRAFT_PASS_MAX, drafted


@pytest.mark.parametrize("backend", BACKENDS)
def test_duo_reuses_its_target_prefix_and_its_draft_process_prefix(request, modules, backend):
    """duo's engine (with the draft process's own state served in this process): the target keeps
    its prefix as with in-process drafters, the draft process keeps its own."""
    from duospec.budget.duo import DuoPlanner
    from duospec.budget.model import CostProfile
    from duospec.config import GenerationRequest, SamplingConfig
    from duospec.engines.duo import DuoSource
    from duospec.engines.rounds import generate_tokens
    from duospec.stats import GenerationStats
    from inprocess_draft import InProcessDraft

    if backend == "transformers":
        make = lambda name: HFModel(modules[name])  # noqa: E731
    else:
        files = request.getfixturevalue("gguf_files")
        make = lambda name: LlamaCppModel(files[name], LLAMA_SETTINGS)  # noqa: E731
    target, process = make("target"), InProcessDraft(make("draft"), 64, lambda round_: 2)
    duo_request = GenerationRequest(method="duo", max_new_tokens=NEW_TOKENS, sampling=SamplingConfig(seed=0))

    def answer(model, draft, prompt: list[int]) -> tuple[list[int], GenerationStats]:
        planner = DuoPlanner(CostProfile({1: 0.01, 2: 0.01, 4: 0.0105, 8: 0.011}), 0.001, fixed_gamma=4)
        stats = GenerationStats("duo", len(prompt))
        tokens = [token for chunk in generate_tokens(model, DuoSource(draft, planner), prompt, duo_request, frozenset({EOS_ID}), stats) for token in chunk]
        return tokens, stats

    kept: list[int] = []  # draft cache cells each `begin` kept
    begin = process.begin
    process.begin = lambda *args, **kwargs: (begin(*args, **kwargs), kept.append(process.state.model.cache_len))
    first, _ = answer(target, process, PROMPT_A)
    drafted_through = process.state.model.cache_len  # the draft lags behind the last commit (not fed yet)
    prompt = second_turn(PROMPT_A, first)
    second, stats = answer(target, process, prompt)
    assert stats.reused_prompt_tokens >= len(PROMPT_A) + len(first) - 1
    # The draft process kept all it had cached of the first prompt and answer: it prefills only the rest.
    assert kept[0] == 0 and kept[1] >= min(drafted_through, len(PROMPT_A) + len(first)) > len(PROMPT_A), (kept, drafted_through)
    assert second == answer(make("target"), InProcessDraft(make("draft"), 64, lambda round_: 2), prompt)[0]


# ===================================================================================================
# Requests that end early


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_a_stream_closed_early_leaves_a_reusable_consistent_cache(pipelines, backend, method):
    build, fresh = pipelines
    pipe = build(backend)
    stream = pipe.stream(PROMPT_A, method=method, **OPTIONS)
    chunks = iter(stream)
    next(chunks), next(chunks)
    partial = stream.stop("interrupted")  # the consumer stops between rounds (Ctrl-C in its own code)
    prompt = second_turn(PROMPT_A, partial.token_ids)
    second = pipe.generate(prompt, method=method, **OPTIONS)
    assert second.stats.reused_prompt_tokens >= len(PROMPT_A) + len(partial.token_ids) - 1
    assert second.token_ids == fresh(backend, prompt, method)


class BreaksInTheLastLayer:
    """Raises KeyboardInterrupt from the last decoder layer of the `after`-th pass: the earlier layers
    have written this pass's keys and values, the model's own count has not moved (a half-done pass)."""

    def __init__(self, module, after: int) -> None:
        self.calls, self.after = 0, after
        self.handle = module.model.layers[-1].register_forward_hook(self)

    def __call__(self, layer, inputs, output):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt

    def remove(self) -> None:
        self.handle.remove()


@pytest.mark.parametrize("method", METHODS)
def test_a_pass_broken_halfway_leaves_no_record_and_the_next_answer_is_right(pipelines, method):
    build, fresh = pipelines
    pipe = build("transformers")
    pipe.generate(PROMPT_A, method=method, **OPTIONS)  # a record to lose
    breaker = BreaksInTheLastLayer(pipe.target.model, after=3)
    try:
        with pytest.raises(GenerationInterrupted):
            pipe.generate(PROMPT_A + NEW_TURN, method=method, **OPTIONS)
    finally:
        breaker.remove()
    assert pipe.target.held_prefix is None
    prompt = PROMPT_A + NEW_TURN + [20, 21]
    second = pipe.generate(prompt, method=method, **OPTIONS)
    assert second.stats.reused_prompt_tokens == 0
    assert second.token_ids == fresh("transformers", prompt, method)


# ===================================================================================================
# Negative controls: the checks above fail on a wrong reuse


def cache_gap(model: HFModel, module, context: list[int]) -> float:
    """How far the cache (all of `context` but its last token) is from a fresh run: the next-step
    logits after feeding the last token, against the whole context run from scratch."""
    assert model.cache_len == len(context) - 1
    cached = model.forward(torch.tensor(context[-1:]), last_only=True)[-1]
    with torch.no_grad():
        reference = module(torch.tensor([context])).logits[0, -1].float()
    return float((cached - reference).abs().max())


def test_the_checks_catch_a_crop_off_by_one(pipelines, modules, monkeypatch):
    build, fresh = pipelines
    prompt = PROMPT_A[:3] + [50, 51, 52, 53]  # diverges after 3 tokens
    right = build("transformers")
    right.generate(PROMPT_A, method="ar", **OPTIONS)
    answer = right.generate(prompt, method="ar", **OPTIONS).token_ids
    assert answer == fresh("transformers", prompt, "ar")
    assert cache_gap(right.target, modules["target"], prompt + answer) < 1e-5

    wrong = build("transformers")
    wrong.generate(PROMPT_A, method="ar", **OPTIONS)
    reusable = prefix.reusable
    monkeypatch.setattr(prefix, "reusable", lambda model, tokens: reusable(model, tokens) + 1)  # keeps cell 3 (A's token)
    answer = wrong.generate(prompt, method="ar", **OPTIONS).token_ids
    assert answer != fresh("transformers", prompt, "ar")
    assert cache_gap(wrong.target, modules["target"], prompt + answer) > 1e-3


def test_the_checks_catch_a_record_kept_through_a_broken_pass(pipelines, monkeypatch):
    """A backend that kept its record through a half-done pass: the layers hold one cell more than
    the count says, the next request reuses that cache and answers wrong."""
    build, fresh = pipelines
    pipe = build("transformers")
    forward = HFModel.forward

    def keeps_its_record(self, *args, **kwargs):
        held = self.held_prefix
        try:
            return forward(self, *args, **kwargs)
        except KeyboardInterrupt:
            self.held_prefix = held  # wrong: the cache's layers now hold more than its count says
            raise

    monkeypatch.setattr(HFModel, "forward", keeps_its_record)
    breaker = BreaksInTheLastLayer(pipe.target.model, after=2)  # the prompt's pass, then the first round's
    try:
        with pytest.raises(GenerationInterrupted):
            pipe.generate(PROMPT_A, method="ar", **OPTIONS)
    finally:
        breaker.remove()
    prompt = PROMPT_A + NEW_TURN
    second = pipe.generate(prompt, method="ar", **OPTIONS)
    assert second.stats.reused_prompt_tokens == len(PROMPT_A)
    assert second.token_ids != fresh("transformers", prompt, "ar")


# ===================================================================================================
# The bench's llama.cpp baseline keeps its own prefix when warm


@needs_llama
def test_llama_ar_keeps_its_own_prefix_only_when_warm(pipelines):
    """llama-cpp-python's `Llama.generate` reuses a shared prefix by itself; the cold baseline resets
    it first (the whole prompt inside the timed call), the warm one keeps it, as our methods do."""
    from dataclasses import replace

    from duospec.bench.llama_baselines import _generate_llama
    from duospec.bench.settings import DecodeSettings

    build, _ = pipelines
    pipe = build("llama.cpp")
    cold = DecodeSettings(NEW_TOKENS, seed=0)
    first = _generate_llama("llama-ar", pipe, PROMPT_A, cold)
    assert first.stats.reused_prompt_tokens == 0 and first.token_ids
    prompt = second_turn(PROMPT_A, first.token_ids)
    warm = _generate_llama("llama-ar", pipe, prompt, replace(cold, warm=True))
    assert len(PROMPT_A) + len(first.token_ids) - 1 <= warm.stats.reused_prompt_tokens < len(prompt)
    again = _generate_llama("llama-ar", pipe, prompt, cold)
    assert again.stats.reused_prompt_tokens == 0
    assert warm.token_ids == again.token_ids
