"""The FastAPI app: OpenAI's chat and text completion endpoints (streaming over server-sent events and
not), /v1/models, /health and /metrics, in front of one loaded Pipeline.

Each handler checks the request completely (auth, content type, body size and deadline, JSON, fields,
model, method, prompt length, max_tokens) before it takes a queue slot, so a bad request costs no model
time and gets its 4xx at once; then it admits a Job and turns the generating thread's events into the
response. What untrusted clients cannot do (docs/server.md, "Hardening"): inject control tokens
(encoding.py), forge log lines (logs.py), hold a connection open by sending slowly (connections.py and
the body deadline here), send a body a browser could send cross-site without asking (415).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from duospec.config import DuospecError, GenerationRequest, SamplingConfig
from duospec.drafting import METHODS
from duospec.server.encoding import PromptEncoder, prompt_bytes
from duospec.server.errors import APIError, bad_request
from duospec.server.logs import install_log_escaping
from duospec.server.metrics import CONTENT_TYPE, ServerMetrics
from duospec.server.scheduler import STATUS_CLIENT_CLOSED, Delta, Failed, Finished, Job, Scheduler
from duospec.server.schema import GenerationSpec, parse_chat, parse_completion, parse_json

log = logging.getLogger("duospec.server")

KEEPALIVE_SECONDS = 2.0  # an SSE comment while a streamed request waits: it also notices a client that left


@dataclass(frozen=True)
class ServerSettings:
    """What `duospec serve` was started with (its flags), beside the pipeline."""

    model_name: str  # the id clients send as `model` (and /v1/models lists)
    method: str = "auto"  # for requests that name none
    api_key: str | None = None
    max_queue: int = 8  # requests waiting beyond the running ones
    max_batch: int = 1  # requests generating at once (continuous batching, duospec/batching.py); 1: one at a time
    max_tokens: int = 4096  # the most a request may ask for (and the default, within the context)
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_body_bytes: int = 2_000_000
    request_timeout: float = 30.0  # seconds for a request's head, and again for its body (408 beyond)
    max_connections: int = 1024  # open connections and requests in flight; more get 503 (uvicorn's limit_concurrency)
    allow_special_tokens: bool = False  # True: control-token text in prompts is parsed as control tokens


class ServerState:
    """The pipeline, the handlers' prompt encoder (tokenizer copies of its own), the scheduler and the metrics."""

    def __init__(self, pipeline, settings: ServerSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        # The generating thread uses the pipeline's tokenizer; handlers encode prompts with copies.
        self.encoder = PromptEncoder(pipeline.tokenizer, pipeline.target.vocab_size, allow_special_tokens=settings.allow_special_tokens)
        self.loop: asyncio.AbstractEventLoop | None = None  # set at start-up: signals hand work to it
        self.metrics = ServerMetrics(lambda: self.scheduler.waiting, lambda: self.scheduler.running, settings.max_batch, lambda: pipeline.costs.target_costs)
        lanes, joint = [pipeline], None
        if settings.max_batch > 1:  # the models' caches split into lanes whose passes join
            from duospec.batching import open_lanes

            lanes, joint = open_lanes(pipeline, settings.max_batch, on_pass=self.metrics.record_pass)
        self.context = pipeline.target.max_context  # per request (lane)
        self.scheduler = Scheduler(lanes, settings.max_queue, self.metrics, joint)
        self.created = int(time.time())


def create_app(pipeline, settings: ServerSettings) -> FastAPI:
    state = ServerState(pipeline, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.scheduler.start()
        try:
            yield
        finally:
            state.encoder.close()
            await asyncio.to_thread(state.scheduler.close)

    install_log_escaping(("duospec.server",))  # what clients send reaches the log escaped (logs.py)
    app = FastAPI(title="duospec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.duospec = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        _log_refusal(state, request, error)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the API is under /v1 (chat/completions, completions, models), plus /health and /metrics"
        return await api_error(request, APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, bad_request(str(error)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # A last resort (Starlette logs these once more itself); the completion routes catch their own.
        return await api_error(request, _internal(request))

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = state.scheduler.alive and not state.scheduler.closing
        status = 200 if healthy else 503
        body = {
            "status": "ok" if healthy else "stopping" if state.scheduler.closing else "generating thread stopped",
            "model": settings.model_name,
            "waiting": state.scheduler.waiting,
            "running": state.scheduler.running,  # the batch in flight
            "max_batch": state.scheduler.max_batch,
        }
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_api_key(state, request)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        _check_api_key(state, request)
        if model_id != settings.model_name:
            raise _unknown_model(state, model_id)
        return JSONResponse(_model_card(state))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _guarded(state, request, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _guarded(state, request, parse_completion)

    return app


# -- checks -----------------------------------------------------------------------------------------
def _check_api_key(state: ServerState, request: Request) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest takes the same time wherever the strings differ (no timing hints to the key)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with the server's --api-key", code="invalid_api_key")


def _check_content_type(request: Request) -> None:
    """Only JSON bodies: a browser sends text/plain, form or typeless bodies to any site without asking
    it first (CORS), so a page could otherwise drive a keyless server on this machine."""
    given = request.headers.get("content-type")
    if (given or "").split(";")[0].strip().lower() != "application/json":
        shown = "none" if given is None else repr(given)
        raise APIError(415, f"the request body must be JSON, sent with the header 'Content-Type: application/json' (got {shown})", param="Content-Type", code="unsupported_media_type")


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The body, or a 413 as soon as it passes `limit` bytes (a declared length is checked first), or
    a 408 (closing the connection) when it has not all arrived within `seconds`."""
    too_large = APIError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    try:
        return await asyncio.wait_for(_receive_body(request, limit, too_large), seconds)
    except asyncio.TimeoutError:
        message = f"the request body did not arrive within {seconds:g} s (--request-timeout); the connection is closed"
        raise APIError(408, message, code="request_timeout", headers={"Connection": "close"}) from None


async def _receive_body(request: Request, limit: int, too_large: APIError) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(STATUS_CLIENT_CLOSED, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _unknown_model(state: ServerState, name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist here; this server serves {state.settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "duospec", "max_model_len": state.context}


def _method(state: ServerState, spec: GenerationSpec) -> str:
    method = spec.method or state.settings.method
    if method not in METHODS:
        raise bad_request(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}", param="method", code="method_not_found")
    if METHODS[method].needs_draft_model and not state.pipeline.has_draft:
        raise bad_request(f"method {method!r} needs a draft model and this server has none; start it with --draft, or ask for ar, pld or auto", param="method")
    return method


async def _encode(state: ServerState, spec: GenerationSpec) -> list[int]:
    """The prompt's token ids (in the encoder's threads: a long prompt must not stall the event loop,
    nor the short prompts beside it)."""
    chat = spec.endpoint == "chat"
    try:
        return await state.encoder.encode(spec.prompt, chat)
    except DuospecError as error:
        raise bad_request(str(error), param="messages" if chat else "prompt") from None
    except TemplateError as error:  # e.g. a template that wants user/assistant turns to alternate
        raise bad_request(f"the model's chat template refuses these messages: {error}", param="messages") from None


def _check_prompt_bytes(state: ServerState, spec: GenerationSpec) -> None:
    """A 400 for a prompt with more bytes than its token limit can hold, before any tokenizing (the
    encoder knows how many bytes of text one token can stand for, at most)."""
    if isinstance(spec.prompt, list) and not all(isinstance(message, dict) for message in spec.prompt):
        return  # token ids: counted as they are
    context_limit = None if state.context is None else state.context - 1
    server_limit = state.settings.max_prompt_tokens
    limit = min(limit for limit in (context_limit, server_limit, 2**62) if limit is not None)
    bound = state.encoder.max_prompt_bytes(limit)
    size = prompt_bytes(spec.prompt)
    if bound is not None and size > bound:
        why = f"the model's context holds {state.context}" if limit == context_limit else "--max-prompt-tokens"
        raise bad_request(
            f"the prompt's text is {size} bytes, more than {limit} tokens can hold ({why}): one token of this model stands for "
            f"at most {state.encoder.bytes_per_token} bytes of text, so the prompt was refused without tokenizing it; shorten it",
            param="messages" if spec.endpoint == "chat" else "prompt", code="context_length_exceeded",
        )


async def _prompt_ids(state: ServerState, spec: GenerationSpec) -> list[int]:
    chat = spec.endpoint == "chat"
    _check_prompt_bytes(state, spec)
    ids = await _encode(state, spec)
    limit = state.settings.max_prompt_tokens
    if state.context is not None and len(ids) >= state.context:
        raise bad_request(
            f"the prompt has {len(ids)} tokens but the model's context holds {state.context}; shorten the prompt",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    if limit is not None and len(ids) > limit:
        raise bad_request(f"the prompt has {len(ids)} tokens, over the server's limit of {limit} (--max-prompt-tokens)", param="messages" if chat else "prompt", code="context_length_exceeded")
    return ids


def _max_tokens(state: ServerState, spec: GenerationSpec, prompt_tokens: int) -> int:
    limit = state.settings.max_tokens
    room = None if state.context is None else state.context - prompt_tokens
    if spec.max_tokens is None:
        return limit if room is None else max(1, min(limit, room))
    if spec.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {spec.max_tokens}", param="max_tokens")
    if spec.max_tokens > limit:
        raise bad_request(f"max_tokens {spec.max_tokens} is over the server's limit of {limit} (--max-tokens)", param="max_tokens")
    if room is not None and spec.max_tokens > room:
        raise bad_request(
            f"the model's context holds {state.context} tokens; the prompt has {prompt_tokens} and max_tokens asks for {spec.max_tokens} more; "
            "lower max_tokens or shorten the prompt",
            param="max_tokens", code="context_length_exceeded",
        )
    return spec.max_tokens


def _options(method: str, spec: GenerationSpec, max_tokens: int) -> dict:
    """Pipeline.stream's keyword arguments, validated here (a bad value is a 400 before any queueing)."""
    options = dict(method=method, max_new_tokens=max_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, seed=spec.seed, gamma=spec.gamma)
    try:
        sampling = SamplingConfig(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed)
        GenerationRequest(method=method, max_new_tokens=max_tokens, sampling=sampling, gamma=spec.gamma)
    except DuospecError as error:
        raise bad_request(str(error)) from None
    return options


# -- answering --------------------------------------------------------------------------------------
def _internal(request: Request) -> APIError:
    log.exception("%s %s: unexpected error", request.method, request.url.path)
    return APIError(500, "the server failed on this request; see its log", type="server_error")


async def _guarded(state: ServerState, request: Request, parse) -> Response:
    """_complete, with an unexpected error answered as a 500 object here (logged once, with its traceback)."""
    try:
        return await _complete(state, request, parse)
    except APIError:
        raise
    except Exception:
        raise _internal(request) from None


async def _complete(state: ServerState, request: Request, parse) -> Response:
    _check_api_key(state, request)
    _check_content_type(request)
    spec = parse(parse_json(await _read_body(request, state.settings.max_body_bytes, state.settings.request_timeout)))
    if spec.model is not None and spec.model != state.settings.model_name:
        raise _unknown_model(state, spec.model)
    method = _method(state, spec)
    prompt_ids = await _prompt_ids(state, spec)
    options = _options(method, spec, _max_tokens(state, spec, len(prompt_ids)))
    prefix = "chatcmpl" if spec.endpoint == "chat" else "cmpl"
    job = Job(f"{prefix}-{secrets.token_hex(12)}", request.url.path, prompt_ids, options, spec.stop, asyncio.get_running_loop())
    if spec.ignored_fields:
        log.info("%s ignores fields duospec does not know: %s", job.id, ", ".join(spec.ignored_fields))
    state.scheduler.submit(job)
    shape = _Shape(spec, job.id, state.settings.model_name, len(prompt_ids))
    if spec.stream:
        return _JobStream(state, job, _sse(state, job, shape), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(state, job, shape, request)


class _JobStream(StreamingResponse):
    """A stream that cancels its job however it ends: a client can leave before the event generator
    ever starts (then the generator's own `finally` never runs)."""

    def __init__(self, state: ServerState, job: Job, content, **options) -> None:
        super().__init__(content, **options)
        self._state, self._job = state, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._state.scheduler.cancel(self._job)  # a no-op once the job is done


async def _whole(state: ServerState, job: Job, shape: "_Shape", request: Request) -> Response:
    """Wait for the answer; a client that leaves meanwhile cancels the job (its slot frees at once)."""
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if event not in done:
                event.cancel()
                state.scheduler.cancel(job)
                return Response(status_code=499)  # nobody reads it
            event = event.result()
            if isinstance(event, Finished):
                return JSONResponse(shape.whole(event))
            if isinstance(event, Failed):
                error = event.error
                if event.partial_text:
                    error.extra["partial_text"] = event.partial_text
                return error.response()
    finally:
        gone.cancel()
        state.scheduler.cancel(job)  # a no-op once the job is done; else (cancelled from outside) it stops


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(state: ServerState, job: Job, shape: "_Shape") -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then `data: [DONE]`. If the client leaves, _JobStream
    cancels the job (it stops at its next round)."""
    if shape.spec.endpoint == "chat":
        yield _event(shape.chunk({"role": "assistant", "content": ""}))
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), KEEPALIVE_SECONDS)
        except asyncio.TimeoutError:
            yield ": waiting\n\n"
            continue
        if isinstance(event, Delta):
            if event.text or shape.spec.return_token_ids:
                yield _event(shape.chunk({"content": event.text}, token_ids=event.token_ids))
        elif isinstance(event, Finished):
            yield _event(shape.chunk({}, finish_reason=event.finish_reason, final=event))
            if shape.spec.include_usage:
                yield _event(shape.usage_chunk(event))
            yield "data: [DONE]\n\n"
            return
        else:
            body = event.error.body()
            if event.partial_text:
                body["error"]["partial_text"] = event.partial_text
            yield _event(body)
            yield "data: [DONE]\n\n"
            return


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Shape:
    """Builds the OpenAI response objects of one request (chat or text completion, whole or chunked)."""

    def __init__(self, spec: GenerationSpec, request_id: str, model: str, prompt_tokens: int) -> None:
        self.spec = spec
        self.id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self, finished: Finished) -> dict:
        completion = len(finished.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion}

    def _duospec(self, finished: Finished) -> dict:
        extra = dict(finished.stats)
        if self.spec.return_token_ids:
            extra["token_ids"] = finished.token_ids
        return extra

    def whole(self, finished: Finished) -> dict:
        if self.spec.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "finish_reason": finished.finish_reason, "logprobs": None}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": finished.text, "finish_reason": finished.finish_reason, "logprobs": None}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": self.usage(finished), "duospec": self._duospec(finished)}

    def chunk(self, delta: dict, *, finish_reason: str | None = None, token_ids: list[int] | None = None, final: Finished | None = None) -> dict:
        if self.spec.endpoint == "chat":
            body = self._head("chat.completion.chunk")
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            body = self._head("text_completion")
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason, "logprobs": None}
        body["choices"] = [choice]
        if self.spec.include_usage:
            body["usage"] = None  # as OpenAI: usage comes in its own last chunk
        if token_ids is not None and self.spec.return_token_ids:
            body["duospec"] = {"token_ids": token_ids}
        if final is not None:
            body["duospec"] = dict(final.stats)  # figures only: the chunks before carried the token ids
        return body

    def usage_chunk(self, finished: Finished) -> dict:
        object_name = "chat.completion.chunk" if self.spec.endpoint == "chat" else "text_completion"
        return {**self._head(object_name), "choices": [], "usage": self.usage(finished)}


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _log_refusal(state: ServerState, request: Request, error: APIError) -> None:
    """The one log line of a request refused before it reached the model (and its metrics count)."""
    path = request.url.path
    known = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"  # a bounded label set
    state.metrics.count_request(known, error.status)
    log.info("- %s %s %d %s: %s", request.method, request.url.path, error.status, error.code or error.type, error.message)
