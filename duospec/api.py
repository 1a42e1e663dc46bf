"""The Python API: load a target (and, when a method needs one, a draft) once; generate many times.

    import duospec
    pipe = duospec.load()                      # the embedded default pair, no hub needed
    out = pipe.generate("Write a haiku about caches.", method="sd", max_new_tokens=64)
    print(out.text, out.stats.tokens_per_second)
    stream = pipe.stream("Explain KV caches.", method="pld")
    for chunk in stream:
        print(chunk.text, end="", flush=True)
    print(stream.result.stats.mean_accepted)
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from duospec.budget import CostProfile, GammaPolicy, draft_step_for, target_costs_for
from duospec.config import DRAFT_QUANTIZATIONS, DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting import METHODS
from duospec.engines.sequential import generate_tokens
from duospec.models.hf import HFModel, load_hf, resolve_device, resolve_dtype
from duospec.models.int8 import int8_kernel_available, quantize_linear_layers_int8
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

    def __init__(self, pipeline: "Pipeline", chunks: Iterator[list[int]], assembler: _TextAssembler, prompt_tokens: int, stats: GenerationStats):
        self._pipeline = pipeline
        self._chunks = chunks
        self._assembler = assembler
        self._prompt_tokens = prompt_tokens
        self._stats = stats
        self.result: GenerationResult | None = None

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

    def stop(self, reason: str) -> GenerationResult:
        """End early (Ctrl-C in the caller's own code, an error) and keep everything generated so far."""
        if self.result is None:
            if not self._stats.finish_reason:
                self._stats.finish(reason)
            self._finalise()
        return self.result

    def _finalise(self) -> None:
        self.result = GenerationResult(
            text=self._assembler.text(),
            token_ids=list(self._assembler.token_ids),
            prompt_tokens=self._prompt_tokens,
            stats=self._stats,
        )


class Pipeline:
    """A loaded target, its tokenizer and (on demand) a draft model; answers generate/stream calls."""

    def __init__(
        self,
        target: HFModel,
        tokenizer,
        *,
        draft_source: str | None = None,
        draft_quantization: str = "none",
        device: torch.device,
        dtype: torch.dtype,
        threads: int,
        progress: bool = True,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft_source = draft_source
        self.draft_quantization = draft_quantization  # "int8" or "none", already resolved for this device
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.progress = progress
        self._draft: HFModel | None = None
        self._plain_draft: HFModel | None = None  # loaded only for transformers baselines
        self._target_costs: dict[int, float] | None = None
        self._draft_step: float | None = None
        self._active_stream: GenerationStream | None = None  # the one stream whose caches the models hold
        self.eos_ids = _eos_ids(target, tokenizer)

    # -- models ---------------------------------------------------------------------------------
    @property
    def draft(self) -> HFModel:
        """The draft model, loaded on first use (methods without a draft never pay for it)."""
        if self._draft is None:
            model = self._load_draft(name=self.draft_label)
            if self.draft_quantization == "int8":
                quantize_linear_layers_int8(model.model)
            self._draft = model
        return self._draft

    def plain_draft_model(self) -> torch.nn.Module:
        """The draft exactly as transformers loads it (same checkpoint and dtype, no int8 weights).

        Baselines run this: it is what a user of the transformers library would pass as assistant.
        """
        if self.draft_quantization == "none":
            return self.draft.model
        if self._plain_draft is None:
            self._plain_draft = self._load_draft(name=self.draft_source)
        return self._plain_draft.model

    def _load_draft(self, name: str | None) -> HFModel:
        """The draft checkpoint in the pipeline's device and dtype, once its vocabulary is checked."""
        if self.draft_source is None:
            raise DuospecError("this method needs a draft model; pass --draft (or draft=...) with a model that shares the target's tokenizer")
        from duospec.models.registry import resolve_checkpoint

        model, draft_tokenizer = load_hf(resolve_checkpoint(self.draft_source, progress=self.progress), device=self.device, dtype=self.dtype, name=name)
        check_same_vocabulary(self.tokenizer, draft_tokenizer, self.target.name, self.draft_source)
        return model

    @property
    def draft_label(self) -> str | None:
        """The draft's source plus how its weights are stored (what a measurement of it depends on)."""
        return draft_label(self.draft_source, self.draft_quantization)

    def attach_draft(self, model: HFModel) -> None:
        """Use an already loaded draft model (tests, notebooks). It must share the target's tokenizer."""
        self._draft = model
        self._draft_step = None

    def cost_key(self, model: HFModel) -> list[str] | None:
        """What a measured cost depends on; None for in-memory models (no stable name)."""
        if model.name == "model":
            return None
        return [model.name, str(self.dtype), str(self.device), str(self.threads), torch.__version__, platform.processor() or platform.machine()]

    def target_profile(self, remeasure: bool = False) -> CostProfile:
        """Seconds per target pass over n tokens, measured once per machine and cached on disk."""
        if self._target_costs is None or remeasure:
            self._target_costs = target_costs_for(self.target, self.cost_key(self.target), remeasure)
            if self.progress:
                costs = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(self._target_costs.items()))
                print(f"duospec: target pass seconds by tokens per pass: {costs}", file=sys.stderr)
        return CostProfile(self._target_costs)

    def draft_step_seconds(self, remeasure: bool = False) -> float:
        """Seconds per draft step, measured once per machine and cached on disk."""
        if self._draft_step is None or remeasure:
            self._draft_step = draft_step_for(self.draft, self.cost_key(self.draft), remeasure)
            if self.progress:
                print(f"duospec: draft step {self._draft_step:.3f} s", file=sys.stderr)
        return self._draft_step

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt; the chat template is applied when the tokenizer has one (unless chat=False).

        prompt: text (one user turn), token ids, or chat messages [{"role": ..., "content": ...}, ...]
        (a multi-turn conversation; the chat template is required then).
        """
        if isinstance(prompt, list) and not prompt:
            raise DuospecError("the prompt is empty; give text, token ids or chat messages")
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self._encode_messages(prompt)
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and 0 <= t < self.target.vocab_size for t in prompt):
                raise DuospecError(f"a token-id prompt must be a list of ints in [0, {self.target.vocab_size})")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DuospecError("the prompt is empty; give some text (or '-' to read it from standard input)")
        use_chat = chat if chat is not None else bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat:
            return self._encode_messages([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DuospecError("this tokenizer has no chat template; pass --no-chat (chat=False) with a text prompt")
        if not all(isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise DuospecError("chat messages need a 'role' and a string 'content' each")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation -----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int] | list[dict],
        method: str = "sd",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        gamma: int | None = None,
        lenience: float = 1.0,
        chat: bool | None = None,
    ) -> GenerationStream:
        """Start a generation whose accepted tokens arrive round by round."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        request = GenerationRequest(method=method, max_new_tokens=max_new_tokens, sampling=sampling, gamma=gamma, lenience=lenience)
        prompt_ids = self.encode(prompt, chat)
        limit = self.target.max_context
        if limit is not None and len(prompt_ids) >= limit:
            raise DuospecError(
                f"the prompt has {len(prompt_ids)} tokens but the target's context holds {limit}; shorten the prompt"
            )
        spec = METHODS[method]
        draft = self.draft if spec.needs_draft_model else None
        drafter = spec.make_drafter(draft, self.target.vocab_size)
        policy = None
        if drafter is not None:
            if gamma is not None:
                policy = GammaPolicy(None, fixed_gamma=gamma)  # a fixed gamma needs no measurement
            else:
                # Model-free drafts cost (almost) nothing per token.
                draft_cost = self.draft_step_seconds() if draft is not None else 0.0
                policy = GammaPolicy(self.target_profile(), draft_cost)
        stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids), gamma_auto=gamma is None)
        chunks = generate_tokens(self.target, drafter, prompt_ids, request, policy, self.eos_ids, stats)
        stream = GenerationStream(self, chunks, _TextAssembler(self.tokenizer), len(prompt_ids), stats)
        self._active_stream = stream
        return stream

    def generate(self, prompt: str | list[int] | list[dict], **options) -> GenerationResult:
        """Generate a whole answer (same options as `stream`). Ctrl-C raises GenerationInterrupted
        carrying the partial result."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


def load(
    target: str | None = None,
    draft: str | None = None,
    *,
    device: str | None = None,
    dtype: str = "bfloat16",
    threads: int | None = None,
    draft_quantization: str = "auto",
    attn_implementation: str = "sdpa",
    progress: bool = True,
) -> Pipeline:
    """Load a target model (default: the embedded Qwen2.5-Coder-1.5B-Instruct) and note the draft.

    target/draft: an embedded model name, a local transformers directory or a hub id. The draft
    (default: the embedded Qwen2.5-Coder-0.5B-Instruct when the target is the default) is loaded on
    first use by a method that needs it. draft_quantization: "auto" stores the draft's weights as int8
    on CPUs (a draft step reads half the bytes; exactness is untouched, only acceptance could move),
    "int8" or "none".
    """
    from duospec.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET, resolve_checkpoint

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    quantization = resolve_draft_quantization(draft_quantization, torch_device, torch_dtype)
    if threads is not None:
        if threads < 1:
            raise DuospecError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    target_name = target or DEFAULT_TARGET
    if draft is None and target_name == DEFAULT_TARGET:
        draft = DEFAULT_DRAFT
    model, tokenizer = load_hf(
        resolve_checkpoint(target_name, progress=progress),
        device=torch_device,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        name=target_name,
    )
    return Pipeline(
        model,
        tokenizer,
        draft_source=draft,
        draft_quantization=quantization,
        device=torch_device,
        dtype=torch_dtype,
        threads=torch.get_num_threads(),
        progress=progress,
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


def draft_label(source: str | None, quantization: str) -> str | None:
    """e.g. "qwen2.5-coder-0.5b-instruct+int8"; None without a draft."""
    if source is None:
        return None
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


def _eos_ids(target: HFModel, tokenizer) -> frozenset[int]:
    """Every id that ends generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(target.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
