"""`duospec serve` as users meet it: a real server process on a free loopback port, driven by the
official `openai` client and by raw HTTP (http.client), on tiny checkpoints saved to disk.

What each group pins down:
- identity: the openai client, streaming and not, gets exactly the token ids `duospec generate` gives
  for the same request (greedy), on both endpoints;
- OpenAI shapes: usage, include_usage, finish reasons, stop sequences cut where they begin;
- bad requests: each gets its 4xx with an OpenAI error object, never a 500, and the server stays up;
- the API key, the queue under load (answered or 503 with Retry-After, nothing lost, memory back),
  a client leaving mid-stream or mid-wait frees the slot, SIGTERM/SIGINT exit 0 with no child left.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the server tests drive it with the openai client: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="duospec serve needs its extra: pip install -e '.[serve]'")

from server_process import ServerProcess
from tiny_models import perturbed, tiny_model, tiny_tokenizer

from duospec.cli import main

API_KEY = "test-key-0123456789"
CONTEXT = 2048  # long enough that a generation outlasts a disconnect or a signal (about 8 s at 250 tok/s)
MAX_TOKENS_LIMIT = 1500  # --max-tokens, below the context so that both limits can be hit separately
BODY_LIMIT = 50_000


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-models")
    target = tiny_model(seed=0, max_positions=CONTEXT)
    for name, model in (("target", target), ("draft", perturbed(target, noise=0.2, seed=7))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root / "target", root / "draft"


def model_flags(checkpoints) -> list[str]:
    target, draft = checkpoints
    return ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """One server for most tests: sd by default, an API key, a small queue and small limits."""
    process = ServerProcess(
        [*model_flags(checkpoints), "--method", "sd", "--max-batch", "1", "--max-queue", "3", "--max-tokens", str(MAX_TOKENS_LIMIT),
         "--max-body-bytes", str(BODY_LIMIT), "--served-model-name", "tiny"],
        cache=tmp_path_factory.mktemp("server-cache"), env={"DUOSPEC_API_KEY": API_KEY},
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def request(server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one raw HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        merged = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=payload, headers={k: v for k, v in merged.items() if v is not None})  # None: no such header
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else {}), dict(response.getheaders())
    finally:
        connection.close()


def metric(server, name: str, labels: str = "") -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def generate_json(checkpoints, prompt: str, method: str, max_new_tokens: int, capsys, chat: bool = True) -> dict:
    code = main(["generate", prompt, "--json", "--method", method, "--max-new-tokens", str(max_new_tokens), *model_flags(checkpoints), *([] if chat else ["--no-chat"])])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


# -- identity with `duospec generate` -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["sd", "pld", "ar"])
def test_openai_chat_gets_the_tokens_duospec_generate_gives(client, checkpoints, capsys, method):
    expected = generate_json(checkpoints, "hello world", method, 40, capsys)
    drafting = {"gamma": 4} if method != "ar" else {}  # drafts every round (tiny drafts cost as much as the target)
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello world"}], max_tokens=40, temperature=0,
        extra_body={"method": method, "return_token_ids": True, **drafting},
    )
    if method != "ar":
        assert whole.model_extra["duospec"]["acceptance_rate"] is not None  # draft tokens were verified
    assert whole.model_extra["duospec"]["token_ids"] == expected["token_ids"]
    assert whole.choices[0].message.content == expected["text"]
    assert whole.model_extra["duospec"]["method"] == method
    assert whole.usage.completion_tokens == expected["new_tokens"] and whole.usage.prompt_tokens == expected["prompt_tokens"]
    assert whole.choices[0].finish_reason == {"eos": "stop", "length": "length"}[expected["finish_reason"]]

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello world"}], max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"method": method, "return_token_ids": True, **drafting},
    ))
    streamed_ids = [t for chunk in chunks for t in (chunk.model_extra.get("duospec") or {}).get("token_ids", [])]
    assert streamed_ids == expected["token_ids"]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["new_tokens"]


def test_text_completion_gets_the_tokens_of_generate_without_chat(client, checkpoints, capsys):
    expected = generate_json(checkpoints, "abc def", "sd", 30, capsys, chat=False)
    whole = client.completions.create(model="tiny", prompt="abc def", max_tokens=30, temperature=0, extra_body={"return_token_ids": True, "gamma": 3})
    assert whole.model_extra["duospec"]["token_ids"] == expected["token_ids"] and whole.choices[0].text == expected["text"]
    assert whole.model_extra["duospec"]["acceptance_rate"] is not None
    streamed = client.completions.create(model="tiny", prompt="abc def", max_tokens=30, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected["text"]


def test_seeded_sampling_repeats_and_matches_generate(client, checkpoints, capsys):
    """ar: a speculative method's random stream also depends on its budget, measured per process."""
    code = main(["generate", "abc", "--json", "--method", "ar", "--max-new-tokens", "30", "--temperature", "0.8", "--seed", "5", "--no-chat", *model_flags(checkpoints)])
    assert code == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    answers = [client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0.8, seed=5, extra_body={"return_token_ids": True, "method": "ar"}) for _ in range(2)]
    assert [a.model_extra["duospec"]["token_ids"] for a in answers] == [expected["token_ids"]] * 2


def test_stop_sequence_cuts_the_answer_where_it_begins(client):
    full = client.completions.create(model="tiny", prompt="abc def", max_tokens=60, temperature=0, extra_body={"return_token_ids": True})
    text = full.choices[0].text
    assert len(text) == 60  # the tiny model's greedy answer runs to max_tokens here
    stop = text[20:23]  # three characters from the middle (tiny tokens are characters)
    cut = text[: text.index(stop)]
    whole = client.completions.create(model="tiny", prompt="abc def", max_tokens=60, temperature=0, stop=[stop, "never-there"], extra_body={"return_token_ids": True})
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    # usage counts the tokens up to the one that completed the stop sequence, no more
    assert whole.usage.completion_tokens == len(cut) + len(stop)
    assert whole.model_extra["duospec"]["token_ids"] == full.model_extra["duospec"]["token_ids"][: len(cut) + len(stop)]
    streamed = client.completions.create(model="tiny", prompt="abc def", max_tokens=60, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body, _ = request(server, "GET", "/health", headers={"Authorization": None})  # no key needed
    assert status == 200 and body["status"] == "ok" and body["running"] == 0


# -- bad requests -------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_REQUESTS = [
    ("malformed JSON", CHAT, b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("a JSON array", CHAT, b"[1, 2]", 400, "must be a JSON object"),
    ("temperature of the wrong type", CHAT, {**GOOD, "temperature": "hot"}, 400, "field 'temperature'"),
    ("max_tokens of the wrong type", CHAT, {**GOOD, "max_tokens": 4.5}, 400, "field 'max_tokens'"),
    ("stream of the wrong type", CHAT, {**GOOD, "stream": "yes"}, 400, "field 'stream'"),
    ("messages missing", CHAT, {"model": "tiny"}, 400, "field 'messages'"),
    ("empty messages", CHAT, {**GOOD, "messages": []}, 400, "'messages' is empty"),
    ("a message without content", CHAT, {**GOOD, "messages": [{"role": "user"}]}, 400, "has no content"),
    ("a message without role", CHAT, {**GOOD, "messages": [{"content": "hi"}]}, 400, "role"),
    ("an unknown role", CHAT, {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "not supported"),
    ("an image part", CHAT, {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "only text parts"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-5"}, 404, "does not exist here"),
    ("unknown method", CHAT, {**GOOD, "method": "magic"}, 400, "unknown method"),
    ("n = 2", CHAT, {**GOOD, "n": 2}, 400, "n=2 is not supported"),
    ("logprobs", CHAT, {**GOOD, "logprobs": True}, 400, "'logprobs' is not supported"),
    ("a penalty", CHAT, {**GOOD, "presence_penalty": 0.5}, 400, "'presence_penalty' is not supported"),
    ("stream_options without stream", CHAT, {**GOOD, "stream_options": {"include_usage": True}}, 400, "only allowed with stream=true"),
    ("negative temperature", CHAT, {**GOOD, "temperature": -1}, 400, "temperature must be >= 0"),
    ("top_p of 0", CHAT, {**GOOD, "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("max_tokens of 0", CHAT, {**GOOD, "max_tokens": 0}, 400, "at least 1"),
    ("max_tokens over the server's limit", CHAT, {**GOOD, "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "--max-tokens"),
    ("two stop lists too long", CHAT, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop"),
    ("an empty stop", CHAT, {**GOOD, "stop": [""]}, 400, "non-empty"),
    ("max_tokens past the context", "/v1/completions", {"model": "tiny", "prompt": "a" * 1000, "max_tokens": 1100}, 400, "context holds"),
    ("a prompt over the context", "/v1/completions", {"model": "tiny", "prompt": "ab" * 1100, "max_tokens": 1}, 400, "context holds"),
    ("a batch of prompts", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("an empty prompt", "/v1/completions", {"model": "tiny", "prompt": "  "}, 400, "'prompt' is empty"),
    ("token ids out of the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "token-id prompt"),
    ("echo", "/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}, 400, "'echo' is not supported"),
    ("JSON nested too deeply", CHAT, b"[" * 40_000, 400, "nested too deeply"),
    ("a 5000-digit number", CHAT, b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("a seed past 64 bits", CHAT, {**GOOD, "seed": 2**64}, 400, "fits 64 bits"),
    ("a huge top_k", CHAT, {**GOOD, "top_k": 2**63}, 400, "top_k must be"),
    ("gamma out of range", CHAT, {**GOOD, "gamma": 0}, 400, "gamma (draft tokens per round)"),
    ("a body over the limit", CHAT, {**GOOD, "messages": [{"role": "user", "content": "a" * (BODY_LIMIT + 10)}]}, 413, "--max-body-bytes"),
    ("an unknown route", "/v1/embeddings", GOOD, 404, "no route"),
]


@pytest.mark.parametrize("path, body, status, message", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_4xx_with_an_openai_error(server, path, body, status, message):
    got, answer, _ = request(server, "POST", path, body)
    assert got == status, answer
    error = answer["error"]
    assert message in error["message"] and error["type"] and set(error) >= {"message", "type", "param", "code"}
    assert "Traceback" not in server.log


def test_get_on_a_post_route_is_a_405_error_object(server):
    status, answer, headers = request(server, "GET", CHAT)
    assert status == 405 and "error" in answer and headers.get("allow") == "POST"


def test_the_openai_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.BadRequestError, match="n=3 is not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_unknown_fields_are_ignored_and_logged(server):
    status, answer, _ = request(server, "POST", CHAT, {**GOOD, "repetition_penalty": 1.1, "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"]
    server.wait_for_log(r"ignores fields duospec does not know: repetition_penalty")


# -- API key ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "", "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer "])
def test_api_key_is_enforced(server, header):
    headers = {"Authorization": header}  # None: no Authorization header at all
    for method, path, body in (("POST", CHAT, GOOD), ("GET", "/v1/models", None)):
        status, answer, _ = request(server, method, path, body, headers=headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


# -- load, disconnects -------------------------------------------------------------------------------
def wait_idle(server, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, body, _ = request(server, "GET", "/health")
        if body["running"] == 0 and body["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy after {seconds} s: {body}")


def test_load_every_request_answered_or_refused_nothing_lost_memory_back(server, client):
    prompts = [f"q{i} abc" for i in range(4)]
    expected = {p: client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text for p in prompts}
    wait_idle(server)
    rss_before = metric(server, "process_resident_memory_bytes")
    refused_before = metric(server, "duospec_requests_total", '{endpoint="/v1/completions",status="503"}')

    def one_client(number: int) -> list[tuple[str, object]]:
        outcomes = []
        for turn in range(4):
            prompt = prompts[(number + turn) % 4]
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": bool((number + turn) % 2)}
            status, answer, headers = stream_or_whole(server, body)
            if status == 200:
                outcomes.append(("ok", answer == expected[prompt]))
            else:
                outcomes.append((status, headers.get("retry-after") or headers.get("Retry-After")))
        return outcomes

    with ThreadPoolExecutor(16) as pool:
        results = [outcome for outcomes in pool.map(one_client, range(16)) for outcome in outcomes]
    answered = [correct for kind, correct in results if kind == "ok"]
    refused = [retry for kind, retry in results if kind == 503]
    assert len(answered) + len(refused) == 64, results  # every request is one or the other
    assert answered and all(answered), "an answer under load differs from the same request answered alone"
    assert refused and all(retry and int(retry) >= 1 for retry in refused), "a full queue must answer 503 with Retry-After"
    wait_idle(server)
    assert metric(server, "duospec_requests_total", '{endpoint="/v1/completions",status="503"}') - refused_before == len(refused)
    rss_after = metric(server, "process_resident_memory_bytes")
    assert rss_after < rss_before + 64 * 2**20, f"memory grew by {(rss_after - rss_before) / 2**20:.0f} MB over 64 requests"


def stream_or_whole(server, body: dict) -> tuple[int, str, dict]:
    """(status, the answer's text, headers) of a completion request, streamed or not."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read().decode()
        headers = dict(response.getheaders())
        if response.status != 200:
            return response.status, raw, headers
        if not body["stream"]:
            return 200, json.loads(raw)["choices"][0]["text"], headers
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return 200, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]), headers
    finally:
        connection.close()


def test_a_transformers_server_batches_requests_each_answered_as_alone(checkpoints, server, tmp_path):
    """--max-batch 3 on the transformers backend (models/hf_lanes.py): 16 streamed requests of every
    method from 6 clients at once give the texts the one-at-a-time server gives, and target passes
    served several requests."""
    wait_idle(server)
    batched = ServerProcess([*model_flags(checkpoints), "--max-batch", "3", "--served-model-name", "tiny"], cache=tmp_path)
    try:
        assert re.search(r"batch 3, queue 8", batched.log)
        jobs = [(prompt, method, 6 + 7 * index) for index, (prompt, method) in enumerate((p, m) for p in ("abc", "w1 w2 w3", "the cat", "xyz xyz") for m in ("ar", "sd", "pld", "specexec"))]

        def body(prompt, method, max_tokens) -> dict:
            return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "method": method}

        reference = {job: stream_or_whole(server, body(*job))[1] for job in jobs}
        with ThreadPoolExecutor(6) as pool:
            answers = dict(zip(jobs, pool.map(lambda job: stream_or_whole(batched, body(*job)), jobs)))
        assert all(status == 200 for status, _, _ in answers.values())
        mismatches = [job for job in jobs if answers[job][1] != reference[job]]
        assert not mismatches, mismatches
        passes, single = metric(batched, "duospec_batch_size_count"), metric(batched, "duospec_batch_size_bucket", '{le="1.0"}')
        assert passes > single, "no target pass served more than one request"
    finally:
        batched.stop()


def completion_connection(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse | None]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    return connection, (connection.getresponse() if body.get("stream") else None)


def test_a_client_leaving_mid_stream_frees_the_slot(server):
    wait_idle(server)
    closed_before = metric(server, "duospec_requests_total", '{endpoint="/v1/completions",status="499"}')
    connection, response = completion_connection(server, {"model": "tiny", "prompt": "abc", "max_tokens": 1400, "temperature": 0, "stream": True})
    assert response.status == 200
    response.readline()  # the first event: generation is under way
    connection.sock.shutdown(2)
    connection.close()
    wait_idle(server, seconds=3)  # 1,400 tokens take about 6 s; a cancelled job ends within a round
    line = server.wait_for_log(r"cmpl-\w+ /v1/completions 499 method=sd prompt=3 completion=(\d+) finish=cancelled")
    assert int(line.group(1)) < 1400
    assert metric(server, "duospec_requests_total", '{endpoint="/v1/completions",status="499"}') == closed_before + 1


def test_a_client_leaving_while_waiting_for_a_whole_answer_frees_the_slot(server):
    wait_idle(server)
    connection, _ = completion_connection(server, {"model": "tiny", "prompt": "wxyz", "max_tokens": 1400, "temperature": 0})
    wait_running(server)
    connection.sock.shutdown(2)
    connection.close()
    wait_idle(server, seconds=3)
    line = server.wait_for_log(r"cmpl-\w+ /v1/completions 499 method=sd prompt=4 completion=(\d+) finish=cancelled")
    assert int(line.group(1)) < 1400


def wait_for_health(server, field: str, value: int, seconds: float = 10) -> None:
    """Until /health reports `field` (running, waiting) == value."""
    deadline = time.monotonic() + seconds
    while request(server, "GET", "/health")[1][field] != value:
        assert time.monotonic() < deadline, f"/health never reported {field} = {value}"
        time.sleep(0.02)


def wait_running(server) -> None:
    wait_for_health(server, "running", 1)


def test_a_client_leaving_the_queue_frees_its_place(server):
    wait_idle(server)
    running, response = completion_connection(server, {"model": "tiny", "prompt": "abc", "max_tokens": 1400, "temperature": 0, "stream": True})
    response.readline()
    queued, _ = completion_connection(server, {"model": "tiny", "prompt": "abcdefgh", "max_tokens": 5, "temperature": 0})
    wait_for_health(server, "waiting", 1)
    queued.sock.shutdown(2)
    queued.close()
    server.wait_for_log(r"cmpl-\w+ /v1/completions 499 prompt=8 left the queue before it started", seconds=10)
    status, body, _ = request(server, "GET", "/health")
    assert body["waiting"] == 0 and body["running"] == 1  # its place is free while the first still runs
    running.sock.shutdown(2)
    running.close()
    wait_idle(server, seconds=3)


def test_a_body_cut_off_mid_upload_is_no_server_error(server):
    import socket

    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": ".encode())
    time.sleep(0.2)
    raw.close()
    server.wait_for_log(r"POST /v1/completions 499 .*before sending the whole body")
    assert "Traceback" not in server.log and request(server, "GET", "/health")[0] == 200


# -- shutdown -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, method", [(signal.SIGTERM, "duo"), (signal.SIGINT, "sd")])
def test_signal_cancels_the_stream_in_flight_exits_0_and_leaves_no_child(checkpoints, tmp_path, sig, method):
    """With --method duo the draft runs in a child process: it must not outlive the server. (Ctrl-C
    is checked with sd: a duo server takes about 25 s to start here, its draft process's set-up.)"""
    queue = "0" if method == "sd" else "4"
    server = ServerProcess([*model_flags(checkpoints), "--method", method, "--max-batch", "1", "--max-queue", queue], cache=tmp_path)
    try:
        children = server.children()
        assert children or method != "duo", "duo's draft process should be running after the warm-up"
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "abc", "max_tokens": 1400, "temperature": 0, "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        first = response.readline()  # the first event: generation is under way
        body = {"prompt": "queued", "max_tokens": 5}
        if queue == "0":  # --max-queue 0: nothing may wait while one runs
            assert request(server, "POST", "/v1/completions", body)[0] == 503
            queued = None
        else:
            queued = ThreadPoolExecutor(1).submit(request, server, "POST", "/v1/completions", body)
            wait_for_health(server, "waiting", 1)
        server.process.send_signal(sig)
        events = [line[6:] for line in (first + response.read()).decode().splitlines() if line.startswith("data: ")]
        assert server.process.wait(30) == 0, server.log
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        # cut short (1,400 greedy tokens take seconds): an error event saying so, with the text made so far
        assert last["error"]["code"] == "server_shutting_down" and last["error"]["partial_text"]
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
        assert last["error"]["partial_text"] == streamed
        if queued is not None:  # a request still waiting when the signal came is refused, not dropped
            status, answer, headers = queued.result(30)
            assert status == 503 and "shutting down" in answer["error"]["message"] and headers.get("retry-after")
        assert "Traceback" not in server.log and "server stopped" in server.log
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], "a child process outlived the server"
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# -- flags --------------------------------------------------------------------------------------------
def test_a_taken_port_is_a_clear_error_before_loading(capsys, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        code = main(["serve", "--port", str(taken.getsockname()[1]), "--target", str(tmp_path)])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "config.json" not in err  # failed before loading


def test_listening_beyond_loopback_warns(capsys, tmp_path):
    code = main(["serve", "--host", "0.0.0.0", "--port", "0", "--target", str(tmp_path)])
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "--api-key" in err
    assert code == 2 and "holds no config.json" in err  # the bad target still fails clearly


@pytest.mark.parametrize("flags, message", [(["--method", "nope"], "unknown method"), (["--port", "70000"], "--port"), (["--max-tokens", "0"], "--max-tokens"), (["--api-key", " "], "--api-key is empty"), (["--method", "sd", "--target", "/nowhere"], "needs a draft model")])
def test_bad_serve_flags_fail_before_loading(capsys, flags, message):
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


# -- the real default pair ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("method", ["sd", "auto"])
def test_real_pair_openai_client_gets_the_tokens_of_duospec_generate(tmp_path, capsys, method):
    """The embedded pair on its default backend (llama.cpp where installed): greedy, streamed and not."""
    from test_real_models import PROMPTS, _require_models

    _require_models()
    prompt = PROMPTS[0]
    assert main(["generate", prompt, "--json", "--method", method, "--max-new-tokens", "48"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    server = ServerProcess(["--method", method], cache=Path(os.environ.get("DUOSPEC_CACHE", Path.home() / ".cache" / "duospec")))  # the converted models
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model="qwen2.5-coder-1.5b-instruct", messages=messages, max_tokens=48, temperature=0, extra_body={"return_token_ids": True})
        assert whole.model_extra["duospec"]["token_ids"] == expected["token_ids"] and whole.choices[0].message.content == expected["text"]
        chunks = list(client.chat.completions.create(model="qwen2.5-coder-1.5b-instruct", messages=messages, max_tokens=48, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    finally:
        assert server.stop() == 0, server.log


def test_costs_are_measured_before_the_server_listens(server):
    """Every cost a request could need is measured at start-up, never inside a request (issue 24)."""
    line = server.wait_for_log(r"costs ready before serving: ([^\n]+)")
    assert line.group(1).split(", ") == ["target pass curve", "draft step", "specexec tree costs"]
    assert server.log.index("costs ready before serving") < server.log.index("serving 'tiny'")
