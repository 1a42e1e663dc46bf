"""DuoDecoding (engines/duo.py, engines/draft_process.py) on tiny real float32 models.

What is proven, and how:
(1) Greedy `duo` equals autoregressive greedy token for token, with a draft that is the target itself
    ("same": every draft accepted, but the tiny models' confidences are low, about 0.1, so the
    cost-driven planner verifies short chains), the target with its output layer scaled by 64 ("sharp":
    the same argmax, exactly, at confidences near 1, so long chains are verified), the target plus 5%
    weight noise ("perturbed": partial acceptance) and an unrelated model ("unrelated": almost nothing
    accepted); at max_new_tokens boundaries, at the context's end, with an EOS in the middle of a
    round, and after an abandoned generation.
(2) Every planner keeps it exact: a fixed gamma, the cost-driven planner on a flat (GPU-like) and a
    steep (CPU-like) cost curve and on a linear one where drafting never pays; single chains and
    multi-sequence trees (a recording wrapper around the real target shows tree passes ran and
    that alternatives were taken).
(3) Sampled `duo` follows the target's law: on a vocabulary of 8 the exact law of the first six new
    tokens is enumerated from the target's own conditionals, and every pair of consecutive tokens is
    compared by chi-square with a thousand seeded runs whose per-round budgets vary. (Power, checked
    when written: q rows handed to the verifier one position late give p ~ 1e-55 at 1,200 runs.)
(4) Reliability: a killed and a hung (SIGSTOP) draft process make the generation fall back to the
    target alone with the same output, `stats.fallback` set and on_lost called once; `close()` ends
    the child; no child process of this module survives it (module teardown assertion). A handle that
    timed out refuses every later request (a late reply would leave the pipe one reply behind).
(5) The draft cache after each commit, tested in-process on `SpeculativeChain` (the child's state):
    it holds no more than the committed tokens (the last excepted) plus the kept chain, and going on
    from it gives a fresh model's logits (atol 1e-5).
(6) Negative controls: two deliberately wrong commits make the check of (5) fail.

Process economy: starting a draft process costs 5-10 s here (the child imports torch), so the module
starts one for all greedy tests, hosting the four drafts behind `DraftByMarker` (the prompt's first
token picks the draft: a draft may be any function of the context, so this is still a real draft),
one for the vocabulary-8 law test, and one each for the two tests that kill or stop their child.

Deadlines: pytest-timeout is not installed. Every wait on the child is bounded by the DraftProcess's
timeout_s (a hang surfaces as DraftProcessLost), and tests that spawn run under `deadline()`, which
raises TimeoutError from SIGALRM in the main thread; processes are closed in `finally`.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from law_checks import goodness_of_fit
from tiny_models import perturbed, tiny_model

from duospec.budget.duo import DuoPlanner
from duospec.budget.model import CostProfile
from duospec.config import GenerationRequest, SamplingConfig
from duospec.engines.draft_process import DraftObject, DraftProcess, DraftProcessLost, SpeculativeChain
from duospec.engines.duo import DuoSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.sampling import warp_probs
from duospec.stats import GenerationStats

METHOD = "duo"  # the engine does not read request.method

# The draft each prompt gets from the shared greedy process: its first token.
SAME, PERTURBED, UNRELATED, SHARP = 2, 3, 4, 5
KINDS = {"same": SAME, "sharp": SHARP, "perturbed": PERTURBED, "unrelated": UNRELATED}
BODIES = [[5, 9, 13, 2, 7, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40], [5, 9, 5, 9, 5]]
LENGTHS = [1, 2, 3, 6, 24]

# Fake cost curves (seconds of one target pass over n tokens); draft step 1 ms beside them.
FLAT = CostProfile({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.012, 33: 0.015})  # GPU-like: long chains pay
STEEP = CostProfile({1: 0.010, 2: 0.012, 4: 0.017, 8: 0.030, 16: 0.060})  # CPU-like: only short chains pay
LINEAR = CostProfile({1: 0.010, 2: 0.020, 4: 0.040, 8: 0.080})  # every token costs a pass: drafting never pays
PLANNERS = {
    "fixed3": lambda: DuoPlanner(FLAT, 0.001, fixed_gamma=3),
    "flat": lambda: DuoPlanner(FLAT, 0.001),
    "steep": lambda: DuoPlanner(STEEP, 0.001),
    "linear": lambda: DuoPlanner(LINEAR, 0.001),
}

_STARTED: list[DraftProcess] = []  # every draft process this module started (checked at teardown)


# ===================================================================================================
# Helpers


class DraftByMarker:
    """A draft (Model protocol, as the child uses it) that is one of several real tiny models, picked
    by the first token of the sequence: lets one draft process serve every draft kind."""

    def __init__(self, models: dict[int, HFModel]) -> None:
        self.models = models
        first = next(iter(models.values()))
        self.device, self.dtype, self.vocab_size = first.device, first.dtype, first.vocab_size
        self.max_context = min(model.max_context for model in models.values())
        self.current: HFModel | None = None

    @property
    def cache_len(self) -> int:
        return 0 if self.current is None else self.current.cache_len

    def reset(self) -> None:
        self.current = None

    def forward(self, tokens, positions=None, tree_mask=None, last_only=False):
        if self.current is None:  # the first pass after a reset carries the prompt, marker first
            self.current = self.models[int(tokens[0])]
            self.current.reset()
        return self.current.forward(tokens, positions, tree_mask, last_only)

    def crop(self, length: int) -> None:
        if self.current is not None:
            self.current.crop(length)


class RecordingTarget:
    """The real target model, counting the passes that verified a tree and the tree rounds whose
    accepted path went through an alternative first token (not a chain prefix)."""

    def __init__(self, model: HFModel) -> None:
        self.inner = model
        self.tree_passes = 0
        self.alternatives_taken = 0
        self._last_was_tree = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    def forward(self, tokens, positions=None, tree_mask=None, last_only=False):
        self._last_was_tree = tree_mask is not None
        self.tree_passes += self._last_was_tree
        return self.inner.forward(tokens, positions, tree_mask, last_only)

    def keep(self, nodes: list[int]) -> None:
        if self._last_was_tree and list(nodes) != list(range(len(nodes))):
            self.alternatives_taken += 1
        self.inner.keep(nodes)


@contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts the main thread's waits."""

    def expire(signum, frame):
        raise TimeoutError(f"test deadline of {seconds:.0f} s passed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def start_process(draft, vocab_size: int, timeout_s: float = 20.0) -> DraftProcess:
    process = DraftProcess(DraftObject(draft), vocab_size, cores=None, threads=1, timeout_s=timeout_s)
    _STARTED.append(process)
    return process


def run_ar(target, prompt: list[int], max_new_tokens: int, sampling=SamplingConfig(), eos=frozenset()):
    stats = GenerationStats("ar", len(prompt))
    request = GenerationRequest(method="ar", max_new_tokens=max_new_tokens, sampling=sampling)
    return [t for chunk in generate_tokens(target, None, prompt, request, eos, stats) for t in chunk], stats


def duo_chunks(target, process, prompt, max_new_tokens, planner=None, sampling=SamplingConfig(), eos=frozenset(), max_sequences=8, on_lost=None):
    """The generator generate_tokens returns for a DuoSource, and its stats."""
    stats = GenerationStats(METHOD, len(prompt))
    request = GenerationRequest(method=METHOD, max_new_tokens=max_new_tokens, sampling=sampling)
    planner = planner or PLANNERS["flat"]()
    chunks = generate_tokens(target, DuoSource(process, planner, on_lost=on_lost, max_sequences=max_sequences), prompt, request, eos, stats)
    return chunks, stats


def run_duo(*args, **kwargs):
    chunks, stats = duo_chunks(*args, **kwargs)
    return [t for chunk in chunks for t in chunk], stats


def prompt_for(kind: str, body: list[int]) -> list[int]:
    return [KINDS[kind], *body]


# ===================================================================================================
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def no_child_survives():
    """Set up first, torn down last: by then every test and process fixture has closed its child, and
    none of the children this module started may still run (nor be left as a zombie of this process)."""
    yield
    still_running = [process.process.pid for process in _STARTED if process.alive]
    for process in _STARTED:
        process.close()  # never leak one, even when the checks below fail
    assert not still_running, f"draft processes left running: {still_running}"
    started = {process.process.pid for process in _STARTED}
    assert all(process.process.exitcode is not None for process in _STARTED)
    assert not started & {child.pid for child in multiprocessing.active_children()}
    try:
        import psutil
    except ImportError:
        return
    assert not started & {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only add overhead (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def target(target_model):
    return HFModel(target_model, "target")


@pytest.fixture(scope="module")
def greedy_process(target_model):
    drafts = {
        SAME: tiny_model(seed=0),  # the target's weights
        PERTURBED: perturbed(target_model, noise=0.05, seed=7),
        UNRELATED: tiny_model(seed=1),
        SHARP: tiny_model(seed=0),
    }
    with torch.no_grad():
        drafts[SHARP].lm_head.weight.mul_(64.0)  # a power of two: the logits scale exactly, the argmax stays
    with deadline(180):
        process = start_process(DraftByMarker({marker: HFModel(model, f"draft{marker}") for marker, model in drafts.items()}), target_model.config.vocab_size)
    try:
        yield process
    finally:
        process.close()


# ===================================================================================================
# (1) Greedy identity


def test_draft_kinds_give_full_partial_and_near_zero_acceptance(target, greedy_process):
    """The kinds really exercise full, partial and almost no acceptance (else the identity tests
    prove less): chains only, a fixed gamma of 4."""
    rates = {}
    for kind in KINDS:
        drafted = accepted = 0
        for body in BODIES:
            _, stats = run_duo(target, greedy_process, prompt_for(kind, body), 24, DuoPlanner(FLAT, 0.001, fixed_gamma=4), max_sequences=1)
            assert stats.fallback == ""
            drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
        rates[kind] = accepted / drafted
    assert rates["same"] == rates["sharp"] == 1.0, rates  # a draft chain out of step with the context would break this
    assert rates["unrelated"] < 0.2, rates
    assert 0.2 < rates["perturbed"] < 0.95, rates


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_duo_equals_ar(target, greedy_process, kind):
    for body in BODIES:
        prompt = prompt_for(kind, body)
        reference, _ = run_ar(target, prompt, max(LENGTHS))
        for planner in ("fixed3", "flat"):
            for n in LENGTHS:
                tokens, stats = run_duo(target, greedy_process, prompt, n, PLANNERS[planner]())
                assert tokens == reference[:n], f"{kind} {planner} n={n} prompt={prompt}"
                assert stats.finish_reason == "length" and stats.new_tokens == n
                assert stats.fallback == ""
                assert sum(stats.tokens_per_pass) == n and len(stats.tokens_per_pass) == stats.target_passes


@pytest.mark.parametrize("kind", ["same", "sharp", "perturbed"])
def test_eos_mid_round_truncates_like_ar(target, greedy_process, kind):
    """Declare a token that ar emits mid-answer EOS: duo stops right after its first occurrence, also
    when it arrives inside a round whose later tokens were accepted too."""
    cut_inside_a_round = 0
    for body in BODIES[:3]:
        prompt = prompt_for(kind, body)
        free_run, _ = run_ar(target, prompt, 20)
        for index in (3, 7):
            stop = free_run[index]
            first = free_run.index(stop)
            eos = frozenset({stop})
            reference, ar_stats = run_ar(target, prompt, 20, eos=eos)
            assert reference == free_run[: first + 1] and ar_stats.finish_reason == "eos"
            tokens, stats = run_duo(target, greedy_process, prompt, 20, DuoPlanner(FLAT, 0.001, fixed_gamma=4), eos=eos, max_sequences=1)
            assert tokens == reference, f"{kind} prompt={prompt} stop={stop}"
            assert stats.finish_reason == "eos" and stats.fallback == ""
            # The last round verified more tokens than it kept: the EOS cut it.
            cut_inside_a_round += stats.tokens_per_pass[-1] < stats.gammas[-1] + 1 if stats.gammas else 0
    if kind != "perturbed":  # every draft accepted: rounds of 5, so an EOS lands inside one
        assert cut_inside_a_round > 0


def test_eos_as_first_token(target, greedy_process):
    prompt = prompt_for("same", BODIES[0])
    first = run_ar(target, prompt, 1)[0][0]
    tokens, stats = run_duo(target, greedy_process, prompt, 10, eos=frozenset({first}))
    assert tokens == [first] and stats.finish_reason == "eos"
    # The process is fine for the next generation (it was left with a begun sequence).
    assert run_duo(target, greedy_process, prompt, 10)[0] == run_ar(target, prompt, 10)[0]


def test_generation_stops_at_the_context_end(greedy_process):
    """A target with 48 positions (same weights as the draft "same", which has 256): rounds are cut
    at the context's end exactly as ar ends there."""
    short = HFModel(tiny_model(seed=0, max_positions=48), "short")
    for kind in ("same", "perturbed"):
        prompt = prompt_for(kind, BODIES[1])
        reference, ar_stats = run_ar(short, prompt, 100)
        assert ar_stats.finish_reason == "context" and len(prompt) + len(reference) == 48
        for planner in ("fixed3", "flat"):
            tokens, stats = run_duo(short, greedy_process, prompt, 100, PLANNERS[planner]())
            assert tokens == reference and stats.finish_reason == "context" and stats.fallback == ""


def test_an_abandoned_generation_leaves_the_process_usable(target, greedy_process):
    """A consumer that stops reading after two chunks (the generator is closed: the engine parks the
    child); the next generation on the same process is exact."""
    prompt = prompt_for("perturbed", BODIES[0])
    chunks, _ = duo_chunks(target, greedy_process, prompt, 24)
    for count, _ in enumerate(chunks):
        if count == 1:
            break
    chunks.close()
    tokens, stats = run_duo(target, greedy_process, prompt_for("unrelated", BODIES[2]), 24)
    assert tokens == run_ar(target, prompt_for("unrelated", BODIES[2]), 24)[0] and stats.fallback == ""


# ===================================================================================================
# (2) Planner variety, chains and trees


@pytest.mark.parametrize("planner", list(PLANNERS))
def test_every_planner_gives_ar_output(target, greedy_process, planner):
    gammas = []
    for kind in ("perturbed", "sharp"):
        for body in BODIES[:3]:
            prompt = prompt_for(kind, body)
            reference, _ = run_ar(target, prompt, 24)
            for max_sequences in (1, 8):
                tokens, stats = run_duo(target, greedy_process, prompt, 24, PLANNERS[planner](), max_sequences=max_sequences)
                assert tokens == reference, f"{planner} {kind} max_sequences={max_sequences} prompt={prompt}"
                assert stats.fallback == ""
                gammas += stats.gammas
    if planner == "linear":
        assert set(gammas) == {0}  # drafting never pays: plain target steps beside a running draft
    else:
        assert len(set(gammas)) > 1
    if planner == "fixed3":
        assert max(gammas) <= 3 + 7  # the chain, plus at most 7 alternative first tokens


def test_steep_costs_verify_shorter_chains_than_flat(target, greedy_process):
    """A confident, always right draft: a flat curve verifies long chains, a steep one short ones."""
    prompt = prompt_for("sharp", BODIES[1])
    reference, _ = run_ar(target, prompt, 40)
    longest = {}
    for planner in ("flat", "steep"):
        tokens, stats = run_duo(target, greedy_process, prompt, 40, PLANNERS[planner](), max_sequences=1)
        assert tokens == reference
        longest[planner] = max(stats.gammas)
    assert longest["steep"] >= 1, longest  # the steep curve still verifies drafts
    assert longest["steep"] < longest["flat"], longest
    assert longest["flat"] >= 8, longest


def test_multi_sequence_rounds_verify_trees_and_stay_exact(target, greedy_process):
    """Greedy rounds with alternative first tokens: trees are verified in one pass (seen at the
    target's forward), the target sometimes takes an alternative, and the output is still ar's."""
    recording = RecordingTarget(target)
    for kind in ("perturbed", "unrelated"):
        for body in BODIES:
            prompt = prompt_for(kind, body)
            reference, _ = run_ar(target, prompt, 30)
            tokens, stats = run_duo(recording, greedy_process, prompt, 30, PLANNERS["flat"](), max_sequences=8)
            assert tokens == reference, f"{kind} prompt={prompt}"
            assert stats.fallback == ""
    assert recording.tree_passes > 0
    assert recording.alternatives_taken > 0


# ===================================================================================================
# (3) Sampled duo keeps the target's law

VOCAB = 8
LAW_PROMPT = [3, 4, 5, 3, 4]
LAW_TOKENS = 6
LAW_SAMPLES = 1000
LAW_SAMPLING = SamplingConfig(temperature=0.9, top_k=6)  # a warped law: the child must warp q the same way


def exact_law(model, prompt: list[int], sampling: SamplingConfig, length: int) -> torch.Tensor:
    """float64 [V] * length: P(new tokens = t1..t_length) under the warped target, by enumerating
    every prefix (batched: 8^k prefixes at step k)."""
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    law = torch.ones(1, dtype=torch.float64)
    for _ in range(length):
        contexts = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
        with torch.no_grad():
            probs = warp_probs(model(contexts).logits[:, -1], sampling).double()  # [n, V]
        law = (law[:, None] * probs).reshape(-1)  # index i * V + v: prefix i, then token v
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(prefixes))[:, None]], dim=1)
    return (law / law.sum()).view([VOCAB] * length)


def test_sampled_duo_follows_the_target_law():
    """LAW_SAMPLES seeded generations of 6 tokens; every pair of consecutive new tokens is compared
    with the exact law. Round 1 mostly verifies one or two draft tokens, so tokens 4 to 6 mostly come
    from later rounds (after the child's chain was kept past a bonus token, or rolled back); the draft is
    surer than the target (its output layer scaled by 4), so rejections are frequent and the
    cost-driven planner's chain length varies from round to round with the draft's confidences.

    False-failure rate: seeds are fixed, but a Duo run is not repeatable token for token (how many
    draft tokens are ready, and so how the draft's random stream is consumed, depends on timing);
    under a correct engine each p-value is uniform on [0, 1], so the five checks at p > 1e-4 fail
    together with probability at most 5e-4 per run. A biased sampler lands near p ~ 0 (the same check
    rejects a lossy one at p ~ 1e-199 in test_sampling_e2e.py::test_the_check_rejects_a_lossy_sampler)."""
    target_module = tiny_model(seed=11, vocab_size=VOCAB, max_positions=16)  # 16: the child drafts at most that far
    with torch.no_grad():
        target_module.lm_head.weight.mul_(0.25)  # soften: every token keeps real mass, so the test has power
    draft_module = perturbed(target_module, noise=0.3, seed=5)
    with torch.no_grad():
        draft_module.lm_head.weight.mul_(4.0)
    law = exact_law(target_module, LAW_PROMPT, LAW_SAMPLING, LAW_TOKENS)
    target = HFModel(target_module, "target8")
    counts = torch.zeros([VOCAB] * LAW_TOKENS)
    later_rounds = varied_runs = drafted = accepted = 0
    all_gammas: set[int] = set()
    with deadline(600):
        process = start_process(HFModel(draft_module, "draft8"), VOCAB)
        try:
            for seed in range(LAW_SAMPLES):
                sampling = SamplingConfig(LAW_SAMPLING.temperature, LAW_SAMPLING.top_k, LAW_SAMPLING.top_p, seed)
                tokens, stats = run_duo(target, process, LAW_PROMPT, LAW_TOKENS, PLANNERS["flat"](), sampling=sampling)
                assert stats.fallback == "" and len(tokens) == LAW_TOKENS
                later_rounds += stats.tokens_per_pass[0] + stats.tokens_per_pass[1] <= 3  # tokens 4 to 6: later rounds
                counts[tuple(tokens)] += 1
                varied_runs += len(set(stats.gammas)) > 1
                all_gammas.update(stats.gammas)
                drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
        finally:
            process.close()
    # What the runs exercised: later rounds, budgets that vary within a run, acceptance and rejection.
    assert later_rounds > LAW_SAMPLES // 2, later_rounds
    assert varied_runs > LAW_SAMPLES // 2 and len(all_gammas - {0}) > 1, (varied_runs, all_gammas)
    assert 0.3 < accepted / drafted < 0.95, accepted / drafted
    for first in range(LAW_TOKENS - 1):
        others = tuple(d for d in range(LAW_TOKENS) if d not in (first, first + 1))
        p = goodness_of_fit(counts.sum(others), law.sum(others))
        assert p > 1e-4, f"new tokens {first + 1} and {first + 2}: p = {p:.3g}"


# ===================================================================================================
# (4) Reliability


def test_killed_draft_process_falls_back_to_the_same_output(target_model, target):
    prompt = [7, *BODIES[1]]
    reference, _ = run_ar(target, prompt, 30)
    lost: list[DraftProcessLost] = []
    with deadline(240):
        process = start_process(HFModel(perturbed(target_model, noise=0.05, seed=7), "draft"), target.vocab_size)
        try:
            chunks, stats = duo_chunks(target, process, prompt, 30, on_lost=lost.append)
            tokens = []
            for count, chunk in enumerate(chunks):
                tokens += chunk
                if count == 1:
                    process.process.kill()
                    process.process.join(timeout=10)
                    assert not process.alive
            assert tokens == reference
            assert stats.fallback and len(lost) == 1 and isinstance(lost[0], DraftProcessLost)
            assert stats.target_passes > 2  # it went on after the loss
            # A generation that starts with the dead process falls back at once, the same way.
            again, stats = run_duo(target, process, prompt, 30, on_lost=lost.append)
            assert again == reference and stats.fallback and len(lost) == 2
        finally:
            process.close()
    assert not process.alive


def test_hung_draft_process_times_out_and_falls_back(target_model, target):
    """SIGSTOP the child after two chunks: the next wait for a draft times out (timeout_s 1 s), the
    generation goes on alone with ar's output. The draft is the target's weights, so that the
    handle's later use can be judged (see the end)."""
    prompt = [7, *BODIES[0]]
    reference, _ = run_ar(target, prompt, 30)
    lost: list[DraftProcessLost] = []
    with deadline(240):
        process = start_process(HFModel(tiny_model(seed=0), "draft"), target.vocab_size, timeout_s=1.0)
        stopped = False
        try:
            chunks, stats = duo_chunks(target, process, prompt, 30, on_lost=lost.append)
            tokens = []
            start = time.monotonic()
            for count, chunk in enumerate(chunks):
                tokens += chunk
                if count == 1:
                    os.kill(process.process.pid, signal.SIGSTOP)
                    stopped = True
            elapsed = time.monotonic() - start
            assert tokens == reference
            assert "did not answer" in stats.fallback and len(lost) == 1
            assert elapsed < 30  # one timeout (about 1 s), not one per round
            assert process.alive  # stopped, not dead: only the deadline noticed

            # The child resumes; a caller that reuses the handle still gets ar's output ...
            os.kill(process.process.pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.5)
            other = [7, *BODIES[1]]
            tokens, stats = run_duo(target, process, other, 30, DuoPlanner(FLAT, 0.001, fixed_gamma=3), max_sequences=1, on_lost=lost.append)
            assert tokens == run_ar(target, other, 30)[0]
            # ... and the handle refuses to talk again (the reply to the timed-out request may still
            # be in the pipe: every later reply would be one behind, and under sampling its tokens
            # would be paired with another request's q rows), so the request falls back at once.
            assert "lost earlier" in stats.fallback and stats.drafted_tokens == 0
        finally:
            if stopped:
                os.kill(process.process.pid, signal.SIGCONT)
            process.close()
    assert not process.alive and process.process.exitcode is not None


# ===================================================================================================
# (5) The draft cache after each commit (SpeculativeChain in-process)


def check_draft_cache(state: SpeculativeChain, reference_module) -> None:
    """The cache holds at most the committed tokens (the last one excepted) plus the kept chain, and
    feeding it the rest of committed + chain gives a fresh model's logits at every fed position."""
    model = state.model
    sequence = state.committed + state.chain
    cached = model.cache_len
    assert cached <= len(state.committed) - 1 + len(state.chain), f"cache {cached}, committed {len(state.committed)}, chain {len(state.chain)}"
    logits = model.forward(torch.tensor(sequence[cached:]))
    model.crop(cached)  # leave the cache as the chain left it
    with torch.no_grad():
        fresh = reference_module(torch.tensor([sequence])).logits[0, cached:].float()
    torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def draft_module(target_model):
    return perturbed(target_model, noise=0.05, seed=7)


def new_chain(draft_module, chain_class=SpeculativeChain, sampling=SamplingConfig(), prompt=(2, 5, 9, 13, 2, 7, 11)):
    state = chain_class(HFModel(draft_module, "draft"), draft_module.config.vocab_size)
    state.begin(list(prompt), sampling, seed=0)
    return state


def other_than(token: int) -> int:
    return (token + 1) % 64


def steps(state: SpeculativeChain, n: int) -> list[int]:
    for _ in range(n):
        state.step()
    return list(state.chain)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)], ids=["greedy", "sampled"])
def test_speculative_chain_cache_after_commits(draft_module, sampling):
    state = new_chain(draft_module, sampling=sampling)
    # The first token of the target, before anything was drafted (the engine's first commit).
    state.commit([17])
    check_draft_cache(state, draft_module)
    # Agreeing commits: the chain is kept beyond them, its cached tokens too.
    chain = steps(state, 5)
    state.commit(chain[:2])
    check_draft_cache(state, draft_module)
    assert state.chain == chain[2:] and state.model.cache_len == len(state.committed) - 1 + len(state.chain)
    chain = steps(state, 2)  # catch up: the kept chain's cache is used, not recomputed
    state.commit(chain)  # the whole chain, exactly
    check_draft_cache(state, draft_module)
    assert state.chain == []
    # A rollback in the middle of the chain.
    chain = steps(state, 5)
    state.commit([chain[0], chain[1], other_than(chain[2])])
    check_draft_cache(state, draft_module)
    assert state.chain == [] and state.model.cache_len <= len(state.committed) - 1
    # A full accept with a wrong bonus guess: the verified 3 agree, the target's bonus is not chain[3].
    chain = steps(state, 5)
    state.commit([*chain[:3], other_than(chain[3])])
    check_draft_cache(state, draft_module)
    # A full accept with the right bonus guess: the chain goes on from chain[4].
    chain = steps(state, 6)
    state.commit(chain[:4])
    check_draft_cache(state, draft_module)
    assert state.chain == chain[4:]
    # The whole chain accepted and a bonus beyond it (the chain ran out).
    chain = steps(state, 1)
    state.commit([*chain, 9])
    check_draft_cache(state, draft_module)
    # A rollback at the first token, the cache holding many chain tokens.
    chain = steps(state, 8)
    state.commit([other_than(chain[0])])
    check_draft_cache(state, draft_module)
    steps(state, 3)
    check_draft_cache(state, draft_module)


def test_speculative_chain_random_commits(draft_module):
    """Random rounds as the engine makes them: draft 0..6 more tokens, then commit an agreeing prefix
    and (most of the time) a token that differs from the chain's next one or lies beyond it."""
    rng = random.Random(0)
    state = new_chain(draft_module, sampling=SamplingConfig(temperature=1.0))
    state.commit([17])
    for round_ in range(40):
        chain = steps(state, rng.randint(0, 6))
        agreed = rng.randint(0, len(chain))
        tokens = chain[:agreed]
        if agreed == len(chain) or rng.random() < 0.7:
            tokens.append(other_than(chain[agreed]) if agreed < len(chain) else rng.randrange(64))
        if not tokens:
            tokens = [rng.randrange(64)]
        state.commit(tokens)
        check_draft_cache(state, draft_module)
    assert len(state.committed) < state.model.max_context


# ===================================================================================================
# (6) Negative controls: the check of (5) has teeth


class KeepsOneTooMany(SpeculativeChain):
    """Wrong: on a rollback it crops the cache one token too late (the rejected chain token stays)."""

    def commit(self, tokens: list[int]) -> None:
        agreed = 0
        while agreed < min(len(tokens), len(self.chain)) and self.chain[agreed] == tokens[agreed]:
            agreed += 1
        if agreed == len(tokens):
            return super().commit(tokens)
        base = len(self.committed)
        self.committed.extend(tokens)
        self.chain, self.rows, self.confidences, self.tops = [], [], [], []
        if self.model.cache_len > base + agreed + 1:
            self.model.crop(base + agreed + 1)


class TrustsTheFirstToken(SpeculativeChain):
    """Wrong: it keeps the chain when only the first committed token agrees with it."""

    def commit(self, tokens: list[int]) -> None:
        if self.chain and self.chain[0] == tokens[0] and len(self.chain) > len(tokens):
            self.committed.extend(tokens)
            del self.chain[: len(tokens)], self.rows[: len(tokens)], self.confidences[: len(tokens)], self.tops[: len(tokens)]
            return
        super().commit(tokens)


def test_the_check_catches_a_cache_that_keeps_one_token_too_many(draft_module):
    state = new_chain(draft_module, KeepsOneTooMany)
    state.commit([17])
    chain = steps(state, 5)
    state.commit([chain[0], chain[1], other_than(chain[2])])
    with pytest.raises(AssertionError, match="cache"):
        check_draft_cache(state, draft_module)


def test_the_check_catches_a_chain_kept_past_a_rejection(draft_module):
    state = new_chain(draft_module, TrustsTheFirstToken)
    state.commit([17])
    chain = steps(state, 6)
    state.commit([chain[0], other_than(chain[1])])
    # The bound alone passes (cache and chain still have the right lengths); the logits do not.
    assert state.model.cache_len <= len(state.committed) - 1 + len(state.chain)
    with pytest.raises(AssertionError, match="close|equal"):
        check_draft_cache(state, draft_module)


def test_alternative_first_tokens_never_take_more_cache_cells_than_are_left():
    """Near the context's end a duo tree must fit the cells left (every node takes one). The chain was
    capped by `room`; the alternative first tokens were not (found in the one-round-loop review)."""
    import torch

    from duospec.budget.duo import DuoPlanner
    from duospec.budget.model import CostProfile
    from duospec.config import SamplingConfig
    from duospec.engines.duo import DuoSource
    from duospec.models.hf import HFModel
    from duospec.stats import GenerationStats
    from inprocess_draft import InProcessDraft
    from tiny_models import tiny_model

    flat = CostProfile({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.012, 33: 0.015})  # extra nodes cost nothing
    sizes = {}
    for cells in (64, 2):
        draft = InProcessDraft(HFModel(tiny_model(seed=1)), 64, lambda round_: 4)
        source = DuoSource(draft, DuoPlanner(flat, 0.001), max_sequences=8)
        prompt = [3, 5, 7, 9]
        source.begin(prompt, SamplingConfig(), torch.Generator().manual_seed(0), GenerationStats("duo", len(prompt)))
        source.commit([11])
        source.propose([*prompt, 11], room=2, cells=64)  # the first round waits for one token
        source.commit([12])
        tree = source.propose([*prompt, 11, 12], room=2, cells=cells)
        sizes[cells] = 0 if tree is None else tree.n_draft
        source.end()
    assert sizes[64] > 2, "no alternatives were proposed: the test would not see the cap"
    assert sizes[2] <= 2  # Not more: the cells left bound the whole tree
