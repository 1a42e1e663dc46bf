"""The transformers library's own speculative generation, run as baselines on the same loaded models.

A user who does not pick duospec would call `model.generate(...)` (plain generation, "hf-ar"),
`model.generate(..., assistant_model=draft)` (assisted generation) or `model.generate(..., prompt_lookup_num_tokens=10)` (prompt lookup decoding). We run
exactly that, with the library's defaults for everything we do not have to fix, on the same
checkpoints, dtype and threads our methods use (the same target object where the pipeline runs the
target on transformers; a transformers copy of it where the pipeline runs llama.cpp), and measure it the same way. The assistant is
the draft as transformers loads it: where duospec stores its own draft's weights as int8 (a duospec
optimisation), the baseline gets a plain copy in the requested dtype.

What we must fix, and why: hub generation configs often carry sampling defaults (Qwen's sets
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1) that `generate` applies unless told
otherwise; our methods apply only the flags the bench passes, so the baselines get the same flags
explicitly and a neutral repetition penalty. Stop tokens are the pipeline's, so both stop alike.

Statistics come from the library's own hooks, not from its internals: transformers hands the
streamer the prompt once and then, once per target pass, the tokens that pass emitted; forward hooks
on the target count passes, their input lengths (drafted tokens) and time, and hooks on the assistant
time the draft. Prompt lookup's n-gram search and the library's bookkeeping land in "other".
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import torch

from duospec.bench.baseline_models import baseline_models
from duospec.bench.settings import BenchMethod, DecodeSettings
from duospec.stats import GenerationStats

if TYPE_CHECKING:
    from duospec.api import GenerationResult, Pipeline

PROMPT_LOOKUP_TOKENS = 10  # transformers' documented example value for prompt_lookup_num_tokens


class _PassRecorder:
    """Streamer plus forward hooks that fill a GenerationStats during one `generate` call.

    transformers only calls a streamer's `put` and `end`, so no subclass of its BaseStreamer is needed
    (and importing it would slow down every `duospec` command's start-up).
    """

    def __init__(self, stats: GenerationStats) -> None:
        self.stats = stats
        self._prompt_seen = False
        self._pass_start = 0.0
        self._draft_start = 0.0

    # -- streamer: the prompt first, then the tokens of each target pass -------------------------
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if not self.stats.tokens_per_pass:
            self.stats.mark_first_token()
        self.stats.tokens_per_pass.append(int(value.numel()))

    def end(self) -> None:
        """Nothing to flush: every count is taken in `put` and the hooks."""

    # -- forward hooks ---------------------------------------------------------------------------
    def before_target(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        # The first pass reads the whole prompt, later ones the last emitted token; the rest are drafts.
        already_known = self.stats.prompt_tokens if self.stats.target_passes == 0 else 1
        self.stats.drafted_tokens += int(input_ids.shape[-1]) - already_known
        self._pass_start = time.perf_counter()

    def after_target(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        elapsed = time.perf_counter() - self._pass_start
        if self.stats.target_passes == 0:
            self.stats.prefill_seconds += elapsed
        else:
            self.stats.target_seconds += elapsed
        self.stats.target_passes += 1

    def before_draft(self, module: torch.nn.Module, args: tuple) -> None:
        self._draft_start = time.perf_counter()

    def after_draft(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.stats.draft_seconds += time.perf_counter() - self._draft_start


def _generate_hf(name: str, pipe: "Pipeline", prompt_ids: list[int], settings: DecodeSettings) -> "GenerationResult":
    """One answer from transformers' `generate`: plain ("hf-ar"), assisted ("hf-assisted") or prompt lookup ("hf-pld")."""
    from duospec.api import GenerationResult

    models = baseline_models(pipe)
    model = models.transformers_target()
    # The draft as transformers loads it: duospec's int8 draft weights are duospec's, not the library's.
    assistant = models.plain_draft() if name == "hf-assisted" else None
    if assistant is not None:
        mode = {"assistant_model": assistant}
    elif name == "hf-pld":
        mode = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}
    else:
        mode = {}  # hf-ar: the library's plain greedy / sampling loop
    input_ids = torch.tensor([prompt_ids], device=pipe.device)
    stats = GenerationStats(method=name, prompt_tokens=len(prompt_ids), gamma_auto=False)
    recorder = _PassRecorder(stats)
    hooks = [
        model.register_forward_pre_hook(recorder.before_target, with_kwargs=True),
        model.register_forward_hook(recorder.after_target, with_kwargs=True),
    ]
    if assistant is not None:
        hooks += [assistant.register_forward_pre_hook(recorder.before_draft), assistant.register_forward_hook(recorder.after_draft)]
    eos = sorted(pipe.eos_ids)
    pad = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else eos[0]
    try:
        # transformers samples from the global RNG: seed a forked copy so the caller's state is untouched.
        with torch.random.fork_rng(devices=[pipe.device] if pipe.device.type == "cuda" else []):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                repetition_penalty=1.0,
                streamer=recorder,
                **_sampling_options(settings),
                **mode,
            )
    finally:
        for hook in hooks:
            hook.remove()
    token_ids = output[0, len(prompt_ids) :].tolist()
    stats.new_tokens = len(token_ids)
    # Each pass emits its accepted drafts plus one token of the target's own (a cut last pass aside).
    stats.accepted_tokens = sum(n - 1 for n in stats.tokens_per_pass)
    stats.finish("eos" if token_ids and token_ids[-1] in pipe.eos_ids else "length")
    text = pipe.tokenizer.decode(token_ids, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=token_ids, prompt_tokens=len(prompt_ids), stats=stats)


def _sampling_options(settings: DecodeSettings) -> dict:
    if settings.temperature == 0:
        # Neutral values override a hub config's sampling defaults (which greedy search would only warn about).
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}


def _baseline(name: str, summary: str, needs_draft_model: bool) -> BenchMethod:
    return BenchMethod(name, summary, needs_draft_model, partial(_generate_hf, name))


BASELINES: dict[str, BenchMethod] = {
    method.name: method
    for method in (
        _baseline("hf-ar", "transformers' own plain generation of the target (model.generate, no assistance)", False),
        _baseline("hf-assisted", "transformers assisted generation (assistant_model = the draft), library defaults", True),
        _baseline("hf-pld", f"transformers prompt lookup decoding (prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS})", False),
    )
}
