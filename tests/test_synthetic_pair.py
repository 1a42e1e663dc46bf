"""The synthetic draft/target pair of set greedy acceptance (duospec/synthetic.py), and scripts/duo_gpu.py.

What is proven, and how (the tiny pair: draft hidden 64 x 2 layers, target hidden 96 x 3 layers,
vocabulary 256, float32 on the CPU):
(1) The knob keeps its promise: `calibrate_mix` on 200 random-token prompts (seed 1) gives a mix at
    which 200 *other* prompts (seed 2) measure within 0.05 of the wanted alpha, for 0.6, 0.8 and 0.9.
    At mix 0 the target's law is the draft's exactly (alpha 1, the backbone's logits); `set_mix`
    gives the model a rebuild would.
(2) Greedy `duo` equals `ar` token for token on the pair at every calibrated alpha, single chains
    and multi-sequence trees, with partial acceptance: the real engine, with the draft process's own
    state machine in this process (tests/inprocess_draft.py) drafting a varying number of tokens ahead
    between rounds. The spawned draft process runs in (5): the script's duo goes through the Pipeline
    (thread split, draft loaded in the child from a saved checkpoint) and is checked against ar.
(3) Sampled `duo` keeps the target's law: a vocabulary-8 synthetic pair; the exact law of the first
    five new tokens is enumerated from the target's conditionals and every pair of consecutive
    tokens is compared by chi-square over seeded runs (tests/law_checks.py). The draft runs in this
    process behind tests/inprocess_draft.py (the child's own state machine, drafting ahead a
    scheduled number of tokens), so the runs repeat seed for seed; test_duo.py covers the pipe.
(4) `sd` through the Pipeline: greedy output equals `ar`, and its per-token acceptance over the
    rounds (`chain_alpha`) is near the alpha measure_alpha gives on the same prompts.
(5) scripts/duo_gpu.py --tiny runs end to end (as CI must see it): a row for every method at every
    alpha, greedy duo == ar, calibrated alphas within 0.05.

Time: most of it is (5), a fresh interpreter that starts two draft processes (duo measures its one
thread placement with one, then answers with another); each start imports torch and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_fixtures import one_thread
from inprocess_draft import InProcessDraft
from law_checks import first_tokens, goodness_of_fit

from duospec.budget.duo import DuoPlanner
from duospec.budget.model import CostProfile
from duospec.config import GenerationRequest, SamplingConfig
from duospec.engines.duo import DuoSource
from duospec.engines.rounds import generate_tokens
from duospec.models.hf import HFModel
from duospec.sampling import warp_probs
from duospec.stats import GenerationStats
from duospec.synthetic import SHAPES, build_model, build_pair, calibrate_mix, chain_acceptance, measure_alpha, random_prompts, synthetic_pipeline

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.6, 0.8, 0.9)
PROMISE = 0.05
FLAT = CostProfile({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.012, 33: 0.015})  # GPU-like: long chains pay


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # tiny matmuls: threads only add overhead (and the machine is shared)
        yield


@pytest.fixture(scope="module")
def pair():
    return build_pair("tiny")


@pytest.fixture(scope="module")
def calibrated(pair) -> dict[float, tuple[float, float]]:
    """alpha -> (mix, alpha measured on the calibration prompts)."""
    known: dict[float, float] = {}
    return {alpha: calibrate_mix(pair, alpha, known=known) for alpha in ALPHAS}


def run_ar(target, prompt: list[int], new_tokens: int) -> list[int]:
    stats = GenerationStats("ar", len(prompt))
    request = GenerationRequest(method="ar", max_new_tokens=new_tokens, sampling=SamplingConfig())
    return [t for chunk in generate_tokens(target, None, prompt, request, frozenset(), stats) for t in chunk]


# ===================================================================================================
# (1) The knob


def test_calibrated_mix_keeps_its_promise_on_other_prompts(pair, calibrated):
    held_out = random_prompts(200, 16, pair.vocab_size, seed=2)
    for alpha, (mix, on_calibration) in calibrated.items():
        assert abs(on_calibration - alpha) <= 0.015, (alpha, mix, on_calibration)
        pair.set_mix(mix)
        measured = measure_alpha(pair.draft, pair.target, held_out, detail=True)
        assert abs(measured.alpha - alpha) <= PROMISE, f"alpha {alpha}: mix {mix:.4f} measures {measured.alpha:.3f} on other prompts"
        assert measured.stderr < 0.01 and measured.positions == 200 * 31
    mixes = [calibrated[alpha][0] for alpha in ALPHAS]
    assert mixes == sorted(mixes, reverse=True)  # more agreement, less of the target's own context term


def test_mix_zero_is_the_drafts_law_and_set_mix_is_a_rebuild(pair):
    pair.set_mix(0.0)
    prompts = random_prompts(8, 12, pair.vocab_size, seed=3)
    with torch.no_grad():
        draft, target = pair.draft(prompts).logits, pair.target(prompts).logits
    backbone = pair.backbone.logits(prompts.flatten()).view(*prompts.shape, -1).float()
    torch.testing.assert_close(draft, backbone, atol=1e-4, rtol=1e-4)  # no context term: the bigram law
    torch.testing.assert_close(target, backbone, atol=1e-4, rtol=1e-4)
    assert measure_alpha(pair.draft, pair.target, prompts) == 1.0
    # set_mix rewrites only the output projections, with the draws a fresh build makes.
    pair.set_mix(0.37)
    rebuilt = build_model("tiny-target", pair.backbone, 0.37, seed=pair.seed, role="target")
    for (name, got), (_, want) in zip(pair.target.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(got, want), name


# ===================================================================================================
# (2) Greedy duo == ar


def test_greedy_duo_equals_ar_at_every_calibrated_alpha(pair, calibrated):
    """The Duo engine with the child's own state machine in this process (tests/inprocess_draft.py),
    drafting 0 to 5 tokens ahead between takes as the child would while the target verifies; the
    spawned process itself runs in test (5), through the Pipeline."""
    target = HFModel(pair.target, "synthetic-target")
    drafted = accepted = 0
    for alpha, (mix, _) in calibrated.items():
        pair.set_mix(mix)
        for seed in (50, 51):
            prompt = random_prompts(1, 16, pair.vocab_size, seed=seed)[0].tolist()
            reference = run_ar(target, prompt, 40)
            for max_sequences in (1, 8):
                draft = InProcessDraft(HFModel(pair.draft, "synthetic-draft"), target.vocab_size, ahead=lambda round_: (0, 3, 1, 5, 2)[round_ % 5])
                stats = GenerationStats("duo", len(prompt))
                request = GenerationRequest(method="duo", max_new_tokens=40, sampling=SamplingConfig())
                chunks = generate_tokens(target, DuoSource(draft, DuoPlanner(FLAT, 0.001), max_sequences=max_sequences), prompt, request, frozenset(), stats)
                tokens = [t for chunk in chunks for t in chunk]
                assert tokens == reference, f"alpha {alpha} prompt seed {seed} max_sequences {max_sequences}"
                assert stats.fallback == ""
                drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
    assert drafted > 100 and 0.2 < accepted / drafted < 0.95, (accepted, drafted)  # partial acceptance really ran


# ===================================================================================================
# (3) Sampled duo keeps the target's law

VOCAB = 8
LAW_PROMPT = [3, 4, 5, 3, 4]
K = 5
LAW_RUNS = 240
LAW_SAMPLING = SamplingConfig(temperature=0.9, top_k=6)  # warped: the draft's q must be warped the same way


def exact_law(model, prompt: list[int], sampling: SamplingConfig, length: int) -> torch.Tensor:
    """float64 [V] * length: P(new tokens = t1..t_length) under the warped target (every prefix enumerated)."""
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    law = torch.ones(1, dtype=torch.float64)
    for _ in range(length):
        contexts = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
        with torch.no_grad():
            probs = warp_probs(model(contexts).logits[:, -1], sampling).double()
        law = (law[:, None] * probs).reshape(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(prefixes))[:, None]], dim=1)
    return (law / law.sum()).view([VOCAB] * length)


def test_sampled_duo_keeps_the_target_law():
    # One decoder layer each (a pass costs ~1 ms): the law, not the shapes, is under test here.
    shapes = (dict(SHAPES["tiny-draft"], vocab_size=VOCAB, num_hidden_layers=1), dict(SHAPES["tiny-target"], vocab_size=VOCAB, num_hidden_layers=1))
    small = build_pair(shapes, mix=1.0, sharpness=1.0, seed=3)  # soft laws: every token keeps real mass
    law = exact_law(small.target, LAW_PROMPT, LAW_SAMPLING, K)
    target = HFModel(small.target, "target8")
    draft = InProcessDraft(HFModel(small.draft, "draft8"), VOCAB, ahead=lambda round_: (1, 3, 2)[round_ % 3])
    counts = torch.zeros([VOCAB] * K)
    drafted = accepted = later = 0
    for seed in range(LAW_RUNS):
        sampling = SamplingConfig(LAW_SAMPLING.temperature, LAW_SAMPLING.top_k, LAW_SAMPLING.top_p, seed)
        stats = GenerationStats("duo", len(LAW_PROMPT))
        request = GenerationRequest(method="duo", max_new_tokens=32, sampling=sampling)
        chunks = generate_tokens(target, DuoSource(draft, DuoPlanner(FLAT, 0.001), max_sequences=1), LAW_PROMPT, request, frozenset(), stats)
        counts[tuple(first_tokens(chunks, K))] += 1
        drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
        later += stats.tokens_per_pass[0] + stats.tokens_per_pass[1] < K  # tokens came from round 2 or later
    assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)  # acceptance and rejection both ran
    assert later > LAW_RUNS // 2, later
    for first in range(K - 1):
        others = tuple(d for d in range(K) if d not in (first, first + 1))
        p = goodness_of_fit(counts.sum(others), law.sum(others))
        assert p > 1e-4, f"new tokens {first + 1} and {first + 2}: p = {p:.3g}"


# ===================================================================================================
# (4) sd on the pair


def test_sd_is_exact_and_accepts_near_the_calibrated_alpha(pair, calibrated):
    mix, _ = calibrated[0.8]
    pair.set_mix(mix)
    target, draft = HFModel(pair.target, "synthetic-target"), HFModel(pair.draft, "synthetic-draft")
    pipe = synthetic_pipeline(target, draft)
    prompts = random_prompts(12, 16, pair.vocab_size, seed=7)
    accepted = examined = 0
    for prompt in prompts.tolist():
        reference = pipe.generate(prompt, method="ar", max_new_tokens=32).token_ids
        result = pipe.generate(prompt, method="sd", max_new_tokens=32, gamma=3)
        assert result.token_ids == reference
        got, seen = chain_acceptance(result.stats)
        accepted, examined = accepted + got, examined + seen
    measured = measure_alpha(pair.draft, pair.target, prompts)  # the same prompts and positions
    assert examined > 200
    assert abs(accepted / examined - measured) < 0.06, (accepted / examined, measured)
    assert abs(accepted / examined - 0.8) < 0.1


# ===================================================================================================
# (5) The GPU script's CPU run


def test_duo_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "duo_gpu.py"), "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "duo_gpu.json").read_text())
    assert (tmp_path / "duo_gpu.md").read_text().count("| duo |") == len(ALPHAS)
    assert "error" not in report["pairs"]["tiny"], report["pairs"]["tiny"]
    methods = set(report["methods"])
    assert methods == {"ar", "sd", "sd-cpu-draft", "duo", "multiseq", "specexec"}
    for alpha in ALPHAS:
        assert {row["method"] for row in report["rows"] if row["alpha_wanted"] == alpha} == methods, alpha
        calibration = report["pairs"]["tiny"]["calibration"]["alphas"][str(alpha)]
        assert abs(calibration["alpha"] - alpha) <= PROMISE
    assert report["greedy_duo_equals_ar"] is True
    assert all(row["identical_to_ar"] for row in report["rows"])  # float32: every method, token for token
    assert all(row["fallback"] is None for row in report["rows"])
    assert report["pairs"]["tiny"]["duo"]["split"]
