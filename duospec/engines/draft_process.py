"""The draft model in its own process, drafting ahead while the target verifies (DuoDecoding).

The child process (spawned, never forked: torch and llama.cpp start threads that a fork would copy
half-alive) loads the draft itself, pins itself to its own CPU cores and keeps one speculative chain
beyond the committed tokens. Whenever no message is waiting it drafts one more token of that chain,
as if everything sent for verification were accepted: its guess of the target's next token included
(DESIGN.md 1.3). The main process

- `begin`s a sequence with the prompt (the child prefills it while the target does the same),
- `take`s a draft: the chain's first tokens, waiting only for as many as it asks for at least,
- `commit`s the tokens the target emitted; the child keeps its chain where the chain guessed them,
  else crops its cache back to the agreed prefix and drafts on from the target's token.

Wire format: control messages are raw bytes over a pipe (an opcode, then int64 tokens and float64
figures, no pickled Python lists); the draft's probability rows, which exact sampling needs (one
[V] float32 row per draft token), are written by the child into shared memory and read by the main
process after the reply that names them. One request is in flight at a time, so nothing races.

Failure is never fatal to a generation: every wait has a deadline, and a dead, hung or broken child
raises `DraftProcessLost`, on which the engine goes on without it.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Callable

import numpy as np
import torch

from duospec.config import DuospecError, SamplingConfig
from duospec.drafting.chain import choose_draft_token, fit_vocab
from duospec.models.prefix import common_prefix

# Opcodes (one byte) of messages to the child ...
_BEGIN, _COMMIT, _TAKE, _PARK, _STEP_TIMES, _BUSY, _STOP = b"B", b"C", b"T", b"P", b"S", b"U", b"X"
# ... and of its replies.
_READY, _DRAFT, _TIMES, _ERROR = b"r", b"d", b"t", b"e"

MAX_SEQUENCES = 8  # DuoDecoding's cap on sequences per round, the main one included
MAX_CHAIN = 64  # draft tokens the child keeps ahead at most (and rows of the shared probability buffer)
PREFILL_SECONDS_PER_TOKEN = 0.02  # a 0.5B draft on one slow core prefills ~200 tokens/s; 0.02 allows 4x slower
LOAD_TIMEOUT_S = 600.0  # loading a draft may convert a checkpoint the first time


class DraftProcessLost(RuntimeError):
    """The draft process died, hung or broke the protocol; the engine continues without it."""


def vocabulary_digest(tokenizer) -> str:
    """A fingerprint of a tokenizer's vocabulary (strings and ids), to compare across processes."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(repr(items).encode()).hexdigest()


@dataclass(frozen=True)
class DraftFromSource:
    """Builds the draft in the child from where the pipeline would load it (picklable), and refuses
    it there when its vocabulary differs from the target's (draft tokens would mean nothing)."""

    source: str
    options: object  # duospec.models.loading.LoadOptions
    name: str | None = None
    target_vocabulary: str | None = None  # vocabulary_digest of the target's tokenizer
    target_name: str = "the target"

    def __call__(self):
        from duospec.models.loading import load_model

        loaded = load_model(self.source, self.options, name=self.name, progress=False)
        if self.target_vocabulary is not None and vocabulary_digest(loaded.tokenizer) != self.target_vocabulary:
            raise DuospecError(
                f"the draft {self.source!r} and {self.target_name!r} do not share a tokenizer "
                f"({len(loaded.tokenizer.get_vocab())} tokens in the draft's). Pick a draft from the target's model family (same vocabulary and ids)."
            )
        return loaded.model


@dataclass(frozen=True)
class DraftObject:
    """Sends an already built (picklable) draft model to the child: models built in memory."""

    model: object

    def __call__(self):
        return self.model


@dataclass(frozen=True)
class ChainReply:
    """What `take` returns: draft tokens after the root, their draft probabilities (rows of q for
    sampled drafts; None for greedy ones) and the draft's own probability of each token."""

    tokens: list[int]
    draft_probs: torch.Tensor | None  # [n, V] float32
    confidences: list[float]
    # Greedy drafts: other first tokens worth a sequence of their own (DuoDecoding's rule, see
    # drafting/multiseq.py) and the draft's probability of each.
    alternatives: list[int] = ()
    alternative_probs: list[float] = ()


class DraftProcess:
    """The main process's handle on one draft process. Use as a context manager or call `close`."""

    def __init__(
        self,
        factory: Callable[[], object],
        vocab_size: int,
        cores: set[int] | None,
        threads: int,
        timeout_s: float = 10.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.cores = cores
        self.threads = threads
        self.timeout_s = timeout_s  # a reply later than this (beyond the drafting asked for) means a hang
        self._shared = SharedMemory(create=True, size=MAX_CHAIN * vocab_size * 4)
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_child_main,
            args=(child_conn, factory, self._shared.name, vocab_size, None if cores is None else sorted(cores), threads),
            name="duospec-draft",
            daemon=True,  # multiprocessing terminates it when the main process exits normally
        )
        with _child_environment(threads):
            self.process.start()
        child_conn.close()
        self.step_seconds: float | None = None
        self._unfed = 0
        self._broken = ""  # why the process was lost, once it was
        self.last_intervals: list[list[float]] = []
        reply = self._receive(LOAD_TIMEOUT_S, what="loading the draft model")
        if reply[:1] != _READY:
            self.close()
            raise DraftProcessLost("the draft process sent an unexpected first message")
        (self.model_vocab_size,) = struct.unpack("<q", reply[1:9])
        self.max_context = struct.unpack("<q", reply[9:17])[0] or None

    # -- requests ---------------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int], sampling: SamplingConfig, seed: int | None, reuse: bool = True) -> None:
        """Start a new sequence: the child keeps the cached prefix the prompt shares with its last
        sequence (reuse; else it resets) and prefills the rest while the target does."""
        header = struct.pack("<dqdqqq", sampling.temperature, sampling.top_k, sampling.top_p, -1 if seed is None else seed, int(seed is not None), int(reuse))
        self._send(_BEGIN + header + _ints(prompt_ids))
        self._unfed = len(prompt_ids)  # the next reply may wait for the child's prefill of all of them

    def commit(self, tokens: list[int]) -> None:
        """The tokens the target emitted after the last chain's root (accepted drafts + its own token)."""
        self._send(_COMMIT + _ints(tokens))
        self._unfed += len(tokens)

    def take(self, min_tokens: int, max_tokens: int, sampled: bool, max_sequences: int = 1) -> ChainReply:
        """The chain's first tokens: at least min_tokens (the child drafts them if it has fewer) unless
        its context is full, at most max_tokens; with max_sequences > 1 (greedy drafts only) also the
        other first tokens the multi-sequence rule finds worth a sequence."""
        max_tokens = max(0, min(max_tokens, MAX_CHAIN))
        min_tokens = max(0, min(min_tokens, max_tokens))
        self._send(_TAKE + struct.pack("<qqq", min_tokens, max_tokens, max_sequences))
        step = self.step_seconds or 0.05
        # A hang is a reply later than the deadline plus the drafting asked for, plus a prompt the
        # child may still be prefilling (PREFILL_SECONDS_PER_TOKEN is generous for a CPU draft).
        allowance = self.timeout_s + 4 * step * min_tokens + PREFILL_SECONDS_PER_TOKEN * self._unfed
        self._unfed = 0
        reply = self._receive(allowance, what="waiting for a draft")
        if reply[:1] != _DRAFT:
            raise DraftProcessLost("the draft process answered a draft request with something else")
        (count,) = struct.unpack("<q", reply[1:9])
        tokens = np.frombuffer(reply, dtype=np.int64, count=count, offset=9).tolist()
        confidences = np.frombuffer(reply, dtype=np.float64, count=count, offset=9 + 8 * count).tolist()
        offset = 9 + 16 * count
        (n_alternatives,) = struct.unpack("<q", reply[offset : offset + 8])
        alternatives = np.frombuffer(reply, dtype=np.int64, count=n_alternatives, offset=offset + 8).tolist()
        alternative_probs = np.frombuffer(reply, dtype=np.float64, count=n_alternatives, offset=offset + 8 + 8 * n_alternatives).tolist()
        draft_probs = None
        if sampled and count:
            rows = np.frombuffer(self._shared.buf, dtype=np.float32, count=count * self.vocab_size)
            draft_probs = torch.from_numpy(rows.copy()).view(count, self.vocab_size)
        return ChainReply(tokens, draft_probs, confidences, alternatives, alternative_probs)

    def busy(self) -> None:
        """Draft without end on a filler sequence (to measure both sides running together)."""
        self._send(_BUSY)

    def park(self) -> None:
        """Stop drafting ahead (the generation ended); the process stays loaded for the next one."""
        self._send(_PARK)

    def step_times(self) -> list[float]:
        """Seconds of each single-token draft step since the last call (for cost tracking); the
        (start, end) perf_counter times of every draft forward land in `last_intervals`."""
        self._send(_STEP_TIMES)
        reply = self._receive(self.timeout_s, what="reading draft step times")
        if reply[:1] != _TIMES:
            raise DraftProcessLost("the draft process answered a step-time request with something else")
        (count,) = struct.unpack("<q", reply[1:9])
        self.last_intervals = np.frombuffer(reply, dtype=np.float64, offset=9 + 8 * count).reshape(-1, 2).tolist()
        return np.frombuffer(reply, dtype=np.float64, count=count, offset=9).tolist()

    # -- lifetime ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        """Stop the child (politely, then by force) and free the shared memory. Idempotent."""
        if self.process.is_alive():
            try:
                self._conn.send_bytes(_STOP)
            except (OSError, ValueError):
                pass
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=2.0)
        self._conn.close()
        try:
            self._shared.close()
            self._shared.unlink()
        except (FileNotFoundError, OSError):
            pass

    def __enter__(self) -> "DraftProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- wire -----------------------------------------------------------------------------------
    def _send(self, message: bytes) -> None:
        if self._broken:
            # A request that timed out may still be answered later: every reply after it would be one
            # behind (and pair tokens with another request's probability rows). Never talk again.
            raise DraftProcessLost(f"the draft process was lost earlier ({self._broken})")
        try:
            self._conn.send_bytes(message)
        except (OSError, ValueError) as error:
            raise DraftProcessLost(f"the draft process is gone ({error})") from error

    def _receive(self, timeout_s: float, what: str) -> bytes:
        try:
            return self._receive_once(timeout_s, what)
        except DraftProcessLost as error:
            self._broken = str(error)
            raise

    def _receive_once(self, timeout_s: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                if self._conn.poll(min(max(left, 0.0), 0.5)):
                    reply = self._conn.recv_bytes()
                    break
            except (EOFError, OSError) as error:
                raise DraftProcessLost(f"the draft process died while {what} ({error or 'pipe closed'})") from error
            if not self.process.is_alive():
                raise DraftProcessLost(f"the draft process died while {what} (exit code {self.process.exitcode})")
            if left <= 0:
                raise DraftProcessLost(f"the draft process did not answer within {timeout_s:.1f} s while {what}")
        if reply[:1] == _ERROR:
            message = reply[1:].decode("utf-8", "replace")
            if message.startswith("DuospecError: "):
                raise DuospecError(message.removeprefix("DuospecError: "))
            raise DraftProcessLost(f"the draft process failed while {what}: {message}")
        return reply


def _ints(values: list[int]) -> bytes:
    return np.asarray(values, dtype=np.int64).tobytes()


class _child_environment:
    """Environment the spawned child starts with: passive OpenMP waiting (spinning worker threads
    next to a busy target made a 1-token llama.cpp decode 50x slower) and its own thread counts."""

    def __init__(self, threads: int) -> None:
        self.values = {
            "OMP_WAIT_POLICY": "PASSIVE",
            "GOMP_SPINCOUNT": "0",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------------
# The child's side
# ---------------------------------------------------------------------------------------------------


class SpeculativeChain:
    """The child's state: committed tokens, and a chain drafted beyond them with the draft law of
    each token. The draft cache holds a prefix of committed + chain; nothing is recomputed."""

    def __init__(self, model, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the target's: q rows are cut or padded to it
        self.sampling = SamplingConfig()
        self.generator = torch.Generator(device=model.device)
        self.committed: list[int] = []
        self.chain: list[int] = []
        self.rows: list[torch.Tensor] = []  # q row of each chain token (sampled drafts)
        self.confidences: list[float] = []
        self.tops: list[tuple[list[int], list[float]]] = []  # greedy: the ranked first tokens at each chain position
        self.step_seconds: list[float] = []
        self.intervals: list[tuple[float, float]] = []  # (start, end) of every forward, for timelines

    def begin(self, prompt: list[int], sampling: SamplingConfig, seed: int | None, reuse: bool = True) -> None:
        """A new sequence. With `reuse` the cache keeps the prefix the prompt shares with the last
        sequence (committed + chain, whose prefix the cache always holds: a failed step ends this
        process, so no request leaves it half-done), at most all but the prompt's last token."""
        self.sampling = sampling
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        keep = 0
        if reuse:
            held = self.committed + self.chain
            keep = common_prefix(held, min(self.model.cache_len, len(held)), prompt, len(prompt) - 1)
        if keep:
            self.model.crop(keep)
        else:
            self.model.reset()
        self.committed, self.chain, self.rows, self.confidences, self.tops = list(prompt), [], [], [], []

    @property
    def can_draft(self) -> bool:
        if not self.committed or len(self.chain) >= MAX_CHAIN:
            return False
        limit = self.model.max_context
        return limit is None or len(self.committed) + len(self.chain) < limit

    def step(self) -> None:
        """Draft one more token of the chain: feed what the cache lacks, choose the next token."""
        start = time.perf_counter()
        sequence = self.committed + self.chain
        cached = self.model.cache_len
        pending = torch.tensor(sequence[cached:], device=self.model.device)
        logits = fit_vocab(self.model.forward(pending, last_only=True), self.vocab_size)
        token, probs = choose_draft_token(logits, self.sampling, self.generator)  # the in-process chain's rule
        if probs is None:  # greedy: the ranked first tokens, for `alternatives`, and the top one's probability
            logprobs, ranked = torch.topk(torch.log_softmax(logits[0].float(), -1), MAX_SEQUENCES + 1)
            self.tops.append((ranked.tolist(), logprobs.tolist()))
            confidence = math.exp(self.tops[-1][1][0])
        else:
            confidence = float(probs[0, token[0]])
        self.chain.append(int(token[0]))
        self.rows.append(None if probs is None else probs[0])
        self.confidences.append(confidence)
        if len(pending) == 1:  # prefill and catch-up steps are not what a draft step costs
            self.step_seconds.append(time.perf_counter() - start)
        self.intervals.append((start, time.perf_counter()))  # perf_counter is CLOCK_MONOTONIC: comparable across processes

    def commit(self, tokens: list[int]) -> None:
        """Keep the chain where it guessed the emitted tokens; otherwise crop back to the agreed prefix."""
        agreed = 0
        while agreed < min(len(tokens), len(self.chain)) and self.chain[agreed] == tokens[agreed]:
            agreed += 1
        base = len(self.committed)
        self.committed.extend(tokens)
        if agreed == len(tokens):
            del self.chain[:agreed], self.rows[:agreed], self.confidences[:agreed], self.tops[:agreed]
            return
        # Rolled back: the cache keeps committed + the agreed chain tokens it was fed, no more.
        self.chain, self.rows, self.confidences, self.tops = [], [], [], []
        if self.model.cache_len > base + agreed:
            self.model.crop(base + agreed)

    def restart(self) -> None:
        """Drop the chain and draft it again from the committed tokens (busy mode's endless drafting)."""
        self.chain, self.rows, self.confidences, self.tops = [], [], [], []
        self.model.crop(min(self.model.cache_len, len(self.committed) - 1))

    def ready(self, min_tokens: int, max_tokens: int) -> int:
        """Answer a take: draft until `min_tokens` are ready (or the context ends); how many to send."""
        while len(self.chain) < min_tokens and self.can_draft:
            self.step()
        return min(len(self.chain), max_tokens)

    def alternatives(self, max_sequences: int) -> tuple[list[int], list[float]]:
        """Other first tokens worth a sequence (greedy drafts only), by DuoDecoding's rule: theta = the
        top-1 log-probability at positions 1 and 2; every next-ranked first token above theta. Under
        sampling there are none: the rule would need the position-2 law after the top-1 token, and
        the chain's second token follows the *sampled* first one, so deciding from it would bias the
        chain's rejection sampling (see drafting/multiseq.py)."""
        if max_sequences <= 1 or len(self.tops) < 2 or not self.sampling.is_greedy:
            return [], []
        from duospec.drafting.multiseq import branch_first_tokens

        ranked, logprobs = self.tops[0]
        first = torch.full((self.vocab_size,), float("-inf"))
        first[torch.tensor(ranked)] = torch.tensor(logprobs)
        tokens = branch_first_tokens(first, self.tops[1][1][0], self.chain[0], max_sequences)[1:]
        probs = [math.exp(logprobs[ranked.index(token)]) for token in tokens]
        return tokens, probs

    def write_rows(self, count: int, buffer: memoryview) -> None:
        if count and self.rows[0] is not None:
            rows = torch.stack(self.rows[:count]).to("cpu", torch.float32).contiguous()
            target = np.frombuffer(buffer, dtype=np.float32, count=count * self.vocab_size)
            target[:] = rows.numpy().reshape(-1)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (even by SIGKILL), so no child survives."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_main(conn: Connection, factory, shared_name: str, vocab_size: int, cores: list[int] | None, threads: int) -> None:
    """Entry point of the draft process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the main process, which stops us
    _die_with_parent()
    if cores:
        os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(threads)
    shared = SharedMemory(name=shared_name)
    try:
        _serve(conn, factory, shared, vocab_size)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the main process went away: nothing left to do
    finally:
        shared.close()


def _serve(conn: Connection, factory, shared: SharedMemory, vocab_size: int) -> None:
    try:
        model = factory()
    except BaseException as error:  # noqa: BLE001 - reported to the main process, which raises it
        conn.send_bytes(_ERROR + _describe(error).encode())
        return
    conn.send_bytes(_READY + struct.pack("<qq", model.vocab_size, model.max_context or 0))
    state = SpeculativeChain(model, vocab_size)
    drafting = busy = False
    while True:
        if busy and not state.can_draft:  # measuring: start the chain again and keep the core busy
            state.restart()
        if not (drafting and state.can_draft) or conn.poll(0):
            message = conn.recv_bytes()
            op = message[:1]
            try:
                if op == _STOP:
                    return
                if op == _BEGIN:
                    temperature, top_k, top_p, seed, has_seed, reuse = struct.unpack("<dqdqqq", message[1:49])
                    prompt = np.frombuffer(message, dtype=np.int64, offset=49).tolist()
                    state.begin(prompt, SamplingConfig(temperature, top_k, top_p), seed if has_seed else None, bool(reuse))
                    drafting, busy = True, False
                elif op == _COMMIT:
                    state.commit(np.frombuffer(message, dtype=np.int64, offset=1).tolist())
                elif op == _TAKE:
                    min_tokens, max_tokens, max_sequences = struct.unpack("<qqq", message[1:25])
                    count = state.ready(min_tokens, max_tokens)
                    state.write_rows(count, shared.buf)
                    alternatives, probs = state.alternatives(max_sequences) if count else ([], [])
                    conn.send_bytes(
                        _DRAFT
                        + struct.pack("<q", count)
                        + _ints(state.chain[:count])
                        + np.asarray(state.confidences[:count], dtype=np.float64).tobytes()
                        + struct.pack("<q", len(alternatives))
                        + _ints(alternatives)
                        + np.asarray(probs, dtype=np.float64).tobytes()
                    )
                elif op == _PARK:
                    drafting = busy = False
                elif op == _BUSY:
                    length = 256 if model.max_context is None else max(1, min(256, model.max_context // 2))
                    filler = [token % max(vocab_size - 1, 1) for token in range(100, 100 + length)]
                    state.begin(filler, SamplingConfig(), 0)
                    drafting = busy = True
                elif op == _STEP_TIMES:
                    steps = np.asarray(state.step_seconds, dtype=np.float64)
                    intervals = np.asarray(state.intervals, dtype=np.float64).reshape(-1)
                    conn.send_bytes(_TIMES + struct.pack("<q", len(steps)) + steps.tobytes() + intervals.tobytes())
                    state.step_seconds, state.intervals = [], []
            except Exception as error:  # noqa: BLE001 - a broken state is reported, then we stop
                conn.send_bytes(_ERROR + _describe(error).encode())
                return
        else:
            state.step()


def _describe(error: BaseException) -> str:
    if isinstance(error, DuospecError):
        return f"DuospecError: {error}"
    return "".join(traceback.format_exception_only(type(error), error)).strip() + "\n" + "".join(traceback.format_tb(error.__traceback__)[-3:])


if __name__ == "__main__":  # pragma: no cover - the module is only ever a spawn target
    sys.exit("duospec.engines.draft_process is started by duospec, not run directly")
