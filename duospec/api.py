"""The Python API: load a target (and, when a method needs one, a draft) once; generate many times.

    import duospec
    pipe = duospec.load(progress=False)        # the embedded default pair, no hub needed
    out = pipe.generate("Write a haiku about caches.", max_new_tokens=64)   # method="auto"
    print(out.text)
    print(out.stats.generation_tokens_per_second, out.stats.mean_accepted)
    stream = pipe.stream("Explain KV caches.", method="suffix")
    for chunk in stream:
        print(chunk.text, end="", flush=True)
    print()
    print(stream.result.stats.mean_accepted)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from duospec.budget.book import CostBook, Notes
from duospec.config import DRAFT_QUANTIZATIONS, DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting import method_spec
from duospec.drafting.suffix import DEFAULT_HISTORY_TOKENS, SuffixHistory, check_history_options
from duospec.engines.start import duo_draft, start
from duospec.models.base import Model
from duospec.models.hf import resolve_device, resolve_dtype
from duospec.models.int8 import int8_kernel_available
from duospec.models.loading import LoadedModel, LoadOptions, check_source_exists, hf_eos_ids, load_model, resolve_backend
from duospec.stats import GenerationStats


@dataclass
class GenerationResult:
    """One answer: its text, its token ids (EOS included, as transformers returns them) and stats."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, **self.stats.to_dict()}


@dataclass
class StreamChunk:
    """Tokens accepted in one round and the text they complete."""

    text: str
    token_ids: list[int]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; `.result` holds everything generated up to that moment."""

    def __init__(self, result: GenerationResult) -> None:
        super().__init__("generation interrupted")
        self.result = result


class _TextAssembler:
    """Incremental detokenisation that decodes a small window per round, not the whole answer.

    Decoding a suffix alone can lose a leading space (SentencePiece) or split a multi-byte character,
    so each round decodes tokens from `_prefix` (a few already shown tokens, for context) and emits
    what lies past the text of the already shown part of that window; a tail ending in U+FFFD (an
    unfinished character) waits for the next tokens. The same scheme serves vLLM and TGI.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix = 0  # window start
        self._shown = 0  # tokens whose text has been emitted

    def push(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        shown_text = self._decode(self._prefix, self._shown)
        window_text = self._decode(self._prefix, len(self.token_ids))
        if window_text.endswith("\ufffd") or len(window_text) <= len(shown_text):
            return ""
        self._prefix, self._shown = self._shown, len(self.token_ids)
        return window_text[len(shown_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        shown_text = self._decode(self._prefix, self._shown)
        window_text = self._decode(self._prefix, len(self.token_ids))
        self._prefix = self._shown = len(self.token_ids)
        return window_text[len(shown_text) :]

    def text(self) -> str:
        """The whole answer's text, decoded once."""
        return self._decode(0, len(self.token_ids))

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)


class GenerationStream:
    """Iterate for StreamChunks; afterwards (or after Ctrl-C or an error) `.result` holds the answer so far.

    Only the newest stream of a Pipeline may advance: its models hold one KV cache each, so a stream
    that was overtaken by a newer one raises a DuospecError instead of reading a cache that is not its.
    """

    def __init__(
        self, pipeline: "Pipeline", chunks: Iterator[list[int]], assembler: _TextAssembler, prompt_tokens: int, stats: GenerationStats, prompt_ids: list[int] | None = None
    ):
        self._pipeline = pipeline
        self._prompt_ids = prompt_ids  # what the suffix history learns once the answer is over
        self._chunks = chunks
        self._assembler = assembler
        self._prompt_tokens = prompt_tokens
        self._stats = stats
        self.result: GenerationResult | None = None
        self._load_watch = pipeline.costs.probe.start()  # whether this request ran under visible load

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            for token_ids in self._chunks:
                yield StreamChunk(self._assembler.push(token_ids), token_ids)
                if self._pipeline._active_stream is not self:
                    raise DuospecError("a newer generation started on this Pipeline while this stream was open; finish or drop a stream before starting the next one")
        except KeyboardInterrupt as interrupt:
            self.stop("interrupted")
            raise GenerationInterrupted(self.result) from interrupt
        except BaseException:
            self.stop("error")
            raise
        tail = self._assembler.flush()
        self._finalise()
        if tail:
            yield StreamChunk(tail, [])

    @property
    def token_ids(self) -> list[int]:
        """Every token accepted so far (a live view; copy it to keep it)."""
        return self._assembler.token_ids

    def stop(self, reason: str) -> GenerationResult:
        """End early (Ctrl-C in the caller's own code, an error) and keep everything generated so far."""
        if self.result is None:
            if not self._stats.finish_reason:
                self._stats.finish(reason)
            self._finalise()
            close = getattr(self._chunks, "close", None)
            if close is not None:
                try:
                    close()  # an engine's cleanup (thread placement, a draft process's drafting) runs now
                except ValueError:  # "generator already executing": it is unwinding on its own
                    pass
        return self.result

    def _finalise(self) -> None:
        self.result = GenerationResult(
            text=self._assembler.text(),
            token_ids=list(self._assembler.token_ids),
            prompt_tokens=self._prompt_tokens,
            stats=self._stats,
        )
        # The request is over: its real pass times may correct the figures for the next request, and
        # its text joins the suffix history (a later request that repeats it drafts from it).
        if self._prompt_ids is not None:
            self._pipeline.remember(self._prompt_ids, self.result.token_ids)
        self._pipeline.costs.reconcile(self._pipeline.costs.probe.stop(self._load_watch, self._pipeline.target))


class Pipeline:
    """A loaded target, its tokenizer and (on demand) a draft model; answers generate/stream calls.

    Backend-neutral: the target and the draft are `Model`s (transformers or llama.cpp, each its own),
    the tokenizer is a transformers tokenizer on both backends (same ids for the same text).
    """

    joint = None  # models/joint.py's JointPasses where this pipeline is one lane of a batch (batching.py)

    def __init__(
        self,
        target: Model,
        tokenizer,
        *,
        draft_source: str | None = None,
        draft_quantization: str = "none",
        device: torch.device,
        dtype: torch.dtype,
        threads: int,
        backend: str = "transformers",
        draft_options: LoadOptions | None = None,
        eos_ids: frozenset[int] | None = None,
        cost_identity: list[str] | None = None,
        target_source: str | None = None,
        progress: bool = True,
        suffix_history_tokens: int = DEFAULT_HISTORY_TOKENS,
        suffix_scope: str = "shared",
        prefix_cache: bool = True,
    ) -> None:
        check_history_options(suffix_history_tokens, suffix_scope)
        self.target = target
        self.target_source = target_source or target.name  # what loaded it: embedded name, path or hub id
        self.tokenizer = tokenizer
        self.draft_source = draft_source
        self.draft_quantization = draft_quantization  # "int8" or "none", already resolved for this device
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.backend = backend  # the target's backend
        self.draft_options = draft_options  # how the draft is loaded (backend, threads, ...)
        self.progress = progress
        self.draft_label = draft_label(draft_source, draft_quantization, self.draft_backend)  # what the draft's measurements depend on
        self._draft: Model | None = None
        self._draft_identity: list[str] | None = None
        self._active_stream: GenerationStream | None = None  # the one stream whose caches the models hold
        self._draft_attached = False  # a draft handed over in memory (attach_draft), not loaded from a source
        self._duo = None  # DuoRuntime: the draft process of `duo` requests, started on first use
        # The measured costs every budget is built from (budget/book.py); --verbose prints their diagnostics.
        labels = (f"target ({backend})", f"draft ({self.draft_backend})")
        self.costs = CostBook(target, cost_identity, lambda: (self.draft, self._draft_identity), Notes(progress), labels)
        self._default_mode_costs: CostBook | None = None  # the default mode's own figures (default_mode)
        self.auto_alpha = 0.8  # acceptance `auto` expects of the draft model, learned across requests
        # Each model's KV cache outlives its request; the next request reuses the prefix it shares
        # (models/prefix.py). False: every request starts from empty caches (forget_prefixes).
        self.prefix_cache = prefix_cache
        # Earlier requests' tokens, which suffix decoding drafts from ("shared"); "request" keeps none,
        # so one request's text never shapes another's drafts (or their timing).
        self.suffix_scope = suffix_scope
        self.suffix_history = SuffixHistory(suffix_history_tokens)
        self.eos_ids = eos_ids if eos_ids is not None else hf_eos_ids(target, tokenizer)

    # -- models ---------------------------------------------------------------------------------
    @property
    def draft_backend(self) -> str:
        return self.draft_options.backend if self.draft_options is not None else self.backend

    @property
    def verbose(self) -> bool:
        """Whether budget choices, measured costs and their corrections are printed (--verbose)."""
        return self.costs.notes.verbose

    @verbose.setter
    def verbose(self, value: bool) -> None:
        self.costs.notes.verbose = value

    @property
    def deterministic(self) -> bool:
        """Whether the target runs in deterministic mode (models/deterministic.py)."""
        return self.target.deterministic

    @contextmanager
    def default_mode(self) -> Iterator[None]:
        """The target with deterministic mode switched off, and the default mode's own cost figures
        (kept apart: a row-wise pass costs more, so the budgets must not mix them); both restored after.
        `duospec bench --deterministic` answers its `<method>@default` rows inside this."""
        if not self.deterministic:
            yield
            return
        if self._default_mode_costs is None:
            self._default_mode_costs = self.costs.without_mode("deterministic")
        deterministic_costs = self.costs
        self._use_costs(self._default_mode_costs)
        self.target.set_deterministic(False)
        try:
            yield
        finally:
            self._default_mode_costs = self.costs
            self._use_costs(deterministic_costs)
            self.target.set_deterministic(True)

    def _use_costs(self, book: CostBook) -> None:
        self.costs = book
        if self._duo is not None:
            self._duo.book = book  # the duo runtime measures with the mode's book too (its keys follow the mode)

    @property
    def attached_draft(self) -> Model | None:
        """The draft handed over in memory (attach_draft), or None where it loads from its source."""
        return self._draft if self._draft_attached else None

    @property
    def has_draft(self) -> bool:
        """Whether a draft model is available (named by its source, or attached in memory)."""
        return self.draft_source is not None or self._draft is not None

    @property
    def draft(self) -> Model:
        """The draft model, loaded on first use (methods without a draft never pay for it)."""
        if self._draft is None:
            loaded = self.load_draft(self.draft_load_options(), name=self.draft_label)
            self._draft, self._draft_identity = loaded.model, loaded.cost_identity
        return self._draft

    def draft_load_options(self, quantization: str | None = None) -> LoadOptions:
        """How the draft loads: its own options (or the target's backend), with the given or the
        pipeline's weight quantisation (which only transformers drafts use)."""
        options = self.draft_options or LoadOptions(backend=self.backend, device=self.device, dtype=self.dtype)
        if quantization is None and options.backend == "transformers":
            quantization = self.draft_quantization
        return options if quantization is None else replace(options, quantization=quantization)

    def load_draft(self, options: LoadOptions, name: str | None) -> LoadedModel:
        """The draft on its backend, once its vocabulary is checked against the target's."""
        if self.draft_source is None:
            raise DuospecError("this method needs a draft model; pass --draft (or draft=...) with a model that shares the target's tokenizer")
        loaded = load_model(self.draft_source, options, name=name, progress=self.progress)
        check_same_vocabulary(self.tokenizer, loaded.tokenizer, self.target.name, self.draft_source)
        return loaded

    def attach_draft(self, model: Model) -> None:
        """Use an already loaded draft model (tests, notebooks). It must share the target's tokenizer."""
        self._draft = model
        self._draft_identity = None
        self.costs.forget_draft()
        self._default_mode_costs = None  # measured with the old draft
        self._draft_attached = True
        if self._duo is not None:
            self._duo.close()
            self._duo = None

    # -- suffix history -------------------------------------------------------------------------
    def remember(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        """Add a finished request (prompt and answer) to the suffix history, when it is shared."""
        if self.suffix_scope == "shared":
            self.suffix_history.add([*prompt_ids, *answer_ids])

    # -- prefix cache ---------------------------------------------------------------------------
    def forget_prefixes(self) -> None:
        """Make the next request start from empty caches (target, draft, duo's draft process), as if
        nothing had run before: the bench's cold answers, and every request with prefix_cache off.
        Costs nothing now; the next request resets each cache it uses, inside its own time."""
        from duospec.models import prefix

        prefix.forget(self.target)
        if self._draft is not None:
            prefix.forget(self._draft)
        if self._duo is not None:
            self._duo.cold = True  # its draft process resets at its next sequence

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt; the chat template is applied when the tokenizer has one (unless chat=False).

        prompt: text (one user turn), token ids, or chat messages [{"role": ..., "content": ...}, ...]
        (a multi-turn conversation; the chat template is required then).
        """
        return encode_prompt(self.tokenizer, self.target.vocab_size, prompt, chat)

    # -- generation -----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int] | list[dict],
        method: str = "auto",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        gamma: int | None = None,
        lenience: float = 1.0,
        chat: bool | None = None,
        tree_budget: int | None = None,
        tree_depth: int | None = None,
    ) -> GenerationStream:
        """Start a generation whose accepted tokens arrive round by round.

        tree_budget / tree_depth (specexec): draft nodes per tree and the tree's depth cap; by default
        the budget is chosen each round from measured costs and acceptance (budget/tree.py).
        """
        spec = method_spec(method)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        request = GenerationRequest(
            method=method, max_new_tokens=max_new_tokens, sampling=sampling, gamma=gamma, lenience=lenience, tree_budget=tree_budget, tree_depth=tree_depth
        )
        prompt_ids = self.encode(prompt, chat)
        limit = self.target.max_context
        if limit is not None and len(prompt_ids) >= limit:
            raise DuospecError(
                f"the prompt has {len(prompt_ids)} tokens but the target's context holds {limit}; shorten the prompt"
            )
        if not self.prefix_cache:
            self.forget_prefixes()
        chunks, stats = start(self, spec, prompt_ids, request)
        stream = GenerationStream(self, chunks, _TextAssembler(self.tokenizer), len(prompt_ids), stats, prompt_ids)
        self._active_stream = stream
        return stream

    def duo_runtime(self):
        """The draft process, thread split and costs of `duo` requests (set up on first use)."""
        if self.joint is not None:
            raise DuospecError("duo runs one request at a time with its own draft process, and this server batches requests; send another method (auto), or serve with --max-batch 1")
        if self._duo is None:
            from duospec.engines.duo_runtime import DuoRuntime

            self._duo = DuoRuntime(self.target, self.eos_ids, self.costs, duo_draft(self))
        return self._duo

    def close(self) -> None:
        """Stop the draft process, if one runs (also done at exit). The pipeline stays usable."""
        if self._duo is not None:
            self._duo.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | list[int] | list[dict], **options) -> GenerationResult:
        """Generate a whole answer (same options as `stream`). Ctrl-C raises GenerationInterrupted
        carrying the partial result."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


def encode_prompt(tokenizer, vocab_size: int, prompt: str | list[int] | list[dict], chat: bool | None = None) -> list[int]:
    """Pipeline.encode with a given tokenizer (the server encodes with its own copy, beside the
    generating thread: a transformers tokenizer is not safe to share between threads)."""
    if isinstance(prompt, list) and not prompt:
        raise DuospecError("the prompt is empty; give text, token ids or chat messages")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return _encode_messages(tokenizer, prompt)
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt):
            raise DuospecError(f"a token-id prompt must be a list of ints in [0, {vocab_size})")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DuospecError("the prompt is empty; give some text (or '-' to read it from standard input)")
    use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        return _encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def _encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DuospecError("this tokenizer has no chat template; pass --no-chat (chat=False) with a text prompt")
    if not all(isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise DuospecError("chat messages need a 'role' and a string 'content' each")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load(
    target: str | None = None,
    draft: str | None = None,
    *,
    backend: str = "auto",
    draft_backend: str | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    threads: int | None = None,
    draft_threads: int | None = None,
    draft_quantization: str = "auto",
    context: int | None = None,
    attn_implementation: str = "sdpa",
    progress: bool = True,
    offload: bool = False,
    deterministic: bool = False,
    suffix_history_tokens: int = DEFAULT_HISTORY_TOKENS,
    suffix_scope: str = "shared",
    prefix_cache: bool = True,
) -> Pipeline:
    """Load a target model (default: the embedded Qwen2.5-Coder-1.5B-Instruct) and note the draft.

    target/draft: an embedded model name, a .gguf file, a local transformers directory or a hub id; the
    draft (default: the embedded 0.5B with the default target) loads on first use by a method that
    needs it. backend/draft_backend: "auto" (llama.cpp on CPUs where it is installed and the model is
    GGUF), "transformers" or "llama.cpp". draft_quantization (transformers drafts): "auto" = int8
    weights on CPUs (half a draft step's memory traffic; exactness untouched), "int8" or "none".
    context: llama.cpp KV cells per model (per request under batching: duospec/batching.py). offload: the target's layers streamed from pinned CPU
    memory to the GPU every pass (SpecExec with targets larger than the GPU). deterministic: every
    method's greedy output equals `ar`'s bit for bit (transformers; refused where this machine's
    kernels cannot keep it). suffix_history_tokens/suffix_scope: what suffix decoding drafts from.
    prefix_cache: reuse the KV prefix the next prompt shares with the last request. Details per
    option: docs/api.md.
    """
    check_history_options(suffix_history_tokens, suffix_scope)  # before any model loads
    from duospec.models.llamacpp import LlamaCppSettings
    from duospec.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    for label, value in (("threads", threads), ("draft_threads", draft_threads), ("context", context)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DuospecError(f"{label} must be a positive integer, got {value!r}")
    target_name = target or DEFAULT_TARGET
    if draft is None and target_name == DEFAULT_TARGET:
        draft = DEFAULT_DRAFT
    for source in (target_name, draft):  # before any model loads (the draft loads on first use)
        if source is not None:
            check_source_exists(source)
    target_backend = resolve_backend(backend, target_name, torch_device, deterministic=deterministic)
    target_options = LoadOptions(
        backend=target_backend, device=torch_device, dtype=torch_dtype, threads=threads, attn_implementation=attn_implementation, offload=offload,
        deterministic=deterministic, llama=LlamaCppSettings() if context is None else LlamaCppSettings(context=context),
    )
    draft_options = None if draft is None else _draft_options(draft, target_options, backend if draft_backend is None else draft_backend, draft_threads, draft_quantization)
    quantization = "none" if draft_options is None else draft_options.quantization
    loaded = load_model(target_name, target_options, name=target_name, progress=progress)
    if progress and backend == "auto":
        draft_note = f", draft on {draft_options.backend}" if draft_options is not None else ""
        print(f"duospec: target on {target_backend}{draft_note} (--backend auto)", file=sys.stderr)
    return Pipeline(
        loaded.model,
        loaded.tokenizer,
        draft_source=draft,
        draft_quantization=quantization,
        device=torch_device,
        dtype=torch_dtype,
        threads=threads if threads is not None else (loaded.model.threads if target_backend == "llama.cpp" else torch.get_num_threads()),
        backend=target_backend,
        draft_options=draft_options,
        eos_ids=loaded.eos_ids,
        cost_identity=loaded.cost_identity,
        target_source=target_name,
        progress=progress,
        suffix_history_tokens=suffix_history_tokens,
        suffix_scope=suffix_scope,
        prefix_cache=prefix_cache,
    )


def _draft_options(draft: str, target_options: LoadOptions, backend: str, threads: int | None, quantization: str) -> LoadOptions:
    """How the draft loads: the target's options on the draft's own backend, with its threads and (on
    transformers) its weight quantisation resolved for this device; never offloaded, never deterministic
    (the draft's logits only shape proposals, which the target checks)."""
    resolved = resolve_backend(backend, draft, target_options.device)
    if resolved == "transformers":
        quantization = resolve_draft_quantization(quantization, target_options.device, target_options.dtype)
    elif quantization not in DRAFT_QUANTIZATIONS:
        raise DuospecError(f"unknown draft quantization {quantization!r}; choose one of: {', '.join(DRAFT_QUANTIZATIONS)}")
    else:
        quantization = "none"
    return replace(
        target_options, backend=resolved, threads=threads if threads is not None else target_options.threads, quantization=quantization, offload=False, deterministic=False
    )


def resolve_draft_quantization(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" becomes "int8" where torch's int8 kernel runs (CPUs), else "none"; "int8" elsewhere is refused."""
    if choice not in DRAFT_QUANTIZATIONS:
        raise DuospecError(f"unknown draft quantization {choice!r}; choose one of: {', '.join(DRAFT_QUANTIZATIONS)}")
    available = int8_kernel_available(device, dtype)
    if choice == "int8" and not available:
        raise DuospecError(f"int8 draft weights need torch's CPU int8 kernel, not available for {device} / {dtype}; use --draft-quant none")
    if choice == "auto":
        return "int8" if available else "none"
    return choice


def draft_label(source: str | None, quantization: str, backend: str = "transformers") -> str | None:
    """The draft's source plus its weight storage and backend, e.g. "qwen2.5-coder-0.5b-instruct+int8"
    or "...-0.5b-instruct@llama.cpp"; None without a draft."""
    if source is None:
        return None
    if backend != "transformers":
        return f"{source}@{backend}"
    return f"{source}+int8" if quantization == "int8" else source


def check_same_vocabulary(target_tokenizer, draft_tokenizer, target_name: str, draft_name: str) -> None:
    """Draft and target must map the same strings to the same ids, or draft tokens mean nothing."""
    target_vocab = target_tokenizer.get_vocab()
    draft_vocab = draft_tokenizer.get_vocab()
    if target_vocab == draft_vocab:
        return
    differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])[:3]
    raise DuospecError(
        f"the draft {draft_name!r} and the target {target_name!r} do not share a tokenizer "
        f"({len(draft_vocab)} vs {len(target_vocab)} tokens; e.g. {differing}). "
        "Pick a draft from the target's model family (same vocabulary and ids)."
    )
