"""Generating threads, a bounded queue in front of them, and the events a request's handler reads.

One generating thread per pipeline it is given. With one pipeline, requests run one at a time (--max-batch 1,
deterministic mode, and `duo`, whose draft process is tied to the thread: its
PR_SET_PDEATHSIG fires when the starting thread ends). With the lanes of a batch (duospec/batching.py)
each lane's thread answers one request at a time and their passes join (models/joint.py): continuous
batching, requests joining and leaving between passes. A thread lives as long as the server, and
`close` stops its pipeline from it. Handlers (on the event loop) and these threads meet only through
`Job`: its events queue (filled with call_soon_threadsafe) and its cancel flag, read after every round.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from duospec.config import DuospecError
from duospec.server.errors import APIError, overloaded
from duospec.server.metrics import ServerMetrics
from duospec.server.stops import StopMatcher

log = logging.getLogger("duospec.server")

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's
STATUS_CLIENT_CLOSED = 499  # nginx's code for a client that left before its answer (metrics and logs only)


@dataclass
class Delta:
    """Text (and the token ids behind it) of one round, safe to show (stop sequences held back)."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """The whole answer: text cut at a stop sequence, its token ids, the OpenAI finish reason, stats."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict


@dataclass
class Failed:
    """The request could not be answered (or was cut short); `error` says why, `partial_text` keeps what was made."""

    error: APIError
    partial_text: str = ""


@dataclass(eq=False)  # compared (and hashed) by identity: the running set holds jobs
class Job:
    """One admitted request: what to generate and where its events go."""

    id: str
    endpoint: str  # "/v1/chat/completions" or "/v1/completions", for logs and metrics
    prompt_ids: list[int]
    options: dict  # keyword arguments of Pipeline.stream (method, max_new_tokens, sampling, ...)
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    state: str = "new"  # new -> queued -> running -> done, or queued -> dropped (its client left)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Delta | Finished | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server is gone): nobody is listening
            pass


class Scheduler:
    """Admits jobs into a bounded queue and runs them on its generating threads, one per pipeline.

    pipelines: one (requests one at a time), or a batch's lanes whose threads meet in `joint`.
    """

    def __init__(self, pipelines: list, max_waiting: int, metrics: ServerMetrics, joint=None) -> None:
        self.pipelines = pipelines
        self.pipeline = pipelines[0]  # its tokenizer (every lane shares it)
        self.joint = joint
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.closing = False
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: set[Job] = set()
        self._mean_seconds = 5.0  # request duration, for Retry-After; learned as requests finish
        self._threads = [
            threading.Thread(target=self._work, args=(pipeline,), name=f"duospec-generate-{index}", daemon=True) for index, pipeline in enumerate(pipelines)
        ]

    # -- the handlers' side (event loop) ----------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        """Requests generating now (the batch in flight)."""
        return len(self._running)

    @property
    def max_batch(self) -> int:
        return len(self.pipelines)

    @property
    def alive(self) -> bool:
        """Whether every generating thread runs (a server without them can answer nothing)."""
        return all(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue the job, or raise a 503 with Retry-After when the queue is full or the server stops."""
        with self._lock:
            if self.closing or not self.alive:
                raise overloaded("the server is shutting down; send the request to another instance or retry later", 5)
            if self._waiting >= self.max_waiting + self.max_batch - self.running:  # max_batch run, max_waiting wait
                raise overloaded(
                    f"the server is busy: {self._waiting} requests are waiting for the model (limit {self.max_waiting}, --max-queue); retry later",
                    self.retry_after(),
                )
            self._waiting += 1
            job.state = "queued"
            self._queue.put(job)  # under the lock: begin_shutdown's drain cannot miss it

    def cancel(self, job: Job) -> None:
        """The job's client has gone: a queued job leaves the queue now, a running one stops at its next round."""
        with self._lock:
            dropped = job.state == "queued"
            if dropped:
                job.state = "dropped"
                self._waiting -= 1
        job.cancelled.set()
        if dropped:
            self.metrics.count_request(job.endpoint, STATUS_CLIENT_CLOSED)
            log.info("%s %s %d prompt=%d left the queue before it started (client gone) queue=%.2fs", job.id, job.endpoint, STATUS_CLIENT_CLOSED, len(job.prompt_ids), time.perf_counter() - job.arrived)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the mean request time, shared by the batch."""
        return max(1, min(600, math.ceil(self._mean_seconds * (self._waiting + self.running) / self.max_batch)))

    def begin_shutdown(self) -> None:
        """Refuse new jobs, fail the queued ones with 503, stop the running ones at their next round."""
        with self._lock:
            self.closing = True
            queued = []
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.state == "queued":
                    job.state = "dropped"
                    self._waiting -= 1
                    queued.append(job)
        for job in queued:
            job.emit(Failed(overloaded("the server is shutting down; the request was not started, retry it elsewhere or later", 5)))

    def close(self, timeout: float = 60.0) -> None:
        """begin_shutdown, then wait for the threads to finish their rounds and stop their pipelines."""
        self.begin_shutdown()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- the generating threads -------------------------------------------------------------------
    def _work(self, pipeline) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    break
                with self._lock:
                    if job.state != "queued":
                        continue  # dropped: its client left while it waited
                    self._waiting -= 1
                    job.state = "running"
                    self._running.add(job)
                try:
                    if self.joint is None:
                        self._run(job, pipeline)
                    else:
                        with self.joint.member():  # its passes join the other lanes' (models/joint.py)
                            self._run(job, pipeline)
                except BaseException:  # even a failure while reporting a failure must not end the thread
                    log.exception("%s: the generating thread caught an error", job.id)
                    job.emit(Failed(APIError(500, "generation failed inside the server; see its log", type="server_error")))
                finally:
                    with self._lock:
                        job.state = "done"
                        self._running.discard(job)
        finally:
            pipeline.close()  # a Duo draft process ends with the thread that started it

    def _run(self, job: Job, pipeline) -> None:
        started = time.perf_counter()
        queue_seconds = started - job.arrived
        stream = None
        try:
            stream = pipeline.stream(job.prompt_ids, **job.options)
            outcome = self._generate(job, stream)
        except DuospecError as error:
            outcome = Failed(APIError(400, str(error)), self._partial(stream))
        except Exception:  # a bug: the client gets a 500 without internals, the log keeps the traceback
            log.exception("%s: generation failed", job.id)
            outcome = Failed(APIError(500, "generation failed inside the server; see its log", type="server_error"), self._partial(stream))
        result = stream.result if stream is not None else None
        seconds = time.perf_counter() - job.arrived
        if result is not None:
            self.metrics.record_generation(result.stats, queue_seconds, seconds)
            self._mean_seconds = 0.7 * self._mean_seconds + 0.3 * (time.perf_counter() - started)
        status = self._status(job, outcome)
        self.metrics.count_request(job.endpoint, status)
        self._log(job, status, outcome, result, queue_seconds, seconds)
        job.emit(outcome)

    def _generate(self, job: Job, stream) -> Finished | Failed:
        """Run the stream round by round, sending each round's text; stop at a stop sequence, when the
        client has gone, or when the server shuts down."""
        matcher = StopMatcher(job.stops)
        ended_by = None
        rounds = iter(stream)  # held here: a `break` must not close it before stream.stop(reason) runs
        for chunk in rounds:
            text = matcher.push(chunk.text)
            token_ids = chunk.token_ids
            if matcher.stopped:
                ended_by = "stop"
                token_ids = self._trim_to_stop(stream, matcher, token_ids)
            if text or token_ids:
                job.emit(Delta(text, token_ids))
            if ended_by is None and job.cancelled.is_set():
                ended_by = "cancelled"
            if ended_by is None and self.closing:
                ended_by = "shutdown"
            if ended_by is not None:
                break
        if ended_by is None:
            tail = matcher.flush()
            if tail:
                job.emit(Delta(tail, []))
            result = stream.result
            return Finished(matcher.shown, result.token_ids, FINISH_REASONS.get(result.stats.finish_reason, "stop"), _stats(result.stats))
        result = stream.stop(ended_by)
        if ended_by == "cancelled":
            return Failed(APIError(STATUS_CLIENT_CLOSED, "the client closed the connection"), matcher.shown)
        if ended_by == "stop":
            kept = self._stop_token_count(result.token_ids, matcher)
            return Finished(matcher.shown, result.token_ids[:kept], "stop", _stats(result.stats))
        message = f"the server is shutting down; the answer was cut short after {result.stats.new_tokens} tokens (partial_text holds them)"
        return Failed(APIError(503, message, type="server_shutdown", code="server_shutting_down", headers={"Retry-After": "5"}), matcher.shown)

    def _trim_to_stop(self, stream, matcher: StopMatcher, round_ids: list[int]) -> list[int]:
        """The part of this round's token ids up to the one that completes the stop sequence."""
        all_ids = stream.token_ids
        kept = self._stop_token_count(all_ids, matcher)
        before_round = len(all_ids) - len(round_ids)
        return round_ids[: max(0, kept - before_round)]

    def _stop_token_count(self, token_ids: list[int], matcher: StopMatcher) -> int:
        """How many tokens the answer needed to complete its stop sequence (usage counts those)."""
        needed = matcher.stop_end()
        low, high = 1, len(token_ids)
        while low < high:  # the shortest prefix whose text reaches the stop sequence's end
            middle = (low + high) // 2
            text = self.pipeline.tokenizer.decode(token_ids[:middle], skip_special_tokens=True)
            if len(text) >= needed and not text.endswith("\ufffd"):
                high = middle
            else:
                low = middle + 1
        return low

    @staticmethod
    def _partial(stream) -> str:
        """The text made before a failure ("" when even that cannot be had)."""
        if stream is None:
            return ""
        try:
            return stream.stop("error").text
        except Exception:
            log.exception("could not keep the partial answer")
            return ""

    def _status(self, job: Job, outcome: Finished | Failed) -> int:
        if isinstance(outcome, Failed):
            return outcome.error.status
        return STATUS_CLIENT_CLOSED if job.cancelled.is_set() and outcome.finish_reason != "stop" else 200

    def _log(self, job: Job, status: int, outcome, result, queue_seconds: float, seconds: float) -> None:
        """The request's one log line: id, method, tokens, time, speed, how it ended."""
        if result is None:
            log.info("%s %s %d prompt=%d error=%r", job.id, job.endpoint, status, len(job.prompt_ids), outcome.error.message)
            return
        stats = result.stats
        finish = outcome.finish_reason if isinstance(outcome, Finished) else stats.finish_reason
        log.info(
            "%s %s %d method=%s prompt=%d completion=%d finish=%s queue=%.2fs seconds=%.2f tok/s=%.1f accepted/pass=%.2f",
            job.id, job.endpoint, status, stats.method, stats.prompt_tokens, stats.new_tokens, finish,
            queue_seconds, seconds, stats.tokens_per_second, stats.mean_accepted,
        )


def _stats(stats) -> dict:
    """duospec's own figures for a response's extra `duospec` field (OpenAI clients ignore it)."""
    return {
        "method": stats.method,
        "tokens_per_second": round(stats.tokens_per_second, 3),
        "ttft_seconds": None if stats.ttft_seconds is None else round(stats.ttft_seconds, 4),
        "seconds": round(stats.seconds, 4),
        "target_passes": stats.target_passes,
        "mean_accepted": round(stats.mean_accepted, 3),
        "acceptance_rate": None if stats.acceptance_rate is None else round(stats.acceptance_rate, 4),
        "generated_tokens": stats.new_tokens,
    }
