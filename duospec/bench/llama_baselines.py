"""llama-cpp-python's own generation, run as baselines on the same GGUF file: what a CPU user runs instead.

`llama-ar` is the library's plain `Llama.generate`; `llama-pld` is the same with its prompt-lookup
draft (`LlamaPromptLookupDecoding(num_pred_tokens=10)`, the library's documented example). Both get
the sampling flags the bench passes and neutral values for the rest (no repetition penalty, no
min-p), the same threads and the same stop tokens as our methods. A cold answer is a fresh sequence
(`reset()` first: `generate` would otherwise reuse the cache of a prefix shared with the previous
answer), so the whole prompt is processed inside the timed call, as ours is. A warm answer (a `--warm`
run's later turns) keeps it: the library's own prefix match then skips what the earlier turn cached,
as our methods skip it, so the comparison stays fair.

Target passes are counted by wrapping the `Llama.eval` call that `generate` makes once per pass.
The prompt-lookup mode needs `logits_all=True`: without it the library indexes logits it did not
keep and crashes on prompts longer than its batch.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from duospec.bench.baseline_models import baseline_models
from duospec.bench.settings import BenchMethod, DecodeSettings
from duospec.config import DuospecError
from duospec.stats import GenerationStats

if TYPE_CHECKING:
    from duospec.api import GenerationResult, Pipeline

PROMPT_LOOKUP_TOKENS = 10  # llama-cpp-python's documented example value (num_pred_tokens)


def _llama(pipe: "Pipeline", name: str):
    """The library's `Llama` object for a baseline, built once per pipeline and method."""
    cache = pipe.__dict__.setdefault("_llama_baselines", {})
    if name in cache:
        return cache[name]
    from duospec.models.llamacpp import DEFAULT_BATCH, import_llama_cpp

    llama_cpp = import_llama_cpp()
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    path = baseline_models(pipe).gguf_path()
    context = pipe.target.max_context or 4096
    lookup = name == "llama-pld"
    cache[name] = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=min(context, 4096),
        n_batch=DEFAULT_BATCH,
        n_threads=pipe.threads,
        n_threads_batch=pipe.threads,
        logits_all=lookup,
        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_TOKENS) if lookup else None,
        verbose=False,
    )
    return cache[name]


def _generate_llama(name: str, pipe: "Pipeline", prompt_ids: list[int], settings: DecodeSettings) -> "GenerationResult":
    from duospec.api import GenerationResult

    llm = _llama(pipe, name)
    stats = GenerationStats(method=name, prompt_tokens=len(prompt_ids), gamma_auto=False)
    evaluate = type(llm).eval
    passes: list[int] = []

    def counting_eval(tokens) -> None:  # one call per target pass: the prompt, then the last token + drafts
        passes.append(len(tokens))
        evaluate(llm, tokens)

    llm.eval = counting_eval
    if settings.seed is not None:
        llm.set_seed(settings.seed)
    # generate() would reuse the cache of a prefix shared with the previous answer (the chat template's
    # system prompt): a cold answer forgets it, so the whole prompt is processed inside the timed call,
    # as ours is; a warm one keeps it, as ours keep theirs.
    if not settings.warm:
        llm.reset()
    options = dict(temp=0.0, top_k=1) if settings.temperature == 0 else dict(temp=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    token_ids: list[int] = []
    try:
        for token in llm.generate(prompt_ids, min_p=0.0, typical_p=1.0, repeat_penalty=1.0, reset=True, **{"top_p": 1.0, **options}):
            if not token_ids:
                stats.mark_first_token()
            token_ids.append(int(token))
            if token in pipe.eos_ids or len(token_ids) >= settings.max_new_tokens:
                break
    finally:
        del llm.eval
    stats.new_tokens = len(token_ids)
    stats.reused_prompt_tokens = len(prompt_ids) - passes[0] if passes else 0  # the first pass runs what was not cached
    stats.target_passes = len(passes)
    stats.drafted_tokens = sum(n - 1 for n in passes[1:])
    stats.accepted_tokens = max(0, len(token_ids) - len(passes))
    stats.finish("eos" if token_ids and token_ids[-1] in pipe.eos_ids else "length")
    text = pipe.tokenizer.decode(token_ids, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=token_ids, prompt_tokens=len(prompt_ids), stats=stats)


def _baseline(name: str, summary: str) -> BenchMethod:
    return BenchMethod(name, summary, False, partial(_generate_llama, name))


LLAMA_BASELINES: dict[str, BenchMethod] = {
    method.name: method
    for method in (
        _baseline("llama-ar", "llama-cpp-python's own plain generation of the target GGUF (Llama.generate)"),
        _baseline("llama-pld", f"llama-cpp-python's own prompt lookup decoding (num_pred_tokens={PROMPT_LOOKUP_TOKENS})"),
    )
}


def require_gguf(pipe: "Pipeline") -> None:
    """Fail before a run when the target has no GGUF file for the llama.cpp baselines."""
    try:
        baseline_models(pipe).gguf_path()
    except DuospecError as error:
        raise DuospecError(f"the llama-ar / llama-pld baselines need the target as GGUF: {error}") from error
