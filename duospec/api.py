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

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from duospec.budget.corrections import CostTracker, corrected_draft_step, corrected_target_costs, may_keep_correction
from duospec.budget.kept import draft_step_for, draft_step_key, keep_measurement, read_measurement, target_cost_key, target_costs_for
from duospec.budget.load import LoadProbe, LoadReading, under_load
from duospec.budget.model import DRAFT_MARGIN, CostProfile, best_gamma, expected_tokens
from duospec.budget.policy import PROBE_ALPHA, GammaPolicy
from duospec.config import DRAFT_QUANTIZATIONS, DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting import method_spec
from duospec.drafting.specexec import DEFAULT_DEPTH
from duospec.drafting.suffix import DEFAULT_HISTORY_TOKENS, SuffixDrafter, SuffixHistory, SuffixPolicy, check_history_options
from duospec.engines.in_process import InProcessSource
from duospec.engines.rounds import generate_tokens
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
        self._load_watch = pipeline.load_probe.start()  # whether this request ran under visible load

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
        self._pipeline.reconcile_costs(self._pipeline.load_probe.stop(self._load_watch, self._pipeline.target))


class Pipeline:
    """A loaded target, its tokenizer and (on demand) a draft model; answers generate/stream calls.

    Backend-neutral: the target and the draft are `Model`s (transformers or llama.cpp, each its own),
    the tokenizer is a transformers tokenizer on both backends (same ids for the same text).
    """

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
        self._draft: Model | None = None
        self._draft_identity: list[str] | None = None
        self._target_identity = cost_identity
        self._target_costs: dict[int, float] | None = None
        self._draft_step: float | None = None
        self._tree_costs: tuple[CostProfile, CostProfile] | None = None  # SpecExec's curves (tree_costs)
        self._active_stream: GenerationStream | None = None  # the one stream whose caches the models hold
        self.cost_tracker = CostTracker()  # real pass/step times the engines report (see reconcile_costs)
        self.load_probe = LoadProbe()  # tells measurements and requests taken under visible load
        self._draft_attached = False  # a draft handed over in memory (attach_draft), not loaded from a source
        self._duo = None  # DuoRuntime: the draft process of `duo` requests, started on first use
        self.verbose = False  # print budget choices and why (--verbose)
        self._auto_alpha = 0.8  # acceptance `auto` expects of the draft model, learned across requests
        # Each model's KV cache outlives its request; the next request reuses the prefix it shares
        # (models/prefix.py). False: every request starts from empty caches (forget_prefixes).
        self.prefix_cache = prefix_cache
        self._duo_cold = False  # the duo draft process resets at its next sequence (forget_prefixes)
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
        mode_state = ("_target_identity", "_target_costs", "_tree_costs", "cost_tracker")
        deterministic_state = {name: getattr(self, name) for name in mode_state}
        default_state = getattr(self, "_default_mode_state", None) or {
            "_target_identity": None if self._target_identity is None else [part for part in self._target_identity if part != "deterministic"],
            "_target_costs": None,
            "_tree_costs": None,
            "cost_tracker": CostTracker(),
        }
        self.target.set_deterministic(False)
        for name, value in default_state.items():
            setattr(self, name, value)
        try:
            yield
        finally:
            self._default_mode_state = {name: getattr(self, name) for name in mode_state}
            for name, value in deterministic_state.items():
                setattr(self, name, value)
            self.target.set_deterministic(True)

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

    @property
    def draft_label(self) -> str | None:
        """The draft's source plus its backend and weight storage (what a measurement of it depends on)."""
        label = draft_label(self.draft_source, self.draft_quantization if self.draft_backend == "transformers" else "none")
        if label is not None and self.draft_backend != "transformers":
            label = f"{label}@{self.draft_backend}"
        return label

    def attach_draft(self, model: Model) -> None:
        """Use an already loaded draft model (tests, notebooks). It must share the target's tokenizer."""
        self._draft = model
        self._draft_identity = None
        self._draft_step = None
        self._tree_costs = None
        self.cost_tracker.clear_draft()
        self._draft_attached = True
        if self._duo is not None:
            self._duo.close()
            self._duo = None

    def cost_key(self, model: Model) -> list[str] | None:
        """What a measured cost depends on; None for models built in memory (nothing stable to key on)."""
        if model is self.target:
            return self._target_identity
        if model is self._draft:
            return self._draft_identity
        return None

    def target_profile(self, remeasure: bool = False) -> CostProfile:
        """Seconds per target pass over n tokens, measured once per machine and cached on disk."""
        if self._target_costs is None or remeasure:
            self._target_costs = target_costs_for(self.target, self.cost_key(self.target), remeasure, self.load_probe, self._note)
            if self.progress and self.verbose:  # cost diagnostics are asked for, not shown by default
                costs = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(self._target_costs.items()))
                print(f"duospec: target ({self.backend}) pass seconds by tokens per pass: {costs}", file=sys.stderr)
        return CostProfile(self._target_costs)

    def draft_step_seconds(self, remeasure: bool = False) -> float:
        """Seconds per draft step, measured once per machine and cached on disk."""
        if self._draft_step is None or remeasure:
            draft = self.draft
            self._draft_step = draft_step_for(draft, self.cost_key(draft), remeasure, self.load_probe, self._note)
            if self.progress and self.verbose:
                print(f"duospec: draft ({self.draft_backend}) step {self._draft_step:.3f} s", file=sys.stderr)
        return self._draft_step

    def reconcile_costs(self, reading: LoadReading | None = None) -> None:
        """Correct the figures in use from the real times in `cost_tracker`; called after each request.

        A figure whose tracked median (MIN_SAMPLES or more) disagrees by more than AGREEMENT_FACTOR is
        replaced in memory; the target curve is scaled as a whole (costs.corrected_target_costs). It is
        also written to disk unless `reading` shows the request ran under visible load and the new
        figure is slower (costs.may_keep_correction). Call it between requests only: a request's
        budget must stay a function of the profile it started with, so that seeded runs repeat.
        """
        loaded = reading is not None and under_load(reading)
        if self._target_costs is not None:
            corrected = corrected_target_costs(CostProfile(self._target_costs), self.cost_tracker)
            if corrected is not None:
                old, self._target_costs = self._target_costs, corrected  # a new dict: running policies keep theirs
                scale = corrected[min(corrected)] / old[min(old)]
                key = target_cost_key(self.cost_key(self.target))
                value = {str(n): s for n, s in corrected.items()}
                kept = read_measurement(key)
                kept_one = float(kept["1"]) if isinstance(kept, dict) and isinstance(kept.get("1"), (int, float)) else None
                may_keep = may_keep_correction(corrected[min(corrected)], kept_one, loaded)
                self._keep_correction(key, value, may_keep, f"target pass curve scaled by {scale:.2f} from real passes")
        if self._draft_step is not None and self._draft is not None:
            step = corrected_draft_step(self._draft_step, self.cost_tracker)
            if step is not None:
                old_step, self._draft_step = self._draft_step, step
                key = draft_step_key(self.cost_key(self._draft))
                kept = read_measurement(key)
                may_keep = may_keep_correction(step, kept if isinstance(kept, (int, float)) else None, loaded)
                self._keep_correction(key, step, may_keep, f"draft step {old_step:.3f} s -> {step:.3f} s from real steps")

    def _keep_correction(self, key: list[str] | None, value: object, may_keep: bool, what: str) -> None:
        """Write a corrected figure (see reconcile_costs) where it may be kept, and say what happened."""
        if key is None:
            self._note(f"{what} (in memory)")
        elif may_keep:
            kept = keep_measurement(key, value)
            self._note(f"{what}{', kept on disk' if kept else ''}")
        else:
            self._note(f"{what}; not kept on disk: this request ran under visible load")

    def _note(self, message: str) -> None:
        """A progress line on stderr (when progress output is on)."""
        if self.progress and self.verbose:
            print(f"duospec: {message}", file=sys.stderr)

    # -- suffix history -------------------------------------------------------------------------
    def remember(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        """Add a finished request (prompt and answer) to the suffix history, when it is shared."""
        if self.suffix_scope == "shared":
            self.suffix_history.add([*prompt_ids, *answer_ids])

    @contextmanager
    def separate_suffix_history(self, history: SuffixHistory) -> Iterator[None]:
        """Requests inside draft from (and add to) `history` instead of the pipeline's own. The bench
        gives each method its own, so no method drafts from another method's answer to the same question."""
        saved, self.suffix_history = self.suffix_history, history
        try:
            yield
        finally:
            self.suffix_history = saved

    def suffix_drafter(self, request: GenerationRequest) -> SuffixDrafter:
        """A suffix drafter over the shared history (if any), sized by the measured cost curve, or
        verifying up to `gamma` nodes when the request fixes it."""
        policy = SuffixPolicy(None, max_nodes=request.gamma) if request.gamma is not None else SuffixPolicy(self.target_profile())
        history = self.suffix_history if self.suffix_scope == "shared" else None
        return SuffixDrafter(history, policy, max_leaves=self.target.max_tree_leaves)

    # -- prefix cache ---------------------------------------------------------------------------
    def forget_prefixes(self) -> None:
        """Make the next request start from empty caches (target, draft, duo's draft process), as if
        nothing had run before: the bench's cold answers, and every request with prefix_cache off.
        Costs nothing now; the next request resets each cache it uses, inside its own time."""
        from duospec.models import prefix

        prefix.forget(self.target)
        if self._draft is not None:
            prefix.forget(self._draft)
        self._duo_cold = True

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
        if spec.engine == "duo":
            return self._stream_duo(prompt_ids, request)
        if spec.engine == "auto":
            return self._stream_auto(prompt_ids, request)
        draft = self.draft if spec.needs_draft_model else None
        drafter = spec.make_drafter(draft, self.target, request)
        policy = None
        if spec.engine == "suffix":
            drafter = self.suffix_drafter(request)
            policy = drafter.policy
        elif spec.engine == "tree":
            policy = self.tree_policy(request)
        elif drafter is not None:
            if gamma is not None:
                policy = GammaPolicy(None, fixed_gamma=gamma)  # a fixed gamma needs no measurement
            else:
                # Model-free drafts cost (almost) nothing per token.
                draft_cost = self.draft_step_seconds() if draft is not None else 0.0
                policy = GammaPolicy(self.target_profile(), draft_cost)
        if self.verbose and policy is not None and spec.engine != "tree":  # tree_policy describes its own
            print(f"duospec: {method}: {policy.describe()}", file=sys.stderr)
        stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids), gamma_auto=gamma is None)
        if isinstance(policy, GammaPolicy) and policy.profile is not None and not policy.could_pay:
            stats.choice_note = cannot_pay_note(policy.profile, policy.draft_step_seconds)
        chunks = generate_tokens(self.target, InProcessSource(drafter, policy, self.cost_tracker), prompt_ids, request, self.eos_ids, stats)
        stream = GenerationStream(self, chunks, _TextAssembler(self.tokenizer), len(prompt_ids), stats, prompt_ids)
        self._active_stream = stream
        return stream

    def tree_costs(self) -> tuple[CostProfile, CostProfile]:
        """The target's pass cost extended to SpecExec's tree sizes, and the draft's pass cost by width.

        Measured once per machine (kept on disk), each up to the first size whose pass costs more than
        the deepest tree could repay: (DEFAULT_DEPTH + 2) one-token target passes.
        """
        if self._tree_costs is None:
            from duospec.budget.kept import growing_costs_for
            from duospec.budget.tree import DRAFT_WIDTHS, LARGE_SIZES

            base = self.target_profile()
            ceiling = (DEFAULT_DEPTH + 2) * base.target_pass(1)
            large = growing_costs_for(self.target, self.cost_key(self.target), LARGE_SIZES, ceiling, "tree-target", probe=self.load_probe, notify=self._note)
            widths = growing_costs_for(self.draft, self.cost_key(self.draft), DRAFT_WIDTHS, ceiling, "tree-draft", probe=self.load_probe, notify=self._note)
            self._tree_costs = (CostProfile({**base.target_pass_seconds, **large}), CostProfile(widths))
            if self.progress and self.verbose:
                curve = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(self._tree_costs[0].target_pass_seconds.items()))
                draft = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(widths.items()))
                print(f"duospec: target pass seconds by tokens (trees): {curve}; draft pass by width: {draft}", file=sys.stderr)
        return self._tree_costs

    def tree_policy(self, request: GenerationRequest):
        """SpecExec's node budget: fixed by the request, else autotuned from measured costs."""
        from duospec.budget.tree import TreeBudgetPolicy

        if request.tree_budget is not None:
            policy = TreeBudgetPolicy(None, None, depth=request.tree_depth, fixed_budget=request.tree_budget)
        else:
            target_costs, draft_costs = self.tree_costs()
            policy = TreeBudgetPolicy(target_costs, draft_costs, depth=request.tree_depth, prior_alpha=self._auto_alpha)
        if self.verbose:
            print(policy.describe(), file=sys.stderr)
        return policy

    def duo_runtime(self):
        """The draft process, thread split and costs of `duo` requests (set up on first use)."""
        if self._duo is None:
            from duospec.engines.duo_runtime import DuoRuntime

            self._duo = DuoRuntime(self)
        return self._duo

    def _stream_duo(self, prompt_ids: list[int], request: GenerationRequest) -> GenerationStream:
        from duospec.engines.duo_runtime import print_choice

        runtime = self.duo_runtime()
        runtime.prepare()
        planner = runtime.planner(request.gamma)
        if self.verbose:
            print_choice(runtime, planner)
        stats = GenerationStats(method="duo", prompt_tokens=len(prompt_ids), gamma_auto=request.gamma is None)
        reuse_draft, self._duo_cold = not self._duo_cold, False
        chunks = runtime.generate(prompt_ids, request, planner, stats, reuse_draft=reuse_draft)
        stream = GenerationStream(self, chunks, _TextAssembler(self.tokenizer), len(prompt_ids), stats, prompt_ids)
        self._active_stream = stream
        return stream

    def _stream_auto(self, prompt_ids: list[int], request: GenerationRequest) -> GenerationStream:
        """`auto`: duo for the whole request where its measured costs promise more than the best
        in-process method, else the in-process methods chosen round by round (drafting/auto.py)."""
        from duospec.drafting.auto import AutoDrafter
        from duospec.drafting.chain import ChainDrafter

        has_draft = self.has_draft
        profile = self.target_profile()
        alpha = self._auto_alpha
        sd_policy, sequential_rate = None, 1.0 / profile.target_pass(1)
        if has_draft:
            draft_step = self.draft_step_seconds()
            sd_policy = GammaPolicy(profile, draft_step, prior_alpha=alpha)
            gamma = best_gamma(alpha, profile, draft_step, sd_policy.max_gamma)
            sequential_rate = max(sequential_rate, expected_tokens(alpha, gamma) / (gamma * draft_step + profile.target_pass(gamma + 1)))
        if has_draft and duo_is_a_candidate(self.target.device):
            runtime = self.duo_runtime()
            if runtime.costs is None:
                runtime._choose_split()
            duo_rate, _ = runtime.costs.predicted_rate(alpha)
            if self.verbose:
                print(f"duospec: auto: duo promises {duo_rate:.1f} tok/s, the best in-process method {sequential_rate:.1f} tok/s (alpha {alpha:.2f})", file=sys.stderr)
            if duo_rate > sequential_rate * (1 + DRAFT_MARGIN):
                stream = self._stream_duo(prompt_ids, request)
                stream._stats.method = "auto:duo"
                return stream
        drafter = AutoDrafter(self.suffix_drafter(replace(request, gamma=None)), ChainDrafter(self.draft, self.target.vocab_size) if has_draft else None, sd_policy)
        stats = GenerationStats(method="auto", prompt_tokens=len(prompt_ids), gamma_auto=request.gamma is None)
        stats.auto_rounds = drafter.rounds
        stats.choice_note = auto_choice_note(profile, self.draft_step_seconds() if has_draft else None)
        if self.verbose:
            print(f"duospec: auto: each round drafts from the suffix tree where a repeat pays, else from the draft model where it pays, else runs as ar ({stats.choice_note})", file=sys.stderr)
            print(f"duospec: auto, suffix rounds: {drafter.suffix.policy.describe()}", file=sys.stderr)
            if sd_policy is not None:
                print(f"duospec: auto, draft-model rounds: {sd_policy.describe()}", file=sys.stderr)
        chunks = generate_tokens(self.target, InProcessSource(drafter, drafter.policy, self.cost_tracker), prompt_ids, request, self.eos_ids, stats)
        stream = GenerationStream(self, self._learn_alpha(chunks, stats), _TextAssembler(self.tokenizer), len(prompt_ids), stats, prompt_ids)
        self._active_stream = stream
        return stream

    def _learn_alpha(self, chunks: Iterator[list[int]], stats: GenerationStats) -> Iterator[list[int]]:
        """Pass the chunks through; afterwards remember the acceptance for the next auto choice."""
        yield from chunks
        if stats.alpha_estimate is not None:
            self._auto_alpha = 0.5 * self._auto_alpha + 0.5 * stats.alpha_estimate

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


# With fewer CPU cores, a draft process and the target split too few between them: duo ran at 0.50x
# (AMD EPYC) and 0.59x (Intel AMX Xeon) of plain decoding on 2 cores, so auto does not even measure it.
DUO_MIN_CPU_CORES = 4


def duo_is_a_candidate(device: torch.device) -> bool:
    """Whether `auto` measures duo at all: a GPU target (the draft then has the CPU), or enough CPU cores."""
    return device.type == "cuda" or len(os.sched_getaffinity(0)) >= DUO_MIN_CPU_CORES


def cannot_pay_note(profile: CostProfile, draft_step: float) -> str:
    """Why a chain method drafts nothing here, in measured terms (its summary line)."""
    two = profile.target_pass(2) / profile.target_pass(1)
    step = f" and a draft step {draft_step / profile.target_pass(1):.2f}x" if draft_step > 0 else ""
    return f"a 2-token pass costs {two:.2f}x a 1-token pass{step}: drafting cannot pay here even at {PROBE_ALPHA:.0%} acceptance; ran as ar"


def auto_choice_note(profile: CostProfile, draft_step: float | None) -> str:
    """Why `auto` may or may not use the draft model here, in measured terms (its summary line)."""
    costs = f"a 2-token pass costs {profile.target_pass(2) / profile.target_pass(1):.2f}x a 1-token pass"
    if draft_step is None:
        return f"suffix trees where a repeat pays ({costs}); no draft model"
    ratio = draft_step / profile.target_pass(1)
    policy = GammaPolicy(profile, draft_step)
    verdict = "can pay where it is often right" if policy.could_pay else "cannot pay here, at any acceptance"
    return f"suffix trees where a repeat pays; the draft model {verdict} ({costs}, a draft step {ratio:.2f}x a target step)"


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
    context: llama.cpp KV cells per model. offload: the target's layers streamed from pinned CPU
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
