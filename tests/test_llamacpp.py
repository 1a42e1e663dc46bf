"""The llama.cpp backend on tiny GGUF files the tests write themselves (tests/tiny_gguf.py).

One GGUF holds exactly a tiny transformers model's float32 weights, so the two backends can be
compared directly: same logits up to rounding, same greedy answers. Then the cache discipline: a tree
scored in one decode gives each node the logits of its root-to-node path run alone; keeping a path
(or cropping a chain) leaves a cache whose next logits equal a fresh run of the kept tokens. Finally
every method through the engine, on llama.cpp alone and mixed with transformers, greedy-identical to
`ar` at full, partial and zero acceptance.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")

from tiny_gguf import write_gguf  # noqa: E402
from tiny_models import EOS_ID, perturbed, tiny_model, tiny_tokenizer  # noqa: E402

from duospec.api import Pipeline  # noqa: E402
from duospec.config import DuospecError  # noqa: E402
from duospec.models.hf import HFModel  # noqa: E402
from duospec.models.llamacpp import LlamaCppModel, LlamaCppSettings, _parents_from_mask  # noqa: E402
from duospec.models.loading import LoadOptions, load_model  # noqa: E402
from duospec.tree import TokenTree  # noqa: E402

SETTINGS = LlamaCppSettings(context=256, batch=64, sequences=16, threads=1)
PROMPTS = ["w1 w2 w3", "w5 w9 w5 w9 w5", "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30 w31", "w40"]


@pytest.fixture(scope="module")
def target_hf():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, target_hf):
    """GGUF files: the target, a perturbed copy (partial acceptance) and an unrelated model (almost none)."""
    directory = tmp_path_factory.mktemp("gguf")
    return {
        "same": write_gguf(target_hf, directory / "target.gguf"),
        "perturbed": write_gguf(perturbed(target_hf, noise=0.2, seed=7), directory / "perturbed.gguf"),
        "random": write_gguf(tiny_model(seed=1), directory / "random.gguf"),
    }


@pytest.fixture(scope="module")
def target_llama(gguf_files):
    return LlamaCppModel(gguf_files["same"], SETTINGS)


def llama_pipeline(target_path, draft_path=None, draft_model=None) -> Pipeline:
    target = LlamaCppModel(target_path, SETTINGS)
    pipe = Pipeline(
        target,
        tiny_tokenizer(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        threads=1,
        backend="llama.cpp",
        eos_ids=frozenset({EOS_ID}),
    )
    if draft_path is not None:
        pipe.attach_draft(LlamaCppModel(draft_path, SETTINGS))
    if draft_model is not None:
        pipe.attach_draft(draft_model)
    return pipe


def fresh_logits(model, tokens: list[int]) -> torch.Tensor:
    """Last-position logits of `tokens` run from an empty cache."""
    model.reset()
    return model.forward(torch.tensor(tokens), last_only=True)[-1]


# -- the backend against transformers ---------------------------------------------------------------
def test_logits_equal_transformers_on_the_same_weights(target_llama, target_hf):
    tokens = torch.tensor([5, 9, 12, 3, 40, 7, 7, 21])
    target_llama.reset()
    ours = target_llama.forward(tokens)
    with torch.no_grad():
        reference = target_hf(tokens[None]).logits[0].float()
    assert ours.shape == (8, target_hf.config.vocab_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-3)


def test_a_prompt_longer_than_the_batch_is_cut_into_chunks(gguf_files):
    """A batch over n_batch tokens would abort the process in C; the backend splits it instead."""
    small_batch = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=256, batch=8, sequences=4, threads=1))
    tokens = torch.arange(3, 40) % 60 + 2  # 37 tokens, five chunks of at most 8
    whole = small_batch.forward(tokens)
    assert whole.shape[0] == 37 and small_batch.cache_len == 37
    last = small_batch.forward(torch.tensor([5]), last_only=True)
    big_batch = LlamaCppModel(gguf_files["same"], SETTINGS)
    torch.testing.assert_close(whole, big_batch.forward(tokens), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, big_batch.forward(torch.tensor([5]), last_only=True), atol=1e-4, rtol=1e-4)


# -- trees, keep, crop ------------------------------------------------------------------------------
def test_parents_and_sequences_of_a_worked_example(target_llama):
    """The docstring example of _parents_from_mask, and the sequence ids a one-pass tree gets: the root
    takes a fresh id (1), its first child inherits it, its second child (a second leaf) takes id 2,
    which the root in the same batch carries too, and node 3 inherits node 1's id."""
    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9]), parents=(-1, 0, 0, 1))
    assert _parents_from_mask(tree.ancestor_mask(), 0) == [-1, 0, 0, 1]  # not [-1, 0, 0, 0]: node 3 hangs under 1
    target_llama.reset()
    target_llama.forward(torch.tensor([4, 8, 15]))
    target_llama.forward(tree.tokens, 3 + tree.depth_tensor(), tree.ancestor_mask())
    assert target_llama._tree.sequence == [1, 1, 2, 1]  # sequence 0 is the prefix: no node carries it
    assert target_llama._tree.parents == [-1, 0, 0, 1]


def random_tree(n: int, seed: int) -> TokenTree:
    """n nodes under random parents; token = 2 + node index, so siblings always differ."""
    generator = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, node, (1,), generator=generator)) for node in range(1, n)]
    return TokenTree(tokens=torch.arange(2, 2 + n), parents=tuple(parents))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tree_pass_gives_each_node_its_path_logits(target_llama, seed):
    prefix = [4, 8, 15, 16, 23, 42, 30]
    tree = random_tree(12, seed)
    target_llama.reset()
    target_llama.forward(torch.tensor(prefix))
    positions = target_llama.cache_len + tree.depth_tensor()
    logits = target_llama.forward(tree.tokens, positions, tree.ancestor_mask())
    assert logits.shape[0] == tree.n_nodes
    for node in range(tree.n_nodes):
        path_tokens = [int(tree.tokens[i]) for i in tree.path_to(node)]
        alone = fresh_logits(target_llama, prefix + path_tokens)
        torch.testing.assert_close(logits[node], alone, atol=1e-4, rtol=1e-4, msg=f"node {node}")
        target_llama.reset()
        target_llama.forward(torch.tensor(prefix))
        target_llama.forward(tree.tokens, positions, tree.ancestor_mask())


@pytest.mark.parametrize("seed", [3, 4])
def test_keeping_a_tree_path_leaves_the_cache_of_that_path(target_llama, seed):
    """After keep(path), the next logits equal a fresh run of prefix + path; the cache length matches."""
    prefix = [4, 8, 15, 16, 23]
    tree = random_tree(10, seed)
    deepest = max(range(tree.n_nodes), key=lambda node: tree.depths[node])
    for node in {deepest, 0, tree.n_nodes - 1}:
        path = tree.path_to(node)
        target_llama.reset()
        target_llama.forward(torch.tensor(prefix))
        target_llama.forward(tree.tokens, target_llama.cache_len + tree.depth_tensor(), tree.ancestor_mask())
        target_llama.keep(path)
        assert target_llama.cache_len == len(prefix) + len(path)
        kept = prefix + [int(tree.tokens[i]) for i in path]
        next_logits = target_llama.forward(torch.tensor([33]), last_only=True)[-1]
        # llama.cpp keeps K/V in float16: values computed in a tree batch may round to another f16 than in
        # a fresh run (~4e-4 in the logits here); a wrong cache is off by more than 1e-2 (the control below).
        torch.testing.assert_close(next_logits, fresh_logits(target_llama, kept + [33]), atol=2e-3, rtol=1e-3)


def test_a_wrong_keep_is_caught_by_the_same_check(target_llama):
    """Negative control: a keep that follows the wrong branch (the sibling's leaf sequence) caches
    [7, 3] instead of the accepted [7, 5], and the next-logits comparison above fails for it."""
    prefix = [4, 8, 15, 16, 23]
    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9]), parents=(-1, 0, 0, 2))

    def next_logits_after_keep(break_it: bool) -> torch.Tensor:
        target_llama.reset()
        target_llama.forward(torch.tensor(prefix))
        target_llama.forward(tree.tokens, target_llama.cache_len + tree.depth_tensor(), tree.ancestor_mask())
        if break_it:
            target_llama._tree.sequence[2] = target_llama._tree.sequence[1]  # the bug: node 1's branch for node 2
        target_llama.keep([0, 2])
        return target_llama.forward(torch.tensor([33]), last_only=True)[-1]

    right = fresh_logits(target_llama, prefix + [7, 5, 33])
    torch.testing.assert_close(next_logits_after_keep(False), right, atol=2e-3, rtol=1e-3)
    assert (next_logits_after_keep(True) - right).abs().max() > 1e-2


def test_keep_refuses_what_is_not_a_path(target_llama):
    tree = TokenTree(tokens=torch.tensor([7, 3, 5, 9]), parents=(-1, 0, 0, 1))
    target_llama.reset()
    target_llama.forward(torch.tensor([1, 2, 3]))
    target_llama.forward(tree.tokens, 3 + tree.depth_tensor(), tree.ancestor_mask())
    for bad in ([0, 2, 1], [1, 3], [0, 2, 3], [0, 4]):
        with pytest.raises(ValueError):
            target_llama.keep(bad)


def test_crop_then_continue_equals_a_fresh_run(target_llama):
    target_llama.reset()
    target_llama.forward(torch.tensor([5, 6, 7, 8, 9, 10]))
    target_llama.crop(3)
    assert target_llama.cache_len == 3
    after = target_llama.forward(torch.tensor([11]), last_only=True)[-1]
    torch.testing.assert_close(after, fresh_logits(target_llama, [5, 6, 7, 11]), atol=2e-3, rtol=1e-3)


def test_a_tree_with_more_leaves_than_sequences_is_refused(gguf_files):
    few = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=128, batch=64, sequences=4, threads=1))
    star = TokenTree(tokens=torch.arange(2, 9), parents=(-1, 0, 0, 0, 0, 0, 0))  # 6 leaves, 3 sequences free
    few.forward(torch.tensor([1, 2]))
    with pytest.raises(DuospecError, match="sequences"):
        few.forward(star.tokens, 2 + star.depth_tensor(), star.ancestor_mask())


# -- methods through the engine ---------------------------------------------------------------------
@pytest.mark.parametrize("draft_kind", ["same", "perturbed", "random"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_sd_on_llama_cpp_equals_ar_on_llama_cpp(gguf_files, draft_kind, gamma):
    pipe = llama_pipeline(gguf_files["same"], gguf_files[draft_kind])
    for prompt in PROMPTS:
        ar = pipe.generate(prompt, method="ar", max_new_tokens=20)
        sd = pipe.generate(prompt, method="sd", max_new_tokens=20, gamma=gamma)
        pld = pipe.generate(prompt, method="pld", max_new_tokens=20, gamma=gamma)
        assert sd.token_ids == ar.token_ids, f"{draft_kind} gamma={gamma} prompt={prompt!r}"
        assert pld.token_ids == ar.token_ids
        if draft_kind == "same":
            assert sd.stats.acceptance_rate == 1.0
        if draft_kind == "random":
            assert sd.stats.acceptance_rate < 0.5


def test_both_backends_give_the_same_greedy_answers(gguf_files, target_hf):
    """float32 weights in both: ar on llama.cpp equals ar on transformers, token for token."""
    llama = llama_pipeline(gguf_files["same"])
    hf = Pipeline(HFModel(target_hf), tiny_tokenizer(), device=torch.device("cpu"), dtype=torch.float32, threads=1)
    for prompt in PROMPTS:
        assert llama.generate(prompt, method="ar", max_new_tokens=20).token_ids == hf.generate(prompt, method="ar", max_new_tokens=20).token_ids


@pytest.mark.parametrize("mix", ["llama-draft-hf-target", "hf-draft-llama-target"])
def test_mixed_backends_stay_exact(gguf_files, target_hf, mix):
    draft_hf = perturbed(target_hf, noise=0.2, seed=7)
    if mix == "llama-draft-hf-target":
        pipe = Pipeline(HFModel(target_hf), tiny_tokenizer(), device=torch.device("cpu"), dtype=torch.float32, threads=1)
        pipe.attach_draft(LlamaCppModel(gguf_files["perturbed"], SETTINGS))
    else:
        pipe = llama_pipeline(gguf_files["same"], draft_model=HFModel(draft_hf))
    for prompt in PROMPTS:
        ar = pipe.generate(prompt, method="ar", max_new_tokens=20)
        sd = pipe.generate(prompt, method="sd", max_new_tokens=20, gamma=4)
        assert sd.token_ids == ar.token_ids
        assert 0 < sd.stats.acceptance_rate < 1


def test_sampled_sd_on_llama_cpp_repeats_with_a_seed(gguf_files):
    pipe = llama_pipeline(gguf_files["same"], gguf_files["perturbed"])
    first = pipe.generate("w1 w2", method="sd", max_new_tokens=16, temperature=0.9, seed=3, gamma=3)
    again = pipe.generate("w1 w2", method="sd", max_new_tokens=16, temperature=0.9, seed=3, gamma=3)
    assert first.token_ids == again.token_ids


# -- loading and bad input --------------------------------------------------------------------------
def test_load_model_reads_tokenizer_and_stop_tokens_from_the_gguf(gguf_files):
    loaded = load_model(str(gguf_files["same"]), LoadOptions(backend="llama.cpp", device=torch.device("cpu"), dtype=torch.float32, threads=1))
    reference = tiny_tokenizer()
    text = "w1 w2 w33 hello"
    assert loaded.tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert EOS_ID in loaded.eos_ids
    assert loaded.model.vocab_size == 64
    assert loaded.cost_identity[0] == "llama.cpp"


def test_truncated_gguf_is_a_clear_error(gguf_files, tmp_path):
    data = gguf_files["same"].read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(DuospecError, match="truncated or damaged"):
        LlamaCppModel(broken, SETTINGS)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(DuospecError, match="not a GGUF file"):
        LlamaCppModel(fake, SETTINGS)


def test_a_prompt_longer_than_the_context_is_refused(gguf_files):
    small = LlamaCppModel(gguf_files["same"], LlamaCppSettings(context=32, batch=32, sequences=2, threads=1))
    assert small.max_context >= 32  # llama.cpp may round the context up; the limit is what it allocated
    with pytest.raises(DuospecError, match="context"):
        small.forward(torch.arange(small.max_context + 5) % 60 + 2)
    assert small.cache_len == 0  # nothing was decoded


def test_a_gguf_draft_with_another_vocabulary_is_refused(tmp_path, gguf_files):
    other = write_gguf(tiny_model(seed=2, vocab_size=48), tmp_path / "other.gguf")
    import duospec

    pipe = duospec.load(str(gguf_files["same"]), str(other), backend="llama.cpp", threads=1, progress=False)
    with pytest.raises(DuospecError, match="do not share a tokenizer"):
        pipe.generate("w1 w2", method="sd", max_new_tokens=4)


# -- the command line ---------------------------------------------------------------------------------
def test_generate_with_gguf_files_picks_llama_cpp_and_prints_no_warnings(gguf_files, capsys):
    from duospec.cli import main

    outputs = {}
    for method in ("ar", "sd", "pld"):
        code = main(["generate", "w1 w2 w3", "--method", method, "--max-new-tokens", "12", "--json", "--threads", "1",
                     "--target", str(gguf_files["same"]), "--draft", str(gguf_files["perturbed"])])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "target on llama.cpp, draft on llama.cpp (--backend auto)" in captured.err
        assert "warn" not in captured.err.lower(), captured.err
        outputs[method] = json.loads(captured.out)
    assert outputs["sd"]["token_ids"] == outputs["ar"]["token_ids"] == outputs["pld"]["token_ids"]
    assert outputs["ar"]["new_tokens"] == 12


def test_llama_cpp_backend_refuses_a_transformers_checkpoint(tmp_path, capsys):
    from duospec.cli import main

    tiny_model(seed=0).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    code = main(["generate", "w1", "--backend", "llama.cpp", "--target", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "needs a GGUF model" in err and "Traceback" not in err


# -- sampling keeps the target's law through this backend -------------------------------------------
@pytest.mark.parametrize("method", ["sd", "pld"])
def test_sampled_methods_on_llama_cpp_follow_the_target_law(tmp_path, method):
    """The chi-square check of test_sampling_e2e, with target and draft on llama.cpp: new tokens 2 and 3
    of 2,000 seeded generations against the exact law (enumerated with the same float32 weights)."""
    from test_sampling_e2e import PROMPT, SAMPLES, VOCAB, exact_two_token_law, goodness_of_fit

    from duospec.budget.policy import GammaPolicy
    from duospec.config import GenerationRequest, SamplingConfig
    from duospec.drafting.chain import ChainDrafter
    from duospec.drafting.lookup import LookupDrafter
    from duospec.engines.in_process import InProcessSource
    from duospec.engines.rounds import generate_tokens
    from duospec.stats import GenerationStats

    target = tiny_model(seed=11, vocab_size=VOCAB)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)  # as in test_sampling_e2e: every token keeps real mass
    settings = LlamaCppSettings(context=64, batch=16, sequences=2, threads=1)
    target_llama = LlamaCppModel(write_gguf(target, tmp_path / "t.gguf"), settings)
    draft_llama = LlamaCppModel(write_gguf(perturbed(target, noise=0.3, seed=5), tmp_path / "d.gguf"), settings)
    sampling = SamplingConfig(temperature=1.0)
    counts = torch.zeros(VOCAB, VOCAB)
    for seed in range(SAMPLES):
        drafter = ChainDrafter(draft_llama, VOCAB) if method == "sd" else LookupDrafter()
        request = GenerationRequest(method=method, max_new_tokens=4, sampling=SamplingConfig(temperature=1.0, seed=seed))
        stats = GenerationStats(method, len(PROMPT))
        tokens = [t for chunk in generate_tokens(target_llama, InProcessSource(drafter, GammaPolicy(None, fixed_gamma=2)), PROMPT, request, frozenset(), stats) for t in chunk]
        counts[tokens[1], tokens[2]] += 1
    assert goodness_of_fit(counts, exact_two_token_law(target, sampling)) > 1e-4


def test_an_architecture_llama_cpp_does_not_know_is_a_clear_error(tmp_path, target_hf):
    """A GGUF whose architecture this llama.cpp build cannot run fails with a message, not a crash."""
    import gguf

    path = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", target_hf.model.embed_tokens.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DuospecError, match="architecture is not supported"):
        LlamaCppModel(path, SETTINGS)


def test_near_tie_rescoring_on_llama_cpp_follows_ar(gguf_files):
    """On llama.cpp the bench re-scores a divergence as `ar` decodes (prompt pass, then one token per
    pass), because llama.cpp's logits depend on how its cache was filled; the margin is ar's own gap."""
    from duospec.bench.ties import divergence

    pipe = llama_pipeline(gguf_files["same"])
    ids = pipe.encode("w1 w2 w3")
    answer = pipe.generate(ids, method="ar", max_new_tokens=6).token_ids
    other = [*answer[:3], (answer[3] + 1) % 60 + 2, *answer[4:]]
    verdict = divergence(pipe, ids, answer, other)
    target = pipe.target
    target.reset()
    logits = target.forward(torch.tensor(ids), last_only=True)[-1]
    for token in answer[:3]:
        logits = target.forward(torch.tensor([token]), last_only=True)[-1]
    assert verdict.position == 3
    assert verdict.margin == pytest.approx(abs(float(logits[answer[3]] - logits[other[3]])), abs=1e-6)
