"""Request bodies of the OpenAI API (chat and text completions), validated into one GenerationSpec.

Field types are strict (a string where a number belongs is a 400 naming the field, not a silent
conversion). Fields duospec does not know are ignored, as vLLM does, and listed in the request's log
line; fields it knows but cannot honour (n > 1, logprobs, tools, penalties, ...) are refused with a 400
that names them, so no client believes it got what it did not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from duospec.server.errors import bad_request

Number = Annotated[float, Strict()]  # ints and floats; no strings, no booleans
MAX_STOP_SEQUENCES = 4  # as the OpenAI API
# OpenAI's own default: a request without `temperature` samples at 1.0 (duospec generate's default is greedy).
DEFAULT_TEMPERATURE = 1.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class _CommonRequest(_Body):
    """Fields both endpoints share, with duospec's extensions (`method`, `top_k`, `gamma`, `return_token_ids`)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    method: StrictStr | None = None
    gamma: StrictInt | None = None
    return_token_ids: StrictBool = False


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_CommonRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None


@dataclass
class GenerationSpec:
    """What one request asks the pipeline for, whichever endpoint it came through."""

    endpoint: Literal["chat", "completion"]
    prompt: str | list[int] | list[dict]
    model: str | None
    method: str | None  # None: the server's default
    max_tokens: int | None  # None: up to the context's end (capped by the server's limit)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    gamma: int | None = None  # draft tokens per round (sd, pld, ...); None: chosen from measured costs
    ignored_fields: list[str] = field(default_factory=list)


def parse_json(body: bytes) -> dict:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, a 5000-digit number, deep nesting
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise bad_request(f"the request body is not valid JSON ({reason}); send a JSON object") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE.search(body):  # json.loads lets them through, escaped (\ud800) or as raw bytes (ED A0 80)
        _refuse_lone_surrogates(data)
    return data


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _refuse_lone_surrogates(data: dict) -> None:
    """A 400 naming the first string (or key) holding a UTF-16 surrogate without its pair: it is not
    text (no UTF-8 spelling), so no tokenizer, log or response could carry it."""
    pending: list[tuple[str, object]] = [("", data)]
    while pending:  # iterative: the JSON may nest as deep as json.loads allows
        where, value = pending.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and not _is_text(key):
                raise bad_request(f"a field name in '{where or 'the body'}' holds a lone UTF-16 surrogate (U+D800-U+DFFF without its pair), which is not text; send text as UTF-8 or as \\u escapes of whole pairs")
            if isinstance(item, str) and not _is_text(item):
                raise bad_request(f"field '{path}' holds a lone UTF-16 surrogate (U+D800-U+DFFF without its pair), which is not text; send text as UTF-8 or as \\u escapes of whole pairs", param=path.split(".")[0])
            if isinstance(item, (dict, list)):
                pending.append((path, item))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validated(model: type[_Body], data: dict) -> _Body:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
        raise bad_request(f"field '{param}': {first['msg']}{more}", param=param.split(".")[0]) from None


def _refuse_unsupported(request: _CommonRequest, unsupported: dict[str, object]) -> None:
    """A 400 for each known field whose value duospec cannot honour (its default is accepted)."""
    if request.n not in (None, 1):
        raise bad_request(f"n={request.n} is not supported: duospec returns one choice per request; send n=1 (or leave it out) and repeat the request", param="n")
    for name, default in unsupported.items():
        value = getattr(request, name)
        if value is not None and value != default and value != {}:
            raise bad_request(f"'{name}' is not supported by duospec; leave it out (or send {json.dumps(default)})", param=name)
    if not request.stream and request.stream_options is not None:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must be non-empty strings", param="stop")
    return stops


def _common(request: _CommonRequest, endpoint: str, prompt, max_tokens: int | None) -> GenerationSpec:
    return GenerationSpec(
        endpoint=endpoint,
        prompt=prompt,
        model=request.model,
        method=request.method,
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=request.seed,
        stop=_stops(request.stop),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        return_token_ids=request.return_token_ids,
        gamma=request.gamma,
        ignored_fields=sorted([*(request.model_extra or {}), *(["tool_choice"] if getattr(request, "tool_choice", None) is not None else [])]),
    )


def parse_chat(data: dict) -> GenerationSpec:
    request = _validated(ChatCompletionRequest, data)
    _refuse_unsupported(
        request,
        {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False, "top_logprobs": 0, "tools": []},
    )
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise bad_request("response_format other than {\"type\": \"text\"} is not supported by duospec", param="response_format")
    if not request.messages:
        raise bad_request("'messages' is empty; send at least one message", param="messages")
    messages = [_message(index, message) for index, message in enumerate(request.messages)]
    if request.max_tokens is not None and request.max_completion_tokens is not None and request.max_tokens != request.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one of them", param="max_completion_tokens")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _common(request, "chat", messages, max_tokens)


def _message(index: int, message: ChatMessage) -> dict:
    """{"role", "content"} with the content as one string (text parts joined)."""
    where = f"messages.{index}"
    if message.role not in ("system", "developer", "user", "assistant"):
        raise bad_request(f"{where}.role {message.role!r} is not supported; use system, user or assistant", param="messages")
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported", param="messages")
        content = "".join(part.text for part in content)
    if content is None:
        raise bad_request(f"{where} has no content; every message needs a string 'content'", param="messages")
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def parse_completion(data: dict) -> GenerationSpec:
    request = _validated(CompletionRequest, data)
    _refuse_unsupported(request, {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": 0, "best_of": 1, "echo": False, "suffix": ""})
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"a batch of {len(prompt)} prompts is not supported; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
        raise bad_request("'prompt' is empty; send some text or token ids", param="prompt")
    return _common(request, "completion", prompt, request.max_tokens)
